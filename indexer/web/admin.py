"""Admin routes behind a bearer token: snapshot, rebuild, swap, as a sub-app mounted at ``/admin/``.

``api.admin_token`` (a pydantic ``SecretStr``, so neither logs nor ``/stats``
show it) enables them; without it they answer 403. Tokens are compared in
constant time. The token check is the sub-app's own middleware, so it guards
every route added here and nothing else.
"""

from __future__ import annotations

import asyncio
import hmac

from aiohttp import web
from pydantic import ValidationError

from indexer.config import ModelSettings
from indexer.web.errors import error
from indexer.web.keys import NODE

SNAPSHOT_TIMEOUT_S = 60


@web.middleware
async def require_token(request: web.Request, handler) -> web.StreamResponse:
    token = request.config_dict[NODE].settings.api.admin_token
    if token is None:
        raise error(web.HTTPForbidden, "admin routes are disabled: set api.admin_token")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        response = error(web.HTTPUnauthorized, "admin routes need 'Authorization: Bearer <api.admin_token>'")
        response.headers["WWW-Authenticate"] = 'Bearer realm="lookstream-admin"'
        raise response
    return await handler(request)


async def snapshot(request: web.Request) -> web.Response:
    """Write a checkpoint now (and commit its offsets)."""
    consumer = request.config_dict[NODE].active.consumer
    if consumer is None or not consumer.running or consumer.checkpointer is None:
        raise error(web.HTTPConflict, "no durable consumer is running on this node")
    future = consumer.request_checkpoint()
    checkpoint = await asyncio.wait_for(asyncio.wrap_future(future), SNAPSHOT_TIMEOUT_S)
    return web.json_response({"checkpoint": checkpoint.path.name, "seq": checkpoint.seq, "offsets": checkpoint.offsets})


async def rebuild(request: web.Request) -> web.Response:
    """Rebuild every shard's sealed segment in the background (drops deleted rows)."""
    scheduled = request.config_dict[NODE].active.shards.rebuild_all()
    return web.json_response({"scheduled": scheduled}, status=202)


async def swap(request: web.Request) -> web.Response:
    """Start a generation for new model settings (JSON, as ``[models]``); it takes over once caught up."""
    node = request.config_dict[NODE]
    try:
        body = await request.json()
        selection = ModelSettings.model_validate({**node.active.selection.model_dump(), **body})
    except (ValueError, ValidationError) as e:
        raise error(web.HTTPBadRequest, f"the body must be JSON model settings: {e}") from e
    loop = asyncio.get_running_loop()
    try:
        generation = await loop.run_in_executor(None, node.switch, selection)
    except (LookupError, RuntimeError, ValueError) as e:  # unknown model, model not on disk, bad options
        raise error(web.HTTPBadRequest, str(e)) from e
    if generation is None:
        return web.json_response({"generation": None, "note": "these models are already active or building"})
    return web.json_response({"generation": generation.id, "state": "catching-up"}, status=202)


def admin_app() -> web.Application:
    """The admin sub-app; the parent app's state (the node) is read through ``request.config_dict``."""
    app = web.Application(middlewares=[require_token])
    app.router.add_post("/snapshot", snapshot)
    app.router.add_post("/rebuild", rebuild)
    app.router.add_post("/swap", swap)
    return app
