"""Slow uploads against the real app under uvicorn (loopback only, FakeCaptioner).

A client that trickles its body must not hold a place in the batcher's queue, must be cut off
with a 408 once the upload timeout has passed, and must not keep good requests from a 200.
"""

from __future__ import annotations

import io
import select
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from web_fakes import COLOURS, FakeCaptioner  # noqa: E402

from captioner.web.app import ServeSettings, create_app  # noqa: E402
from captioner.web.background import BackgroundServer  # noqa: E402

URL = "/v1/captions"
BOUNDARY = "SlowBoundary"


def png(colour: str = "red", size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, "PNG")
    return buf.getvalue()


def multipart_body(data: bytes) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def start_upload(url: str, body: bytes, send: int) -> socket.socket:
    """Open a raw connection, send the headers and the first ``send`` bytes of ``body``."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST {URL} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[:send])
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status code and everything the server sent until it closed the connection."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    raw = b"".join(chunks)
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split(b" ", 2)[1]), raw


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def server():
    fake = FakeCaptioner()
    settings = ServeSettings(max_queue=2, upload_timeout_s=1.0)
    app = create_app(lambda: fake, settings)
    with BackgroundServer(app, start_timeout_s=20) as srv:
        srv.app = app
        yield srv


def test_slow_uploads_do_not_lock_out_good_requests(server):
    body = multipart_body(png())
    slow = [start_upload(server.url, body, send=40) for _ in range(6)]  # 3 x max_queue
    stop = threading.Event()
    trickler = threading.Thread(target=trickle, args=(slow[0], body[40:60], stop), daemon=True)
    trickler.start()  # one keeps sending a byte now and then: the timeout is for the whole body
    try:
        uploads = server.app.state.uploads
        wait_for(lambda: uploads.in_progress == len(slow))  # all six are being read
        with httpx.Client(base_url=server.url, timeout=5) as client:
            health = client.get("/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            good = client.post(URL, files={"image": ("g.png", png("green"), "image/png")})
            assert good.status_code == 200, good.text
            assert good.json()["caption"].startswith("a green picture 32x24")
            assert health.json()["queue_depth"] == 0
        started = time.monotonic()
        for sock in slow:
            status, raw = read_response(sock)  # the server closes after answering
            assert status == 408
            assert b"did not arrive within 1 s" in raw
        assert time.monotonic() - started < 5  # cut off by the 1 s timeout, not by the client
        wait_for(lambda: uploads.in_progress == 0 and uploads.bytes_in_use == 0)
    finally:
        stop.set()
        trickler.join(timeout=5)
        for sock in slow:
            sock.close()


def trickle(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    """Send ``data`` one byte every 0.1 s until stopped or the server answers or hangs up.

    It stops once the answer is there: a byte sent after the server closed the socket makes
    the kernel answer with a reset, which discards the 408 not yet read (a flaky failure).
    """
    for i in range(len(data)):
        if stop.wait(0.1) or select.select([sock], [], [], 0)[0]:
            return
        try:
            sock.sendall(data[i : i + 1])
        except OSError:
            return


def test_a_complete_upload_sent_in_pieces_within_the_timeout_is_fine(server):
    body = multipart_body(png("blue"))
    sock = start_upload(server.url, body, send=len(body) // 2)
    try:
        sock.sendall(body[len(body) // 2 :])
        status, raw = read_response_until_body(sock)
        assert status == 200 and b"a blue picture 32x24" in raw
    finally:
        sock.close()


def read_response_until_body(sock: socket.socket) -> tuple[int, bytes]:
    """A keep-alive response: read until the JSON body (Content-Length) is complete."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536)
    head, _, rest = raw.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ", 2)[1]), head + b"\r\n\r\n" + rest


def test_upload_memory_budget_answers_503_while_others_hold_it():
    fake = FakeCaptioner()
    # room for one upload of the largest size, not two
    settings = ServeSettings(max_upload_mb=0.1, upload_memory_mb=0.15, upload_timeout_s=5.0)
    app = create_app(lambda: fake, settings)
    big = multipart_body(png() + b"\x00" * 90_000)  # a PNG with trailing bytes, ~90 kB
    with BackgroundServer(app, start_timeout_s=20) as srv:
        holder = start_upload(srv.url, big, send=len(big) - 10)  # held just before its end
        try:
            uploads = app.state.uploads
            wait_for(lambda: uploads.bytes_in_use >= len(big) - 10_000)
            with httpx.Client(base_url=srv.url, timeout=5) as client:
                r = client.post(URL, files={"image": ("b.png", png() + b"\0" * 90_000)})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert "uploads in progress" in r.json()["detail"]
                small = client.post(URL, files={"image": ("s.png", png("white"), "image/png")})
                assert small.status_code == 200, small.text
            holder.sendall(big[-10:])
            status, _ = read_response_until_body(holder)
            assert status == 200
        finally:
            holder.close()
        wait_for(lambda: uploads.bytes_in_use == 0)
