"""The zoo a server merges from, as its settings name it (spec file, directory, store entry or preset)."""

from __future__ import annotations

from pathlib import Path

from model_store.zoo import Zoo
from server.http.settings import ServerSettings


def resolve_zoo(settings: ServerSettings, build_missing: bool = True, progress: bool = True) -> Zoo:
    """The configured source zoo, tried in this order: a spec file, a directory holding ``zoo.json``, a preset
    (built into the store, or copied from the shipped one, on first use), a zoo of that name in the store.

    ``build_missing=False`` builds nothing: a spec's zoo must be in the store and up to date with the spec and
    its checkpoints, and a preset counts only when the store already holds it.
    """
    value = settings.zoo
    path = Path(value)
    from model_store.zoo_spec import ensure_zoo, is_spec_file, load_spec, spec_hash

    if is_spec_file(value):
        if build_missing:
            return ensure_zoo(path, settings.layout.zoos, progress=progress)
        spec = load_spec(path)
        zoo = Zoo.load(settings.layout.zoo(spec.name))
        if zoo.manifest.config_hash != spec_hash(spec, path.resolve().parent):
            raise FileNotFoundError(f"zoo '{spec.name}' in the store is older than {path}")
        return zoo
    if (path / "zoo.json").exists():
        return Zoo.load(path)
    in_store = settings.layout.zoo(value)
    from model_store.zoo_build.presets import PRESETS  # small module: preset definitions only

    if value in PRESETS and build_missing:
        from model_store.zoo_build.presets import build_zoo

        return build_zoo(value, in_store, progress=progress).zoo
    if (in_store / "zoo.json").exists():
        return Zoo.load(in_store)
    raise FileNotFoundError(
        f"zoo '{value}' not found (not a directory with zoo.json, not in {settings.layout.zoos}, not a preset: "
        f"{', '.join(PRESETS)})"
    )
