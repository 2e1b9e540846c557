"""The plain HTTP API: POST /api/caption and GET /api/health, with JSON errors.

Every refusal is a JSON ``{"error": "..."}`` with a 4xx status that says what was wrong (503 when the
queue is full or a request ran past its timeout). An unexpected failure is a 500 with the exception's
message; its traceback goes to the server's log, never to the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .batching import QueueFull
from .limits import InputError, check_text, decode_image
from .service import SETTINGS, CaptionService

log = logging.getLogger(__name__)

# Multipart framing and the settings fields around the file itself.
BODY_OVERHEAD = 64 * 1024


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: an /api/ request body longer than the upload limit ``max_upload`` (plus room for
    the multipart framing and fields) is refused with 413 before it is parsed, whether it declares its
    length or streams it (chunked)."""

    def __init__(self, app, max_upload: int):
        self.app, self.max_upload, self.max_bytes = app, max_upload, max_upload + BODY_OVERHEAD

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        too_long = f"the request is larger than the upload limit of {self.max_upload} bytes (--max-upload-mb)"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error(413, too_long)(scope, receive, send)
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLong
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLong:
            if not started:
                await error(413, too_long)(scope, receive, send)


class _BodyTooLong(Exception):
    pass


def add_api(app: FastAPI, service: CaptionService) -> None:
    limits = service.limits

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError):
        return error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/api/health")
    async def health():
        return service.describe()

    @app.post("/api/caption")
    async def caption(request: Request):
        """Caption one image: multipart/form-data with the file in the field `image` (or JSON `{"text": ...}`
        for a run conditioned on text features), and optional fields `steps`, `guidance_scale`, `seed`,
        `samples` (MBR) and `trajectory` (true: the x0 estimate's tokens at every step). Answers
        `{"caption", "steps", "seconds", "batch_size", "trajectory"?}`; an error is `{"error": "..."}`."""
        started = time.perf_counter()
        kind, item, fields = await _read_request(request, service)
        settings = service.settings(fields)
        try:
            future = service.submit(kind, item, settings)
        except QueueFull as exc:
            return error(503, f"the server is busy: {exc}; try again shortly")
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=limits.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # still queued: the worker skips it
            return error(
                503,
                f"captioning did not finish within {limits.timeout_s:g} s (--timeout); "
                "the server is busy, try again shortly",
            )
        return dict(result, seconds=round(time.perf_counter() - started, 4))

    # Registered last: any other /api/ path is a JSON 404 here, not the page's HTML one.
    @app.api_route("/api/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def unknown(request: Request, path: str):
        method = {"caption": "POST", "health": "GET"}.get(path)
        if method:
            return error(405, f"{request.method} /api/{path}: use {method}")
        return error(
            404, f"{request.method} /api/{path} is no endpoint; there are POST /api/caption and GET /api/health"
        )


async def _read_request(request: Request, service: CaptionService) -> tuple[str, object, dict]:
    """(input kind, PIL image or sentence, the other fields) of a multipart or JSON request."""
    limits = service.limits
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"the JSON body cannot be parsed ({exc})") from None
        if not isinstance(body, dict):
            raise InputError('the JSON body must be an object such as {"text": "a sentence"}')
        if "image" in body:
            raise InputError(
                "send an image as multipart/form-data with the field 'image' (e.g. curl -F image=@photo.jpg)"
            )
        if "text" not in body:
            raise InputError("the JSON body has no 'text' field (images go as multipart, field 'image')")
        return "text", check_text(body.pop("text"), limits), body
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise InputError(
            f"send multipart/form-data with a field 'image', or JSON with a field 'text' "
            f"(got content type {content_type or 'none'})",
            415,
        )
    try:
        form = await request.form(max_files=1, max_fields=len(SETTINGS) + 2)
    except HTTPException as exc:
        raise InputError(f"the multipart body cannot be parsed ({exc.detail})") from None
    fields: dict[str, object] = {}
    image = text = None
    for name, value in form.multi_items():
        if name in fields or (name == "image" and image is not None):
            raise InputError(f"the field '{name}' is given twice")
        if name == "image":
            if not isinstance(value, UploadFile):
                raise InputError("the field 'image' must be a file upload (curl -F image=@photo.jpg)")
            image = await value.read(limits.max_bytes + 1)
        elif name == "text":
            text = value
        elif isinstance(value, UploadFile):
            raise InputError(f"the field '{name}' must be a plain value, not a file")
        else:
            fields[name] = value
    await form.close()
    if image is not None and text is not None:
        raise InputError("send either 'image' or 'text', not both")
    if image is not None:
        # Decoding takes a while for a large photo: off the event loop, which keeps serving others.
        return "image", await run_in_threadpool(decode_image, image, limits), fields
    if text is not None:
        return "text", check_text(text, limits), fields
    raise InputError("the request has no 'image' file field (or 'text' for a text-conditioned run)")
