"""The admin service: register, deregister, list, update and promote backends at run time."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from grpc import aio

from proxy.gen import admin_pb2, admin_pb2_grpc
from proxy.registry import Backend, Registry, RegistryError, settings_to_dict
from proxy.settings import BackendSettings

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["ProxyAdmin"].full_name
_ROLE_NAMES = {
    admin_pb2.ROLE_PRODUCTION: "production",
    admin_pb2.ROLE_SHADOW: "shadow",
    admin_pb2.ROLE_REFERENCE: "reference",
}
_ROLE_VALUES = {name: value for value, name in _ROLE_NAMES.items()}

Change = Callable[[Mapping[str, Any]], None]


def spec_of(settings: BackendSettings) -> admin_pb2.BackendSpec:
    spec = admin_pb2.BackendSpec(
        name=settings.name,
        address=settings.address,
        role=_ROLE_VALUES[settings.role],
        sample_rate=settings.sample_rate,
        max_in_flight=settings.max_in_flight,
        tls=settings.tls,
        tls_ca_file=settings.tls_ca_file or "",
    )
    if settings.timeout is not None:
        spec.timeout_seconds = settings.timeout
    return spec


def status_of(backend: Backend) -> admin_pb2.BackendStatus:
    stats = backend.stats
    return admin_pb2.BackendStatus(
        spec=spec_of(backend.settings),
        health=backend.health,
        health_detail=backend.health_detail,
        in_flight=backend.in_flight,
        calls=stats.sent,
        errors=stats.failed,
        compared=stats.compared,
        agreed=stats.agreed,
        dropped=stats.dropped,
        sampled_out=stats.sampled_out,
        unhealthy_skipped=stats.unhealthy_skipped,
        source=backend.settings.source,
    )


def _registration(spec: admin_pb2.BackendSpec) -> dict[str, Any]:
    role = _ROLE_NAMES.get(spec.role)
    if role is None:
        raise RegistryError(
            grpc.StatusCode.INVALID_ARGUMENT, "role must be ROLE_SHADOW or ROLE_REFERENCE"
        )
    data: dict[str, Any] = {
        "name": spec.name,
        "address": spec.address,
        "role": role,
        "tls": spec.tls or bool(spec.tls_ca_file),
        "tls_ca_file": spec.tls_ca_file or None,
    }
    if spec.HasField("sample_rate"):
        data["sample_rate"] = spec.sample_rate
    if spec.HasField("timeout_seconds"):
        data["timeout"] = spec.timeout_seconds
    if spec.HasField("max_in_flight"):
        data["max_in_flight"] = spec.max_in_flight
    return data


class AdminServicer(admin_pb2_grpc.ProxyAdminServicer):
    """Every change goes through ``change`` (validated, applied, persisted); a rejected
    change leaves the registry as it was."""

    def __init__(self, registry: Registry, change: Change, token: str | None) -> None:
        self._registry = registry
        self._change = change
        self._expected = f"Bearer {token}".encode() if token else None

    async def _authorize(self, context: aio.ServicerContext) -> None:
        if self._expected is None:
            return
        sent = dict(context.invocation_metadata() or ()).get("authorization", "")
        given = sent.encode() if isinstance(sent, str) else sent
        if not hmac.compare_digest(given, self._expected):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "admin calls need 'authorization: Bearer <admin token>' metadata",
            )

    async def _apply(self, change: Mapping[str, Any], context: aio.ServicerContext) -> None:
        try:
            self._change(change)
        except RegistryError as exc:
            await context.abort(exc.code, exc.message)

    async def RegisterBackend(
        self, request: admin_pb2.RegisterBackendRequest, context: aio.ServicerContext
    ) -> admin_pb2.RegisterBackendResponse:
        await self._authorize(context)
        try:
            backend = _registration(request.backend)
        except RegistryError as exc:
            await context.abort(exc.code, exc.message)
        await self._apply({"op": "register", "backend": backend}, context)
        return admin_pb2.RegisterBackendResponse(
            backend=status_of(self._registry.get(request.backend.name))
        )

    async def DeregisterBackend(
        self, request: admin_pb2.DeregisterBackendRequest, context: aio.ServicerContext
    ) -> admin_pb2.DeregisterBackendResponse:
        await self._authorize(context)
        await self._apply({"op": "deregister", "name": request.name}, context)
        return admin_pb2.DeregisterBackendResponse()

    async def ListBackends(
        self, request: admin_pb2.ListBackendsRequest, context: aio.ServicerContext
    ) -> admin_pb2.ListBackendsResponse:
        await self._authorize(context)
        return admin_pb2.ListBackendsResponse(
            backends=[status_of(b) for b in self._registry.backends()]
        )

    async def UpdateBackend(
        self, request: admin_pb2.UpdateBackendRequest, context: aio.ServicerContext
    ) -> admin_pb2.UpdateBackendResponse:
        await self._authorize(context)
        changes: dict[str, Any] = {}
        if request.HasField("sample_rate"):
            changes["sample_rate"] = request.sample_rate
        if request.HasField("timeout_seconds"):
            changes["timeout"] = request.timeout_seconds
        if request.HasField("max_in_flight"):
            changes["max_in_flight"] = request.max_in_flight
        await self._apply({"op": "update", "name": request.name, "changes": changes}, context)
        return admin_pb2.UpdateBackendResponse(backend=status_of(self._registry.get(request.name)))

    async def Promote(
        self, request: admin_pb2.PromoteRequest, context: aio.ServicerContext
    ) -> admin_pb2.PromoteResponse:
        await self._authorize(context)
        old = self._registry.snapshot.production.name
        await self._apply(
            {"op": "promote", "name": request.name, "remove_old": request.remove_old}, context
        )
        response = admin_pb2.PromoteResponse(production=status_of(self._registry.get(request.name)))
        previous = self._registry.find(old)
        if previous is not None:
            response.previous.CopyFrom(status_of(previous))
        return response


__all__ = ["ADMIN_SERVICE", "AdminServicer", "settings_to_dict", "spec_of", "status_of"]
