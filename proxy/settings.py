"""One validated settings object for the proxy: command-line flags over a config file over defaults.

OpenTelemetry's own variables (``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER`` ...) keep their
standard meaning; they are read by the OpenTelemetry SDK, and by :func:`default_exporters`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import ssl
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.errors import ConfigError
from proxy.protocols import DEFAULT_NEVER_SHADOWED, DEFAULT_STREAMING_METHODS

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$")
EXPORTER_CHOICES = ("file", "otlp", "console", "none")
# Metadata keys whose values never reach a trace, whatever the configuration says.
ALWAYS_REDACTED_METADATA = ("authorization",)


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """One model server the proxy calls."""

    name: str
    """Unique name of the backend; it names spans (``shadow <name>``) and log lines."""
    address: str
    """``HOST:PORT`` of the backend's gRPC listener (IPv6 as ``[::1]:PORT``)."""
    role: str = "shadow"
    """``production`` (its replies go to clients), ``shadow`` (a candidate whose replies are
    compared with production's) or ``reference`` (a second instance of the production model;
    where it differs from production, the difference is noise, not a real change)."""
    sample_rate: float = 1.0
    """Shadows only: the fraction of requests copied to this shadow, in [0, 1]. The decision
    is a pure function of the request id, so the same id always gets the same decision."""
    timeout: float | None = None
    """Seconds a call to this backend may take. Shadows default to 5 s; production has no
    cap of its own by default (the client's deadline bounds it)."""
    max_in_flight: int = 256
    """Shadows only: calls allowed in flight at once; a copy over the bound is dropped and
    counted, never queued."""
    tls: bool = False
    """Connect to the backend over TLS (verified with the system's roots or ``tls_ca_file``)."""
    tls_ca_file: str | None = None
    """PEM file of CA certificates to verify the backend with; implies ``tls``."""
    source: str = field(default="flags", compare=False)
    """Where the backend came from: ``flags``, ``config`` or ``admin`` (logged at start)."""

    def describe(self) -> str:
        """A one-line description for logs."""
        parts = [f"{self.name}={self.address}"]
        if self.sample_rate != 1.0:
            parts.append(f"sample={self.sample_rate:g}")
        if self.timeout is not None:
            parts.append(f"timeout={self.timeout:g}s")
        if self.tls:
            parts.append(f"tls=true{',ca=' + self.tls_ca_file if self.tls_ca_file else ''}")
        return ",".join(parts)


DEFAULT_SHADOW_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``shadow-proxy serve`` is configured with. Build it with :func:`load_settings`."""

    production: BackendSettings
    """The backend whose replies the clients get."""
    shadows: tuple[BackendSettings, ...] = ()
    """Backends that get a copy of (a sample of) the traffic; their replies are only recorded
    and compared with production's."""
    references: tuple[BackendSettings, ...] = ()
    """Second instances of the production model, called like shadows; where one differs from
    production, that output is noisy (non-deterministic) rather than a real difference."""
    never_shadowed: tuple[str, ...] = DEFAULT_NEVER_SHADOWED
    """Methods forwarded to production only: full names ``/package.Service/Method``, or a
    whole service as ``/package.Service/``. By default the Open Inference Protocol's
    liveness, readiness and metadata methods and TF Serving's GetModelMetadata."""
    streaming_methods: tuple[str, ...] = DEFAULT_STREAMING_METHODS
    """Methods relayed as streams, message by message, to production only (never shadowed,
    never compared): full names ``/package.Service/Method``, or a whole service as
    ``/package.Service/`` (its unary methods are then relayed the same way, unshadowed).
    gRPC's wire format does not say whether a call streams; a streaming method missing
    here is served as unary and cut after its first message. By default every streaming
    method of the protocols the proxy knows: Triton's ``ModelStreamInfer``."""
    tolerance: float = 1e-6
    """Numeric outputs within this absolute difference of production's count as equal."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (``/metrics``); None serves none."""
    metrics_host: str = "127.0.0.1"
    """Address the Prometheus endpoint listens on."""
    listen: str = "127.0.0.1:50051"
    """``HOST:PORT`` the proxy listens on; port 0 picks a free port."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request or reply the proxy accepts or forwards (gRPC's RESOURCE_EXHAUSTED over it)."""
    shutdown_grace: float = 10.0
    """Seconds in-flight production calls get to finish after SIGTERM/SIGINT."""
    shadow_grace: float = 5.0
    """Seconds in-flight shadow calls get to finish at shutdown before they are cancelled."""
    health_interval: float = 2.0
    """Seconds between checks of the production backend's health (the proxy's own health
    is SERVING while production answers)."""
    exporters: tuple[str, ...] = ("file",)
    """Where spans go: any of ``file``, ``otlp``, ``console``; ``none`` turns tracing off."""
    traces_file: Path = Path("shadow-traces.jsonl")
    """The OTLP-JSON-lines file the ``file`` exporter appends to."""
    otlp_protocol: str = "grpc"
    """``grpc`` or ``http/protobuf`` for the ``otlp`` exporter (endpoint from OTEL_* variables)."""
    record_payloads: bool = True
    """Record request and reply payloads as span events."""
    payload_max_bytes: int = 64 * 1024
    """Cap on one recorded payload; a longer one is cut and flagged ``truncated``."""
    redact_metadata: tuple[str, ...] = ALWAYS_REDACTED_METADATA
    """Metadata keys whose values are replaced by ``[REDACTED]`` in traces."""
    redact_tensors: tuple[str, ...] = ()
    """Tensor names whose contents are replaced by ``[REDACTED]`` in recorded payloads."""
    recorder_queue_size: int = 20_000
    """Outcomes waiting to become spans; over it new outcomes are dropped and counted."""
    log_level: str = "INFO"
    """Python logging level for the proxy's own log lines (stderr)."""
    admin_listen: str | None = "127.0.0.1:50052"
    """``HOST:PORT`` of the admin service (backends at run time); None turns it off. Off
    loopback it requires ``admin_token``."""
    admin_token: str | None = None
    """When set, every admin call must carry ``authorization: Bearer <token>``."""
    state_file: Path | None = None
    """Where run-time changes to the backends are kept, to survive a restart; None keeps
    them in memory only."""
    state_poll_interval: float = 0.25
    """Seconds between checks of the state file for changes made by other workers."""
    workers: int = 1
    """Processes serving the same port (SO_REUSEPORT)."""
    reuse_port: bool = False
    """Share the listening port with other processes (set for each of ``workers``); off, a
    second proxy on the same port fails loudly instead of silently sharing the traffic."""
    tls_cert: Path | None = None
    """PEM certificate chain for the proxy's listener; with ``tls_key`` the proxy speaks TLS."""
    tls_key: Path | None = None
    """PEM private key for ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA certificates; when set, clients must present a certificate it signed (mTLS)."""

    @property
    def backends(self) -> tuple[BackendSettings, ...]:
        """Production first, then the shadows, then the references."""
        return (self.production, *self.shadows, *self.references)

    @property
    def copies(self) -> tuple[BackendSettings, ...]:
        """Every backend that gets a copy of the traffic: shadows, then references."""
        return (*self.shadows, *self.references)


# --------------------------------------------------------------------------- parsing


def parse_duration(text: str | float | int, what: str) -> float:
    """``"2s"``, ``"500ms"``, ``"1.5"`` (seconds) or ``"1m"`` → seconds; must be > 0."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a duration like 2s or 500ms, got {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    elif not isinstance(text, str):
        raise ConfigError(f"{what}: expected a duration like 2s or 500ms, got {text!r}")
    else:
        match = _DURATION_RE.match(text)
        if not match:
            raise ConfigError(f"{what}: expected a duration like 2s or 500ms, got {text!r}")
        number, unit = float(match.group(1)), match.group(2) or "s"
        seconds = number * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]
    if not math.isfinite(seconds) or not seconds > 0:
        raise ConfigError(f"{what}: a duration must be positive and finite, got {text!r}")
    return seconds


def validate_address(address: str, what: str, *, allow_port_zero: bool = False) -> str:
    """Check ``HOST:PORT`` (or ``[v6]:PORT``) and return it stripped."""
    address = address.strip()
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(f"{what}: expected HOST:PORT, got {address!r}")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ConfigError(f"{what}: malformed IPv6 address {address!r}; use [::1]:PORT")
    elif ":" in host:
        raise ConfigError(f"{what}: put an IPv6 host in brackets, like [::1]:PORT; got {address!r}")
    elif not re.match(r"^[A-Za-z0-9.\-_]+$", host):
        raise ConfigError(f"{what}: malformed host in {address!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{what}: port must be {low}..65535, got {port}")
    return address


def _sample_rate(value: Any, what: str) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{what}: sample rate must be a number in [0, 1], got {value!r}"
        ) from None
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"{what}: sample rate must be in [0, 1], got {value!r}")
    return rate


def _positive_int(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a positive whole number, got {value!r}") from None
    if number < 1 or (isinstance(value, float) and value != number):
        raise ConfigError(f"{what}: expected a positive whole number, got {value!r}")
    return number


_BACKEND_KEYS = {
    "sample": "sample_rate",
    "sample_rate": "sample_rate",
    "timeout": "timeout",
    "max_in_flight": "max_in_flight",
    "max-in-flight": "max_in_flight",
    "tls": "tls",
    "ca": "tls_ca_file",
    "tls_ca_file": "tls_ca_file",
}


def _backend(
    name: Any, address: Any, options: Mapping[str, Any], what: str, role: str
) -> BackendSettings:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{what}: backend name must be letters, digits, '.', '_' or '-' (1-63), got {name!r}"
        )
    if not isinstance(address, str):
        raise ConfigError(f"{what}: backend {name!r} needs an address HOST:PORT")
    fields: dict[str, Any] = {
        "role": role,
        "name": name,
        "address": validate_address(address, f"{what} ({name})"),
    }
    for key, value in options.items():
        target = _BACKEND_KEYS.get(key)
        if target is None:
            known = ", ".join(sorted({"sample", "timeout", "max_in_flight", "tls", "ca"}))
            raise ConfigError(
                f"{what}: unknown backend option {key!r} for {name!r}; known: {known}"
            )
        if target == "sample_rate":
            fields[target] = _sample_rate(value, f"{what} ({name})")
        elif target == "timeout":
            fields[target] = parse_duration(value, f"{what} ({name}) timeout")
        elif target == "tls":
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{what} ({name}): tls must be true or false, got {value!r}")
            fields[target] = text in ("true", "1", "yes")
        elif target == "tls_ca_file":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{what} ({name}): ca must be a PEM file path")
            fields[target] = value
            fields["tls"] = True
        else:
            fields[target] = _positive_int(value, f"{what} ({name}) max_in_flight")
    if role == "production" and "sample_rate" in fields and fields["sample_rate"] != 1.0:
        raise ConfigError(
            f"{what}: production always gets every request; drop 'sample' for {name!r}"
        )
    if role != "production" and "timeout" not in fields:
        fields["timeout"] = DEFAULT_SHADOW_TIMEOUT
    return BackendSettings(**fields)


def parse_backend_spec(spec: str, role: str, what: str | None = None) -> BackendSettings:
    """Parse ``NAME=HOST:PORT[,sample=0.25][,timeout=2s][,max_in_flight=64]``."""
    what = what or f"--{role}"
    head, *option_parts = spec.split(",")
    name, sep, address = head.partition("=")
    if not sep:
        raise ConfigError(f"{what}: expected NAME=HOST:PORT[,sample=F][,timeout=D], got {spec!r}")
    options: dict[str, str] = {}
    for part in option_parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(
                f"{what}: expected key=value after the address, got {part!r} in {spec!r}"
            )
        options[key.strip()] = value.strip()
    return _backend(name.strip(), address.strip(), options, what, role)


def _backend_from_config(entry: Any, role: str, what: str) -> BackendSettings:
    if isinstance(entry, str):
        return parse_backend_spec(entry, role, what)
    if isinstance(entry, Mapping):
        rest = {k: v for k, v in entry.items() if k not in ("name", "address")}
        return _backend(entry.get("name"), entry.get("address"), rest, what, role)
    raise ConfigError(f"{what}: expected 'NAME=HOST:PORT' or a mapping with name and address")


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) config file into a dict."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--config: {path} is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"--config: {path} is not valid {path.suffix or 'YAML'}: {first_line}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of settings at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def default_exporters(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The exporters used when neither a flag nor the config file names any.

    ``OTEL_TRACES_EXPORTER`` is honoured (``otlp``, ``console``, ``none``, and our ``file``);
    otherwise the local file, plus OTLP when an OTLP endpoint is set in the environment, so
    that setting ``OTEL_EXPORTER_OTLP_ENDPOINT`` alone sends the traces to Jaeger too.
    """
    chosen = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if chosen:
        return parse_exporters(chosen, "OTEL_TRACES_EXPORTER")
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return ("file", "otlp")
    return ("file",)


def parse_exporters(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    """``"file,otlp"`` or ``["file", "otlp"]`` → a validated tuple; ``none`` means no tracing."""
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(f"{what}: expected a list of exporter names, got {value!r}")
    names = tuple(dict.fromkeys(str(item).strip().lower() for item in items if str(item).strip()))
    for name in names:
        if name not in EXPORTER_CHOICES:
            raise ConfigError(
                f"{what}: unknown exporter {name!r}; choose from {', '.join(EXPORTER_CHOICES)}"
            )
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"{what}: 'none' cannot be combined with other exporters")
        return ()
    return names


def default_otlp_protocol(environ: Mapping[str, str] = os.environ) -> str:
    """The OTLP protocol from the standard variables, ``grpc`` when unset."""
    return (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()


def load_settings(
    *,
    config: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Settings:
    """Merge a config-file mapping with command-line overrides (flags win) into Settings.

    In both mappings ``production`` is ``"NAME=HOST:PORT"`` or a mapping, ``shadows`` a list
    of those. A flag's shadow replaces the file's shadow of the same name and adds any other.
    Every problem raises :class:`ConfigError` with one line that says what to fix.
    """
    config = dict(config or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    known = {f.name for f in dataclasses.fields(Settings)}
    for key in config:
        if key not in known:
            raise ConfigError(
                f"--config: unknown setting {key!r}; known: {', '.join(sorted(known))}"
            )

    production_entry = overrides.get("production", config.get("production"))
    if production_entry is None:
        raise ConfigError(
            "no production backend: pass --production NAME=HOST:PORT (or set it in --config)"
        )
    production_source = "--production" if "production" in overrides else "--config production"
    production = dataclasses.replace(
        _backend_from_config(production_entry, "production", production_source),
        source="flags" if "production" in overrides else "config",
    )

    by_role: dict[str, dict[str, BackendSettings]] = {}
    taken = {production.name: "production"}
    for role, key in (("shadow", "shadows"), ("reference", "references")):
        backends: dict[str, BackendSettings] = {}
        from_file = config.get(key, [])
        if not isinstance(from_file, list):
            raise ConfigError(f"--config: '{key}' must be a list")
        for entry in from_file:
            backend = dataclasses.replace(
                _backend_from_config(entry, role, f"--config {key}"), source="config"
            )
            if backend.name in backends:
                raise ConfigError(f"--config: duplicate backend name {backend.name!r}")
            backends[backend.name] = backend
        seen_flags: set[str] = set()
        for entry in overrides.get(key, []):
            backend = _backend_from_config(entry, role, f"--{role}")
            if backend.name in seen_flags:
                raise ConfigError(f"--{role}: duplicate backend name {backend.name!r}")
            seen_flags.add(backend.name)
            backends[backend.name] = backend
        for name in backends:
            if name in taken:
                raise ConfigError(
                    f"duplicate backend name {name!r}: {taken[name]} and a {role} share it"
                )
            taken[name] = role
        by_role[role] = backends

    merged = {**config, **overrides}
    values: dict[str, Any] = {
        "production": production,
        "shadows": tuple(by_role["shadow"].values()),
        "references": tuple(by_role["reference"].values()),
    }
    if "listen" in merged:
        values["listen"] = validate_address(str(merged["listen"]), "--listen", allow_port_zero=True)
    for key in ("shutdown_grace", "shadow_grace", "health_interval"):
        if key in merged:
            values[key] = parse_duration(merged[key], f"--{key.replace('_', '-')}")
    for key in ("max_message_bytes", "payload_max_bytes", "recorder_queue_size"):
        if key in merged:
            values[key] = _positive_int(merged[key], f"--{key.replace('_', '-')}")
    values["exporters"] = (
        parse_exporters(merged["exporters"], "--exporter")
        if "exporters" in merged
        else default_exporters(environ)
    )
    if "traces_file" in merged:
        if not isinstance(merged["traces_file"], str | os.PathLike) or not str(
            merged["traces_file"]
        ):
            raise ConfigError(f"--traces-file: expected a path, got {merged['traces_file']!r}")
        values["traces_file"] = Path(merged["traces_file"])
    protocol = str(merged.get("otlp_protocol") or default_otlp_protocol(environ))
    if protocol not in ("grpc", "http/protobuf"):
        raise ConfigError(f"OTLP protocol must be grpc or http/protobuf, got {protocol!r}")
    values["otlp_protocol"] = protocol
    if "record_payloads" in merged:
        if not isinstance(merged["record_payloads"], bool):
            raise ConfigError("record_payloads must be true or false")
        values["record_payloads"] = merged["record_payloads"]
    for key in ("redact_metadata", "redact_tensors"):
        if key in merged:
            items = merged[key]
            if isinstance(items, str):
                items = [items]
            if not isinstance(items, list | tuple):
                raise ConfigError(f"{key} must be a list of names")
            names = [str(item).strip() for item in items if str(item).strip()]
            if key == "redact_metadata":
                names = [*ALWAYS_REDACTED_METADATA, *(n.lower() for n in names)]
            values[key] = tuple(dict.fromkeys(names))
    if "never_shadowed" in merged:
        values["never_shadowed"] = _method_names(
            merged["never_shadowed"], "never_shadowed", "--never-shadow"
        )
    if "streaming_methods" in merged:
        values["streaming_methods"] = _method_names(
            merged["streaming_methods"], "streaming_methods", "--streaming-method"
        )
    if "log_level" in merged:
        level = str(merged["log_level"]).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(
                f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {merged['log_level']!r}"
            )
        values["log_level"] = level
    if "tolerance" in merged:
        try:
            tolerance = float(merged["tolerance"])
        except (TypeError, ValueError):
            raise ConfigError(
                f"--tolerance: expected a number, got {merged['tolerance']!r}"
            ) from None
        if not math.isfinite(tolerance) or tolerance < 0:
            raise ConfigError(
                f"--tolerance: must be a finite number >= 0, got {merged['tolerance']!r}"
            )
        values["tolerance"] = tolerance
    if "metrics_port" in merged:
        port = merged["metrics_port"]
        if isinstance(port, bool) or not isinstance(port, int | str) or not str(port).isdigit():
            raise ConfigError(f"--metrics-port: expected a port number, got {port!r}")
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"--metrics-port: port must be 0..65535, got {port}")
        values["metrics_port"] = int(port)
    if "metrics_host" in merged:
        values["metrics_host"] = str(merged["metrics_host"])
    _admin_values(merged, values, environ)
    return Settings(**values)


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _admin_values(
    merged: Mapping[str, Any], values: dict[str, Any], environ: Mapping[str, str]
) -> None:
    """Admin address, token, state file, workers and TLS, with the start-up safety checks."""
    admin = merged.get("admin_listen", "127.0.0.1:50052")
    if admin is None or str(admin).strip().lower() in ("", "off", "none"):
        values["admin_listen"] = None
    else:
        values["admin_listen"] = validate_address(
            str(admin), "--admin-listen", allow_port_zero=True
        )
    token = merged.get("admin_token") or environ.get("SHADOW_PROXY_ADMIN_TOKEN") or None
    values["admin_token"] = str(token) if token else None
    if values["admin_listen"] and not _is_loopback(values["admin_listen"]) and not token:
        raise ConfigError(
            f"--admin-listen {values['admin_listen']} is not a loopback address: anyone who can "
            "reach it could change the backends; set --admin-token (or SHADOW_PROXY_ADMIN_TOKEN)"
        )
    if merged.get("state_file"):
        values["state_file"] = Path(str(merged["state_file"]))
    if "state_poll_interval" in merged:
        values["state_poll_interval"] = parse_duration(
            merged["state_poll_interval"], "--state-poll-interval"
        )
    if "workers" in merged:
        values["workers"] = _positive_int(merged["workers"], "--workers")
    if merged.get("reuse_port"):
        values["reuse_port"] = True
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        if merged.get(key):
            path = Path(str(merged[key]))
            if not path.is_file():
                raise ConfigError(f"--{key.replace('_', '-')}: no such file {path}")
            values[key] = path
    if bool(values.get("tls_cert")) != bool(values.get("tls_key")):
        raise ConfigError("--tls-cert and --tls-key go together")
    if values.get("tls_client_ca") and not values.get("tls_cert"):
        raise ConfigError(
            "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)"
        )
    _check_tls_files(values.get("tls_cert"), values.get("tls_key"), values.get("tls_client_ca"))


def _check_tls_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """Fail at start with a message naming the files, not later with gRPC's "cannot bind"."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"--tls-cert/--tls-key: {cert} and {key} are not a PEM certificate chain and its "
                f"private key ({exc.__class__.__name__}: {exc})"
            ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"--tls-client-ca: {client_ca} holds no PEM CA certificate ({exc})"
            ) from None


__all__ = [
    "BackendSettings",
    "Settings",
    "load_settings",
    "parse_backend_spec",
    "parse_duration",
    "read_config_file",
    "validate_address",
]


def _method_names(items: Any, key: str, flag: str) -> tuple[str, ...]:
    """``never_shadowed`` or ``streaming_methods``: a list of ``/package.Service/Method`` or
    ``/package.Service/``; ``none`` (or an empty list) is the empty list."""
    if isinstance(items, str):
        items = [part for part in items.split(",")]
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{key} must be a list of gRPC method names")
    names = [str(item).strip() for item in items if str(item).strip()]
    if [n.lower() for n in names] == ["none"]:
        return ()
    for name in names:
        service = name[1:].partition("/")[0]
        if not name.startswith("/") or name.count("/") != 2 or not service or " " in name:
            raise ConfigError(
                f"{flag}: {name!r} is not a gRPC method name; expected "
                "/package.Service/Method, or /package.Service/ with the trailing slash for "
                "every method of the service"
            )
    return tuple(dict.fromkeys(names))
