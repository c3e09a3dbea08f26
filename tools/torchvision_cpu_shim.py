"""Lets the PyPI torchvision wheel import beside a CPU-only torch.

PyPI's torchvision 0.28 is a CUDA build: its `_C` library needs libtorch_cuda and cannot load on CPU
torch, and then `torchvision/_meta_registrations.py` dies registering fake kernels for `torchvision::nms`
and `torchvision::qnms`, whose schemas `_C` would have defined. ComfyUI imports torchvision at
`import comfy.sd` but only uses its pure-Python parts. This hook runs once, on the first
`import torchvision`: it tries to load `_C`, and only when that fails defines the two schemas.
setup_env.sh installs it (through a .pth file) only when the real torchvision does not import.
"""
import importlib.abc
import importlib.util
import sys


class _TorchvisionSchemaHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            return None
        import glob
        import os

        import torch

        library_dir = list(spec.submodule_search_locations or [])
        loaded = False
        for folder in library_dir:
            for candidate in glob.glob(os.path.join(folder, "_C*.so")):
                try:
                    torch.ops.load_library(candidate)
                    loaded = True
                except Exception:
                    pass
        if not loaded:
            global _schema_library  # keep the Library object alive, or the schemas go with it
            _schema_library = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _schema_library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return spec


sys.meta_path.insert(0, _TorchvisionSchemaHook())
