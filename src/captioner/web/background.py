"""Run the web app under uvicorn in a background thread of the current process.

For code that drives the real app from the same process (the browser tests, the load benchmark,
the screenshot script): it gets a free loopback port, waits until the app has started (the model
is loaded by then), and shuts the server down on exit.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from captioner.web.server import uvicorn_config
from captioner.web.settings import ServeSettings


class BackgroundServer:
    """``with BackgroundServer(app) as server: ... server.url ...``"""

    def __init__(
        self,
        app: FastAPI,
        *,
        log_level: str = "warning",
        start_timeout_s: float = 120.0,
        backlog: int = 2048,
    ) -> None:
        self.app = app
        self.start_timeout_s = start_timeout_s
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # accepted sockets inherit this; without it (uvicorn given a socket) Nagle + delayed ACK
        # add ~40 ms to every keep-alive response
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        settings = getattr(app.state, "settings", None) or ServeSettings()
        config = uvicorn_config(
            app, header_timeout_s=settings.header_timeout_s, log_level=log_level, backlog=backlog
        )
        self.server = uvicorn.Server(config)
        self.exit_code: int | str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except SystemExit as exc:  # uvicorn's way out when the app's startup fails
            self.exit_code = exc.code

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                alive = self.thread.is_alive()
                self.__exit__()
                if self.exit_code is not None:
                    why = f"its startup failed (exit code {self.exit_code}; see the log above)"
                elif not alive:
                    why = "its server thread stopped (see the log above)"
                else:
                    why = f"not within {self.start_timeout_s} s"
                raise RuntimeError(f"the web app did not start: {why}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
