"""The JSON the web service returns (and documents in OpenAPI), and how a result becomes it.

The caption response lives here and only here: a new field is one field on
:class:`CaptionResponse` plus one line in :func:`to_response`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field


class Alternative(BaseModel):
    caption: str = Field(description="One finished beam, as text.")
    score: float | None = Field(description="Length-normalised log-probability (higher is better).")


class Attention(BaseModel):
    grid: list[list[list[float]]] = Field(
        description="Per-token attention over the image grid: grid[t][row][col], rows sum to 1."
    )
    shape: list[int] = Field(description="[T, g, g]: tokens, grid rows, grid columns.")


class Concept(BaseModel):
    word: str = Field(description="An everyday word for what the encoder sees.", examples=["cat"])
    probability: float = Field(description="Summed probability of its ImageNet classes.")


class CaptionResponse(BaseModel):
    caption: str = Field(description="The best caption.", examples=["a dog runs through the snow"])
    score: float | None = Field(description="Length-normalised log-probability of the best beam.")
    alternatives: list[Alternative] = Field(description="All finished beams, best first.")
    tokens: list[str] = Field(description="The words of the best caption.")
    attention: Attention | None = Field(
        default=None, description="Present when the request asked for attention=true."
    )
    concepts: list[Concept] = Field(
        default_factory=list,
        description="What the encoder's ImageNet head sees, best first (grounded models).",
    )
    in_domain: float | None = Field(
        default=None,
        description="Share of held-out training photos at least as unusual as this one (0-1); "
        "null when the model has no grounding.",
    )
    out_of_domain: bool = Field(
        default=False,
        description="The photo is unlike the training photos: the caption may well be wrong.",
    )
    short: bool = Field(
        default=False,
        description='The caption is a short description ("a cat"): the evidence supports '
        "no full sentence; the decoder's sentence is the first alternative.",
    )


class HealthResponse(BaseModel):
    status: Literal["ok", "starting", "busy"] = Field(
        description=(
            '"ok" (HTTP 200): ready for a caption request. "starting" (HTTP 503): the model is '
            'still loading. "busy" (HTTP 503): the queue or the decode queue is full, a caption '
            "request now would get 503 too."
        )
    )
    model_loaded: bool
    version: str
    max_upload_bytes: int = Field(description="Largest upload the server accepts, in bytes.")
    queue_depth: int = Field(
        default=0, description="Decoded requests waiting for the model (at most max_queue)."
    )
    max_queue: int = Field(default=0, description="Queue size beyond which requests get 503.")
    uploads_in_progress: int = Field(
        default=0, description="Requests whose body is being received or decoded."
    )
    decode_backlog: int = Field(
        default=0, description="Uploads decoding or waiting to decode (at most max_decode_queue)."
    )
    max_decode_queue: int = Field(default=0, description="Decode backlog beyond which: 503.")
    large_decodes: int = Field(
        default=0, description="Of the decode backlog, images over 4 MP (decoded one at a time)."
    )
    memory_in_use_bytes: int = Field(
        default=0, description="Upload bytes and decoded pixels held by requests in progress."
    )
    memory_capacity_bytes: int = Field(default=0, description="Beyond this, requests get 503.")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong, in words meant for a person.")


# --------------------------------------------------------------------------- conversion
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
        array = array.reshape(array.shape[0], side, side)  # (T, g, g)
    if array.ndim != 3 or array.shape[1] != array.shape[2]:
        return None
    array = np.nan_to_num(array[:n_tokens], nan=0.0, posinf=0.0, neginf=0.0)
    grid = np.round(array.astype(np.float64), 5).tolist()
    return Attention(grid=grid, shape=list(array.shape))


def to_response(result: Any, attention: bool) -> CaptionResponse:
    """A CaptionResult (or anything shaped like one) -> the JSON body, with finite scores."""
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
        concepts=[
            Concept(word=str(w), probability=_finite(p) or 0.0)
            for w, p in (getattr(result, "concepts", None) or [])
        ],
        in_domain=_finite(getattr(result, "in_domain", None)),
        out_of_domain=bool(getattr(result, "out_of_domain", False)),
        short=bool(getattr(result, "short", False)),
    )
