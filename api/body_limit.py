"""Refuse request bodies above ``ADVORCH_MAX_REQUEST_BYTES`` with 413, in the API's error
shape: at once when Content-Length says so, or as soon as a streamed body passes the limit.

File uploads (a trial's checkpoint, a model to evaluate) are the exception: they take up to
``ADVORCH_MAX_UPLOAD_BYTES``, and are streamed to disk by their routes, never held in memory.
"""

from __future__ import annotations

import re

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response

# The routes whose bodies are files: PUT .../trials/{key}/checkpoint and POST /v1/models.
UPLOAD_ROUTES = re.compile(r"^/v1/(internal/jobs/[^/]+/trials/[^/]+/checkpoint|models)$")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = bool(UPLOAD_ROUTES.match(scope["path"]))
        limit = self.max_upload_bytes if is_upload else self.max_bytes
        setting = "ADVORCH_MAX_UPLOAD_BYTES" if is_upload else "ADVORCH_MAX_REQUEST_BYTES"
        message = f"request body above {limit} bytes ({setting})"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await error_response(413, message)(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message_in = await receive()
            received += len(message_in.get("body", b""))
            if received > limit:
                # Raised inside the route that reads the body, so the error handlers answer.
                raise HTTPException(413, message)
            return message_in

        await self.app(scope, receive_within_limit, send)
