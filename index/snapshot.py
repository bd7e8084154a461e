"""Atomic, self-describing index snapshots: versioned data files plus one manifest that commits them.

A snapshot is a folder. Each save writes its data files under new names (``index-000007.faiss``,
``attributes-000007.npz``): each goes to a temporary file in the same folder, is fsynced and renamed
into place. Only then is ``manifest.json`` replaced the same way, and the folder fsynced. The
manifest names the files of its generation with their SHA-256, so a crash at any point leaves the
previous manifest pointing at the previous, complete files; files of older generations are deleted
once the new manifest is durable. Loading verifies every checksum and raises
:class:`~index.base.SnapshotError` on any mismatch: the service then rebuilds the index from its
database and replays its operation log from ``last_seq``.

One writer per folder at a time (the index holds its lock while saving); concurrent saves from
two processes into one folder are not supported.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from index.base import SnapshotError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_TMP_MARK = ".tmp-"
_GEN_RE = re.compile(r"^(?P<name>[a-z_]+)-(?P<gen>\d{6,})(?P<suffix>\.[a-z0-9.]+)$")
_CHUNK = 4 << 20


@dataclass(frozen=True)
class SnapshotFile:
    """One data file of a snapshot: its name in the folder, size and SHA-256."""

    file: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """What a snapshot holds, enough to check it and to replay the operation log after it.

    Attributes:
        spec: index spec name (``flat``, ``ivf-pq``...).
        dim: vector dimension.
        count: number of items in the snapshot.
        checksum: SHA-256 of the main index file (empty for backends that persist server-side).
        last_seq: sequence number of the last operation applied before the snapshot was taken.
        backend: ``faiss`` or ``milvus``.
        created_at: ISO-8601 UTC time of the save.
        format_version: version of this snapshot layout.
        generation: increases by one with every save into the folder.
        files: logical name (``index``, ``attributes``) -> file entry.
        options: backend options needed to reopen the index (no secrets).
    """

    spec: str
    dim: int
    count: int
    checksum: str
    last_seq: int
    backend: str
    created_at: str
    format_version: int = FORMAT_VERSION
    generation: int = 0
    files: dict[str, SnapshotFile] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        try:
            files = {name: SnapshotFile(**entry) for name, entry in dict(data.get("files", {})).items()}
            return cls(
                spec=str(data["spec"]),
                dim=int(data["dim"]),
                count=int(data["count"]),
                checksum=str(data["checksum"]),
                last_seq=int(data["last_seq"]),
                backend=str(data["backend"]),
                created_at=str(data["created_at"]),
                format_version=int(data["format_version"]),
                generation=int(data.get("generation", 0)),
                files=files,
                options=dict(data.get("options", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot manifest is malformed ({exc!r}): rebuild the index") from exc


def utc_now() -> str:
    """Current UTC time as an ISO-8601 string (second precision)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in chunks (snapshots can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make renames inside a folder durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(path: str | Path) -> Manifest:
    """Read the manifest of the snapshot folder ``path`` (no checksum verification).

    Raises:
        SnapshotError: no snapshot there, unreadable/malformed manifest, or an unknown format.
    """
    manifest_path = Path(path) / MANIFEST_NAME
    try:
        data = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise SnapshotError(f"no snapshot at {path}: {MANIFEST_NAME} is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(
            f"snapshot manifest {manifest_path} is unreadable ({exc}): rebuild the index"
        ) from exc
    if not isinstance(data, dict):
        raise SnapshotError(f"snapshot manifest {manifest_path} is not a JSON object: rebuild the index")
    manifest = Manifest.from_dict(data)
    if manifest.format_version > FORMAT_VERSION:
        raise SnapshotError(
            f"snapshot at {path} has format version {manifest.format_version}, newer than this code "
            f"understands ({FORMAT_VERSION}): upgrade, or rebuild the index"
        )
    return manifest


def verify_snapshot(path: str | Path) -> Manifest:
    """Read the manifest and check that every data file exists with the recorded size and SHA-256.

    Raises:
        SnapshotError: missing, truncated or modified files.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    for name, entry in manifest.files.items():
        file_path = folder / entry.file
        try:
            size = file_path.stat().st_size
        except FileNotFoundError as exc:
            raise SnapshotError(f"snapshot file '{entry.file}' ({name}) is missing from {folder}") from exc
        if size != entry.bytes:
            raise SnapshotError(
                f"snapshot file '{entry.file}' has {size} bytes, the manifest says {entry.bytes}: "
                "the snapshot is corrupt, rebuild the index"
            )
        if sha256_file(file_path) != entry.sha256:
            raise SnapshotError(
                f"snapshot file '{entry.file}' does not match its SHA-256 in the manifest: "
                "the snapshot is corrupt, rebuild the index"
            )
    main = manifest.files.get("index")
    if main is not None and main.sha256 != manifest.checksum:
        raise SnapshotError(f"snapshot manifest at {folder} is inconsistent (checksum != index file hash)")
    return manifest


def file_path(path: str | Path, manifest: Manifest, name: str) -> Path:
    """Path of the data file ``name`` (``index``, ``attributes``) of a snapshot."""
    try:
        return Path(path) / manifest.files[name].file
    except KeyError as exc:
        raise SnapshotError(
            f"snapshot at {path} has no '{name}' file; it holds {sorted(manifest.files)}"
        ) from exc


Writer = Callable[[Path], None]


def write_snapshot(
    path: str | Path,
    files: Mapping[str, tuple[str, Writer]],
    *,
    spec: str,
    dim: int,
    count: int,
    last_seq: int,
    backend: str,
    options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Write a new snapshot generation into the folder ``path`` atomically and return its manifest.

    Args:
        path: snapshot folder (created if missing).
        files: logical name -> (suffix, writer); each writer writes one complete file at the path
            it is given. The file called ``index`` is the one whose hash is the manifest's checksum.
        spec, dim, count, last_seq, backend, options: recorded in the manifest.
    """
    if last_seq < 0:
        raise ValueError(f"last_seq must be >= 0, got {last_seq}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    generation = _next_generation(folder)
    entries: dict[str, SnapshotFile] = {}
    for name, (suffix, writer) in files.items():
        final = folder / f"{name}-{generation:06d}{suffix}"
        tmp = folder / f"{_TMP_MARK}{final.name}"
        try:
            writer(tmp)
            fsync_file(tmp)
            entries[name] = SnapshotFile(file=final.name, sha256=sha256_file(tmp), bytes=tmp.stat().st_size)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    manifest = Manifest(
        spec=spec,
        dim=int(dim),
        count=int(count),
        checksum=entries["index"].sha256 if "index" in entries else "",
        last_seq=int(last_seq),
        backend=backend,
        created_at=utc_now(),
        generation=generation,
        files=entries,
        options=dict(options or {}),
    )
    tmp_manifest = folder / f"{_TMP_MARK}{MANIFEST_NAME}"
    try:
        with open(tmp_manifest, "w") as fh:
            fh.write(manifest.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        # Data files must be durable under their final names before the manifest points at them.
        fsync_dir(folder)
        os.replace(tmp_manifest, folder / MANIFEST_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_manifest.unlink()
        raise
    fsync_dir(folder)
    _remove_stale(folder, keep={entry.file for entry in entries.values()})
    logger.info(
        "snapshot generation %d written to %s (%d items, last_seq=%d)", generation, folder, count, last_seq
    )
    return manifest


def _next_generation(folder: Path) -> int:
    # Past the current manifest's generation and past any file left by a crashed save, so a new
    # save never overwrites a file that a readable manifest still names.
    highest = 0
    with contextlib.suppress(SnapshotError):
        highest = read_manifest(folder).generation
    for entry in folder.iterdir():
        match = _GEN_RE.match(entry.name)
        if match:
            highest = max(highest, int(match["gen"]))
    return highest + 1


def _remove_stale(folder: Path, keep: set[str]) -> None:
    for entry in folder.iterdir():
        stale = entry.name.startswith(_TMP_MARK) or (_GEN_RE.match(entry.name) and entry.name not in keep)
        if stale and entry.is_file():
            try:
                entry.unlink()
            except OSError as exc:  # a leftover file is harmless; the manifest decides what is live
                logger.warning("could not remove stale snapshot file %s: %s", entry, exc)
