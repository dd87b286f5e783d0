"""``captioner serve``: the web service and demo page (FastAPI + uvicorn)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

import typer

from captioner.cli.common import friendly_errors
from captioner.cli.inference_options import PRECISION_HELP
from captioner.devices import resolve_device
from captioner.errors import ConfigError
from captioner.features.quantize import DEFAULT_PRECISION, check_precision
from captioner.settings import cap_threads

log = logging.getLogger(__name__)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = 10,
    max_batch_size: int = 8,
    batch_window_ms: float = 10,
    max_queue: int = 64,
    workers: int = 1,
    decode_threads: int = 2,
    backend: str = "auto",
    log_level: str = "info",
    upload_timeout_s: float = 60,
    header_timeout_s: float = 10,
    precision: str = DEFAULT_PRECISION,
    device: str = "auto",
) -> None:
    """Load the model (in the app's startup) and serve until interrupted.

    ``model`` is a saved model directory (None: the bundled default). ``workers`` is the number
    of inference threads (batches that may run at once); ``max_batch_size=1`` turns
    micro-batching off. The port is taken before the model loads, so a busy port fails at once
    (ConfigError), and so does a ``device`` "cuda" without a GPU. Raises the model's loading
    error (a CaptionerError such as CheckpointError) if startup fails, so the CLI can map it to
    an exit code.
    """
    import uvicorn

    from captioner.web.app import ServeSettings, create_app
    from captioner.web.server import uvicorn_config

    # more threads than cores only contend (the probe's 999 ran 250x slower): the excess goes
    workers = cap_threads(workers, "--workers", log=_note)
    decode_threads = cap_threads(decode_threads, "--decode-threads", log=_note)
    settings = ServeSettings(
        max_upload_mb=max_upload_mb,
        max_batch_size=max_batch_size,
        batch_window_ms=batch_window_ms,
        max_queue=max_queue,
        workers=workers,
        decode_threads=decode_threads,
        upload_timeout_s=upload_timeout_s,
        header_timeout_s=header_timeout_s,
    )
    check_precision(precision)
    resolve_device(device)  # before the port and the model: a missing GPU is one clear error
    check_port(host, port)  # before loading the model: a busy port is an error at once

    if log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
    from captioner.api import Captioner

    # loaded here, not in the app's startup: a bad --model or --backend is then one clear
    # error, where uvicorn would print the startup's traceback before it
    captioner = Captioner.from_pretrained(
        model, backend=backend, precision=precision, device=device
    )
    app = create_app(lambda: captioner, settings)
    if not _is_loopback(host):
        log.warning(
            "serving on %s: reachable from other machines; the service has no authentication",
            host,
        )
    config = uvicorn_config(
        app,
        header_timeout_s=settings.header_timeout_s,
        host=host,
        port=port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when the lifespan startup failed
        if getattr(app.state, "startup_error", None) is None:
            raise
    error = getattr(app.state, "startup_error", None)
    if error is not None:
        raise error
    if not server.started:
        raise RuntimeError(f"the server did not start on {host}:{port} (see the log above)")


def _note(message: str) -> None:
    typer.echo(message, err=True)


def check_port(host: str, port: int) -> None:
    """Raise ConfigError when uvicorn could not listen on host:port (in use, no such address).

    A trial bind with SO_REUSEADDR, as uvicorn binds: a port held by a listening server fails,
    one in TIME_WAIT does not. The port is released again at once, for uvicorn to take.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: unknown host ({exc.strerror})"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            why = "the port is already in use (another server?); stop it or pick another --port"
        else:
            why = exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None
    sock.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to the main Typer app."""

    @app.command(
        "serve",
        help=(
            "Serve the captioning web page and JSON API (POST /v1/captions, GET /healthz, "
            "OpenAPI description at /openapi.json). Listens on 127.0.0.1 unless --host says "
            "otherwise."
        ),
    )
    @friendly_errors
    def serve_command(
        model: str = typer.Option(
            None,
            "--model",
            "-m",
            help="Saved model directory (from training). Default: the bundled pretrained model.",
        ),
        host: str = typer.Option(
            "127.0.0.1", help="Interface to listen on; 0.0.0.0 exposes it to the network."
        ),
        port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free port)."),
        max_upload_mb: float = typer.Option(
            10.0, min=0.01, max=1024, help="Largest accepted upload in MB (larger: HTTP 413)."
        ),
        max_batch_size: int = typer.Option(
            8, min=1, max=256, help="Most requests captioned in one batch; 1 turns batching off."
        ),
        batch_window_ms: float = typer.Option(
            10.0, min=0, max=1000, help="How long a batch waits to fill, in milliseconds."
        ),
        max_queue: int = typer.Option(
            64, min=1, max=100_000, help="Requests allowed to wait; more get HTTP 503 at once."
        ),
        workers: int = typer.Option(
            1, min=1, max=64, help="Inference threads (batches that may run at the same time)."
        ),
        decode_threads: int = typer.Option(
            2, min=1, max=64, help="Threads that decode uploaded images."
        ),
        backend: str = typer.Option(
            "auto", help="Inference backend passed to Captioner.from_pretrained (auto/onnx/torch)."
        ),
        log_level: str = typer.Option(
            "info", help="uvicorn log level (critical, error, warning, info, debug)."
        ),
        upload_timeout: float = typer.Option(
            60.0, min=0.1, max=3600, help="Seconds an upload may take to arrive (slower: 408)."
        ),
        header_timeout: float = typer.Option(
            10.0,
            min=0.1,
            max=600,
            help="Seconds a request's headers may take to arrive (slower: connection closed).",
        ),
        precision: str = typer.Option(DEFAULT_PRECISION, help=PRECISION_HELP),
        device: str = typer.Option(
            "auto",
            help="auto (a CUDA GPU if visible), cpu or cuda (PyTorch on the GPU; ONNX is CPU "
            "only).",
        ),
    ) -> None:
        serve(
            model=model,
            host=host,
            port=port,
            max_upload_mb=max_upload_mb,
            max_batch_size=max_batch_size,
            batch_window_ms=batch_window_ms,
            max_queue=max_queue,
            workers=workers,
            decode_threads=decode_threads,
            backend=backend,
            log_level=log_level,
            upload_timeout_s=upload_timeout,
            header_timeout_s=header_timeout,
            precision=precision,
            device=device,
        )
