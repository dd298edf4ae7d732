from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_AVAILABLE: _ClassVar[Status]
    STATUS_CHARGING: _ClassVar[Status]
    STATUS_FAULTED: _ClassVar[Status]
STATUS_UNSPECIFIED: Status
STATUS_AVAILABLE: Status
STATUS_CHARGING: Status
STATUS_FAULTED: Status

class GetChargePointRequest(_message.Message):
    __slots__ = ("id", "fail_with_code")
    ID_FIELD_NUMBER: _ClassVar[int]
    FAIL_WITH_CODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    fail_with_code: int
    def __init__(self, id: _Optional[str] = ..., fail_with_code: _Optional[int] = ...) -> None: ...

class ChargePoint(_message.Message):
    __slots__ = ("id", "status", "max_power_kw", "served_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MAX_POWER_KW_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    max_power_kw: float
    served_by: str
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., max_power_kw: _Optional[float] = ..., served_by: _Optional[str] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ("id", "updates", "interval_ms", "fail_with_code")
    ID_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    FAIL_WITH_CODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    updates: int
    interval_ms: int
    fail_with_code: int
    def __init__(self, id: _Optional[str] = ..., updates: _Optional[int] = ..., interval_ms: _Optional[int] = ..., fail_with_code: _Optional[int] = ...) -> None: ...

class StatusUpdate(_message.Message):
    __slots__ = ("id", "status", "sequence", "served_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    sequence: int
    served_by: str
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., sequence: _Optional[int] = ..., served_by: _Optional[str] = ...) -> None: ...

class MeterValue(_message.Message):
    __slots__ = ("charge_point_id", "energy_wh", "fail_with_code")
    CHARGE_POINT_ID_FIELD_NUMBER: _ClassVar[int]
    ENERGY_WH_FIELD_NUMBER: _ClassVar[int]
    FAIL_WITH_CODE_FIELD_NUMBER: _ClassVar[int]
    charge_point_id: str
    energy_wh: float
    fail_with_code: int
    def __init__(self, charge_point_id: _Optional[str] = ..., energy_wh: _Optional[float] = ..., fail_with_code: _Optional[int] = ...) -> None: ...

class UploadSummary(_message.Message):
    __slots__ = ("count", "total_energy_wh", "served_by")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ENERGY_WH_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    count: int
    total_energy_wh: float
    served_by: str
    def __init__(self, count: _Optional[int] = ..., total_energy_wh: _Optional[float] = ..., served_by: _Optional[str] = ...) -> None: ...

class SessionMessage(_message.Message):
    __slots__ = ("charge_point_id", "command", "fail_with_code")
    CHARGE_POINT_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    FAIL_WITH_CODE_FIELD_NUMBER: _ClassVar[int]
    charge_point_id: str
    command: str
    fail_with_code: int
    def __init__(self, charge_point_id: _Optional[str] = ..., command: _Optional[str] = ..., fail_with_code: _Optional[int] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("charge_point_id", "ack", "sequence", "served_by")
    CHARGE_POINT_ID_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    charge_point_id: str
    ack: str
    sequence: int
    served_by: str
    def __init__(self, charge_point_id: _Optional[str] = ..., ack: _Optional[str] = ..., sequence: _Optional[int] = ..., served_by: _Optional[str] = ...) -> None: ...
