"""Pydantic models for the JSON the web service returns (and documents in OpenAPI)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Alternative(BaseModel):
    caption: str = Field(description="One finished beam, as text.")
    score: float | None = Field(description="Length-normalised log-probability (higher is better).")


class Attention(BaseModel):
    grid: list[list[list[float]]] = Field(
        description="Per-token attention over the image grid: grid[t][row][col], rows sum to 1."
    )
    shape: list[int] = Field(description="[T, g, g]: tokens, grid rows, grid columns.")


class CaptionResponse(BaseModel):
    caption: str = Field(description="The best caption.", examples=["a dog runs through the snow"])
    score: float | None = Field(description="Length-normalised log-probability of the best beam.")
    alternatives: list[Alternative] = Field(description="All finished beams, best first.")
    tokens: list[str] = Field(description="The words of the best caption.")
    attention: Attention | None = Field(
        default=None, description="Present when the request asked for attention=true."
    )


class HealthResponse(BaseModel):
    status: str = Field(description='"ok" when the model is loaded, otherwise "starting".')
    model_loaded: bool
    version: str
    max_upload_bytes: int = Field(description="Largest upload the server accepts, in bytes.")


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong, in words meant for a person.")
