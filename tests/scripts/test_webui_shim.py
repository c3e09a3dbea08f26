"""The WebUI extension inside a real AUTOMATIC1111 checkout (WEBUI_PATH); skipped where there is none.

The WebUI cannot be installed here (HOST.md), so this runs only when WEBUI_PATH points at a checkout whose
requirements are installed in this Python: it loads scripts/comfy_accel_webui.py with the WebUI's own script
loader, then checks the accordion script, the settings section, the SdUnet option and the per-job overrides
that before_process sets on a real processing object.
"""
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

WEBUI_PATH = os.environ.get("WEBUI_PATH")
pytestmark = pytest.mark.skipif(not WEBUI_PATH, reason="WEBUI_PATH is not set: needs an AUTOMATIC1111 WebUI "
                                                       "checkout (not installable here, see HOST.md)")


@pytest.fixture(scope="module")
def webui():
    root = Path(WEBUI_PATH).resolve()
    if not (root / "modules" / "scripts.py").is_file():
        pytest.fail(f"WEBUI_PATH={root} is not an AUTOMATIC1111 WebUI checkout (no modules/scripts.py)")
    sys.path.insert(0, str(root))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from modules import shared_init

        shared_init.initialize()
        from modules import script_callbacks, script_loading, scripts, sd_unet, shared

        shim = script_loading.load_module(str(REPO_ROOT / "scripts" / "comfy_accel_webui.py"))
        yield {"shim": shim, "scripts": scripts, "callbacks": script_callbacks, "sd_unet": sd_unet,
               "shared": shared}
    finally:
        os.chdir(cwd)


def test_shim_registers_an_always_visible_script(webui):
    shim, scripts = webui["shim"], webui["scripts"]
    assert shim.IN_WEBUI is True
    script = shim.AccelScript()
    assert isinstance(script, scripts.Script)
    assert script.show(False) is scripts.AlwaysVisible and script.title() == "comfy-accel"


def test_settings_section_and_unet_option(webui):
    callbacks, shared = webui["callbacks"], webui["shared"]
    callbacks.ui_settings_callback()
    for key in webui["shim"].SETTING_KEYS:
        assert key in shared.opts.data_labels, key
    labels = [option.label for option in callbacks.list_unets_callback()]
    assert webui["shim"].UNET_LABEL in labels


def test_before_process_sets_per_job_overrides_and_infotext(webui):
    from modules.processing import StableDiffusionProcessingTxt2Img

    p = StableDiffusionProcessingTxt2Img(prompt="x", steps=20)
    args = (True, "eager", False, 3, True, 60.0, True)
    webui["shim"].AccelScript().before_process(p, *args)
    assert p.override_settings["s_min_uncond_all"] is True
    assert p.override_settings["sd_vae_decode_method"] == "TAESD"
    assert p.extra_generation_params["Accel CFG cutoff"] == "60%"
    with pytest.raises(RuntimeError, match="comfy-accel: unknown backend 'warp'"):
        webui["shim"].AccelScript().before_process(p, True, "warp", False, 3, False, 60.0, False)
