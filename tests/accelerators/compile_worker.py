"""One ComfyUI process that samples the tiny model through the inductor backend with a given artifact store,
and prints what it compiled: the warm-restart test runs it twice, each time with a fresh inductor cache.

    python tests/accelerators/compile_worker.py STORE_DIR LATENT_OUT
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(store_dir: str, latent_out: str) -> None:
    import torch

    from tools.comfy_host import import_comfy, import_pack

    import_comfy()
    import_pack()
    from comfy_accel.accelerators import events
    from comfy_accel.accelerators.cache import ArtifactStore
    from comfy_accel.accelerators.compiled_unet import session_of
    from comfy_accel.accelerators.torch_compile import apply
    from tools.model_factory import build_model, sample

    model = build_model("tiny-sd15", seed=21)
    accelerated = apply(model, {"fallback": "error", "store": ArtifactStore(store_dir), "node_id": "w"})
    started = time.monotonic()
    latent = sample(accelerated, steps=3)
    seconds = time.monotonic() - started
    torch.save(latent, latent_out)
    from torch._dynamo.utils import counters

    print("RESULT " + json.dumps({
        "first_sample_s": seconds, "compile_events": len(session_of(accelerated).compiler.compile_events),
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "notices": [n["message"] for n in events.recent(50)]}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
