"""PK sampling for metric learning: every batch holds P identities with K images each.

The batch-hard triplet loss needs several images of each identity in a batch; the PK sampler
(Hermans et al., 2017) guarantees it. An epoch is built by shuffling each identity's images into
chunks of K (an identity with fewer than K images is drawn with replacement to fill one chunk), then
repeatedly taking one chunk from each of P distinct identities chosen at random, until fewer than P
identities have chunks left.

The epoch's batches are a pure function of ``(seed, epoch)``, so a run is reproducible and resumes
exactly. In distributed training every rank builds the same global list and takes every
``world_size``-th batch, truncated to a multiple of ``world_size`` so all ranks run the same number
of steps.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["PKBatchSampler"]


class PKBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices, P identities x K images, no identity twice in a batch.

    Args:
        pids: identity of each dataset index (any hashable labels).
        p: identities per batch.
        k: images per identity.
        seed: base seed; the epoch's order depends only on ``(seed, epoch)``.
        num_replicas: number of distributed processes sharing the epoch.
        rank: this process's index in ``[0, num_replicas)``.

    Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``).
    """

    def __init__(
        self,
        pids: Sequence[int],
        p: int,
        k: int = 4,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"PK sampler needs p >= 1 and k >= 1, got p={p}, k={k}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid distributed setting rank={rank}, num_replicas={num_replicas}")
        by_pid: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            by_pid[pid].append(index)
        if len(by_pid) < p:
            raise ValueError(
                f"the training set has {len(by_pid)} identities, fewer than P={p} per batch; "
                "lower the sampler's p (e.g. --set data.p=...)"
            )
        # Sorted identities: the order must not depend on dict insertion or hashing.
        self._pids = sorted(by_pid)
        self._indices = [by_pid[pid] for pid in self._pids]
        self.p, self.k = p, k
        self.seed = seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    def _global_batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        chunks: list[list[list[int]]] = []
        for indices in self._indices:
            if len(indices) < self.k:
                picks = torch.randint(len(indices), (self.k,), generator=gen).tolist()
            else:
                picks = torch.randperm(len(indices), generator=gen).tolist()
            order = [indices[i] for i in picks]
            # Drop the incomplete tail chunk: every chunk has exactly K images.
            chunks.append([order[i : i + self.k] for i in range(0, len(order) - self.k + 1, self.k)])
        available = [i for i, c in enumerate(chunks) if c]
        batches: list[list[int]] = []
        while len(available) >= self.p:
            chosen = torch.randperm(len(available), generator=gen)[: self.p].tolist()
            batch: list[int] = []
            for c in chosen:
                batch.extend(chunks[available[c]].pop())
            batches.append(batch)
            # Swap-remove exhausted identities, highest position first so positions stay valid.
            for c in sorted(chosen, reverse=True):
                if not chunks[available[c]]:
                    available[c] = available[-1]
                    available.pop()
        return batches

    def _local_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            batches = self._global_batches(self.epoch)
            usable = len(batches) - len(batches) % self.num_replicas
            self._cache = (self.epoch, batches[self.rank : usable : self.num_replicas])
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self._local_batches())

    def __len__(self) -> int:
        return len(self._local_batches())
