"""Dataset parsers: each reads its synthetic twin unchanged and refuses a wrong layout clearly."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data import registry
from training.data.cuhk03 import format_cuhk03_name, parse_cuhk03_name
from training.data.dataset import DatasetParser, ReIDDataset, Sample, check_published_sizes
from training.data.dukemtmc import format_duke_name, parse_duke_name
from training.data.errors import DatasetError, DatasetLayoutError, UnknownDatasetError
from training.data.market1501 import format_market_name, parse_market_name
from training.data.msmt17 import format_msmt17_name, parse_msmt17_name
from training.data.registry import available_datasets, build_dataset, dataset_kind, register_dataset
from training.data.synthetic import read_marker, write_synthetic
from training.data.veri776 import format_veri_name, parse_veri_name

LAYOUTS = ("market1501", "dukemtmc", "cuhk03", "msmt17", "veri776", "vehicleid")
#: Folder the real release unpacks into, per layout (the parsers accept the root above it).
WRAPPERS = {
    "market1501": "Market-1501-v15.09.15",
    "dukemtmc": "DukeMTMC-reID",
    "cuhk03": "cuhk03-np",
    "msmt17": "MSMT17_V1",
    "veri776": "VeRi",
    "vehicleid": "VehicleID_V1.0",
}


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small synthetic dataset per layout (8 identities, 6 images each)."""
    base = tmp_path_factory.mktemp("twins")
    return {
        layout: write_synthetic(base / layout, layout=layout, ids=8, images_per_id=6, seed=3, progress=False)
        for layout in LAYOUTS
    }


def _stats(samples: list[Sample]) -> dict[str, int]:
    return {
        "ids": len({s.pid for s in samples}),
        "images": len(samples),
        "cameras": len({s.camid for s in samples}),
    }


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parser_reads_its_synthetic_twin(
    twins: dict[str, Path], layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = twins[layout]
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = build_dataset(layout, root)
    assert not caplog.records, "a clean synthetic twin must parse without warnings"
    marker = read_marker(root)
    assert marker is not None
    expected = marker["expected"]
    assert dataset.name == layout
    assert dataset.kind == marker["kind"] == dataset_kind(layout)
    assert _stats(dataset.train) == expected["train"]
    if layout == "vehicleid":
        assert dataset.query == []
        assert _stats(dataset.gallery)["images"] == expected["test_lists"]["800"]["images"]
        assert _stats(dataset.gallery)["ids"] == expected["test_lists"]["800"]["ids"]
    else:
        assert _stats(dataset.query) == expected["query"]
        assert _stats(dataset.gallery) == expected["gallery"]
    every = dataset.train + dataset.query + dataset.gallery
    assert all(Path(s.path).is_file() for s in every)
    assert all(s.pid >= 0 for s in every)
    assert {s.camid for s in every} <= set(range(marker["cameras"]))  # 0-based
    # Train and test identities are disjoint (MSMT17 numbers both from 0, so compare paths there).
    if layout != "msmt17":
        assert not {s.pid for s in dataset.train} & {
            s.pid for s in dataset.query + dataset.gallery if s.pid > 0
        }


def test_market_rules_junk_dropped_distractors_kept(twins: dict[str, Path]) -> None:
    root = twins["market1501"]
    dataset = build_dataset("market1501", root)
    expected = read_marker(root)["expected"]  # type: ignore[index]
    on_disk = sorted(p.name for p in (root / "bounding_box_test").iterdir())
    junk_files = [n for n in on_disk if n.startswith("-1_")]
    assert len(junk_files) == expected["junk"] > 0
    assert dataset.skipped["junk"] == len(junk_files)
    assert len(dataset.gallery) == len(on_disk) - len(junk_files)
    distractors = [s for s in dataset.gallery if s.pid == 0]
    assert len(distractors) == expected["distractors"] > 0
    assert all(s.pid != 0 for s in dataset.query + dataset.train)
    # Cameras are 0-based: the name's c<N> is camera N-1; sequence/frame/box go to attrs.
    for sample in dataset.gallery + dataset.query:
        name = Path(sample.path).name
        assert name.split("_")[1].startswith(f"c{sample.camid + 1}s")
        assert name.split("_")[2] == f"{sample.attrs['frame']:06d}"
        assert {"sequence", "frame", "bbox"} <= set(sample.attrs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parser_accepts_release_wrapper_folder(twins: dict[str, Path], tmp_path: Path, layout: str) -> None:
    (tmp_path / WRAPPERS[layout]).symlink_to(twins[layout], target_is_directory=True)
    wrapped = build_dataset(layout, tmp_path)
    direct = build_dataset(layout, twins[layout])
    assert wrapped.root.name == WRAPPERS[layout] or wrapped.root.parent.name == WRAPPERS[layout]
    assert [(Path(s.path).name, s.pid, s.camid) for s in wrapped.gallery] == [
        (Path(s.path).name, s.pid, s.camid) for s in direct.gallery
    ]


def _touch(root: Path, *relpaths: str) -> None:
    for relpath in relpaths:
        path = root / relpath
        if relpath.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")


@pytest.mark.parametrize(
    ("layout", "present", "missing"),
    [
        (
            "market1501",
            ["bounding_box_train/", "bounding_box_test/"],
            "'query/' folder: expected ROOT/query/*.jpg",
        ),
        (
            "dukemtmc",
            ["query/", "bounding_box_test/"],
            "'bounding_box_train/' folder: expected ROOT/bounding_box_train/",
        ),
        ("cuhk03", ["detected/bounding_box_train/", "detected/query/"], "'bounding_box_test/' folder"),
        ("msmt17", ["list_train.txt", "list_val.txt", "list_gallery.txt"], "'list_query.txt' file"),
        ("veri776", ["image_train/", "image_query/"], "'image_test/' folder: expected ROOT/image_test/*.jpg"),
        (
            "vehicleid",
            ["image/", "train_test_split/train_list.txt"],
            "'train_test_split/test_list_800.txt' file",
        ),
        ("folder", ["readme.txt"], "no 'train/', 'query/' or 'gallery/' folder"),
    ],
)
def test_parser_names_what_is_missing(tmp_path: Path, layout: str, present: list[str], missing: str) -> None:
    _touch(tmp_path, *present)
    with pytest.raises(DatasetLayoutError) as info:
        build_dataset(layout, tmp_path)
    assert missing in str(info.value)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("layout", [*LAYOUTS, "folder"])
def test_parser_refuses_a_missing_root(tmp_path: Path, layout: str) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        build_dataset(layout, tmp_path / "nowhere")


def test_parser_refuses_another_datasets_layout(twins: dict[str, Path]) -> None:
    with pytest.raises(DatasetLayoutError) as info:
        build_dataset("veri776", twins["market1501"])
    message = str(info.value)
    assert "'image_train/' folder" in message and "'image_query/' folder" in message
    assert "VeRi-776" in message


def _copy_tree(source: Path, target: Path, limit: int = 6) -> Path:
    """A small Market-style copy (a few images per folder) that a test may modify."""
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (target / folder).mkdir(parents=True)
        for path in sorted((source / folder).iterdir())[:limit]:
            shutil.copy(path, target / folder / path.name)
    return target


def test_unparseable_names_are_counted_and_reported(
    twins: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy_tree(twins["market1501"], tmp_path / "m")
    clean = build_dataset("market1501", root)
    shutil.copy(clean.query[0].path, root / "query" / "holiday_photo.jpg")
    shutil.copy(clean.query[0].path, root / "query" / "0001_c0s1_000100_00.jpg")  # camera 0 does not exist
    (root / "query" / "Thumbs.db").write_bytes(b"\0")  # not an image: ignored silently
    with caplog.at_level(logging.WARNING, logger="training.data"):
        dataset = build_dataset("market1501", root)
    assert len(dataset.query) == len(clean.query)
    assert dataset.skipped["unparseable"] == 2
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "2 file name(s) in query/" in message
    assert "do not follow PPPP_cCsS_FFFFFF_NN.jpg (e.g. '0001_c0s1_000100_00.jpg')" in message
    with pytest.raises(DatasetLayoutError, match=r"2 file name\(s\) in query/"):
        build_dataset("market1501", root, strict=True)


def test_listed_but_missing_images_are_reported(twins: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "v"
    shutil.copytree(twins["vehicleid"], root)
    listed = (root / "train_test_split/train_list.txt").read_text().split()
    (root / "image" / f"{listed[0]}.jpg").unlink()
    dataset = build_dataset("vehicleid", root)
    assert dataset.skipped["missing"] == 1
    assert len(dataset.train) == len(listed) // 2 - 1
    with pytest.raises(DatasetLayoutError, match=r"1 image\(s\) listed in train_list.txt do not exist"):
        build_dataset("vehicleid", root, strict=True)


def test_list_file_with_a_malformed_line_names_file_and_line(twins: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "ms"
    shutil.copytree(twins["msmt17"], root)
    with (root / "list_query.txt").open("a") as f:
        f.write("one two three\n")
    with pytest.raises(DatasetLayoutError, match=r"line \d+ of .*list_query.txt"):
        build_dataset("msmt17", root)


def test_vehicleid_test_sizes_and_attributes(twins: dict[str, Path]) -> None:
    root = twins["vehicleid"]
    expected = read_marker(root)["expected"]["test_lists"]  # type: ignore[index]
    galleries = {size: build_dataset("vehicleid", root, test_size=size).gallery for size in (800, 1600, 2400)}
    for size, gallery in galleries.items():
        assert len(gallery) == expected[str(size)]["images"]
        assert len({s.pid for s in gallery}) == expected[str(size)]["ids"]
        assert {s.camid for s in gallery} == {0}
    # The small test set is part of the medium one, which is part of the large one.
    assert (
        {s.path for s in galleries[800]}
        < {s.path for s in galleries[1600]}
        < {s.path for s in galleries[2400]}
    )
    colours = dict(line.split() for line in (root / "attribute/color_attr.txt").read_text().splitlines())
    models = dict(line.split() for line in (root / "attribute/model_attr.txt").read_text().splitlines())
    dataset = build_dataset("vehicleid", root)
    for sample in dataset.train + dataset.gallery:
        assert sample.attrs == {
            "colour": int(colours[str(sample.pid)]),
            "model": int(models[str(sample.pid)]),
        }
    with pytest.raises(DatasetError, match="800, 1600, 2400"):
        build_dataset("vehicleid", root, test_size=1000)


def test_vehicleid_without_attribute_files(twins: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "v"
    shutil.copytree(twins["vehicleid"], root)
    shutil.rmtree(root / "attribute")
    dataset = build_dataset("vehicleid", root)
    assert all(s.attrs == {} for s in dataset.train + dataset.gallery)


def test_veri776_reads_gb2312_labels(twins: dict[str, Path]) -> None:
    root = twins["veri776"]
    assert (root / "train_label.xml").read_text().startswith('<?xml version="1.0" encoding="gb2312"?>')
    dataset = build_dataset("veri776", root)
    sample = dataset.train[0]
    name = Path(sample.path).name
    line = next(x for x in (root / "train_label.xml").read_text().splitlines() if name in x)
    assert f'colorID="{sample.attrs["colour"]}"' in line
    assert f'typeID="{sample.attrs["type"]}"' in line
    assert all({"colour", "type", "frame"} <= set(s.attrs) for s in dataset.query + dataset.gallery)


def test_msmt17_val_list_and_versions(twins: dict[str, Path]) -> None:
    root = twins["msmt17"]
    lines = {name: (root / name).read_text().split("\n")[:-1] for name in ("list_train.txt", "list_val.txt")}
    with_val = build_dataset("msmt17", root)
    without_val = build_dataset("msmt17", root, include_val=False)
    assert len(without_val.train) == len(lines["list_train.txt"])
    assert len(with_val.train) == len(lines["list_train.txt"]) + len(lines["list_val.txt"])
    for sample in with_val.query:
        assert Path(sample.path).name.split("_")[2] == f"{sample.camid + 1:02d}"
        assert sample.attrs["time_of_day"] in {"morning", "noon", "afternoon"}


def test_cuhk03_variants(twins: dict[str, Path]) -> None:
    root = twins["cuhk03"]
    detected = build_dataset("cuhk03", root)
    labeled = build_dataset("cuhk03", root, variant="labeled")
    assert detected.root.name == "detected" and labeled.root.name == "labeled"
    assert len(detected.gallery) == len(labeled.gallery)
    assert {s.camid for s in detected.gallery} == {0, 1}
    assert build_dataset("cuhk03", root / "labeled", variant="labeled").root == labeled.root
    with pytest.raises(DatasetError, match="detected, labeled"):
        build_dataset("cuhk03", root, variant="both")


def test_registry_names_kinds_and_errors() -> None:
    names = available_datasets()
    assert names == sorted(names)
    assert set(names) >= {"market1501", "dukemtmc", "cuhk03", "msmt17", "veri776", "vehicleid", "folder"}
    assert dataset_kind("vehicleid") == dataset_kind("VeRi-776") == "vehicle"
    assert dataset_kind("Market-1501") == dataset_kind("duke") == "person"
    with pytest.raises(UnknownDatasetError) as info:
        build_dataset("market1502", "/data")
    assert "market1501" in str(info.value) and "vehicleid" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(DatasetError, match=r"does not take option.*test_size.*accepts strict"):
        build_dataset("market1501", "/data", test_size=800)


def test_register_dataset_checks_kind_and_duplicates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    with pytest.raises(DatasetError, match="person, vehicle"):
        register_dataset("bikes", kind="bicycle")

    @register_dataset("empty-test-set", kind="vehicle")
    class Empty(DatasetParser):
        def load(self) -> ReIDDataset:
            return ReIDDataset(self.name, self.kind, self.root, [], [], [])

    assert build_dataset("emptytestset", tmp_path).kind == "vehicle"
    with pytest.raises(DatasetError, match="already registered"):

        @register_dataset("market1501", kind="person")
        class Impostor(DatasetParser):
            pass


def test_dataset_split_summary_and_counts(twins: dict[str, Path]) -> None:
    dataset = build_dataset("market1501", twins["market1501"])
    assert dataset.split("gallery") is dataset.gallery
    with pytest.raises(DatasetError, match="train, query, gallery"):
        dataset.split("validation")
    assert dataset.num_train_pids == len({s.pid for s in dataset.train})
    assert dataset.num_train_cams == len({s.camid for s in dataset.train})
    summary = dataset.summary()
    assert f"| {len(dataset.gallery):>9} |" in summary
    assert "junk" in summary and "market1501 (person)" in summary


@pytest.mark.parametrize(
    ("observed", "status"),
    [
        ({"train": 12936, "query": 3368, "gallery": 15913}, "match"),
        ({"train": 12936, "query": 3368, "gallery": 15000}, "differs"),  # a truncated download
        ({"train": 12936, "query": 3368, "gallery": 19732}, "differs"),  # junk not removed
        ({"train": 600, "query": 194, "gallery": 430}, "subset"),
    ],
)
def test_published_size_rule(observed: dict[str, int], status: str, caplog: pytest.LogCaptureFixture) -> None:
    published = {"train": 12936, "query": 3368, "gallery": 15913}
    with caplog.at_level(logging.WARNING):
        assert check_published_sizes("Market-1501", observed, published) == status
    warned = " ".join(r.getMessage() for r in caplog.records)
    if status == "differs":
        assert "gallery" in warned and "published 15,913" in warned
    else:
        assert not warned


_CAM = st.integers(0, 8)


@settings(max_examples=60, deadline=None)
@given(
    pid=st.integers(-1, 9999),
    cam=_CAM,
    seq=st.integers(1, 9),
    frame=st.integers(0, 999999),
    box=st.integers(0, 99),
)
def test_market_name_round_trip(pid: int, cam: int, seq: int, frame: int, box: int) -> None:
    assert parse_market_name(format_market_name(pid, cam, seq, frame, box)) == (
        pid,
        cam,
        {"sequence": seq, "frame": frame, "bbox": box},
    )


@settings(max_examples=60, deadline=None)
@given(pid=st.integers(0, 9999), cam=_CAM, frame=st.integers(0, 9999999), index=st.integers(1, 99))
def test_other_name_grammars_round_trip(pid: int, cam: int, frame: int, index: int) -> None:
    assert parse_duke_name(format_duke_name(pid, cam, frame)) == (pid, cam, {"frame": frame})
    assert parse_cuhk03_name(format_cuhk03_name(pid, cam, index)) == (pid, cam, {"index": index})
    assert parse_veri_name(format_veri_name(pid, cam, frame)) == (pid, cam, {"frame": frame, "index": 0})
    relpath = format_msmt17_name(pid, index, cam, "0303", "noon", frame % 10000)
    assert relpath.startswith(f"{pid:04d}/")
    parsed: Any = parse_msmt17_name(relpath)
    assert parsed == (cam, {"day": "0303", "time_of_day": "noon", "frame": frame % 10000})


@pytest.mark.parametrize(
    "name", ["0001_c1s1_00105_00.png", "abc_c1s1_001051_00.jpg", "0001c1s1_001051_00.jpg", ""]
)
def test_market_grammar_rejects_malformed_names(name: str) -> None:
    assert parse_market_name(name) is None
