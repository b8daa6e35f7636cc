"""Request and response bodies of the HTTP API (pydantic; they make the OpenAPI docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model_store.schema import TaskAgreement

MAX_TOP_K = 20


class ClassifyOptions(BaseModel):
    """Options of a classify request (JSON body fields, form fields or query parameters)."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, min_length=1, description="task name; skips the gate for every image")
    top_k: int = Field(1, ge=1, le=MAX_TOP_K, description="classes returned per image")


class ClassifyJSON(ClassifyOptions):
    """``application/json`` body: base64 images (plain or ``data:image/...;base64,`` URLs)."""

    images: list[Annotated[str, Field(min_length=1)]] = Field(
        ...,
        min_length=1,
        description="base64-encoded PNG/JPEG/GIF/BMP/WEBP/TIFF images (plain or `data:image/...;base64,` URLs)",
    )


class TaskPrediction(BaseModel):
    name: str
    index: int
    probability: float = Field(description="p(task | image) from the gate; 1.0 when given")
    source: Literal["gate", "given"]
    probabilities: dict[str, float] = Field(
        description="p(task | image) of every served task (task name -> p): the gate's softmax; one-hot when given"
    )


class ClassScore(BaseModel):
    index: int
    label: str
    probability: float


class ImagePrediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    task: TaskPrediction
    class_: ClassScore = Field(alias="class")
    top_k: list[ClassScore]


class Timing(BaseModel):
    total_ms: float
    decode_ms: float
    queue_ms: float = Field(description="longest wait of this request's images before their batch")
    inference_ms: float = Field(description="engine time of the batches that ran this request's images")
    batch_sizes: list[int]


class ClassifyResponse(BaseModel):
    model_version: str
    predictions: list[ImagePrediction]
    timing: Timing


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(..., min_length=1, description="a merge method (`vitmerge methods`), e.g. emr_routed")
    params: dict[str, Any] = Field(default_factory=dict)
    tasks: list[str] | None = Field(None, min_length=1, description="subset of the zoo's tasks (default: all)")
    target_agreement: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="choose settings without labels: publish the smallest bundle of a grid (f, bits, router_k) "
        "whose routed top-1 agreement with each task's own model reaches this on every task's held-out "
        "calibration images (e.g. 0.995)",
    )
    grid: dict[str, Annotated[list[bool | int | float | str], Field(min_length=1, max_length=64)]] | None = Field(
        None, description='with target_agreement: values per swept parameter, e.g. {"f": [0.03, 0.06], "bits": [8, 4]}'
    )


class MergeJobView(BaseModel):
    id: str
    method: str
    params: dict[str, Any]
    tasks: list[str] | None
    target_agreement: float | None = None
    grid: dict[str, list[bool | int | float | str]] | None = None
    state: Literal["queued", "running", "succeeded", "failed"]
    phase: str
    progress: float
    error: str | None
    version: str | None
    created_at: str
    finished_at: str | None
    seconds: float | None


class TaskInfo(BaseModel):
    name: str
    index: int
    classes: list[str]


class TasksResponse(BaseModel):
    model_version: str
    gate: bool
    tasks: list[TaskInfo]


class ModelVersion(BaseModel):
    version: str
    method: str
    tasks: list[str]
    created_at: str
    current: bool
    serving: bool
    agreement: list[TaskAgreement] | None = Field(
        None,
        description="per task, how often this bundle's top-1 equals the task's own model's on the task's images "
        "(measured at merge, no labels read; None: not measured)",
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. invalid_image, unknown_task")
    message: str = Field(description="what was wrong, for a person")
    request_id: str | None = Field(None, description="the request's X-Request-ID (also a response header)")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body."""

    error: ErrorDetail


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    model_version: str | None


class ModelsResponse(BaseModel):
    current: str | None
    serving: str | None
    versions: list[ModelVersion]
