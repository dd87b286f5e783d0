"""API tests for the web service (``captioner serve``) against a FakeCaptioner."""

from __future__ import annotations

import asyncio
import io
import struct
import sys
import threading
import time
import types
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from web_fakes import COLOURS, FakeCaptioner  # noqa: E402

from captioner.errors import CheckpointError  # noqa: E402
from captioner.web.app import (  # noqa: E402
    ServeSettings,
    attention_grid,
    create_app,
    decode_upload,
    to_response,
)
from captioner.web.batching import MicroBatcher, QueueFullError  # noqa: E402

URL = "/v1/captions"


# --------------------------------------------------------------------------- helpers
def encode(colour="red", size=(64, 48), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, fmt)
    return buf.getvalue()


def files(data: bytes, name="photo.png", ctype="image/png", field="image"):
    return {field: (name, data, ctype)}


def make_client(fake=None, **settings) -> tuple[TestClient, FakeCaptioner]:
    fake = fake or FakeCaptioner()
    app = create_app(lambda: fake, ServeSettings(**settings))
    return TestClient(app), fake


@pytest.fixture
def client():
    c, fake = make_client()
    with c:
        c.fake = fake
        yield c


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError("condition not reached in time")


def stats(c: TestClient):
    return c.app.state.batcher.stats()


def png_bomb(width=100_000, height=100_000) -> bytes:
    """A valid PNG header claiming huge dimensions, followed by a tiny IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def multipart(data: bytes, boundary="XyZboundary", name="image") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="a.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


# --------------------------------------------------------------------------- service basics
def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model_loaded"] is True
    assert isinstance(body["version"], str) and body["version"]
    assert body["max_upload_bytes"] == 10 * 1024 * 1024
    assert (body["queue_depth"], body["max_queue"], body["uploads_in_progress"]) == (0, 64, 0)


def test_healthz_is_503_busy_while_the_queue_is_full():
    """A load balancer's readiness check: non-200 while a caption request would get 503."""
    c, fake = held_client(max_queue=2, max_batch_size=4, batch_window_ms=1)
    with c, ThreadPoolExecutor(3) as pool:
        first = pool.submit(c.post, URL, files=files(encode()))
        assert fake.started.wait(5)  # running, so no longer counted as waiting
        waiting = [pool.submit(c.post, URL, files=files(encode("blue"))) for _ in range(2)]
        wait_for(lambda: stats(c).waiting == 2)
        r = c.get("/healthz")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        body = r.json()
        assert body["status"] == "busy" and body["model_loaded"] is True
        assert (body["queue_depth"], body["max_queue"]) == (2, 2)
        fake.gate.set()
        assert all(f.result(timeout=10).status_code == 200 for f in [first, *waiting])
        r = c.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert r.json()["queue_depth"] == 0


def test_page_and_static_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "/static/app.js" in r.text and "/static/style.css" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN
    for asset, kind in [("/static/app.js", "javascript"), ("/static/style.css", "text/css")]:
        r = client.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert client.get("/static/nope.js").status_code == 404


def test_openapi_documents_the_upload(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/captions"]["post"]
    schema = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["properties"]["image"]["format"] == "binary"
    params = {p["name"]: p["schema"] for p in op["parameters"]}
    # the CLI's and the Python API's ranges (issue 22: REST capped the beam at 10, the CLI at 20)
    assert params["beam_size"]["minimum"] == 1 and params["beam_size"]["maximum"] == 20
    assert params["max_length"]["maximum"] == 100
    assert "/healthz" in spec["paths"]
    assert "503" in spec["paths"]["/healthz"]["get"]["responses"]
    assert "408" in op["responses"] and "413" in op["responses"]


def test_no_docs_page_that_loads_a_cdn(client):
    """Issue 22: /docs loaded an unpinned swagger-ui from a CDN; the description stays."""
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    assert client.get("/openapi.json").status_code == 200
    assert "/docs" not in client.get("/").text


def test_not_loaded_before_startup():
    c, _ = make_client()  # no `with`: lifespan has not run
    health = c.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "starting"
    assert health.json()["model_loaded"] is False
    r = c.post(URL, files=files(encode()))
    assert r.status_code == 503 and "not loaded" in r.json()["detail"]


def test_startup_failure_is_kept():
    def broken():
        raise CheckpointError("no model at /nowhere")

    app = create_app(broken, ServeSettings())
    with pytest.raises(CheckpointError), TestClient(app):
        pass
    assert isinstance(app.state.startup_error, CheckpointError)


# --------------------------------------------------------------------------- captions
def test_caption_response(client):
    r = client.post(URL, files=files(encode("red", (64, 48))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["caption"] == "a red picture 64x48 with beam 3"
    assert body["tokens"] == body["caption"].split()
    assert body["score"] == pytest.approx(-0.1)
    assert len(body["alternatives"]) == 3
    assert body["alternatives"][0] == {"caption": body["caption"], "score": pytest.approx(-0.1)}
    assert body["attention"] is None


def test_caption_with_attention(client):
    r = client.post(URL, params={"attention": "true"}, files=files(encode()))
    assert r.status_code == 200
    att = r.json()["attention"]
    tokens = r.json()["tokens"]
    assert att["shape"] == [len(tokens), 7, 7]
    grid = np.array(att["grid"])
    assert grid.shape == (len(tokens), 7, 7)
    np.testing.assert_allclose(grid.sum(axis=(1, 2)), 1.0, atol=1e-3)


def test_options_are_forwarded(client):
    r = client.post(URL, params={"beam_size": 5, "max_length": 4}, files=files(encode()))
    assert r.status_code == 200
    assert len(r.json()["tokens"]) == 4
    assert len(r.json()["alternatives"]) == 5
    call = client.fake.calls[-1]
    assert (call["beam_size"], call["max_length"], call["return_attention"]) == (5, 4, False)


@pytest.mark.parametrize(
    "fmt,ctype",
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("TIFF", "image/tiff"),  # issue 22: the CLI took TIFF and BMP, REST answered 415
        ("BMP", "image/bmp"),
    ],
)
def test_formats(client, fmt, ctype):
    r = client.post(URL, files=files(encode("blue", (40, 30), fmt), f"x.{fmt.lower()}", ctype))
    assert r.status_code == 200, r.text
    assert r.json()["caption"].startswith("a blue picture 40x30")


def test_gif_uses_first_frame(client):
    frames = [Image.new("RGB", (32, 32), COLOURS[c]) for c in ("green", "red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    r = client.post(URL, files=files(buf.getvalue(), "anim.gif", "image/gif"))
    assert r.status_code == 200, r.text
    assert r.json()["caption"].startswith("a green picture 32x32")


def test_big_images_are_shrunk_before_captioning():
    c, fake = make_client(max_image_side=100)
    with c:
        r = c.post(URL, files=files(encode("red", (400, 200))))
    assert r.status_code == 200
    assert "100x50" in r.json()["caption"]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "params",
    [
        {"beam_size": 0},
        {"beam_size": 21},
        {"beam_size": "three"},
        {"max_length": 0},
        {"max_length": 101},
        {"attention": "maybe"},
    ],
)
def test_out_of_range_options(client, params):
    r = client.post(URL, params=params, files=files(encode()))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert isinstance(detail, str) and next(iter(params)) in detail
    assert client.fake.calls == []


def test_empty_body(client):
    r = client.post(URL)
    assert r.status_code == 422
    assert "image" in r.json()["detail"]


def test_missing_field(client):
    r = client.post(URL, files=files(encode(), field="photo"))
    assert r.status_code == 422
    assert "no file field named 'image'" in r.json()["detail"]


def test_empty_file(client):
    r = client.post(URL, files=files(b""))
    assert r.status_code == 422
    assert "empty" in r.json()["detail"]


@pytest.mark.parametrize(
    "data,name,expect",
    [
        (b"hello, this is not a picture\n", "notes.txt", "text"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "doc.pdf", "PDF"),
        (bytes(range(256)) * 4, "random.bin", "not an image"),
        (b"\x00\x00\x01\x00" + b"\x00" * 60, "fav.ico", "ICO"),
    ],
)
def test_unsupported_content(client, data, name, expect):
    r = client.post(URL, files=files(data, name, "application/octet-stream"))
    assert r.status_code == 415
    detail = r.json()["detail"]
    assert expect in detail and name in detail and "JPEG, PNG, WebP, GIF, TIFF or BMP" in detail


def test_image_magic_but_garbage_gets_image_load_error_message(client):
    r = client.post(URL, files=files(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "bad.png"))
    assert r.status_code in (415, 422)
    assert r.json()["detail"].startswith("bad.png:")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(client, fmt):
    data = encode("red", (256, 256), fmt)
    arr = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    data = buf.getvalue()
    r = client.post(URL, files=files(data[: len(data) // 2], f"cut.{fmt.lower()}"))
    assert r.status_code == 422, r.text
    assert "truncated" in r.json()["detail"] or "corrupt" in r.json()["detail"]


def test_decompression_bomb(client):
    start = time.monotonic()
    r = client.post(URL, files=files(png_bomb(), "bomb.png"))
    assert time.monotonic() - start < 5
    assert r.status_code == 422
    assert "too large" in r.json()["detail"] or "limit" in r.json()["detail"]
    assert client.fake.calls == []


def test_upload_too_large_by_content_length():
    c, fake = make_client(max_upload_mb=0.05)
    big = (np.random.default_rng(1).random((300, 300, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    assert len(buf.getvalue()) > 0.05 * 1024 * 1024 + 64 * 1024
    with c:
        r = c.post(URL, files=files(buf.getvalue()))
        assert r.status_code == 413
        assert "0.05 MB" in r.json()["detail"]
        assert c.post(URL, files=files(encode())).status_code == 200


def test_upload_too_large_while_streaming():
    """No Content-Length (chunked): the limit is enforced while the body is read."""
    c, fake = make_client(max_upload_mb=0.01)
    body = multipart(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200_000)

    def chunks():
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    with c:
        r = c.post(
            URL,
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=XyZboundary"},
        )
        assert r.status_code == 413
        assert fake.calls == []
        # the part itself is limited too, even when the body limit has slack
        small = multipart(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20_000)
        r = c.post(
            URL,
            content=small,
            headers={"content-type": "multipart/form-data; boundary=XyZboundary"},
        )
        assert r.status_code == 413


def test_raw_image_body_is_not_multipart(client):
    r = client.post(URL, content=encode(), headers={"content-type": "image/png"})
    assert r.status_code == 415
    assert "multipart/form-data" in r.json()["detail"]


def test_malformed_multipart(client):
    body = multipart(encode())[:-8]  # no closing boundary
    headers = {"content-type": "multipart/form-data; boundary=XyZboundary"}
    r = client.post(URL, content=body, headers=headers)
    assert r.status_code == 400
    r = client.post(URL, content=body, headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["detail"]


def test_bad_inputs_never_wedge_the_service(client):
    bad = [
        files(b""),
        files(b"plain text"),
        files(png_bomb(), "bomb.png"),
        files(encode()[:40], "cut.png"),
    ]
    for f in bad * 3:
        assert 400 <= client.post(URL, files=f).status_code < 500
    assert stats(client).waiting == 0
    r = client.post(URL, files=files(encode("green", (10, 20))))
    assert r.status_code == 200 and "green picture 10x20" in r.json()["caption"]


# --------------------------------------------------------------------------- micro-batching
def post_concurrently(c: TestClient, jobs: list[dict]) -> list:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(c.post, URL, **job) for job in jobs]
        return [f.result(timeout=30) for f in futures]


def held_client(**settings):
    """A client whose fake blocks in caption() until fake.gate is set."""
    fake = FakeCaptioner()
    fake.gate = threading.Event()
    c, _ = make_client(fake, **settings)
    return c, fake


def test_concurrent_requests_are_batched_and_routed():
    c, fake = held_client(max_batch_size=8, batch_window_ms=5)
    with c, ThreadPoolExecutor(8) as pool:
        first = pool.submit(c.post, URL, files=files(encode("grey", (9, 9))))
        assert fake.started.wait(5)  # the worker is now busy with the first request
        sizes = [(10 + i, 20 + i) for i in range(6)]
        colours = ["red", "green", "blue", "yellow", "white", "black"]
        futures = [
            pool.submit(c.post, URL, files=files(encode(col, size)))
            for col, size in zip(colours, sizes, strict=True)
        ]
        wait_for(lambda: stats(c).queued == 6)
        fake.gate.set()
        results = [f.result(timeout=10) for f in futures]
        assert first.result(timeout=10).status_code == 200
    assert fake.batch_sizes == [1, 6]
    for r, col, (w, h) in zip(results, colours, sizes, strict=True):
        assert r.status_code == 200
        assert r.json()["caption"].startswith(f"a {col} picture {w}x{h}")


def test_batches_respect_max_batch_size():
    c, fake = held_client(max_batch_size=4, batch_window_ms=5)
    with c, ThreadPoolExecutor(11) as pool:
        first = pool.submit(c.post, URL, files=files(encode()))
        assert fake.started.wait(5)
        futures = [
            pool.submit(c.post, URL, files=files(encode("red", (5 + i, 5)))) for i in range(10)
        ]
        wait_for(lambda: stats(c).queued == 10)
        fake.gate.set()
        results = [f.result(timeout=10) for f in futures]
        first.result(timeout=10)
    assert fake.batch_sizes == [1, 4, 4, 2]
    for i, r in enumerate(results):
        assert f"{5 + i}x5" in r.json()["caption"]


def test_different_options_are_batched_separately():
    c, fake = held_client(max_batch_size=8, batch_window_ms=5)
    with c, ThreadPoolExecutor(8) as pool:
        first = pool.submit(c.post, URL, files=files(encode()))
        assert fake.started.wait(5)
        jobs = []
        for i in range(6):
            beam = 2 if i % 2 else 4
            size = (30 + i, 30)
            jobs.append((beam, size))
        futures = [
            pool.submit(
                c.post,
                URL,
                params={"beam_size": beam, "attention": str(i == 0).lower()},
                files=files(encode("blue", size)),
            )
            for i, (beam, size) in enumerate(jobs)
        ]
        wait_for(lambda: stats(c).queued == 6)
        fake.gate.set()
        results = [f.result(timeout=10) for f in futures]
        first.result(timeout=10)
    assert sorted(fake.batch_sizes) == [1, 3, 3]
    for call in fake.calls[1:]:
        assert call["batch_size"] == 3 and call["beam_size"] in (2, 4)
    for i, (r, (beam, (w, h))) in enumerate(zip(results, jobs, strict=True)):
        body = r.json()
        assert body["caption"] == f"a blue picture {w}x{h} with beam {beam}"
        assert len(body["alternatives"]) == beam
        assert (body["attention"] is not None) == (i == 0)  # only who asked gets attention


def test_batching_off_with_batch_size_one():
    c, fake = make_client(FakeCaptioner(delay_s=0.01), max_batch_size=1)
    with c:
        results = post_concurrently(c, [{"files": files(encode())} for _ in range(8)])
    assert all(r.status_code == 200 for r in results)
    assert fake.batch_sizes == [1] * 8


def test_batching_without_a_gate_under_load():
    c, fake = make_client(FakeCaptioner(delay_s=0.05), max_batch_size=8, batch_window_ms=20)
    with c:
        results = post_concurrently(c, [{"files": files(encode())} for _ in range(12)])
    assert all(r.status_code == 200 for r in results)
    assert sum(fake.batch_sizes) == 12 and max(fake.batch_sizes) > 1


def test_queue_full_gives_503_quickly():
    c, fake = held_client(max_queue=2, max_batch_size=4, batch_window_ms=1)
    with c, ThreadPoolExecutor(4) as pool:
        first = pool.submit(c.post, URL, files=files(encode()))
        assert fake.started.wait(5)
        waiting = [pool.submit(c.post, URL, files=files(encode("blue"))) for _ in range(2)]
        wait_for(lambda: stats(c).waiting == 2)
        start = time.monotonic()
        r = c.post(URL, files=files(encode("green")))
        elapsed = time.monotonic() - start
        assert r.status_code == 503
        assert "busy" in r.json()["detail"] and r.headers["retry-after"] == "1"
        assert elapsed < 1.0
        fake.gate.set()
        assert first.result(timeout=10).status_code == 200
        assert all(f.result(timeout=10).status_code == 200 for f in waiting)
        assert stats(c).rejected == 1
        assert c.post(URL, files=files(encode())).status_code == 200  # capacity is back


def test_one_bad_image_does_not_fail_its_batch():
    fake = FakeCaptioner()
    fake.gate = threading.Event()
    fake.fail_on_colour = "blue"
    c, _ = make_client(fake, max_batch_size=8, batch_window_ms=5)
    with c, ThreadPoolExecutor(4) as pool:
        first = pool.submit(c.post, URL, files=files(encode()))
        assert fake.started.wait(5)
        cols = ["red", "blue", "green"]
        futures = [pool.submit(c.post, URL, files=files(encode(col))) for col in cols]
        wait_for(lambda: stats(c).queued == 3)
        fake.gate.set()
        results = dict(zip(cols, (f.result(timeout=10) for f in futures), strict=True))
        first.result(timeout=10)
    assert results["red"].status_code == 200 and "red" in results["red"].json()["caption"]
    assert results["green"].status_code == 200 and "green" in results["green"].json()["caption"]
    assert results["blue"].status_code == 422
    assert "fake failure" in results["blue"].json()["detail"]


def test_unexpected_captioner_error_is_a_json_500():
    class Broken(FakeCaptioner):
        def caption(self, images, **kw):
            raise RuntimeError("boom")

    c, _ = make_client(Broken())
    with c:
        r = c.post(URL, files=files(encode()))
        assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
        assert stats(c).waiting == 0


# --------------------------------------------------------------------------- batcher directly
def test_batcher_window_collects_staggered_requests():
    async def main():
        fake = FakeCaptioner()
        async with MicroBatcher(fake, max_batch_size=8, window_s=0.2) as batcher:
            img = np.zeros((8, 8, 3), np.uint8)

            async def later(delay):
                await asyncio.sleep(delay)
                return await batcher.caption(img)

            await asyncio.gather(*(later(0.02 * i) for i in range(4)))
        return fake.batch_sizes

    assert asyncio.run(main()) == [4]


def test_batcher_skips_abandoned_requests_and_bounds_the_queue():
    async def main():
        fake = FakeCaptioner()
        fake.gate = threading.Event()
        async with MicroBatcher(fake, max_batch_size=8, window_s=0.0, max_queue=3) as batcher:
            img = np.zeros((8, 8, 3), np.uint8)
            first = asyncio.create_task(batcher.caption(img))
            while not fake.started.is_set():
                await asyncio.sleep(0.005)
            tasks = [asyncio.create_task(batcher.caption(img)) for _ in range(3)]
            await asyncio.sleep(0.02)
            with pytest.raises(QueueFullError):
                batcher.admit()
            tasks[0].cancel()  # the client went away
            await asyncio.sleep(0.01)
            assert batcher.stats().waiting == 2
            fake.gate.set()
            await first
            await asyncio.gather(*tasks[1:])
        return fake.batch_sizes

    assert asyncio.run(main()) == [1, 2]


# --------------------------------------------------------------------------- conversion
def test_to_response_sanitises_scores_and_flat_attention():
    class R:
        caption = "a b"
        tokens = ["a", "b"]
        score = float("-inf")
        attention = np.full((3, 16), 1 / 16, np.float32)  # (T, P), one row too many
        alternatives = [("a b", float("nan")), ("a c", -1.5)]

    body = to_response(R(), attention=True)
    assert body.score is None
    assert [a.score for a in body.alternatives] == [None, -1.5]
    assert body.attention.shape == [2, 4, 4]
    assert to_response(R(), attention=False).attention is None
    assert attention_grid(np.ones((2, 5)), 2) is None  # not a square grid


def test_decode_upload_rejects_unknown_formats_without_pillow():
    from captioner.web.app import UploadError

    with pytest.raises(UploadError) as info:
        decode_upload(b"%!PS-Adobe-3.0 EPSF", "x.eps")
    assert info.value.status == 415 and "PostScript" in info.value.message


# --------------------------------------------------------------------------- CLI
def test_register_adds_serve_command():
    import typer
    from typer.testing import CliRunner

    from captioner.cli.serve import register

    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command so "serve" is a sub-command
        pass

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in (
        "--model",
        "--host",
        "--port",
        "--max-upload-mb",
        "--max-batch-size",
        "--batch-window-ms",
        "--max-queue",
        "--workers",
        "--header-timeout",
    ):
        assert option in result.output
    bad = CliRunner().invoke(app, ["serve", "--max-batch-size", "0"])
    assert bad.exit_code != 0


def test_serve_raises_the_model_loading_error(monkeypatch):
    from captioner.cli.serve import serve

    class Captioner:
        @classmethod
        def from_pretrained(cls, path=None, backend="auto", **_settings):
            raise CheckpointError(f"no saved model at {path}")

    monkeypatch.setitem(sys.modules, "captioner.api", types.SimpleNamespace(Captioner=Captioner))
    with pytest.raises(CheckpointError, match="no saved model at /missing"):
        serve("/missing", port=0, log_level="critical")


@pytest.fixture
def busy_port():
    """A port on 127.0.0.1 that another server is listening on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_serve_on_a_busy_port_fails_before_loading_the_model(monkeypatch, busy_port):
    from captioner.cli.serve import serve
    from captioner.errors import ConfigError

    loaded = []

    class Captioner:
        @classmethod
        def from_pretrained(cls, path=None, backend="auto", **_settings):
            loaded.append(path)
            return FakeCaptioner()

    monkeypatch.setitem(sys.modules, "captioner.api", types.SimpleNamespace(Captioner=Captioner))
    with pytest.raises(ConfigError, match=f"127.0.0.1:{busy_port}: the port is already in use"):
        serve(port=busy_port, log_level="critical")
    assert loaded == []


def test_serve_command_on_a_busy_port_is_one_clear_line(monkeypatch, busy_port):
    import typer
    from typer.testing import CliRunner

    from captioner.cli.serve import register

    def never_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded when the port is busy")

    api = types.SimpleNamespace(Captioner=types.SimpleNamespace(from_pretrained=never_load))
    monkeypatch.setitem(sys.modules, "captioner.api", api)
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)

    @app.command()
    def other() -> None:
        pass

    result = CliRunner().invoke(app, ["serve", "--port", str(busy_port)])
    assert result.exit_code == 2, result.output
    assert "already in use" in result.output and "--port" in result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
