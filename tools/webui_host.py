"""A real AUTOMATIC1111 WebUI, headless, with this repository linked as an extension: for tests and measurements.

The WebUI is on no package registry, so a developer provides it: `WEBUI_PATH` = an A1111 checkout (v1.10.1 was run
here) with its `repositories/` and a `venv/` holding its requirements (docs/webui.md says how to make one offline).
This module then, outside the checkout, in a data folder of its own (`--data-dir`, so the user's settings and
models are never touched and every start is a fresh install unless a config.json is written first):

1. builds a random-weight checkpoint and an offline CLIP tokenizer cache (tools/webui_checkpoint.py, run with the
   WebUI's Python), once per data folder;
2. links the repository as `extensions/comfy_accel` and the test-only probe (tests/scripts/webui_probe.py) as
   `extensions/comfy_accel_probe`;
3. starts `launch.py` headless on CPU, sends no request before the log says "Startup time:" (an early request
   kills A1111's server), then waits for the model to load;
4. drives it over the API (txt2img/img2img, options, the probe's per-call record, the extension's status);
5. stops it by the PID it started (its process group), never by name.

    WEBUI_PATH=/path/to/stable-diffusion-webui python -m tools.webui_host [--bench]   # start, job(s), stop
    (WEBUI_PYTHON=<a python with the WebUI's requirements> runs it on another stack than its venv/)
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = "accel_random_sd15"
LAUNCH_FLAGS = ("--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half",
                "--precision", "full", "--api", "--skip-version-check", "--no-download-sd-model",
                "--skip-install", "--disable-safe-unpickle")


class WebUIError(RuntimeError):
    pass


def webui_path() -> Path | None:
    value = os.environ.get("WEBUI_PATH")
    return Path(value).resolve() if value else None


def webui_python(root: Path) -> Path:
    for candidate in (root / "venv" / "bin" / "python", root / "venv" / "Scripts" / "python.exe"):
        if candidate.is_file():
            return candidate
    raise WebUIError(f"{root} has no venv/ with the WebUI's Python (make one as docs/webui.md says)")


class WebUIHost:
    def __init__(self, root: Path, data_dir: Path, port: int = 7861, env: dict | None = None,
                 python: Path | None = None):
        self.root, self.data_dir, self.port = Path(root), Path(data_dir), port
        if not (self.root / "launch.py").is_file() or not (self.root / "modules" / "scripts.py").is_file():
            raise WebUIError(f"{self.root} is not an AUTOMATIC1111 WebUI checkout (no launch.py / modules/scripts.py)")
        self.python = Path(python) if python else webui_python(self.root)   # another Python: a stack check
        self.hf_home = self.data_dir / "hf"
        self.log_path = self.data_dir / "webui.log"
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self.base = f"http://127.0.0.1:{port}"

    # -- setup -----------------------------------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """The random-weight checkpoint (with its .yaml beside it), built with the WebUI's Python if absent."""
        checkpoint = self.data_dir / "models" / "Stable-diffusion" / f"{CHECKPOINT}.safetensors"
        if not checkpoint.is_file() or not (self.hf_home / "hub").is_dir():
            subprocess.run([str(self.python), str(REPO_ROOT / "tools" / "webui_checkpoint.py"), str(checkpoint),
                            str(self.hf_home)], cwd=self.root, check=True, env=self._env())
        return checkpoint

    def prepare(self) -> None:
        self.checkpoint()
        extensions = self.data_dir / "extensions"
        extensions.mkdir(parents=True, exist_ok=True)
        _link(extensions / "comfy_accel", REPO_ROOT)
        probe = extensions / "comfy_accel_probe" / "scripts"
        probe.mkdir(parents=True, exist_ok=True)
        _link(probe / "accel_probe.py", REPO_ROOT / "tests" / "scripts" / "webui_probe.py")
        # --skip-prepare-environment also skips extension installers: run ours as the launcher would
        subprocess.run([str(self.python), str(REPO_ROOT / "install.py")], cwd=REPO_ROOT, check=True,
                       env=self._env(), stdout=subprocess.DEVNULL)

    def write_config(self, values: dict) -> None:
        """A config.json (a user's saved settings) for the next start; {} removes it (a fresh install)."""
        path = self.data_dir / "config.json"
        if values:
            path.write_text(json.dumps(values, indent=2))
        elif path.exists():
            path.unlink()

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update({"HF_HOME": str(self.hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1", **self.extra_env})
        return env

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> None:
        self.prepare()
        log = self.log_path.open("w")
        args = [str(self.python), "launch.py", *LAUNCH_FLAGS, "--port", str(self.port), "--data-dir",
                str(self.data_dir), "--ckpt", str(self.data_dir / "models" / "Stable-diffusion" /
                                                  f"{CHECKPOINT}.safetensors")]
        self.process = subprocess.Popen(args, cwd=self.root, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.started_at = time.monotonic()
        self.wait_for_log("Startup time:", timeout)   # no request before this line
        self.startup_seconds = time.monotonic() - self.started_at
        self.wait_for_model(timeout)

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WebUIError(f"the WebUI exited with {self.process.returncode}:\n{self.log_tail()}")
            if text in self.log():
                return
            time.sleep(0.5)
        raise WebUIError(f"no {text!r} in the WebUI log after {timeout:.0f} s:\n{self.log_tail()}")

    def wait_for_model(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Model loaded in" in self.log():
                return
            try:   # asking for the options loads the model when A1111 deferred it
                self.get("/sdapi/v1/options", timeout=timeout)
            except WebUIError:
                pass
            time.sleep(1.0)
        raise WebUIError(f"the model did not load in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the WebUI started here: SIGTERM to its process group (its PID), SIGKILL after `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- logs -----------------------------------------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").replace("\r", "\n")   # tqdm writes \r
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    # -- HTTP -----------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 600.0) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, text
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise WebUIError(f"{method} {path}: {exc}") from None

    def get(self, path: str, timeout: float = 60.0):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise WebUIError(f"GET {path}: HTTP {status}: {body}")
        return body

    def post(self, path: str, body: dict, timeout: float = 600.0):
        return self.request("POST", path, body, timeout=timeout)

    # -- jobs -----------------------------------------------------------------------------------------------------
    def job(self, kind: str = "txt2img", accel: dict | None = None, **payload) -> "Job":
        """One API job; `accel` = the accordion's values by name (webui_mapping.PANEL_ORDER), None = untouched."""
        from accelerators.webui_mapping import PANEL_ORDER, PanelValues

        body = {"prompt": "a red cube", "negative_prompt": "blurry", "steps": 6, "width": 64, "height": 64,
                "seed": 1234, "sampler_name": "Euler", "cfg_scale": 7, "send_images": True, **payload}
        if accel is not None:
            values = {**PanelValues().__dict__, "enabled": True, **accel}
            body.setdefault("alwayson_scripts", {})["comfy-accel"] = {"args": [values[k] for k in PANEL_ORDER]}
        self.post("/accel-probe/reset", {})
        started = time.monotonic()
        status, response = self.post(f"/sdapi/v1/{kind}", body)
        seconds = time.monotonic() - started
        calls = self.get("/accel-probe/jobs")
        status_after = self.get("/comfy-accel/status")
        return Job(status, response, seconds, calls[-1]["calls"] if calls else [], status_after)


class Job:
    def __init__(self, status: int, response, seconds: float, calls: list, accel_status: dict):
        self.status, self.response, self.seconds, self.calls = status, response, seconds, calls
        self.accel = accel_status.get("last_job") or {}

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def error(self) -> str:
        body = self.response if isinstance(self.response, dict) else {}
        return str(body.get("errors") or body.get("error") or body.get("detail") or self.response)

    @property
    def infotext(self) -> str:
        return json.loads(self.response["info"])["infotexts"][0]

    @property
    def batches(self) -> list[int]:
        return [c["batch"] for c in self.calls]

    def image(self):
        """The first image as a float numpy array (H, W, 3)."""
        import io

        import numpy
        from PIL import Image

        data = base64.b64decode(self.response["images"][0])
        return numpy.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=numpy.float32)


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


BENCH_STACKS = (("eager (extension off)", None), ("CFG cutoff 50%", {"backend": "eager", "cfg_cutoff": True,
                                                                          "cfg_cutoff_percent": 50}),
                ("DeepCache 3", {"backend": "eager", "deepcache": True}),
                ("inductor, first job", {"backend": "inductor"}), ("inductor, again", {"backend": "inductor"}),
                ("inductor + DeepCache 3, first job", {"backend": "inductor", "deepcache": True}),
                ("inductor + DeepCache 3, again", {"backend": "inductor", "deepcache": True}))


def bench(host: WebUIHost, steps: int = 20, size: int = 64) -> list[dict]:
    """One API job per stack (same seed): seconds, UNet calls and batches, compile events, max pixel difference
    from the eager image. Prints a Markdown table (docs/benchmarks.md takes it)."""
    import numpy

    rows, reference = [], None
    for name, accel in BENCH_STACKS:
        job = host.job(accel=accel, steps=steps, width=size, height=size)
        if not job.ok:
            raise WebUIError(f"{name}: {job.error}")
        image = job.image()
        reference = image if reference is None else reference
        counts = job.accel.get("counts", {})
        rows.append({"stack": name, "seconds": round(job.seconds, 2), "calls": len(job.batches),
                     "batch 1 calls": job.batches.count(1), "from cache": counts.get("shallow", 0),
                     "compiled calls": counts.get("compiled", 0), "compile events": job.accel.get("compile_events", 0),
                     "max pixel diff": float(numpy.abs(image - reference).max())})
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    return rows


if __name__ == "__main__":
    root = webui_path()
    if root is None:
        sys.exit("set WEBUI_PATH to an AUTOMATIC1111 checkout with its venv")
    data = Path(os.environ.get("WEBUI_DATA", "/tmp/comfy_accel_webui"))
    with WebUIHost(root, data, python=os.environ.get("WEBUI_PYTHON")) as host:   # WEBUI_PYTHON: another stack
        print(f"started: 'Startup time:' after {host.startup_seconds:.0f} s")
        if "--bench" in sys.argv:
            bench(host)
        else:
            job = host.job(accel={"backend": "eager", "cfg_cutoff": True, "cfg_cutoff_percent": 50})
            print(job.status, job.batches, job.infotext if job.ok else job.error)
