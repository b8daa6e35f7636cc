"""The Open Inference Protocol's JSON objects (REST), as pydantic models: they validate requests and make the docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Tensor datatypes the protocol defines (we read FP32 and BYTES inputs; others are refused by name).
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]


class _Open(BaseModel):
    """Protocol objects may carry extension fields; unknown ones are kept, not refused."""

    model_config = ConfigDict(extra="allow")


class InferInputTensor(_Open):
    name: str = Field(min_length=1)
    shape: list[int] = Field(description="dimensions; every one >= 0")
    datatype: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = Field(None, description="row-major elements (flat or nested); absent with binary_data_size")


class RequestedOutput(_Open):
    name: str = Field(min_length=1)
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="binary_data (bool), classification (k: top-k as 'p:index:label')"
    )


class InferRequest(_Open):
    id: str | None = None
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="binary_data_output (bool), top_k (int: PROBABILITIES as top-k strings)"
    )
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutputTensor]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 = any size")
    parameters: dict[str, Any] | None = None


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] = Field(default_factory=dict, description="tasks, classes, preprocessing, method")


class RepositoryIndexRequest(_Open):
    ready: bool = Field(False, strict=True, description="list only the versions that are being served")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str = ""


class RepositoryLoadRequest(_Open):
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="version: the bundle version to serve (default: the store's CURRENT)"
    )


class V2Error(BaseModel):
    """Error body of every ``/v2`` route (the protocol's form)."""

    error: str
