"""The pack's face in the real ComfyUI frontend, driven in headless Chromium: settings, the Accel panel,
toasts during a compile, node badges, and the cache panel's delete/clear checked on disk.

Screenshots are written to test_artifacts/web/.
"""
import json
from pathlib import Path

import pytest

from tests.web.harness import Browser, require_browser, start_server, wait_for
from tests.web.harness import artifacts_dir as web_artifacts

pytestmark = pytest.mark.browser
CHECKPOINT = "accel_random_sd15.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    from tools.checkpoint_factory import ensure_checkpoint

    server = start_server(tmp_path_factory, "web")
    checkpoints = Path(server.base) / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / CHECKPOINT).symlink_to(ensure_checkpoint())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(server, artifacts_dir):
    browser = Browser(server.url, web_artifacts(artifacts_dir, "web"))
    browser.open()
    yield browser
    browser.close()


def open_settings(page):
    page.keyboard.press("Escape")
    page.evaluate("() => app.extensionManager.command.execute('Comfy.ShowSettingsDialog')")
    page.locator("li.p-listbox-option[aria-label=Accel]").click()
    page.locator('[id="Accel.DefaultBackend"]').wait_for()


def close_dialogs(page):
    page.keyboard.press("Escape")
    page.wait_for_timeout(200)


def choose(page, setting_id, option_label):
    page.locator(f'[id="{setting_id}"]').click()
    page.locator(f'li[role=option][aria-label="{option_label}"]').click()


def number_input(page, setting_id):
    return page.locator(f'[id="{setting_id}"] input, input[id="{setting_id}"]').first


def settings_file(server) -> dict:
    return json.loads((Path(server.cache_dir) / "settings.json").read_text())


def test_settings_appear_persist_and_reach_python(server, browser):
    page = browser.page
    open_settings(page)
    for label in ("Default backend", "When a backend cannot serve a run", "Artifact cache budget (GB on disk)"):
        assert page.get_by_text(label, exact=True).is_visible(), label
    choose(page, "Accel.FallbackPolicy", "fail the prompt")
    wait_for(lambda: server.get("/accel/settings")["fallback_policy"] == "error", what="fallback policy at the server")
    budget = number_input(page, "Accel.CacheBudgetGB")
    budget.click()
    budget.press("Control+a")
    budget.type("35")  # PrimeVue's InputNumber takes keystrokes and commits on blur
    budget.press("Tab")
    wait_for(lambda: server.get("/accel/settings")["cache_budget_gb"] == 35, what="cache budget at the server")
    assert settings_file(server)["fallback_policy"] == "error"
    assert settings_file(server)["cache_budget_gb"] == 35
    browser.shot("settings-changed")
    close_dialogs(page)

    # persisted: a fresh page shows the same values, in the dialog and in the frontend's own store
    browser.open()
    open_settings(page)
    assert page.locator('[id="Accel.FallbackPolicy"]').inner_text().strip() == "fail the prompt"
    assert float(number_input(page, "Accel.CacheBudgetGB").input_value()) == 35
    browser.shot("settings-after-reload")
    choose(page, "Accel.FallbackPolicy", "run eager and say why")
    wait_for(lambda: server.get("/accel/settings")["fallback_policy"] == "eager", what="policy back to eager")
    close_dialogs(page)


def test_python_side_settings_win_on_load(server, browser):
    """Another host (the WebUI) writing the shared settings: the dialog shows the server's value."""
    server.post("/accel/settings", {"default_backend": "tensorrt"})
    page = browser.open()
    open_settings(page)
    assert page.locator('[id="Accel.DefaultBackend"]').inner_text().strip() == "tensorrt"
    assert page.evaluate("() => app.extensionManager.setting.get('Accel.DefaultBackend')") == "tensorrt"
    close_dialogs(page)
    server.post("/accel/settings", {"default_backend": "auto"})


def test_compile_switches_are_settings_that_reach_python(server, browser):
    page = browser.open()
    open_settings(page)
    for label in ("Precompile the UNet for a fast restart", "Convolution weights channels-last on the GPU",
                  "Import the compiler at startup"):
        assert page.get_by_text(label, exact=True).is_visible(), label
    close_dialogs(page)
    page.evaluate("() => app.extensionManager.setting.set('Accel.Precompile', false)")
    wait_for(lambda: server.get("/accel/settings")["precompile"] is False, what="precompile off at the server")
    assert settings_file(server)["precompile"] is False
    page.evaluate("() => app.extensionManager.setting.set('Accel.Precompile', true)")
    wait_for(lambda: server.get("/accel/settings")["precompile"] is True, what="precompile on again")


def test_out_of_range_setting_is_refused_with_a_message_and_reverted(server, browser):
    import urllib.error

    before = settings_file(server) if (Path(server.cache_dir) / "settings.json").exists() else None
    with pytest.raises(urllib.error.HTTPError) as err:
        server.post("/accel/settings", {"cache_budget_gb": -3})
    assert err.value.code == 400
    assert "cache_budget_gb must be a number between 0.1 and 10000" in err.value.read().decode()

    page = browser.open()
    good = server.get("/accel/settings")["cache_budget_gb"]
    page.evaluate("() => app.extensionManager.setting.set('Accel.CacheBudgetGB', 50000)")
    toast = page.locator(".p-toast-message", has_text="setting refused")
    toast.wait_for(timeout=10_000)
    assert "cache_budget_gb must be a number between 0.1 and 10000" in toast.inner_text()
    browser.shot("setting-refused-toast")
    wait_for(lambda: page.evaluate("() => app.extensionManager.setting.get('Accel.CacheBudgetGB')") == good,
             what="the refused value put back")
    assert server.get("/accel/settings")["cache_budget_gb"] == good
    if before is not None:
        assert settings_file(server) == before


def open_panel(page):
    close_dialogs(page)
    if not page.locator("[data-testid=accel-panel]").is_visible():
        page.locator(".pi-bolt").first.click()
    page.locator("[data-testid=accel-status]").wait_for(timeout=10_000)


def test_panel_lists_every_accelerator_with_its_reason(server, browser):
    page = browser.open()
    open_panel(page)
    for row in server.get("/accel/status")["accelerators"]:
        cell = page.locator(f'[data-testid=accel-status] tr[data-accelerator="{row["name"]}"]')
        assert cell.count() == 1, row["name"]
        assert row["reason"] in cell.inner_text()
        assert ("✓" if row["available"] else "✗") in cell.inner_text()
    browser.shot("panel-accelerators")


def compile_prompt() -> dict:
    """Checkpoint → Accelerate Model (inductor) → KSampler, 64×64, 2 steps: one real CPU compile."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "12": {"class_type": "AccelAccelerateModel", "inputs": {"model": ["1", 0], "backend": "inductor"}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["12", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "accel_web/compile"}},
    }


def cache_ids(server) -> list[str]:
    listing = server.get("/accel/cache")
    entries = listing if isinstance(listing, list) else listing.get("entries", [])
    return [e.get("id") for e in entries]


def files_naming(root: Path, text: str) -> list[Path]:
    """Files of the entry: its folder and payloads. The store keeps its per-key lock files (locks/<id>.lock) on
    purpose — deleting one while another process waits on it would let two builders in — so they do not count."""
    return [p for p in root.rglob("*") if text in str(p.relative_to(root)) and p.relative_to(root).parts[0] != "locks"]


def test_compile_toast_cache_entry_badge_delete_and_clear(server, browser):
    before = set(cache_ids(server))
    page = browser.open()
    page.evaluate("async (p) => { await app.loadApiJson(p, 'compile.json'); await app.queuePrompt(0, 1); }",
                  compile_prompt())
    toast = page.locator(".p-toast-message", has_text="comfy-accel ·").first
    toast.wait_for(timeout=120_000)  # during the compile
    browser.shot("compile-toast")
    wait_for(lambda: page.evaluate("() => { const s = window.comfyAccel.nodeStatus.get('12'); "
                                   "return s && !s.text.startsWith('⏳') && s.text }"),
             timeout=240, what="the Accelerate Model badge after sampling")
    browser.shot("compile-badge", fit=True)
    new = [i for i in cache_ids(server) if i not in before]
    assert new, "the compile left no entry in the artifact cache"
    cache_root = Path(server.cache_dir)
    assert files_naming(cache_root, new[0]), f"entry {new[0]} not found under {cache_root}"

    open_panel(page)
    row = page.locator(f'[data-testid=accel-cache] tr[data-entry-id="{new[0]}"]')
    row.wait_for(timeout=10_000)
    browser.shot("panel-cache-entry")

    # bad ids: a clear message, nothing on disk lost
    import urllib.error

    # a well-formed id of no entry, a malformed one, a path
    for bad, code in (("0" * 64, 404), ("does-not-exist-0000", 400), ("..%2F..%2Fsettings.json", 400)):
        with pytest.raises(urllib.error.HTTPError) as err:
            server.request("DELETE", f"/accel/cache/{bad}")
        assert err.value.code == code and err.value.read()
    assert files_naming(cache_root, new[0])

    row.locator(".accel-delete").click()
    page.locator(".p-toast-message", has_text=f"Removed cache entry {new[0]}").wait_for(timeout=10_000)
    wait_for(lambda: new[0] not in cache_ids(server), what="entry gone from the listing")
    assert not files_naming(cache_root, new[0]), "the deleted entry is still on disk"
    assert row.count() == 0 or not row.is_visible()

    page.locator(".accel-clear").click()
    page.get_by_role("button", name="Delete").last.click()  # the frontend's own confirmation dialog
    wait_for(lambda: cache_ids(server) == [], what="cache cleared")
    browser.shot("panel-cache-cleared")
