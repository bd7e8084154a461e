"""Keyset pagination of the listings by id: the cursor a client passes back, the page query, the page.

A page is fetched with one row more than it shows: that row only says whether a next page exists,
and the cursor of the next page is the id of the page's last row (see
:func:`service.api.schemas.encode_cursor`), so pages stay stable while rows are added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Select

from service.api.schemas import Page, SortOrder, decode_cursor, encode_cursor
from service.http.problems import Problem

T = TypeVar("T")
Row = TypeVar("Row")


def cursor_after(cursor: str | None) -> int:
    """The id after which the requested page starts (0 for the first page).

    Raises:
        Problem: 400 ``invalid-cursor`` for a cursor this service did not hand out.
    """
    try:
        return decode_cursor(cursor)
    except ValueError as exc:
        raise Problem(
            400, "Invalid cursor", "Pass back the next_cursor of a previous page.", slug="invalid-cursor"
        ) from exc


def page_query(stmt: Select, id_column: Any, after: int, limit: int, order: SortOrder = "asc") -> Select:
    """``stmt`` narrowed to one page: ``limit + 1`` rows past ``after`` by ``id_column``, in ``order``.

    For ``desc`` (newest first) the first page has no bound and later pages continue below ``after``.
    """
    if order == "desc":
        if after:
            stmt = stmt.where(id_column < after)
        return stmt.order_by(id_column.desc()).limit(limit + 1)
    return stmt.where(id_column > after).order_by(id_column).limit(limit + 1)


def page_of(rows: Sequence[Row], limit: int, item_type: type[T], convert: Callable[[Row], T]) -> Page[T]:
    """The page of ``rows`` (from :func:`page_query`): the first ``limit`` converted, and the next cursor."""
    return Page[item_type](  # type: ignore[valid-type]
        items=[convert(row) for row in rows[:limit]],
        next_cursor=encode_cursor(rows[limit - 1].id) if len(rows) > limit else None,  # type: ignore[attr-defined]
    )
