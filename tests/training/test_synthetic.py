"""Synthetic datasets: deterministic, in the real layouts, confusable but learnable, and `reid synth`."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from training.data.errors import DatasetError, SynthOutputError
from training.data.registry import build_dataset
from training.data.synthetic import MARKER, read_marker, write_synthetic
from training.data.synthetic.identities import person_identity, vehicle_identity
from training.data.synthetic.persons import BOTTOMS, TOPS, draw_person
from training.data.synthetic.scene import VIEWS, rng_for
from training.data.synthetic.vehicles import draw_vehicle


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("layout", ["market1501", "vehicleid"])
def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path, layout: str) -> None:
    a = _digests(
        write_synthetic(tmp_path / "a", layout=layout, ids=6, images_per_id=4, seed=5, progress=False)
    )
    b = _digests(
        write_synthetic(tmp_path / "b", layout=layout, ids=6, images_per_id=4, seed=5, progress=False)
    )
    c = _digests(
        write_synthetic(tmp_path / "c", layout=layout, ids=6, images_per_id=4, seed=6, progress=False)
    )
    assert a == b
    images_a = {digest for name, digest in a.items() if name.endswith(".jpg")}
    images_c = {digest for name, digest in c.items() if name.endswith(".jpg")}
    assert len(images_a) >= 24
    # Another seed draws other people and other cameras: no image is the same.
    assert not images_a & images_c
    assert a[MARKER] != c[MARKER]


def test_image_sizes_and_formats(tmp_path: Path) -> None:
    persons = build_dataset(
        "market1501", write_synthetic(tmp_path / "p", layout="market1501", ids=4, progress=False)
    )
    vehicles = build_dataset(
        "veri776", write_synthetic(tmp_path / "v", layout="veri776", ids=4, progress=False)
    )
    cuhk = build_dataset("cuhk03", write_synthetic(tmp_path / "c", layout="cuhk03", ids=4, progress=False))
    with Image.open(persons.train[0].path) as image:
        assert (image.format, image.size, image.mode) == ("JPEG", (64, 128), "RGB")
    with Image.open(vehicles.gallery[0].path) as image:
        assert (image.format, image.size) == ("JPEG", (128, 128))
    with Image.open(cuhk.query[0].path) as image:
        assert (image.format, image.size) == ("PNG", (64, 128))


def test_refuses_a_non_empty_folder_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(SynthOutputError, match="not empty and was not written by `reid synth`"):
        write_synthetic(tmp_path, layout="market1501", ids=4, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holiday.jpg"]
    write_synthetic(tmp_path, layout="market1501", ids=4, progress=False, force=True)
    assert (tmp_path / "holiday.jpg").read_bytes() == b"precious"
    assert read_marker(tmp_path) is not None
    with pytest.raises(SynthOutputError, match="is not a folder"):
        write_synthetic(tmp_path / "holiday.jpg", layout="market1501", ids=4, progress=False)


def test_replaces_a_previous_output_but_only_its_own_files(tmp_path: Path) -> None:
    write_synthetic(tmp_path, layout="market1501", ids=4, progress=False)
    (tmp_path / "query" / "notes.txt").write_text("mine")
    write_synthetic(tmp_path, layout="vehicleid", ids=4, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["attribute", "image", "query", MARKER, "train_test_split"]
    assert [p.name for p in (tmp_path / "query").iterdir()] == ["notes.txt"]
    assert read_marker(tmp_path)["layout"] == "vehicleid"  # type: ignore[index]
    build_dataset("vehicleid", tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layout": "market1502"}, "unknown synthetic layout"),
        ({"layout": "veri776", "kind": "person"}, "layout veri776 holds vehicle images"),
        ({"layout": "market1501", "ids": 3}, "--ids must be at least 4"),
        ({"layout": "market1501", "images_per_id": 3}, "--images-per-id must be at least 4"),
        ({"layout": "market1501", "cameras": 10}, "market1501 takes 2 to 9 cameras"),
        ({"layout": "cuhk03", "cameras": 3}, "cuhk03 always has 2 cameras"),
        ({"layout": "folder", "seed": -1}, "--seed must be a non-negative integer"),
    ],
)
def test_invalid_requests(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        write_synthetic(tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_folder_layout_holds_either_kind(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path, layout="folder", kind="vehicle", ids=4, progress=False)
    dataset = build_dataset("folder", root, kind="vehicle")
    with Image.open(dataset.train[0].path) as image:
        assert image.size == (128, 128)


def _nearest(colour: tuple[int, int, int], palette: tuple) -> int:
    return int(np.argmin([sum((a - b) ** 2 for a, b in zip(colour, p, strict=True)) for p in palette]))


def test_identities_share_colours() -> None:
    """Many identities wear the same palette colours: the combination and the details tell them apart."""
    people = [person_identity(0, i) for i in range(100)]
    tops = Counter(_nearest(p.top, TOPS) for p in people)
    outfits = Counter((_nearest(p.top, TOPS), _nearest(p.bottom, BOTTOMS)) for p in people)
    assert tops.most_common(1)[0][1] >= 12
    assert len(outfits) <= 40
    cars = Counter((v.model, v.colour) for v in (vehicle_identity(0, i) for i in range(100)))
    assert cars.most_common(1)[0][1] >= 4


def _rank1(query: np.ndarray, gallery: np.ndarray, q_ids, g_ids, q_cams, g_cams) -> float:
    """Market-1501 rank-1 of nearest-neighbour matching (same identity and camera excluded)."""
    distance = ((query[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    junk = (q_ids[:, None] == g_ids[None, :]) & (q_cams[:, None] == g_cams[None, :])
    distance[junk] = np.inf
    return float(np.mean(g_ids[distance.argmin(1)] == q_ids))


def test_not_solvable_by_mean_colour_but_not_noise(tmp_path: Path) -> None:
    """Mean colour identifies almost nobody; downsampled pixels do better than chance, far from perfect."""
    dataset = build_dataset(
        "market1501", write_synthetic(tmp_path, layout="market1501", ids=60, images_per_id=8, progress=False)
    )
    gallery = [s for s in dataset.gallery if s.pid > 0]

    def features(samples, size):
        arrays = [
            np.asarray(Image.open(s.path).convert("RGB").resize(size), dtype=np.float64) for s in samples
        ]
        flat = np.stack([a.reshape(-1) for a in arrays])
        flat -= flat.mean(1, keepdims=True)
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    labels = [
        np.array([getattr(s, key) for s in part])
        for part in (dataset.query, gallery)
        for key in ("pid", "camid")
    ]
    q_ids, q_cams, g_ids, g_cams = labels
    mean_q = np.stack([np.asarray(Image.open(s.path), dtype=np.float64).mean((0, 1)) for s in dataset.query])
    mean_g = np.stack([np.asarray(Image.open(s.path), dtype=np.float64).mean((0, 1)) for s in gallery])
    chance = 1.0 / len(set(g_ids))
    mean_colour = _rank1(mean_q, mean_g, q_ids, g_ids, q_cams, g_cams)
    pixels = _rank1(
        features(dataset.query, (8, 16)), features(gallery, (8, 16)), q_ids, g_ids, q_cams, g_cams
    )
    assert mean_colour < 3 * chance
    assert 3 * chance < pixels < 0.5


@settings(max_examples=25, deadline=None)
@given(
    identity=st.integers(0, 10_000),
    view=st.sampled_from(VIEWS),
    scale=st.floats(0.6, 1.0),
    dx=st.floats(-6, 6),
    dy=st.floats(-6, 6),
)
def test_every_view_draws_a_visible_subject(
    identity: int, view: str, scale: float, dx: float, dy: float
) -> None:
    rng = rng_for(0, 99, identity)
    person = draw_person(person_identity(1, identity), view, (128, 64), scale, (dx, dy), rng)
    vehicle = draw_vehicle(vehicle_identity(1, identity), view, (128, 128), scale, (dx, dy), rng)
    for layer, (width, height) in ((person, (64, 128)), (vehicle, (128, 128))):
        assert layer.mode == "RGBA" and layer.size == (width, height)
        alpha = np.asarray(layer)[..., 3] > 0
        assert 0.08 < alpha.mean() < 0.8  # a subject, and background around it
        rows = np.nonzero(alpha.any(1))[0]
        assert rows.min() < height / 2 < rows.max()  # roughly centred


@pytest.fixture(scope="module")
def cli() -> CliRunner:
    from reid_cli import _load_commands, app

    if not any(command.name == "synth" for command in app.registered_commands):
        _load_commands()
    return CliRunner()


def test_reid_synth_command(cli: CliRunner, tmp_path: Path) -> None:
    from reid_cli import app

    out = tmp_path / "market"
    result = cli.invoke(app, ["synth", "--out", str(out), "--ids", "6", "--seed", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "market1501 (person)" in result.output and "train" in result.output
    dataset = build_dataset("market1501", out)
    assert dataset.num_train_pids == 3 and dataset.num_train_cams == 6
    marker = read_marker(out)
    assert marker is not None and (marker["seed"], marker["ids"], marker["images_per_id"]) == (2, 6, 12)

    vehicles = tmp_path / "vehicles"
    args = ["synth", "--out", str(vehicles), "--kind", "vehicle", "--ids", "4", "--images-per-id", "4"]
    result = cli.invoke(app, [*args, "--cameras", "5", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert build_dataset("veri776", vehicles).kind == "vehicle"
    assert read_marker(vehicles)["cameras"] == 5  # type: ignore[index]


def test_reid_synth_refuses_user_data(cli: CliRunner, tmp_path: Path) -> None:
    from reid_cli import app

    (tmp_path / "thesis.pdf").write_bytes(b"%PDF")
    result = cli.invoke(app, ["synth", "--out", str(tmp_path), "--ids", "4", "--no-progress"])
    assert result.exit_code == 1
    assert "error:" in result.output and "--force" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.pdf"]
    result = cli.invoke(
        app, ["synth", "--out", str(tmp_path / "x"), "--layout", "vehicleid", "--cameras", "4"]
    )
    assert result.exit_code == 1 and "VehicleID records no camera" in result.output
