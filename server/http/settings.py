"""Server configuration: environment variables ``VITMERGE_*`` and ``vitmerge serve`` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_store.settings import StoreLayout


class ServerSettings(BaseSettings):
    """Every knob of ``vitmerge serve``; env ``VITMERGE_<NAME>`` (e.g. ``VITMERGE_PORT``)."""

    model_config = SettingsConfigDict(env_prefix="VITMERGE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    store: Path = Path("store")
    zoo: str = Field(
        "tiny",
        description="source zoo for startup/admin merges: a preset name, a zoo name in the store, or a directory",
    )
    keep_versions: int = Field(5, ge=1)
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the admin routes; unset = admin routes answer 403"
    )
    api_key: SecretStr | None = Field(
        None, description="optional bearer token / X-API-Key required by /v1/classify and /v2 infer"
    )
    playground: bool = Field(
        True, description="serve the playground page at / (read-only: classify, tasks, versions); false = 404"
    )
    model_name: str = Field(
        "vitmerge",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="the served model's name on the Open Inference Protocol routes (/v2/models/<name>)",
    )

    # startup merge when the store has no CURRENT bundle
    default_method: str = "emr_routed"
    default_params: dict = Field(default_factory=dict)

    # engine
    worker: Literal["thread", "process"] = Field(
        "process",
        # measured faster at concurrency 1-64, task given and routed (BENCHMARKS.md, issue 37)
        description="run the engine in its own process (process: no shared GIL) or in the server process (thread)",
    )
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:N")
    mixing: Literal["exact", "sparse"] = Field(
        "sparse",
        # VITMERGE_STRATEGY: the variable's name before "strategy" came to mean the engine's per-kind executor only
        validation_alias=AliasChoices("mixing", "VITMERGE_MIXING", "VITMERGE_STRATEGY"),
        description="gated bundles: how experts are mixed per image (exact, or sparse: small weights dropped)",
    )
    sparse_threshold: float | None = Field(None, ge=0.0, le=1.0, description="default: the gating benchmark's choice")
    cuda_graphs: bool = Field(
        True, description="on CUDA, replay CUDA graphs of fixed-weight modules (gate, cached task models)"
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch's intra-op threads for inference (in the engine process with worker=process); "
        "None: torch's default (one per core)",
    )
    cache_bytes: int = Field(
        512 * 2**20, ge=0, description="LRU budget for materialised per-task weights; 0 = rebuild every batch"
    )
    malloc_reuse: bool = Field(
        False,
        description="opt-in: glibc malloc keeps freed memory for the next batch (no mmap per big activation): "
        "6-11% faster CPU batches at ViT-B size, but the heap never shrinks and can fragment: a process that "
        "churns weights (EMR at a small cache, repeated hot swaps) grew past 24 GB in a benchmark",
    )

    # batcher
    max_batch_size: int = Field(32, ge=1, le=4096, description="1 disables batching")
    max_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0)
    max_queue: int = Field(1024, ge=1, description="images waiting for the worker; more -> 429")
    request_timeout_s: float = Field(30.0, gt=0.0)

    # HTTP stack (uvicorn): "auto" takes uvloop / httptools when installed (the [standard] extra)
    http_loop: Literal["auto", "asyncio", "uvloop"] = Field("auto", description="event loop of the server")
    http_parser: Literal["auto", "h11", "httptools"] = Field("auto", description="HTTP/1.1 parser of the server")
    keep_alive_s: float = Field(
        75.0,
        gt=0.0,
        description="idle keep-alive connections are closed after this long; keep it above the load balancer's "
        "upstream idle timeout (nginx's upstream keepalive_timeout, 60 s by default; AWS ALB 60 s), or the LB "
        "reuses connections the server is closing and answers 502",
    )

    # request limits
    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    max_images: int = Field(64, ge=1, description="images per request")
    max_image_pixels: int = Field(4096 * 4096, ge=64, description="width*height cap per image (decompression bombs)")
    decode_threads: int = Field(4, ge=1)
    exif_transpose: bool = Field(
        True,
        description="turn photos with an EXIF orientation tag upright before preprocessing (as transformers' "
        "load_image does); false: use the stored pixel order",
    )

    # merges
    agreement_images: int = Field(
        256,
        ge=0,
        description="admin merges record the bundle's top-1 agreement with each task's own model on this many "
        "of the task's test (else calibration) images; 0 skips it",
    )

    # replicas (shared store): poll CURRENT and hot-swap when it changes; 0 disables
    watch_interval_s: float = Field(2.0, ge=0.0)

    @property
    def layout(self) -> StoreLayout:
        return StoreLayout(self.store.resolve())
