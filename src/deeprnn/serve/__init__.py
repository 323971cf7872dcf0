"""``deeprnn serve``: a local web playground and HTTP API for trained models.

FastAPI and uvicorn are optional (``pip install 'deeprnn[serve]'``): this module imports neither, so
the command line can always register the subcommand; :mod:`deeprnn.serve.app` imports them when a
server is actually built.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from deeprnn.errors import ConfigError, DeepRNNError

INSTALL_HINT = "the web playground needs FastAPI and uvicorn: pip install 'deeprnn[serve]'"


def create_app(paths: str | os.PathLike | list[str | os.PathLike], **kwargs: Any):
    """Build the ASGI app for ``paths`` (runs, checkpoints or directories of runs).

    See :func:`deeprnn.serve.app.create_app` for the keyword arguments. Raises :class:`DeepRNNError`
    with the install hint when FastAPI is missing, :class:`~deeprnn.errors.CheckpointError` when a
    path holds no usable checkpoint.
    """
    try:
        from deeprnn.serve.app import create_app as _create_app
    except ImportError as e:
        if getattr(e, "name", None) in ("fastapi", "starlette", "pydantic"):
            raise DeepRNNError(INSTALL_HINT) from None
        raise
    return _create_app(paths, **kwargs)


def cmd_serve(args: argparse.Namespace) -> int:
    """The ``serve`` subcommand: build the app, print its address, run uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise DeepRNNError(INSTALL_HINT) from None
    if args.torch_threads < 1:
        raise DeepRNNError(f"--torch-threads must be >= 1, got {args.torch_threads}")
    if not 0 <= args.rescan < float("inf"):  # nan too
        raise ConfigError(f"--rescan must be a number of seconds >= 0 (0: load the models once), got {args.rescan}")
    import torch

    from deeprnn.train import resolve_device

    # The check train, generate and evaluate make, before the port's (create_app makes it again for library
    # callers; here it must come first, so that a missing device is reported even when the port is taken).
    device = str(resolve_device(args.device))
    check_port_free(args.host, args.port)  # before loading models; uvicorn binds it again at start

    # The process is ours: parallelism comes from the generation workers, and a small RNN step split
    # across busy cores only adds synchronisation (see deeprnn.generate).
    torch.set_num_threads(args.torch_threads)
    log_to_stderr(args.log_level)  # the models added, reloaded or dropped as the server looks again
    app = create_app(args.paths, device=device, workers=args.workers, max_queue=args.max_queue, rescan=args.rescan)
    models = app.state.registry.ids()
    print(f"deeprnn serve: {len(models)} model(s): {', '.join(models)}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"deeprnn serve: warning: listening on {args.host}, reachable from other machines")
    url = f"http://{_url_host(args.host)}:{args.port}/"
    print(f"deeprnn serve: open {url}  (OpenAPI schema at {url}openapi.json; Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


class _LogFormat(logging.Formatter):
    """``deeprnn serve: added model …``; ``deeprnn serve: warning: …`` above INFO; a traceback after it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # format() adds the traceback
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"deeprnn serve: {level}{record.getMessage()}"


def log_to_stderr(level: str = "info") -> logging.Handler:
    """Show the ``deeprnn.serve`` logger's lines (models added, reloaded, dropped or skipped) on stderr beside
    uvicorn's, at uvicorn's ``--log-level``; nothing configured them, so the INFO lines were lost. Once."""
    logger = logging.getLogger("deeprnn.serve")
    logger.setLevel(level.upper())
    logger.propagate = False  # at a terminal the CLI's "deeprnn" logger would print each line a second time
    for handler in logger.handlers:
        if isinstance(handler.formatter, _LogFormat):
            return handler
    from deeprnn.cli import StderrHandler

    handler = StderrHandler()
    handler.setFormatter(_LogFormat())
    logger.addHandler(handler)
    return handler


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`ConfigError` (one line naming the port) when ``host:port`` cannot be listened on.

    Binds a throwaway socket the way uvicorn does (``SO_REUSEADDR``) and closes it at once: nothing is held.
    """
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ConfigError(f"cannot listen on --host {host}: {e.strerror}; pass an address of this machine, "
                          "e.g. --host 127.0.0.1") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use; choose another with --port, "
                                  f"e.g. --port {port + 1 if port < 65535 else 8000}") from None
            raise ConfigError(f"cannot listen on {host} port {port}: {e.strerror or e}; "
                              "choose another --port or --host") from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port number from 1 to 65535, got {text!r}")
    return port


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``deeprnn serve`` on the CLI's subparsers."""
    s = subparsers.add_parser(
        "serve",
        help="web playground and HTTP API for trained models",
        description="Serve a text-generation page at / and a JSON/SSE API at /api (OpenAPI at /openapi.json). "
        "Give a run directory, a checkpoint directory, or a directory of runs (every run found is offered).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("paths", nargs="+", metavar="RUN_OR_CHECKPOINT_OR_RUNS_DIR",
                   help="run directories, checkpoint directories or directories holding runs")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback: this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (1 to 65535)")
    s.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps")
    s.add_argument("--workers", type=int, default=2, help="generation threads")
    s.add_argument("--max-queue", type=int, default=32, help="requests waiting for a thread before 503")
    s.add_argument("--rescan", type=float, default=5.0, metavar="SECONDS",
                   help="a request this long after the last look at the paths looks again: runs trained since "
                        "are offered, retrained ones reloaded (0: load the models once, at start)")
    s.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads of each generation (the workers already run in parallel)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level")
    s.set_defaults(func=cmd_serve)
    return s
