"""FastAPI app factory for ``captioner serve``.

The model is loaded in the app's lifespan (never at import), requests are micro-batched
(:mod:`captioner.web.batching`) and inference runs on a bounded thread pool. Uploads are read
into memory with a hard size limit and parsed here (never spooled to disk), sniffed for an
allowed image type and decoded with :func:`captioner.data.images.load_image` on a small decode
pool. Every bad input is answered with a 4xx JSON body ``{"detail": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from captioner.data.images import load_image
from captioner.errors import CaptionerError, ImageLoadError
from captioner.web.batching import (
    BatcherClosedError,
    CaptionerLike,
    MicroBatcher,
    QueueFullError,
)
from captioner.web.schemas import (
    Alternative,
    Attention,
    CaptionResponse,
    ErrorResponse,
    HealthResponse,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
UPLOAD_FIELD = "image"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and small extra fields
MAX_PARTS = 16
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass
class ServeSettings:
    """Tunables of the web service (the ``captioner serve`` options)."""

    max_upload_mb: float = 10.0
    max_batch_size: int = 8  # 1 turns micro-batching off
    batch_window_ms: float = 10.0
    max_queue: int = 64  # requests admitted but not yet running; more -> 503
    workers: int = 1  # inference threads (batches run in parallel)
    decode_threads: int = 2  # image decoding threads
    max_image_side: int = 1024  # decoded uploads are shrunk to this before queueing
    request_timeout_s: float = 120.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def validate(self) -> None:
        if not self.max_upload_mb > 0:
            raise ValueError("max_upload_mb must be > 0")
        for name in ("max_batch_size", "max_queue", "workers", "decode_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_window_ms < 0 or self.max_image_side < 32 or self.request_timeout_s <= 0:
            raise ValueError("batch_window_ms >= 0, max_image_side >= 32, request_timeout_s > 0")


class UploadError(Exception):
    """A bad upload; carries the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- app factory
def create_app(
    captioner_factory: Callable[[], CaptionerLike], settings: ServeSettings | None = None
) -> FastAPI:
    """Build the app. ``captioner_factory`` is called once, in a thread, at startup."""
    settings = settings or ServeSettings()
    settings.validate()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.captioner = None
        app.state.startup_error = None
        try:
            captioner = await anyio.to_thread.run_sync(captioner_factory)
        except BaseException as exc:
            app.state.startup_error = exc
            raise
        batcher = MicroBatcher(
            captioner,
            max_batch_size=settings.max_batch_size,
            window_s=settings.batch_window_ms / 1000.0,
            max_queue=settings.max_queue,
            workers=settings.workers,
        )
        decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        await batcher.start()
        app.state.captioner = captioner
        app.state.batcher = batcher
        app.state.decode_pool = decode_pool
        try:
            yield
        finally:
            app.state.captioner = None
            await batcher.close()
            decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="captioner",
        version=_version(),
        description="Image captioning (EfficientNet-Lite + Show-Attend-Tell) as a web service.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.captioner = None
    app.state.batcher = None
    app.state.startup_error = None

    _install_error_handlers(app)

    app.add_middleware(SecurityHeaders)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", response_model=HealthResponse, tags=["service"])
    async def healthz(request: Request) -> HealthResponse:
        """Liveness/readiness: ``model_loaded`` turns true once startup has loaded the model."""
        loaded = request.app.state.captioner is not None
        return HealthResponse(
            status="ok" if loaded else "starting",
            model_loaded=loaded,
            version=_version(),
            max_upload_bytes=settings.max_upload_bytes,
        )

    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": text}
        for code, text in {
            400: "Malformed request body",
            413: "Upload larger than the server's limit",
            415: "Not an image, or not JPEG/PNG/WebP/GIF",
            422: "Missing image field, bad options, or an image that cannot be decoded",
            503: "Server busy (queue full), starting or shutting down",
        }.items()
    }

    @app.post(
        "/v1/captions",
        response_model=CaptionResponse,
        tags=["captions"],
        responses=error_responses,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": [UPLOAD_FIELD],
                            "properties": {
                                UPLOAD_FIELD: {
                                    "type": "string",
                                    "format": "binary",
                                    "description": "JPEG, PNG, WebP or GIF (first frame).",
                                }
                            },
                        }
                    }
                },
            }
        },
    )
    async def create_caption(
        request: Request,
        beam_size: int = Query(3, ge=1, le=10, description="Beam width (1 = greedy)."),
        max_length: int = Query(20, ge=1, le=50, description="Most words in a caption."),
        attention: bool = Query(False, description="Also return per-word attention grids."),
    ) -> CaptionResponse:
        """Caption one uploaded image (multipart field ``image``)."""
        batcher: MicroBatcher | None = request.app.state.batcher
        if batcher is None or request.app.state.captioner is None:
            raise HTTPException(503, "the model is not loaded yet, try again shortly")
        try:
            ticket = batcher.admit()  # before reading the body: a full queue answers at once
        except (QueueFullError, BatcherClosedError) as exc:
            return _error(503, str(exc), headers={"Retry-After": "1"})
        try:
            try:
                data, filename = await _read_upload(request, settings.max_upload_bytes)
                loop = asyncio.get_running_loop()
                image = await loop.run_in_executor(
                    request.app.state.decode_pool,
                    decode_upload,
                    data,
                    filename,
                    settings.max_image_side,
                )
                del data
            except UploadError as exc:
                return _error(exc.status, exc.message)
            try:
                result = await asyncio.wait_for(
                    batcher.submit(
                        ticket,
                        image,
                        beam_size=beam_size,
                        max_length=max_length,
                        return_attention=attention,
                    ),
                    timeout=settings.request_timeout_s,
                )
            except asyncio.TimeoutError:
                return _error(503, "timed out waiting for the model, try again later")
            except BatcherClosedError as exc:
                return _error(503, str(exc))
            except CaptionerError as exc:
                return _error(422, str(exc))
            except Exception:
                log.exception("captioning failed")
                return _error(500, "internal server error")
        finally:
            batcher.release(ticket)
        return to_response(result, attention)

    return app


# --------------------------------------------------------------------------- middleware
class SecurityHeaders:
    """Plain ASGI middleware: nosniff everywhere, a strict CSP on the page and its assets."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        page = path == "/" or path.startswith("/static/")

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if page:
                    headers.setdefault("Content-Security-Policy", PAGE_CSP)
                    headers.setdefault("X-Frame-Options", "DENY")
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --------------------------------------------------------------------------- errors
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg"))
        return JSONResponse(
            {"detail": "; ".join(parts) or "invalid request", "errors": _plain(exc.errors())},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)


def _plain(errors: Any) -> list[dict[str, Any]]:
    """Validation errors with only JSON-safe values (ctx may hold exceptions)."""
    out = []
    for err in errors:
        out.append(
            {
                "loc": [str(x) for x in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return out


# --------------------------------------------------------------------------- upload reading
async def _read_upload(request: Request, limit: int) -> tuple[bytes, str]:
    """Stream the multipart body into memory (bounded) and return the ``image`` part."""
    body_limit = limit + MULTIPART_OVERHEAD
    too_large = f"upload too large: the limit is {_mb(limit)}"
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise UploadError(400, "invalid Content-Length header") from None
        if declared > body_limit:
            raise UploadError(413, too_large)
        if declared == 0:
            raise UploadError(422, _missing_field("the request body is empty"))
    content_type = request.headers.get("content-type", "")
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        if not content_type and length is None:
            raise UploadError(422, _missing_field("the request body is empty"))
        shown = ctype.decode("latin-1") or "none"
        raise UploadError(
            415,
            f"expected multipart/form-data (got Content-Type: {shown}); "
            f"send the picture as a file field named '{UPLOAD_FIELD}'",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")

    collector = _PartCollector(limit)
    try:
        parser = MultipartParser(boundary, collector.callbacks(), max_header_count=16)
    except ValueError as exc:
        raise UploadError(400, f"malformed multipart body: {exc}") from None
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise UploadError(413, too_large)
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except ClientDisconnect:
        raise UploadError(400, "the client closed the connection during the upload") from None
    except _PartTooLarge:
        raise UploadError(413, too_large) from None
    except _TooManyParts:
        raise UploadError(400, f"too many form fields (at most {MAX_PARTS})") from None
    except ValueError as exc:  # python-multipart parse errors derive from ValueError
        raise UploadError(400, f"malformed multipart body: {exc}") from None
    if received == 0:
        raise UploadError(422, _missing_field("the request body is empty"))
    if not collector.ended:
        raise UploadError(400, "malformed multipart body: it ends before the closing boundary")
    if collector.image is None:
        raise UploadError(422, _missing_field("the form has no file field named 'image'"))
    if not collector.image:
        raise UploadError(422, f"the uploaded file '{collector.filename}' is empty")
    return bytes(collector.image), collector.filename


def _missing_field(why: str) -> str:
    return f"{why}: send multipart/form-data with the picture in a file field named 'image'"


def _mb(n: int) -> str:
    return f"{round(n / (1024 * 1024), 2):g} MB"


class _PartTooLarge(Exception):
    pass


class _TooManyParts(Exception):
    pass


class _PartCollector:
    """python-multipart callbacks that keep only the first ``image`` part, in memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.image: bytearray | None = None
        self.filename = "upload"
        self.ended = False
        self._parts = 0
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._target: bytearray | None = None

    def callbacks(self) -> dict[str, Callable]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise _TooManyParts
        self._headers = {}
        self._target = None

    def _header_end(self) -> None:
        self._headers[bytes(self._field).strip().lower()] = bytes(self._value).strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == UPLOAD_FIELD.encode() and self.image is None:
            self.image = bytearray()
            self._target = self.image
            filename = options.get(b"filename")
            if filename:
                self.filename = Path(filename.decode("utf-8", "replace")).name[:200] or "upload"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target is None:
            return
        if len(self._target) + (end - start) > self.limit:
            raise _PartTooLarge
        self._target.extend(data[start:end])

    def _end(self) -> None:
        self.ended = True


# --------------------------------------------------------------------------- decoding
_SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
}
_KNOWN_OTHERS = {
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a ZIP archive (or an Office document)",
    b"BM": "a BMP image",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
    b"\x00\x00\x01\x00": "an ICO icon",
    b"<svg": "an SVG drawing",
    b"<?xml": "an XML/SVG document",
    b"%!PS": "a PostScript document",
}
ALLOWED = "JPEG, PNG, WebP or GIF"


def sniff_format(data: bytes) -> str | None:
    """The image format from magic bytes, or None when it isn't one we accept."""
    for fmt, prefixes in _SIGNATURES.items():
        if data.startswith(prefixes):
            return fmt
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe(data: bytes) -> str:
    head = data[:16].lstrip()
    for prefix, what in _KNOWN_OTHERS.items():
        if data.startswith(prefix) or head.startswith(prefix):
            return what
    sample = data[:512]
    try:
        sample.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "not an image"


def decode_upload(data: bytes, filename: str = "upload", max_side: int = 1024) -> np.ndarray:
    """Uploaded bytes -> RGB uint8 (H, W, 3), at most ``max_side`` on the long edge.

    Raises UploadError: 415 for anything that isn't JPEG/PNG/WebP/GIF, 422 for an image that
    cannot be decoded (truncated, corrupt, too many pixels).
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise UploadError(
            415, f"{filename}: unsupported file type ({_describe(data)}); send a {ALLOWED} image"
        )
    try:
        image = load_image(data, name=filename)
    except ImageLoadError as exc:
        status = 415 if isinstance(exc.__cause__, UnidentifiedImageError) else 422
        raise UploadError(status, str(exc)) from None
    height, width = image.shape[:2]
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), dtype=np.uint8)
    return image


# --------------------------------------------------------------------------- responses
def _finite(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def attention_grid(attention: Any, n_tokens: int) -> Attention | None:
    """(T, g, g) or (T, g*g) weights -> the JSON shape; None when absent or malformed."""
    if attention is None:
        return None
    array = np.asarray(attention, dtype=np.float32)
    if array.ndim == 2:
        side = math.isqrt(array.shape[1])
        if side * side != array.shape[1]:
            return None
        array = array.reshape(array.shape[0], side, side)
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        return None
    array = np.nan_to_num(array[:n_tokens], nan=0.0, posinf=0.0, neginf=0.0)
    grid = np.round(array.astype(np.float64), 5).tolist()
    return Attention(grid=grid, shape=list(array.shape))


def to_response(result: Any, attention: bool) -> CaptionResponse:
    tokens = [str(t) for t in (getattr(result, "tokens", None) or [])]
    caption = str(getattr(result, "caption", "") or " ".join(tokens))
    alternatives = [
        Alternative(caption=str(c), score=_finite(s))
        for c, s in (getattr(result, "alternatives", None) or [])
    ]
    return CaptionResponse(
        caption=caption,
        score=_finite(getattr(result, "score", None)),
        alternatives=alternatives,
        tokens=tokens,
        attention=attention_grid(getattr(result, "attention", None), len(tokens))
        if attention
        else None,
    )


def _version() -> str:
    try:
        from captioner import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version("captioner")
    except Exception:
        return "unknown"
