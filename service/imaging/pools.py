"""The service's decode pools: the threads that read and check images, and the Pillow worker processes."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from service.imaging.processes import DecodeProcessPool

logger = logging.getLogger(__name__)


class ImageDecoder:
    """The service's decode pools: threads, and optionally worker processes for the Pillow road.

    The threads read, hash and check images and run the decoders that release the GIL
    (libjpeg-turbo, nvJPEG). With ``processes`` > 0, images that Pillow decodes are handed to a
    :class:`~service.imaging.processes.DecodeProcessPool` (started here, in the background), because
    Pillow decoding plus preprocessing holds the GIL for most of its time and does not scale in
    threads. Each thread waits for its image's worker, so ``threads`` bounds the images in flight:
    keep it at least ``processes``.

    Args:
        threads: decode threads.
        max_pixels: the pixel limit of the images.
        processes: worker processes for the Pillow road; 0 decodes in the threads.
    """

    def __init__(self, threads: int, *, max_pixels: int, processes: int = 0) -> None:
        if processes < 0:
            raise ValueError(f"decode processes must be >= 0 (0: decode in threads), got {processes}")
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reid-decode")
        self.processes: DecodeProcessPool | None = None
        if processes:
            if processes > threads:
                logger.warning(
                    "%d decode processes but %d decode threads: at most %d workers are busy at once "
                    "(set decode_threads to at least decode_processes)",
                    processes,
                    threads,
                    threads,
                )
            self.processes = DecodeProcessPool(processes)
            self.processes.start()

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The thread pool, for requests and jobs that decode images ahead of the model."""
        return self._pool

    def close(self) -> None:
        """Stop both pools; blocks until the worker processes have exited (none is left behind)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.processes is not None:
            self.processes.close()
