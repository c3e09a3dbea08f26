"""The host's UNet forward has the shape DeepCache re-walks: fails when ComfyUI's block loop changes.

DeepCache (accelerators/deepcache.py: UNetSegments) is the one place in the pack that re-walks
`openaimodel.UNetModel._forward`. These tests pin what it relies on, on the real ComfyUI:
- the order of the call sites in `_forward` (time embedding, emb_patch, input blocks with
  input_block_patch / hs.append / input_block_patch_after_skip, middle block, output blocks with
  hs.pop / output_block_patch / cat / output_shape, out) and the signatures it calls;
- block counts and the LIFO pairing of the `hs` skip stack (SD1.5 and SDXL, tiny and full-size configs);
- bit-for-bit equality with the host forward, for every skip branch, on full *and* cached calls given
  the same input, with FreeU, FreeU_V2, input_block_patch(+after_skip) and attention patches.
"""
import copy
import inspect
import re

import pytest
import torch


# -- helpers -------------------------------------------------------------------------------------------------
def call_options(patcher, sigma, sample_sigmas, cond_or_uncond=(0,)):
    """transformer_options as the sampler builds them for one UNet call (wrappers, patches, sigmas)."""
    import comfy.patcher_extension as pe

    options = pe.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    pe.merge_nested_dicts(options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    options["sigmas"] = torch.tensor([float(sigma)])
    options["sample_sigmas"] = sample_sigmas
    options["cond_or_uncond"] = list(cond_or_uncond)
    options["uuids"] = [f"chunk{c}" for c in cond_or_uncond]
    return options


def unet_inputs(patcher, batch=1, seed=0):
    from tools.model_factory import unet_inputs as make

    x, _, context, y = make(patcher, batch=batch, height=64, width=64, tokens=77, seed=seed)
    return x, torch.full((batch,), 700.0), context, y


SCHEDULE = torch.tensor([14.6, 9.0, 5.0, 2.5, 1.2, 0.5, 0.0])  # 6 steps


def host(patcher, x, t, context, y, options, control=None):
    """The host's own forward (no wrappers) on a copy of the options."""
    with torch.no_grad():
        return patcher.model.diffusion_model._forward(x, t, context=context, y=y, control=control,
                                                      transformer_options=copy.copy(options))


def through_wrappers(patcher, x, t, context, y, options, control=None):
    with torch.no_grad():
        return patcher.model.diffusion_model(x, t, context=context, y=y, control=control,
                                             transformer_options=options)


def deepcache(pack, model, **kwargs):
    from comfy_accel.accelerators.deepcache import DeepCacheConfig, apply

    return apply(model, DeepCacheConfig(**kwargs))


def middle_counter(model):
    """Counts middle-block runs (a hook on its first layer: forward_timestep_embed iterates the block's layers)."""
    calls = []
    handle = model.model.diffusion_model.middle_block[0].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


# -- the source structure ----------------------------------------------------------------------------------
def _normalised_source(fn) -> str:
    return re.sub(r"\s+", " ", inspect.getsource(fn))


def test_unet_forward_call_sites_are_where_deepcache_expects_them(comfy_path):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    source = _normalised_source(UNetModel._forward)
    expected_in_order = [
        'transformer_options["original_shape"] = list(x.shape)',
        'transformer_options["transformer_index"] = 0',
        "hs = []",
        "t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype)",
        "emb = self.time_embed(t_emb)",
        '"emb_patch" in transformer_patches', "emb = p(emb, self.model_channels, transformer_options)",
        "emb = emb + self.label_emb(y)",
        "for id, module in enumerate(self.input_blocks):",
        'transformer_options["block"] = ("input", id)',
        "h = forward_timestep_embed(module, h, emb, context, transformer_options, time_context=time_context, "
        "num_video_frames=num_video_frames, image_only_indicator=image_only_indicator)",
        "h = apply_control(h, control, 'input')",
        '"input_block_patch" in transformer_patches', "h = p(h, transformer_options)",
        "hs.append(h)",
        '"input_block_patch_after_skip" in transformer_patches', "h = p(h, transformer_options)",
        'transformer_options["block"] = ("middle", 0)',
        "h = forward_timestep_embed(self.middle_block, h, emb, context, transformer_options,",
        "h = apply_control(h, control, 'middle')",
        "for id, module in enumerate(self.output_blocks):",
        'transformer_options["block"] = ("output", id)',
        "hsp = hs.pop()",
        "hsp = apply_control(hsp, control, 'output')",
        '"output_block_patch" in transformer_patches', "h, hsp = p(h, hsp, transformer_options)",
        "h = th.cat([h, hsp], dim=1)",
        "output_shape = hs[-1].shape",
        "output_shape = None",
        "h = forward_timestep_embed(module, h, emb, context, transformer_options, output_shape,",
        "h = h.type(x.dtype)",
        "return self.out(h)",
    ]
    position = 0
    for snippet in expected_in_order:
        found = source.find(snippet, position)
        assert found >= 0, f"UNetModel._forward changed: {snippet!r} not found after position {position}"
        position = found + len(snippet)
    # no other patch kind is called by the loop itself (one would need handling in UNetSegments)
    kinds = set(re.findall(r'"(\w+)" in transformer_patches', source))
    assert kinds == {"emb_patch", "input_block_patch", "input_block_patch_after_skip", "output_block_patch"}


def test_signatures_deepcache_calls(comfy_path):
    from comfy.ldm.modules.diffusionmodules import openaimodel
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    params = list(inspect.signature(openaimodel.forward_timestep_embed).parameters)
    assert params == ["ts", "x", "emb", "context", "transformer_options", "output_shape", "time_context",
                      "num_video_frames", "image_only_indicator"]
    assert list(inspect.signature(timestep_embedding).parameters)[:3] == ["timesteps", "dim", "max_period"]
    forward = _normalised_source(openaimodel.UNetModel.forward)
    assert "WrappersMP.DIFFUSION_MODEL" in forward
    assert ".execute(x, timesteps, context, y, control, transformer_options, **kwargs)" in forward


@pytest.mark.parametrize("name,blocks", [("sd15", 12), ("sdxl", 9), ("tiny-sd15", 4), ("tiny-sdxl", 4)])
def test_block_counts_of_the_real_architectures(pack, name, blocks):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy_accel.accelerators.deepcache import UNetSegments, host_shape_problems
    from tools.model_factory import MODEL_SPECS

    unet = UNetModel(**copy.deepcopy(MODEL_SPECS[name][1]), device="meta", operations=comfy.ops.disable_weight_init)
    assert len(unet.input_blocks) == len(unet.output_blocks) == blocks
    assert host_shape_problems(unet) == []
    segments = UNetSegments(unet, blocks - 1)
    assert segments.split == 0


@pytest.mark.parametrize("family", ["tiny_sd15", "tiny_sdxl"])
def test_skip_stack_is_last_in_first_out(request, family):
    """Output block j consumes the skip pushed by input block N-1-j: the pairing a skip branch relies on."""
    model = request.getfixturevalue(family).clone()
    pushed, popped = [], []

    def record_push(h, options):
        pushed.append((options["block"][1], h.data_ptr(), tuple(h.shape)))
        return h

    def record_pop(h, hsp, options):
        popped.append((options["block"][1], hsp.data_ptr(), tuple(hsp.shape)))
        return h, hsp

    model.set_model_input_block_patch(record_push)
    model.set_model_output_block_patch(record_pop)
    x, t, context, y = unet_inputs(model)
    host(model, x, t, context, y, call_options(model, 14.6, SCHEDULE))
    n = len(model.model.diffusion_model.input_blocks)
    assert [b for b, _, _ in pushed] == list(range(n)) and [b for b, _, _ in popped] == list(range(n))
    for j, (_, ptr, shape) in enumerate(popped):
        assert (ptr, shape) == pushed[n - 1 - j][1:], f"output block {j} does not pop input block {n - 1 - j}'s skip"


# -- bit for bit with the host -------------------------------------------------------------------------------
def _with_patches(model, kind):
    from comfy_extras.nodes_freelunch import FreeU, FreeU_V2

    if kind == "freeu":
        return FreeU().patch(model, 1.1, 1.2, 0.9, 0.2)[0]
    if kind == "freeu_v2":
        return FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)[0]
    if kind == "input_patches":
        model = model.clone()
        model.set_model_input_block_patch(lambda h, options: h * 1.05)
        model.set_model_input_block_patch_after_skip(lambda h, options: h - 0.01)
        return model
    return model


@pytest.mark.parametrize("family", ["tiny_sd15", "tiny_sdxl"])
@pytest.mark.parametrize("patches", ["none", "freeu", "freeu_v2", "input_patches"])
def test_full_and_cached_calls_equal_the_host_bit_for_bit(pack, request, family, patches):
    """Same input twice, interval 2: the full call and the cached call both equal the host's forward."""
    base = _with_patches(request.getfixturevalue(family), patches)
    x, t, context, y = unet_inputs(base, batch=2)
    reference = host(base, x, t, context, y, call_options(base, 14.6, SCHEDULE, (1, 0)))
    if patches != "none":  # the patch really acts: otherwise equality would prove nothing about it
        plain_model = request.getfixturevalue(family)
        plain = host(plain_model, x, t, context, y, call_options(plain_model, 14.6, SCHEDULE, (1, 0)))
        assert not torch.equal(plain, reference)
    branches = len(base.model.diffusion_model.output_blocks)
    for branch in range(branches):
        model = deepcache(pack, base, cache_interval=2, cache_branch=branch)
        calls, handle = middle_counter(model)
        try:
            full = through_wrappers(model, x, t, context, y, call_options(model, 14.6, SCHEDULE, (1, 0)))
            cached = through_wrappers(model, x, t, context, y, call_options(model, 9.0, SCHEDULE, (1, 0)))
        finally:
            handle.remove()
        assert len(calls) == 1, f"branch {branch}: the cached call ran the middle block"
        assert torch.equal(full, reference), f"branch {branch}: full call differs from the host"
        assert torch.equal(cached, reference), f"branch {branch}: cached call differs from the host"


def test_attention_patches_see_the_host_block_names_and_indices(pack, tiny_sd15):
    """attn1_patch sees (block, transformer_index) as in the host; an attn1 replace on a shallow block runs."""
    from comfy.ldm.modules.attention import optimized_attention

    seen = []

    def record(q, k, v, extra):
        seen.append((extra["block"], extra["transformer_index"]))
        return q, k, v

    replaced = []
    last = len(tiny_sd15.model.diffusion_model.output_blocks) - 1

    def replace(q, k, v, extra):
        replaced.append(extra["block"])
        return optimized_attention(q, k, v, extra["n_heads"]) * 0.5

    base = tiny_sd15.clone()
    base.set_model_attn1_patch(record)
    base.set_model_attn1_replace(replace, "output", last)
    x, t, context, y = unet_inputs(base)
    reference = host(base, x, t, context, y, call_options(base, 14.6, SCHEDULE))
    host_seen = list(seen)
    assert replaced == [("output", last)]
    model = deepcache(pack, base, cache_interval=3)
    seen.clear()
    replaced.clear()
    through_wrappers(model, x, t, context, y, call_options(model, 14.6, SCHEDULE))
    assert seen == host_seen
    seen.clear()
    cached = through_wrappers(model, x, t, context, y, call_options(model, 9.0, SCHEDULE))
    assert torch.equal(cached, reference)
    assert seen == [entry for entry in host_seen if entry[0] == ("output", last)]
    assert replaced == [("output", last), ("output", last)]


# -- what DeepCache hands to the host instead ----------------------------------------------------------------
def _control(model, x, t, context, y):
    """A ControlNet-style residual dict (what ControlBase.get_control returns) shaped for this UNet and input."""
    probe = model.clone()
    skips, middle = [], []
    probe.set_model_input_block_patch(lambda h, options: skips.append(h.shape) or h)
    probe.set_model_output_block_patch(
        lambda h, hsp, options: (middle.append(h.shape) if options["block"][1] == 0 else None, (h, hsp))[1])
    host(probe, x, t, context, y, call_options(probe, 14.6, SCHEDULE))
    gen = torch.Generator().manual_seed(5)
    return {"input": [], "middle": [torch.randn(middle[0], generator=gen) * 0.1],
            "output": [torch.randn(shape, generator=gen) * 0.1 for shape in skips]}


def test_controlnet_runs_the_host_forward_and_says_so_once(pack, tiny_sd15):
    from comfy_accel.accelerators import events

    x, t, context, y = unet_inputs(tiny_sd15)
    control = _control(tiny_sd15, x, t, context, y)
    options = call_options(tiny_sd15, 14.6, SCHEDULE)
    reference = host(tiny_sd15, x, t, context, y, options, control=copy.deepcopy(control))
    without = host(tiny_sd15, x, t, context, y, options)
    assert not torch.equal(reference, without)
    model = deepcache(pack, tiny_sd15, cache_interval=3)
    heard = []
    listener = lambda event, data: heard.append(data)  # noqa: E731
    events.add_listener(listener)
    try:
        outs = [through_wrappers(model, x, t, context, y, call_options(model, sigma, SCHEDULE),
                                 control=copy.deepcopy(control)) for sigma in (14.6, 9.0, 5.0)]
    finally:
        events.remove_listener(listener)
    assert all(torch.equal(out, reference) for out in outs)
    notes = [d for d in heard if d["accelerator"] == "deepcache"]
    assert len(notes) == 1 and "ControlNet" in notes[0]["message"]


def test_unknown_patches_replace_kind_runs_the_host_forward(pack, tiny_sd15):
    from comfy_accel.accelerators.deepcache import deepcache_state

    model = deepcache(pack, tiny_sd15, cache_interval=3)
    x, t, context, y = unet_inputs(model)
    options = call_options(model, 9.0, SCHEDULE)
    options["patches_replace"] = {"some_block_replace": {("output", 0): lambda *a: None}}
    through_wrappers(model, x, t, context, y, options)
    state = deepcache_state(model)
    assert state.counts["host"] == 1 and state.counts["full"] == 0
