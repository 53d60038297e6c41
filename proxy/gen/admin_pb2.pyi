from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_PRODUCTION: _ClassVar[Role]
    ROLE_SHADOW: _ClassVar[Role]
    ROLE_REFERENCE: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_PRODUCTION: Role
ROLE_SHADOW: Role
ROLE_REFERENCE: Role

class BackendSpec(_message.Message):
    __slots__ = ("name", "address", "role", "sample_rate", "timeout_seconds", "max_in_flight", "tls", "tls_ca_file")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    TLS_CA_FILE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    role: Role
    sample_rate: float
    timeout_seconds: float
    max_in_flight: int
    tls: bool
    tls_ca_file: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., sample_rate: _Optional[float] = ..., timeout_seconds: _Optional[float] = ..., max_in_flight: _Optional[int] = ..., tls: _Optional[bool] = ..., tls_ca_file: _Optional[str] = ...) -> None: ...

class BackendStatus(_message.Message):
    __slots__ = ("spec", "health", "health_detail", "in_flight", "calls", "errors", "compared", "agreed", "dropped", "sampled_out", "unhealthy_skipped", "source")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_DETAIL_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    AGREED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_OUT_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    spec: BackendSpec
    health: str
    health_detail: str
    in_flight: int
    calls: int
    errors: int
    compared: int
    agreed: int
    dropped: int
    sampled_out: int
    unhealthy_skipped: int
    source: str
    def __init__(self, spec: _Optional[_Union[BackendSpec, _Mapping]] = ..., health: _Optional[str] = ..., health_detail: _Optional[str] = ..., in_flight: _Optional[int] = ..., calls: _Optional[int] = ..., errors: _Optional[int] = ..., compared: _Optional[int] = ..., agreed: _Optional[int] = ..., dropped: _Optional[int] = ..., sampled_out: _Optional[int] = ..., unhealthy_skipped: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class RegisterBackendRequest(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: BackendSpec
    def __init__(self, backend: _Optional[_Union[BackendSpec, _Mapping]] = ...) -> None: ...

class RegisterBackendResponse(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: BackendStatus
    def __init__(self, backend: _Optional[_Union[BackendStatus, _Mapping]] = ...) -> None: ...

class DeregisterBackendRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeregisterBackendResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBackendsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBackendsResponse(_message.Message):
    __slots__ = ("backends",)
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[BackendStatus]
    def __init__(self, backends: _Optional[_Iterable[_Union[BackendStatus, _Mapping]]] = ...) -> None: ...

class UpdateBackendRequest(_message.Message):
    __slots__ = ("name", "sample_rate", "timeout_seconds", "max_in_flight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    sample_rate: float
    timeout_seconds: float
    max_in_flight: int
    def __init__(self, name: _Optional[str] = ..., sample_rate: _Optional[float] = ..., timeout_seconds: _Optional[float] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class UpdateBackendResponse(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: BackendStatus
    def __init__(self, backend: _Optional[_Union[BackendStatus, _Mapping]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("name", "remove_old")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REMOVE_OLD_FIELD_NUMBER: _ClassVar[int]
    name: str
    remove_old: bool
    def __init__(self, name: _Optional[str] = ..., remove_old: _Optional[bool] = ...) -> None: ...

class PromoteResponse(_message.Message):
    __slots__ = ("production", "previous")
    PRODUCTION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    production: BackendStatus
    previous: BackendStatus
    def __init__(self, production: _Optional[_Union[BackendStatus, _Mapping]] = ..., previous: _Optional[_Union[BackendStatus, _Mapping]] = ...) -> None: ...
