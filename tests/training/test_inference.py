"""The inference engine: half precision checked against float32, bucketed CUDA-graph logic, compile
buckets, tensor preprocessing against Pillow's, and the ingestion pipeline's device stage.

Everything here runs on a CPU. What needs a GPU (capturing real CUDA graphs, nvJPEG) runs the same
code with the device swapped, and is measured by ``bench/embedding.py`` on a GPU machine: the
static-buffer, bucket and padding logic is tested here with ``capture=False``, the JPEG stage with
libjpeg-turbo standing in for nvJPEG.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from training.export import export_model, load_model
from training.inference import (
    BucketedGraphs,
    InferenceEngine,
    InferenceOptions,
    TensorPreprocess,
    bucket_for,
    decode_jpegs,
    embedding_cosines,
    probe_batch,
)
from training.model import ReIDModel

SIZE = (64, 32)


def _tiny_vit(seed: int = 0) -> ReIDModel:
    torch.manual_seed(seed)
    return ReIDModel(
        "vit_small_patch16_224", img_size=SIZE, backbone_kwargs={"depth": 2, "embed_dim": 96, "num_heads": 2}
    ).eval()


def _tiny_cnn(seed: int = 0) -> ReIDModel:
    torch.manual_seed(seed)
    model = ReIDModel("mobilenetv3_small_050", img_size=SIZE).eval()
    # Random running statistics make random-init features differ across images, like trained ones.
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
    return model


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return probe_batch(n, SIZE, seed=seed)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What LoadedModel.embed computed before the engine existed (float32, eager)."""
    with torch.inference_mode():
        return F.normalize(model.embed(x).float(), dim=1)


# ----------------------------------------------------------------------------------- buckets


@given(
    buckets=st.lists(st.integers(1, 64), min_size=1, max_size=6, unique=True),
    n=st.integers(1, 80),
)
@settings(max_examples=60, deadline=None)
def test_bucket_is_the_smallest_that_holds_the_batch(buckets: list[int], n: int) -> None:
    got = bucket_for(n, buckets)
    holding = [b for b in buckets if b >= n]
    if holding:
        assert got == min(holding)
    else:
        assert got is None


def test_bucket_rejects_empty_batches() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        bucket_for(0, (1, 2))


class _RowMixer(nn.Module):
    """A row-wise model (like any eval-mode network): each output row depends on its input row only."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x.flatten(1)))


@given(sizes=st.lists(st.integers(1, 16), min_size=1, max_size=6), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_static_buffers_pad_to_the_bucket_and_return_only_real_rows(sizes: list[int], seed: int) -> None:
    torch.manual_seed(0)
    model = _RowMixer()
    graphs = BucketedGraphs(model, torch.zeros(1, 3, 2, 2), buckets=(1, 2, 4, 8, 16), capture=False)
    gen = torch.Generator().manual_seed(seed)
    for call, n in enumerate(sizes, start=1):
        x = torch.randn((n, 3, 2, 2), generator=gen)
        out = graphs.run(x)
        # Rows past n hold what earlier calls left in the static input: they must not leak in.
        assert out.shape == (n, 5)
        torch.testing.assert_close(out, model(x))
        assert graphs.replays == call
        assert graphs.bucket(n) == bucket_for(n, graphs.buckets)


def test_static_buffers_keep_their_layout_and_reject_oversize_batches() -> None:
    model = _tiny_cnn()
    graphs = BucketedGraphs(
        lambda x: F.normalize(model.embed(x), dim=1),
        torch.zeros(1, 3, *SIZE),
        buckets=(4, 2),
        channels_last=True,
        capture=False,
    )
    assert graphs.buckets == (2, 4) and graphs.max_batch == 4
    x = _images(3)
    torch.testing.assert_close(graphs.run(x), _reference(model, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the largest graph bucket"):
        graphs.run(_images(5))


def test_real_graph_capture_needs_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        BucketedGraphs(nn.Identity(), torch.zeros(1, 3, 2, 2), buckets=(1,), capture=True)


# ----------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("make", [_tiny_vit, _tiny_cnn], ids=["vit", "cnn"])
def test_cpu_engine_is_the_plain_float32_forward_bit_for_bit(make) -> None:
    model = make()
    expected = _reference(model, _images(5))
    engine = InferenceEngine(make(), "cpu", SIZE)
    assert engine.dtype == torch.float32 and engine.graphs is None and not engine.channels_last
    assert engine.precision.min_cosine == {}  # nothing to compare on a CPU by default
    assert torch.equal(engine.embed(_images(5)), expected)


# bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operation), float16 keeps 11
# (2^-12 ~ 2.4e-4). The rounding errors of the 96 features are nearly independent, so the embedding's
# direction moves by about that relative size and its cosine with float32 stays at 1 - O(eps^2)
# ~ 0.99999: the engine's acceptance threshold (0.999) must then also hold on images it never saw.
HALF_COSINE_FLOOR = 0.999
HALF_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bfloat16", "float16"])
def test_half_precision_embeddings_match_float32(dtype: torch.dtype) -> None:
    reference_model = _tiny_vit()
    engine = InferenceEngine(
        _tiny_vit(), "cpu", SIZE, InferenceOptions(half_precision=True, half_dtypes=(dtype,))
    )
    assert engine.dtype == dtype, engine.precision
    assert engine.precision.min_cosine[str(dtype).removeprefix("torch.")] >= 0.999
    assert next(engine.module.parameters()).dtype == dtype
    x = _images(16, seed=7)  # not the probe batch: the check must generalise
    got = engine.embed(x)
    assert got.dtype == torch.float32  # normalised in float32 whatever the model runs in
    cos = embedding_cosines(got, _reference(reference_model, x))
    assert float(cos.min()) >= HALF_COSINE_FLOOR
    torch.testing.assert_close(got.norm(dim=1), torch.ones(16))


class _Overflowing(nn.Module):
    """Activations of ~1e6: beyond float16's range (65504), within bfloat16's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            self.conv.weight.mul_(1e6)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x))).mean(dim=(2, 3)) + 1e6


def test_float16_overflow_is_caught_and_bfloat16_chosen_instead() -> None:
    engine = InferenceEngine(_Overflowing(), "cpu", (8, 8), InferenceOptions(half_precision=True))
    report = engine.precision
    assert np.isnan(report.min_cosine["float16"])  # inf activations: NaN embeddings
    assert report.min_cosine["bfloat16"] >= 0.999
    assert engine.dtype == torch.bfloat16 and not report.fell_back


def test_no_passing_half_dtype_falls_back_to_float32_with_a_warning(caplog) -> None:
    reference_model = _tiny_vit()
    options = InferenceOptions(half_precision=True, half_dtypes=(torch.bfloat16,), min_cosine=1.0)
    with caplog.at_level(logging.WARNING, logger="training.inference"):
        engine = InferenceEngine(_tiny_vit(), "cpu", SIZE, options)
    assert engine.dtype == torch.float32 and engine.precision.fell_back
    assert engine.precision.min_cosine["bfloat16"] < 1.0
    assert "running in float32" in caplog.text
    x = _images(3)
    # The rejected candidate was a copy: the float32 weights were never rounded.
    assert torch.equal(engine.embed(x), _reference(reference_model, x))


def test_a_forced_dtype_is_kept_and_measured() -> None:
    engine = InferenceEngine(_tiny_vit(), "cpu", SIZE, InferenceOptions(dtype=torch.bfloat16))
    assert engine.dtype == torch.bfloat16
    assert 0.99 < engine.precision.min_cosine["bfloat16"] <= 1.0 + 1e-6
    assert set(engine.precision.rank1_agreement) == {"bfloat16"}


def test_graphs_on_a_cpu_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        InferenceEngine(_tiny_vit(), "cpu", SIZE, InferenceOptions(cuda_graphs=True))


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="graph_buckets"):
        InferenceOptions(graph_buckets=(0, 2))
    with pytest.raises(ValueError, match="floating-point"):
        InferenceOptions(dtype=torch.int8)
    with pytest.raises(ValueError, match="min_cosine"):
        InferenceOptions(min_cosine=1.5)


# ------------------------------------------------------------------------------------- compile


def test_compiled_forward_pads_to_its_buckets_and_matches_eager() -> None:
    reference_model = _tiny_vit()
    options = InferenceOptions(compile=True, compile_buckets=(4, 8), compile_backend="eager")
    engine = InferenceEngine(_tiny_vit(), "cpu", SIZE, options)
    assert "compile" in engine.warmup_s
    for n in (1, 3, 8, 13):  # 13 = one full bucket of 8 plus 5 padded to 8
        x = _images(n, seed=n)
        torch.testing.assert_close(engine.embed(x), _reference(reference_model, x), rtol=1e-4, atol=1e-5)
    assert engine.describe()["compile"] == [4, 8]


# ------------------------------------------------------------------------------ preprocessing


def _jpeg(width: int, height: int, seed: int, mode: str = "RGB", quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour fields (upsampled noise) plus a little texture."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    arr = np.clip(np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (height, width, 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _exported(tmp_path: Path, interpolation: str, make=_tiny_cnn) -> Path:
    return export_model(
        make(),
        tmp_path / f"model-{interpolation}",
        kind="person",
        preprocess={"size": SIZE, "interpolation": interpolation},
    )


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_tensor_preprocess_reproduces_pillow_and_its_embeddings(tmp_path: Path, interpolation: str) -> None:
    model = load_model(_exported(tmp_path, interpolation), "cpu")
    # Person-crop sizes: upscaled (32x64), downscaled (48x160) and unchanged (32x64 target is 64x32
    # h x w, so 32 wide x 64 high), plus a grey-scale JPEG.
    crops = [_jpeg(32, 64, 0), _jpeg(48, 160, 1), _jpeg(64, 128, 2), _jpeg(40, 90, 3, mode="L")]
    pil = torch.stack([model.preprocess(Image.open(io.BytesIO(c))) for c in crops])
    tensor = model.preprocess_jpegs(crops)
    assert tensor.shape == pil.shape and tensor.dtype == torch.float32
    # One grey level after normalisation is 1 / (255 * std) ~ 0.0175; nearest picks whole pixels,
    # so it may pick a neighbour at a rounding boundary: compare its mean error instead.
    one_level = 1.0 / (255 * min(model.std)) + 1e-5
    diff = (tensor - pil).abs()
    if interpolation == "nearest":
        assert float(diff.mean()) < one_level
    else:
        assert float(diff.max()) <= one_level
    cos = embedding_cosines(model.embed(tensor), model.embed(pil))
    assert float(cos.min()) >= 0.999


def test_tensor_preprocess_refuses_lanczos(tmp_path: Path) -> None:
    model = load_model(_exported(tmp_path, "lanczos"), "cpu")
    assert model.tensor_preprocess is None
    with pytest.raises(ValueError, match="no tensor equivalent"):
        model.preprocess_tensors([torch.zeros(3, 8, 4, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="no tensor equivalent"):
        TensorPreprocess(SIZE, "lanczos", (0.5,) * 3, (0.5,) * 3)


def test_tensor_preprocess_keeps_input_order_across_size_groups() -> None:
    prep = TensorPreprocess(SIZE, "bilinear", (0.0,) * 3, (1.0,) * 3)
    shapes = [(8, 4), (64, 32)] * 3
    images = [torch.full((3, h, w), float(i), dtype=torch.uint8) for i, (h, w) in enumerate(shapes)]
    out = prep(images)
    # A constant image stays constant through any resize: row i must hold value i / 255.
    for i in range(6):
        torch.testing.assert_close(out[i], torch.full((3, *SIZE), i / 255.0))
    assert prep([]).shape == (0, 3, *SIZE)


@pytest.mark.parametrize("decoder", ["pyturbojpeg", "torchcodec", "pillow"])
def test_decode_jpegs_matches_pillow_on_cpu_without_deprecated_decoders(decoder, monkeypatch) -> None:
    import training.inference as inference

    # Each decoder in turn, the faster ones switched off as where they do not load. PyTurboJPEG also
    # needs the system's libturbojpeg: where it is missing, the next decoder must take over.
    if decoder != "pyturbojpeg":
        monkeypatch.setattr(inference, "_TURBOJPEG", False)
    if decoder == "pillow":
        monkeypatch.setattr(inference, "_TORCHCODEC_JPEG", False)
    if decoder == "pyturbojpeg" and inference._turbojpeg() is None:
        decoder = "torchcodec"
    assert inference.jpeg_decoder_name("cpu") == decoder, "the Makefile installs the decode extra"
    data = [_jpeg(32, 64, 5), _jpeg(20, 50, 6, mode="L"), _jpeg(128, 64, 7)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # torchvision.io's decoders warn
        decoded = decode_jpegs(data, "cpu")
    diffs = []
    for raw, img in zip(data, decoded, strict=True):
        pil = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        assert img.dtype == torch.uint8 and img.shape == (3, *pil.shape[:2])
        diffs.append(np.abs(img.permute(1, 2, 0).numpy().astype(int) - pil))
    assert max(int(d.max()) for d in diffs) <= 1
    assert float(np.mean([d.mean() for d in diffs])) <= 0.05
    with pytest.raises(RuntimeError):
        decode_jpegs([data[0][: len(data[0]) // 3]], "cpu")  # truncated: one error type for callers


def test_load_model_options_on_cpu(tmp_path: Path) -> None:
    model_dir = _exported(tmp_path, "bilinear", make=_tiny_vit)
    plain = load_model(model_dir, "cpu")
    assert plain.dtype == torch.float32 and plain.engine.graphs is None
    with pytest.raises(ValueError, match="cuda_graphs"):
        load_model(model_dir, "cpu", cuda_graphs=True)
    half = load_model(model_dir, "cpu", half_precision=True)
    assert half.dtype in (torch.float16, torch.bfloat16)
    assert half.engine.describe()["precision"]["dtype"] == str(half.dtype).removeprefix("torch.")
    x = _images(4, seed=3)
    assert float(embedding_cosines(half.embed(x), plain.embed(x)).min()) >= 0.999
    assert plain.embed(x[:0]).shape == (0, plain.dim)


# ------------------------------------------------------------------- the ingestion device stage


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _prepare_all(paths: list[Path], jpeg_decoder: str | None, model) -> list:
    from service.imaging.preparation import prepare_file

    return [
        prepare_file(
            str(p),
            p,
            max_pixels=10**6,
            preprocessors={7: model.preprocess},
            is_known=lambda _digest: False,
            jpeg_decoder=jpeg_decoder,
        )
        for p in paths
    ]


@pytest.mark.parametrize("jpeg_decoder", ["gpu", "cpu"])
def test_device_stage_gives_the_embeddings_of_the_pillow_road(tmp_path: Path, jpeg_decoder: str) -> None:
    from service.imaging.preparation import DeviceBatchStage

    model = load_model(_exported(tmp_path, "bicubic"), "cpu")
    png = io.BytesIO()
    Image.new("RGB", (30, 70), (40, 90, 200)).save(png, "PNG")
    progressive = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(32, 64, 9))).save(progressive, "JPEG", progressive=True)
    truncated = _jpeg(32, 64, 10)[:-300]
    paths = [
        _write(tmp_path / "a.jpg", _jpeg(32, 64, 11)),
        _write(tmp_path / "b.png", png.getvalue()),
        _write(tmp_path / "c.jpg", progressive.getvalue()),
        _write(tmp_path / "d.jpg", truncated),
        _write(tmp_path / "e.jpg", _jpeg(48, 100, 12, mode="L")),
    ]
    prepared = _prepare_all(paths, jpeg_decoder, model)
    a, b, c, d, e = prepared
    if jpeg_decoder == "gpu":
        assert a.encoded is not None and e.encoded is not None  # left for nvJPEG
        assert c.pixels is not None  # progressive: libjpeg-turbo in the pool
    else:
        assert a.pixels is not None and c.pixels is not None and e.pixels is not None
    assert b.encoded is None and b.pixels is None and 7 in b.tensors  # PNG: the Pillow road
    assert d.error is not None and "truncated" in d.error  # Pillow judges truncated JPEGs
    assert (a.width, a.height, a.image_format) == (32, 64, "JPEG")

    stage = DeviceBatchStage(
        {7: model.preprocess_tensors},
        {7: model.preprocess},
        device=torch.device("cpu"),
        jpeg_decoder=jpeg_decoder,
        max_pixels=10**6,
    )
    finished = stage(prepared)
    good = [p for p in finished if p.error is None]
    assert [Path(p.source).name for p in good] == ["a.jpg", "b.png", "c.jpg", "e.jpg"]
    assert all(p.encoded is None and p.pixels is None and 7 in p.tensors for p in good)
    got = model.embed(torch.stack([p.tensors[7] for p in good]))
    expected = model.embed(torch.stack([model.preprocess(Image.open(p)) for p in paths if p.name != "d.jpg"]))
    assert float(embedding_cosines(got, expected).min()) >= 0.999


def test_device_stage_falls_back_to_pillow_when_the_batch_decoder_fails(tmp_path: Path, monkeypatch) -> None:
    import training.inference
    from service.imaging.preparation import DeviceBatchStage

    model = load_model(_exported(tmp_path, "bilinear"), "cpu")
    paths = [_write(tmp_path / f"{i}.jpg", _jpeg(32, 64, 20 + i)) for i in range(3)]
    prepared = _prepare_all(paths, "gpu", model)

    def broken(datas, device="cpu"):
        raise RuntimeError("nvJPEG: unsupported sampling")

    monkeypatch.setattr(training.inference, "decode_jpegs", broken)
    stage = DeviceBatchStage(
        {7: model.preprocess_tensors},
        {7: model.preprocess},
        device=torch.device("cpu"),
        jpeg_decoder="gpu",
        max_pixels=10**6,
    )
    finished = stage(prepared)
    assert stage.gpu_decode_failures == 1
    for p, path in zip(finished, paths, strict=True):
        assert p.error is None and 7 in p.tensors
        torch.testing.assert_close(p.tensors[7], model.preprocess(Image.open(path)))


def test_prefetched_batches_run_the_stage_in_order() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from service.imaging.preparation import Prepared, prefetched_batches

    seen: list[list[int]] = []

    def finish(batch: list[Prepared[int]]) -> list[Prepared[int]]:
        seen.append([p.source for p in batch])
        for p in batch:
            p.content_hash = f"done-{p.source}"
        return batch

    with ThreadPoolExecutor(3) as pool:
        batches = prefetched_batches(
            pool, list(range(10)), lambda x: Prepared(x), batch_size=4, prefetch=2, finish=finish
        )
        out = list(batches)
    assert [[p.source for p in b] for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(p.content_hash == f"done-{p.source}" for b in out for p in b)


# ------------------------------------------------------------------------ the JPEG frame header


@pytest.mark.parametrize(
    ("mode", "options", "expected_mode", "progressive"),
    [
        ("RGB", {}, "RGB", False),
        ("RGB", {"progressive": True}, "RGB", True),
        ("L", {}, "L", False),
        ("RGB", {"exif": b"Exif\x00\x00" + bytes(300)}, "RGB", False),
    ],
)
def test_jpeg_frame_reads_what_pillow_reads(
    mode: str, options: dict, expected_mode: str, progressive: bool
) -> None:
    from service.imaging.decoding import jpeg_frame, probe_image

    buf = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(37, 91, 3))).convert(mode).save(buf, "JPEG", **options)
    data = buf.getvalue()
    assert jpeg_frame(data) == (37, 91, expected_mode, progressive)
    info = probe_image(data, max_pixels=37 * 91)
    assert (info.width, info.height, info.mode, info.progressive) == (37, 91, expected_mode, progressive)
    from service.imaging.decoding import ImageTooLargeError

    with pytest.raises(ImageTooLargeError, match="37x91"):
        probe_image(data, max_pixels=37 * 91 - 1)


def test_jpeg_frame_leaves_cmyk_to_pillow() -> None:
    from service.imaging.decoding import jpeg_frame, probe_image

    buf = io.BytesIO()
    Image.new("CMYK", (20, 30)).save(buf, "JPEG")
    assert jpeg_frame(buf.getvalue()) is None
    assert probe_image(buf.getvalue(), max_pixels=10**6).mode == "CMYK"


@given(
    cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4)
)
@settings(max_examples=150, deadline=None)
def test_jpeg_frame_never_raises_on_damaged_bytes(cut: int, flips: list[tuple[int, int]]) -> None:
    from service.imaging.decoding import jpeg_frame

    data = bytearray(_jpeg(32, 64, 4))[: max(4, cut)]
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    frame = jpeg_frame(bytes(data))
    if frame is not None:  # whatever it reads must be a plausible frame of these bytes
        width, height, mode, progressive = frame
        assert 0 < width < 65536 and 0 < height < 65536 and mode in ("RGB", "L")
        assert isinstance(progressive, bool)
