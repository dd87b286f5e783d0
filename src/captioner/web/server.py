"""How uvicorn runs the app (``captioner serve`` and :mod:`captioner.web.background` alike).

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, and the app cuts off
a body that arrives too slowly (``upload_timeout_s`` -> 408), but nothing bounds the time a
client may take to send a request's *headers*: a probe held 2,000 connections open for 43 s by
trickling header bytes. :class:`HeaderTimeoutH11Protocol` closes a connection whose request
line and headers have not all arrived within ``header_timeout_s`` of its first byte (or of the
connection being opened). It also closes gracefully a connection answered before its body
ended (a 408): see :class:`_LingeringTransport`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

KEEP_ALIVE_S = 5
LINGER_S = 2.0


class _LingeringTransport:
    """The socket transport, except that closing it while the client is still sending a body
    (a 408 or 413 answered before the body ended) first only ends our side and reads on for
    up to LINGER_S: closing a socket with unread data makes the kernel send a reset, which
    destroys the answer the client has not read yet."""

    def __init__(self, transport: asyncio.Transport, protocol: HeaderTimeoutH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.lingering = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        if self._protocol.conn.their_state is not h11.SEND_BODY or not self.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        try:
            self._transport.write_eof()  # our answer, then FIN; their bytes are still read
            self._transport.resume_reading()
        except (OSError, RuntimeError):
            self._transport.close()
            return
        self._timer = self._protocol.loop.call_later(LINGER_S, self.close_now)

    def close_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport.close()


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that send a request's headers too slowly
    (and closing gracefully those that are still sending a body nobody will read)."""

    header_timeout_s = 10.0

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._arm_header_timer()

    def eof_received(self) -> bool | None:
        if self.transport.lingering:  # the client has finished too: close now
            self.transport.close_now()
        return None

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:
            return  # the rest of a body nobody reads
        if self.conn.their_state is h11.IDLE:  # a request is starting: its headers have a limit
            self._arm_header_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are all here
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)
        if self.transport.lingering:
            self.transport.close_now()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.debug("closing a connection that did not send its headers in time")
            self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class with this header timeout (uvicorn takes a class, not an instance)."""
    if not seconds > 0:
        raise ValueError("header_timeout_s must be > 0")
    return type(
        "HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": seconds}
    )


def uvicorn_config(app: Any, *, header_timeout_s: float, **options: Any) -> uvicorn.Config:
    """uvicorn's Config with this project's connection limits (h11, header timeout, short
    keep-alive, no Server header); ``options`` are passed on (host, port, log_level...)."""
    options.setdefault("timeout_keep_alive", KEEP_ALIVE_S)
    return uvicorn.Config(
        app,
        http=header_timeout_protocol(header_timeout_s),
        lifespan="on",
        server_header=False,
        **options,
    )
