from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Mapping as _Mapping, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatsRequest(_message.Message):
    __slots__ = ("reset",)
    RESET_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    def __init__(self, reset: bool = ...) -> None: ...

class SetServingRequest(_message.Message):
    __slots__ = ("serving",)
    SERVING_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    def __init__(self, serving: bool = ...) -> None: ...

class ConfigureRequest(_message.Message):
    __slots__ = ("service_time_ms", "max_concurrent")
    SERVICE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    service_time_ms: int
    max_concurrent: int
    def __init__(self, service_time_ms: _Optional[int] = ..., max_concurrent: _Optional[int] = ...) -> None: ...

class PodStats(_message.Message):
    __slots__ = ("pod_name", "calls", "total_calls", "in_flight", "max_in_flight", "rejected", "messages_in", "messages_out", "serving", "service_time_ms", "max_concurrent")
    class CallsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CALLS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_IN_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_OUT_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    pod_name: str
    calls: _containers.ScalarMap[str, int]
    total_calls: int
    in_flight: int
    max_in_flight: int
    rejected: int
    messages_in: int
    messages_out: int
    serving: bool
    service_time_ms: int
    max_concurrent: int
    def __init__(self, pod_name: _Optional[str] = ..., calls: _Optional[_Mapping[str, int]] = ..., total_calls: _Optional[int] = ..., in_flight: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., rejected: _Optional[int] = ..., messages_in: _Optional[int] = ..., messages_out: _Optional[int] = ..., serving: bool = ..., service_time_ms: _Optional[int] = ..., max_concurrent: _Optional[int] = ...) -> None: ...
