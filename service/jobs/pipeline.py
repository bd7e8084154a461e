"""Reading, hashing, decoding and preprocessing images in a thread pool, batches ahead of the model.

Jobs spend their time in the model only if the images are ready when it wants them: the pool
prepares the next ``prefetch`` batches while the current one is embedded.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch

from service.image_decoding import DecodedImage, ImageError, content_hash, decode_image

T = TypeVar("T")


@dataclass
class Prepared(Generic[T]):
    """One input after the pool's work: skipped (already stored), failed (error), or ready."""

    source: T
    content_hash: str | None = None
    decoded: DecodedImage | None = None
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    error: str | None = None
    skipped: bool = False


def prepare_file(
    source: T,
    path: str | Path,
    *,
    max_pixels: int,
    preprocessors: dict[int, Callable],
    is_known: Callable[[str], bool],
) -> Prepared[T]:
    """Read and hash a file; unless its content is already stored, decode it and preprocess it per model."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Prepared(source, error=f"cannot read {path}: {exc.strerror or exc}")
    digest = content_hash(data)
    if is_known(digest):
        return Prepared(source, content_hash=digest, skipped=True)
    try:
        decoded = decode_image(data, max_pixels=max_pixels, name=Path(path).name)
        tensors = {model_id: fn(decoded.image) for model_id, fn in preprocessors.items()}
    except ImageError as exc:
        return Prepared(source, content_hash=digest, error=str(exc))
    except Exception as exc:  # a preprocessing failure is one bad image, not a failed job
        return Prepared(source, content_hash=digest, error=f"preprocessing failed: {exc}")
    return Prepared(source, content_hash=digest, decoded=decoded, tensors=tensors)


def prefetched_batches(
    pool: ThreadPoolExecutor,
    inputs: Sequence[T],
    prepare: Callable[[T], Prepared[T]],
    *,
    batch_size: int,
    prefetch: int,
) -> Iterator[list[Prepared[T]]]:
    """Yield prepared batches in input order while the pool works ``prefetch`` batches ahead."""
    starts = iter(range(0, len(inputs), batch_size))
    queue: collections.deque[list[Future[Prepared[T]]]] = collections.deque()

    def submit_next() -> bool:
        start = next(starts, None)
        if start is None:
            return False
        queue.append([pool.submit(prepare, x) for x in inputs[start : start + batch_size]])
        return True

    for _ in range(prefetch + 1):
        if not submit_next():
            break
    try:
        while queue:
            futures = queue.popleft()
            submit_next()
            yield [f.result() for f in futures]
    finally:
        for futures in queue:  # the consumer stopped early (cancel, shutdown): drop queued work
            for f in futures:
                f.cancel()


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(tensors))
