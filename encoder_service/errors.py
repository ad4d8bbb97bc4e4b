"""The encoder's startup error, shared by the modules that load and place the model."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """The model could not be loaded or placed; the message says what to change."""
