"""A fresh process that loads a stored precompiled UNet onto a newly built tiny model and runs it once: the
precompile tests check that a process which never compiled (or traced) gets the parent's output.

    python tests/accelerators/package_worker.py FOLDER INPUTS_PT OUTPUT_PT SEED
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

    from comfy_accel.accelerators.compile.stand_in import use_compile_friendly_attention
    from comfy_accel.accelerators.compile.precompile import PrecompiledUNet
    from tools.model_factory import build_model

    unet = build_model("tiny-sd15", seed=int(seed)).model.diffusion_model
    inputs = torch.load(inputs_file)
    started = time.monotonic()
    options: dict = {}
    use_compile_friendly_attention(options)   # as the session passes them
    package = PrecompiledUNet.load(Path(folder), unet, options)
    loaded = time.monotonic()
    package.bind(unet)
    bound = time.monotonic()
    with torch.inference_mode():   # as ComfyUI samples
        out = package(*inputs)
    torch.save(out.clone(), output_file)
    print("RESULT " + json.dumps({"load_s": loaded - started, "bind_s": bound - loaded,
                                  "call_s": time.monotonic() - bound,
                                  "frames_traced": counters["stats"]["unique_graphs"]}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
