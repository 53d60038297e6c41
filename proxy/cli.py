"""The ``shadow-proxy`` command line (also ``python -m proxy``)."""

from __future__ import annotations

import os

# gRPC core logs TLS handshake failures and the like itself, before our one-line error;
# read when grpc is first imported, so set before anything imports it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# gRPC Python's EventEngine client and listener (on by default since grpcio 1.6x) cost the
# proxy about 10% more CPU per request than the older I/O path in scripts/bench.py's setup;
# an explicit GRPC_EXPERIMENTS from the environment wins.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError
from proxy.settings import (
    EXPORTER_CHOICES,
    BackendSettings,
    Settings,
    load_settings,
    read_config_file,
)

PROG = "shadow-proxy"

_SERVE_EPILOG = """\
backend spec:
  NAME=HOST:PORT[,sample=RATE][,timeout=DURATION][,max_in_flight=N]
  e.g. --shadow candidate=127.0.0.1:50062,sample=0.25,timeout=2s
  sample:        fraction of requests copied to this shadow, 0..1 (default 1); the decision is
                 a pure function of the request id, so it is the same for the same id
  timeout:       the shadow call's own deadline (default 5s); production has none of its own
                 unless given (the client's deadline bounds it)
  max_in_flight: shadow calls in flight at once (default 256); copies over it are dropped and
                 counted, never queued

config file (--config, YAML .yaml/.yml, TOML .toml or JSON .json), same names as the flags:
  listen: 127.0.0.1:50051
  production: prod=127.0.0.1:50061          # or {name: prod, address: 127.0.0.1:50061}
  shadows:
    - candidate=127.0.0.1:50062,sample=0.5
    - {name: other, address: 127.0.0.1:50063, timeout: 2s, max_in_flight: 64}
  references: [prod-twin=127.0.0.1:50064]
  tolerance: 1e-6
  metrics_port: 9464
  exporters: [file, otlp]
  traces_file: traces.jsonl
  redact_metadata: [x-api-key]
  redact_tensors: [ssn]
  never_shadowed: [/inference.GRPCInferenceService/ModelMetadata]   # replaces the default
  streaming_methods: [/inference.GRPCInferenceService/ModelStreamInfer, /my.v1.Chat/Talk]
  Flags override the file; a --shadow replaces the file's shadow of the same name.

environment (OpenTelemetry's standard variables keep their meaning):
  OTEL_EXPORTER_OTLP_ENDPOINT   send traces over OTLP too (e.g. http://localhost:4317 for a
                                Jaeger all-in-one); no --exporter needed
  OTEL_EXPORTER_OTLP_PROTOCOL   grpc (default) or http/protobuf (then use port 4318)
  OTEL_TRACES_EXPORTER          default exporters when --exporter is not given
  OTEL_SERVICE_NAME             service name in Jaeger (default shadow-proxy)
  OTEL_TRACES_SAMPLER, OTEL_BSP_*, OTEL_EXPORTER_OTLP_HEADERS, ...  as documented by OpenTelemetry
  GRPC_EXPERIMENTS              default -event_engine_client,-event_engine_listener (gRPC's
                                older I/O path: less CPU per request); set it to choose

exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 2 for a bad configuration.
"""


def _serve_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the proxy",
        description=(
            "Run the proxy: every call is forwarded as bytes to the production backend, whose reply "
            "the client gets, and at the same moment to each sampled shadow backend, whose reply is "
            "only recorded. Every call is traced with OpenTelemetry, payloads included."
        ),
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML, TOML or JSON config file; flags override it",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:50051; port 0 = any free port)",
    )
    p.add_argument(
        "--production",
        metavar="NAME=HOST:PORT[,timeout=D]",
        help="the production backend: its replies go to the clients (required, here or in --config)",
    )
    p.add_argument(
        "--shadow",
        dest="shadows",
        action="append",
        metavar="NAME=HOST:PORT[,sample=F][,timeout=D][,max_in_flight=N]",
        help="a shadow backend (repeatable): gets a copy of the sampled requests; its replies are recorded only",
    )
    p.add_argument(
        "--reference",
        dest="references",
        action="append",
        metavar="NAME=HOST:PORT[,sample=F][,timeout=D]",
        help="a second instance of the production model (repeatable), called like a shadow; where "
        "it differs from production the output is noisy, and the report does not count such "
        "differences against a candidate",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        metavar="X",
        help="numeric outputs within X (absolute) of production's count as equal (default 1e-6)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (off by default; 0 = any free port)",
    )
    p.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address of the Prometheus endpoint (default 127.0.0.1)",
    )
    p.add_argument(
        "--exporter",
        dest="exporters",
        action="append",
        metavar="NAME",
        help=f"where spans go, repeatable or comma-separated: {', '.join(EXPORTER_CHOICES)} "
        "(default: file, plus otlp when OTEL_EXPORTER_OTLP_ENDPOINT is set; none = no tracing)",
    )
    p.add_argument(
        "--traces-file",
        metavar="PATH",
        help="OTLP JSON lines file for the file exporter (default shadow-traces.jsonl)",
    )
    p.add_argument(
        "--otlp-protocol",
        choices=("grpc", "http/protobuf"),
        help="OTLP transport (default from OTEL_EXPORTER_OTLP_PROTOCOL, else grpc)",
    )
    p.add_argument(
        "--no-payloads",
        dest="record_payloads",
        action="store_false",
        default=None,
        help="do not record request/reply payloads as span events",
    )
    p.add_argument(
        "--payload-max-bytes",
        type=int,
        metavar="N",
        help="cap on one recorded payload; longer ones are cut and flagged truncated (default 65536)",
    )
    p.add_argument(
        "--redact-metadata",
        action="append",
        metavar="KEY",
        help="metadata key whose value is hidden in traces (repeatable; authorization always is)",
    )
    p.add_argument(
        "--redact-tensor",
        dest="redact_tensors",
        action="append",
        metavar="NAME",
        help="tensor whose contents are hidden in recorded payloads (repeatable)",
    )
    p.add_argument(
        "--never-shadow",
        dest="never_shadowed",
        action="append",
        metavar="METHOD",
        help="forward this method to production only: /package.Service/Method, or "
        "/package.Service/ for all of a service's methods (repeatable; replaces the default "
        "list, the Open Inference Protocol's ServerLive, ServerReady, ServerMetadata, "
        "ModelReady, ModelMetadata and TF Serving's GetModelMetadata; 'none' shadows every "
        "method)",
    )
    p.add_argument(
        "--streaming-method",
        dest="streaming_methods",
        action="append",
        metavar="METHOD",
        help="relay this method as a stream, message by message, to production only (never "
        "shadowed): /package.Service/Method, or /package.Service/ for all of a service's "
        "methods (repeatable; replaces the default list, Triton's ModelStreamInfer; 'none' "
        "serves every method as unary). A streaming method missing here is cut after its "
        "first message",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        metavar="N",
        help="largest request or reply accepted (default 4194304); larger ones get RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--shutdown-grace",
        metavar="DURATION",
        help="time in-flight production calls get after SIGTERM (default 10s)",
    )
    p.add_argument(
        "--shadow-grace",
        metavar="DURATION",
        help="time in-flight shadow calls get at shutdown before they are cancelled (default 5s)",
    )
    p.add_argument(
        "--health-interval",
        metavar="DURATION",
        help="how often production's health is checked (default 2s)",
    )
    p.add_argument(
        "--recorder-queue-size",
        type=int,
        metavar="N",
        help="outcomes waiting to be recorded; over it they are dropped and counted (default 20000)",
    )
    admin = p.add_argument_group("backends at run time (admin API, state, workers)")
    admin.add_argument(
        "--admin-listen",
        metavar="HOST:PORT",
        help="address of the admin service that registers, updates and promotes backends at run "
        "time (default 127.0.0.1:50052; 'off' turns it off). Off loopback it needs --admin-token",
    )
    admin.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help="every admin call must carry 'authorization: Bearer TOKEN' (or set "
        "SHADOW_PROXY_ADMIN_TOKEN)",
    )
    admin.add_argument(
        "--state-file",
        metavar="PATH",
        help="where run-time changes to the backends are kept, replayed on start over the config "
        "(default: CONFIG.state.json beside --config, else ./shadow-proxy.state.json; 'none' keeps "
        "them in memory only)",
    )
    admin.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="serve with N processes on one port (SO_REUSEPORT); changes made through any worker "
        "reach all of them through the state file within a second (default 1)",
    )
    admin.add_argument(
        "--reuse-port",
        action="store_true",
        default=None,
        help="share the listening port with other proxy processes (SO_REUSEPORT); --workers "
        "sets it for its workers",
    )
    tls = p.add_argument_group("TLS")
    tls.add_argument(
        "--tls-cert", metavar="PEM", help="certificate chain for the proxy's listeners (TLS)"
    )
    tls.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    tls.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="CA certificates; clients must present a certificate it signed (mutual TLS)",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="write HOST:PORT (the bound port) here once serving; for supervisors and tests",
    )
    p.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level (default INFO)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A gRPC proxy for shadow rollouts of machine-learning models.",
        epilog="Run 'shadow-proxy serve --help' for the proxy's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    from proxy.compare.report import add_report_parser

    add_report_parser(sub)
    from proxy.admin_cli import add_backends_parser

    add_backends_parser(sub)
    merge = sub.add_parser(
        "merge-traces",
        help="turn a traces file into one JSON document for the Jaeger UI's upload",
        description=(
            "The proxy's traces file holds one OTLP JSON document per line; the Jaeger UI's "
            "'Upload JSON' wants a single document. This writes one."
        ),
    )
    merge.add_argument(
        "traces_file", type=Path, metavar="TRACES_FILE", help="the proxy's OTLP JSON lines file"
    )
    merge.add_argument(
        "-o",
        "--out",
        type=Path,
        required=True,
        metavar="OUT.json",
        help="where to write the merged document",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags over the config file over defaults; raises ConfigError."""
    config = read_config_file(args.config) if args.config else {}
    overrides: dict[str, Any] = {
        "listen": args.listen,
        "production": args.production,
        "shadows": args.shadows,
        "references": args.references,
        "tolerance": args.tolerance,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "exporters": ",".join(args.exporters) if args.exporters else None,
        "traces_file": args.traces_file,
        "otlp_protocol": args.otlp_protocol,
        "record_payloads": args.record_payloads,
        "payload_max_bytes": args.payload_max_bytes,
        "redact_metadata": args.redact_metadata,
        "redact_tensors": args.redact_tensors,
        "never_shadowed": args.never_shadowed,
        "streaming_methods": args.streaming_methods,
        "max_message_bytes": args.max_message_bytes,
        "shutdown_grace": args.shutdown_grace,
        "shadow_grace": args.shadow_grace,
        "health_interval": args.health_interval,
        "recorder_queue_size": args.recorder_queue_size,
        "log_level": args.log_level,
        "admin_listen": args.admin_listen,
        "admin_token": args.admin_token,
        "state_file": _state_file(args, config),
        "workers": args.workers,
        "reuse_port": args.reuse_port,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
    }
    if args.redact_metadata and "redact_metadata" in config:
        # Redaction adds up: the file's keys stay hidden when a flag hides one more.
        from_file = config["redact_metadata"]
        from_file = [from_file] if isinstance(from_file, str) else list(from_file or [])
        overrides["redact_metadata"] = [*from_file, *args.redact_metadata]
    return load_settings(config=config, overrides=overrides)


def _state_file(args: argparse.Namespace, config: dict[str, Any]) -> str | None:
    chosen = args.state_file or config.get("state_file")
    if chosen is not None:
        return None if str(chosen).lower() in ("none", "off", "") else str(chosen)
    if args.config:
        return str(args.config.with_name(args.config.name + ".state.json"))
    return "shadow-proxy.state.json"


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "serve":
        from proxy.server import run

        try:
            settings = settings_from_args(args)
            _configure_logging(settings.log_level)
            if settings.workers > 1:
                from proxy.workers import supervise

                return supervise(settings, sys.argv[1:] if argv is None else argv, args.ready_file)

            def reload_base() -> list[BackendSettings]:
                # SIGHUP: the config file again, flags over it, as at start.
                return list(settings_from_args(args).backends)

            return asyncio.run(run(settings, args.ready_file, reload_base if args.config else None))
        except ConfigError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    if args.command == "backends":
        from proxy.admin_cli import run_backends

        return run_backends(args)
    if args.command == "report":
        from proxy.compare.report import run_report

        return run_report(args)
    if args.command == "merge-traces":
        from proxy.compare.traces import merge_for_upload

        try:
            spans = merge_for_upload(args.traces_file, args.out)
        except OSError as exc:
            print(
                f"{PROG}: error: cannot read or write {exc.filename}: {exc.strerror}",
                file=sys.stderr,
            )
            return 2
        except ValueError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {spans} spans to {args.out}")
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
