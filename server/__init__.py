"""The vitmerge inference server and command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vitmerge")
except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
    __version__ = "0.0.0"
