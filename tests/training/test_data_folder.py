"""The generic ``folder`` layout and its CSV manifest."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from training.data.errors import DatasetError, DatasetLayoutError
from training.data.folder import index_cameras, index_identities, parse_timestamp
from training.data.registry import build_dataset
from training.data.synthetic import read_marker, write_synthetic


@pytest.fixture(scope="module")
def folder_twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("folder") / "data"
    return write_synthetic(out, layout="folder", ids=6, images_per_id=5, seed=1, progress=False)


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (120, 30, 30)).save(path)


def _key(samples: list) -> list[tuple[str, int, int]]:
    return [(s.path, s.pid, s.camid) for s in samples]


def test_folders_and_manifest_give_the_same_dataset(folder_twin: Path) -> None:
    by_folders = build_dataset("folder", folder_twin)
    by_manifest = build_dataset("folder", folder_twin, manifest="manifest.csv")
    expected = read_marker(folder_twin)["expected"]  # type: ignore[index]
    for split in ("train", "query", "gallery"):
        assert _key(by_folders.split(split)) == _key(by_manifest.split(split))
        assert len(by_folders.split(split)) == expected[split]["images"]
        assert len({s.pid for s in by_folders.split(split)}) == expected[split]["ids"]
    assert all(s.attrs["captured_at"] is None for s in by_folders.train)
    times = [s.attrs["captured_at"] for s in by_manifest.train]
    assert all(isinstance(t, float) and t >= 1_704_067_200 for t in times)
    first = by_folders.train[0]
    assert first.attrs["camera"] == Path(first.path).name.split("_")[0]
    assert first.camid == int(first.attrs["camera"][1:]) - 1  # c1..c4 -> 0..3
    assert first.pid == int(first.attrs["identity"])


def test_names_and_cameras_are_numbered_consistently_across_splits(tmp_path: Path) -> None:
    for relpath in (
        "train/alice/cam10_001.jpg",
        "train/alice/cam2_002.png",
        "train/bob/lobby_003.webp",
        "query/bob/cam2_004.jpg",
        "gallery/alice/cam10_005.jpg",
        "gallery/carol/cam2_006.jpg",
    ):
        _image(tmp_path / relpath)
    dataset = build_dataset("folder", tmp_path, kind="vehicle")
    assert dataset.kind == "vehicle"
    every = dataset.train + dataset.query + dataset.gallery
    pids = {s.attrs["identity"]: s.pid for s in every}
    cams = {s.attrs["camera"]: s.camid for s in every}
    assert pids == {"alice": 0, "bob": 1, "carol": 2}
    assert cams == {"cam2": 0, "cam10": 1, "lobby": 2}  # numeric order, then names


def test_folder_layout_reports_misplaced_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _image(tmp_path / "train/0001/c1_0001.jpg")
    _image(tmp_path / "train/loose.jpg")  # no identity folder
    _image(tmp_path / "train/0001/nocamera.jpg")  # no "<camera>_" prefix
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = build_dataset("folder", tmp_path)
    assert len(dataset.train) == 1 and dataset.skipped["unparseable"] == 2
    assert "<split>/<identity>/<camera>_<anything>.jpg" in caplog.text
    with pytest.raises(DatasetLayoutError, match="strict"):
        build_dataset("folder", tmp_path, strict=True)


def test_folder_layout_with_split_folders_but_no_images(tmp_path: Path) -> None:
    (tmp_path / "gallery" / "0001").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="has gallery/ but no images"):
        build_dataset("folder", tmp_path)


def _manifest(root: Path, text: str) -> None:
    (root / "m.csv").write_text(text)


def test_manifest_values(tmp_path: Path) -> None:
    _image(tmp_path / "img" / "a.jpg")
    _image(tmp_path / "img" / "b.jpg")
    _image(tmp_path / "img" / "c.jpg")
    _manifest(
        tmp_path,
        "path,identity,camera,timestamp,split\n"
        "img/a.jpg,7,c3,2024-05-01T12:00:00,gallery\n"
        "img/b.jpg,7,c1,1714564800.5,\n"
        f"{tmp_path / 'img' / 'c.jpg'},9,c1,2024-05-01T14:00:00+02:00,query\n",
    )
    dataset = build_dataset("folder", tmp_path, manifest="m.csv", default_split="gallery")
    assert len(dataset.gallery) == 2 and len(dataset.query) == 1 and not dataset.train
    a, b = dataset.gallery
    assert (a.pid, a.camid, b.pid, b.camid) == (7, 1, 7, 0)
    assert a.attrs["captured_at"] == dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC).timestamp()
    assert b.attrs["captured_at"] == 1714564800.5
    assert dataset.query[0].attrs["captured_at"] == dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC).timestamp()
    # Without a split column, rows go to the default split (train unless told otherwise).
    _manifest(tmp_path, "path,identity,camera\nimg/a.jpg,1,0\n")
    assert len(build_dataset("folder", tmp_path, manifest="m.csv").train) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,person,camera\nimg/a.jpg,1,c1\n", "no column(s) identity"),
        ("path,identity,camera,split\nimg/a.jpg,1,c1,validation\n", "line 2: split 'validation'"),
        ("path,identity,camera,timestamp\nimg/a.jpg,1,c1,yesterday\n", "line 2: timestamp 'yesterday'"),
        ("path,identity,camera\nimg/a.jpg,,c1\n", "line 2: path, identity and camera must all be given"),
        ("path,identity,camera\nimg/missing.jpg,1,c1\n", "lists no existing image"),
    ],
)
def test_manifest_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    _image(tmp_path / "img" / "a.jpg")
    _manifest(tmp_path, text)
    with pytest.raises(DatasetLayoutError) as info:
        build_dataset("folder", tmp_path, manifest="m.csv")
    assert message in str(info.value)


def test_manifest_missing_file_and_options(tmp_path: Path, folder_twin: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"manifest .* does not exist"):
        build_dataset("folder", tmp_path, manifest="absent.csv")
    with pytest.raises(DatasetError, match="person, vehicle"):
        build_dataset("folder", tmp_path, kind="bicycle")
    with pytest.raises(DatasetError, match="default_split"):
        build_dataset("folder", tmp_path, default_split="test")
    copy = tmp_path / "copy"
    shutil.copytree(folder_twin, copy)
    removed = sorted((copy / "train").rglob("*.jpg"))[0]
    removed.unlink()
    dataset = build_dataset("folder", copy, manifest="manifest.csv")
    assert dataset.skipped["missing"] == 1


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, 500), min_size=1, max_size=20), st.sampled_from(["", "c", "cam", "cam_"]))
def test_numbered_cameras_keep_their_order(numbers: set[int], prefix: str) -> None:
    tokens = {f"{prefix}{n}" for n in numbers}
    index = index_cameras(tokens)
    assert sorted(index.values()) == list(range(len(tokens)))
    ordered = sorted(numbers)
    assert [index[f"{prefix}{n}"] for n in ordered] == list(range(len(ordered)))


@settings(max_examples=50, deadline=None)
@given(st.sets(st.text(alphabet="abcxyz0123456789", min_size=1, max_size=6), min_size=1, max_size=15))
def test_identity_numbering_is_a_bijection(names: set[str]) -> None:
    index = index_identities(names)
    assert len(set(index.values())) == len(names)
    if all(name.isdigit() for name in names) and len({int(name) for name in names}) == len(names):
        assert all(index[name] == int(name) for name in names)


def test_parse_timestamp() -> None:
    assert parse_timestamp("") is None
    assert parse_timestamp("12.5") == 12.5
    assert parse_timestamp("1970-01-01T00:01:00Z") == 60.0
    with pytest.raises(ValueError):
        parse_timestamp("nan")
