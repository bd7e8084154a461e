"""Loaded models and their micro-batchers: concurrent requests share forward passes.

Each model gets one :class:`MicroBatcher`. Requests put one preprocessed image each into a bounded
queue; a single task takes up to ``max_batch_size`` of them, waiting at most ``max_wait`` for the
batch to fill, and runs one forward pass in the model's own thread. The service waits 0 by default:
a request that finds the model idle runs at once, and those arriving during that forward pass form
the next batch, so batches grow with the load without a fixed delay (on GPU forward times, a 2 ms
wait tripled a lone query's latency and cut throughput: bench/batching.py). A full queue is refused at once
(:class:`EmbedderBusyError`, a 503 with Retry-After) instead of letting latency grow without bound;
a request whose client went away is dropped before the forward pass; an input that makes the batch
fail is isolated by re-running the batch one image at a time, so only that request fails.

Jobs embed through :meth:`MicroBatcher.forward` with large batches. Interactive batches go
first: a job batch waits (up to ``job_yield_s``) while queries are queued or about to run, because
on a CPU one job batch holds the model for seconds and a query stuck behind a stream of them waited
5x longer in the load test (bench/README.md); the bound keeps a busy query stream from starving the
job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from service.imaging.preparation import stack
from training.export import LoadedModel

logger = logging.getLogger(__name__)


class EmbedderBusyError(RuntimeError):
    """The model's queue is full; the client should retry after a moment."""


class EmbedderClosedError(RuntimeError):
    """The service is shutting down."""


@dataclass
class _Request:
    tensor: torch.Tensor
    future: asyncio.Future[np.ndarray]
    enqueued_at: float = 0.0  # event-loop time


class MicroBatcher:
    """Gathers single-image embedding requests into batches for one model.

    Args:
        model: the loaded model.
        max_batch_size: most images per forward pass.
        max_wait_s: longest time the first request of a batch waits for company.
        queue_size: most requests waiting; more are refused with :class:`EmbedderBusyError`.
        job_yield_s: longest time a job batch gives way to queued interactive requests.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_size: int,
        job_yield_s: float = 2.0,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._pending: collections.deque[_Request] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # One thread per model: forward passes of one model never overlap, and the event loop
        # never blocks on the device.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reid-embed-{model.name}")
        self.job_yield_s = job_yield_s
        # Who may run a forward pass next: interactive batches before job batches (see module doc).
        self._turn = threading.Condition()
        self._running = False
        self._interactive_waiting = 0
        self.batches = 0
        self.images = 0
        #: Called after each batch with (seconds each of its requests waited in the queue, seconds
        #: the batch took); the service's metrics set it (service.http.prometheus).
        self.on_batch: Callable[[list[float], float], None] | None = None

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"micro-batcher-{self.model.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            req = self._pending.popleft()
            if not req.future.done():
                req.future.set_exception(EmbedderClosedError("the service is shutting down"))
        self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def embed(self, tensor: torch.Tensor) -> np.ndarray:
        """Embed one preprocessed CHW image: a (dim,) float32 L2-normalised vector."""
        if self._wakeup is None or self._task is None:
            raise EmbedderClosedError("the embedder is not running")
        if len(self._pending) >= self.queue_size:
            raise EmbedderBusyError(
                f"model {self.model.name} has {len(self._pending)} images waiting; retry shortly"
            )
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append(_Request(tensor, future, future.get_loop().time()))
        self._wakeup.set()
        return await future

    def forward(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed NCHW batch from a job's thread: (N, dim) float32.

        Gives way to interactive requests that are queued or waiting to run, for at most
        ``job_yield_s``.
        """
        give_way_until = time.monotonic() + self.job_yield_s
        with self._turn:
            while True:
                giving_way = bool(self._interactive_waiting or self._pending) and (
                    time.monotonic() < give_way_until
                )
                if not self._running and not giving_way:
                    break
                # Newly queued requests do not notify this condition: poll while giving way.
                self._turn.wait(timeout=0.05 if giving_way else None)
            self._running = True
        return self._embed_and_release(batch)

    def _announce_interactive(self) -> None:
        # Counted before the batch leaves the queue, not when the model's thread picks it up: a job
        # waiting on the condition must see it all the way.
        with self._turn:
            self._interactive_waiting += 1

    def _withdraw_interactive(self) -> None:
        with self._turn:
            self._interactive_waiting -= 1
            self._turn.notify_all()

    def _forward_interactive(self, batch: torch.Tensor) -> np.ndarray:
        with self._turn:
            while self._running:
                self._turn.wait()
            self._interactive_waiting -= 1
            self._running = True
        return self._embed_and_release(batch)

    def _embed_and_release(self, batch: torch.Tensor) -> np.ndarray:
        try:
            return self.model.embed(batch).numpy()
        finally:
            with self._turn:
                self._running = False
                self._turn.notify_all()

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + self.max_wait_s
            while len(self._pending) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            # Announced before its requests leave the queue: a job waiting for the model must never
            # see, in between, neither a queued request nor an announced batch (it would go first).
            self._announce_interactive()
            batch: list[_Request] = []
            while self._pending and len(batch) < self.max_batch_size:
                req = self._pending.popleft()
                if not req.future.cancelled():  # the client went away: no forward pass for it
                    batch.append(req)
            if not batch:
                self._withdraw_interactive()
            else:
                started = loop.time()
                await self._run_batch(loop, batch)
                if self.on_batch is not None:
                    try:
                        self.on_batch([started - r.enqueued_at for r in batch], loop.time() - started)
                    except Exception:  # an observer must never stop the batcher
                        logger.exception("the micro-batch observer failed")

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        """Embed an announced batch (see :meth:`_run`); on failure, retry its images one by one."""
        try:
            try:
                stacked = stack([r.tensor for r in batch])  # GPU-decoded and Pillow-road tensors may meet
            except Exception:
                self._withdraw_interactive()
                raise
            out = await loop.run_in_executor(self._executor, self._forward_interactive, stacked)
        except Exception:
            if len(batch) == 1:
                logger.exception("embedding failed for one request")
                _set_exception(batch[0], "the model failed on this image")
                return
            # Isolate: one bad input (or one oversize tensor) must not fail its neighbours.
            logger.warning("a batch of %d failed; retrying its images one by one", len(batch))
            for req in batch:
                try:
                    self._announce_interactive()
                    one = await loop.run_in_executor(
                        self._executor, self._forward_interactive, req.tensor[None]
                    )
                except Exception:
                    logger.exception("embedding failed for one request")
                    _set_exception(req, "the model failed on this image")
                else:
                    _set_result(req, one[0])
            return
        self.batches += 1
        self.images += len(batch)
        for req, vec in zip(batch, out, strict=True):
            _set_result(req, vec)


def _set_result(req: _Request, value: np.ndarray) -> None:
    if not req.future.done():
        req.future.set_result(value)


def _set_exception(req: _Request, message: str) -> None:
    if not req.future.done():
        req.future.set_exception(EmbeddingFailedError(message))


class EmbeddingFailedError(RuntimeError):
    """The model raised on an input."""


@dataclass
class ModelRuntime:
    """A served model: the loaded module, its database row and its micro-batcher."""

    name: str
    version: str
    row_id: int
    model: LoadedModel
    batcher: MicroBatcher
    path: str
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelUnavailableError(LookupError):
    """A model (or model version) is not served by this process."""


class ModelRegistry:
    """The models this process serves, by name (newest configured version) and by name@version."""

    def __init__(self) -> None:
        self._by_key: dict[str, ModelRuntime] = {}
        self._default: dict[str, ModelRuntime] = {}
        self._by_row: dict[int, ModelRuntime] = {}

    def add(self, runtime: ModelRuntime) -> None:
        self._by_key[runtime.key] = runtime
        self._default[runtime.name] = runtime  # the last configured version of a name wins
        self._by_row[runtime.row_id] = runtime

    def __iter__(self) -> Iterator[ModelRuntime]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, name: str, version: str | None = None) -> ModelRuntime:
        runtime = self._default.get(name) if version is None else self._by_key.get(f"{name}@{version}")
        if runtime is None:
            served = ", ".join(sorted(self._by_key)) or "none"
            what = f"{name}@{version}" if version else name
            raise ModelUnavailableError(f"model {what} is not served here (served: {served})")
        return runtime

    def by_row(self, row_id: int) -> ModelRuntime | None:
        return self._by_row.get(row_id)
