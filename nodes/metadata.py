"""What ran, written into the saved image: the "comfy_accel" entry of ComfyUI's PNG metadata.

ComfyUI's SaveImage (and the WebP/animated savers) write every key of the prompt's `extra_pnginfo` as a
PNG text chunk. Three official hooks fill a "comfy_accel" entry there:
- an on_prompt handler (`PromptServer.add_on_prompt_handler`) gives every prompt that uses a pack node one
  record dict inside `extra_data["extra_pnginfo"]` (creating `extra_pnginfo` for API prompts that have none);
- `record_in_model` (nodes/common.py) calls `track_model`, which notes the node id and adds an OUTER_SAMPLE
  wrapper; at sample time — every run, even when the accelerator node itself was served from ComfyUI's
  output cache — the wrapper copies what the model carries (`model_options["comfy_accel_applied"]`) into the
  record of the prompt being executed;
- an events listener adds every notice (fallback, recompile, cache miss) raised while that prompt runs, and
  the wrapper adds those its sampling raised that were not logged again (a session logs a fallback once, but
  falls back on every run).
After sampling, "in_effect" says per accelerator what actually ran ("tensorrt", or "eager (fallback: why)"),
from state that holds when the node is served from ComfyUI's cache: the settings the node left in the model
(`"unavailable"`: it attached nothing that can run here) and what the attached wrappers did during this
sampling. An `accel.applied` event tells the browser, which puts it on the node's badge. The record is also in
the prompt's `/history` entry (`prompt[3]["extra_pnginfo"]["comfy_accel"]`), for API clients.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict

from ..accelerators import events

log = logging.getLogger("comfy_accel")

PNG_KEY = "comfy_accel"
WRAPPER_KEY = "comfy_accel.metadata"
APPLIED_KEY = "comfy_accel_applied"
NODES_KEY = "comfy_accel_nodes"
_MAX_RECORDS = 64

_records: "OrderedDict[str, dict]" = OrderedDict()
_lock = threading.Lock()
_server = None


def _pack_node_types() -> set[str]:
    from . import NODE_CLASS_MAPPINGS

    return set(NODE_CLASS_MAPPINGS)


def _executing_prompt_and_node() -> tuple[str | None, str | None]:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # an older ComfyUI without execution contexts: no per-prompt record
        return None, None
    context = get_executing_context()
    if context is None:
        return None, None
    return context.prompt_id, context.node_id


def record_for(prompt_id: str | None) -> dict | None:
    with _lock:
        return _records.get(prompt_id) if prompt_id else None


class PromptRecord(dict):
    """One prompt's record, filled while it runs. ComfyUI deep-copies a queue item when it starts running and
    keeps that copy as the prompt's /history entry: a copy of the record is the record itself, so the entry
    an API client reads says what ran, like the saved image. Its keys are fixed and their values are replaced,
    never changed in place: the server may serialise the running item (GET /queue) while the sampler fills it."""

    def __deepcopy__(self, memo):
        return self


def new_record(prompt: dict, node_types: set[str]) -> dict:
    """The record a prompt starts with: the pack nodes it uses and the values it asks of them."""
    requested = {}
    for node_id, node in prompt.items():
        if isinstance(node, dict) and node.get("class_type") in node_types:
            inputs = {k: v for k, v in (node.get("inputs") or {}).items() if not isinstance(v, list)}
            requested[str(node_id)] = {"class_type": node["class_type"], "inputs": inputs}
    return PromptRecord(version=1, requested=requested, applied={}, in_effect={}, notices=[])


def on_prompt(json_data: dict) -> dict:
    """on_prompt handler: attach a record to prompts that use pack nodes (never raises)."""
    try:
        prompt = json_data.get("prompt")
        if not isinstance(prompt, dict):
            return json_data
        node_types = _pack_node_types()
        if not any(isinstance(n, dict) and n.get("class_type") in node_types for n in prompt.values()):
            return json_data
        if "prompt_id" not in json_data:  # the server would draw the same uuid4 itself
            json_data["prompt_id"] = str(uuid.uuid4())
        extra = json_data.get("extra_data")
        if not isinstance(extra, dict):
            extra = json_data["extra_data"] = {}
        pnginfo = extra.get("extra_pnginfo")
        if not isinstance(pnginfo, dict):
            pnginfo = extra["extra_pnginfo"] = {}
        record = new_record(prompt, node_types)
        pnginfo[PNG_KEY] = record
        with _lock:
            _records[str(json_data["prompt_id"])] = record
            while len(_records) > _MAX_RECORDS:
                _records.popitem(last=False)
    except Exception:
        log.debug("[comfy-accel] metadata on_prompt failed", exc_info=True)
    return json_data


def _add_notice(record: dict, data: dict, running_node: str | None) -> None:
    """Adds one notice to a record, once per prompt (the caller holds _lock)."""
    line = {"accelerator": data.get("accelerator"), "message": data.get("message"),
            "level": data.get("level"), "node": data.get("node") or None, "while_running": running_node}
    if line not in record["notices"]:
        record["notices"] = [*record["notices"], line]


def _on_event(event: str, data: dict) -> None:
    if event != "accel.notice":
        return
    prompt_id, node_id = _executing_prompt_and_node()
    record = record_for(prompt_id)
    if record is None:
        return
    with _lock:
        _add_notice(record, data, node_id)


def _json_safe(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


PRECISION_NOTICES = "fp8"   # the accelerator name of the precision's own notices (compile/fp8.py)


def in_effect(applied: dict, nodes: dict, notices: list[dict], fp8_ran: bool = False) -> dict:
    """Per recorded accelerator: what actually ran. Settings with "unavailable" (the node attached nothing
    that can run here: the model is the eager one) mark a fallback on every run; otherwise a warning from the
    same node (or, when the notice names no node, from an accelerator of the same name as the recorded
    backend) raised during this prompt or its sampling does. A node that attached fp8 says "fp8" only when
    `fp8_ran` (its layers ran in fp8 during this sampling); a precision warning is not a backend fallback."""
    out = {}
    for key, settings in applied.items():
        settings = settings if isinstance(settings, dict) else {}
        node = nodes.get(key)
        backend = settings.get("backend")
        names = {key, backend} - {None}
        said = [n for n in notices if n.get("level") in ("warning", "error") and (
            (node is not None and n.get("node") == node) or (n.get("node") is None and n.get("accelerator") in names))]
        reasons = [n["message"] for n in said if n.get("accelerator") != PRECISION_NOTICES]
        reason = settings.get("unavailable") or (reasons[-1] if reasons else None)
        used = backend or key
        out[key] = {"node": node, "used": f"eager (fallback: {reason})" if reason else used, "fallback": reason}
        if settings.get("precision") == "fp8" and not reason:
            if fp8_ran:
                out[key]["used"] = f"{used} + fp8"
                out[key]["precision"] = "fp8"
            else:
                why = [n["message"] for n in said if n.get("accelerator") == PRECISION_NOTICES]
                out[key]["precision"] = f"model dtype ({why[-1] if why else 'no fp8 layer ran'})"
        elif settings.get("precision_unavailable"):
            out[key]["precision"] = f"model dtype (fp8: {settings['precision_unavailable']})"
    return out


def fp8_calls(patcher) -> int:
    """How many calls of this model's compile session ran fp8 layers so far (0 without one)."""
    try:
        from ..accelerators.compile.stand_in import session_of

        session = session_of(patcher)
        return session.fp8.calls if session is not None and session.fp8 is not None else 0
    except Exception:
        return 0


def metadata_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: copies what this model applied, and what ran, into the running prompt's record."""
    prompt_id, running_node = _executing_prompt_and_node()
    record = record_for(prompt_id)
    guider = getattr(executor, "class_obj", None)
    options = getattr(guider, "model_options", None) or getattr(getattr(guider, "model_patcher", None),
                                                                 "model_options", {})
    applied = _json_safe(options.get(APPLIED_KEY, {}))
    nodes = dict(options.get(NODES_KEY, {}))
    if record is not None:
        with _lock:
            record["applied"] = {**record["applied"], **applied}
    patcher = getattr(guider, "model_patcher", None)
    fp8_before = fp8_calls(patcher)
    with events.collect() as raised:   # what the attached wrappers do during this sampling, logged or not
        try:
            return executor(*args, **kwargs)
        finally:
            if record is not None:
                with _lock:
                    for data in raised:
                        _add_notice(record, data, running_node)
                    effect = in_effect(applied, nodes, list(record["notices"]), fp8_calls(patcher) > fp8_before)
                    record["in_effect"] = {**record["in_effect"], **effect}
                _tell_browser(prompt_id, effect)


def _tell_browser(prompt_id: str | None, effect: dict) -> None:
    if _server is None:
        return
    try:
        _server.send_sync("accel.applied", {"prompt_id": prompt_id, "in_effect": effect})
    except Exception:
        log.debug("send_sync accel.applied failed", exc_info=True)


def track_model(model, key: str) -> None:
    """Called by record_in_model: note the node that applied `key` and make sampling report it (never raises)."""
    try:
        from comfy.patcher_extension import WrappersMP

        _, node_id = _executing_prompt_and_node()
        if node_id is not None:
            model.model_options.setdefault(NODES_KEY, {})[key] = str(node_id)
        model.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
        model.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, metadata_sample_wrapper)
    except Exception:
        log.debug("[comfy-accel] could not track %s for the image metadata", key, exc_info=True)


def register(server) -> None:
    """Installs the on_prompt handler and the notice listener on a PromptServer (once)."""
    global _server
    if _server is server:
        return
    _server = server
    server.add_on_prompt_handler(on_prompt)
    events.add_listener(_on_event)
