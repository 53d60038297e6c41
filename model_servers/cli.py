"""The `model-server` command: serve one scikit-learn model over gRPC (predict.v1 or v2)."""

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
from model_servers.server import (
    PROTOCOLS,
    REGISTER_TIMEOUT_S,
    ModelServerOptions,
    ProxyRegistration,
    RegistrationError,
    deregister_from_proxy,
    parse_listen,
    register_with_proxy,
    start_model_server,
)
from proxy.admin_cli import TOKEN_ENV
from proxy.errors import ConfigError
from proxy.settings import validate_address

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
            f"shape [batch, {FEATURE_COUNT}]; outputs 'label' and 'probabilities'), or with\n"
            "--protocol v2 over the Open Inference Protocol (KServe v2, as Triton serves it:\n"
            "inference.GRPCInferenceService/ModelInfer, same tensors, plus liveness, readiness\n"
            "and metadata), with the standard gRPC health service, server reflection, and\n"
            "optional injected latency, errors or hangs for testing how a proxy copes."
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
        "--protocol",
        choices=PROTOCOLS,
        default=default.protocol,
        help="predict-v1: the project's own predict.v1; v2: the Open Inference Protocol "
        "(KServe v2), with tensors typed or raw (default: %(default)s)",
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
        help="once listening (and registered, with --register-with), atomically write the "
        "address to dial, HOST:PORT with the port actually bound, to PATH (removed again "
        "on exit)",
    )
    registration = parser.add_argument_group(
        "registering with a shadow proxy",
        "Once serving, register this server's address (loopback when it listens on a "
        "wildcard) with a running shadow proxy through its admin API, and deregister it on "
        "SIGTERM or SIGINT before stopping. If the proxy refuses the registration, or its "
        f"admin service does not answer within {REGISTER_TIMEOUT_S:g} s, the server stops "
        "and exits with status 1.",
    )
    registration.add_argument(
        "--register-with",
        metavar="HOST:PORT",
        type=_admin_address,
        help="the proxy's admin address (its --admin-listen, by default 127.0.0.1:50052)",
    )
    registration.add_argument(
        "--as",
        dest="register_as",
        metavar="NAME",
        help="the backend name to register under, unique in that proxy (needed with "
        "--register-with)",
    )
    registration.add_argument(
        "--role",
        choices=["shadow", "reference"],
        help="shadow: a candidate compared with production; reference: a second instance "
        "of production's model, to measure noise (default: shadow)",
    )
    registration.add_argument(
        "--sample",
        metavar="RATE",
        type=_rate,
        help="fraction of requests, 0 to 1, the proxy copies to this server (default: 1)",
    )
    registration.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help=f"the proxy's admin token, when it has one (default: ${TOKEN_ENV})",
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
            protocol=args.protocol,
        )
    except ValueError as exc:
        parser.error(str(exc))
    registration = _registration(parser, args)
    # --log-level applies to this package; libraries (asyncio, grpc) stay at WARNING,
    # since their DEBUG output would drown ours.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"{PROG}: %(message)s")
    logging.getLogger("model_servers").setLevel(args.log_level)
    ready_file: Path | None = args.ready_file
    try:
        if ready_file is not None:
            # A stale file from an earlier run would hand a waiting supervisor the wrong port.
            ready_file.unlink(missing_ok=True)
        return asyncio.run(_serve(options, ready_file, registration))
    except (OSError, RegistrationError) as exc:  # BindError, an unwritable --ready-file
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)


def _registration(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> ProxyRegistration | None:
    if args.register_with is None:
        given = [
            flag
            for flag, value in (
                ("--as", args.register_as),
                ("--role", args.role),
                ("--sample", args.sample),
                ("--admin-token", args.admin_token),
            )
            if value is not None
        ]
        if given:
            parser.error(f"{', '.join(given)}: only with --register-with HOST:PORT")
        return None
    if not args.register_as:
        parser.error("--register-with needs --as NAME, the name to register under")
    return ProxyRegistration(
        admin=args.register_with,
        name=args.register_as,
        role=args.role or "shadow",
        sample_rate=args.sample,
        token=args.admin_token or os.environ.get(TOKEN_ENV) or None,
    )


async def _serve(
    options: ModelServerOptions,
    ready_file: Path | None,
    registration: ProxyRegistration | None = None,
) -> int:
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
    registered = False
    try:
        logger.info("serving %s", running.describe())
        if registration is not None:
            # Raises RegistrationError: the finally below stops serving, main exits 1.
            await register_with_proxy(running, registration)
            registered = True
        # Ready means registered too: a supervisor may count on the proxy knowing us.
        if ready_file is not None:
            _write_atomically(ready_file, f"{running.address}\n")
        await stop_requested.wait()
        logger.info("%s received, stopping (grace %g s)", signals[0], STOP_GRACE_S)
    finally:
        if registration is not None and registered:
            # Before stopping: the proxy stops sending copies while we can still answer.
            try:
                await deregister_from_proxy(registration)
            except RegistrationError as exc:
                logger.warning("%s", exc)
        await running.stop(grace=STOP_GRACE_S)
    method = "ModelInfer" if options.protocol == "v2" else "Predict"
    logger.info("stopped; %d %s calls received", running.calls, method)
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


def _admin_address(text: str) -> str:
    try:
        return validate_address(text, "address")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("address: ")) from None


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
