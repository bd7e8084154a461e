"""Snapshots: atomic under crashes, self-describing, verified on load, and replayable."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index import SearchFilter, SnapshotError, create_index, load_index, read_manifest
from index import snapshot as snap
from index.faiss_index import FaissIndex
from tests.index.test_index_contract import (
    clustered,
    faiss_single_thread,  # noqa: F401  (autouse fixture)
    make_attributes,
)

DIM = 16


def small_index(
    n: int = 300, spec: str = "flat", **options: Any
) -> tuple[FaissIndex, np.ndarray, np.ndarray]:
    index = create_index("faiss", spec=spec, dim=DIM, **options)
    x = clustered(n, DIM, seed=11)
    ids = np.arange(n, dtype=np.int64) * 2 + 1
    index.add(ids, x, attributes=make_attributes(n))
    return index, x, ids


def test_manifest_describes_the_snapshot(tmp_path: Path) -> None:
    index, _, ids = small_index()
    index.remove(ids[:10])
    manifest = index.save(tmp_path / "s", last_seq=1234)
    read = read_manifest(tmp_path / "s")
    assert read == manifest
    assert (read.spec, read.dim, read.count, read.last_seq, read.backend) == ("flat", DIM, 290, 1234, "faiss")
    assert read.format_version == snap.FORMAT_VERSION and read.generation == 1
    index_file = tmp_path / "s" / read.files["index"].file
    assert read.checksum == hashlib.sha256(index_file.read_bytes()).hexdigest()
    assert dt.datetime.fromisoformat(read.created_at).tzinfo is not None
    assert set(read.files) == {"index", "attributes"}
    assert read.options["nprobe"] == index.options.nprobe and read.options["trained"] is True


def test_each_save_is_a_new_generation_and_old_files_go(tmp_path: Path) -> None:
    index, x, ids = small_index()
    first = index.save(tmp_path, last_seq=1)
    index.add([100_001], x[:1])
    second = index.save(tmp_path, last_seq=2)
    assert second.generation == first.generation + 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([snap.MANIFEST_NAME, *(e.file for e in second.files.values())])
    assert len(load_index(tmp_path)) == len(ids) + 1


def test_crash_while_writing_data_keeps_the_old_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, x, ids = small_index()
    index.save(tmp_path, last_seq=5)
    expected = index.search(x[:5], 5)
    index.add([100_001, 100_003], x[:2])
    index.remove(ids[:50])

    real_write = snap.fsync_file

    def die_after_partial_write(path: Any) -> None:
        # The index file has been written; the process dies before it is made durable.
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(snap, "fsync_file", die_after_partial_write)
    with pytest.raises(KeyboardInterrupt):
        index.save(tmp_path, last_seq=9)
    monkeypatch.setattr(snap, "fsync_file", real_write)

    loaded = load_index(tmp_path)
    assert read_manifest(tmp_path).last_seq == 5
    assert len(loaded) == len(ids) and 100_001 not in loaded
    np.testing.assert_array_equal(loaded.search(x[:5], 5).ids, expected.ids)


def test_crash_before_the_manifest_commits_keeps_the_old_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, _, ids = small_index()
    index.save(tmp_path, last_seq=5)
    index.remove(ids[:100])
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == snap.MANIFEST_NAME:
            raise OSError("disk full")  # data files are in place, the manifest is not
        real_replace(src, dst)

    monkeypatch.setattr(snap.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path, last_seq=9)
    monkeypatch.setattr(snap.os, "replace", real_replace)
    # Files of the failed generation lie around; the old manifest ignores them.
    assert len(list(tmp_path.glob("index-*.faiss"))) == 2
    loaded = load_index(tmp_path)
    assert len(loaded) == len(ids) and read_manifest(tmp_path).last_seq == 5
    # The next save succeeds past the leftovers and cleans them up.
    (tmp_path / ".tmp-index-000099.faiss").write_bytes(b"left by a killed process")
    manifest = index.save(tmp_path, last_seq=10)
    assert manifest.generation == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [snap.MANIFEST_NAME, *(e.file for e in manifest.files.values())]
    )
    assert len(load_index(tmp_path)) == len(ids) - 100


@pytest.mark.parametrize(
    "damage",
    [
        "flip-byte",
        "truncate",
        "delete-attributes",
        "manifest-garbage",
        "manifest-missing-key",
        "manifest-future-version",
        "manifest-count",
        "no-manifest",
        "wrong-backend",
    ],
)
def test_damaged_snapshots_raise_snapshot_error(tmp_path: Path, damage: str) -> None:
    index, _, _ = small_index(100)
    manifest = index.save(tmp_path, last_seq=3)
    index_file = tmp_path / manifest.files["index"].file
    manifest_file = tmp_path / snap.MANIFEST_NAME
    data = json.loads(manifest_file.read_text())
    if damage == "flip-byte":
        raw = bytearray(index_file.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        index_file.write_bytes(bytes(raw))
    elif damage == "truncate":
        index_file.write_bytes(index_file.read_bytes()[:-7])
    elif damage == "delete-attributes":
        (tmp_path / manifest.files["attributes"].file).unlink()
    elif damage == "manifest-garbage":
        manifest_file.write_text("{not json")
    elif damage == "manifest-missing-key":
        del data["dim"]
        manifest_file.write_text(json.dumps(data))
    elif damage == "manifest-future-version":
        data["format_version"] = snap.FORMAT_VERSION + 1
        manifest_file.write_text(json.dumps(data))
    elif damage == "manifest-count":
        data["count"] += 1
        manifest_file.write_text(json.dumps(data))
    elif damage == "no-manifest":
        manifest_file.unlink()
    elif damage == "wrong-backend":
        data["backend"] = "milvus"
        manifest_file.write_text(json.dumps(data))
    with pytest.raises(SnapshotError) as info:
        (FaissIndex.load if damage == "wrong-backend" else load_index)(tmp_path)
    assert "snapshot" in str(info.value).lower()


def test_load_of_an_empty_folder_is_a_snapshot_error(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="missing"):
        load_index(tmp_path)


def _apply(index: FaissIndex, op: tuple[str, Any]) -> None:
    kind, payload = op
    if kind == "add":
        ids, vectors, attributes = payload
        index.add(ids, vectors, attributes=attributes)
    else:
        index.remove(payload)


@pytest.mark.parametrize("spec", ["flat", "ivf-flat"])
def test_snapshot_plus_replay_reproduces_the_live_index(tmp_path: Path, spec: str) -> None:
    """The service's recovery path: load the snapshot, replay the log after its last_seq."""
    options = {"train_min": 200, "nprobe": 4} if spec == "ivf-flat" else {}
    live = create_index("faiss", spec=spec, dim=DIM, **options)
    x = clustered(900, DIM, seed=4)
    attrs = make_attributes(900, seed=4)
    rng = np.random.default_rng(7)
    log: list[tuple[int, tuple[str, Any]]] = []
    next_id = 0
    present: list[int] = []
    for step in range(30):
        seq = step + 1
        if step % 3 == 2 and present:
            gone = rng.choice(present, size=min(len(present), 7), replace=False)
            op: tuple[str, Any] = ("remove", gone)
            present = [i for i in present if i not in set(gone.tolist())]
        else:
            n = 30
            rows = np.arange(next_id, next_id + n)
            sub = attrs.camera[rows], attrs.captured_at[rows], attrs.identity[rows]
            op = (
                "add",
                (rows + 1000, x[rows], {"camera": sub[0], "captured_at": sub[1], "identity": sub[2]}),
            )
            present.extend((rows + 1000).tolist())
            next_id += n
        _apply(live, op)
        log.append((seq, op))
        if step == 17:
            live.save(tmp_path, last_seq=seq)

    restored = FaissIndex.load(tmp_path)
    last = read_manifest(tmp_path).last_seq
    for op_seq, op in log:
        if op_seq > last:
            _apply(restored, op)

    assert len(restored) == len(live) == len(present)
    np.testing.assert_array_equal(restored.ids(), live.ids())
    q = clustered(40, DIM, seed=99)
    for flt in (
        None,
        SearchFilter(cameras={1, 2}),
        SearchFilter(time_from=1_700_050_000.0, exclude_identity=3),
    ):
        a, b = live.search(q, 10, filter=flt), restored.search(q, 10, filter=flt)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_write_snapshot_rejects_negative_seq(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        snap.write_snapshot(tmp_path, {}, spec="flat", dim=4, count=0, last_seq=-1, backend="faiss")
    index, _, _ = small_index(10)
    with pytest.raises(ValueError, match="last_seq"):
        index.save(tmp_path, last_seq=-3)
