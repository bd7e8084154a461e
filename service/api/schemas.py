"""Request and response bodies of the API (the shapes clients rely on), with OpenAPI examples."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    field_validator,
)

T = TypeVar("T")

#: Longest identity or camera value anywhere (the database columns' size), stored or filtered on.
MAX_METADATA_LENGTH = 200
#: Most values one filter list may hold (cameras of a search): a deployment has tens to hundreds.
MAX_FILTER_VALUES = 1000
#: Most keys, and most bytes as JSON, of a job's layout ``options`` (a manifest name, a test size).
MAX_OPTION_KEYS = 32
MAX_OPTIONS_BYTES = 4096

MetadataValue = Annotated[str, StringConstraints(min_length=1, max_length=MAX_METADATA_LENGTH)]


def _bounded_options(options: dict[str, Any]) -> dict[str, Any]:
    # Each layout checks its own options (api/jobs.check_dataset); this bounds what any of them is
    # handed, so that a free-form field cannot carry megabytes into the job table and the logs.
    if len(options) > MAX_OPTION_KEYS:
        raise ValueError(f"at most {MAX_OPTION_KEYS} options, got {len(options)}")
    size = len(json.dumps(options, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_OPTIONS_BYTES:
        raise ValueError(f"options take {size} bytes as JSON, more than the {MAX_OPTIONS_BYTES} allowed")
    return options


#: A dataset layout's options, bounded in keys and size (see :func:`_bounded_options`).
LayoutOptions = Annotated[dict[str, Any], AfterValidator(_bounded_options)]

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
#: Order of a listing by id: ``asc`` oldest first, ``desc`` newest first.
SortOrder = Literal["asc", "desc"]


class Page(BaseModel, Generic[T]):
    """One page of a listing; pass ``next_cursor`` back as ``cursor`` for the next one."""

    items: list[T]
    next_cursor: str | None = Field(None, description="Opaque cursor of the next page; null on the last.")


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    """The id after which a page starts (0 for the first page); raises ValueError on a bad cursor."""
    if not cursor:
        return 0
    padded = cursor + "=" * (-len(cursor) % 4)
    text = base64.urlsafe_b64decode(padded.encode()).decode()
    prefix, _, value = text.partition(":")
    if prefix != "id" or not value.isdigit() or len(value) > 19 or int(value) > 2**63 - 1:
        raise ValueError(cursor)  # also an id past any key: SQLite could not bind it
    return int(value)


# ------------------------------------------------------------------------------------------- models


class ModelOut(BaseModel):
    name: str = Field(examples=["person"])
    version: str = Field(
        examples=["3f2a9c01b7de"], description="First 12 hex digits of the weights' SHA-256."
    )
    kind: str = Field(examples=["person"])
    dim: int = Field(examples=[512])
    input_size: list[int] = Field(examples=[[256, 128]], description="(height, width)")
    architecture: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = Field(None, description="Evaluation recorded at export time.")
    default: bool = Field(description="Whether this version answers to the bare name.")
    device: str = Field(examples=["cuda:0"])
    dtype: str = Field(examples=["float16"])
    runtime: str = Field(examples=["torch"], description="What runs the model: torch or onnx (ONNX Runtime).")


# ---------------------------------------------------------------------------------------- galleries


class GalleryCreate(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "lobby", "model": "person"}]})

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")
    model: str = Field(min_length=1, max_length=100, description="Served model name.")
    version: str | None = Field(
        None, max_length=64, description="Model version; default: the served default version."
    )
    index_spec: str | None = Field(
        None,
        max_length=100,
        pattern=r"^[^\x00-\x1f]*$",
        description="Index spec (default: the service's setting).",
    )


class SnapshotOut(BaseModel):
    last_seq: int
    count: int
    created_at: dt.datetime


class StandbyOut(BaseModel):
    model: str
    model_version: str
    ready: bool


class GalleryOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 1,
                    "name": "lobby",
                    "model": "person",
                    "model_version": "3f2a9c01b7de",
                    "count": 0,
                    "kind": "person",
                    "dim": 512,
                    "index": {"backend": "faiss", "spec": "flat", "size": 0},
                    "last_snapshot": None,
                    "standby": None,
                    "created_at": "2026-11-27T10:00:00Z",
                }
            ]
        }
    )

    id: int
    name: str
    model: str
    model_version: str
    kind: str
    dim: int
    count: int = Field(description="Active items (the database's count).")
    index: dict[str, Any] = Field(description="backend, spec and size of the in-memory index.")
    last_snapshot: SnapshotOut | None = None
    standby: StandbyOut | None = Field(None, description="The other model version during/after an upgrade.")
    created_at: dt.datetime


class ReembedCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "person", "version": "9b1e44d02a7c"}]}
    )

    model: str
    version: str | None = None
    switch: bool = Field(True, description="Switch the gallery to the new model when the job completes.")


class SwitchModel(BaseModel):
    version: str | None = Field(
        None, description="Expected version to switch to (a guard); default: the standby."
    )


# -------------------------------------------------------------------------------------------- items


class ItemOut(BaseModel):
    id: int
    gallery_id: int
    identity: str | None
    camera: str | None
    captured_at: dt.datetime | None
    content_hash: str
    source_path: str | None = Field(None, description="Ingested file, referenced where it lies.")
    width: int
    height: int
    status: Literal["active", "deleted"]
    created_at: dt.datetime
    thumbnail_url: str


# --------------------------------------------------------------------------------------------- jobs


class IngestSource(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"layout": "market1501", "root": "/data/market", "split": "gallery"}]}
    )

    layout: str = Field(
        min_length=1,
        max_length=100,
        description="A dataset layout the dataset registry knows (market1501, vehicleid, folder, ...).",
    )
    root: str = Field(min_length=1, description="Server-side folder, inside a configured dataset root.")
    split: Literal["train", "query", "gallery"] = "gallery"
    options: LayoutOptions = Field(
        default_factory=dict,
        description=f"Parser options (at most {MAX_OPTION_KEYS} keys, {MAX_OPTIONS_BYTES} bytes as "
        'JSON), e.g. {"manifest": "list.csv"} for folder, {"test_size": 800} for vehicleid.',
    )


class IngestCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"source": {"layout": "market1501", "root": "/data/market", "split": "gallery"}}]
        }
    )

    source: IngestSource


class JobOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 7,
                    "kind": "ingest",
                    "status": "running",
                    "gallery_id": 1,
                    "done": 5120,
                    "total": 19732,
                    "failed": 3,
                    "skipped": 0,
                    "rate": 812.5,
                    "eta_s": 18.0,
                    "error": None,
                }
            ]
        }
    )

    id: int
    kind: Literal["ingest", "reembed", "evaluate"]
    status: JobStatus
    gallery_id: int | None
    done: int = Field(description="Inputs processed (stored or already present).")
    total: int | None = Field(description="Inputs in all; null until the source has been read.")
    failed: int = Field(description="Inputs that could not be processed (see /errors).")
    skipped: int = Field(description="Inputs already stored (counted in done).")
    rate: float | None = Field(None, description="Inputs per second in this attempt.")
    eta_s: float | None = Field(None, description="Estimated seconds left.")
    attempts: int
    cancel_requested: bool
    error: str | None
    params: dict[str, Any]
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    errors_url: str


class JobErrorOut(BaseModel):
    id: int
    source: str
    error: str
    created_at: dt.datetime


# -------------------------------------------------------------------------------------- evaluations


class DatasetRef(BaseModel):
    layout: str = Field(min_length=1, max_length=100, examples=["market1501"])
    root: str = Field(min_length=1, examples=["/data/market"])
    options: LayoutOptions = Field(default_factory=dict)


class EvaluationCreate(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "person",
                    "dataset": {"layout": "market1501", "root": "/data/market"},
                    "protocol": "market1501",
                    "rerank": False,
                }
            ]
        }
    )

    model: str = Field(min_length=1, max_length=100)
    version: str | None = Field(None, max_length=64)
    dataset: DatasetRef
    protocol: Literal["market1501", "vehicleid"] | None = Field(
        None, description="Default: vehicleid for the vehicleid layout, else market1501 (query vs gallery)."
    )
    rerank: bool = False
    ap_mode: Literal["standard", "devkit"] = "standard"
    trials: int = Field(10, ge=1, le=100, description="VehicleID: repetitions of the random gallery draw.")
    seed: int = Field(0, ge=0, description="VehicleID: seed of the draws.")
    test_size: int | None = Field(None, ge=2, description="VehicleID: identities drawn per trial.")


class EvaluationOut(BaseModel):
    id: int
    status: JobStatus
    job_id: int
    model: str
    model_version: str
    protocol: str
    dataset: dict[str, Any]
    rerank: bool
    options: dict[str, Any]
    result: dict[str, Any] | None = Field(None, description="The evaluation JSON of `reid evaluate`.")
    duration_s: float | None
    error: str | None
    created_at: dt.datetime


class RankedGalleryImage(BaseModel):
    gallery_index: int = Field(description="Row of the gallery in the evaluation's gallery.npz.")
    identity: str
    camera: str
    score: float = Field(description="1 - the ranking distance: the cosine similarity unless re-ranked.")
    match: bool = Field(description="Whether it shows the query's identity.")
    image_url: str


class WorstQuery(BaseModel):
    query_index: int = Field(description="Row of the query in the evaluation's query.npz.")
    identity: str
    camera: str
    ap: float = Field(ge=0, le=1, description="The query's average precision, as counted in the mAP.")
    first_match_rank: int = Field(
        ge=1, description="1-based rank of its first match in the whole ranking (removed items left out)."
    )
    image_url: str
    results: list[RankedGalleryImage] = Field(description="The top k, best first, removed items left out.")


class WorstQueries(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "evaluation_id": 3,
                    "k": 10,
                    "protocol": "market1501",
                    "ap_mode": "standard",
                    "rerank": False,
                    "num_valid_queries": 3368,
                    "queries": [
                        {
                            "query_index": 12,
                            "identity": "7",
                            "camera": "2",
                            "ap": 0.076,
                            "first_match_rank": 23,
                            "image_url": "/v1/evaluations/3/images/query/12",
                            "results": [
                                {
                                    "gallery_index": 40,
                                    "identity": "3",
                                    "camera": "1",
                                    "score": 0.83,
                                    "match": False,
                                    "image_url": "/v1/evaluations/3/images/gallery/40",
                                }
                            ],
                        }
                    ],
                }
            ]
        }
    )

    evaluation_id: int
    k: int
    protocol: str
    ap_mode: str
    rerank: bool
    num_valid_queries: int = Field(description="Queries with a match; the others are left out, as in mAP.")
    queries: list[WorstQuery] = Field(description="Lowest AP first (ties: lower query index first).")


# ------------------------------------------------------------------------------------------- search


class SearchHit(BaseModel):
    item_id: int
    score: float = Field(description="Cosine similarity (re-ranked searches: 1 - re-ranked distance).")
    identity: str | None
    camera: str | None
    captured_at: dt.datetime | None
    thumbnail_url: str


class QueryResult(BaseModel):
    results: list[SearchHit]


class SearchResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "person",
                    "model_version": "3f2a9c01b7de",
                    "queries": [
                        {
                            "results": [
                                {
                                    "item_id": 42,
                                    "score": 0.91,
                                    "identity": "17",
                                    "camera": "3",
                                    "captured_at": "2026-11-27T09:58:12Z",
                                    "thumbnail_url": "/v1/galleries/1/items/42/thumbnail",
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    )

    model: str
    model_version: str
    queries: list[QueryResult]


def to_utc(value: dt.datetime) -> dt.datetime:
    """The one rule for client times: naive means UTC; the result is aware, in UTC.

    Raises:
        ValueError: a time that has no UTC equivalent (``0001-01-01T00:00:00+14:00``).
    """
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError as exc:
        raise ValueError(f"{value.isoformat()} is out of range once converted to UTC") from exc


class SearchByItem(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"item_id": 42, "k": 10}]})

    item_id: StrictInt = Field(ge=1, le=2**63 - 1)
    # Strict: JSON true is not k = 1.
    k: StrictInt | None = Field(None, ge=1)
    cameras: list[MetadataValue] | None = Field(
        None, max_length=MAX_FILTER_VALUES, description=f"Only these cameras (at most {MAX_FILTER_VALUES})."
    )
    time_from: dt.datetime | None = None
    time_to: dt.datetime | None = None

    @field_validator("time_from", "time_to")
    @classmethod
    def _utc(cls, value: dt.datetime | None) -> dt.datetime | None:
        # Naive times are UTC here as in /search and /items (not the server's local time).
        return None if value is None else to_utc(value)

    exclude_identity: str | None = Field(None, max_length=MAX_METADATA_LENGTH)
    exclude_self: bool = True
    rerank: bool = False
