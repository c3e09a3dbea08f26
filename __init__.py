"""comfy-accel: a ComfyUI node pack (this file) and an AUTOMATIC1111 WebUI extension (scripts/).

ComfyUI imports this module from custom_nodes/; the WebUI never does (it loads scripts/ by path).
"""
import logging

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]


def _register_with_server():
    try:
        from server import PromptServer
    except ImportError:  # imported outside a ComfyUI server (tests, tools)
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    from .nodes import cache_store, routes

    routes.register(PromptServer.instance)
    cache_store.configure()


def _start_compiler_import():
    """The compiler's modules load in the background while ComfyUI starts (accelerators/compile/preimport.py)."""
    from .accelerators.compile import preimport

    preimport.start_background_import()


try:
    _register_with_server()
except Exception:  # the routes are a convenience: never let them stop the nodes from loading
    logging.getLogger("comfy_accel").exception("[comfy-accel] could not register routes")

try:  # after the settings are loaded (the preimport setting)
    _start_compiler_import()
except Exception:  # an optimisation only
    logging.getLogger("comfy_accel").debug("[comfy-accel] background import not started", exc_info=True)
