"""Embedding benchmark: the model, decode, ingestion and exact-search paths against their limits.

Every figure comes with its reference measured in the same run, on the same device:

1. **forward**: ViT-S/16, ViT-B/16 (GPU, or ``--vit-b`` on a CPU) and ResNet-50 at 256x128, random
   init: images/s at batch 256 (32 on a CPU) in float32 and in half precision (float16 and bfloat16
   on a GPU, bfloat16 on a CPU), ResNet-50 with and without channels_last, the engine's own
   precision choice (cosines with float32), and batch-1 latency eager vs CUDA-graph replay. On a
   GPU, one model (ViT-B/16, else ViT-S/16) also runs through the engine's ``torch.compile`` option
   (a fixed bucket of 256) against eager float16, with its compile time, in a child process killed
   after ``REID_BENCH_COMPILE_S`` seconds (default 120; 0 skips it) so that a slow compile cannot eat
   the machine's time; on a CPU it is not run (compiling takes minutes).
2. **decode**: 64x128 JPEG crops: one batched nvJPEG call per 256 (GPU), against Pillow decode +
   resize on one core and the decode pool, and libjpeg-turbo (torchvision) per core and pooled.
3. **ingest**: JPEG files on disk through the ingestion pipeline (``service.imaging.preparation``: read,
   hash, check, decode, preprocess, pinned upload, embed) against the pure forward at the same batch
   size (goal on a GPU: >= 0.9x), for each JPEG road (gpu = nvJPEG, cpu = libjpeg-turbo + GPU resize,
   pil = everything on the CPU).
4. **runtime**: ResNet-50, ViT-S/16 and MobileNetV2 at 256x128, random init, exported with their
   ONNX file: batch-1 latency and batch-``cfg.batch`` throughput of torch eager float32, torch
   bfloat16 (only where the engine's half-precision check passes) and ONNX Runtime (the CPU
   provider; on a GPU, torch's default engine and the cuda/tensorrt providers where installed), in
   interleaved rounds (median of the rounds), each with its parity against torch float32 (min
   cosine, rank-1 agreement on the batch). A variant *passes* at min cosine >= 0.99999 and full
   rank-1 agreement; the fastest passing one is what ``REID_RUNTIME=auto`` should choose.
5. **search**: the torch exact index (``index.torch_index``), 1M x 768 float16 on a GPU (100k x 384
   float32 on a CPU), 1 / 64 / 1024 queries, against a bare matrix product + top-k over the same
   tensor.

``--quick`` shrinks everything to seconds (tiny models, small batches, few files) so a test can run
it on a CPU; ``--parts`` runs some of the parts. Run:
``python -m bench.embedding [--quick] [--device cpu|cuda] [--vit-b] [--parts runtime,...] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.machine import portable_traceback, write_result
from bench.timing import synchronize

log = logging.getLogger("bench.embedding")

SEED = 0
#: Limits measured on one H100 (torch 2.11, DESIGN.md section 8): orientation, not the ratios' base.
REFERENCE = {
    "h100_forward_batch256_fp16_images_per_s": {"vit_s16": 31_900, "vit_b16": 14_600, "resnet50": 20_000},
    "h100_batch1_fp16_eager_ms": {"vit_s16": 3.3, "vit_b16": 4.3, "resnet50": 4.2},
    "h200_batch1_fp16_cuda_graph_ms": {"vit_s16": 0.53, "vit_b16": 0.68, "resnet50": 0.85},
    "h100_jpeg_64x128_images_per_s": {"nvjpeg_batched": 17_000, "pillow_decode_resize_per_core": 900},
    "h100_exact_fp16_1M_x_768_ms": {"queries_1": 0.70, "queries_64": 1.24, "queries_1024": 9.9},
    "note": "measured elsewhere for orientation; every ratio below uses references from this run",
}


@dataclass(frozen=True)
class ModelCase:
    name: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """Sizes of one run (see :func:`config`)."""

    device: str
    quick: bool
    input_size: tuple[int, int]
    batch: int
    models: tuple[ModelCase, ...]
    seconds: float
    latency_iters: int
    crops: int
    crop_size: tuple[int, int]  # (width, height) of the JPEG crops
    ingest_models: tuple[str, ...]
    ingest_files: int
    ingest_images: int
    search_n: int
    search_dim: int
    search_queries: tuple[int, ...]
    #: The model case compiled by :func:`compile_case` (on a GPU), and its time limit in seconds.
    compile_model: str | None = None
    compile_limit_s: float = 0.0
    #: The models of :func:`runtime_case` and its interleaved measurement rounds.
    runtime_models: tuple[ModelCase, ...] = ()
    runtime_rounds: int = 1

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


VIT_S = ModelCase("vit_s16", "vit_small_patch16_224")
VIT_B = ModelCase("vit_b16", "vit_base_patch16_224")
RESNET50 = ModelCase("resnet50", "resnet50")
MOBILENETV2 = ModelCase("mobilenetv2", "mobilenetv2_100")
#: The parts of a run, in order (``--parts``).
PARTS = ("forward", "decode", "ingest", "runtime", "search")

#: Environment variable: seconds the compile case may take (child start, compile, both measurements).
COMPILE_LIMIT_ENV = "REID_BENCH_COMPILE_S"
#: Its default: a cold inductor compile of a ViT at one batch size takes about a minute on a 16-core host.
DEFAULT_COMPILE_LIMIT_S = 120.0
#: What the compile case reports where it does not run.
COMPILE_NOT_ON_CPU = "not run on a CPU (compile takes minutes)"


def compile_limit_s() -> float:
    """The compile case's time limit from ``REID_BENCH_COMPILE_S`` (0 skips the case)."""
    text = os.environ.get(COMPILE_LIMIT_ENV, "").strip()
    if not text:
        return DEFAULT_COMPILE_LIMIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{COMPILE_LIMIT_ENV}={text!r} must be a number of seconds >= 0 (0 skips compiling)")
    return value


def config(quick: bool, device: str, *, vit_b: bool | None = None) -> Config:
    """Full size on a GPU; CPU-sized (batch 32, 100k x 384) on a CPU; seconds with ``quick``."""
    on_gpu = device.startswith("cuda")
    if quick:
        tiny = {"depth": 1, "embed_dim": 64, "num_heads": 2}
        return Config(
            device=device,
            quick=True,
            input_size=(64, 32),
            batch=4,
            models=(
                ModelCase("vit_s16", "vit_small_patch16_224", tiny),
                ModelCase("mobilenetv3", "mobilenetv3_small_050"),
            ),
            seconds=0.0,
            latency_iters=3,
            crops=24,
            crop_size=(32, 64),
            ingest_models=("mobilenetv3",),
            ingest_files=12,
            ingest_images=24,
            search_n=5_000,
            search_dim=64,
            search_queries=(1, 64, 256),
            compile_model="vit_s16",
            compile_limit_s=compile_limit_s(),
            runtime_models=(ModelCase("resnet_tiny", "resnet18", {"layers": (1, 1, 1, 1)}),),
        )
    with_vit_b = on_gpu if vit_b is None else vit_b
    return Config(
        device=device,
        quick=False,
        input_size=(256, 128),
        batch=256 if on_gpu else 32,
        models=(VIT_S, *((VIT_B,) if with_vit_b else ()), RESNET50),
        seconds=1.0 if on_gpu else 4.0,
        latency_iters=200 if on_gpu else 10,
        crops=4096 if on_gpu else 512,
        crop_size=(64, 128),
        ingest_models=("vit_s16", "resnet50"),
        ingest_files=4096 if on_gpu else 128,
        ingest_images=16_384 if on_gpu else 128,
        search_n=1_000_000 if on_gpu else 100_000,
        search_dim=768 if on_gpu else 384,
        search_queries=(1, 64, 1024),
        # ViT-B/16 where it runs: the H100 reference is ViT-B (15,100 compiled / 14,600 eager).
        compile_model=VIT_B.name if with_vit_b else VIT_S.name,
        compile_limit_s=compile_limit_s(),
        runtime_models=(RESNET50, VIT_S, MOBILENETV2),
        runtime_rounds=3,
    )


# ------------------------------------------------------------------------------------------ timing


def _throughput(fn: Callable[[], Any], per_call: int, device: str, seconds: float, warmup: int = 3) -> float:
    """Items/s of ``fn`` (``per_call`` items each) over at least ``seconds`` and 3 calls, warm-up excluded.

    ``seconds=0`` (quick runs) times a single call after a single warm-up call.
    """
    min_calls = 3 if seconds > 0 else 1
    for _ in range(warmup if seconds > 0 else 1):
        fn()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    synchronize(device)
    return calls * per_call / (time.perf_counter() - start)


def _latencies_ms(fn: Callable[[], Any], device: str, iters: int, warmup: int = 5) -> dict[str, float]:
    """Median and p95 wall time of ``fn`` (synchronised: what one request waits), in ms."""
    for _ in range(min(warmup, iters)):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p95_ms": round(times[min(len(times) - 1, round(0.95 * (len(times) - 1)))], 3),
        "iters": iters,
    }


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _section(name: str, fn: Callable[[], Any]) -> Any:
    """Run one part; a failure is recorded next to the others' numbers, not fatal."""
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:
        log.exception("%s failed", name)
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": portable_traceback()}
    log.info("%s done in %.1f s", name, time.perf_counter() - start)
    return out


# ------------------------------------------------------------------------------------------ models


def _reid_model(case: ModelCase, cfg: Config) -> Any:
    from training.model import ReIDModel

    torch.manual_seed(SEED)
    return ReIDModel(case.arch, img_size=cfg.input_size, backbone_kwargs=case.kwargs).eval()


def _engine(module: Any, cfg: Config, **options: Any) -> Any:
    from training.inference import InferenceEngine, InferenceOptions

    return InferenceEngine(
        copy.deepcopy(module).to(cfg.device), cfg.device, cfg.input_size, InferenceOptions(**options)
    )


def forward_case(case: ModelCase, cfg: Config) -> dict[str, Any]:
    """Throughput per dtype/layout, the engine's own choice, and batch-1 latency eager vs graphs."""
    from training.inference import probe_batch

    module = _reid_model(case, cfg)
    x = probe_batch(cfg.batch, cfg.input_size, seed=SEED + 1, device=cfg.device)
    out: dict[str, Any] = {"model": case.name, "arch": case.arch, "batch": cfg.batch, "is_cnn": module.is_cnn}

    def throughput(engine: Any) -> float:
        xin = engine.prepare_input(x)  # converted once: the figure is the model alone
        return round(_throughput(lambda: engine(xin), cfg.batch, cfg.device, cfg.seconds), 1)

    variants: dict[str, dict[str, Any]] = {
        "float32": {"half_precision": False, "channels_last": False, "cuda_graphs": False}
    }
    halves = (torch.float16, torch.bfloat16) if cfg.on_gpu else (torch.bfloat16,)
    for dtype in halves:
        name = str(dtype).removeprefix("torch.")
        variants[name] = {"dtype": dtype, "cuda_graphs": False}  # channels_last: the engine's default
        if cfg.on_gpu and module.is_cnn:
            variants[f"{name}_contiguous"] = {"dtype": dtype, "cuda_graphs": False, "channels_last": False}
    images_per_s: dict[str, float] = {}
    cosines: dict[str, float] = {}
    for name, options in variants.items():
        engine = _engine(module, cfg, **options)
        images_per_s[name] = throughput(engine)
        cosines.update(engine.precision.min_cosine)
        log.info("%s %s: %.1f images/s", case.name, name, images_per_s[name])
        del engine
        _free(cfg.device)
    out["images_per_s"] = images_per_s
    out["half_vs_float32"] = {
        k: round(v / images_per_s["float32"], 3) for k, v in images_per_s.items() if k != "float32"
    }
    if cfg.on_gpu and module.is_cnn:
        out["channels_last_vs_contiguous"] = {
            str(d).removeprefix("torch."): round(
                images_per_s[str(d).removeprefix("torch.")]
                / images_per_s[f"{str(d).removeprefix('torch.')}_contiguous"],
                3,
            )
            for d in halves
        }
    out["min_cosine_vs_float32"] = {k: round(v, 6) for k, v in cosines.items()}

    # What load_model does by default on this device: the checked choice, graphs on CUDA.
    chosen = _engine(module, cfg)
    out["engine"] = chosen.describe()
    x1 = chosen.prepare_input(x[:1])
    eager = _engine(module, cfg, dtype=chosen.dtype, cuda_graphs=False)
    x1e = eager.prepare_input(x[:1])
    out["batch1_eager"] = _latencies_ms(lambda: eager(x1e), cfg.device, cfg.latency_iters)
    if chosen.graphs is not None:
        out["batch1_cuda_graph"] = _latencies_ms(lambda: chosen(x1), cfg.device, cfg.latency_iters)
        out["graph_speedup"] = round(
            out["batch1_eager"]["median_ms"] / out["batch1_cuda_graph"]["median_ms"], 2
        )
        x8 = chosen.prepare_input(x[:8])
        out["batch8_cuda_graph"] = _latencies_ms(lambda: chosen(x8), cfg.device, cfg.latency_iters)
        # The graph must give what the eager forward gives for the same rows.
        same = torch.nn.functional.cosine_similarity(chosen(x[:5]), eager(x[:5])).min()
        out["graph_vs_eager_min_cosine"] = round(float(same), 6)
    else:
        out["batch1_cuda_graph"] = "not available on a CPU"
    if case.name == cfg.compile_model:
        del chosen, eager  # the child process gets the device to itself
        _free(cfg.device)
        out["compile"] = compile_case(case, cfg) if cfg.on_gpu else COMPILE_NOT_ON_CPU
    return out  # the engines go with this frame; run() frees the device memory


#: Prefix of the line on which the compile case's child prints its result (JSON).
_COMPILE_RESULT = "COMPILE-CASE-RESULT "


def compile_case(
    case: ModelCase, cfg: Config, *, backend: str = "inductor", limit_s: float | None = None
) -> dict[str, Any] | str:
    """The engine's ``torch.compile`` option against eager, at ``cfg.batch``, within a time limit.

    A child process builds the random-init model through :class:`~training.inference.InferenceEngine`
    twice, eager and with ``compile=True`` and the single bucket ``cfg.batch`` (compiled by the
    warm-up at construction, as the service does at start-up), in float16 on a GPU (float32 on a
    CPU), and measures both on the same batch: eager before and after the compiled one. The child
    runs in its own process group, so the limit stops it and inductor's compile workers at once.

    Args:
        case: the model.
        cfg: sizes (device, input size, batch, seconds per measurement).
        backend: ``torch.compile`` backend (``"eager"`` exercises this machinery on a CPU in tests).
        limit_s: seconds the child may take, start-up included (default ``cfg.compile_limit_s``);
            0 skips the case.

    Returns:
        The figures, ``{"error": ...}`` when the child failed or was stopped at the limit (never
        raises: the other cases' figures must survive), or a string saying why it was skipped.
    """
    limit = cfg.compile_limit_s if limit_s is None else limit_s
    if limit <= 0:
        return f"skipped ({COMPILE_LIMIT_ENV}=0)"
    spec = {
        "name": case.name,
        "arch": case.arch,
        "kwargs": case.kwargs,
        "quick": cfg.quick,
        "device": cfg.device,
        "input_size": list(cfg.input_size),
        "batch": cfg.batch,
        "seconds": cfg.seconds,
        "dtype": "float16" if cfg.on_gpu else "float32",
        "backend": backend,
    }
    started = time.perf_counter()
    try:
        result = _run_compile_child(spec, limit)
    except Exception as exc:  # the parent's own failure (e.g. no interpreter to start): recorded
        log.exception("compile case of %s failed", case.name)
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": portable_traceback()}
    result["limit_s"] = limit
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if "error" in result:
        log.warning("compile case of %s: %s", case.name, result["error"])
    else:
        log.info(
            "compile %s: %.1f images/s compiled vs %.1f eager (compiled in %.1f s)",
            case.name,
            result["images_per_s"]["compiled"],
            result["images_per_s"]["eager"],
            result["compile_s"],
        )
    return result


def _run_compile_child(spec: dict[str, Any], limit: float) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH")) if p)
    code = "import sys; from bench.embedding import compile_worker; compile_worker(sys.argv[1])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(spec)],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {
            "error": f"stopped at its {limit:g} s limit before finishing (compiling is slow on this "
            f"machine, or hung); set {COMPILE_LIMIT_ENV} to allow more time"
        }
    except BaseException:  # interrupted (a time limit's SIGTERM, Ctrl-C): no orphaned compiler
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    for line in reversed(stdout.splitlines()):
        if line.startswith(_COMPILE_RESULT):
            return json.loads(line[len(_COMPILE_RESULT) :])
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    return {"error": f"the compile child exited with status {proc.returncode} and no result: {tail}"}


def compile_worker(spec_json: str) -> None:
    """The compile case's child process: measure (see :func:`compile_case`), print one result line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = _compile_measure(json.loads(spec_json))
    except Exception as exc:  # reported to the parent as the case's error
        log.exception("compile case failed")
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": portable_traceback()}
    print(_COMPILE_RESULT + json.dumps(result), flush=True)


def _compile_measure(spec: dict[str, Any]) -> dict[str, Any]:
    from training.inference import probe_batch

    case = ModelCase(spec["name"], spec["arch"], dict(spec["kwargs"]))
    cfg = replace(
        config(bool(spec["quick"]), str(spec["device"])),
        input_size=(int(spec["input_size"][0]), int(spec["input_size"][1])),
        batch=int(spec["batch"]),
        seconds=float(spec["seconds"]),
    )
    dtype = getattr(torch, spec["dtype"])
    module = _reid_model(case, cfg)
    x = probe_batch(cfg.batch, cfg.input_size, seed=SEED + 1, device=cfg.device)
    eager = _engine(module, cfg, dtype=dtype, cuda_graphs=False)
    xe = eager.prepare_input(x)

    def eager_rate() -> float:
        return _throughput(lambda: eager(xe), cfg.batch, cfg.device, cfg.seconds)

    before = eager_rate()
    start = time.perf_counter()
    compiled = _engine(
        module,
        cfg,
        dtype=dtype,
        cuda_graphs=False,
        compile=True,
        compile_buckets=(cfg.batch,),
        compile_backend=spec["backend"],
    )
    build_s = time.perf_counter() - start
    xc = compiled.prepare_input(x)
    compiled_rate = _throughput(lambda: compiled(xc), cfg.batch, cfg.device, cfg.seconds)
    after = eager_rate()
    eager_mean = (before + after) / 2
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(compiled(xc).float(), eager(xe).float()).min()
    return {
        "model": case.name,
        "arch": case.arch,
        "batch": cfg.batch,
        "dtype": spec["dtype"],
        "backend": spec["backend"],
        "buckets": [cfg.batch],
        "compile_s": compiled.warmup_s.get("compile"),
        "engine_build_s": round(build_s, 2),
        "images_per_s": {"eager": round(eager_mean, 1), "compiled": round(compiled_rate, 1)},
        "eager_before_after": [round(before, 1), round(after, 1)],
        "compiled_vs_eager": round(compiled_rate / eager_mean, 3),
        "min_cosine_vs_eager": round(float(cosine), 6),
    }


# ------------------------------------------------------------------------------------------ decode


def make_crops(n: int, size: tuple[int, int], seed: int = SEED) -> list[bytes]:
    """Photo-like JPEG crops (smooth colour fields plus texture), quality 90, seeded."""
    rng = np.random.default_rng(seed)
    width, height = size
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        noise = rng.integers(-12, 13, (height, width, 3))
        arr = np.clip(np.asarray(img).astype(np.int16) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _pillow_process_pool(
    feeders: ThreadPoolExecutor, crops: list[bytes], spec: Any, processes: int, timed: Callable[..., float]
) -> dict[str, Any]:
    """The Pillow full preprocess in the service's worker processes (one per core), fed by the threads.

    The same crops and transform (``spec``, a ``Preprocess``) as ``pillow_preprocess_pool``, the
    thread pool that feeds the workers here, in the same run.
    """
    from service.imaging.processes import DecodeProcessPool

    started = time.perf_counter()
    workers = DecodeProcessPool(processes)
    workers.start()
    try:
        if not workers.wait_ready(300):
            return {"pillow_preprocess_processes": "the worker processes did not start"}
        out: dict[str, Any] = {"decode_processes_start_s": round(time.perf_counter() - started, 2)}

        def preprocess(data: bytes) -> Any:
            done = workers.run_specs(data, name="crop", max_pixels=10**8, specs={0: spec})
            assert done is not None, "a decode worker died during the benchmark"
            return done

        list(feeders.map(preprocess, crops[: 4 * processes]))  # every worker builds its transform
        out["pillow_preprocess_processes"] = timed(lambda: list(feeders.map(preprocess, crops)), len(crops))
        out["decode_processes"] = processes
        return out
    finally:
        workers.close()


def _decoder_comparison(
    crops: list[bytes], timed: Callable[[Callable[[], Any], int], float]
) -> dict[str, Any]:
    """JPEG -> uint8 RGB only, one core, same crops, rounds interleaved: Pillow, TorchCodec, PyTurboJPEG.

    The candidates of ``training.inference.decode_jpegs`` (torchvision.io's decoders are
    deprecated); PyTurboJPEG needs the system's libturbojpeg and is skipped where it is missing.
    """
    import io

    import numpy as np

    def pillow(data: bytes) -> Any:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))

    decoders: dict[str, Callable[[bytes], Any]] = {"pillow": pillow}
    try:
        from torchcodec.decoders import decode_jpeg

        decoders["torchcodec"] = lambda data: decode_jpeg(data, mode="RGB")
    except Exception as exc:  # missing, or a build that does not match this torch
        decoders_note = f"torchcodec unavailable: {type(exc).__name__}"
    else:
        decoders_note = None
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        turbo = TurboJPEG()
        decoders["pyturbojpeg"] = lambda data: turbo.decode(data, pixel_format=TJPF_RGB)
    except Exception as exc:  # the Python package or libturbojpeg is missing
        decoders_note = (decoders_note + "; " if decoders_note else "") + f"pyturbojpeg unavailable: {exc}"
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(3):
        for name, fn in decoders.items():
            rates[name].append(timed(lambda fn=fn: [fn(d) for d in crops], len(crops)))
    out: dict[str, Any] = {name: statistics.median(r) for name, r in rates.items()}
    out.update(
        {f"{name}_vs_pillow": round(out[name] / out["pillow"], 2) for name in decoders if name != "pillow"}
    )
    if decoders_note:
        out["note"] = decoders_note
    return out


def decode_case(cfg: Config, crops: list[bytes]) -> dict[str, Any]:
    """Images/s of each decoder on the same crops (see the module docstring)."""
    from service.imaging.decoding import decode_image
    from training.data.transforms import Preprocess, build_test_transform
    from training.inference import TensorPreprocess, decode_jpegs, jpeg_decoder_name

    height, width = cfg.input_size
    prep_spec = Preprocess(size=cfg.input_size, interpolation="bicubic")
    transform = build_test_transform(prep_spec)
    threads = os.cpu_count() or 1
    n = len(crops)
    out: dict[str, Any] = {"crops": n, "crop_size_wh": list(cfg.crop_size), "threads": threads}

    def pillow_decode_resize(data: bytes) -> Any:
        return decode_image(data, max_pixels=10**8).image.resize((width, height), Image.BICUBIC)

    def pillow_preprocess(data: bytes) -> Any:
        return transform(decode_image(data, max_pixels=10**8).image)

    def timed(fn: Callable[[], Any], items: int) -> float:
        start = time.perf_counter()
        fn()
        synchronize(cfg.device)
        return round(items / (time.perf_counter() - start), 1)

    per_core = crops[: max(32, n // 8)]
    decode_jpegs(per_core[:2])  # load the decoder library before timing it
    out["decode_jpegs_decoder"] = jpeg_decoder_name("cpu")
    out["pillow_decode_resize_per_core"] = timed(
        lambda: [pillow_decode_resize(d) for d in per_core], len(per_core)
    )
    out["pillow_preprocess_per_core"] = timed(lambda: [pillow_preprocess(d) for d in per_core], len(per_core))
    out["libjpeg_turbo_decode_per_core"] = timed(lambda: [decode_jpegs([d]) for d in per_core], len(per_core))
    out["decoders_per_core"] = _decoder_comparison(per_core, timed)
    with ThreadPoolExecutor(threads, thread_name_prefix="bench-decode") as pool:
        list(pool.map(pillow_preprocess, crops[:threads]))  # start the threads
        out["pillow_preprocess_pool"] = timed(lambda: list(pool.map(pillow_preprocess, crops)), n)
        out["libjpeg_turbo_decode_pool"] = timed(
            lambda: list(pool.map(lambda d: decode_jpegs([d]), crops)), n
        )
        out.update(_pillow_process_pool(pool, crops, prep_spec, threads, timed))
    if isinstance(out.get("pillow_preprocess_processes"), float):
        out["pillow_processes_vs_thread_pool"] = round(
            out["pillow_preprocess_processes"] / out["pillow_preprocess_pool"], 2
        )
    if cfg.on_gpu:
        batch = 256
        chunks = [crops[i : i + batch] for i in range(0, n, batch)]
        decode_jpegs(chunks[0], cfg.device)  # nvJPEG initialisation
        synchronize(cfg.device)
        out["nvjpeg_batched"] = timed(lambda: [decode_jpegs(c, cfg.device) for c in chunks], n)
        prep = TensorPreprocess(
            cfg.input_size,
            "bicubic",
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
            device=cfg.device,
            dtype=torch.float16,
        )
        out["nvjpeg_plus_gpu_resize_normalise"] = timed(
            lambda: [prep(decode_jpegs(c, cfg.device)) for c in chunks], n
        )
        out["nvjpeg_vs_pillow_decode_resize_per_core"] = round(
            out["nvjpeg_batched"] / out["pillow_decode_resize_per_core"], 1
        )
        out["nvjpeg_vs_pillow_pool"] = round(out["nvjpeg_batched"] / out["pillow_preprocess_pool"], 2)
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a grey level or two.
        sample = crops[:64]
        gpu = prep(decode_jpegs(sample, cfg.device)).float().cpu()
        cpu = torch.stack([pillow_preprocess(d) for d in sample])
        out["gpu_vs_pillow_preprocess_max_abs_diff"] = round(float((gpu - cpu).abs().max()), 4)
        out["gpu_vs_pillow_preprocess_mean_abs_diff"] = round(float((gpu - cpu).abs().mean()), 5)
    else:
        out["nvjpeg_batched"] = "not available on a CPU"
    return out


# ------------------------------------------------------------------------------------------ ingest


def ingest_case(case: ModelCase, cfg: Config, files: list[Path], workdir: Path) -> dict[str, Any]:
    """Pipeline images/s per JPEG road against the pure forward at the same batch size."""
    from service.imaging.preparation import device_stage_for, prefetched_batches, prepare_file, stack
    from training.export import export_model, load_model

    model_dir = export_model(
        _reid_model(case, cfg),
        workdir / f"model-{case.name}",
        kind="person",
        preprocess={"size": cfg.input_size, "interpolation": "bicubic"},
        overwrite=True,
    )
    model = load_model(model_dir, cfg.device, cuda_graphs=False)
    inputs = [files[i % len(files)] for i in range(cfg.ingest_images)]
    batch = cfg.batch
    with Image.open(files[0]) as img:
        one = model.preprocess(img)
    # Already in the model's dtype and layout on the device: the reference is the model alone.
    x = model.engine.prepare_input(one[None].expand(batch, *one.shape).contiguous())

    def forward_rate() -> float:
        # The model alone on a device-resident batch, embeddings back on the CPU as ingestion gets them.
        return _throughput(lambda: model.embed(x), batch, cfg.device, cfg.seconds)

    threads = max(2, os.cpu_count() or 2)
    roads = ("gpu", "cpu", "pil") if cfg.on_gpu else ("pil",)
    out: dict[str, Any] = {
        "model": case.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "batch": batch,
        "images": len(inputs),
        "unique_files": len(files),
        "decode_threads": threads,
    }
    before = forward_rate()
    rates: dict[str, float] = {}
    failures: dict[str, int] = {}
    fallbacks: dict[str, int] = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="bench-ingest") as pool:
        for road in roads:
            stage = device_stage_for({0: model}, jpeg_decoder=road, max_pixels=10**8)

            def prepare(path: Path, road: str | None = stage.jpeg_decoder if stage else None) -> Any:
                return prepare_file(
                    path,
                    path,
                    max_pixels=10**8,
                    preprocessors={0: model.preprocess},
                    is_known=lambda _digest: False,
                    jpeg_decoder=road,
                )

            def run_pipeline(items: list[Path], prepare=prepare, stage=stage) -> int:
                done = 0
                for prepared in prefetched_batches(
                    pool, items, prepare, batch_size=batch, prefetch=2, finish=stage
                ):
                    ready = [p for p in prepared if p.error is None]
                    model.embed(stack([p.tensors[0] for p in ready]))
                    done += len(ready)
                return done

            # The Pillow road is the slow reference: a quarter of the images measure it well enough.
            items = inputs[: max(4 * batch, len(inputs) // 4)] if road == "pil" and cfg.on_gpu else inputs
            run_pipeline(inputs[: 2 * batch])  # warm-up: threads, nvJPEG, allocator
            start = time.perf_counter()
            done = run_pipeline(items)
            rates[road] = round(done / (time.perf_counter() - start), 1)
            failures[road] = len(items) - done
            if stage is not None:  # batches nvJPEG refused, decoded by Pillow instead
                fallbacks[road] = stage.gpu_decode_failures
            log.info("ingest %s (%s road): %.1f images/s", case.name, road, rates[road])
    after = forward_rate()
    forward = (before + after) / 2
    out["forward_images_per_s"] = round(forward, 1)
    out["forward_before_after"] = [round(before, 1), round(after, 1)]
    out["pipeline_images_per_s"] = rates
    out["ratio_to_forward"] = {road: round(rate / forward, 3) for road, rate in rates.items()}
    out["failed_images"] = failures
    out["gpu_decode_fallback_batches"] = fallbacks
    return out  # the model goes with this frame; run() frees the device memory


# ------------------------------------------------------------------------------------------ runtime


def _nearest_other(embeddings: torch.Tensor) -> torch.Tensor:
    sims = embeddings.float() @ embeddings.float().T
    sims.fill_diagonal_(-float("inf"))
    return sims.argmax(dim=1)


def runtime_case(case: ModelCase, cfg: Config, workdir: Path) -> dict[str, Any]:
    """torch float32, torch bfloat16 (where checked) and ONNX Runtime on one exported model, same run."""
    from training.export import export_model, load_model
    from training.inference import InferenceEngine, InferenceOptions, embedding_cosines, probe_batch
    from training.onnx_runtime import ONNX_MIN_COSINE, OnnxRuntimeError

    module = _reid_model(case, cfg)
    started = time.perf_counter()
    model_dir = export_model(
        module,
        workdir / f"runtime-{case.name}",
        kind="person",
        preprocess={"size": cfg.input_size, "interpolation": "bicubic"},
        onnx=True,
        overwrite=True,
    )
    out: dict[str, Any] = {
        "model": case.name,
        "arch": case.arch,
        "batch": cfg.batch,
        "export_with_onnx_s": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    engines: dict[str, Any] = {
        "torch_float32": load_model(
            model_dir, cfg.device, runtime="torch", half_precision=False, cuda_graphs=False
        ).engine
    }
    if cfg.on_gpu:  # what load_model does on a GPU: the checked half precision and CUDA graphs
        engines["torch_default"] = load_model(model_dir, cfg.device, runtime="torch").engine
    else:
        bf16 = InferenceEngine(
            copy.deepcopy(module),
            cfg.device,
            cfg.input_size,
            InferenceOptions(half_precision=True, half_dtypes=(torch.bfloat16,)),
        )
        if bf16.dtype == torch.bfloat16:
            engines["torch_bfloat16"] = bf16
        else:
            out["torch_bfloat16"] = f"not run: the half-precision check failed ({bf16.precision.min_cosine})"
    for provider in ("cuda", "tensorrt") if cfg.on_gpu else ("cpu",):
        try:
            engines[f"onnx_{provider}"] = load_model(
                model_dir, cfg.device, runtime="onnx", onnx_provider=provider
            ).engine
        except OnnxRuntimeError as exc:
            out[f"onnx_{provider}"] = f"not available: {exc}"

    x = probe_batch(cfg.batch, cfg.input_size, seed=SEED + 3, device=cfg.device)
    with torch.inference_mode():
        reference = engines["torch_float32"](x).float().cpu()
    parity: dict[str, dict[str, Any]] = {}
    for name, engine in engines.items():
        with torch.inference_mode():
            got = engine(x).float().cpu()
        worst = round(float(embedding_cosines(got, reference).min()), 7)
        agreement = round(float((_nearest_other(got) == _nearest_other(reference)).float().mean()), 4)
        parity[name] = {
            "min_cosine": worst,
            "rank1_agreement": agreement,
            "passes": worst >= ONNX_MIN_COSINE and agreement == 1.0,
        }
    out["parity_vs_torch_float32"] = parity

    inputs = {name: (e.prepare_input(x), e.prepare_input(x[:1])) for name, e in engines.items()}
    rates: dict[str, list[float]] = {name: [] for name in engines}
    latencies: dict[str, list[float]] = {name: [] for name in engines}
    # Interleaved rounds: a neighbour's load on the shared cores slows every variant alike.
    for _ in range(cfg.runtime_rounds):
        for name, engine in engines.items():
            xb, x1 = inputs[name]
            rate = _throughput(lambda e=engine, xb=xb: e(xb), cfg.batch, cfg.device, cfg.seconds)
            rates[name].append(rate)
            one = _latencies_ms(lambda e=engine, x1=x1: e(x1), cfg.device, cfg.latency_iters)
            latencies[name].append(one["median_ms"])
    out["images_per_s"] = {name: round(statistics.median(v), 1) for name, v in rates.items()}
    out["batch1_ms"] = {name: round(statistics.median(v), 2) for name, v in latencies.items()}
    out["rounds"] = {"images_per_s": rates, "batch1_ms": latencies}
    base_rate, base_ms = out["images_per_s"]["torch_float32"], out["batch1_ms"]["torch_float32"]
    out["throughput_vs_torch_float32"] = {k: round(v / base_rate, 2) for k, v in out["images_per_s"].items()}
    out["batch1_speedup_vs_torch_float32"] = {k: round(base_ms / v, 2) for k, v in out["batch1_ms"].items()}
    passing = [name for name in engines if parity[name]["passes"]]
    out["fastest_passing"] = {
        "batch1": min(passing, key=lambda n: out["batch1_ms"][n]),
        f"batch{cfg.batch}": max(passing, key=lambda n: out["images_per_s"][n]),
    }
    out["engines"] = {name: e.describe() for name, e in engines.items()}
    return out


# ------------------------------------------------------------------------------------------ search


def search_case(cfg: Config) -> dict[str, Any]:
    """The torch exact index against a bare matmul + top-k on the same stored tensor."""
    from index import create_index

    n, dim, k = cfg.search_n, cfg.search_dim, 10
    index = create_index("torch", spec="flat", dim=dim, device=cfg.device)
    gen = torch.Generator(device=cfg.device).manual_seed(SEED)
    start = time.perf_counter()
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        block = torch.randn((m, dim), generator=gen, device=cfg.device)
        index.add(np.arange(s, s + m, dtype=np.int64), block)
    synchronize(cfg.device)
    add_s = time.perf_counter() - start
    rng = np.random.default_rng(SEED + 2)
    queries = rng.standard_normal((max(cfg.search_queries), dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    stored = index.stored_vectors  # the very tensor the index searches
    qd = torch.from_numpy(queries).to(cfg.device, dtype=stored.dtype)
    out: dict[str, Any] = {
        "n": n,
        "dim": dim,
        "k": k,
        "device": str(index.device),
        "dtype": str(index.dtype).removeprefix("torch."),
        "add_s": round(add_s, 2),
        "bytes": int(stored.numel() * stored.element_size()),
        "index": {},
        "bare_matmul_topk": {},
        "ratio_to_bare": {},
    }

    def bare(nq: int) -> Any:
        with torch.inference_mode():
            return torch.topk(qd[:nq] @ stored.T, k, dim=1)

    for nq in cfg.search_queries:
        iters = max(3, {1: 100, 64: 30}.get(nq, 5)) if not cfg.quick else 3
        q = queries[:nq]
        try:
            ours = _latencies_ms(lambda q=q: index.search(q, k), cfg.device, iters, warmup=2)
            ref = _latencies_ms(lambda nq=nq: bare(nq), cfg.device, iters, warmup=2)
        except torch.cuda.OutOfMemoryError as exc:  # the bare product of 1024 x 1M needs 2 GB at once
            out["index"][f"queries_{nq}"] = {"error": str(exc)[:200]}
            continue
        out["index"][f"queries_{nq}"] = ours
        out["bare_matmul_topk"][f"queries_{nq}"] = ref
        out["ratio_to_bare"][f"queries_{nq}"] = round(ours["median_ms"] / ref["median_ms"], 3)
        log.info("search %d queries: %.3f ms (bare %.3f ms)", nq, ours["median_ms"], ref["median_ms"])
    one = out["bare_matmul_topk"].get("queries_1")
    if one:
        out["bare_queries_1_gb_per_s"] = round(out["bytes"] / (one["median_ms"] / 1e3) / 1e9, 1)
    # Half precision stores and scores ~1e-3 off float32: how often does the top-10 still agree?
    probe = queries[:32]
    got = index.search(probe, k).ids
    exact = (
        torch.topk(torch.from_numpy(probe).to(cfg.device) @ stored.float().T, k, dim=1).indices.cpu().numpy()
    )
    out["top10_agreement_with_float32"] = round(
        float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, exact, strict=True)])), 4
    )
    return out  # the index goes with this frame; run() frees the device memory


# ------------------------------------------------------------------------------------------ run


def run(
    quick: bool = False,
    device: str | None = None,
    *,
    vit_b: bool | None = None,
    parts: tuple[str, ...] = PARTS,
) -> dict[str, Any]:
    """Run the parts (default: every part, see the module docstring) and return the figures."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}: choose from {', '.join(PARTS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config(quick, device, vit_b=vit_b)
    started = time.perf_counter()
    figures: dict[str, Any] = {
        "device": device,
        "quick": quick,
        "input_size": list(cfg.input_size),
        "batch": cfg.batch,
        "load_average_start": round(os.getloadavg()[0], 2),
        "reference": REFERENCE,
    }
    figures["parts"] = list(parts)
    if "forward" in parts:
        figures["forward"] = []
        for m in cfg.models:
            figures["forward"].append(_section(f"forward {m.name}", lambda m=m: forward_case(m, cfg)))
            _free(cfg.device)
    crops = make_crops(cfg.crops, cfg.crop_size)
    if "decode" in parts:
        figures["decode"] = _section("decode", lambda: decode_case(cfg, crops))
    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as tmp:
        workdir = Path(tmp)
        files = []
        for i, data in enumerate(crops[: cfg.ingest_files]):
            path = workdir / f"{i:06d}.jpg"
            path.write_bytes(data)
            files.append(path)
        by_name = {m.name: m for m in cfg.models}
        if "ingest" in parts:
            figures["ingest"] = []
            for name in cfg.ingest_models:
                if name in by_name:
                    case = by_name[name]
                    figures["ingest"].append(
                        _section(f"ingest {name}", lambda case=case: ingest_case(case, cfg, files, workdir))
                    )
                    _free(cfg.device)
        if "runtime" in parts:
            figures["runtime"] = []
            for m in cfg.runtime_models:
                figures["runtime"].append(
                    _section(f"runtime {m.name}", lambda m=m: runtime_case(m, cfg, workdir))
                )
                _free(cfg.device)
    if "search" in parts:
        figures["search"] = _section("search", lambda: search_case(cfg))
        _free(cfg.device)
    if "forward" in parts and "search" in parts:
        figures["single_query_floor_ms"] = _single_query_floor(figures)
    figures["load_average_end"] = round(os.getloadavg()[0], 2)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures


def _single_query_floor(figures: dict[str, Any]) -> dict[str, float]:
    """Batch-1 forward (graph if any) + 1-query search: what an HTTP query cannot beat (service bench)."""
    search = figures.get("search") or {}
    one = (search.get("index") or {}).get("queries_1")
    if not isinstance(one, dict) or "median_ms" not in one:
        return {}
    out = {}
    for case in figures["forward"]:
        if "error" in case:
            continue
        fwd = (
            case["batch1_cuda_graph"] if isinstance(case["batch1_cuda_graph"], dict) else case["batch1_eager"]
        )
        out[case["model"]] = round(fwd["median_ms"] + one["median_ms"], 3)
    return out


def markdown(figures: dict[str, Any]) -> str:
    """The main figures as markdown tables (what bench/README.md shows)."""
    lines: list[str] = []
    if "forward" in figures:
        lines += [
            "| model | batch | images/s by dtype | half / fp32 | batch-1 eager ms | batch-1 graph ms |",
            "|---|---|---|---|---|---|",
        ]
    for c in figures.get("forward", []):
        if "error" in c:
            lines.append(f"| ? | | error: {c['error']} | | | |")
            continue
        rates = ", ".join(f"{k} {v:,.0f}" for k, v in c["images_per_s"].items())
        ratio = ", ".join(f"{k} {v}x" for k, v in c["half_vs_float32"].items())
        graph = c["batch1_cuda_graph"]
        graph_ms = f"{graph['median_ms']:.2f}" if isinstance(graph, dict) else "n/a (CPU)"
        eager_ms = c["batch1_eager"]["median_ms"]
        lines.append(f"| {c['model']} | {c['batch']} | {rates} | {ratio} | {eager_ms:.2f} | {graph_ms} |")
    compiled = [c["compile"] for c in figures.get("forward", []) if "compile" in c]
    if compiled:
        lines += [
            "",
            "| torch.compile | batch | eager img/s | compiled img/s | compiled / eager | compile s |",
            "|---|---|---|---|---|---|",
        ]
        for comp in compiled:
            if not isinstance(comp, dict):
                lines.append(f"| {comp} | | | | | |")
            elif "error" in comp:
                lines.append(f"| error: {comp['error']} | | | | | |")
            else:
                lines.append(
                    f"| {comp['model']} ({comp['dtype']}) | {comp['batch']} | "
                    f"{comp['images_per_s']['eager']:,.0f} | {comp['images_per_s']['compiled']:,.0f} | "
                    f"{comp['compiled_vs_eager']}x | {comp['compile_s']} |"
                )
    if "ingest" in figures:
        lines += ["", "| ingestion | road | images/s | forward images/s | ratio |", "|---|---|---|---|---|"]
    for c in figures.get("ingest", []):
        if "error" in c:
            lines.append(f"| ? | error: {c['error']} | | | |")
            continue
        for road, rate in c["pipeline_images_per_s"].items():
            lines.append(
                f"| {c['model']} | {road} | {rate:,.0f} | {c['forward_images_per_s']:,.0f} | "
                f"{c['ratio_to_forward'][road]} |"
            )
    lines += _runtime_markdown(figures.get("runtime", []))
    s = figures.get("search", {"error": "not run"})
    if "error" not in s:
        lines += [
            "",
            f"| exact search {s['n']:,} x {s['dim']} {s['dtype']} | ms | bare ms | ratio |",
            "|---|---|---|---|",
        ]
        for key, v in s["index"].items():
            if "median_ms" in v:
                bare = s["bare_matmul_topk"][key]["median_ms"]
                ratio = s["ratio_to_bare"][key]
                lines.append(f"| {key.replace('_', ' ')} | {v['median_ms']:.3f} | {bare:.3f} | {ratio} |")
    return "\n".join(lines)


def _runtime_markdown(cases: list[dict[str, Any]]) -> list[str]:
    """The runtime part: one row per model and runtime, with its parity against torch float32."""
    if not cases:
        return []
    lines = [
        "",
        "| model | runtime | batch-1 ms | images/s | batch-1 / torch fp32 | images/s / torch fp32 "
        "| min cosine vs fp32 | rank-1 agreement | passes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        if "error" in c:
            lines.append(f"| ? | error: {c['error']} | | | | | | | |")
            continue
        for name, rate in c["images_per_s"].items():
            parity = c["parity_vs_torch_float32"][name]
            speedup, gain = c["batch1_speedup_vs_torch_float32"][name], c["throughput_vs_torch_float32"][name]
            lines.append(
                f"| {c['model']} | {name} | {c['batch1_ms'][name]:.2f} | {rate:,.1f} | {speedup}x | "
                f"{gain}x | {parity['min_cosine']:.7f} | {parity['rank1_agreement']} | {parity['passes']} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a CPU")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--vit-b", action="store_true", default=None, help="include ViT-B/16 on a CPU too")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default: all)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (default bench/results/embedding-{cpu,gpu}[-PARTS][-quick].json)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    figures = run(args.quick, args.device, vit_b=args.vit_b, parts=parts)
    kind = "gpu" if figures["device"].startswith("cuda") else "cpu"
    subset = "" if set(parts) == set(PARTS) else "-" + "-".join(parts)
    out = Path(args.out or f"bench/results/embedding-{kind}{subset}{'-quick' if args.quick else ''}.json")
    write_result(out, "embedding", figures)
    print(markdown(figures))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
