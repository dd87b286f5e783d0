"""FastAPI app factory for ``captioner serve``: wires the pieces together and owns the lifespan.

The model is loaded in the app's lifespan (never at import), requests are micro-batched
(:mod:`captioner.web.batching`) and inference runs on a bounded thread pool. The pieces:
:mod:`~captioner.web.routes` (the JSON API), :mod:`~captioner.web.upload` (reading the body),
:mod:`~captioner.web.decode` (bytes -> image), :mod:`~captioner.web.decoding` (the bounded
decode queue), :mod:`~captioner.web.schemas` (the JSON),
:mod:`~captioner.web.page` (the demo page and security headers) and
:mod:`~captioner.web.handlers` (errors as ``{"detail": "..."}``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import anyio.to_thread
from fastapi import FastAPI

from captioner.web.batching import CaptionerLike, MicroBatcher
from captioner.web.decode import decode_upload, sniff_format
from captioner.web.decoding import DecodeQueue
from captioner.web.handlers import CatchAll, install_error_handlers
from captioner.web.page import SecurityHeaders, install_page
from captioner.web.routes import router
from captioner.web.schemas import attention_grid, to_response
from captioner.web.settings import ServeSettings, service_version
from captioner.web.upload import MULTIPART_OVERHEAD, UploadBudget, UploadError

__all__ = [
    "ServeSettings",
    "UploadError",
    "attention_grid",
    "create_app",
    "decode_upload",
    "sniff_format",
    "to_response",
]


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
        decoder = DecodeQueue(settings.decode_threads, settings.max_decode_queue, app.state.uploads)
        await batcher.start()
        app.state.captioner = captioner
        app.state.batcher = batcher
        app.state.decoder = decoder
        try:
            yield
        finally:
            app.state.captioner = None
            await batcher.close()
            decoder.close()

    app = FastAPI(
        title="captioner",
        version=service_version(),
        description="Image captioning (EfficientNet-Lite + Show-Attend-Tell) as a web service.",
        lifespan=lifespan,
        # the interactive docs page loads swagger-ui from a CDN: off (nothing leaves this
        # server); the OpenAPI description stays at /openapi.json
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.settings = settings
    app.state.captioner = None
    app.state.batcher = None
    app.state.decoder = None
    app.state.startup_error = None
    # room for at least one upload of the largest size, multipart overhead included
    capacity = max(settings.upload_memory_bytes, settings.max_upload_bytes + MULTIPART_OVERHEAD)
    app.state.uploads = UploadBudget(capacity)

    install_error_handlers(app)
    app.add_middleware(CatchAll)
    app.add_middleware(SecurityHeaders)  # outermost: a 500 from CatchAll gets the headers too
    install_page(app)
    app.include_router(router)
    return app
