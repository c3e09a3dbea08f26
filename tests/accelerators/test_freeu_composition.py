"""ComfyUI's own FreeU / FreeU_V2 patches inside DeepCache, on the real sampler.

DeepCache calls `output_block_patch` where the host does, so FreeU keeps working: at interval 1 the result
is FreeU's own, bit for bit; at interval 3 every full step equals the host forward with FreeU, and the
cached steps apply it on the shallow blocks (the bit-for-bit cached-call checks, FreeU included, are in
test_unet_forward_shape.py; the torch.compile segment check with FreeU_V2 is in test_deepcache.py).
"""
import copy

import pytest
import torch

from tools.model_factory import sample

FREEU_SETTINGS = {"freeu": (1.1, 1.2, 0.9, 0.2), "freeu_v2": (1.3, 1.4, 0.9, 0.2)}


def freeu(model, kind):
    from comfy_extras.nodes_freelunch import FreeU, FreeU_V2

    node = FreeU() if kind == "freeu" else FreeU_V2()
    return node.patch(model, *FREEU_SETTINGS[kind])[0]


def deepcache(model, **kwargs):
    from comfy_accel.accelerators.deepcache import DeepCacheConfig, apply

    return apply(model, DeepCacheConfig(**kwargs))


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(params=["tiny_sd15", "tiny_sdxl"])
def tiny(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("kind", ["freeu", "freeu_v2"])
def test_freeu_under_deepcache_interval_one_is_freeu_exactly(pack, tiny, kind):
    with_freeu = freeu(tiny, kind)
    reference = sample(with_freeu, steps=6)
    assert not torch.equal(reference, sample(tiny, steps=6))  # FreeU acts on this model
    assert torch.equal(sample(deepcache(with_freeu, cache_interval=1), steps=6), reference)
    # node order does not matter: FreeU after DeepCache lands in the same patch list
    assert torch.equal(sample(freeu(deepcache(tiny, cache_interval=1), kind), steps=6), reference)


@pytest.mark.parametrize("kind", ["freeu", "freeu_v2"])
def test_freeu_full_steps_equal_the_host_patch_and_cached_steps_keep_it(pack, tiny_sd15, kind):
    from comfy.patcher_extension import WrappersMP

    errors = []

    def probe(executor, x, t, context, y, control, options, **kwargs):
        # the host's own forward with the same options: FreeU's output_block_patch applied by the host
        reference = executor.class_obj._forward(x, t, context=context, y=y, control=None,
                                                transformer_options=copy.copy(options), **kwargs)
        out = executor(x, t, context, y, control, options, **kwargs)
        errors.append(rel(out, reference))
        return out

    probed = freeu(tiny_sd15, kind).clone()
    probed.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "test.probe", probe)
    with_freeu = sample(deepcache(probed, cache_interval=3, cache_branch=1), steps=9)
    assert [i for i, e in enumerate(errors) if e == 0.0] == [0, 3, 6]
    # FreeU also shapes the cached steps: without it the DeepCache run differs
    without = sample(deepcache(tiny_sd15, cache_interval=3, cache_branch=1), steps=9)
    assert rel(with_freeu, without) > 1e-3


def test_freeu_spec_applies_the_core_patch(pack, tiny_sd15):
    from comfy_accel.accelerators import registry

    spec = registry.get("freeu")
    patched = spec.apply(tiny_sd15, spec.config(version="v1", b1=1.1, b2=1.2, s1=0.9, s2=0.2))
    assert torch.equal(sample(patched, steps=4), sample(freeu(tiny_sd15, "freeu"), steps=4))
    assert "output_block_patch" not in tiny_sd15.model_options.get("transformer_options", {}).get("patches", {})


def test_freeu_spec_refuses_unknown_versions(pack):
    from comfy_accel.accelerators.base import AcceleratorInputError
    from comfy_accel.accelerators.freeu import FreeUConfig

    with pytest.raises(AcceleratorInputError, match="version must be"):
        FreeUConfig(version="v3")
    with pytest.raises(AcceleratorInputError, match="b1 must be between"):
        FreeUConfig(b1=11)
