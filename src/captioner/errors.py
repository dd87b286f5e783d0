"""Typed errors: the CLI maps them to exit codes and the web app to HTTP statuses."""

from __future__ import annotations


class CaptionerError(Exception):
    """Base class for every error the toolkit raises on purpose (bad input, bad state)."""


class ImageLoadError(CaptionerError):
    """An image file is missing, corrupt, not an image, or too large to decode safely."""


class DataError(CaptionerError):
    """Caption files, split lists or dataset layout are missing or malformed."""


class VocabularyError(CaptionerError):
    """A vocabulary file is malformed or a token id is out of range."""


class CacheError(CaptionerError):
    """A feature cache is inconsistent with what was asked for."""


class CheckpointError(CaptionerError):
    """A checkpoint or saved model directory is missing, corrupt or incompatible."""


class ConfigError(CaptionerError):
    """A configuration has unknown keys or values out of range."""
