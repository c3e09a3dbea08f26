"""A cheap fingerprint of a model's base weights, for artifact keys.

Sampled (the default): names, shapes and dtypes of every tensor plus four 128-byte windows spread over each
tensor's bytes — tens of milliseconds for a full SD1.5 UNet, and any other checkpoint of the same architecture
differs in those windows. `full=True` hashes every byte with BLAKE2b (seconds; for audits or tools).

The value is memoised per object: a module keeps its first fingerprint for its life, so call this before
LoRA/patches are applied in place (the key must name the *base* weights; patches are refitted or read live).
A mapping is memoised by the tensor objects it holds (weakly referenced, so freed tensors never match), not
by the dict: `{k: w for ...}` rebuilt on every call still hits, and in-place patches keep the tensors.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping

import torch

SAMPLED_PREFIX = "s1:"
FULL_PREFIX = "f1:"
WINDOWS = 4
WINDOW_BYTES = 128
_CHUNK_BYTES = 64 << 20

_module_memo: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
_dict_memo: "OrderedDict[int, tuple]" = OrderedDict()
_DICT_MEMO_SIZE = 32
_memo_lock = threading.Lock()


def _tensors(weights) -> list[tuple[str, torch.Tensor]]:
    if isinstance(weights, Mapping):
        items = weights.items()
    elif callable(getattr(weights, "state_dict", None)):
        items = weights.state_dict(keep_vars=True).items()  # keep_vars: no detach() per tensor
    else:
        raise TypeError(f"weights_fingerprint needs a torch.nn.Module or a state dict; got {type(weights).__name__}")
    return sorted((str(k), v) for k, v in items if isinstance(v, torch.Tensor))  # order-independent


def _byte_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor's bytes as a flat uint8 tensor on its device (None for meta/sparse tensors)."""
    tensor = tensor.detach()
    if tensor.is_meta or tensor.layout != torch.strided or tensor.numel() == 0:
        return None
    flat = tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8)


def _structure(items: list[tuple[str, torch.Tensor]]) -> bytes:
    return "\n".join(f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in items).encode()


def _windows(data: torch.Tensor) -> list[torch.Tensor]:
    size = data.numel()
    if size <= WINDOWS * WINDOW_BYTES:
        return [data]
    last = size - WINDOW_BYTES
    return [data[o:o + WINDOW_BYTES] for o in (last * i // (WINDOWS - 1) for i in range(WINDOWS))]


def _sampled(items: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256(_structure(items))
    pieces: list[tuple[torch.device, int]] = []   # (device, length) in name order
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in items:
        data = _byte_view(tensor)
        for window in _windows(data) if data is not None else ():
            by_device.setdefault(window.device, []).append(window)
            pieces.append((window.device, window.numel()))
    # one copy per device, then re-read in name order: the result does not depend on where weights live
    buffers = {dev: memoryview(torch.cat(parts).cpu().numpy()) for dev, parts in by_device.items()}
    cursor = dict.fromkeys(buffers, 0)
    for device, length in pieces:
        digest.update(buffers[device][cursor[device]:cursor[device] + length])
        cursor[device] += length
    return SAMPLED_PREFIX + digest.hexdigest()[:32]


def _full(items: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.blake2b(_structure(items), digest_size=32)  # faster than sha256 where there is no SHA-NI
    for _, tensor in items:
        data = _byte_view(tensor)
        if data is None:
            continue
        for start in range(0, data.numel(), _CHUNK_BYTES):
            digest.update(memoryview(data[start:start + _CHUNK_BYTES].cpu().numpy()))
    return FULL_PREFIX + digest.hexdigest()


def _same_tensors(refs: tuple, items: list[tuple[str, torch.Tensor]]) -> bool:
    """Whether `items` holds the very tensor objects remembered (weak references: tensors freed and their ids
    reused by the next checkpoint must not match)."""
    return len(refs) == len(items) and all(ref() is t and name == n for (n, ref), (name, t) in zip(refs, items))


def weights_fingerprint(weights, full: bool = False, refresh: bool = False) -> str:
    """Fingerprint of a torch.nn.Module (or anything with state_dict()) or a {name: tensor} mapping.

    Memoised per object (see the module docstring); `refresh=True` recomputes.
    """
    mode = "full" if full else "sampled"
    compute = _full if full else _sampled
    if not isinstance(weights, Mapping):
        try:
            memo = _module_memo.setdefault(weights, {})
        except TypeError:  # not weakly referenceable: no memo
            return compute(_tensors(weights))
        if refresh or mode not in memo:
            with torch.no_grad():
                memo[mode] = compute(_tensors(weights))
        return memo[mode]
    items = _tensors(weights)
    identity = hash(tuple((name, id(t)) for name, t in items))  # the tensors, not the dict: callers rebuild dicts
    with _memo_lock:
        cached = _dict_memo.get(identity)
    if cached is None or refresh or not _same_tensors(cached[0], items):
        cached = (tuple((name, weakref.ref(t)) for name, t in items), {})
    if mode not in cached[1]:
        with torch.no_grad():
            cached[1][mode] = compute(items)
    with _memo_lock:
        _dict_memo[identity] = cached
        _dict_memo.move_to_end(identity)
        while len(_dict_memo) > _DICT_MEMO_SIZE:
            _dict_memo.popitem(last=False)
    return cached[1][mode]
