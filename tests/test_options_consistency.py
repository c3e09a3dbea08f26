"""Every face of the pack offers exactly the option values accelerators/options.py defines: the ComfyUI nodes'
inputs, the settings' validation, GET /accel/status, web/accel.js (which must read them from that route) and
the WebUI panel mapping. A value added, dropped or re-ranged in one face only fails here."""
import json
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]   # not from tests.conftest: ComfyUI has a `tests` package too

JS = (REPO_ROOT / "web" / "accel.js").read_text()


@pytest.fixture(scope="module")
def options(pack):
    from comfy_accel.accelerators import options

    return options


def combo_options(options) -> dict:
    """Node input name → the values options.py allows for it."""
    return {"backend": options.BACKEND_CHOICES, "mode": options.MODES, "dynamic": options.DYNAMIC,
            "fallback": options.FALLBACK_CHOICES, "cache_mode": options.STEP_CACHE_MODES, "scope": options.SCOPES,
            "precision": options.PRECISIONS}


def range_options(options) -> dict:
    return {"cache_interval": options.DEEPCACHE_INTERVAL, "cache_branch": options.DEEPCACHE_BRANCH,
            "start_percent": options.PERCENT, "end_percent": options.PERCENT,
            "cutoff_percent": options.CFG_CUTOFF_PERCENT, "sigma_threshold": options.SIGMA_THRESHOLD,
            "threshold": options.STEP_CACHE_THRESHOLD, "interval": options.STEP_CACHE_INTERVAL,
            "start": options.STEP_CACHE_START, "end": options.STEP_CACHE_END,
            "max_consecutive": options.STEP_CACHE_MAX_CONSECUTIVE}


# combo inputs whose values are not options of the pack but data of this install: TAESD families (taesd.py),
# TensorRT profile presets (tensorrt/profiles.py) and the engines found in the cache and models/tensorrt
NOT_OPTIONS = {"vae_family", "profile", "engine"}


def node_inputs(pack):
    for class_name, node in pack.NODE_CLASS_MAPPINGS.items():
        for section in node.INPUT_TYPES().values():
            for name, spec in section.items():
                yield class_name, name, spec


def test_node_combo_inputs_offer_only_the_options_values(pack, options):
    combos = combo_options(options)
    seen = set()
    for class_name, name, spec in node_inputs(pack):
        if not isinstance(spec, tuple) or not isinstance(spec[0], list):
            continue
        where = f"{class_name}.{name}"
        assert name in combos or name in NOT_OPTIONS, f"{where}: a list of values options.py does not define"
        if name in combos:
            assert set(spec[0]) <= set(combos[name]), f"{where}: {set(spec[0]) - set(combos[name])}"
            assert spec[1].get("default", spec[0][0]) in combos[name], where
            seen.add(name)
    assert seen == set(combos), "an option no node offers any more: drop it from the test or the module"


def test_node_number_inputs_have_the_options_bounds(pack, options):
    ranges = range_options(options)
    seen = set()
    for class_name, name, spec in node_inputs(pack):
        if name not in ranges or not isinstance(spec, tuple) or spec[0] not in ("INT", "FLOAT"):
            continue
        bounds = ranges[name]
        assert (spec[1]["min"], spec[1]["max"]) == (bounds.low, bounds.high), f"{class_name}.{name}"
        assert bounds.low <= spec[1]["default"] <= bounds.high
        assert (spec[0] == "INT") == bounds.whole, f"{class_name}.{name}"
        seen.add(name)
    assert seen == set(ranges)


def test_the_core_configs_accept_exactly_the_ranges(pack, options):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.accelerators.cfg_cutoff import CFGCutoffConfig
    from comfy_accel.accelerators.deepcache import DeepCacheConfig
    from comfy_accel.accelerators.step_cache import StepCacheConfig

    for config, name, bounds in ((DeepCacheConfig, "cache_interval", options.DEEPCACHE_INTERVAL),
                                 (DeepCacheConfig, "cache_branch", options.DEEPCACHE_BRANCH),
                                 (CFGCutoffConfig, "cutoff_percent", options.CFG_CUTOFF_PERCENT),
                                 (CFGCutoffConfig, "sigma_threshold", options.SIGMA_THRESHOLD),
                                 (StepCacheConfig, "threshold", options.STEP_CACHE_THRESHOLD),
                                 (StepCacheConfig, "interval", options.STEP_CACHE_INTERVAL),
                                 (StepCacheConfig, "max_consecutive", options.STEP_CACHE_MAX_CONSECUTIVE)):
        assert getattr(config(), name) == bounds.default
        config(**{name: bounds.low}), config(**{name: bounds.high})
        for outside in (bounds.low - 1, bounds.high + 1):
            with pytest.raises(AcceleratorInputError, match=name):
                config(**{name: outside})


def every_value_anywhere(options) -> set:
    return {*options.BACKEND_CHOICES, *options.FALLBACK_CHOICES, *options.DYNAMIC, *options.MODES, *options.SCOPES,
            *options.PRECISIONS, "warp"}


def test_settings_accept_exactly_the_options_values(pack, options):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.accelerators.settings import Settings

    for field, allowed in (("default_backend", options.DEFAULT_BACKEND_CHOICES), ("fallback_policy", options.FALLBACKS)):
        for value in every_value_anywhere(options):
            if value in allowed:
                Settings(**{field: value}).validate()
            else:
                with pytest.raises(AcceleratorInputError, match=field):
                    Settings(**{field: value}).validate()
    for field, bounds in (("cache_budget_gb", options.CACHE_BUDGET_GB), ("memory_budget_gb", options.MEMORY_BUDGET_GB)):
        Settings(**{field: bounds.low}).validate(), Settings(**{field: bounds.high}).validate()
        with pytest.raises(AcceleratorInputError, match=field):
            Settings(**{field: bounds.high + 1}).validate()
    defaults = Settings()
    assert (defaults.default_backend, defaults.fallback_policy) == (options.AUTO, options.FALLBACKS[0])
    assert (defaults.cache_budget_gb, defaults.memory_budget_gb) == (options.CACHE_BUDGET_GB.default,
                                                                     options.MEMORY_BUDGET_GB.default)


def test_accel_status_carries_the_options(pack, options):
    from comfy_accel.nodes.routes import status_body

    described = json.loads(json.dumps(status_body()))["options"]   # what a client receives
    assert described == options.describe()
    assert described["backend"]["choices"] == list(options.BACKEND_CHOICES)
    assert [c["value"] for c in described["settings"]["default_backend"]["choices"]] == \
        list(options.DEFAULT_BACKEND_CHOICES)
    assert [c["value"] for c in described["settings"]["fallback_policy"]["choices"]] == list(options.FALLBACKS)
    assert described["deepcache"]["cache_interval"]["max"] == options.DEEPCACHE_INTERVAL.high


def test_accel_js_lists_no_option_value_of_its_own(options):
    """accel.js builds its settings from /accel/status: no backend name, option list or bound in the file."""
    literals = re.findall(r"""(?<![\w'"])["']([^"'\n]*)["']""", JS)
    # "auto", "default" and "error" are ordinary words there too (a toast's severity is "error")
    distinctive = set(every_value_anywhere(options)) - {options.AUTO, options.DEFAULT, "error", "warp"}
    assert not distinctive & set(literals), distinctive & set(literals)
    values = set(every_value_anywhere(options))
    for array in re.findall(r"\[([^\[\]]*)\]", JS):
        items = re.findall(r"""["']([^"']*)["']""", array)
        assert sum(item in values for item in items) < 2, f"a hard-coded list of option values: [{array}]"
    assert not re.search(r"\b(min|max)\s*:\s*[\d.]+", JS), "a hard-coded bound"
    assert '"/accel/status"' in JS and ".options" in JS


def test_accel_js_badges_every_pack_node(pack):
    """web/accel.js adds its badge (what ran, a fallback, a run's summary) to the nodes it names: every node."""
    listed = set(re.findall(r'"(Accel\w+)"', re.search(r"PACK_NODES = new Set\(\[(.*?)\]\)", JS, re.S).group(1)))
    assert listed == set(pack.NODE_CLASS_MAPPINGS)


def test_webui_mapping_uses_the_same_values_and_ranges(pack, options):
    from comfy_accel.accelerators import webui_mapping
    from comfy_accel.accelerators.base import AcceleratorInputError, Availability
    from comfy_accel.accelerators.settings import Settings

    assert set(webui_mapping.PANEL_BACKENDS) <= set(options.BACKEND_CHOICES)
    defaults = webui_mapping.PanelValues()
    assert defaults.backend in options.BACKEND_CHOICES and defaults.dynamic in options.DYNAMIC
    assert (defaults.deepcache_interval, defaults.deepcache_branch, defaults.cfg_cutoff_percent) == \
        (options.DEEPCACHE_INTERVAL.default, options.DEEPCACHE_BRANCH.default, options.CFG_CUTOFF_PERCENT.default)
    plan = lambda **values: webui_mapping.panel_to_plan(  # noqa: E731
        {"enabled": True, **values}, settings=Settings(), availability=lambda name: Availability(True, "here"),
        gpu=Availability(False, "cpu"))
    for field, bounds in (("deepcache_interval", options.DEEPCACHE_INTERVAL),
                          ("deepcache_branch", options.DEEPCACHE_BRANCH),
                          ("cfg_cutoff_percent", options.CFG_CUTOFF_PERCENT)):
        plan(**{field: bounds.low}), plan(**{field: bounds.high})
        with pytest.raises(AcceleratorInputError, match=field):
            plan(**{field: bounds.high + 1})
    step_cache_ranges = (("step_cache_threshold", options.STEP_CACHE_THRESHOLD),
                         ("step_cache_interval", options.STEP_CACHE_INTERVAL),
                         ("step_cache_start", options.STEP_CACHE_START), ("step_cache_end", options.STEP_CACHE_END),
                         ("step_cache_max_consecutive", options.STEP_CACHE_MAX_CONSECUTIVE))
    for field, bounds in step_cache_ranges:
        assert getattr(defaults, field) == bounds.default, field
        # the window's other end out of the way: the config refuses an end below the start
        other = {"step_cache_start": {"step_cache_end": options.STEP_CACHE_END.high},
                 "step_cache_end": {"step_cache_start": options.STEP_CACHE_START.low}}.get(field, {})
        plan(step_cache=True, **other, **{field: bounds.low}), plan(step_cache=True, **other, **{field: bounds.high})
        for outside in (bounds.low - 1, bounds.high + 1):
            with pytest.raises(AcceleratorInputError, match=field):
                plan(step_cache=True, **other, **{field: outside})
    for mode in options.STEP_CACHE_MODES:
        assert plan(step_cache=True, step_cache_mode=mode).step("step_cache").options["cache_mode"] == mode
    with pytest.raises(AcceleratorInputError, match="step_cache_mode"):
        plan(step_cache=True, step_cache_mode="teacache")
    # every field of the ComfyUI node's Step Cache is on the panel (the WebUI face is not narrower)
    from comfy_accel.accelerators.step_cache import StepCacheConfig

    node_fields = {"step_cache_mode" if name == "cache_mode" else f"step_cache_{name}"
                   for name in StepCacheConfig().settings()}
    assert node_fields <= set(webui_mapping.PANEL_ORDER), node_fields - set(webui_mapping.PANEL_ORDER)
    for value in every_value_anywhere(options):
        for field, allowed in (("backend", options.BACKEND_CHOICES), ("dynamic", options.DYNAMIC),
                               ("fallback", options.FALLBACK_CHOICES)):
            if value in allowed:
                plan(**{field: value})
            else:
                with pytest.raises(AcceleratorInputError):
                    plan(**{field: value})
