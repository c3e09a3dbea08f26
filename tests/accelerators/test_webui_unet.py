"""accelerators/webui_unet.py: DeepCache's block walk and the compile lane on an ldm-layout UNet, on the CPU.

The UNet is ComfyUI's real `UNetModel` (tiny SD1.5): it has the block layout of the WebUI's `ldm`/`sgm` UNetModel
(input_blocks / middle_block / output_blocks, blocks called as `block(h, emb, context)`), so the walk and the
runner are checked against a real host forward here; tests/scripts/test_webui_real.py checks them inside A1111.
"""
import pytest
import torch

from accelerators.webui_unet import LdmBlockWalk, WebUIUNetRunner, ldm_model_config, make_session


@pytest.fixture(scope="module")
def unet_and_host(tiny_sd15):
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    unet = tiny_sd15.model.diffusion_model.eval()

    def host_forward(module, x, timesteps, context, *y):
        return type(module).forward(module, x, timesteps, context, *y)

    return unet, host_forward, timestep_embedding


def inputs(batch=2, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.full((batch,), 500.0),
            torch.randn(batch, 77, 64, generator=g))


def run_steps(runner, calls, batches=None):
    outs = []
    for index in range(calls):
        batch = (batches or [2] * calls)[index]
        runner.begin_call(index)
        x, t, c = inputs(batch=2, seed=index)
        outs.append(runner(x[:batch], t[:batch], c[:batch]))
    return outs


@pytest.mark.parametrize("branch", [0, 1])
def test_the_walk_is_the_host_forward_bit_for_bit(unet_and_host, branch):
    unet, host_forward, embed = unet_and_host
    walk = LdmBlockWalk(unet, branch, embed, torch.cat)
    x, t, c = inputs()
    with torch.no_grad():
        t_emb = walk.time_embedding(t)
        emb, h, *skips = walk.shallow_in(x, t_emb, c)
        out = walk.shallow_out(x, walk.deep(h, emb, c), emb, c, *skips)
        whole = walk.whole(x, t_emb, c)
        expected = host_forward(unet, x, t, c)
    assert expected.abs().max() > 0
    assert torch.equal(out, expected) and torch.equal(whole, expected)


def test_a_branch_outside_the_unet_is_refused(unet_and_host):
    unet, _, embed = unet_and_host
    with pytest.raises(ValueError, match="cache branch 9 is outside"):
        LdmBlockWalk(unet, 9, embed, torch.cat)


def test_deepcache_runs_the_deep_blocks_on_one_call_in_three(unet_and_host):
    unet, host_forward, embed = unet_and_host
    deep_runs = []
    # on its first layer: ComfyUI's own forward calls the middle block's layers, not the block
    handle = unet.middle_block[0].register_forward_hook(lambda *_: deep_runs.append(1))
    try:
        runner = WebUIUNetRunner(unet, host_forward, embed, torch.cat, deepcache=(3, 0))
        plain = WebUIUNetRunner(unet, host_forward, embed, torch.cat)
        with torch.no_grad():
            cached = run_steps(runner, 6)
            assert len(deep_runs) == 2
            deep_runs.clear()
            reference = run_steps(plain, 6)
    finally:
        handle.remove()
    assert runner.counts.as_dict() == {"calls": 6, "full": 2, "shallow": 4, "compiled": 0, "eager": 6,
                                       "batches": [2] * 6}
    assert len(deep_runs) == 6   # the plain runner ran every block
    assert torch.equal(cached[0], reference[0]) and torch.equal(cached[3], reference[3])   # full calls
    assert not torch.equal(cached[1], reference[1])   # a cached call reuses step 0's deep feature


def test_a_skipped_uncond_reuses_the_cond_rows_and_a_new_pass_starts_full(unet_and_host):
    unet, host_forward, embed = unet_and_host
    runner = WebUIUNetRunner(unet, host_forward, embed, torch.cat, deepcache=(3, 0))
    with torch.no_grad():
        run_steps(runner, 6, batches=[2, 2, 1, 1, 1, 1])   # CFG cutoff from call 2: batch 2 → 1
        assert runner.counts.full == 2 and runner.counts.shallow == 4
        runner.begin_pass()
        runner.begin_call(1)   # a pass whose first call the host reports late still runs full
        x, t, c = inputs()
        runner(x, t, c)
    assert runner.counts.full == 3


def test_model_config_names_the_architecture_not_the_weights(unet_and_host):
    unet = unet_and_host[0]
    fields = ldm_model_config(unet, "sd1")
    assert fields["family"] == "sd1" and fields["host"] == "webui"
    assert fields["model_channels"] == unet.model_channels and fields["input_blocks"] == len(unet.input_blocks)


def test_unsupported_backend_names_what_runs(unet_and_host):
    from accelerators.base import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="tensorrt does not run on the WebUI's UNet in this version"):
        make_session("tensorrt", {}, {"family": "sd1"})


@pytest.mark.slow
def test_compiled_runner_matches_eager(unet_and_host, tmp_path):
    """The compile session on an ldm-layout UNet. Reuse is checked inside the real WebUI
    (tests/scripts/test_webui_real.py): ComfyUI's blocks, called the WebUI's way (no transformer_options), count
    into a shared default dict on every call, which keeps changing dynamo's guards here."""
    from accelerators.cache import ArtifactStore
    from accelerators.compile.inductor import available

    if not available():
        pytest.skip(available().reason)
    unet, host_forward, embed = unet_and_host
    store = ArtifactStore(tmp_path, budget_bytes=10**9)
    session = make_session("inductor", {"fallback": "error"}, ldm_model_config(unet, "sd1"), get_store=lambda: store)
    runner = WebUIUNetRunner(unet, host_forward, embed, torch.cat, session=session)
    plain = WebUIUNetRunner(unet, host_forward, embed, torch.cat)
    with torch.no_grad():
        compiled = run_steps(runner, 2)
        reference = run_steps(plain, 2)
    for a, b in zip(compiled, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert runner.counts.compiled == 2 and runner.counts.eager == 0
    assert session.compiler.compile_events and "for 1 compiled bucket(s)" in runner.summary()
