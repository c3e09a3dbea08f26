"""Benchmark of the artifact cache's hot paths (not a test): key computation and lookup in a large store.

    python -m tools.bench_cache                 # full-size SD1.5 UNet shapes, 10,000 entries
    python -m tools.bench_cache --entries 2000 --dtype float32 --full --json

1. weights_fingerprint of a state dict with the real SD1.5 UNet shapes (686 tensors, 859,520,964 params,
   allocated with torch.empty, so no checkpoint is needed): sampled (first call), memoised (second call),
   and with --full the full hash; then ArtifactKey.build with this process's environment.
2. A store with N entries (small payloads): get (hit: read + verify sha256 + record the hit), get (miss),
   get_covering, explain_miss — each from a fresh ArtifactStore, as a new process would see it — plus
   opening the store and listing every entry.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from accelerators.cache import ArtifactKey, ArtifactStore, weights_fingerprint  # noqa: E402


def sd15_unet_shapes(model=320, context=768, mults=(1, 2, 4, 4), attention_levels=(0, 1, 2), res_blocks=2):
    """(name, shape) of the SD1.5 UNet in the LDM/ComfyUI layout."""
    shapes, emb = [], model * 4

    def add(name, *shape):
        shapes.append((name, shape))

    def linear(name, cout, cin, bias=True):
        add(f"{name}.weight", cout, cin)
        if bias:
            add(f"{name}.bias", cout)

    def conv(name, cout, cin, k=3):
        add(f"{name}.weight", cout, cin, k, k)
        add(f"{name}.bias", cout)

    def norm(name, c):
        add(f"{name}.weight", c)
        add(f"{name}.bias", c)

    def res(p, cin, cout):
        norm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cout, cin)
        linear(f"{p}.emb_layers.1", cout, emb)
        norm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout)
        if cin != cout:
            conv(f"{p}.skip_connection", cout, cin, 1)

    def attn(p, c):
        norm(f"{p}.norm", c)
        conv(f"{p}.proj_in", c, c, 1)
        t = f"{p}.transformer_blocks.0"
        for a, ctx in (("attn1", c), ("attn2", context)):
            linear(f"{t}.{a}.to_q", c, c, bias=False)
            linear(f"{t}.{a}.to_k", c, ctx, bias=False)
            linear(f"{t}.{a}.to_v", c, ctx, bias=False)
            linear(f"{t}.{a}.to_out.0", c, c)
        linear(f"{t}.ff.net.0.proj", c * 8, c)
        linear(f"{t}.ff.net.2", c, c * 4)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{t}.{n}", c)
        conv(f"{p}.proj_out", c, c, 1)

    linear("time_embed.0", emb, model)
    linear("time_embed.2", emb, emb)
    conv("input_blocks.0.0", model, 4)
    skips, ch, block = [model], model, 1
    for level, mult in enumerate(mults):
        for _ in range(res_blocks):
            res(f"input_blocks.{block}.0", ch, model * mult)
            ch = model * mult
            if level in attention_levels:
                attn(f"input_blocks.{block}.1", ch)
            skips.append(ch)
            block += 1
        if level != len(mults) - 1:
            conv(f"input_blocks.{block}.0.op", ch, ch)
            skips.append(ch)
            block += 1
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    block = 0
    for level, mult in reversed(list(enumerate(mults))):
        for i in range(res_blocks + 1):
            res(f"output_blocks.{block}.0", ch + skips.pop(), model * mult)
            ch, part = model * mult, 1
            if level in attention_levels:
                attn(f"output_blocks.{block}.1", ch)
                part = 2
            if level and i == res_blocks:
                conv(f"output_blocks.{block}.{part}.conv", ch, ch)
            block += 1
    norm("out.0", model)
    conv("out.2", 4, model)
    return shapes


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """(median seconds, last result)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_fingerprint(dtype: torch.dtype, full: bool) -> dict:
    shapes = sd15_unet_shapes()
    state = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes}
    out = {"tensors": len(state), "params": sum(math.prod(s) for _, s in shapes), "dtype": str(dtype)}
    out["sampled_first_s"], fingerprint = timed(lambda: weights_fingerprint(state))
    out["sampled_memoised_s"], _ = timed(lambda: weights_fingerprint(state), repeat=20)
    out["sampled_recomputed_s"], _ = timed(lambda: weights_fingerprint(state, refresh=True), repeat=5)
    if full:
        out["full_s"], _ = timed(lambda: weights_fingerprint(state, full=True, refresh=True))
    config = {"family": "sd15", "model_channels": 320, "context_dim": 768}
    build = lambda: ArtifactKey.build(accelerator="inductor", options={"mode": "max-autotune"},  # noqa: E731
                                      model_config=config, weights=weights_fingerprint(state),
                                      profile={"batch": [1, 2], "height": [512, 512], "width": [512, 512]},
                                      dtype=dtype)
    out["key_build_first_s"], _ = timed(build)
    out["key_build_s"], _ = timed(build, repeat=200)
    out["fingerprint"] = fingerprint
    return out


def bench_store(root: Path, entries: int, lookups: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    versions = {"torch": "2.13.0", "triton": "3.6.0", "cuda": "13.0", "python": "3.12", "comfy_accel": "0.1.0",
                "host": "comfyui 0.3.75"}
    device = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}

    def key(i: int, torch_version: str = "2.13.0") -> ArtifactKey:
        side = 512 + 64 * (i % 9)
        return ArtifactKey.build(accelerator=("inductor", "tensorrt", "onediff")[i % 3], options={"variant": i},
                                 model_config={"family": "sd15"}, weights=f"s1:{i % 50:032x}", dtype="float16",
                                 profile={"batch": [1, 2], "height": [side, side], "width": [side, side]},
                                 device=device, versions={**versions, "torch": torch_version})

    store = ArtifactStore(root, budget_bytes=10**12, fsync=False)  # throwaway store: fsync only adds disk waits
    start = time.perf_counter()
    for i in range(entries):
        store.put(key(i), {"graph.bin": rng.randbytes(2048), "meta.json": b'{"ok": true}'})
    store.flush()
    out = {"entries": entries, "create_s": time.perf_counter() - start}
    picks = [rng.randrange(entries) for _ in range(lookups)]
    fresh = ArtifactStore(root)
    out["get_hit_s"], hit = timed(lambda: fresh.get(key(picks.pop())), repeat=lookups)
    assert hit is not None
    out["get_miss_s"], miss = timed(lambda: fresh.get(key(rng.randrange(entries), "2.14.0")), repeat=lookups)
    assert miss is None
    fresh = ArtifactStore(root)
    probe = key(7)
    out["first_index_use_s"], _ = timed(lambda: fresh.get_covering(probe, {"batch": 1, "height": 9999}))
    out["get_covering_s"], found = timed(lambda: fresh.get_covering(probe, {"batch": 2}), repeat=20)
    assert found is not None
    out["explain_miss_s"], reasons = timed(lambda: fresh.explain_miss(key(7, "2.14.0")), repeat=20)
    out["explain_miss_example"] = reasons
    out["open_and_list_s"], listed = timed(lambda: ArtifactStore(root).entries(), repeat=3)
    assert len(listed) == entries
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--full", action="store_true", help="also time the full hash of every byte")
    parser.add_argument("--root", help="store folder (default: a temporary one, deleted afterwards)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "python": platform.python_version(),
              "fingerprint": bench_fingerprint(getattr(torch, args.dtype), args.full)}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as temp:
        result["store"] = bench_store(Path(args.root or temp), args.entries, args.lookups)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    fp, st = result["fingerprint"], result["store"]
    print(f"torch {result['torch']} · Python {result['python']} · {result['machine']}")
    print(f"SD1.5 UNet state dict: {fp['tensors']} tensors, {fp['params']:,} params, {fp['dtype']}")
    for label, name in (("fingerprint, sampled, first call", "sampled_first_s"),
                        ("fingerprint, sampled, recomputed (median)", "sampled_recomputed_s"),
                        ("fingerprint, memoised (median)", "sampled_memoised_s"), ("fingerprint, full", "full_s"),
                        ("ArtifactKey.build, first call", "key_build_first_s"),
                        ("ArtifactKey.build (median)", "key_build_s")):
        if name in fp:
            print(f"  {label:<44} {fp[name] * 1000:9.2f} ms")
    print(f"store with {st['entries']:,} entries (created in {st['create_s']:.1f} s)")
    for label, name in (("get, hit (verify + record hit, median)", "get_hit_s"), ("get, miss (median)", "get_miss_s"),
                        ("first index use (fresh store)", "first_index_use_s"),
                        ("get_covering (median)", "get_covering_s"), ("explain_miss (median)", "explain_miss_s"),
                        ("open store + list all entries", "open_and_list_s")):
        print(f"  {label:<44} {st[name] * 1000:9.2f} ms")
    print(f"  explain_miss says: {st['explain_miss_example']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
