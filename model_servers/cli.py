"""The `model-server` command: serve one scikit-learn model over predict.v1 gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from model_servers.models import FAMILY, FEATURE_COUNT, MODELS
from model_servers.server import ModelServerOptions, parse_listen, start_model_server

__all__ = ["DEFAULT_LISTEN", "STOP_GRACE_S", "build_parser", "main"]

PROG = "model-server"
DEFAULT_LISTEN = "127.0.0.1:50061"
STOP_GRACE_S = 5.0
"""On SIGTERM or SIGINT, calls in flight get this many seconds to finish."""

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: it is read in supervisor and CI logs.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `model-server`."""
    default = ModelServerOptions()
    models = "\n".join(
        f"  {spec.name:<11} version {spec.version}, {spec.role}: {spec.kind}"
        for spec in MODELS.values()
    )
    parser = _Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "A gRPC model server for the shadow proxy: serves one scikit-learn classifier,\n"
            f"trained at start-up on the {FAMILY} data set that ships with scikit-learn,\n"
            "over predict.v1.PredictionService/Predict (input 'features': FP32 or FP64,\n"
            f"shape [batch, {FEATURE_COUNT}]; outputs 'label' and 'probabilities'), with the\n"
            "standard gRPC health service, server reflection, and optional injected\n"
            "latency, errors or hangs for testing how a proxy copes."
        ),
        epilog=f"models:\n{models}",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=_listen_address,
        default=DEFAULT_LISTEN,
        help="address to listen on; port 0 picks a free port (see --ready-file); "
        "IPv6 as [ADDR]:PORT (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        choices=list(MODELS),
        default=default.model,
        help=f"the model to serve, one of: {', '.join(MODELS)} (see 'models' below; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--latency-ms",
        metavar="MS",
        type=_non_negative_float,
        default=default.latency_ms,
        help="delay every answer by this many milliseconds (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-jitter-ms",
        metavar="MS",
        type=_non_negative_float,
        default=default.latency_jitter_ms,
        help="vary that delay uniformly by up to this many milliseconds either way, "
        "never below 0 (default: %(default)s)",
    )
    parser.add_argument(
        "--error-rate",
        metavar="RATE",
        type=_rate,
        default=default.error_rate,
        help="answer this fraction of calls, 0 to 1, with UNAVAILABLE instead of a "
        "prediction (default: %(default)s)",
    )
    parser.add_argument(
        "--hang",
        action="store_true",
        help="accept calls but never answer them, to test callers' deadlines",
    )
    parser.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=default.seed,
        help="seed for the random latency jitter and injected errors, for repeatable "
        "runs (default: a fresh seed each run)",
    )
    parser.add_argument(
        "--ready-file",
        metavar="PATH",
        type=Path,
        help="once listening, atomically write the address to dial, HOST:PORT with the "
        "port actually bound, to PATH (removed again on exit)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="INFO",
        help="log to stderr at this level: DEBUG, INFO, WARNING or ERROR (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `model-server` until SIGTERM or SIGINT; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = ModelServerOptions(
            listen=args.listen,
            model=args.model,
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_jitter_ms,
            error_rate=args.error_rate,
            hang=args.hang,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    # --log-level applies to this package; libraries (asyncio, grpc) stay at WARNING,
    # since their DEBUG output would drown ours.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"{PROG}: %(message)s")
    logging.getLogger("model_servers").setLevel(args.log_level)
    ready_file: Path | None = args.ready_file
    try:
        if ready_file is not None:
            # A stale file from an earlier run would hand a waiting supervisor the wrong port.
            ready_file.unlink(missing_ok=True)
        return asyncio.run(_serve(options, ready_file))
    except OSError as exc:  # BindError, or an unwritable --ready-file
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)


async def _serve(options: ModelServerOptions, ready_file: Path | None) -> int:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals: list[str] = []

    def request_stop(signum: signal.Signals) -> None:
        signals.append(signum.name)
        stop_requested.set()

    # Installed before training, so an early SIGTERM still stops cleanly after start-up.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)
    running = await start_model_server(options)
    try:
        if ready_file is not None:
            _write_atomically(ready_file, f"{running.address}\n")
        logger.info("serving %s", running.describe())
        await stop_requested.wait()
        logger.info("%s received, stopping (grace %g s)", signals[0], STOP_GRACE_S)
    finally:
        await running.stop(grace=STOP_GRACE_S)
    logger.info("stopped; %d Predict calls received", running.calls)
    return 0


def _write_atomically(path: Path, text: str) -> None:
    # Write then rename in the same directory: a reader sees the whole line or no file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _listen_address(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of milliseconds, got {text!r}"
        ) from None
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not (0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value
