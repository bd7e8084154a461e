"""Typed settings of the retrieval service: one class, read from the environment and a file.

Precedence, highest first: values passed to :func:`load_settings` (the command line), environment
variables prefixed ``REID_`` (``REID_DATABASE_URL``, ``REID_DATA_DIR``, ``REID_MODELS``, ...),
the optional settings file (YAML, or a dotenv file when its name ends in ``.env``), then the
defaults below. The settings file is named by ``--config`` or ``REID_CONFIG``.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

CONFIG_ENV_VAR = "REID_CONFIG"

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class SettingsError(ValueError):
    """The settings are inconsistent or a settings file cannot be read."""


@dataclass(frozen=True)
class ModelSpec:
    """One model the service loads: the name clients use and the exported-model directory."""

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Parse ``NAME=MODEL_DIR`` (the form of ``--model`` and of ``REID_MODELS`` entries)."""
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SettingsError(f"model {text!r} must be given as NAME=MODEL_DIR, e.g. person=models/person")
        return cls(name.strip(), Path(path.strip()).expanduser())


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` exposes the service to this machine only (127.0.0.0/8, ::1, localhost).

    ``0.0.0.0`` and ``::`` bind every interface, so they are not loopback; an unknown host name
    counts as exposed, which is the safe side.
    """
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def auth_enabled(mode: str, host: str) -> bool:
    """Resolve the ``auth`` setting: ``on``, ``off``, or ``auto`` (on unless ``host`` is loopback)."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return not is_loopback_host(host)


def _split_list(value: Any) -> Any:
    """Accept a JSON list, or one string separated by commas or the OS path separator."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        sep = "," if "," in text else os.pathsep
        return [part.strip() for part in text.split(sep) if part.strip()]
    return value


def _default_decode_processes() -> int:
    """One worker process per core but one (the service's own threads need it), from 4 cores up.

    On 2 cores the Pillow road gains 1.2-1.7x (measured) while a CPU model embeds 20-50 images/s:
    not worth the ~400 MB and the 2.5 s of start-up CPU of the fork server and its workers.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 32) - 1 if cores >= 4 else 0


class Settings(BaseSettings):
    """Everything the service can be told; every field is also ``REID_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="REID_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="Address `reid serve` binds.")
    port: int = Field(8000, ge=0, le=65535)
    models: Annotated[list[ModelSpec], NoDecode] = Field(
        default_factory=list,
        description="Models to serve: NAME=MODEL_DIR entries (the same NAME twice serves two versions; "
        "the last one is the default for new galleries).",
    )
    data_dir: Path = Field(Path("reid-data"), description="Uploaded images, thumbnails, index snapshots.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default: SQLite file DATA_DIR/reid.sqlite3. "
        "PostgreSQL: postgresql+psycopg://user@host/db.",
    )
    auto_migrate: bool = Field(True, description="Upgrade the database schema to head at start-up.")
    dataset_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Server-side folders that ingestion and evaluation jobs may read."
    )
    index_backend: Literal["auto", "faiss", "milvus", "torch"] = Field(
        "auto",
        description="auto, faiss (in-process), milvus, or torch (exact search as a matrix product on the "
        "GPU when there is one: the fastest exact search without a faiss-gpu wheel). auto: flat (exact) "
        "galleries use torch on the models' GPU when FAISS sees none (no faiss-gpu wheel); everything "
        "else uses FAISS (on the GPU with faiss-gpu).",
    )
    index_spec: str = Field("flat", description="Index spec of new galleries (see index.create_index).")
    milvus_uri: str | None = Field(None, description="Milvus URI; default: milvus-lite DATA_DIR/milvus.db.")
    device: str | None = Field(None, description="Torch device for the models; default cuda when available.")
    half_precision: bool = Field(
        True,
        description="On CUDA, run models in float16 or bfloat16, whichever reproduces the float32 "
        "embeddings (cosine >= 0.999 on a probe batch, checked at load); float32 otherwise.",
    )
    cuda_graphs: bool = Field(
        True, description="On CUDA, replay captured CUDA graphs for query-sized batches (1 to 32)."
    )
    compile: bool = Field(
        False, description="torch.compile the models at start-up (minutes) for large-batch throughput."
    )
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="What runs the models: torch, onnx (ONNX Runtime on the model directory's model.onnx, "
        "written by `reid export --onnx` or `reid export-onnx MODEL_DIR`; checked at start-up against the "
        "PyTorch model, min cosine >= 0.99999) or auto: ONNX Runtime for convolutional models on a CPU "
        "when their directory has model.onnx (1.9-6x faster there, bench/README.md), torch otherwise "
        "(transformers, and CUDA, where the half-precision CUDA-graph path runs).",
    )
    onnx_provider: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        "auto",
        description="ONNX Runtime execution provider when the onnx runtime runs a model: auto (cuda on a "
        "CUDA device, else cpu), cpu, cuda or tensorrt (the last two need the onnxruntime-gpu wheel "
        "instead of onnxruntime, and TensorRT's libraries for tensorrt).",
    )
    jpeg_decoder: Literal["gpu", "cpu", "pil"] = Field(
        "gpu",
        description="How JPEGs (uploads, ingestion, evaluation, re-embedding) are decoded when the models "
        "run on CUDA: gpu (nvJPEG), cpu (libjpeg-turbo in the decode threads, resized on the GPU) or "
        "pil (all on the CPU, as `reid evaluate`; the roads' embeddings agree to cosine >= 0.999).",
    )

    auth: Literal["on", "off", "auto"] = Field(
        "auto",
        description="API keys required under /v1: on, off, or auto (on unless `host` is a loopback "
        "address, so `--host 0.0.0.0` turns it on). true/false are read as on/off.",
    )
    auth_cache_s: float = Field(
        5.0, ge=0, description="Seconds a verified key is trusted without a database lookup (revocation lag)."
    )
    rate_limit_per_s: float = Field(
        100.0,
        ge=0,
        description="Requests per second each API key (or client address, auth off) sustains; 0: off.",
    )
    rate_limit_burst: int = Field(
        200, ge=1, description="Requests a key or address may send at once (a page of thumbnails, say)."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (CORS); empty: CORS off.",
    )
    docs_enabled: bool = Field(True, description="Serve the API documentation at /docs and /openapi.json.")
    idempotency_ttl_s: float = Field(
        24 * 3600.0,
        gt=0,
        description="Seconds an Idempotency-Key's answer is replayed to retries (then the key is new "
        "again and its row is purged); default 24 h, as Stripe keeps them.",
    )

    max_k: int = Field(100, ge=1, description="Largest k a search may ask for.")
    default_k: int = Field(10, ge=1)
    max_images_per_request: int = Field(32, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="Larger images are refused (bomb guard).")
    max_request_pixels: int = Field(
        160_000_000,
        ge=1,
        description="Most pixels (width x height, summed over its images, read from their headers before "
        "any is decoded) one request may carry; more: 413. Per-image limits alone let one small body of "
        "highly compressible images decode to many GB. Default: 4 x max_image_pixels, so four images at "
        "the per-image limit or 32 images of 5 megapixels pass (~0.5 GB of RGB at most).",
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest request body (uploads included); larger: 413."
    )
    max_json_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest JSON request body; larger: 413. JSON is parsed whole on the event loop, "
        "so this bounds the pause one request can cause; the largest valid JSON body (1000 cameras "
        "of 200 characters) is about 0.2 MB.",
    )
    max_job_images: int = Field(500_000, ge=1, description="Most images one ingestion job may read.")
    max_evaluation_images: int = Field(
        200_000, ge=1, description="Most images (query + gallery) one evaluation may embed."
    )
    max_batch_size: int = Field(64, ge=1, description="Micro-batcher: most images in one forward pass.")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="Micro-batcher: longest wait for a batch to fill. 0: a request that finds the model "
        "idle runs at once, and those arriving during a forward pass form the next batch (bench/batching.py: "
        "a fixed wait only added latency and cut throughput).",
    )
    queue_size: int = Field(1024, ge=1, description="Micro-batcher: pending images before answering 503.")
    decode_threads: int = Field(
        default_factory=lambda: max(2, min(32, os.cpu_count() or 2)),
        ge=1,
        description="Threads decoding and preprocessing images (requests and jobs); default: one per core.",
    )
    decode_processes: int = Field(
        default_factory=_default_decode_processes,
        ge=0,
        description="Worker processes that decode and preprocess the images Pillow decodes (PNG, WebP, "
        "CMYK JPEGs; every image without a GPU or with jpeg_decoder=pil), so that road uses every core "
        "instead of one thread's GIL; 0: decode them in the decode threads. Default: one per core "
        "but one (at most 31) on machines with 4 or more cores, else 0.",
    )

    job_workers: int = Field(1, ge=1, description="Jobs run at the same time.")
    ingest_batch_size: int = Field(256, ge=1, description="Images embedded per forward pass in jobs.")
    ingest_prefetch_batches: int = Field(2, ge=0, description="Batches decoded ahead of the model.")
    ingest_batch_pause_s: float = Field(
        0.0, ge=0, description="Pause between job batches, to leave the device to interactive queries."
    )
    snapshot_interval_s: float = Field(60.0, gt=0, description="How often changed indexes are snapshotted.")
    snapshots_kept: int = Field(2, ge=1)
    thumbnail_size: int = Field(128, ge=16, le=1024)

    metrics_enabled: bool = Field(
        True, description="Serve Prometheus metrics at /metrics (with auth on, a key of any scope is needed)."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="`reid serve` log lines: one JSON object per line, or text for people."
    )
    access_log: bool = Field(True, description="One log line per HTTP request (method, route, status, ms).")

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().startswith("{"):
            value = json.loads(value)
        if isinstance(value, dict):
            return [ModelSpec(str(k), Path(str(v)).expanduser()) for k, v in value.items()]
        value = _split_list(value)
        if isinstance(value, list):
            return [ModelSpec.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("dataset_roots", mode="before")
    @classmethod
    def _parse_roots(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return _split_list(value)

    @field_validator("auth", mode="before")
    @classmethod
    def _parse_auth(cls, value: Any) -> Any:
        # A real boolean (YAML true/false, REID_AUTH=true) means on/off.
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return "on" if value.strip().lower() in ("true", "1") else "off"
        return value.strip().lower() if isinstance(value, str) else value

    @property
    def auth_enabled(self) -> bool:
        """Whether API keys are required: ``auth``, with ``auto`` resolved from ``host``."""
        return auth_enabled(self.auth, self.host)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'reid.sqlite3').resolve()}"

    @property
    def resolved_milvus_uri(self) -> str:
        return self.milvus_uri or str((self.data_dir / "milvus.db").resolve())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = settings_cls.model_config.get("yaml_file")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls))
        sources.append(dotenv_settings)
        return tuple(sources)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from overrides, the environment and an optional YAML or dotenv file.

    Args:
        config_file: settings file; default ``$REID_CONFIG`` if set. ``*.env`` files are read as
            dotenv (``REID_`` prefixed keys), anything else as YAML (field names as keys).
        overrides: field values that win over everything else (``None`` values are ignored, so a
            command line can pass every option unconditionally).
    """
    config_file = config_file or os.environ.get(CONFIG_ENV_VAR)
    values = {k: v for k, v in overrides.items() if v is not None}
    path = Path(config_file).expanduser() if config_file else None
    try:
        if path is None:
            return Settings(**values)
        if not path.is_file():
            raise SettingsError(f"settings file {path} does not exist: fix --config or ${CONFIG_ENV_VAR}")
        if path.name.endswith(".env"):
            return Settings(_env_file=path, **values)  # type: ignore[call-arg]
        file_settings = type(
            "FileSettings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": path}}
        )
        return file_settings(**values)
    except ValidationError as exc:
        # Pydantic's report names fields and error types; the operator set REID_... variables.
        from service.settings_errors import describe

        raise SettingsError(describe(exc, Settings, overrides=values, config_file=path)) from None
