"""Keyset pagination shared by the listings (:mod:`service.api.pagination`), against a real SQLite table.

Walking the pages of any id set, in either order, with any page size and an extra filter, must
return every matching row exactly once, in order, and end with a null cursor; a cursor the service
did not hand out is a 400 problem. The routers' own tests cover the listings through HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from sqlalchemy import Integer, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from service.api.pagination import cursor_after, page_of, page_query
from service.api.schemas import Page, encode_cursor
from service.http.problems import Problem


class _Base(DeclarativeBase):
    pass


class _Row(_Base):
    __tablename__ = "rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    colour: Mapped[int] = mapped_column(Integer)


class _RowOut(BaseModel):
    id: int


@pytest.fixture(scope="module")
def session() -> Iterator[Session]:
    engine = create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


def _walk(session: Session, limit: int, order: str, colour: int | None) -> list[int]:
    seen: list[int] = []
    cursor: str | None = None
    for _ in range(1000):
        stmt = select(_Row) if colour is None else select(_Row).where(_Row.colour == colour)
        rows = session.scalars(page_query(stmt, _Row.id, cursor_after(cursor), limit, order)).all()
        page = page_of(rows, limit, _RowOut, lambda r: _RowOut(id=r.id))
        assert isinstance(page, Page) and len(page.items) <= limit
        seen += [item.id for item in page.items]
        if page.next_cursor is None:
            return seen
        assert len(page.items) == limit  # only a full page has a next one
        cursor = page.next_cursor
    raise AssertionError("pagination did not end")


@settings(max_examples=40, deadline=None)
@given(
    ids=st.sets(st.integers(1, 2**31 - 1), max_size=25),
    limit=st.integers(1, 7),
    order=st.sampled_from(["asc", "desc"]),
    colour=st.one_of(st.none(), st.integers(0, 2)),
)
def test_pages_cover_every_row_once_in_order(
    session: Session, ids: set[int], limit: int, order: str, colour: int | None
) -> None:
    session.query(_Row).delete()
    session.add_all(_Row(id=i, colour=i % 3) for i in ids)
    session.flush()
    expected = sorted((i for i in ids if colour is None or i % 3 == colour), reverse=order == "desc")
    assert _walk(session, limit, order, colour) == expected


def test_a_cursor_names_the_last_row_of_its_page(session: Session) -> None:
    session.query(_Row).delete()
    session.add_all(_Row(id=i, colour=0) for i in (4, 8, 15, 16))
    session.flush()
    rows = session.scalars(page_query(select(_Row), _Row.id, 0, 2)).all()
    assert [r.id for r in rows] == [4, 8, 15]  # one row more than the page: there is a next page
    page = page_of(rows, 2, _RowOut, lambda r: _RowOut(id=r.id))
    assert [i.id for i in page.items] == [4, 8] and page.next_cursor == encode_cursor(8)
    assert cursor_after(page.next_cursor) == 8 and cursor_after(None) == 0 and cursor_after("") == 0


@pytest.mark.parametrize("bad", ["garbage!", encode_cursor(-1), "aWQ6eA", encode_cursor(2**63)])
def test_a_foreign_cursor_is_a_400_problem(bad: str) -> None:
    with pytest.raises(Problem) as info:
        cursor_after(bad)
    assert info.value.status == 400 and info.value.slug == "invalid-cursor"
