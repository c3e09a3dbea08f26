"""One ComfyUI process that samples the tiny model through the inductor backend with a given artifact store,
and prints what it compiled: the warm-restart test runs it twice, each time with a fresh inductor cache.

    python tests/accelerators/compile_worker.py STORE_DIR LATENT_OUT [BACKEND] [MODEL] [LATENT_SIZE] [STEPS]

BACKEND is `inductor` (default, CPU float32), `inductor+cudagraphs` (CUDA: float16 UNets, bfloat16 DiTs) or
`eager` (CUDA, the pack not applied: the baseline a warm restart is compared with);
MODEL is `tiny-sd15` (default) or a DiT of `tools.dit_factory` (`tiny-flux-dev`, `flux-dev`: compiled block by
block), sampled at LATENT_SIZE² latent pixels (DiTs; default 8) for STEPS steps (default 3).
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(store_dir: str, latent_out: str, backend: str = "inductor", model_name: str = "tiny-sd15",
         latent_size: str = "8", steps: str = "3") -> None:
    import torch

    from tools.comfy_host import import_comfy, import_pack

    import_comfy()
    import_pack()
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.cache import ArtifactStore
    from comfy_accel.accelerators.compile.inductor import apply, apply_cudagraphs
    from comfy_accel.accelerators.compile.stand_in import session_of
    from tools.dit_factory import DIT_SPECS, build_dit, sample_dit
    from tools.model_factory import build_model, sample

    dit = model_name in DIT_SPECS
    gpu = {} if backend == "inductor" else {"dtype": torch.bfloat16 if dit else torch.float16, "device": "cuda"}
    if dit:
        model = build_dit(model_name, seed=21, **gpu)

        def sample(patcher, steps):
            return sample_dit(patcher, steps=steps, height=int(latent_size), width=int(latent_size))
    else:
        model = build_model(model_name, seed=21, **gpu)
    if backend == "eager":   # the baseline: what a new process takes to its first sample without the pack
        accelerated = model
    else:
        accelerate = apply if backend == "inductor" else apply_cudagraphs
        accelerated = accelerate(model, {"fallback": "error", "store": ArtifactStore(store_dir), "node_id": "w"})
    started = time.monotonic()
    latent = sample(accelerated, steps=int(steps))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.monotonic() - started
    torch.save(latent, latent_out)
    from torch._dynamo.utils import counters

    session = session_of(accelerated) if backend != "eager" else None
    print("RESULT " + json.dumps({
        "first_sample_s": seconds,
        "compile_events": [e["what"] for e in session.compiler.compile_events] if session else [],
        "calls": session.calls if session else {}, "packages": len(session.artifacts.packages) if session else 0,
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "notices": [n["message"] for n in events.recent(50)]}))


if __name__ == "__main__":
    main(*sys.argv[1:7])
