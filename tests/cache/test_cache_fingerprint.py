"""weights_fingerprint: same weights → same value wherever they come from; other weights → another value;
memoised per object so patches applied in place after the first call do not change a model's key."""
from __future__ import annotations

import torch

from accelerators.cache import weights_fingerprint


def small_unet_like(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3), torch.nn.GroupNorm(8, 32), torch.nn.Linear(64, 2048),
                               torch.nn.Linear(2048, 64)).half()


def test_same_weights_same_fingerprint_from_module_dict_or_copy():
    model = small_unet_like()
    value = weights_fingerprint(model)
    assert value.startswith("s1:") and len(value) == 35
    copied = {name: tensor.clone() for name, tensor in reversed(list(model.state_dict().items()))}
    assert weights_fingerprint(copied) == value  # order and storage do not matter, the bytes do
    assert weights_fingerprint(small_unet_like(seed=0)) == value
    assert weights_fingerprint(small_unet_like(seed=1)) != value


def test_structure_is_part_of_the_fingerprint():
    state = {name: t.clone() for name, t in small_unet_like().state_dict().items()}
    renamed = {("prefix." + name): t for name, t in state.items()}
    as_float = {name: t.float() for name, t in state.items()}
    values = {weights_fingerprint(state), weights_fingerprint(renamed), weights_fingerprint(as_float)}
    assert len(values) == 3


def test_sampled_sees_the_sampled_windows_and_full_sees_every_byte():
    weight = torch.zeros(4096, dtype=torch.float32)
    base_sampled, base_full = weights_fingerprint({"w": weight}), weights_fingerprint({"w": weight}, full=True)
    first = weight.clone()
    first[0] = 1.0  # inside the first window
    assert weights_fingerprint({"w": first}) != base_sampled
    middle = weight.clone()
    middle[1000] = 1.0  # between windows: only the full hash sees it
    assert weights_fingerprint({"w": middle}) == base_sampled
    assert weights_fingerprint({"w": middle}, full=True) != base_full
    assert base_full.startswith("f1:") and len(base_full) == 67


def test_memoised_per_module_so_in_place_patches_keep_the_base_fingerprint():
    model = small_unet_like()
    base = weights_fingerprint(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # what an in-place LoRA patch does
    assert weights_fingerprint(model) == base
    assert weights_fingerprint(model, refresh=True) != base


def test_state_dicts_are_memoised_by_their_tensors_and_see_replaced_ones():
    state = {name: t.clone() for name, t in small_unet_like().state_dict().items()}
    base = weights_fingerprint(state)
    with torch.no_grad():
        state["0.weight"].add_(1.0)  # in place: same tensor, memo kept
    assert weights_fingerprint(state) == base
    assert weights_fingerprint(dict(state)) == base  # a dict rebuilt around the same tensors: memo kept
    state["0.weight"] = torch.zeros_like(state["0.weight"])  # a new tensor: recomputed
    assert weights_fingerprint(state) != base


def test_meta_and_empty_tensors_hash_their_structure_only():
    def make():
        return {"w": torch.empty(8, 8, device="meta"), "e": torch.empty(0)}

    assert weights_fingerprint(make()) == weights_fingerprint(make())
    assert weights_fingerprint(make()) != weights_fingerprint({"w": torch.empty(8, 9, device="meta")})
