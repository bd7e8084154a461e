"""A gallery search after the query embeddings: the index's top-k, the items' rows, optional re-ranking.

The routers in :mod:`service.api.search` parse the request, embed the query images and shape the
answer; what happens in between (how many candidates to fetch, which rows are still active, the
k-reciprocal re-ranking of :func:`evaluation.rerank.rerank_candidates`) is here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from evaluation.rerank import rerank_candidates
from index import SearchFilter
from service.db.tables import Embedding, Gallery, Item
from service.gallery_index import GalleryIndex, vectors_from_bytes
from service.state import ServiceState

#: Re-ranking looks at this many candidates per query (at least), then keeps the k best.
RERANK_CANDIDATES = 50


class ItemNotFoundError(LookupError):
    """The query item is not an active item of the gallery."""


class ItemNotEmbeddedError(LookupError):
    """The query item has no embedding by the model of the gallery's index yet."""


@dataclass(frozen=True)
class Hit:
    """One search result: the item's row (loaded, detached from its session) and its score."""

    item: Item
    score: float


def run_search(
    state: ServiceState,
    gi: GalleryIndex,
    queries: np.ndarray,
    k: int,
    flt: SearchFilter | None,
    drop: set[int],
    rerank: bool,
) -> list[list[Hit]]:
    """Search, optionally re-rank, then join the hits with their database rows (best first).

    Args:
        gi: the gallery's active index.
        queries: ``(nq, dim)`` query embeddings by the index's model.
        k: results per query.
        flt: the index filter, or None.
        drop: item ids never to return (the query item itself).
        rerank: k-reciprocal re-ranking of at least :data:`RERANK_CANDIDATES` candidates.

    Returns:
        One list of at most ``k`` hits per query; deleted items and ``drop`` are left out.
    """
    fetch = k + len(drop)
    if rerank:
        fetch = max(fetch, RERANK_CANDIDATES)
    fetch = min(fetch, gi.index.capabilities.max_k)
    scores, ids = gi.search(queries, fetch, flt)
    with state.sessions() as session:
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        rows = (
            {
                it.id: it
                for it in session.scalars(select(Item).where(Item.id.in_(wanted), Item.status == "active"))
            }
            if wanted
            else {}
        )
        vectors: dict[int, np.ndarray] = {}
        if rerank and rows:
            for item_id, blob in session.execute(
                select(Embedding.item_id, Embedding.vector).where(
                    Embedding.item_id.in_(list(rows)), Embedding.model_id == gi.model_id
                )
            ):
                vectors[item_id] = vectors_from_bytes([blob], gi.dim)[0]
    out = []
    for qi in range(len(queries)):
        cand = [
            (int(i), float(s))
            for i, s in zip(ids[qi], scores[qi], strict=True)
            if i >= 0 and int(i) in rows and int(i) not in drop
        ]
        if rerank and len(cand) > 1:
            cand = _rerank(queries[qi], cand, vectors)
        out.append([Hit(rows[i], s) for i, s in cand[:k]])
    return out


def item_query(
    state: ServiceState, gi: GalleryIndex, gallery_id: int, item_id: int
) -> tuple[np.ndarray, str, str]:
    """A stored item's embedding by the index's model (a ``(1, dim)`` query), the model's name and version.

    Raises:
        ItemNotFoundError: no active item ``item_id`` in the gallery.
        ItemNotEmbeddedError: the item has no embedding by the index's model yet.
    """
    with state.sessions() as session:
        item = session.get(Item, item_id)
        if item is None or item.gallery_id != gallery_id or item.status != "active":
            raise ItemNotFoundError(f"item {item_id} is not in gallery {gallery_id}")
        blob = session.scalar(
            select(Embedding.vector).where(Embedding.item_id == item.id, Embedding.model_id == gi.model_id)
        )
        gallery = session.get(Gallery, gallery_id)
        if blob is None or gallery is None:
            raise ItemNotEmbeddedError(f"item {item_id} has no embedding by model {gi.model_id} yet")
        model = gallery.model if gallery.model_id == gi.model_id else gallery.standby_model
        assert model is not None
        return vectors_from_bytes([blob], gi.dim), model.name, model.version


def _rerank(
    query: np.ndarray, cand: list[tuple[int, float]], vectors: dict[int, np.ndarray]
) -> list[tuple[int, float]]:
    """k-reciprocal re-ranking of one query's candidates; score = 1 - re-ranked distance."""
    cand = [c for c in cand if c[0] in vectors]
    final = rerank_candidates(query, np.stack([vectors[i] for i, _ in cand]))
    order = np.argsort(final, kind="stable")
    return [(cand[j][0], float(1.0 - final[j])) for j in order]
