"""gRPC channel and server options that clients and services share (no server code here:
the client imports this without the serving stack)."""

from __future__ import annotations

__all__ = ["message_bytes", "message_options"]


def message_bytes(max_message_mb: float) -> int:
    """A --max-message-mb value in bytes: the limit gRPC enforces and the encoder reports."""
    return int(max_message_mb * 1024 * 1024)


def message_options(max_message_mb: float) -> list[tuple[str, int]]:
    """Send and receive limits of `max_message_mb` MiB, for a channel or a server."""
    size = message_bytes(max_message_mb)
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
