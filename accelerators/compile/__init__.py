"""The compile lane: the UNet run through a compiled callable (inductor, inductor+cudagraphs, OneDiff,
Stable Fast) inside ComfyUI's official hooks.

- `session.py`: options, the `Compiler` a backend provides, shape admission, the compiled callables, the run of
  a shape bucket and the fallback; `apply_backend` (what every backend's `apply` does).
- `stand_in.py`: the UNet stand-in, the `APPLY_MODEL` swap and the one "cannot serve this call" check (shared
  with the TensorRT loader); DeepCache's segment compiler.
- `artifacts.py`: warm start (compile-cache artifacts, the precompiled UNet) in the shared artifact cache.
- `graphs.py`: CUDA graphs, the check that their weights did not move, channels-last weights.
- `inductor.py`, `onediff.py`, `stable_fast.py`: one module per backend; `precompile.py`: dynamo's precompile
  of the whole UNet; `preimport.py`: the compiler's modules imported in the background at startup.
"""
from . import inductor, onediff, stable_fast

ACCELERATOR_SPECS = [*inductor.ACCELERATOR_SPECS, *onediff.ACCELERATOR_SPECS, *stable_fast.ACCELERATOR_SPECS]
