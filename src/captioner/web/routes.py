"""The JSON API: ``GET /healthz`` and ``POST /v1/captions``.

A caption request is handled in this order, so that a slow or bad client never holds anything
that good requests need: read the body (bounded in time by ``upload_timeout_s`` -> 408, and in
bytes by the upload budget -> 503), decode it in the bounded decode queue (full, or its decoded
pixels over the memory budget -> 503; see :mod:`captioner.web.decoding`), and only then take a
place in the batcher's queue (full -> 503) and wait for the model (``request_timeout_s`` -> 503).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from captioner.errors import CaptionerError
from captioner.model.config import GenerationConfig
from captioner.settings import bounds_of
from captioner.web.batching import BatcherClosedError, MicroBatcher, QueueFullError
from captioner.web.decode import ALLOWED
from captioner.web.decoding import DecodeQueue
from captioner.web.handlers import error_response
from captioner.web.schemas import CaptionResponse, ErrorResponse, HealthResponse, to_response
from captioner.web.settings import ServeSettings, service_version
from captioner.web.upload import UPLOAD_FIELD, UploadBudget, UploadError, read_upload

log = logging.getLogger("captioner.web")

router = APIRouter()

# The same ranges as the CLI and the Python API: the model's generation settings declare them.
_GENERATION_FIELDS = {f.name: f for f in dataclasses.fields(GenerationConfig)}
MAX_BEAM_SIZE = int(bounds_of(_GENERATION_FIELDS["beam_size"]).le)
MAX_LENGTH = int(bounds_of(_GENERATION_FIELDS["max_length"]).le)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed request body",
        408: "The upload did not arrive within the server's upload timeout",
        413: "Upload larger than the server's limit",
        415: f"Not an image, or not {ALLOWED}",
        422: "Missing image field, bad options, or an image that cannot be decoded",
        503: "Server busy (queue, decode queue or memory full), starting or shutting down",
    }.items()
}

_UPLOAD_BODY = {
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
                            "description": f"{ALLOWED} (the first frame or page).",
                        }
                    },
                }
            }
        },
    }
}


@router.head("/healthz", include_in_schema=False)
@router.get(
    "/healthz",
    response_model=HealthResponse,
    tags=["service"],
    responses={503: {"model": HealthResponse, "description": "Starting, or a queue is full"}},
)
async def healthz(request: Request, response: Response) -> HealthResponse:
    """Readiness for a load balancer: HTTP 200 only when a caption request would be taken now.

    HTTP 503 (same body, ``Retry-After: 1``) while the model loads (``status: "starting"``)
    and while the batcher's queue or the decode queue is full (``status: "busy"``), so that a
    balancer sends traffic elsewhere until it drains. ``queue_depth`` / ``max_queue`` and
    ``decode_backlog`` / ``max_decode_queue`` show how close it is, ``memory_in_use_bytes``
    how much of the memory budget uploads and decodes hold.
    """
    state = request.app.state
    settings: ServeSettings = state.settings
    batcher: MicroBatcher | None = state.batcher
    decoder: DecodeQueue | None = state.decoder
    uploads: UploadBudget = state.uploads
    loaded = state.captioner is not None and batcher is not None and decoder is not None
    depth = batcher.stats().waiting if batcher is not None else 0
    decoding = decoder.stats() if decoder is not None else None
    backlog = decoding.backlog if decoding is not None else 0
    full = depth >= settings.max_queue or backlog >= settings.max_decode_queue
    status = "starting" if not loaded else "busy" if full else "ok"
    if status != "ok":
        response.status_code = 503
        response.headers["Retry-After"] = "1"
    return HealthResponse(
        status=status,
        model_loaded=loaded,
        version=service_version(),
        max_upload_bytes=settings.max_upload_bytes,
        queue_depth=depth,
        max_queue=settings.max_queue,
        uploads_in_progress=uploads.in_progress,
        decode_backlog=backlog,
        max_decode_queue=settings.max_decode_queue,
        large_decodes=decoding.heavy if decoding is not None else 0,
        memory_in_use_bytes=uploads.bytes_in_use,
        memory_capacity_bytes=uploads.capacity_bytes,
    )


@router.post(
    "/v1/captions",
    response_model=CaptionResponse,
    tags=["captions"],
    responses=_ERRORS,
    openapi_extra=_UPLOAD_BODY,
)
async def create_caption(
    request: Request,
    beam_size: int = Query(
        3, ge=1, le=MAX_BEAM_SIZE, description="Beam width (1 = greedy), as in the CLI."
    ),
    max_length: int = Query(20, ge=1, le=MAX_LENGTH, description="Most words in a caption."),
    attention: bool = Query(False, description="Also return per-word attention grids."),
) -> CaptionResponse | JSONResponse:
    """Caption one uploaded image (multipart field ``image``)."""
    state = request.app.state
    settings: ServeSettings = state.settings
    batcher: MicroBatcher | None = state.batcher
    decoder: DecodeQueue | None = state.decoder
    if batcher is None or decoder is None or state.captioner is None:
        raise HTTPException(503, "the model is not loaded yet, try again shortly")
    uploads: UploadBudget = state.uploads
    with uploads.track() as handle:  # the body's bytes are given back when this block ends
        try:
            data, filename = await asyncio.wait_for(
                read_upload(request, settings.max_upload_bytes, handle),
                timeout=settings.upload_timeout_s,
            )
        except asyncio.TimeoutError:
            return error_response(
                408,
                f"the upload did not arrive within {settings.upload_timeout_s:g} s; "
                "send the whole body faster or try a smaller picture",
                headers={"Connection": "close"},  # the rest of the body is not wanted
            )
        except UploadError as exc:
            return _upload_error(exc)
        try:
            image = await decoder.decode(data, filename, settings.max_image_side)
        except UploadError as exc:
            return _upload_error(exc)
        except Exception as exc:  # a decoder failure is the image's fault: never a 500
            log.warning("decoding %r failed: %s: %s", filename, type(exc).__name__, exc)
            return error_response(422, f"{filename}: corrupt or unreadable image")
        del data
    try:
        ticket = batcher.admit()  # only decoded images wait here: a full queue answers at once
    except (QueueFullError, BatcherClosedError) as exc:
        return error_response(503, str(exc), headers={"Retry-After": "1"})
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
        return error_response(503, "timed out waiting for the model, try again later")
    except BatcherClosedError as exc:
        return error_response(503, str(exc))
    except CaptionerError as exc:
        return error_response(422, str(exc))
    except Exception:
        log.exception("captioning failed")
        return error_response(500, "internal server error")
    finally:
        batcher.release(ticket)
    return to_response(result, attention)


def _upload_error(exc: UploadError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return error_response(exc.status, exc.message, headers=headers)
