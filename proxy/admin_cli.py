"""``shadow-proxy backends``: list, add, remove, update and promote backends through the admin API.

:class:`AdminClient` is the one place that talks to a proxy's admin service; the command
line here and the model server's ``--register-with`` both use it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc import aio

from proxy.errors import ConfigError
from proxy.gen import admin_pb2, admin_pb2_grpc
from proxy.settings import parse_duration

__all__ = [
    "ADMIN_ENV",
    "DEFAULT_ADMIN",
    "DEFAULT_TIMEOUT_S",
    "TOKEN_ENV",
    "AdminClient",
    "AdminError",
    "AdminTarget",
    "add_backends_parser",
    "backend_spec",
    "render_table",
    "run_backends",
    "status_to_dict",
]

PROG = "shadow-proxy backends"
DEFAULT_ADMIN = "127.0.0.1:50052"
"""The proxy's default ``--admin-listen``."""
ADMIN_ENV = "SHADOW_PROXY_ADMIN"
"""Environment variable naming the admin address when ``--admin`` is not given."""
TOKEN_ENV = "SHADOW_PROXY_ADMIN_TOKEN"
"""Environment variable holding the admin token (the proxy reads the same one)."""
DEFAULT_TIMEOUT_S = 5.0
"""Deadline of one admin call."""

EXIT_REFUSED = 1
EXIT_USAGE = 2

_ROLE_NAMES = {
    admin_pb2.ROLE_PRODUCTION: "production",
    admin_pb2.ROLE_SHADOW: "shadow",
    admin_pb2.ROLE_REFERENCE: "reference",
}
_ROLE_VALUES = {name: value for value, name in _ROLE_NAMES.items()}
_ROLE_ORDER = {"production": 0, "shadow": 1, "reference": 2}
# Statuses that mean the admin service was not reached (or is not there), as opposed to a
# service that answered and refused.
_NOT_REACHED = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
)
_INT32_MAX = 2**31 - 1


# ------------------------------------------------------------------------------ the client


@dataclass(frozen=True)
class AdminTarget:
    """Where a proxy's admin service listens and how to call it."""

    address: str = DEFAULT_ADMIN
    """``HOST:PORT`` of the admin service (the proxy's ``--admin-listen``)."""
    token: str | None = None
    """Sent as ``authorization: Bearer TOKEN`` on every call when set."""
    timeout: float = DEFAULT_TIMEOUT_S
    """Seconds one admin call may take."""
    tls_ca: Path | None = None
    """PEM CA certificates to verify the admin listener with; implies TLS."""
    tls_cert: Path | None = None
    """PEM client certificate chain, for an admin listener that wants one (mutual TLS)."""
    tls_key: Path | None = None
    """PEM private key for ``tls_cert``."""

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials from the PEM files; raises ConfigError when one cannot be read."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.tls_ca, "--tls-ca"),
            private_key=_read_pem(self.tls_key, "--tls-key"),
            certificate_chain=_read_pem(self.tls_cert, "--tls-cert"),
        )


def _read_pem(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


class AdminError(Exception):
    """An admin call that failed: the admin service refused it, or was not reached."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str) -> None:
        self.code = code
        self.details = " ".join(details.split())  # one line, whatever gRPC put in it
        self.address = address
        super().__init__(f"{code.name}: {self.details}")

    @property
    def reached(self) -> bool:
        """True when the admin service answered (and refused); False when it was not reached."""
        return self.code not in _NOT_REACHED


class AdminClient:
    """Calls one proxy's admin service; ``async with AdminClient(target) as admin: ...``.

    ``wait_for_ready`` makes a call wait (within its deadline) for the admin service to come
    up instead of failing at once when nothing listens yet.
    """

    def __init__(self, target: AdminTarget, *, wait_for_ready: bool = False) -> None:
        self.target = target
        self._wait_for_ready = wait_for_ready
        self._metadata = (("authorization", f"Bearer {target.token}"),) if target.token else ()
        if target.tls:
            self._channel = aio.secure_channel(target.address, target.credentials())
        else:
            self._channel = aio.insecure_channel(target.address)
        self._stub = admin_pb2_grpc.ProxyAdminStub(self._channel)

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(
                request,
                timeout=self.target.timeout,
                metadata=self._metadata,
                wait_for_ready=self._wait_for_ready,
            )
        except aio.AioRpcError as exc:
            raise AdminError(exc.code(), exc.details() or "", self.target.address) from None

    async def list_backends(self) -> list[admin_pb2.BackendStatus]:
        """Every backend, production first, with health and counters."""
        reply = await self._call(self._stub.ListBackends, admin_pb2.ListBackendsRequest())
        return list(reply.backends)

    async def register(self, spec: admin_pb2.BackendSpec) -> admin_pb2.BackendStatus:
        """Add a shadow or reference (see :func:`backend_spec`)."""
        reply = await self._call(
            self._stub.RegisterBackend, admin_pb2.RegisterBackendRequest(backend=spec)
        )
        return reply.backend

    async def deregister(self, name: str) -> None:
        """Remove a shadow or reference."""
        await self._call(
            self._stub.DeregisterBackend, admin_pb2.DeregisterBackendRequest(name=name)
        )

    async def update(
        self,
        name: str,
        *,
        sample_rate: float | None = None,
        timeout: float | None = None,
        max_in_flight: int | None = None,
    ) -> admin_pb2.BackendStatus:
        """Change the given fields of a backend; the others stay as they are."""
        request = admin_pb2.UpdateBackendRequest(name=name)
        if sample_rate is not None:
            request.sample_rate = sample_rate
        if timeout is not None:
            request.timeout_seconds = timeout
        if max_in_flight is not None:
            request.max_in_flight = max_in_flight
        reply = await self._call(self._stub.UpdateBackend, request)
        return reply.backend

    async def promote(self, name: str, *, remove_old: bool = False) -> admin_pb2.PromoteResponse:
        """Make a shadow the production backend; the old one becomes a shadow or is removed."""
        response: admin_pb2.PromoteResponse = await self._call(
            self._stub.Promote, admin_pb2.PromoteRequest(name=name, remove_old=remove_old)
        )
        return response


def backend_spec(
    name: str,
    address: str,
    *,
    role: str = "shadow",
    sample_rate: float | None = None,
    timeout: float | None = None,
    max_in_flight: int | None = None,
    tls: bool = False,
    tls_ca_file: str | None = None,
) -> admin_pb2.BackendSpec:
    """A registration; unset fields take the proxy's defaults. The proxy validates it."""
    spec = admin_pb2.BackendSpec(
        name=name,
        address=address,
        role=_ROLE_VALUES[role],
        tls=tls or bool(tls_ca_file),
        tls_ca_file=tls_ca_file or "",
    )
    if sample_rate is not None:
        spec.sample_rate = sample_rate
    if timeout is not None:
        spec.timeout_seconds = timeout
    if max_in_flight is not None:
        spec.max_in_flight = max_in_flight
    return spec


# ------------------------------------------------------------------------------ output


def _role(status: admin_pb2.BackendStatus) -> str:
    return _ROLE_NAMES.get(status.spec.role, "unspecified")


def _agreement(status: admin_pb2.BackendStatus) -> float | None:
    return status.agreed / status.compared if status.compared else None


def status_to_dict(status: admin_pb2.BackendStatus) -> dict[str, Any]:
    """A backend's status as plain JSON-ready data (numbers stay numbers)."""
    spec = status.spec
    return {
        "name": spec.name,
        "role": _role(status),
        "address": spec.address,
        "health": status.health,
        "health_detail": status.health_detail,
        "sample_rate": spec.sample_rate if spec.HasField("sample_rate") else 1.0,
        "timeout_seconds": spec.timeout_seconds if spec.HasField("timeout_seconds") else None,
        "max_in_flight": spec.max_in_flight if spec.HasField("max_in_flight") else None,
        "tls": spec.tls,
        "tls_ca_file": spec.tls_ca_file or None,
        "in_flight": status.in_flight,
        "calls": status.calls,
        "errors": status.errors,
        "compared": status.compared,
        "agreed": status.agreed,
        "agreement": _agreement(status),
        "dropped": status.dropped,
        "sampled_out": status.sampled_out,
        "unhealthy_skipped": status.unhealthy_skipped,
        "source": status.source,
    }


_COLUMNS = (
    "NAME",
    "ROLE",
    "ADDRESS",
    "HEALTH",
    "SAMPLE",
    "TIMEOUT",
    "IN FLIGHT",
    "CALLS",
    "ERRORS",
    "AGREEMENT",
    "DROPPED",
    "SOURCE",
)
_RIGHT_ALIGNED = {"SAMPLE", "TIMEOUT", "IN FLIGHT", "CALLS", "ERRORS", "AGREEMENT", "DROPPED"}


def _row(status: admin_pb2.BackendStatus) -> tuple[str, ...]:
    spec = status.spec
    agreement = _agreement(status)
    in_flight = str(status.in_flight)
    if spec.HasField("max_in_flight"):
        in_flight += f"/{spec.max_in_flight}"
    return (
        spec.name,
        _role(status),
        spec.address + (" (tls)" if spec.tls else ""),
        status.health or "unknown",
        f"{spec.sample_rate:g}" if spec.HasField("sample_rate") else "1",
        f"{spec.timeout_seconds:g}s" if spec.HasField("timeout_seconds") else "-",
        in_flight,
        str(status.calls),
        str(status.errors),
        "-" if agreement is None else f"{100 * agreement:.1f}% ({status.agreed}/{status.compared})",
        str(status.dropped),
        status.source or "-",
    )


def render_table(statuses: Sequence[admin_pb2.BackendStatus]) -> str:
    """The backends as an aligned text table, production first, then why any is unhealthy."""
    ordered = sorted(statuses, key=lambda s: _ROLE_ORDER.get(_role(s), len(_ROLE_ORDER)))
    rows = [_COLUMNS, *(_row(s) for s in ordered)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(
            cell.rjust(width) if column in _RIGHT_ALIGNED else cell.ljust(width)
            for cell, width, column in zip(row, widths, _COLUMNS, strict=True)
        ).rstrip()
        for row in rows
    ]
    notes = [
        f"{s.spec.name}: {s.health}: {s.health_detail}"
        for s in ordered
        if s.health_detail and s.health != "serving"
    ]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _describe(status: admin_pb2.BackendStatus) -> str:
    spec = status.spec
    parts = []
    if spec.HasField("sample_rate"):
        parts.append(f"sample {spec.sample_rate:g}")
    if spec.HasField("timeout_seconds"):
        parts.append(f"timeout {spec.timeout_seconds:g}s")
    if spec.HasField("max_in_flight"):
        parts.append(f"max {spec.max_in_flight} in flight")
    if spec.tls:
        parts.append(f"tls{' with CA ' + spec.tls_ca_file if spec.tls_ca_file else ''}")
    return f"{_role(status)} {spec.name!r} at {spec.address} ({', '.join(parts)})"


# ------------------------------------------------------------------------------ command line

_EPILOG = f"""\
The admin service is the proxy's --admin-listen (default {DEFAULT_ADMIN}). The connection
options (--admin, --token, --timeout, --json, --tls-*) go before or after the action; for
'add' and 'update', --timeout after the action is the backend's own timeout, and the admin
call's deadline is given before it: shadow-proxy backends --timeout 10s add ...

environment:
  {ADMIN_ENV}        the admin address when --admin is not given
  {TOKEN_ENV}  the admin token when --token is not given

exit codes: 0 done; 1 the admin service refused (the message names the gRPC status, e.g.
NOT_FOUND); 2 a usage error, or the admin service could not be reached.

examples:
  shadow-proxy backends list
  shadow-proxy backends add candidate 127.0.0.1:50062 --sample 0.25 --timeout 2s
  shadow-proxy backends update candidate --sample 1
  shadow-proxy backends promote candidate --remove-old
  shadow-proxy backends remove candidate
"""


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "duration")
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 2s or 500ms, got {text!r}"
        ) from None


def _rate(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not -_INT32_MAX - 1 <= value <= _INT32_MAX:
        raise argparse.ArgumentTypeError(f"expected a number up to {_INT32_MAX}, got {text!r}")
    return value


def _connection_options(
    parser: argparse.ArgumentParser, *, at_top: bool, call_timeout: bool = True
) -> None:
    """The options that say how to reach the admin service. On the actions they default to
    SUPPRESS, so a value given before the action is not overwritten by an absent one."""

    def default(value: Any) -> Any:
        return value if at_top else argparse.SUPPRESS

    group = parser.add_argument_group("admin service")
    group.add_argument(
        "--admin",
        metavar="HOST:PORT",
        default=default(None),
        help=f"the proxy's admin address, its --admin-listen (default: ${ADMIN_ENV}, else "
        f"{DEFAULT_ADMIN})",
    )
    group.add_argument(
        "--token",
        metavar="TOKEN",
        default=default(None),
        help=f"send 'authorization: Bearer TOKEN', for a proxy started with --admin-token "
        f"(default: ${TOKEN_ENV})",
    )
    if call_timeout:
        group.add_argument(
            "--timeout",
            dest="call_timeout",
            metavar="DURATION",
            type=_duration,
            default=default(DEFAULT_TIMEOUT_S),
            help=f"deadline of the admin call, e.g. 5s or 500ms (default {DEFAULT_TIMEOUT_S:g}s)",
        )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON instead of text (list: a JSON list of backends)",
    )
    group.add_argument(
        "--tls-ca",
        metavar="PEM",
        type=Path,
        default=default(None),
        help="connect over TLS and verify the admin listener with these CA certificates",
    )
    group.add_argument(
        "--tls-cert",
        metavar="PEM",
        type=Path,
        default=default(None),
        help="client certificate chain for an admin listener that requires one (mutual "
        "TLS; implies TLS, verified with the system's roots unless --tls-ca)",
    )
    group.add_argument(
        "--tls-key",
        metavar="PEM",
        type=Path,
        default=default(None),
        help="private key for --tls-cert",
    )


def add_backends_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``backends`` command (and its actions) to the ``shadow-proxy`` subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "backends",
        help="list, add, remove, update and promote backends of a running proxy",
        description=(
            "Change a running proxy's backends through its admin API, without a restart:\n"
            "list them with their health and counters, add a shadow or reference by address,\n"
            "change its sample rate, timeout or bound, promote a shadow to production, or\n"
            "remove one."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(parser, at_top=True)
    actions = parser.add_subparsers(dest="backends_command", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list",
        help="show every backend with its health and counters, production first",
        description=(
            "Show every backend: name, role, address, health, sample rate, timeout, calls in "
            "flight (of the bound), calls, errors, agreement with production (agreed/compared), "
            "copies dropped at the bound, and where it came from (flags, config or admin)."
        ),
    )
    _connection_options(listing, at_top=False)

    add = actions.add_parser(
        "add",
        help="register a shadow or reference by address",
        description="Register a backend; it gets copies of the traffic at once.",
    )
    add.add_argument("name", metavar="NAME", help="unique name: letters, digits, '.', '_', '-'")
    add.add_argument("address", metavar="HOST:PORT", help="its gRPC listener ([::1]:PORT for IPv6)")
    add.add_argument(
        "--role",
        choices=("shadow", "reference"),
        default="shadow",
        help="shadow: a candidate compared with production; reference: a second instance of "
        "the production model, to measure noise (default shadow); production changes only "
        "through 'promote'",
    )
    add.add_argument(
        "--sample",
        metavar="F",
        type=_rate,
        help="fraction of requests copied to it, 0..1 (default 1)",
    )
    add.add_argument(
        "--timeout",
        dest="backend_timeout",
        metavar="DURATION",
        type=_duration,
        help="the backend's own call timeout, e.g. 2s (default 5s); the admin call's "
        "deadline goes before the action: backends --timeout 10s add ...",
    )
    add.add_argument(
        "--max-in-flight",
        metavar="N",
        type=_count,
        help="copies in flight at once; more are dropped and counted (default 256)",
    )
    add.add_argument(
        "--tls",
        action="store_true",
        help="the proxy connects to it over TLS (verified with the proxy's system roots)",
    )
    add.add_argument(
        "--ca",
        metavar="PEM",
        help="CA certificates the proxy verifies it with (implies --tls); a path the proxy "
        "can read, made absolute when it names a file here",
    )
    _connection_options(add, at_top=False, call_timeout=False)

    remove = actions.add_parser(
        "remove",
        help="deregister a shadow or reference",
        description="Deregister a backend; calls already sent to it finish.",
    )
    remove.add_argument("name", metavar="NAME", help="the backend to remove")
    _connection_options(remove, at_top=False)

    update = actions.add_parser(
        "update",
        help="change a backend's sample rate, timeout or bound",
        description="Change the given settings of a backend; the others stay as they are.",
    )
    update.add_argument("name", metavar="NAME", help="the backend to change")
    update.add_argument("--sample", metavar="F", type=_rate, help="new sample rate, 0..1")
    update.add_argument(
        "--timeout",
        dest="backend_timeout",
        metavar="DURATION",
        type=_duration,
        help="the backend's new call timeout, e.g. 2s",
    )
    update.add_argument(
        "--max-in-flight", metavar="N", type=_count, help="new bound on copies in flight"
    )
    _connection_options(update, at_top=False, call_timeout=False)

    promote = actions.add_parser(
        "promote",
        help="make a shadow the production backend, atomically",
        description=(
            "Make a shadow the production backend, atomically: every call is served by exactly "
            "one production backend. The old production becomes a shadow, or is removed."
        ),
    )
    promote.add_argument("name", metavar="NAME", help="the shadow to make production")
    promote.add_argument(
        "--remove-old",
        action="store_true",
        help="remove the old production instead of keeping it as a shadow",
    )
    _connection_options(promote, at_top=False)
    return parser


def _target(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[AdminTarget, str]:
    """The admin target from the flags and environment, and where its address came from."""
    if args.admin:
        address, origin = args.admin, "--admin"
    elif environ.get(ADMIN_ENV):
        address, origin = environ[ADMIN_ENV], f"${ADMIN_ENV}"
    else:
        address, origin = DEFAULT_ADMIN, "the default"
    target = AdminTarget(
        address=address.strip(),
        token=args.token or environ.get(TOKEN_ENV) or None,
        timeout=args.call_timeout,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    if target.tls:
        target.credentials()  # a missing PEM file is a usage error, before any call
    return target, origin


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


async def _run_action(args: argparse.Namespace, client: AdminClient) -> None:
    command = args.backends_command
    as_json = args.json
    if command == "list":
        statuses = await client.list_backends()
        if as_json:
            _print_json([status_to_dict(s) for s in statuses])
        else:
            print(render_table(statuses))
    elif command == "add":
        status = await client.register(
            backend_spec(
                args.name,
                args.address,
                role=args.role,
                sample_rate=args.sample,
                timeout=args.backend_timeout,
                max_in_flight=args.max_in_flight,
                tls=args.tls,
                tls_ca_file=args.ca,
            )
        )
        if as_json:
            _print_json(status_to_dict(status))
        else:
            print(f"added {_describe(status)}")
    elif command == "remove":
        await client.deregister(args.name)
        if as_json:
            _print_json({"removed": args.name})
        else:
            print(f"removed {args.name!r}")
    elif command == "update":
        status = await client.update(
            args.name,
            sample_rate=args.sample,
            timeout=args.backend_timeout,
            max_in_flight=args.max_in_flight,
        )
        if as_json:
            _print_json(status_to_dict(status))
        else:
            print(f"updated {_describe(status)}")
    elif command == "promote":
        response = await client.promote(args.name, remove_old=args.remove_old)
        previous = status_to_dict(response.previous) if response.HasField("previous") else None
        if as_json:
            _print_json({"production": status_to_dict(response.production), "previous": previous})
        elif previous is None:
            print(f"promoted {args.name!r} to production; the old production was removed")
        else:
            print(f"promoted {args.name!r} to production; {previous['name']!r} is now a shadow")
    else:  # pragma: no cover - argparse allows only the actions above
        raise AssertionError(command)


async def _run(args: argparse.Namespace, target: AdminTarget) -> None:
    async with AdminClient(target) as client:
        await _run_action(args, client)


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def run_backends(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    """Run one ``shadow-proxy backends`` action; returns the exit status (0, 1 or 2)."""
    try:
        target, origin = _target(args, environ)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if getattr(args, "ca", None) and Path(args.ca).is_file():
        # The proxy reads the file from its own working directory, not ours.
        args.ca = str(Path(args.ca).resolve())
    try:
        asyncio.run(_run(args, target))
    except AdminError as exc:
        if exc.reached:
            _error(str(exc))
            return EXIT_REFUSED
        _error(_not_reached(exc, target, origin, mutating=args.backends_command != "list"))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


def _not_reached(exc: AdminError, target: AdminTarget, origin: str, *, mutating: bool) -> str:
    where = f"the admin service at {exc.address} (from {origin})"
    if exc.code is grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"{exc.code.name}: {exc.address} (from {origin}) is not a proxy's admin service; "
            f"use the proxy's --admin-listen address ({exc.details})"
        )
    if exc.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        maybe = "; the change may still have been made, see 'backends list'" if mutating else ""
        return (
            f"{exc.code.name}: no answer from {where} within {target.timeout:g}s{maybe} "
            f"({exc.details})"
        )
    return f"{exc.code.name}: cannot reach {where}: {exc.details}"
