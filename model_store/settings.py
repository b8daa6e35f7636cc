"""Settings read from the environment for the model store (the one place ``model_store`` reads it): where the
store lives and how it is laid out on disk, where decoded built-in datasets are cached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreSettings(BaseSettings):
    """Store location: `--store DIR` beats `VITMERGE_STORE`, which beats `./store`."""

    model_config = SettingsConfigDict(env_prefix="VITMERGE_", extra="ignore")

    store: Path = Path("store")
    keep_versions: int = 5


class DataSettings(BaseSettings):
    """Decoded built-in datasets are kept in ``VITMERGE_DATA_CACHE`` (default ``~/.cache/vitmerge/datasets``;
    ``off`` decodes them in every process)."""

    model_config = SettingsConfigDict(env_prefix="VITMERGE_", extra="ignore")

    data_cache: str = ""

    def cache_root(self) -> Path | None:
        """The cache directory, or None when caching is off."""
        if self.data_cache.lower() in ("off", "0", "none"):
            return None
        return Path(self.data_cache) if self.data_cache else Path.home() / ".cache" / "vitmerge" / "datasets"


@dataclass(frozen=True)
class StoreLayout:
    """Paths inside one store directory.

    store/zoos/<name>/      source zoos (base + task checkpoints + metadata)
    store/bundles/<vN>/     merged bundles, immutable once published
    store/CURRENT           the served bundle's version, switched atomically
    store/.lock             file lock serialising publishes
    """

    root: Path

    @property
    def zoos(self) -> Path:
        return self.root / "zoos"

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"

    @property
    def current(self) -> Path:
        return self.root / "CURRENT"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def zoo(self, name: str) -> Path:
        return self.zoos / name


def resolve_store(store: str | Path | None = None) -> StoreLayout:
    """The store layout for an explicit directory, else the settings' directory."""
    root = Path(store) if store is not None else StoreSettings().store
    return StoreLayout(root.resolve())
