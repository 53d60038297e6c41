"""The proxy's few error classes and the one place that maps failures to gRPC statuses."""

from __future__ import annotations

import grpc


class ConfigError(ValueError):
    """The configuration is unusable; the command line reports it and exits 2."""


class BackendUnreachable(Exception):
    """The proxy could not get an answer from a backend (as opposed to the backend answering
    with an error status, which is passed through untouched)."""

    def __init__(self, role: str, name: str, address: str, code: grpc.StatusCode, details: str):
        self.role = role
        self.name = name
        self.address = address
        self.code = code
        self.details = details
        super().__init__(self.client_details())

    def client_details(self) -> str:
        """What the client is told: which backend failed and why, in one line."""
        what = (
            "did not answer in time"
            if self.code is grpc.StatusCode.DEADLINE_EXCEEDED
            else ("is unavailable")
        )
        return f"{self.role} backend '{self.name}' ({self.address}) {what}: {self.details}"


def status_for_unreachable(code: grpc.StatusCode) -> grpc.StatusCode:
    """The status a client gets when the proxy itself could not reach production.

    A deadline stays a deadline (the client's own budget ran out); every other transport
    failure (refused connection, reset, GOAWAY) is UNAVAILABLE, the code gRPC clients retry.
    """
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return code
    if code is grpc.StatusCode.INTERNAL:
        return code
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        # gRPC's own message-size limit: the client's payload or the reply was too large.
        return code
    return grpc.StatusCode.UNAVAILABLE
