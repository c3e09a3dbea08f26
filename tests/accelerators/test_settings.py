"""The compile lane's switches are settings (saved beside the cache, shown in the settings dialog); an environment
variable overrides one for its process, parsed by one function."""
import json

import pytest


@pytest.fixture()
def settings(pack, monkeypatch):
    from comfy_accel.accelerators import settings

    for name in ("_settings", "_path", "_overrides"):   # restored after the test
        monkeypatch.setattr(settings, name, getattr(settings, name))
    monkeypatch.setattr(settings, "_path", None)   # nothing written to a real settings file
    for variable in settings.ENV_OVERRIDES.values():
        monkeypatch.delenv(variable, raising=False)
    return settings


def test_one_parser_for_on_off_words(settings):
    assert [settings.parse_switch(w) for w in ("1", "on", " TRUE ", "yes")] == [True] * 4
    assert [settings.parse_switch(w) for w in ("0", "Off", "false", "no")] == [False] * 4
    assert settings.parse_switch("maybe") is None and settings.parse_switch("") is None
    environ = {"COMFY_ACCEL_PRECOMPILE": "0", "COMFY_ACCEL_CHANNELS_LAST": "sometimes", "COMFY_ACCEL_PREIMPORT": " "}
    assert settings.read_env_overrides(environ) == {"precompile": False}   # junk and blank are not overrides


def test_switches_persist_and_the_environment_overrides_them_for_its_process(settings, tmp_path, monkeypatch):
    from comfy_accel.accelerators.base import AcceleratorInputError

    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"precompile": False, "channels_last": True}))
    loaded = settings.load(path)
    assert (loaded.precompile, loaded.channels_last, loaded.preimport) == (False, True, True)
    with pytest.raises(AcceleratorInputError, match="channels_last must be true or false; got 'no'"):
        settings.update({"channels_last": "no"})

    monkeypatch.setenv("COMFY_ACCEL_CHANNELS_LAST", "off")
    assert settings.get_settings().channels_last is True   # read when the settings are loaded, not per call
    settings.load(path)
    assert settings.get_settings().channels_last is False and settings.as_dict()["channels_last"] is False
    assert settings.overridden_by("channels_last") == "COMFY_ACCEL_CHANNELS_LAST=off"
    assert settings.overridden_by("precompile") == ""
    settings.update({"precompile": True})
    # the file keeps what the user chose; the override is not written into it
    assert json.loads(path.read_text())["channels_last"] is True and json.loads(path.read_text())["precompile"]


def test_the_inductor_backend_reads_them(settings):
    import torch

    from comfy_accel.accelerators.compile.inductor import InductorCompiler, precompile_wanted
    from comfy_accel.accelerators.compile.precompile import available
    from comfy_accel.accelerators.compile.session import parse_options

    settings.update({"precompile": False})
    assert precompile_wanted() is False
    graphs = parse_options({}, "inductor+cudagraphs", cuda_graphs=True)
    assert InductorCompiler(graphs).package_accelerator is None
    settings.update({"precompile": True})
    assert precompile_wanted() is bool(available())
    settings.update({"channels_last": True})
    assert InductorCompiler(graphs).channels_last is torch.cuda.is_available()   # a GPU layout only
    settings.update({"channels_last": False})
    assert InductorCompiler(graphs).channels_last is False
