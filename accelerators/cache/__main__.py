"""Command line for the artifact cache, run from the pack's folder:

    python -m accelerators.cache list|stats|clear [--root DIR] [--json]
    python -m accelerators.cache remove ID [--root DIR] [--json]

--root defaults to $COMFY_ACCEL_CACHE, else models/accel_cache of the host the pack is installed in.
Exit status: 0 done, 1 no such entry, 2 invalid id or usage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .api import api_clear, api_list, api_remove, api_stats
from .environment import resolve_cache_root
from .errors import ArtifactNotFound, InvalidArtifactId
from .store import ArtifactStore


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


def _profile(profile: dict) -> str:
    return " ".join(f"{d}={lo}" if lo == hi else f"{d}={lo}..{hi}" for d, (lo, hi) in profile.items()) or "-"


def _print_list(listing: dict) -> None:
    print(f"{listing['count']} entries, {_size(listing['total_bytes'])} of {_size(listing['budget_bytes'])} "
          f"in {listing['root']}")
    for e in listing["entries"]:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
        print(f"{e['id']}  {e['accelerator']:<12} {_size(e['size_bytes']):>9}  {used}  hits {e['hits']:<5} "
              f"{e['dtype'] or '-'}  {_profile(e['profile'])}")


def _print_stats(stats: dict) -> None:
    print(f"root:        {stats['root']}")
    print(f"entries:     {stats['count']}")
    print(f"size:        {_size(stats['total_bytes'])} of {_size(stats['budget_bytes'])}")
    print(f"hits:        {stats['hits']}")
    print(f"quarantined: {stats['quarantined']}")
    for name, slot in sorted(stats["by_accelerator"].items()):
        print(f"  {name:<14} {slot['count']:>5} entries  {_size(slot['bytes'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accelerators.cache", description="comfy-accel artifact cache")
    parser.add_argument("command", choices=("list", "remove", "clear", "stats"))
    parser.add_argument("id", nargs="?", help="entry id (remove)")
    parser.add_argument("--root", help="cache folder (default: $COMFY_ACCEL_CACHE or the host's models/accel_cache)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if (args.command == "remove") != (args.id is not None):
        parser.error("remove takes exactly one ID; the other commands take none")
    store = ArtifactStore(args.root or resolve_cache_root())
    try:
        if args.command == "list":
            result = api_list(store)
        elif args.command == "stats":
            result = api_stats(store)
        elif args.command == "clear":
            result = api_clear(store)
        else:
            result = api_remove(store, args.id)
    except (InvalidArtifactId, ArtifactNotFound) as exc:
        print(json.dumps(exc.as_dict()) if args.json else f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidArtifactId) else 1
    finally:
        store.flush()
    if args.json:
        print(json.dumps(result, indent=1))
    elif args.command == "list":
        _print_list(result)
    elif args.command == "stats":
        _print_stats(result)
    elif args.command == "clear":
        print(f"removed {result['removed']} entries from {store.root}")
    else:
        print(f"removed {result['removed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
