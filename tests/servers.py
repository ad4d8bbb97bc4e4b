"""The tests start real services through clipsearch.processes."""

from clipsearch.processes import RunningService, free_port, health_status, running, start_service

__all__ = ["RunningService", "free_port", "health_status", "running", "start_service"]
