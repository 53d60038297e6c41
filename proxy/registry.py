"""The backends by name: their roles, channels, health and counters; changed at run time.

The request path reads :attr:`Registry.snapshot` once per call: an immutable view with one
production backend and the shadows and references. Every change (register, deregister,
update, promote, a reloaded config) builds a new snapshot and swaps it in with one
assignment, so each call is served by exactly one production backend, whichever
snapshot it took.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from proxy.errors import ConfigError
from proxy.settings import (
    DEFAULT_SHADOW_TIMEOUT,
    BackendSettings,
    parse_backend_spec,
    validate_address,
)
from proxy.upstream import Upstream

log = logging.getLogger(__name__)

ROLES = ("production", "shadow", "reference")


class RegistryError(Exception):
    """A change the registry refuses; the admin edge maps ``code`` to the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class BackendStats:
    """Counters for one backend, read by logs, metrics, the admin API and tests."""

    sent: int = 0
    """Calls started (for shadows: copies sent)."""
    ok: int = 0
    failed: int = 0
    timed_out: int = 0
    dropped: int = 0
    """Copies not sent because the backend already had max_in_flight calls in flight."""
    sampled_out: int = 0
    unhealthy_skipped: int = 0
    """Copies not sent because the backend's health check said it is not serving."""
    cancelled: int = 0
    """Calls cancelled by the proxy (shutdown grace ran out) or by the client."""
    compared: int = 0
    agreed: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)
    by_code: dict[str, int] = field(default_factory=dict)
    """Calls by the status the backend gave (OK included), for metrics."""

    def count(self, code: grpc.StatusCode, *, cancelled_by_proxy: bool = False) -> None:
        self.by_code[code.name] = self.by_code.get(code.name, 0) + 1
        if code is grpc.StatusCode.OK:
            self.ok += 1
        elif code is grpc.StatusCode.CANCELLED and cancelled_by_proxy:
            self.cancelled += 1
        else:
            self.failed += 1
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                self.timed_out += 1
            self.errors_by_code[code.name] = self.errors_by_code.get(code.name, 0) + 1

    def summary(self) -> str:
        return (
            f"sent={self.sent} ok={self.ok} failed={self.failed} timed_out={self.timed_out} "
            f"dropped={self.dropped} sampled_out={self.sampled_out} "
            f"unhealthy_skipped={self.unhealthy_skipped} cancelled={self.cancelled}"
        )


class Backend:
    """One registered backend: settings, channel, health, calls in flight, counters.

    The channel and counters survive a change of role (a promoted shadow keeps its
    connection and its history); settings are replaced by updates.
    """

    __slots__ = ("health", "health_detail", "in_flight", "settings", "stats", "upstream")

    def __init__(self, settings: BackendSettings, upstream: Upstream) -> None:
        self.settings = settings
        self.upstream = upstream
        self.in_flight = 0
        self.stats = BackendStats()
        self.health = "unknown"
        self.health_detail = ""

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def role(self) -> str:
        return self.settings.role

    @property
    def serving(self) -> bool:
        """False only when a health check said so; unknown counts as serving."""
        return self.health != "not_serving"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The backends as one call sees them."""

    production: Backend
    copies: tuple[Backend, ...]
    """Shadows, then references: every backend that gets a copy of the traffic."""

    def all(self) -> tuple[Backend, ...]:
        return (self.production, *self.copies)


UpstreamFactory = Callable[[BackendSettings], Upstream]


class Registry:
    """Owns the backends and every change to them."""

    def __init__(self, backends: Iterable[BackendSettings], make_upstream: UpstreamFactory) -> None:
        self._make_upstream = make_upstream
        self._by_name: dict[str, Backend] = {}
        self._retired: list[Upstream] = []
        self.listeners: list[Callable[[Snapshot], None]] = []
        self.snapshot = self._build(list(backends))

    # ------------------------------------------------------------------ reading

    def get(self, name: str) -> Backend:
        backend = self._by_name.get(name)
        if backend is None:
            raise RegistryError(grpc.StatusCode.NOT_FOUND, f"no backend named {name!r}")
        return backend

    def find(self, name: str) -> Backend | None:
        return self._by_name.get(name)

    def backends(self) -> tuple[Backend, ...]:
        """Production first, then shadows, then references."""
        return self.snapshot.all()

    def settings(self) -> list[BackendSettings]:
        return [backend.settings for backend in self.backends()]

    # ------------------------------------------------------------------ changing

    def register(self, settings: BackendSettings) -> Backend:
        """Add a shadow or reference."""
        self._swap(with_registered(self.settings(), settings))
        return self._by_name[settings.name]

    def deregister(self, name: str) -> None:
        self._swap(without(self.settings(), name))

    def update(self, name: str, changes: Mapping[str, Any]) -> Backend:
        """Change a backend's sample rate, timeout or bound."""
        self._swap(with_update(self.settings(), name, changes))
        return self._by_name[name]

    def promote(self, name: str, *, remove_old: bool = False) -> tuple[Backend, Backend | None]:
        """Make a shadow the production backend, atomically; returns (new, old or None)."""
        old = self.snapshot.production.name
        self._swap(with_promotion(self.settings(), name, remove_old=remove_old))
        return self._by_name[name], self._by_name.get(old)

    def apply(self, change: Mapping[str, Any]) -> None:
        """Apply one recorded change (see :func:`apply_change`)."""
        self._swap(apply_change(self.settings(), change))

    def replace_all(self, desired: Iterable[BackendSettings]) -> None:
        """Make the registry hold exactly ``desired`` (a reloaded config, a state file)."""
        self._swap(list(desired))

    def take_retired(self) -> list[Upstream]:
        """Channels of removed backends, for the caller to close once calls on them end."""
        retired, self._retired = self._retired, []
        return retired

    # ------------------------------------------------------------------ internals

    def _swap(self, desired: list[BackendSettings]) -> None:
        snapshot = self._build(desired)
        self.snapshot = snapshot
        for listener in self.listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("registry listener failed")

    def _build(self, desired: list[BackendSettings]) -> Snapshot:
        """Validate the whole desired set first, then reuse or make backends; raises
        RegistryError and leaves the registry unchanged when the set is unusable."""
        names = [s.name for s in desired]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise RegistryError(
                grpc.StatusCode.ALREADY_EXISTS, f"duplicate backend name {sorted(duplicates)[0]!r}"
            )
        productions = [s for s in desired if s.role == "production"]
        if len(productions) != 1:
            raise RegistryError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "exactly one production backend is needed"
                + (f", got {len(productions)}" if productions else ", got none"),
            )
        for settings in desired:
            validated(settings)
        # Make the new channels first: if one cannot be made (say, an unreadable CA file),
        # nothing has changed yet.
        made: dict[str, Upstream] = {}
        try:
            for settings in desired:
                existing = self._by_name.get(settings.name)
                if existing is None or not _same_channel(existing.settings, settings):
                    made[settings.name] = self._make_upstream(settings)
        except ConfigError as exc:
            self._retired.extend(made.values())
            raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        by_name: dict[str, Backend] = {}
        for settings in desired:
            existing = self._by_name.get(settings.name)
            if settings.name in made:
                if existing is not None:
                    self._retired.append(existing.upstream)
                by_name[settings.name] = Backend(settings, made[settings.name])
            else:
                assert existing is not None
                existing.settings = settings
                by_name[settings.name] = existing
        for name, backend in self._by_name.items():
            if name not in by_name:
                self._retired.append(backend.upstream)
        self._by_name = by_name
        production = by_name[productions[0].name]
        shadows = tuple(by_name[s.name] for s in desired if s.role == "shadow")
        references = tuple(by_name[s.name] for s in desired if s.role == "reference")
        return Snapshot(production, (*shadows, *references))


# ---------------------------------------------------------------------- pure changes
# Each takes the backends as they are and returns them as they would be after the change,
# or raises RegistryError; the registry applies the result, and a worker replaying the
# state file computes the same result from the same changes.


def _find(current: list[BackendSettings], name: str) -> BackendSettings:
    for settings in current:
        if settings.name == name:
            return settings
    raise RegistryError(grpc.StatusCode.NOT_FOUND, f"no backend named {name!r}")


def with_registered(
    current: list[BackendSettings], settings: BackendSettings
) -> list[BackendSettings]:
    if settings.role not in ("shadow", "reference"):
        raise RegistryError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"cannot register {settings.name!r} as {settings.role}: register it as a shadow "
            "and promote it",
        )
    validated(settings)
    if any(s.name == settings.name for s in current):
        raise RegistryError(
            grpc.StatusCode.ALREADY_EXISTS, f"a backend named {settings.name!r} already exists"
        )
    if settings.timeout is None:
        settings = dataclasses.replace(settings, timeout=DEFAULT_SHADOW_TIMEOUT)
    return [*current, settings]


def without(current: list[BackendSettings], name: str) -> list[BackendSettings]:
    if _find(current, name).role == "production":
        raise RegistryError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{name!r} is the production backend; promote another backend first",
        )
    return [s for s in current if s.name != name]


def with_update(
    current: list[BackendSettings], name: str, changes: Mapping[str, Any]
) -> list[BackendSettings]:
    backend = _find(current, name)
    unknown = set(changes) - {"sample_rate", "timeout", "max_in_flight"}
    if unknown:
        raise RegistryError(
            grpc.StatusCode.INVALID_ARGUMENT, f"cannot update {', '.join(sorted(unknown))}"
        )
    if not changes:
        raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, "nothing to update")
    if backend.role == "production" and changes.get("sample_rate", 1.0) != 1.0:
        raise RegistryError(
            grpc.StatusCode.FAILED_PRECONDITION, "production always gets every request"
        )
    updated = validated(dataclasses.replace(backend, **changes))
    return [updated if s.name == name else s for s in current]


def with_promotion(
    current: list[BackendSettings], name: str, *, remove_old: bool = False
) -> list[BackendSettings]:
    backend = _find(current, name)
    if backend.role == "production":
        raise RegistryError(
            grpc.StatusCode.FAILED_PRECONDITION, f"{name!r} is already the production backend"
        )
    if backend.role != "shadow":
        raise RegistryError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{name!r} is a {backend.role}; only a shadow can be promoted",
        )
    desired: list[BackendSettings] = []
    for settings in current:
        if settings.name == name:
            # Production is bounded by its clients' deadlines, not by a shadow's timeout.
            desired.insert(
                0, dataclasses.replace(settings, role="production", sample_rate=1.0, timeout=None)
            )
        elif settings.role == "production":
            if not remove_old:
                timeout = settings.timeout or DEFAULT_SHADOW_TIMEOUT
                desired.append(dataclasses.replace(settings, role="shadow", timeout=timeout))
        else:
            desired.append(settings)
    return desired


def settings_to_dict(settings: BackendSettings) -> dict[str, Any]:
    """A backend's settings as plain JSON-ready data (the state file's form)."""
    return {
        "name": settings.name,
        "address": settings.address,
        "role": settings.role,
        "sample_rate": settings.sample_rate,
        "timeout": settings.timeout,
        "max_in_flight": settings.max_in_flight,
        "tls": settings.tls,
        "tls_ca_file": settings.tls_ca_file,
    }


def settings_from_dict(data: Mapping[str, Any], source: str = "admin") -> BackendSettings:
    try:
        return BackendSettings(
            name=str(data["name"]),
            address=str(data["address"]),
            role=str(data.get("role", "shadow")),
            sample_rate=float(data.get("sample_rate", 1.0)),
            timeout=None if data.get("timeout") is None else float(data["timeout"]),
            max_in_flight=int(data.get("max_in_flight", 256)),
            tls=bool(data.get("tls", False)),
            tls_ca_file=data.get("tls_ca_file") or None,
            source=source,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed backend: {exc}") from None


def apply_change(
    current: list[BackendSettings], change: Mapping[str, Any]
) -> list[BackendSettings]:
    """Apply one change as the admin API records it: ``{"op": "register", "backend": {...}}``,
    ``{"op": "deregister", "name": ...}``, ``{"op": "update", "name": ..., "changes": {...}}``
    or ``{"op": "promote", "name": ..., "remove_old": bool}``."""
    op = change.get("op")
    if op == "register":
        return with_registered(current, settings_from_dict(change.get("backend") or {}))
    if op == "deregister":
        return without(current, str(change.get("name")))
    if op == "update":
        return with_update(current, str(change.get("name")), dict(change.get("changes") or {}))
    if op == "promote":
        return with_promotion(
            current, str(change.get("name")), remove_old=bool(change.get("remove_old"))
        )
    raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown change {op!r}")


def replay(
    base: list[BackendSettings], changes: Iterable[Mapping[str, Any]]
) -> tuple[list[BackendSettings], list[str]]:
    """The backends after applying recorded changes to a base set (the config); a change
    that no longer applies (its backend left the config, say) is skipped and reported."""
    current = list(base)
    skipped: list[str] = []
    for change in changes:
        try:
            current = apply_change(current, change)
        except RegistryError as exc:
            skipped.append(f"{change.get('op')} {change.get('name') or ''}: {exc.message}".strip())
    return current, skipped


def _same_channel(old: BackendSettings, new: BackendSettings) -> bool:
    return (old.address, old.tls, old.tls_ca_file) == (new.address, new.tls, new.tls_ca_file)


def validated(settings: BackendSettings) -> BackendSettings:
    """Check one backend's settings as the config loader would; RegistryError if bad."""
    try:
        if settings.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {settings.role!r}")
        # Round-trip through the flag parser: one set of rules for every source.
        spec = f"{settings.name}={settings.address}"
        parse_backend_spec(spec, settings.role, "backend")
        validate_address(settings.address, f"backend {settings.name!r}")
        if not 0.0 <= settings.sample_rate <= 1.0:
            raise ConfigError(f"sample rate must be in [0, 1], got {settings.sample_rate}")
        if settings.timeout is not None and not settings.timeout > 0:
            raise ConfigError(f"timeout must be positive, got {settings.timeout}")
        if settings.max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be at least 1, got {settings.max_in_flight}")
    except ConfigError as exc:
        raise RegistryError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    return settings
