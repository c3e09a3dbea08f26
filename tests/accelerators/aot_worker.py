"""A fresh process that loads an AOTInductor UNet package, binds it to a newly built tiny model and runs it once:
the package test checks that a process which never compiled gets the parent's output.

    python tests/accelerators/aot_worker.py PACKAGE_DIR INPUTS_PT OUTPUT_PT SEED
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(package_dir: str, inputs_file: str, output_file: str, seed: str) -> None:
    import torch

    from tools.comfy_host import import_comfy, import_pack

    import_comfy()
    import_pack()
    from comfy_accel.accelerators.aot_package import PackagedUNet
    from tools.model_factory import build_model

    started = time.monotonic()
    package = PackagedUNet.load(Path(package_dir))
    loaded = time.monotonic()
    unet = build_model("tiny-sd15", seed=int(seed)).model.diffusion_model
    package.bind(unet)
    bound = time.monotonic()
    inputs = torch.load(inputs_file)
    out = package(*inputs)
    torch.save(out, output_file)
    print("RESULT " + json.dumps({"load_s": loaded - started, "bind_s": bound - loaded,
                                  "call_s": time.monotonic() - bound}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
