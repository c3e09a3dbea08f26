"""One-line diagnostics and progress events, host-agnostic.

Accelerators call `notice()` when they fall back, recompile or miss the cache, and `progress()` for work
that takes seconds. Both log, and both reach every registered listener: the ComfyUI shim forwards them to
the browser (PromptServer.send_sync), the WebUI shim to its console. Repeated notices with the same key
are logged once, so a fallback that happens every step does not flood the log; the keys remembered for that
are the last SEEN_LIMIT (least recently seen forgotten first), so a server that runs for weeks does not grow.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

log = logging.getLogger("comfy_accel")

_listeners: list[Callable[[str, dict], None]] = []
SEEN_LIMIT = 4096     # once-keys remembered; one prompt raises a handful, so this spans many prompts
RECENT_LIMIT = 200    # notices kept for GET /accel/notices
_seen: OrderedDict[str, float] = OrderedDict()
_recent: list[dict] = []
_lock = threading.Lock()


def add_listener(fn: Callable[[str, dict], None]) -> None:
    if fn not in _listeners:
        _listeners.append(fn)


def remove_listener(fn: Callable[[str, dict], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def _emit(event: str, data: dict) -> None:
    for fn in list(_listeners):
        try:
            fn(event, data)
        except Exception:  # a broken listener must not break sampling
            log.debug("accel event listener failed", exc_info=True)


def notice(accelerator: str, message: str, level: str = "warning", once_key: str | None = None,
           node_id: str | None = None, **data) -> bool:
    """Logs one line '[comfy-accel] <accelerator>: <message>' and tells listeners; False if deduplicated."""
    with _lock:
        if once_key is not None:
            if once_key in _seen:
                _seen.move_to_end(once_key)
                return False
            _seen[once_key] = time.time()
            while len(_seen) > SEEN_LIMIT:
                _seen.popitem(last=False)
        record = {"accelerator": accelerator, "message": message, "level": level, "node": node_id,
                  "time": time.time(), **data}
        _recent.append(record)
        del _recent[:-RECENT_LIMIT]
    getattr(log, "warning" if level == "warning" else "error" if level == "error" else "info")(
        "[comfy-accel] %s: %s", accelerator, message)
    _emit("accel.notice", record)
    return True


def recent(limit: int = 50) -> list[dict]:
    with _lock:
        return list(_recent[-limit:])


def progress(task: str, value: float, total: float, accelerator: str = "", node_id: str | None = None,
             done: bool = False, message: str = "") -> None:
    """Progress of a long task (compile, engine build); listeners show it as a toast or bar."""
    _emit("accel.progress", {"task": task, "value": value, "total": total, "accelerator": accelerator,
                             "node": node_id, "done": done, "message": message})
