"""BackgroundServer: the real app on a free loopback port, reachable inside the block, gone after,
and a startup failure is an error instead of a hang."""

from __future__ import annotations

import contextlib

import httpx
import pytest
from fastapi import FastAPI

from captioner.web.background import BackgroundServer


def test_serves_on_loopback_inside_the_block_and_stops_after():
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict:
        return {"ok": True}

    with BackgroundServer(app) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert httpx.get(server.url + "/ping", timeout=5).json() == {"ok": True}
    assert not server.thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/ping", timeout=2)


def test_a_failing_startup_raises_instead_of_waiting():
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        raise RuntimeError("model failed to load")
        yield

    with pytest.raises(RuntimeError, match="did not start: its startup failed"):
        with BackgroundServer(FastAPI(lifespan=lifespan), start_timeout_s=20):
            pass
