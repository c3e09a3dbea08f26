"""Shared by the browser tests: a real ComfyUI server with the pack, and Debian's headless Chromium.

One server and one browser per test module (module-scoped fixtures in each module call these helpers).
The server's user settings skip the first-run template dialog, so the page opens on the canvas.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIRST_RUN_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
                      "Comfy.InstalledVersion": "1.32.9", "Comfy.Minimap.Visible": False}


def require_browser():
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium; "
                    "tools/setup_env.sh --browser)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("needs the playwright Python package (pip install playwright)")


def start_server(tmp_path_factory, name: str, with_test_nodes: bool = True, env: dict | None = None):
    """A ComfyUI server with the pack, its own base dir and cache dir, first-run dialogs off."""
    from tools.comfy_host import REPO_ROOT, ComfyServer

    base = tmp_path_factory.mktemp(f"{name}-base")
    user = base / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    (user / "comfy.settings.json").write_text(json.dumps(FIRST_RUN_SETTINGS))
    if with_test_nodes:
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / "accel_test_nodes.py").symlink_to(REPO_ROOT / "tests/host_nodes/accel_test_nodes.py")
    cache = tmp_path_factory.mktemp(f"{name}-cache")
    server = ComfyServer(base_dir=base, env={"COMFY_ACCEL_CACHE": str(cache), **(env or {})})
    server.cache_dir = cache
    return server


class Browser:
    """One headless Chromium (Playwright) with one page on the ComfyUI app; collects console errors."""

    def __init__(self, url: str, artifacts: Path):
        from playwright.sync_api import sync_playwright

        self.url = url
        self.artifacts = artifacts
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        self.page = self.browser.new_page(viewport={"width": 1500, "height": 950})
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))

    def open(self):
        self.page.goto(self.url)
        self.page.wait_for_function("window.app && window.app.graph && window.app.extensionManager "
                                    "&& window.comfyAccel && window.comfyAccel.serverSettings", timeout=60_000)
        return self.page

    def shot(self, name: str, fit: bool = False) -> Path:
        if fit:
            self.page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
            self.page.wait_for_timeout(300)
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def close(self):
        try:
            self.browser.close()
        finally:
            self._pw.stop()


def artifacts_dir(root: Path, sub: str) -> Path:
    path = root / sub
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_for(predicate, timeout: float = 30, interval: float = 0.2, what: str = "condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def load_workflow(page, workflow: dict) -> list[str]:
    """Loads a UI-format workflow in the real frontend; returns the node types it reported missing."""
    return page.evaluate("""async (wf) => {
        const missing = [];
        const probe = { name: "comfy_accel.test.probe." + Math.random(),
                        afterConfigureGraph: (types) => { missing.push(...(types || []).map(t => t.type ?? t)); } };
        app.registerExtension(probe);
        await app.loadGraphData(wf, true, true, null, { showMissingNodesDialog: true, showMissingModelsDialog: false });
        const unknown = app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type);
        return [...new Set([...missing, ...unknown])];
    }""", workflow)


def graph_to_api(page) -> dict:
    """The API form of the loaded graph, produced by the real frontend (what Queue sends)."""
    return page.evaluate("async () => (await app.graphToPrompt()).output")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
