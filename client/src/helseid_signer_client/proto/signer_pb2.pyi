from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATUS_UNSPECIFIED: _ClassVar[KeyStatus]
    KEY_STATUS_CURRENT: _ClassVar[KeyStatus]
    KEY_STATUS_NEXT: _ClassVar[KeyStatus]
    KEY_STATUS_PREVIOUS: _ClassVar[KeyStatus]
KEY_STATUS_UNSPECIFIED: KeyStatus
KEY_STATUS_CURRENT: KeyStatus
KEY_STATUS_NEXT: KeyStatus
KEY_STATUS_PREVIOUS: KeyStatus

class SignClientAssertionRequest(_message.Message):
    __slots__ = ("profile", "child_organization_number", "parent_organization_number", "avoid_kid")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CHILD_ORGANIZATION_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PARENT_ORGANIZATION_NUMBER_FIELD_NUMBER: _ClassVar[int]
    AVOID_KID_FIELD_NUMBER: _ClassVar[int]
    profile: str
    child_organization_number: str
    parent_organization_number: str
    avoid_kid: str
    def __init__(self, profile: _Optional[str] = ..., child_organization_number: _Optional[str] = ..., parent_organization_number: _Optional[str] = ..., avoid_kid: _Optional[str] = ...) -> None: ...

class SignClientAssertionResponse(_message.Message):
    __slots__ = ("jwt", "kid", "alg", "jti", "issued_at", "expires_at")
    JWT_FIELD_NUMBER: _ClassVar[int]
    KID_FIELD_NUMBER: _ClassVar[int]
    ALG_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    jwt: str
    kid: str
    alg: str
    jti: str
    issued_at: int
    expires_at: int
    def __init__(self, jwt: _Optional[str] = ..., kid: _Optional[str] = ..., alg: _Optional[str] = ..., jti: _Optional[str] = ..., issued_at: _Optional[int] = ..., expires_at: _Optional[int] = ...) -> None: ...

class SignDpopProofRequest(_message.Message):
    __slots__ = ("profile", "htm", "htu", "nonce", "access_token_sha256")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    HTM_FIELD_NUMBER: _ClassVar[int]
    HTU_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_SHA256_FIELD_NUMBER: _ClassVar[int]
    profile: str
    htm: str
    htu: str
    nonce: str
    access_token_sha256: bytes
    def __init__(self, profile: _Optional[str] = ..., htm: _Optional[str] = ..., htu: _Optional[str] = ..., nonce: _Optional[str] = ..., access_token_sha256: _Optional[bytes] = ...) -> None: ...

class SignDpopProofResponse(_message.Message):
    __slots__ = ("jwt", "jkt", "alg", "jti", "issued_at", "htu")
    JWT_FIELD_NUMBER: _ClassVar[int]
    JKT_FIELD_NUMBER: _ClassVar[int]
    ALG_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    HTU_FIELD_NUMBER: _ClassVar[int]
    jwt: str
    jkt: str
    alg: str
    jti: str
    issued_at: int
    htu: str
    def __init__(self, jwt: _Optional[str] = ..., jkt: _Optional[str] = ..., alg: _Optional[str] = ..., jti: _Optional[str] = ..., issued_at: _Optional[int] = ..., htu: _Optional[str] = ...) -> None: ...

class GetClientProfileRequest(_message.Message):
    __slots__ = ("profile",)
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    profile: str
    def __init__(self, profile: _Optional[str] = ...) -> None: ...

class GetClientProfileResponse(_message.Message):
    __slots__ = ("client_id", "issuer", "token_endpoint", "assertion_alg", "assertion_kid", "dpop_alg", "dpop_jkt", "assertion_lifetime_seconds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ASSERTION_ALG_FIELD_NUMBER: _ClassVar[int]
    ASSERTION_KID_FIELD_NUMBER: _ClassVar[int]
    DPOP_ALG_FIELD_NUMBER: _ClassVar[int]
    DPOP_JKT_FIELD_NUMBER: _ClassVar[int]
    ASSERTION_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    issuer: str
    token_endpoint: str
    assertion_alg: str
    assertion_kid: str
    dpop_alg: str
    dpop_jkt: str
    assertion_lifetime_seconds: int
    def __init__(self, client_id: _Optional[str] = ..., issuer: _Optional[str] = ..., token_endpoint: _Optional[str] = ..., assertion_alg: _Optional[str] = ..., assertion_kid: _Optional[str] = ..., dpop_alg: _Optional[str] = ..., dpop_jkt: _Optional[str] = ..., assertion_lifetime_seconds: _Optional[int] = ...) -> None: ...

class GetKeySetRequest(_message.Message):
    __slots__ = ("profile",)
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    profile: str
    def __init__(self, profile: _Optional[str] = ...) -> None: ...

class PublishedKey(_message.Message):
    __slots__ = ("kid", "alg", "key_version", "status", "active_from", "published_until")
    KID_FIELD_NUMBER: _ClassVar[int]
    ALG_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FROM_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    kid: str
    alg: str
    key_version: str
    status: KeyStatus
    active_from: int
    published_until: int
    def __init__(self, kid: _Optional[str] = ..., alg: _Optional[str] = ..., key_version: _Optional[str] = ..., status: _Optional[_Union[KeyStatus, str]] = ..., active_from: _Optional[int] = ..., published_until: _Optional[int] = ...) -> None: ...

class GetKeySetResponse(_message.Message):
    __slots__ = ("jwks_json", "keys", "refresh_hint_seconds")
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REFRESH_HINT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    jwks_json: str
    keys: _containers.RepeatedCompositeFieldContainer[PublishedKey]
    refresh_hint_seconds: int
    def __init__(self, jwks_json: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[PublishedKey, _Mapping]]] = ..., refresh_hint_seconds: _Optional[int] = ...) -> None: ...
