"""The clipsearch Python client: typed stubs for the encoder and search services."""

from client.encoder import EncoderClient, EncodeResults, ModelInfo
from client.errors import (
    ClipsearchError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ItemsFailed,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "ClipsearchError",
    "DeadlineExceeded",
    "EncodeResults",
    "EncoderClient",
    "FailedPrecondition",
    "InvalidArgument",
    "ItemsFailed",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]
