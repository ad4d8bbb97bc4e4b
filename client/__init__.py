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
from client.queries import GetResult, Page, Part, Similar, StoredItem
from client.search import (
    Filter,
    Hit,
    IndexFailure,
    IndexItem,
    IndexSummary,
    SearchClient,
    Stats,
    image_files,
)

__all__ = [
    "ClipsearchError",
    "DeadlineExceeded",
    "EncodeResults",
    "EncoderClient",
    "FailedPrecondition",
    "Filter",
    "GetResult",
    "Hit",
    "IndexFailure",
    "IndexItem",
    "IndexSummary",
    "InvalidArgument",
    "ItemsFailed",
    "ModelInfo",
    "NotFound",
    "Page",
    "Part",
    "PermissionDenied",
    "ResourceExhausted",
    "SearchClient",
    "Similar",
    "Stats",
    "StoredItem",
    "Unauthenticated",
    "Unavailable",
    "image_files",
]
