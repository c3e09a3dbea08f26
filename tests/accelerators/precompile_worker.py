"""A fresh process that loads a precompiled UNet onto a newly built tiny model and runs it once: the precompile
test checks that a process which never traced the UNet gets the parent's output.

    python tests/accelerators/precompile_worker.py FOLDER INPUTS_PT OUTPUT_PT SEED
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(folder: str, inputs_file: str, output_file: str, seed: str) -> None:
    import torch

    from tools.comfy_host import import_comfy, import_pack

    import_comfy()
    import_pack()
    from torch._dynamo.utils import counters

    from comfy_accel.accelerators.compiled_unet import use_compile_friendly_attention
    from comfy_accel.accelerators.precompile import PrecompiledUNet
    from tools.model_factory import build_model

    unet = build_model("tiny-sd15", seed=int(seed)).model.diffusion_model
    inputs = torch.load(inputs_file)
    started = time.monotonic()
    options: dict = {}
    use_compile_friendly_attention(options)
    precompiled = PrecompiledUNet.load(Path(folder), unet, options)
    loaded = time.monotonic()
    with torch.inference_mode():
        out = precompiled(*inputs)
    called = time.monotonic()
    torch.save(out.clone(), output_file)
    print("RESULT " + json.dumps({"load_s": loaded - started, "call_s": called - loaded,
                                  "frames_traced": counters["stats"]["unique_graphs"]}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
