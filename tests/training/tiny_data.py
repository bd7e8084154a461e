"""Tiny in-test re-identification datasets: learnable colour-coded identities, written as JPEG files.

Each identity is a person-like crop whose upper and lower halves have the identity's two colours;
cameras change brightness and add noise, so the task is learnable in a few CPU steps but not trivial.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.data.dataset import ReIDDataset, Sample


def _image(rng: np.random.Generator, colours: np.ndarray, camid: int, size: tuple[int, int]) -> Image.Image:
    h, w = size
    img = np.empty((h, w, 3), dtype=np.float32)
    split = h // 2 + int(rng.integers(-h // 8, h // 8 + 1))
    img[:split] = colours[0]
    img[split:] = colours[1]
    img *= 0.75 + 0.1 * camid
    img += rng.normal(0, 25, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_dataset(
    root: Path,
    *,
    train_ids: int = 8,
    test_ids: int = 6,
    per_id: int = 6,
    cams: int = 2,
    size: tuple[int, int] = (64, 32),
    seed: int = 0,
    kind: str = "person",
    query_split: bool = True,
) -> ReIDDataset:
    """Writes images under ``root`` and returns the dataset (query/gallery by camera, Market-style).

    With ``query_split=False`` the test identities all go to the gallery (VehicleID-style).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    palette = rng.integers(0, 256, (train_ids + test_ids, 2, 3)).astype(np.float32)
    train, query, gallery = [], [], []
    for pid in range(train_ids + test_ids):
        for n in range(per_id):
            camid = n % cams
            path = root / f"{pid:04d}_c{camid}_{n:02d}.jpg"
            _image(rng, palette[pid], camid, size).save(path, quality=95)
            sample = Sample(str(path), pid + 1, camid)
            if pid < train_ids:
                train.append(sample)
            elif query_split and n < cams:
                query.append(sample)
            else:
                gallery.append(sample)
    return ReIDDataset(name="tiny", kind=kind, root=root, train=train, query=query, gallery=gallery)


def write_market_layout(dataset: ReIDDataset, root: Path) -> Path:
    """Copies a dataset's images into the Market-1501 folder layout (for the real parser)."""
    splits = (
        ("bounding_box_train", dataset.train),
        ("query", dataset.query),
        ("bounding_box_test", dataset.gallery),
    )
    for folder, samples in splits:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, sample in enumerate(samples):
            name = f"{sample.pid:04d}_c{sample.camid + 1}s1_{i:06d}_00.jpg"
            Image.open(sample.path).save(root / folder / name)
    return root
