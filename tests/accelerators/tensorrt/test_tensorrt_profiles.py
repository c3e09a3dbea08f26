"""Profiles: presets, explicit min/opt/max validation, tightest-covering selection and readable misses."""
import pytest


@pytest.fixture(scope="module")
def prof(pack):
    from comfy_accel.accelerators.tensorrt import profiles

    return profiles


def req(batch=2, height=512, width=512, tokens=77):
    return {"batch": batch, "height": height, "width": width, "tokens": tokens}


def test_cfg_preset_picks_batch_one_after_cutoff_and_batch_two_with_cfg(prof):
    profiles = prof.preset("512x512 (SD1.5)")
    index, profile, reason = prof.select_profile(profiles, req(batch=1))
    assert (index, reason) == (0, "") and profile.batch.max == 1
    index, profile, _ = prof.select_profile(profiles, req(batch=2))
    assert index == 1 and profile.batch.opt == 2
    index, _, _ = prof.select_profile(profiles, req(batch=4, tokens=154))
    assert index == 1


def test_smallest_covering_profile_wins(prof):
    wide = prof.make_profile((1, 2, 8), (256, 512, 1024), (256, 512, 1024), (77, 77, 231))
    tight = prof.make_profile((1, 2, 2), (512, 512, 512), (512, 512, 768), (77, 77, 77))
    assert prof.select_profile([wide, tight], req())[0] == 1
    assert prof.select_profile([wide, tight], req(width=1024))[0] == 0       # only the wide one covers
    assert prof.select_profile([tight, wide], req(tokens=154))[0] == 1


def test_a_miss_names_the_dimension_and_the_ranges(prof):
    profiles = prof.preset("1024x1024 (SDXL)")
    index, profile, reason = prof.select_profile(profiles, req(batch=2, height=768, width=1024, tokens=231))
    assert index is None and profile is None
    assert reason.startswith("no engine profile covers batch 2, 1024×768 px, 231 tokens")
    assert "profile 2 height 768 outside 1024" in reason and "tokens 231 outside 77..154" in reason
    assert "batch 2 outside 1" in reason   # profile 1 is the batch-1 profile


@pytest.mark.parametrize("ranges, message", [
    (dict(batch=(2, 1, 4), height=512, width=512, tokens=77), "batch needs min <= opt <= max, got min 2, opt 1, max 4"),
    (dict(batch=(1, 2, 4), height=(512, 768, 640), width=512, tokens=77), "height needs min <= opt <= max"),
    (dict(batch=1, height=(500, 512, 512), width=512, tokens=77), "height must be a multiple of 8 pixels"),
    (dict(batch=(0, 1, 2), height=512, width=512, tokens=77), "batch min must be between 1 and 64, got 0"),
    (dict(batch=1, height=512, width=512, tokens=(77, 77.5, 154)), "tokens opt must be a whole number"),
    (dict(batch=1, height=512, width=512, tokens=(77, 154)), None),   # (min, max): opt = min
])
def test_explicit_ranges_are_validated(prof, ranges, message):
    from comfy_accel.accelerators.base import AcceleratorInputError

    if message is None:
        assert prof.make_profile(**ranges).tokens.as_list() == [77, 77, 154]
        return
    with pytest.raises(AcceleratorInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prof.make_profile(**ranges)


def test_unknown_preset_and_empty_profile_lists_are_refused(prof):
    from comfy_accel.accelerators.base import AcceleratorInputError

    with pytest.raises(AcceleratorInputError, match="unknown TensorRT profile preset 'huge'; presets: 512x512"):
        prof.preset("huge")
    with pytest.raises(AcceleratorInputError, match="at least one profile"):
        prof.validate_profiles([])
    with pytest.raises(AcceleratorInputError, match="profile lacks tokens"):
        prof.validate_profiles([{"batch": 1, "height": 512, "width": 512}])


def test_tensor_shapes_follow_the_export_names(prof):
    profile = prof.make_profile((1, 2, 4), (512, 768, 1024), (512, 512, 768), (77, 77, 154))
    sd = profile.tensor_shapes(context_dim=768)
    assert sd["x"] == ((1, 4, 64, 64), (2, 4, 96, 64), (4, 4, 128, 96))
    assert sd["context"] == ((1, 77, 768), (2, 77, 768), (4, 154, 768))
    assert sd["timesteps"] == ((1,), (2,), (4,)) and "y" not in sd
    assert profile.tensor_shapes(context_dim=2048, adm_channels=2816)["y"][2] == (4, 2816)


def test_on_demand_profiles_cover_the_request_and_both_cfg_batches(prof):
    for request in (req(batch=2, height=768, width=512, tokens=154), req(batch=1, height=1024, width=1024)):
        built = prof.profile_for_request(request)
        assert prof.select_profile(built, request)[0] is not None
        assert prof.select_profile(built, {**request, "batch": 1})[0] is not None
        assert prof.select_profile(built, {**request, "batch": 2})[0] is not None
    static = prof.profile_for_request(req(batch=2, height=640), dynamic=False)
    assert len(static) == 1 and static[0].height.as_list() == [640, 640, 640]
    assert prof.envelope(prof.preset("512x512 (SD1.5)")) == {"batch": [1, 4], "height": [512, 512],
                                                             "width": [512, 512], "tokens": [77, 154]}
