"""HTTP routes and browser events of the pack, on ComfyUI's own PromptServer.

GET  /accel/status            every accelerator with availability and reason, the settings, and every
                              option's allowed values (accelerators/options.py; web/accel.js builds its
                              settings from them)
GET  /accel/settings          current settings;  POST /accel/settings  validated partial update
GET  /accel/notices           the last fallback/recompile/cache-miss lines
GET  /accel/cache             cache entries;  GET /accel/cache/stats;  POST /accel/cache/clear
DELETE /accel/cache/{id}      remove one entry (ids validated: no path outside the store)
Events: accel.notice and accel.progress are pushed to the browser with send_sync.
"""
from __future__ import annotations

import logging

from aiohttp import web

from ..accelerators import events, options, registry, settings
from ..accelerators.base import AcceleratorInputError
from .cache_store import comfy_store as _cache_store

log = logging.getLogger("comfy_accel")
_registered = False


def _error(status: int, message: str):
    return web.json_response({"error": message}, status=status)


def status_body() -> dict:
    """What GET /accel/status answers."""
    return {"accelerators": registry.status(), "settings": settings.as_dict(), "options": options.describe()}


def register(server) -> None:
    """Adds the routes and the event forwarder to a PromptServer (once)."""
    global _registered
    if _registered:
        return
    _registered = True
    routes = server.routes

    @routes.get("/accel/status")
    async def accel_status(request):
        return web.json_response(status_body())

    @routes.get("/accel/settings")
    async def get_accel_settings(request):
        return web.json_response(settings.as_dict())

    @routes.post("/accel/settings")
    async def post_accel_settings(request):
        try:
            values = await request.json()
            if not isinstance(values, dict):
                raise AcceleratorInputError("settings must be a JSON object")
            return web.json_response(settings.update(values).__dict__)
        except (AcceleratorInputError, ValueError) as exc:
            return _error(400, str(exc))

    @routes.get("/accel/notices")
    async def accel_notices(request):
        return web.json_response({"notices": events.recent()})

    @routes.get("/accel/cache")
    async def cache_list(request):
        from ..accelerators.cache import api_list

        return web.json_response(api_list(_cache_store()))

    @routes.get("/accel/cache/stats")
    async def cache_stats(request):
        from ..accelerators.cache import api_stats

        return web.json_response(api_stats(_cache_store()))

    @routes.post("/accel/cache/clear")
    async def cache_clear(request):
        from ..accelerators.cache import api_clear

        return web.json_response(api_clear(_cache_store()))

    @routes.delete("/accel/cache/{artifact_id}")
    async def cache_remove(request):
        from ..accelerators.cache import ArtifactNotFound, InvalidArtifactId, api_remove

        try:
            return web.json_response(api_remove(_cache_store(), request.match_info["artifact_id"]))
        except InvalidArtifactId as exc:
            return _error(400, str(exc))
        except ArtifactNotFound as exc:
            return _error(404, str(exc))

    def forward(event: str, data: dict) -> None:
        try:
            server.send_sync(event, data)
        except Exception:
            log.debug("send_sync failed", exc_info=True)

    events.add_listener(forward)

    from .metadata import register as register_metadata  # "comfy_accel" entry in saved images

    register_metadata(server)
