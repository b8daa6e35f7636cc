"""The vitmerge server: ``runtime`` (inference on a bundle), ``http`` (the app), ``eval`` (accuracy), ``cli``.

Imports ``merging`` and ``model_store``; nothing imports it from below."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vitmerge")
except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
    __version__ = "0.0.0"
