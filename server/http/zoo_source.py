"""The zoo a server merges from, as its settings name it (spec file, directory, store entry or preset)."""

from __future__ import annotations

from pathlib import Path

from model_store.zoo import Zoo
from server.http.settings import ServerSettings


def resolve_zoo(settings: ServerSettings, build_missing: bool = True, progress: bool = True) -> Zoo:
    """The configured source zoo: a spec file, a directory, a zoo in the store, or a preset built on demand.

    A zoo spec (YAML) is created in the store on first use and re-created when the spec
    or its checkpoints changed (``build_missing=False``: only an up-to-date one is returned).
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
