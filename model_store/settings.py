"""Where the store lives and how it is laid out on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class StoreSettings(BaseSettings):
    """Store location: `--store DIR` beats `VITMERGE_STORE`, which beats `./store`."""

    model_config = SettingsConfigDict(env_prefix="VITMERGE_", extra="ignore")

    store: Path = Path("store")
    keep_versions: int = 5


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
