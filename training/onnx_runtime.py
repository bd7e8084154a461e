"""ONNX Runtime as an embedding engine: a model directory's ``model.onnx`` behind the interface of
:class:`~training.inference.InferenceEngine`.

The engine is what :func:`training.export.load_model` builds for ``runtime="onnx"`` (or ``"auto"``
where it resolves to ONNX), so every consumer (the service, ``reid evaluate``, the benchmarks) keeps
calling ``LoadedModel.embed``. At load the file is checked like the weights are (its SHA-256, and the
weights it was exported from), then against the PyTorch model on a seeded probe batch at two batch
sizes: every embedding must have cosine >= :data:`ONNX_MIN_COSINE` with PyTorch's float32 one, so a
gallery embedded by one runtime can be searched with queries embedded by the other.

Execution providers are chosen by name (:data:`PROVIDERS`): ``cpu`` (the ``onnxruntime`` wheel),
``cuda`` and ``tensorrt`` (the ``onnxruntime-gpu`` wheel, installed *instead of* ``onnxruntime``;
TensorRT also needs its own libraries). ONNX Runtime silently falls back to the CPU when a GPU
provider cannot start; this module refuses that instead, with a message that says what is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from index.snapshot import sha256_file
from training.inference import EmbeddingGraph, embedding_cosines, probe_batch

__all__ = [
    "ONNX_MIN_COSINE",
    "ONNX_NAME",
    "PROVIDERS",
    "RUNTIMES",
    "OnnxEngine",
    "OnnxRuntimeError",
    "check_parity",
    "create_session",
    "onnx_engine",
    "provider_for",
    "require_onnxruntime",
    "resolve_runtime",
]

log = logging.getLogger(__name__)

#: File name of the ONNX model in a model directory.
ONNX_NAME = "model.onnx"
#: ``runtime`` values of ``load_model``, ``REID_RUNTIME`` and ``reid serve --runtime``.
RUNTIMES: tuple[str, ...] = ("auto", "torch", "onnx")
#: Provider names users give -> ONNX Runtime execution providers, in order of preference (the CPU
#: provider last, for the few operators a GPU provider leaves to it).
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
#: Smallest cosine between an ONNX Runtime embedding and PyTorch's float32 one, for any probe image.
#: Both run float32; what differs is the order of sums and fused kernels (measured 1 - 1e-7).
ONNX_MIN_COSINE = 0.99999
#: Batch sizes of the parity probe: 1, and one that is neither 1 nor the export's example batch (2),
#: so a file whose batch axis is not truly dynamic fails here and not on a client's first batch.
PARITY_BATCHES: tuple[int, ...] = (1, 8)

_INSTALL_HINT = (
    "install the onnx extra: pip install -e '.[onnx]' (onnx, onnxscript, onnxruntime); on a GPU "
    "machine install onnxruntime-gpu instead of onnxruntime for the cuda and tensorrt providers"
)


class OnnxRuntimeError(RuntimeError):
    """ONNX Runtime cannot run this model here: no ONNX file, a missing provider, or a file whose
    embeddings differ from the PyTorch model's."""


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or an :class:`OnnxRuntimeError` that says how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxRuntimeError(f"ONNX Runtime is not installed: {_INSTALL_HINT}") from exc
    return onnxruntime


def provider_for(provider: str | None, device: torch.device) -> str:
    """The provider name to use: ``provider`` if given (checked), else ``cuda`` on CUDA, ``cpu`` otherwise."""
    if provider in (None, "auto"):
        return "cuda" if device.type == "cuda" else "cpu"
    if provider not in PROVIDERS:
        raise OnnxRuntimeError(
            f"unknown ONNX Runtime provider {provider!r}: use one of auto, {', '.join(PROVIDERS)}"
        )
    return provider


def resolve_runtime(runtime: str, device: torch.device, *, has_onnx: bool, is_cnn: bool) -> str:
    """``torch`` or ``onnx`` for a model: ``auto`` takes ONNX Runtime only where it was measured faster.

    ``auto`` resolves to ``onnx`` on a CPU for convolutional backbones whose model directory has an
    ONNX file and when ``onnxruntime`` is installed: there ONNX Runtime embedded 1.9-6x faster than
    torch eager float32 (bench/README.md). Transformers stay on torch, whose fused attention kernel
    was faster at batch 32; on CUDA the half-precision CUDA-graph path stays (ONNX Runtime's GPU
    providers were not measured).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime != "auto":
        return runtime
    if device.type != "cpu" or not has_onnx or not is_cnn:
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.info("runtime auto: onnxruntime is not installed, using torch")
        return "torch"
    return "onnx"


def create_session(path: str | Path, provider: str, *, device_id: int = 0, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on exactly the named provider (never a silent CPU fallback).

    Args:
        path: the ONNX file.
        provider: ``cpu``, ``cuda`` or ``tensorrt``.
        device_id: the GPU of the cuda and tensorrt providers.
        threads: intra-op threads (default: torch's, so both runtimes use the same cores).

    Raises:
        OnnxRuntimeError: the provider is not in this ONNX Runtime build or could not start.
    """
    ort = require_onnxruntime()
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise OnnxRuntimeError(
            f"ONNX Runtime provider {provider!r} ({wanted[0]}) is not available in this onnxruntime "
            f"{ort.__version__} build (it has {', '.join(available)}); "
            + (
                "install onnxruntime-gpu in place of onnxruntime, with the CUDA (and for tensorrt, "
                "TensorRT) libraries it was built for"
                if provider != "cpu"
                else _INSTALL_HINT
            )
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites it did itself
    provider_options = [{"device_id": device_id} if name != "CPUExecutionProvider" else {} for name in wanted]
    try:
        session = ort.InferenceSession(
            os.fspath(path), options, providers=list(wanted), provider_options=provider_options
        )
    except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid files
        raise OnnxRuntimeError(
            f"ONNX Runtime cannot load {Path(path).name} ({type(exc).__name__}); re-export it with "
            "`reid export-onnx MODEL_DIR --overwrite`"
        ) from exc
    if session.get_providers()[0] != wanted[0]:
        # The GPU provider failed to initialise (a missing CUDA library, usually) and ORT fell back.
        raise OnnxRuntimeError(
            f"ONNX Runtime could not start provider {wanted[0]} (it fell back to "
            f"{session.get_providers()[0]}): check that the CUDA/TensorRT libraries onnxruntime-gpu "
            f"{ort.__version__} needs are installed, or use provider cpu"
        )
    return session


def check_parity(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    input_size: tuple[int, int],
    *,
    batches: Sequence[int] = PARITY_BATCHES,
    seed: int = 0,
) -> dict[str, Any]:
    """Compares two embedding functions on seeded probe batches, one call per batch size.

    Returns:
        ``min_cosine`` (over every probe image), ``max_abs_diff`` and the ``batches`` tried.
    """
    worst, diff = 1.0, 0.0
    for i, n in enumerate(batches):
        x = probe_batch(n, input_size, seed=seed + i)
        with torch.inference_mode():
            ref = reference(x).float().cpu()
        got = candidate(x).float().cpu()
        if got.shape != ref.shape:
            raise OnnxRuntimeError(
                f"the ONNX file returned shape {tuple(got.shape)} for a batch of {n}, PyTorch "
                f"{tuple(ref.shape)}; re-export it with `reid export-onnx MODEL_DIR --overwrite`"
            )
        cos = embedding_cosines(got, ref)
        worst = min(worst, float(cos.min()) if bool(torch.isfinite(got).all()) else float("nan"))
        diff = max(diff, float((got - ref).abs().max()))
    return {"min_cosine": worst, "max_abs_diff": diff, "batches": list(batches)}


class OnnxEngine:
    """Runs a model's ONNX file with ONNX Runtime: the same calls as :class:`InferenceEngine`.

    Inputs are float32 NCHW batches of exactly the model's input size (the file's spatial axes are
    fixed, its batch axis is dynamic); outputs are L2-normalised float32 embeddings on the CPU (ONNX
    Runtime returns host arrays, whatever the provider).

    Args:
        path: the model directory's ONNX file.
        section: the ``onnx`` section of ``model.json`` (opset, input and output names).
        device: ``cpu`` or a CUDA device (the provider's GPU).
        input_size: (height, width) of the model input.
        module: the PyTorch model the file was exported from (eval mode, float32, on the CPU),
            kept as :attr:`module` like the torch engine's.
        provider: ``cpu``, ``cuda``, ``tensorrt`` or None/``auto`` (from ``device``).
        check: compare the file with ``module`` on probe batches at load (:func:`check_parity`).
        min_cosine: the parity threshold.
        threads: ONNX Runtime's intra-op threads (default: torch's).

    Raises:
        OnnxRuntimeError: the provider is missing, or the file's embeddings differ from the reference.
    """

    runtime = "onnx"
    #: The ONNX file is float32: half precision is a torch-runtime option.
    dtype = torch.float32
    channels_last = False
    graphs = None

    def __init__(
        self,
        path: str | Path,
        section: Mapping[str, Any],
        device: torch.device,
        input_size: tuple[int, int],
        module: nn.Module,
        *,
        provider: str | None = None,
        check: bool = True,
        min_cosine: float = ONNX_MIN_COSINE,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.provider = provider_for(provider, self.device)
        self.section = dict(section)
        self.input_name = str(self.section.get("input", {}).get("name", "images"))
        self.threads = int(threads or torch.get_num_threads())
        self.session = create_session(
            self.path, self.provider, device_id=self.device.index or 0, threads=self.threads
        )
        names = [i.name for i in self.session.get_inputs()]
        if names != [self.input_name]:
            raise OnnxRuntimeError(
                f"{self.path.name} takes inputs {names}, model.json says {self.input_name!r}; re-export it "
                "with `reid export-onnx MODEL_DIR --overwrite`"
            )
        self.module = module
        self.parity: dict[str, Any] | None = None
        if check:
            self.parity = check_parity(EmbeddingGraph(module), self.embed, self.input_size)
            if not self.parity["min_cosine"] >= min_cosine:  # NaN never passes
                raise OnnxRuntimeError(
                    f"{self.path.name} does not reproduce the PyTorch model's embeddings on provider "
                    f"{self.provider} (min cosine {self.parity['min_cosine']:.6f} < {min_cosine}): "
                    "re-export it with `reid export-onnx MODEL_DIR --overwrite`, or use runtime torch"
                )
            log.info(
                "ONNX Runtime (%s) reproduces the PyTorch embeddings: min cosine %.7f",
                self.provider,
                self.parity["min_cosine"],
            )

    def prepare_input(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch as ONNX Runtime takes it: contiguous float32 on the CPU, of the model's input size."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(batch.shape)}")
        if tuple(batch.shape[2:]) != self.input_size:
            raise ValueError(
                f"the ONNX model takes {self.input_size[0]}x{self.input_size[1]} inputs, got "
                f"{batch.shape[2]}x{batch.shape[3]}: resize with the model's preprocessing"
            )
        return batch.detach().to("cpu", torch.float32).contiguous()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Embeddings of a preprocessed NCHW batch: (N, dim) float32, L2-normalised, on the CPU."""
        x = self.prepare_input(batch)
        (out,) = self.session.run(None, {self.input_name: x.numpy()})
        return torch.from_numpy(out)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """The same as calling the engine (its outputs are on the CPU already)."""
        return self(batch)

    def describe(self) -> dict[str, Any]:
        """What the engine does, for logs, the API and benchmark JSON."""
        ort = require_onnxruntime()
        return {
            "runtime": "onnx",
            "device": str(self.device),
            "provider": self.provider,
            "providers": list(self.session.get_providers()),
            "onnxruntime": ort.__version__,
            "opset": self.section.get("opset"),
            "threads": self.threads,
            "parity": dict(self.parity) if self.parity is not None else None,
        }


def _onnx_file(model_dir: Path, meta: Mapping[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The directory's checked ONNX file and ``onnx`` section (checksum, and the weights it came from).

    Raises:
        OnnxRuntimeError: no section or file, a file name that leaves the directory, a checksum
            mismatch, or a file exported from other weights.
    """
    export_hint = f"run `reid export-onnx {model_dir}` to add one (or use runtime torch)"
    section = meta.get("onnx")
    if not isinstance(section, Mapping):
        raise OnnxRuntimeError(
            f"model {model_dir.name} has no ONNX export (no onnx section in model.json): {export_hint}"
        )
    name = section.get("file")
    # A plain file name inside the model directory: model.json must not point anywhere else.
    if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
        raise OnnxRuntimeError(f"model {model_dir.name}: the onnx section names no valid file; {export_hint}")
    path = model_dir / name
    if not path.is_file():
        raise OnnxRuntimeError(f"model {model_dir.name} has no {name}: {export_hint}")
    reexport = f"re-export it with `reid export-onnx {model_dir} --overwrite`"
    if sha256_file(path) != section.get("sha256"):
        raise OnnxRuntimeError(
            f"model {model_dir.name}: {name} does not match the checksum in model.json (modified or "
            f"corrupted); {reexport}"
        )
    if section.get("weights_sha256") != meta.get("weights_sha256"):
        raise OnnxRuntimeError(f"model {model_dir.name}: {name} was exported from other weights; {reexport}")
    return path, dict(section)


def onnx_engine(
    model_dir: Path,
    meta: Mapping[str, Any],
    module: nn.Module,
    device: torch.device,
    input_size: tuple[int, int],
    *,
    runtime: str,
    provider: str | None = None,
    torch_options: Mapping[str, Any] | None = None,
) -> OnnxEngine | None:
    """The ONNX Runtime engine ``load_model`` uses for ``runtime``, or None where torch runs the model.

    Under ``onnx`` every problem is an error; under ``auto`` a directory without a usable ONNX file
    (or one that fails the parity check) falls back to torch with a log line.

    Args:
        model_dir, meta: the model directory and its ``model.json``.
        module: the loaded PyTorch model (eval mode, float32, on the CPU).
        device, input_size: where it runs and its input size.
        runtime: ``onnx`` or ``auto``.
        provider: the ONNX Runtime provider (default: from ``device``).
        torch_options: the torch-only options asked for (``dtype``, ``compile``): refused under ``onnx``.

    Raises:
        OnnxRuntimeError: ``runtime="onnx"`` and the file is missing or unusable, or a torch-only
            option was asked for.
    """
    section = meta.get("onnx")
    has_onnx = isinstance(section, Mapping) and (model_dir / str(section.get("file", ""))).is_file()
    is_cnn = bool(getattr(module, "is_cnn", False))
    chosen = resolve_runtime(runtime, device, has_onnx=has_onnx, is_cnn=is_cnn)
    if chosen == "torch":
        if runtime == "auto" and device.type == "cpu" and is_cnn and not has_onnx:
            log.info(
                "model %s runs on torch: `reid export-onnx %s` lets ONNX Runtime run it (faster on a CPU)",
                model_dir.name,
                model_dir,
            )
        return None
    options = dict(torch_options or {})
    if runtime == "onnx" and (options.get("dtype") not in (None, torch.float32) or options.get("compile")):
        raise OnnxRuntimeError(
            "runtime onnx runs the float32 ONNX file: dtype and compile are options of the torch runtime"
        )
    try:
        path, section = _onnx_file(model_dir, meta)
        return OnnxEngine(path, section, device, input_size, module, provider=provider)
    except OnnxRuntimeError as exc:
        if runtime == "onnx":
            raise
        log.warning("runtime auto: %s; running model %s on torch", exc, model_dir.name)
        return None
