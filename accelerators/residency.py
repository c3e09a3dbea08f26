"""Device memory the pack holds beside a model's weights, told to ComfyUI's memory manager as a model of its own.

TensorRT's engines (tensorrt/loader.py) and the fp8 copies of the Linear weights (compile/fp8_store.py) live on
the device beside the diffusion model's weights, outside them: ComfyUI's manager would see them only as memory in
use. A `Residency` hands ComfyUI a weightless `ModelPatcher` (a "holder"), added to the accelerated clone as an
additional model (`set_additional_models`): ComfyUI loads it with the model, reports its size (the bytes held,
`model_memory()` / `model_loaded_memory()`), reserves room for it, and unloads it when it needs the memory: its
ON_DETACH callback then calls `release`. `set_bytes` follows what is held as it is made (lazily, while sampling)
or freed.

All holders of one residency share one empty module, so ComfyUI sees them as clones of one model: one record at
a time, the bytes counted once however many accelerated clones carry a holder. Each later holder is a clone of
the first (ComfyUI's own parent chain), and the residency holds the module and the holders only weakly: the
module is freed with the last holder, so ComfyUI never keeps a record of a holder that is gone while its module
lives ("dead": a full garbage collection before every later load).

The WebUI has no memory manager: nothing here runs there. ComfyUI is imported inside the functions only.
"""
from __future__ import annotations

import weakref
from typing import Callable


class Residency:
    """What one owner (a TensorRT session's engines, one fp8 store's copies) holds on the device, told to ComfyUI.

    `release()` frees it (ComfyUI unloads the holder), a bound method held weakly (the owner holds the residency:
    no reference cycle; an owner gone holds nothing); `key` names the callbacks."""

    def __init__(self, release: Callable[[], None], key: str):
        self._release = weakref.WeakMethod(release) if hasattr(release, "__self__") else (lambda: release)
        self.key = key
        self.nbytes = 0
        self._module = _dead
        self._patchers: list = []

    @property
    def module(self):
        """The holders' shared empty module (None while no holder lives)."""
        return self._module()

    def patcher(self, load_device, offload_device):
        """A holder to add to an accelerated clone: a clone of the first holder still alive, else a new one."""
        for ref in self._patchers:
            holder = ref()
            if holder is not None:
                return holder.clone()   # registered by its ON_CLONE callback
        import torch

        from comfy.model_patcher import ModelPatcher
        from comfy.patcher_extension import CallbacksMP

        module = torch.nn.Module()   # no parameters: what it stands for is not the model's weights
        module.model_loaded_weight_memory = 0
        self._module = weakref.ref(module)
        holder = ModelPatcher(module, load_device=load_device, offload_device=offload_device, size=self.nbytes)
        holder.add_callback_with_key(CallbacksMP.ON_LOAD, self.key, self._on_load)
        holder.add_callback_with_key(CallbacksMP.ON_DETACH, self.key, self._on_detach)
        holder.add_callback_with_key(CallbacksMP.ON_CLONE, self.key, self._on_clone)
        self._patchers = [weakref.ref(holder)]
        return holder

    def _on_clone(self, _old, new) -> None:
        self._patchers.append(weakref.ref(new))

    def _on_load(self, patcher, *_args) -> None:
        patcher.model.model_loaded_weight_memory = self.nbytes

    def _on_detach(self, patcher, unpatch_all) -> None:
        release = self._release()
        if unpatch_all and release is not None:   # ComfyUI unloads it (a clone replacing it: unpatch_all=False)
            release()
            self.set_bytes(0)

    def set_bytes(self, nbytes: int) -> None:
        """What is held on the device now, as every holder reports it. At 0 (freed) the holders keep the last
        size: ComfyUI reserves room for what the next run makes again."""
        self.nbytes = int(nbytes)
        self._patchers = [ref for ref in self._patchers if ref() is not None]
        for ref in self._patchers:
            holder = ref()
            if holder is not None and nbytes:
                holder.size = int(nbytes)
        module = self._module()
        if module is not None:
            module.model_loaded_weight_memory = int(nbytes)


def _dead():
    return None
