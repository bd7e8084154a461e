"""Worker processes for the Pillow road: decode and preprocess images on every core, outside the GIL.

Pillow releases the GIL while it decodes, but the rest of the road (opening, mode conversion,
``ToTensor``, ``Normalize``, the Python around them) holds it: a pool of threads preprocesses
little faster than one core (1,009 images/s on one core, 1,002 with 16 threads on a 16-core
machine, ``bench/README.md``). Here each image goes to a worker process, which decodes it with
:func:`service.imaging.decoding.decode_image` and applies each model's test-time transform,
rebuilt in the worker from the model's saved :class:`~training.data.transforms.Preprocess` and
cached there, so the tensors are bit-identical to the thread road's. A model is never pickled.

Each worker has its own pipe and its own shared-memory buffer. The calling thread (one of the
service's decode threads) sends the image bytes and the transform specs down the pipe; the worker
writes the float32 results into its buffer and answers with the header facts
(:class:`~service.imaging.decoding.ImageInfo`) and where the arrays lie; the caller copies them
out. On a 2-core machine this costs the service process ~0.2 ms of CPU per 256x128 image, against
~1.2 ms for decoding it in a thread, and ~0.3-0.65 ms with ``concurrent.futures.ProcessPoolExecutor``
(its feeder and manager threads, and the 393 KB result through its pipe).

Start method: ``forkserver`` (``spawn`` where the platform has none), never ``fork``: the service
has threads and may have initialised CUDA. The fork server imports torch, torchvision and Pillow
once (~2.5 s) and forks each worker from that state, so a worker starts in milliseconds and owns
~14 MB, the rest shared (~400 MB in all for the server and two workers); with ``spawn`` each
worker imports torch itself and owns ~370 MB (measured). The fork server lives as long as the
service process and exits with it. As with any start method but ``fork``, the main module must be
importable without side effects (``if __name__ == "__main__":``).

A worker that dies on an image is replaced, and the image is retried once in another worker; if
that one dies too, the image fails alone (:class:`~service.imaging.decoding.DecoderCrashedError`).
It is never handed back to the service process, which the same decoder crash would kill.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.imaging.decoding import DecoderCrashedError, ImageInfo, decode_image
from training.data.transforms import Preprocess, build_test_transform

logger = logging.getLogger(__name__)

#: How long a new worker may take to start (the first waits for the fork server to import torch).
START_TIMEOUT_S = 300.0
#: Shared buffer of each worker: room for five 256x128 (or two 384x192) float32 inputs. Larger
#: results travel through the pipe instead (correct, slower).
BUFFER_BYTES = 2 * 1024 * 1024
#: How long :meth:`DecodeProcessPool.close` lets the workers finish their image before killing them.
CLOSE_TIMEOUT_S = 10.0


def default_start_method() -> str:
    """``forkserver`` where the platform has it (Linux, macOS), otherwise ``spawn``."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def preprocess_spec(fn: Callable[[Image.Image], torch.Tensor]) -> Preprocess | None:
    """The transform spec behind a preprocessor, when a worker can rebuild it exactly.

    That is the case for a model's own ``LoadedModel.preprocess`` (its transform is built from its
    saved :class:`Preprocess`); any other callable returns None and its images stay in the threads.
    """
    from training.export import LoadedModel  # imported already wherever models are loaded

    owner = getattr(fn, "__self__", None)
    if isinstance(owner, LoadedModel) and getattr(fn, "__func__", None) is LoadedModel.preprocess:
        return owner.preprocess_config  # ~5 us: not worth a cache
    return None


# ---------------------------------------------------------------------- in the worker processes


@dataclass(frozen=True)
class _Placed:
    """Where a worker put one result array in its shared buffer."""

    offset: int
    dtype: str
    shape: tuple[int, ...]


#: Test-time transforms built in this worker, one per spec (a service has a handful of models).
_transforms: dict[Preprocess, Callable[[Image.Image], torch.Tensor]] = {}


def _decode_and_preprocess(
    data: bytes, name: str, max_pixels: int, specs: Sequence[Preprocess]
) -> tuple[ImageInfo, list[np.ndarray]]:
    """Decode one image and apply each spec's transform: the header facts and one array per spec."""
    decoded = decode_image(data, max_pixels=max_pixels, name=name)
    arrays = []
    for spec in specs:
        transform = _transforms.get(spec)
        if transform is None:
            transform = _transforms[spec] = build_test_transform(spec)
        arrays.append(transform(decoded.image).numpy())
    return decoded.info, arrays


def _place(arrays: list[np.ndarray], buffer: memoryview) -> list[_Placed] | list[np.ndarray]:
    """Copy the arrays into the shared buffer when they fit (their places), else return them."""
    offsets, end = [], 0
    for a in arrays:
        offsets.append(end)
        end += -(-a.nbytes // 64) * 64  # every array 64-byte aligned
    if end > len(buffer):
        return arrays
    for a, offset in zip(arrays, offsets, strict=True):
        np.frombuffer(buffer, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)[...] = a
    return [_Placed(offset, a.dtype.str, a.shape) for a, offset in zip(arrays, offsets, strict=True)]


#: What a worker does with one image: (bytes, name, pixel limit, specs) -> header facts, arrays.
DecodeFunction = Callable[[bytes, str, int, Sequence[Preprocess]], tuple[ImageInfo, list[np.ndarray]]]


def _worker_main(conn: Connection, buffer: Any, decode: DecodeFunction = _decode_and_preprocess) -> None:
    """A worker's life: answer one image at a time until the pipe closes or says stop (None)."""
    # One image per process at a time: N workers already keep N cores busy.
    torch.set_num_threads(1)
    # Ctrl-C reaches the whole process group; the service handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    view = memoryview(buffer).cast("B")
    try:
        conn.send(("ready", os.getpid()))
    except OSError:  # the pool closed while this worker started
        return
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the service closed the pipe, or died: nothing left to do
            return
        if request is None:
            return
        data, name, max_pixels, specs = request
        try:
            info, arrays = decode(data, name, max_pixels, specs)
            reply: tuple[Any, ...] = ("ok", info, _place(arrays, view))
        except Exception as exc:
            reply = ("error", exc)
        try:
            try:
                conn.send(reply)
            except (pickle.PicklingError, TypeError, AttributeError):
                # An exception that does not pickle: keep its type name and message.
                conn.send(("error", RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))
        except OSError:  # the service is gone
            return


# ---------------------------------------------------------------------- in the service process


class _WorkerDiedError(Exception):
    """The worker's pipe broke: the process died (killed, out of memory) or was stopped."""


class DecodeWorkersUnavailableError(RuntimeError):
    """An image's worker died and no other worker came up to retry it (the pool is closing)."""


class _Worker:
    """The service's side of one worker: its process, its pipe end and its shared buffer."""

    def __init__(self, process: BaseProcess, conn: Connection, buffer: Any) -> None:
        self.process = process
        self.pid = process.pid  # kept: the Process object is closed once reaped
        self.conn = conn
        self.buffer = buffer
        self._ending = threading.Lock()
        self._ended = False

    def call(self, request: tuple[Any, ...]) -> tuple[Any, ...]:
        try:
            self.conn.send(request)
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise _WorkerDiedError(str(exc) or type(exc).__name__) from exc

    def tensors(self, placed: list[_Placed] | list[np.ndarray]) -> list[torch.Tensor]:
        """Copies of the worker's result arrays (the buffer is reused by its next image)."""
        out = []
        for p in placed:
            if isinstance(p, np.ndarray):
                out.append(torch.from_numpy(p))
                continue
            count = math.prod(p.shape)
            view = np.frombuffer(self.buffer, dtype=np.dtype(p.dtype), count=count, offset=p.offset)
            # A numpy copy, not Tensor.clone(): torch would split this copy over its intra-op
            # threads, which costs milliseconds on a busy machine (measured) instead of ~20 us.
            out.append(torch.from_numpy(view.reshape(p.shape).copy()))
        return out

    def stop(self) -> None:
        """Ask the worker to exit and close the pipe (the worker exits on either)."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.conn.close()

    def end(self, timeout: float) -> None:
        """Wait for the process to exit; terminate it, then kill it, if it does not (idempotent)."""
        with self._ending:
            if self._ended:
                return
            self._ended = True
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(1.0)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(1.0)
            with contextlib.suppress(ValueError):  # still running after SIGKILL: leave it to the OS
                self.process.close()


class DecodeProcessPool:
    """Worker processes that decode images with Pillow and preprocess them for the models.

    :meth:`start` starts the workers in the background (the fork server imports torch: seconds).
    Until the first worker is up, :meth:`run` answers None and the caller decodes in its own
    thread, so no request waits for the pool to start; from then on a caller waits for a worker
    while all are busy or being replaced (a replacement starts in milliseconds), so that no image
    reaches a thread while a crashing one may be around.

    A worker that dies on an image (a crash in the decoder, killed, out of memory) is replaced,
    and its image is retried once in another worker (the replacement when the pool has one
    worker); if that one dies too, the image fails with :class:`DecoderCrashedError`. Such an
    image never goes back to the caller's thread: a decoder crash there would kill the service.

    Args:
        processes: number of worker processes (>= 1).
        start_method: ``forkserver`` or ``spawn`` (default: :func:`default_start_method`).
        buffer_bytes: size of each worker's shared result buffer.
        decode: what a worker runs on each image (a module-level function: it is sent by name);
            tests give one that crashes on a marked image.
    """

    def __init__(
        self,
        processes: int,
        *,
        start_method: str | None = None,
        buffer_bytes: int = BUFFER_BYTES,
        decode: DecodeFunction = _decode_and_preprocess,
    ) -> None:
        if processes < 1:
            raise ValueError(f"a decode process pool needs at least 1 process, got {processes}")
        method = start_method or default_start_method()
        if method not in ("forkserver", "spawn"):
            raise ValueError(
                f"decode processes start with 'forkserver' or 'spawn', not {method!r} (the service "
                "has threads, and forking a threaded process can deadlock the child)"
            )
        self.processes = processes
        self.start_method = method
        self.buffer_bytes = buffer_bytes
        self.decode = decode
        self._context = multiprocessing.get_context(method)
        if method == "forkserver":
            # Import the workers' modules (torch, torchvision, Pillow) once, in the fork server.
            self._context.set_forkserver_preload([__name__])
        self._cond = threading.Condition()
        self._workers: set[_Worker] = set()  # alive ones, idle or busy
        self._idle: collections.deque[_Worker] = collections.deque()
        self._pending: set[_Worker] = set()  # started, not yet heard from
        self._starting = 0
        self._started = False
        self._warm = False  # a worker has been up once: images wait for workers from then on
        self._closed = False
        #: Images decoded in the workers; images left to the threads because no worker was up or
        #: the pool was closing; workers started to replace dead ones; images retried after their
        #: worker died; images failed because their retry's worker died too.
        self.decoded = 0
        self.fallbacks = 0
        self.restarts = 0
        self.retries = 0
        self.crashed = 0

    @property
    def ready(self) -> bool:
        """Whether a worker is up to take images."""
        return bool(self._workers)

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        with self._cond:
            return sorted(w.pid for w in self._workers if w.pid is not None)

    def start(self) -> None:
        """Start the worker processes in the background (once); returns at once."""
        with self._cond:
            if self._started or self._closed:
                return
            self._started = True
        self._start_workers(self.processes)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until no worker is starting any more: whether any is up (for tests and benchmarks)."""
        with self._cond:
            self._cond.wait_for(lambda: self._starting == 0 or self._closed, timeout)
            return bool(self._workers) and not self._closed

    def run(
        self, data: bytes, *, name: str, max_pixels: int, preprocessors: Mapping[int, Callable]
    ) -> tuple[ImageInfo, dict[int, torch.Tensor]] | None:
        """Decode and preprocess one image in a worker: its header facts and a CPU tensor per model.

        Args:
            data: the image bytes.
            name: how error messages call the image.
            max_pixels: the pixel limit.
            preprocessors: model id -> ``LoadedModel.preprocess`` (see :func:`preprocess_spec`).

        Returns:
            None when the caller should decode the image itself: no worker is up (yet), a
            preprocessor has no spec, or the pool is closing (before any worker took the image).

        Raises:
            the worker's exception, type and message preserved: an ``ImageError`` subclass for a
            bad image, anything else for a preprocessing failure (as on the thread road).
            DecoderCrashedError: the image's worker died, and so did the one that retried it.
            DecodeWorkersUnavailableError: its worker died and none came up to retry it.
        """
        if not self._warm:
            return None
        specs: dict[int, Preprocess] = {}
        for model_id, fn in preprocessors.items():
            spec = preprocess_spec(fn)
            if spec is None:
                return None
            specs[model_id] = spec
        return self.run_specs(data, name=name, max_pixels=max_pixels, specs=specs)

    def run_specs(
        self, data: bytes, *, name: str, max_pixels: int, specs: Mapping[int, Preprocess]
    ) -> tuple[ImageInfo, dict[int, torch.Tensor]] | None:
        """:meth:`run` given the transforms' specs (model id -> :class:`Preprocess`) themselves."""
        distinct = list(dict.fromkeys(specs.values()))  # models sharing a transform share the work
        request = (data, name, max_pixels, distinct)
        died = 0
        while True:
            # After a death, wait for the replacement rather than decode here: the image may be
            # what killed the worker, and a decoder crash in this process would kill the service.
            worker = self._acquire(retry=died > 0)
            if worker is None:
                if died:
                    raise DecodeWorkersUnavailableError(
                        f"{name}: its decode worker process stopped and no other one came up to retry "
                        "it (the service is shutting down?): send it again later"
                    )
                return None
            try:
                reply = worker.call(request)
                if reply[0] == "error":
                    raise reply[1]
                _, info, placed = reply
                arrays = worker.tensors(placed)
                break
            except _WorkerDiedError as exc:
                died += 1
                self._replace(worker, exc, name=name, retry=died == 1)
                if died == 2:
                    with self._cond:
                        self.crashed += 1
                    raise DecoderCrashedError(
                        f"{name} could not be decoded: the decoder process stopped on it twice, in two "
                        "different processes (a malformed or hostile file?). Re-encode it as a plain "
                        "JPEG or PNG, or leave it out"
                    ) from None
            finally:
                self._release(worker)
        # Each model gets its own tensor, as on the thread road (no aliasing between models).
        first: set[int] = set()
        tensors: dict[int, torch.Tensor] = {}
        for model_id, spec in specs.items():
            i = distinct.index(spec)
            tensors[model_id] = arrays[i] if i not in first else torch.from_numpy(arrays[i].numpy().copy())
            first.add(i)
        with self._cond:
            self.decoded += 1
        return info, tensors

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop every worker and wait for it to exit: idle ones at once, busy ones after their
        image (their callers get it), any still running after ``timeout`` seconds are killed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            # Workers being started are stopped by their starter once they say hello: wait for it.
            self._cond.wait_for(lambda: self._starting == 0, timeout)
            workers = list(self._workers)
            idle = list(self._idle)
            self._idle.clear()
            silent = list(self._pending)  # still not started after the timeout
        for w in idle:
            w.stop()
        for w in silent:
            w.end(0.0)  # its starter then sees the pipe close
        for w in workers:
            w.end(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._workers.clear()
            self._cond.notify_all()

    # ------------------------------------------------------------------------------ internals

    def _acquire(self, *, retry: bool = False) -> _Worker | None:
        """An idle worker, waiting while all are busy or being replaced.

        None when the pool is closing, or when no worker is up or on its way (a first try goes
        to the caller's thread then; a retry never does). Before the first worker is up, a first
        try does not wait for it.
        """
        deadline: float | None = None
        with self._cond:
            while not self._idle:
                on_its_way = self._starting > 0 and (retry or self._warm)
                if self._closed or not (self._workers or on_its_way):
                    if not retry:
                        self.fallbacks += 1
                    return None
                if self._workers:
                    self._cond.wait()  # for a busy worker
                    continue
                deadline = deadline or time.monotonic() + START_TIMEOUT_S
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    if not retry:
                        self.fallbacks += 1
                    return None  # a starter that never reported back (it logs why)
            worker = self._idle.popleft()
            if retry:
                self.retries += 1
            return worker

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if worker not in self._workers:
                return  # died during the call: replaced already
            if self._closed:
                worker.stop()  # close() waits for its process to exit
                return
            self._idle.append(worker)
            self._cond.notify()

    def _replace(self, worker: _Worker, exc: Exception, *, name: str, retry: bool) -> None:
        """Forget a dead worker and start another in its place (unless the pool is closing)."""
        with self._cond:
            self._workers.discard(worker)
            closing = self._closed
            if not closing:
                self.restarts += 1
                # Counted as starting in the same breath: a retry waiting in _acquire waits for it.
                self._starting += 1
            self._cond.notify_all()  # callers waiting for a worker re-check whether any is left
        worker.conn.close()
        if closing:
            worker.end(1.0)
            return
        logger.warning(
            "decode worker process %s died on %s (%s); a new worker starts, and the image %s",
            worker.pid,
            name,
            exc,
            "is retried in another worker" if retry else "fails: its retry's worker died too",
        )
        self._start_workers(1, replacing=worker, counted=True)

    def _start_workers(self, count: int, replacing: _Worker | None = None, *, counted: bool = False) -> None:
        # Starting a process waits for the fork server, which imports torch the first time: never
        # on the caller's thread (the event loop at start-up, a decode thread after a crash).
        if not counted:
            with self._cond:
                self._starting += count
        threading.Thread(
            target=self._start_in_background,
            args=(count, replacing),
            daemon=True,
            name="reid-decode-processes-start",
        ).start()

    def _start_in_background(self, count: int, replacing: _Worker | None) -> None:
        buffers = []
        if replacing is not None:
            replacing.end(1.0)  # reaped before its buffer goes to the new worker
            buffers.append(replacing.buffer)
        pending: list[_Worker] = []
        for i in range(count):
            try:
                if self._closed:
                    break
                buffer = buffers[i] if i < len(buffers) else self._context.RawArray("B", self.buffer_bytes)
                parent_end, child_end = self._context.Pipe()
                process = self._context.Process(
                    target=_worker_main,
                    args=(child_end, buffer, self.decode),
                    name="reid-decode",
                    daemon=True,
                )
                process.start()
                child_end.close()  # the worker's end lives in the worker: its death closes the pipe
                pending.append(worker := _Worker(process, parent_end, buffer))
                with self._cond:
                    self._pending.add(worker)
            except Exception:
                logger.exception("could not start a decode worker process; images are decoded in threads")
                break
        for worker in pending:
            self._admit(worker)
        with self._cond:
            self._starting -= count
            self._cond.notify_all()

    def _admit(self, worker: _Worker) -> None:
        """Wait for a started worker's hello, then let callers use it."""
        try:
            ready = worker.conn.poll(START_TIMEOUT_S) and worker.conn.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        with self._cond:
            self._pending.discard(worker)
            if ready and not self._closed:
                self._warm = True
                self._workers.add(worker)
                self._idle.append(worker)
                self._cond.notify_all()
                return
        if not ready and not self._closed:
            logger.error("a decode worker process did not start; images are decoded in threads")
        worker.stop()
        worker.end(1.0)
