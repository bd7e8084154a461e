"""Fast inference for exported re-identification models, on a GPU first and exactly as before on a CPU.

What :class:`InferenceEngine` adds to a plain eval-mode forward pass, each piece measured in
``bench/embedding.py``:

- **Half precision, checked.** On CUDA the model runs in float16 or bfloat16, chosen per model at
  load: each candidate embeds a seeded probe batch and is kept only if every embedding has cosine
  >= ``min_cosine`` (0.999) with the float32 one; float16 is tried first (three more mantissa bits,
  and faster than bfloat16 autocast on an H100), bfloat16 next (float32's range: it cannot
  overflow), and float32 is the fallback, with a warning.
- **channels_last** for CNNs on CUDA (cuDNN's fast NHWC kernels); transformers are left alone.
- **CUDA graphs for query-sized batches.** A batch of 1-32 images costs a ViT 3-6 ms of kernel
  launches and ~0.5 ms of GPU work. Each bucket size (1, 2, 4, 8, 16, 32) gets one graph captured
  after a warm-up on a side stream, with static input and output buffers; a batch is copied into
  the smallest bucket that holds it and the graph is replayed. Rows are independent in eval mode
  (BatchNorm uses running statistics, attention stays within an image), so the padding rows cannot
  change the real ones.
- **torch.compile (optional)** with fixed batch buckets (64, 128, 256 by default): a batch is
  padded to the next bucket, so the compiled graph is never re-specialised while serving, and every
  bucket is compiled by a warm-up at start.
- **GPU preprocessing** (:class:`TensorPreprocess`, :func:`decode_jpegs`): uint8 images decoded by
  nvJPEG (or libjpeg-turbo) are resized with the model's saved filter (antialiased, which reproduces
  Pillow's filters to one grey level) and normalised on the device.

On a CPU nothing of this is on by default: the engine runs the float32 eager forward, so CPU
embeddings are bit-for-bit what they were before the engine existed.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_COMPILE_BUCKETS",
    "DEFAULT_GRAPH_BUCKETS",
    "MIN_HALF_COSINE",
    "TENSOR_INTERPOLATIONS",
    "BucketedGraphs",
    "EmbeddingGraph",
    "InferenceEngine",
    "InferenceOptions",
    "PrecisionReport",
    "TensorPreprocess",
    "bucket_for",
    "decode_jpegs",
    "embedding_cosines",
    "probe_batch",
]

log = logging.getLogger(__name__)

#: Batch sizes that get a captured CUDA graph: what interactive queries use.
DEFAULT_GRAPH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
#: Batch sizes the compiled model is specialised for (larger batches are split).
DEFAULT_COMPILE_BUCKETS: tuple[int, ...] = (64, 128, 256)
#: Smallest cosine between a half-precision and the float32 embedding of any probe image.
MIN_HALF_COSINE = 0.999
#: Model interpolation -> ``torch.nn.functional.interpolate`` mode that reproduces it. Pillow's
#: nearest filter samples pixel centres, which is torch's "nearest-exact"; Lanczos has no torch
#: equivalent, so models saved with it keep the CPU (Pillow) preprocessing.
TENSOR_INTERPOLATIONS: dict[str, str] = {
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "nearest": "nearest-exact",
}


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds ``n`` rows, or None when ``n`` exceeds every bucket."""
    if n < 1:
        raise ValueError(f"a batch needs at least one row, got {n}")
    for size in sorted(buckets):
        if size >= n:
            return size
    return None


def _check_buckets(name: str, buckets: Sequence[int]) -> tuple[int, ...]:
    values = tuple(sorted({int(b) for b in buckets}))
    if not values or values[0] < 1:
        raise ValueError(f"{name} must be positive batch sizes, got {tuple(buckets)!r}")
    return values


@dataclass(frozen=True)
class InferenceOptions:
    """How :class:`InferenceEngine` runs a model. ``None`` means "decide from the device".

    Args:
        half_precision: try float16/bfloat16 (checked against float32); default: on CUDA only.
        half_dtypes: the candidates, in order of preference.
        dtype: force this dtype instead of choosing (still measured against float32 and reported;
            never replaced, because the caller asked for it).
        channels_last: NHWC layout; default: CNNs on CUDA.
        cuda_graphs: replay captured graphs for batches up to ``max(graph_buckets)``; default: on
            CUDA (there are no graphs on a CPU).
        graph_buckets: batch sizes that get a graph.
        compile: ``torch.compile`` the forward for batches above the graph buckets.
        compile_buckets: batch sizes the compiled forward is specialised for.
        compile_mode: ``torch.compile`` mode (None: its default).
        compile_backend: ``torch.compile`` backend (``"eager"`` exercises the bucketing in tests).
        min_cosine: acceptance threshold of a half-precision candidate.
        probe_size: images in the probe batch of the precision check.
        seed: seed of the probe batch.
    """

    half_precision: bool | None = None
    half_dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    dtype: torch.dtype | None = None
    channels_last: bool | None = None
    cuda_graphs: bool | None = None
    graph_buckets: tuple[int, ...] = DEFAULT_GRAPH_BUCKETS
    compile: bool = False
    compile_buckets: tuple[int, ...] = DEFAULT_COMPILE_BUCKETS
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    min_cosine: float = MIN_HALF_COSINE
    probe_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "graph_buckets", _check_buckets("graph_buckets", self.graph_buckets))
        object.__setattr__(self, "compile_buckets", _check_buckets("compile_buckets", self.compile_buckets))
        for dt in (*self.half_dtypes, *([self.dtype] if self.dtype is not None else [])):
            if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
                raise ValueError(f"inference dtypes must be floating-point torch dtypes, got {dt!r}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must lie in (0, 1], got {self.min_cosine}")
        if self.probe_size < 1:
            raise ValueError(f"probe_size must be >= 1, got {self.probe_size}")


@dataclass(frozen=True)
class PrecisionReport:
    """Which dtype the engine runs in and how each tried candidate compared with float32.

    Attributes:
        dtype: the dtype in use.
        min_cosine: candidate dtype name -> smallest cosine with the float32 embedding over the
            probe batch (empty when nothing was compared, e.g. float32 on a CPU).
        rank1_agreement: candidate dtype name -> fraction of probe images whose nearest other probe
            image is the same as in float32 (reported, not used to decide: random-init models give
            nearly tied neighbours).
        fell_back: half precision was wanted but no candidate passed.
    """

    dtype: torch.dtype
    min_cosine: dict[str, float] = field(default_factory=dict)
    rank1_agreement: dict[str, float] = field(default_factory=dict)
    fell_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": _dtype_name(self.dtype),
            "min_cosine": dict(self.min_cosine),
            "rank1_agreement": dict(self.rank1_agreement),
            "fell_back": self.fell_back,
        }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def probe_batch(
    size: int, input_size: tuple[int, int], *, seed: int = 0, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A seeded batch that looks like normalised photographs: smooth colour fields plus fine texture.

    Pure white noise would exercise a model in a regime no camera produces; low-frequency structure
    (upsampled coarse noise) is what the precision check should be representative of.
    """
    gen = torch.Generator().manual_seed(seed)
    h, w = input_size
    coarse = torch.randn((size, 3, max(1, h // 16), max(1, w // 16)), generator=gen)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    texture = 0.25 * torch.randn((size, 3, h, w), generator=gen)
    return (smooth + texture).to(device)


def embedding_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two embedding batches, computed in float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=1)


def _rank1(embeddings: torch.Tensor) -> torch.Tensor:
    sims = embeddings.float() @ embeddings.float().T
    sims.fill_diagonal_(-float("inf"))
    return sims.argmax(dim=1)


def _is_cnn(module: nn.Module) -> bool:
    is_cnn = getattr(module, "is_cnn", None)
    if isinstance(is_cnn, bool):
        return is_cnn
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 1


class EmbeddingGraph(nn.Module):
    """What an engine computes from a batch: the raw embedding, L2-normalised in float32.

    The one definition of the served embedding: CUDA graphs and compile capture it, and the ONNX
    export (``training.onnx_export``) exports exactly this module.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embed = getattr(self.model, "embed", None)
        raw = embed(images) if callable(embed) else self.model(images)
        # Normalise in float32: half-precision sums of squares lose precision for 768-d features.
        return F.normalize(raw.float(), dim=1)


def _embed_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward that graphs and compile capture (see :class:`EmbeddingGraph`)."""
    return EmbeddingGraph(module)


class BucketedGraphs:
    """CUDA graphs of a forward for fixed batch sizes, with static input and output buffers.

    ``run(x)`` copies ``x`` into the static input of the smallest bucket that holds it, replays that
    bucket's graph and returns the first ``len(x)`` rows of its static output (a copy). Replays are
    serialised by a lock: the buffers are shared state.

    Args:
        forward: the function to capture (input batch -> output batch).
        example: a batch whose row shape, dtype and device the static inputs take.
        buckets: batch sizes to capture.
        channels_last: allocate the static inputs in NHWC layout (4-D inputs only).
        capture: capture real CUDA graphs (CUDA only). False runs the very same static-buffer,
            bucket and padding logic with an eager call in place of the replay, which is how the
            logic is tested on machines without a GPU.
        warmup: eager calls on a side stream before each capture (lazy initialisation, cuDNN and
            cuBLAS workspace allocation must not happen during capture).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        example: torch.Tensor,
        buckets: Sequence[int] = DEFAULT_GRAPH_BUCKETS,
        *,
        channels_last: bool = False,
        capture: bool = True,
        warmup: int = 3,
    ) -> None:
        if example.ndim < 2:
            raise ValueError(f"example must be a batch (N, ...), got shape {tuple(example.shape)}")
        if capture and example.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA example tensor; pass capture=False on a CPU")
        self.forward = forward
        self.buckets = _check_buckets("buckets", buckets)
        self.capture = capture
        self.replays = 0
        self._lock = threading.Lock()
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._graphs: dict[int, Any] = {}
        if channels_last and example.ndim != 4:
            raise ValueError("channels_last needs 4-D (N, C, H, W) inputs")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        row_shape = tuple(example.shape[1:])
        pool = torch.cuda.graph_pool_handle() if capture else None
        # no_grad, not inference_mode: buffers and the generator state that a capture touches stay
        # normal tensors, which later in-place updates (inside or outside inference_mode) may change.
        with torch.no_grad():
            # Largest first: the shared pool then serves the smaller captures from blocks it holds.
            for size in sorted(self.buckets, reverse=True):
                static_in = torch.zeros(
                    (size, *row_shape), dtype=example.dtype, device=example.device
                ).contiguous(memory_format=memory_format)
                self._inputs[size] = static_in
                if capture:
                    self._graphs[size], self._outputs[size] = self._capture(static_in, pool, warmup)
                else:
                    self._outputs[size] = forward(static_in)

    def _capture(self, static_in: torch.Tensor, pool: Any, warmup: int) -> tuple[Any, torch.Tensor]:
        device = static_in.device
        # torch.cuda.graph captures on a stream of the *current* device: make it the model's.
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    self.forward(static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_out = self.forward(static_in)
        return graph, static_out

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        """The bucket a batch of ``n`` rows runs in (ValueError past the largest)."""
        size = bucket_for(n, self.buckets)
        if size is None:
            raise ValueError(f"a batch of {n} exceeds the largest graph bucket ({self.max_batch})")
        return size

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Forward of ``x`` (N <= max_batch rows) through its bucket's graph; returns N output rows."""
        n = x.shape[0]
        size = self.bucket(n)
        with self._lock:
            static_in = self._inputs[size]
            # Rows n..size keep whatever the last call left there: finite values from real inputs
            # (or the zeros of the capture), and rows never influence each other in eval mode.
            static_in[:n].copy_(x)
            if self.capture:
                self._graphs[size].replay()
            else:
                self._outputs[size] = self.forward(static_in)
            self.replays += 1
            return self._outputs[size][:n].clone()


class InferenceEngine:
    """Runs an eval-mode embedding model as fast as its device allows (see the module docstring).

    Args:
        module: the model in eval mode, float32, already on ``device``. Modules with an ``embed``
            method (:class:`training.model.ReIDModel`) are called through it, others directly. The
            engine may convert it in place (dtype, memory format); use :attr:`module` afterwards.
        device: where the model runs.
        input_size: (height, width) of the model input, for the probe batch and the warm-ups.
        options: :class:`InferenceOptions`.
    """

    #: Which runtime runs the model (``training.onnx_runtime.OnnxEngine`` says ``"onnx"``).
    runtime = "torch"

    def __init__(
        self,
        module: nn.Module,
        device: str | torch.device,
        input_size: tuple[int, int],
        options: InferenceOptions | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.options = options or InferenceOptions()
        on_cuda = self.device.type == "cuda"
        opts = self.options
        if opts.cuda_graphs and not on_cuda:
            raise ValueError(
                f"cuda_graphs=True needs a CUDA device, the model runs on {self.device}; "
                "leave cuda_graphs unset (None) to use graphs only where they exist"
            )
        self.channels_last = (
            (on_cuda and _is_cnn(module)) if opts.channels_last is None else opts.channels_last
        )
        module.eval()
        module.requires_grad_(False)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        self.module, self.precision = self._choose_precision(module)
        self.dtype = self.precision.dtype
        self._forward = _embed_fn(self.module)
        self.graphs: BucketedGraphs | None = None
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._compile_lock = threading.Lock()
        self.warmup_s: dict[str, float] = {}
        use_graphs = on_cuda if opts.cuda_graphs is None else opts.cuda_graphs
        if opts.compile:
            self._setup_compile()
        if use_graphs:
            start = time.perf_counter()
            with torch.no_grad():
                self.graphs = BucketedGraphs(
                    self._forward,
                    self._example(1),
                    opts.graph_buckets,
                    channels_last=self.channels_last,
                    capture=True,
                )
            self.warmup_s["cuda_graphs"] = round(time.perf_counter() - start, 3)
            log.info(
                "captured CUDA graphs for batches %s in %.2f s",
                list(opts.graph_buckets),
                self.warmup_s["cuda_graphs"],
            )

    # ------------------------------------------------------------------------------ set-up

    def _example(self, n: int) -> torch.Tensor:
        x = torch.zeros((n, 3, *self.input_size), device=self.device, dtype=self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _run_eager(self, module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(self.device, dtype=dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return _embed_fn(module)(x)

    def _choose_precision(self, module: nn.Module) -> tuple[nn.Module, PrecisionReport]:
        """The module in the dtype to use and the report of how that dtype was chosen."""
        opts = self.options
        on_cuda = self.device.type == "cuda"
        want_half = on_cuda if opts.half_precision is None else opts.half_precision
        if opts.dtype is None and not want_half:
            return module.float(), PrecisionReport(dtype=torch.float32)
        candidates = [opts.dtype] if opts.dtype is not None else list(opts.half_dtypes)
        if candidates == [torch.float32]:
            return module.float(), PrecisionReport(dtype=torch.float32)
        probe = probe_batch(opts.probe_size, self.input_size, seed=opts.seed, device=self.device)
        reference = self._run_eager(module.float(), probe, torch.float32)
        ref_rank1 = _rank1(reference)
        cosines: dict[str, float] = {}
        agreement: dict[str, float] = {}
        for dtype in candidates:
            # A copy per candidate: converting float32 weights to half and back loses precision,
            # and a rejected candidate must leave the float32 model untouched.
            candidate = module if opts.dtype is not None else copy.deepcopy(module)
            candidate.to(dtype=dtype)
            try:
                out = self._run_eager(candidate, probe, dtype)
            except RuntimeError as exc:  # e.g. an op without a kernel for this dtype on this device
                log.warning("%s inference is not available here (%s)", _dtype_name(dtype), exc)
                cosines[_dtype_name(dtype)] = float("nan")
                if opts.dtype is not None:
                    raise
                continue
            cos = embedding_cosines(out, reference)
            finite = bool(torch.isfinite(out).all())
            worst = float(cos.min()) if finite else float("nan")
            cosines[_dtype_name(dtype)] = worst
            agreement[_dtype_name(dtype)] = float((_rank1(out) == ref_rank1).float().mean())
            if opts.dtype is not None:
                if not worst >= opts.min_cosine:
                    log.warning(
                        "%s embeddings differ from float32 (min cosine %.5f < %.3f); using %s as asked",
                        _dtype_name(dtype),
                        worst,
                        opts.min_cosine,
                        _dtype_name(dtype),
                    )
                return candidate, PrecisionReport(dtype, cosines, agreement)
            if worst >= opts.min_cosine:  # NaN (overflow) never passes
                log.info("running in %s (min cosine with float32 %.5f)", _dtype_name(dtype), worst)
                return candidate, PrecisionReport(dtype, cosines, agreement)
            del candidate
        log.warning(
            "no half-precision dtype reproduces this model's float32 embeddings (min cosine %s, "
            "threshold %.3f): running in float32, about 2x slower",
            {k: round(v, 5) for k, v in cosines.items()},
            opts.min_cosine,
        )
        return module.float(), PrecisionReport(torch.float32, cosines, agreement, fell_back=True)

    def _setup_compile(self) -> None:
        opts = self.options
        kwargs: dict[str, Any] = {"dynamic": False, "backend": opts.compile_backend}
        if opts.compile_mode is not None:
            kwargs["mode"] = opts.compile_mode
        self._compiled = torch.compile(self._forward, **kwargs)
        start = time.perf_counter()
        # Compile every bucket now, not on the first request of each size.
        with torch.inference_mode():
            for size in opts.compile_buckets:
                self._compiled(self._example(size))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_s["compile"] = round(time.perf_counter() - start, 3)
        log.info("compiled for batches %s in %.1f s", list(opts.compile_buckets), self.warmup_s["compile"])

    # ------------------------------------------------------------------------------ running

    def prepare_input(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch on the engine's device, dtype and memory format (pinned, asynchronous upload)."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(batch.shape)}")
        if batch.device != self.device and self.device.type == "cuda" and batch.device.type == "cpu":
            # A pageable source makes the copy synchronous; pinning lets it overlap.
            if not batch.is_pinned():
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True)
        x = batch.to(self.device, dtype=self.dtype, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Embeddings of a preprocessed NCHW batch: (N, dim) float32, L2-normalised, on the device."""
        x = self.prepare_input(batch)
        with torch.inference_mode():
            n = x.shape[0]
            if n == 0:
                return self._forward(self._example(1))[:0].clone()
            # Graphs and compiled buckets are specialised for the model's input size.
            same_size = tuple(x.shape[2:]) == self.input_size
            if self.graphs is not None and same_size and n <= self.graphs.max_batch:
                return self.graphs.run(x)
            if self._compiled is not None and same_size:
                return self._run_compiled(x)
            return self._forward(x)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Like calling the engine, but the embeddings come back on the CPU."""
        return self(batch).cpu()

    def _run_compiled(self, x: torch.Tensor) -> torch.Tensor:
        assert self._compiled is not None
        buckets = self.options.compile_buckets
        out = []
        for start in range(0, x.shape[0], buckets[-1]):
            chunk = x[start : start + buckets[-1]]
            n = chunk.shape[0]
            size = bucket_for(n, buckets)
            assert size is not None
            if size > n:
                pad = chunk.new_zeros((size - n, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad])
                if self.channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
            with self._compile_lock:
                out.append(self._compiled(chunk)[:n])
        return torch.cat(out) if len(out) > 1 else out[0]

    def describe(self) -> dict[str, Any]:
        """What the engine does, for logs, the API and benchmark JSON."""
        return {
            "runtime": self.runtime,
            "device": str(self.device),
            "precision": self.precision.to_dict(),
            "channels_last": self.channels_last,
            "cuda_graphs": list(self.graphs.buckets) if self.graphs is not None else None,
            "compile": list(self.options.compile_buckets) if self._compiled is not None else None,
            "warmup_s": dict(self.warmup_s),
        }


# ------------------------------------------------------------------------------- preprocessing


class TensorPreprocess:
    """The model's test-time transform on uint8 RGB tensors: resize, scale, normalise, on any device.

    It reproduces :func:`training.data.transforms.build_test_transform` (Pillow resize, ToTensor,
    Normalize) to within one grey level per pixel: torch's antialiased bilinear/bicubic kernels are
    Pillow's filters, and the result is rounded to integers as Pillow's uint8 output is. Images of
    one size are resized together, so a batch of same-size crops costs one kernel per step.

    Args:
        size: (height, width) of the model input.
        interpolation: the model's filter (``bilinear``, ``bicubic`` or ``nearest``).
        mean, std: per-channel normalisation.
        device: where the batch is produced.
        dtype: dtype of the produced batch (the model's).
        channels_last: produce an NHWC batch.
    """

    def __init__(
        self,
        size: tuple[int, int],
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        if interpolation not in TENSOR_INTERPOLATIONS:
            raise ValueError(
                f"interpolation {interpolation!r} has no tensor equivalent (supported: "
                f"{', '.join(TENSOR_INTERPOLATIONS)}); use the model's CPU preprocess"
            )
        self.size = (int(size[0]), int(size[1]))
        self.interpolation = interpolation
        self.mode = TENSOR_INTERPOLATIONS[interpolation]
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        self._mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(list(std), dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    @staticmethod
    def supports(interpolation: str) -> bool:
        """Whether a model saved with this interpolation can be preprocessed on tensors."""
        return interpolation in TENSOR_INTERPOLATIONS

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) uint8 or float images in [0, 255] -> (N, 3, H, W) float32, integer-valued."""
        x = images.to(self.device, non_blocking=True).float()
        if tuple(x.shape[-2:]) == self.size:
            return x  # Pillow returns an unchanged copy too
        if self.mode == "nearest-exact":
            return F.interpolate(x, size=self.size, mode=self.mode)
        x = F.interpolate(x, size=self.size, mode=self.mode, align_corners=False, antialias=True)
        # Pillow rounds its filtered result to uint8: so do we (and bicubic may overshoot [0, 255]).
        return x.round_().clamp_(0, 255)

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 RGB CHW images (any sizes, any device) -> normalised (N, 3, H, W) batch."""
        if len(images) == 0:
            return torch.empty((0, 3, *self.size), dtype=self.dtype, device=self.device)
        out = torch.empty((len(images), 3, *self.size), dtype=self.dtype, device=self.device)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i} must be RGB CHW, got shape {tuple(img.shape)}")
            groups.setdefault((*img.shape, str(img.device)), []).append(i)
        for indices in groups.values():
            group = [images[i] for i in indices]
            if self.device.type == "cuda" and group[0].device.type == "cpu":
                # Stack straight into pinned memory so the upload is one asynchronous copy.
                stacked = torch.empty((len(group), *group[0].shape), dtype=group[0].dtype, pin_memory=True)
                torch.stack(group, out=stacked)
            else:
                stacked = torch.stack(group)
            x = self.resize(stacked)
            # The very operations of ToTensor + Normalize, in float32, in the same order.
            x = x.div_(255.0).sub_(self._mean).div_(self._std)
            index = torch.tensor(indices, device=self.device)
            out.index_copy_(0, index, x.to(self.dtype))
        return out


def _torchcodec_jpeg() -> Callable[..., Any] | None:
    """TorchCodec's ``decode_jpeg``, or None where TorchCodec is missing or does not load.

    The GPU machines run a preinstalled torch that a given TorchCodec build may not match: any
    failure to load it means "use another decoder", not an error.
    """
    global _TORCHCODEC_JPEG
    if _TORCHCODEC_JPEG is None:
        try:
            from torchcodec.decoders import decode_jpeg
        except Exception as exc:  # ImportError, or OSError / RuntimeError from its native libraries
            log.info("TorchCodec is not usable here (%s)", exc)
            _TORCHCODEC_JPEG = False
        else:
            _TORCHCODEC_JPEG = decode_jpeg
    return _TORCHCODEC_JPEG or None


def _turbojpeg() -> Any | None:
    """A PyTurboJPEG decoder, or None where the package or the system's libturbojpeg is missing."""
    global _TURBOJPEG
    if _TURBOJPEG is None:
        try:
            from turbojpeg import TurboJPEG

            _TURBOJPEG = TurboJPEG()
        except Exception as exc:  # ImportError, or RuntimeError/OSError: libturbojpeg not found
            log.info("PyTurboJPEG is not usable here (%s)", exc)
            _TURBOJPEG = False
    return _TURBOJPEG or None


_TORCHCODEC_JPEG: Any = None
_TURBOJPEG: Any = None


def _turbo_rgb(decoder: Any, data: bytes) -> torch.Tensor:
    import warnings

    from turbojpeg import TJPF_RGB

    try:
        # libjpeg-turbo reports a damaged stream it can still half-decode as a warning: an error here,
        # so no partly grey image is embedded.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pixels = decoder.decode(data, pixel_format=TJPF_RGB)
    except (OSError, UserWarning) as exc:
        raise RuntimeError(f"cannot decode the JPEG: {exc}") from exc
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def _pillow_rgb(data: bytes) -> torch.Tensor:
    """One JPEG through Pillow as a uint8 RGB CHW tensor (the fallback decoder)."""
    import io

    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.array(image.convert("RGB"))
    except OSError as exc:  # the same error type TorchCodec raises, so callers handle one
        raise RuntimeError(f"cannot decode the JPEG: {exc}") from exc
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def jpeg_decoder_name(device: str | torch.device = "cpu") -> str:
    """Which decoder :func:`decode_jpegs` uses on ``device``: pyturbojpeg, torchcodec or pillow."""
    if torch.device(device).type == "cuda" and _torchcodec_jpeg() is not None:
        return "torchcodec"
    if _turbojpeg() is not None:
        return "pyturbojpeg"
    return "torchcodec" if _torchcodec_jpeg() is not None else "pillow"


def decode_jpegs(datas: Sequence[bytes], device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Decode JPEG bytes to uint8 RGB CHW tensors: batched nvJPEG on CUDA, libjpeg-turbo on a CPU.

    torchvision's image decoding is deprecated since 0.29; what replaces it was measured on 64x128
    crops on the CPU (bench/README.md): PyTurboJPEG 2.8x Pillow, TorchCodec 2.2x, so a CPU decodes
    with PyTurboJPEG, then TorchCodec, then Pillow, whichever loads. CUDA decodes a list in one
    nvJPEG call through TorchCodec (or on the CPU and copies, where TorchCodec does not load). The
    bytes must already have passed the service's checks (format by content, pixel limit): this
    function decodes, it does not judge. Grey-scale JPEGs come out as 3-channel RGB.

    Raises:
        RuntimeError: a JPEG the decoder cannot handle (corrupt, CMYK on some decoders); callers
            fall back to Pillow for the batch, which also names the bad image.
    """
    if len(datas) == 0:
        return []
    device = torch.device(device)
    name = jpeg_decoder_name(device)
    if name == "torchcodec":
        decode = _torchcodec_jpeg()
        assert decode is not None
        if device.type == "cuda":
            return list(decode([bytes(d) for d in datas], mode="RGB", device=device))
        return [decode(bytes(d), mode="RGB") for d in datas]
    if name == "pyturbojpeg":
        turbo = _turbojpeg()
        return [_turbo_rgb(turbo, bytes(d)).to(device) for d in datas]
    return [_pillow_rgb(d).to(device) for d in datas]
