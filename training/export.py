"""The exported-model format: the one contract between training and every consumer of a model.

A model directory holds two files:

* ``model.safetensors``: the weights of a *plain* timm backbone (DenoiseRep denoisers already fused
  into it) and the BNNeck, plus the ID classifier only when asked for.
* ``model.json``: ``format_version``, ``name``, ``architecture`` (timm name and kwargs), ``embedding``
  (dimension, which feature, normalised), ``input`` (size, interpolation, mean, std), ``kind``
  (person or vehicle), a training summary, evaluation results with their protocol, the DenoiseRep
  settings, the SHA-256 of ``model.safetensors`` and the creation time; from format version 2, an
  optional ``onnx`` section describing ``model.onnx`` (see :mod:`training.onnx_export`).

:func:`export_model` writes it (atomically, and without touching the trained model) and
:func:`load_model` is the only reader: the service and ``reid evaluate`` both go through it.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from index.snapshot import sha256_file
from training.data.transforms import Preprocess, build_test_transform
from training.inference import InferenceEngine, InferenceOptions, TensorPreprocess, decode_jpegs
from training.model import EMBEDDINGS, ReIDModel, UnknownBackboneError

if TYPE_CHECKING:
    from training.onnx_runtime import OnnxEngine

__all__ = [
    "FORMAT_VERSION",
    "JSON_NAME",
    "KINDS",
    "READABLE_FORMAT_VERSIONS",
    "WEIGHTS_NAME",
    "LoadedModel",
    "ModelExistsError",
    "ModelFormatError",
    "add_onnx",
    "export_from_checkpoint",
    "export_model",
    "fused_model",
    "load_model",
    "sha256_file",
]

log = logging.getLogger(__name__)

#: Version 2 adds the optional ``onnx`` section; version 3 adds DenoiseRep's ``conv_side`` and the
#: fused weight change (``weight_change``, overall and per layer). Older directories still load.
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
WEIGHTS_NAME = "model.safetensors"
JSON_NAME = "model.json"
KINDS = ("person", "vehicle")


class ModelFormatError(ValueError):
    """A model directory is missing, incomplete, corrupt or of an unsupported format version."""


class ModelExistsError(FileExistsError):
    """The export target exists and is not empty (pass ``overwrite=True`` to replace it)."""


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / torch.compile wrappers keep the real model in .module / ._orig_mod.
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _denoiserep_state(backbone: nn.Module) -> tuple[bool, dict[str, Any] | None]:
    """(is the backbone DenoiseRep-converted, its describe() settings)."""
    try:
        from training import denoiserep
    except ImportError:  # the core is always shipped; this only guards partial checkouts
        return False, None
    if not denoiserep.is_converted(backbone):
        return False, None
    return True, denoiserep.describe(backbone)


def fused_model(model: ReIDModel) -> ReIDModel:
    """A plain copy of ``model`` in eval mode, with any DenoiseRep denoisers fused into the backbone.

    Pure: the input model, its parameters and its train/eval mode are left untouched. This is the
    model that evaluation during training measures and that :func:`export_model` writes.
    """
    model = _unwrap(model)
    if not isinstance(model, ReIDModel):
        raise TypeError(f"expected a ReIDModel, got {type(model).__name__}")
    converted, _ = _denoiserep_state(model.backbone)
    if converted:
        from training import denoiserep

        backbone = denoiserep.fuse(model.backbone)
    else:
        backbone = copy.deepcopy(model.backbone)
    plain = ReIDModel.from_parts(
        arch=model.arch,
        backbone=backbone,
        backbone_kwargs=model.backbone_kwargs,
        bnneck=copy.deepcopy(model.bnneck),
        classifier=copy.deepcopy(model.classifier),
        embedding=model.embedding,
        img_size=model.img_size,
    )
    return plain.eval()


def _state_dict_for_export(model: ReIDModel, include_classifier: bool) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("classifier.") and not include_classifier:
            continue
        # clone: safetensors refuses tensors that share storage, and the file must own its data.
        state[key] = value.detach().to("cpu").contiguous().clone()
    return state


def export_model(
    model: ReIDModel,
    out_dir: str | Path,
    *,
    kind: str,
    preprocess: Preprocess | Mapping[str, Any],
    name: str | None = None,
    training: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    denoiserep: Mapping[str, Any] | None = None,
    include_classifier: bool = False,
    overwrite: bool = False,
    onnx: bool = False,
    onnx_opset: int | None = None,
) -> Path:
    """Writes a deployable model directory (fused weights + ``model.json``) atomically.

    Args:
        model: a trained :class:`ReIDModel`, DenoiseRep-converted or not; it is not modified.
        out_dir: target directory; must not exist or be empty unless ``overwrite``.
        kind: ``"person"`` or ``"vehicle"``.
        preprocess: the test-time transform settings (:class:`Preprocess` or its dict).
        name: a human-readable model name (default: the directory name).
        training: a summary of the training data and recipe, stored as is.
        evaluation: evaluation results (the ``evaluation.metrics`` JSON, with ``protocol``).
        denoiserep: DenoiseRep settings; default: ``denoiserep.describe()`` of a converted model.
        include_classifier: also save the ID classifier (not needed for retrieval).
        overwrite: replace a non-empty ``out_dir``.
        onnx: also write ``model.onnx``, checked through ONNX Runtime (:mod:`training.onnx_export`).
        onnx_opset: its opset (default :data:`training.onnx_export.ONNX_OPSET`).

    Returns:
        The model directory.

    Raises:
        ModelExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
        training.onnx_export.OnnxExportError: ``onnx`` and the model cannot be exported (nothing is
            written then).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelExistsError(f"export target {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelExistsError(
            f"export target {out_dir} is not empty; choose another directory or pass overwrite "
            "(`reid export --overwrite`)"
        )
    inner = _unwrap(model)
    if not isinstance(inner, ReIDModel):
        raise TypeError(f"expected a ReIDModel, got {type(inner).__name__}")
    if include_classifier and inner.classifier is None:
        raise ValueError("include_classifier=True but the model has no classifier")
    _, described = _denoiserep_state(inner.backbone)
    plain = fused_model(inner)
    prep = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(preprocess)
    state = _state_dict_for_export(plain, include_classifier)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights = tmp / WEIGHTS_NAME
        save_file(state, str(weights), metadata={"format": "pt", "reid_format_version": str(FORMAT_VERSION)})
        digest = sha256_file(weights)
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": name or out_dir.name,
            "kind": kind,
            "architecture": plain.architecture(),
            "embedding": {"dim": plain.embed_dim, "feature": plain.embedding, "normalized": True},
            "input": prep.to_dict(),
            "classifier": {"num_classes": plain.num_classes} if include_classifier else None,
            "training": dict(training or {}),
            "evaluation": dict(evaluation) if evaluation else None,
            "denoiserep": dict(denoiserep) if denoiserep is not None else described,
            "weights_sha256": digest,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        if onnx:
            from training.onnx_export import ONNX_OPSET, export_onnx

            meta["onnx"] = export_onnx(
                plain.to("cpu").float(),  # a copy already: the caller's model stays where it is
                tmp,
                prep,
                arch=plain.arch,
                dim=plain.embed_dim,
                feature=plain.embedding,
                weights_sha256=digest,
                opset=onnx_opset or ONNX_OPSET,
            )
        (tmp / JSON_NAME).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        _fsync_dir_files(tmp)
        _replace_dir(tmp, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "exported %s (%s, dim %d, weights %s) to %s",
        meta["name"],
        plain.arch,
        plain.embed_dim,
        digest[:12],
        out_dir,
    )
    return out_dir


def _json_default(value: Any) -> Any:
    # numpy scalars/arrays and paths appear in metric dicts and summaries.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def _replace_dir(tmp: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Moves the finished temp directory into place; a reader never sees a half-written model."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        tmp.rename(out_dir)
        return
    if not overwrite:  # re-checked: another process may have filled it meanwhile
        raise ModelExistsError(f"export target {out_dir} is not empty")
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class LoadedModel:
    """An exported model ready to embed images: the module, its preprocessing and its inference engine.

    Attributes:
        name: model name from ``model.json``.
        version: first 12 hex characters of the weights' SHA-256 (identifies the weights).
        kind: ``"person"`` or ``"vehicle"``.
        dim: embedding dimension.
        input_size: (height, width) of the model input.
        mean, std, interpolation: normalisation and resize filter of the test-time transform.
        meta: the whole ``model.json``.
        module: the :class:`ReIDModel`, in eval mode, on ``device``.
        device: where the module runs.
        dtype: the module's floating-point type.
        engine: the :class:`~training.inference.InferenceEngine` that runs the module (half
            precision, channels_last, CUDA graphs, compile), or the
            :class:`~training.onnx_runtime.OnnxEngine` that runs the model's ONNX file instead; a
            torch engine is built from ``dtype`` when not given.
    """

    name: str
    version: str
    kind: str
    dim: int
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    meta: dict[str, Any]
    module: nn.Module
    device: torch.device
    dtype: torch.dtype = torch.float32
    engine: InferenceEngine | OnnxEngine | None = None
    _transform: Any = field(default=None, init=False, repr=False)
    _tensor_preprocess: TensorPreprocess | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._transform = build_test_transform(self.preprocess_config)
        if self.engine is None:
            self.engine = InferenceEngine(
                self.module, self.device, self.input_size, InferenceOptions(dtype=self.dtype)
            )
        self.module = self.engine.module
        self.dtype = self.engine.dtype
        if TensorPreprocess.supports(self.interpolation):
            self._tensor_preprocess = TensorPreprocess(
                self.input_size,
                self.interpolation,
                self.mean,
                self.std,
                device=self.device,
                dtype=self.dtype,
                channels_last=self.engine.channels_last,
            )

    @property
    def runtime(self) -> str:
        """``torch`` or ``onnx``: what runs the model."""
        assert self.engine is not None
        return self.engine.runtime

    @property
    def preprocess_config(self) -> Preprocess:
        """The test-time transform settings saved with the model."""
        return Preprocess(
            size=self.input_size, interpolation=self.interpolation, mean=self.mean, std=self.std
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> CHW float32 tensor on CPU, exactly as at evaluation time."""
        return self._transform(image)

    @property
    def tensor_preprocess(self) -> TensorPreprocess | None:
        """The same transform on uint8 tensors, producing batches on the model's device and dtype
        (None when the model's interpolation has no tensor equivalent, e.g. Lanczos)."""
        return self._tensor_preprocess

    def preprocess_tensors(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 RGB CHW images (any size, any device) -> model-ready (N, 3, H, W) batch on the device.

        Raises:
            ValueError: the model's interpolation has no tensor equivalent (use :meth:`preprocess`).
        """
        if self._tensor_preprocess is None:
            raise ValueError(
                f"model {self.name} resizes with {self.interpolation!r}, which has no tensor "
                "equivalent: preprocess PIL images with LoadedModel.preprocess"
            )
        return self._tensor_preprocess(images)

    def preprocess_jpegs(self, datas: Sequence[bytes]) -> torch.Tensor:
        """Checked JPEG bytes -> model-ready batch on the device (decoded by nvJPEG on a GPU).

        The bytes must have passed the service's image checks (format and pixel limit).
        """
        return self.preprocess_tensors(decode_jpegs(datas, self.device))

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Embeds a preprocessed NCHW batch (CPU or device): (N, dim) float32, L2-normalised, on CPU."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(batch.shape)}")
        assert self.engine is not None
        if batch.shape[0] == 0:
            return torch.empty((0, self.dim), dtype=torch.float32)
        return self.engine.embed(batch)

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """Preprocesses and embeds PIL images in batches: (N, dim) float32 array."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = torch.stack([self.preprocess(im) for im in chunk])
            out[start : start + len(chunk)] = self.embed(batch).numpy()
        return out


def _read_meta(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise ModelFormatError(
            f"model directory {model_dir} does not exist; pass a directory written by `reid export`"
        )
    json_path = model_dir / JSON_NAME
    if not json_path.is_file():
        raise ModelFormatError(
            f"{json_path} is missing: {model_dir} is not an exported model. Export one with "
            "`reid export RUN_DIR --out MODEL_DIR`"
        )
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{json_path} is not valid JSON ({exc}); re-export the model") from exc
    if not isinstance(meta, dict):
        raise ModelFormatError(f"{json_path} must hold a JSON object; re-export the model")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_FORMAT_VERSIONS:
        hint = (
            "it was written by a newer version of this software: upgrade to load it"
            if type(version) is int and version > FORMAT_VERSION
            else "re-export the model with `reid export`"
        )
        readable = ", ".join(str(v) for v in READABLE_FORMAT_VERSIONS)
        raise ModelFormatError(
            f"{json_path} has format_version {version!r}, this loader reads versions {readable}; {hint}"
        )
    return meta


def _require(meta: Mapping[str, Any], path: str, json_path: Path) -> Any:
    node: Any = meta
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ModelFormatError(f"{json_path} lacks the field {path!r}; re-export the model")
        node = node[part]
    return node


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    half_precision: bool | None = None,
    cuda_graphs: bool | None = None,
    compile: bool = False,
    runtime: str = "torch",
    onnx_provider: str | None = None,
) -> LoadedModel:
    """Loads an exported model directory, verifying its format version and weights checksum.

    Args:
        model_dir: a directory written by :func:`export_model` / ``reid export``.
        device: where to run the model (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).
        dtype: force the module's floating-point type. ``None`` chooses: float32 on a CPU; on CUDA
            float16 or bfloat16, whichever first reproduces the float32 embeddings of a probe batch
            (cosine >= 0.999), else float32 with a warning (see :mod:`training.inference`).
        half_precision: allow the half-precision choice (default: on CUDA only); False keeps float32.
        cuda_graphs: replay CUDA graphs for query-sized batches (default: on CUDA).
        compile: ``torch.compile`` the forward for large batches (compiled at load, fixed buckets).
        runtime: ``torch`` (the options above), ``onnx`` (ONNX Runtime on the directory's
            ``model.onnx``, float32, checked against the PyTorch model at load) or ``auto``
            (:func:`training.onnx_runtime.resolve_runtime`: ONNX Runtime where it was measured faster
            and the file passes that check, torch otherwise).
        onnx_provider: ONNX Runtime provider, ``cpu``, ``cuda`` or ``tensorrt`` (default: from
            ``device``).

    Raises:
        ModelFormatError: missing files, wrong format version, checksum mismatch, or weights that
            do not fit the recorded architecture.
        training.onnx_runtime.OnnxRuntimeError: ``runtime="onnx"`` and the directory has no usable
            ONNX file, the provider is missing, or the file does not reproduce the PyTorch embeddings.
    """
    model_dir = Path(model_dir)
    meta = _read_meta(model_dir)
    json_path = model_dir / JSON_NAME
    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelFormatError(f"{weights} is missing; the model directory is incomplete, re-export it")
    expected = _require(meta, "weights_sha256", json_path)
    actual = sha256_file(weights)
    if actual != expected:
        raise ModelFormatError(
            f"{weights} does not match the checksum in {json_path} (expected {str(expected)[:12]}..., "
            f"found {actual[:12]}...): the weights were modified or corrupted; re-export the model"
        )
    arch = _require(meta, "architecture.backbone", json_path)
    kwargs = dict(_require(meta, "architecture.kwargs", json_path))
    feature = _require(meta, "embedding.feature", json_path)
    dim = int(_require(meta, "embedding.dim", json_path))
    if feature not in EMBEDDINGS:
        raise ModelFormatError(f"{json_path}: embedding.feature {feature!r} is not one of {EMBEDDINGS}")
    try:
        prep = Preprocess.from_dict(_require(meta, "input", json_path))
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"{json_path}: invalid input section ({exc}); re-export the model") from exc
    classifier = meta.get("classifier") or {}
    num_classes = int(classifier.get("num_classes", 0))
    kind = _require(meta, "kind", json_path)

    try:
        module = ReIDModel(
            arch, num_classes=num_classes, img_size=None, embedding=feature, backbone_kwargs=kwargs
        )
    except UnknownBackboneError as exc:
        raise ModelFormatError(
            f"{json_path} names backbone {arch!r}, which this timm version does not know; "
            f"install a timm version that has it ({exc})"
        ) from exc
    if module.embed_dim != dim:
        raise ModelFormatError(
            f"{json_path} says embedding.dim={dim} but {arch!r} with {kwargs} gives {module.embed_dim}"
        )
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise ModelFormatError(
            f"{weights} cannot be read as safetensors ({exc}); re-export the model"
        ) from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFormatError(
            f"{weights} does not fit architecture {arch!r} {kwargs} recorded in {json_path}: {exc}"
        ) from exc

    device = torch.device(device)
    module.eval().requires_grad_(False)
    engine: InferenceEngine | OnnxEngine | None = None
    if runtime != "torch":
        from training.onnx_runtime import onnx_engine

        engine = onnx_engine(
            model_dir,
            meta,
            module,
            device,
            prep.size,
            runtime=runtime,
            provider=onnx_provider,
            torch_options={"dtype": dtype, "compile": compile},
        )
    if engine is None:
        engine = InferenceEngine(
            module.to(device=device),
            device,
            prep.size,
            InferenceOptions(
                dtype=dtype, half_precision=half_precision, cuda_graphs=cuda_graphs, compile=compile
            ),
        )
    return LoadedModel(
        name=str(meta.get("name") or model_dir.name),
        version=str(expected)[:12],
        kind=str(kind),
        dim=dim,
        input_size=prep.size,
        mean=prep.mean,
        std=prep.std,
        interpolation=prep.interpolation,
        meta=meta,
        module=engine.module,
        device=device,
        dtype=engine.dtype,
        engine=engine,
    )


def _evaluation_of(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The evaluation that measured exactly the checkpoint's weights (same epoch), if any."""
    epoch = checkpoint.get("epoch")
    best = checkpoint.get("best") or {}
    if best.get("epoch") == epoch and best.get("evaluation"):
        evaluation = dict(best["evaluation"])
    else:
        last = checkpoint.get("last_evaluation") or {}
        if last.get("epoch") != epoch:
            return None
        evaluation = dict(last)
    evaluation.pop("cmc_curve", None)
    evaluation["epoch"] = epoch
    return evaluation


def export_from_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    include_classifier: bool = False,
    overwrite: bool = False,
    onnx: bool = False,
    onnx_opset: int | None = None,
) -> Path:
    """Exports a training checkpoint (or a run directory's ``best.pt``/``last.pt``) as a model directory.

    The model.json records the checkpoint's training summary, the evaluation of exactly these
    weights (when one ran at that epoch) and the DenoiseRep settings; ``onnx`` also writes
    ``model.onnx`` (see :func:`export_model`).

    Raises:
        training.checkpoint.CheckpointError: no usable checkpoint at ``source``.
        ModelExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
    """
    from training.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(source)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, with_classifier=include_classifier)
    training = dict(checkpoint.get("training") or {})
    training["checkpoint"] = path.name
    log.info("exporting %s (epoch %s)", path, checkpoint.get("epoch"))
    return export_model(
        model,
        out_dir,
        kind=checkpoint["kind"],
        preprocess=checkpoint["preprocess"],
        name=name,
        training=training,
        evaluation=_evaluation_of(checkpoint),
        include_classifier=include_classifier,
        overwrite=overwrite,
        onnx=onnx,
        onnx_opset=onnx_opset,
    )


def add_onnx(model_dir: str | Path, *, opset: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Adds ``model.onnx`` to an exported model directory and records it in ``model.json``.

    The model is loaded as ``load_model`` loads it (format and weights checksum verified), exported,
    checked, and ``model.json`` is rewritten atomically with the ``onnx`` section and format version
    2; every other field is kept as it was.

    Raises:
        training.export.ModelFormatError: not a loadable model directory.
        ModelExistsError: the directory has an ONNX export already and ``overwrite`` is false.
        training.onnx_export.OnnxExportError: the model cannot be exported (nothing in the directory
            changes then).
    """
    from training.onnx_export import ONNX_OPSET, export_onnx
    from training.onnx_runtime import ONNX_NAME

    model_dir = Path(model_dir)
    loaded = load_model(model_dir, "cpu", runtime="torch")
    meta = dict(loaded.meta)
    if (meta.get("onnx") is not None or (model_dir / ONNX_NAME).exists()) and not overwrite:
        raise ModelExistsError(
            f"{model_dir} has an ONNX export already ({ONNX_NAME}); pass --overwrite to export it again"
        )
    meta["onnx"] = export_onnx(
        loaded.module,
        model_dir,
        loaded.preprocess_config,
        arch=str(meta["architecture"]["backbone"]),
        dim=loaded.dim,
        feature=str(meta["embedding"]["feature"]),
        weights_sha256=str(meta["weights_sha256"]),
        opset=opset or ONNX_OPSET,
    )
    meta["format_version"] = FORMAT_VERSION
    json_path = model_dir / JSON_NAME
    tmp = model_dir / f".{JSON_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as fh:
            fh.write(json.dumps(meta, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, json_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return meta["onnx"]
