"""Rank lists of evaluations (worst queries, their crops), the web page's serving, and newest-first listings.

Three layers: :func:`evaluation.metrics.rank_queries` against a plain-Python reference and against the
means of :func:`evaluation.metrics.evaluate_features`; the two evaluation-view endpoints on a hand-made
evaluation whose worst query is known, then on a real evaluation job; and the page, its security
headers and ``order=desc`` through the real app.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from evaluation.feature_file import save_feature_file
from evaluation.metrics import EvaluationError, evaluate_features, rank_queries
from service.db.session import transaction
from service.db.tables import Evaluation, Job, ModelRow
from service.evaluation_files import SAMPLES_NAME, evaluation_dir
from tests.service.conftest import wait_for_job
from tests.service.test_api import assert_problem, create_gallery, upload

# ------------------------------------------------------------------------------ rank_queries


def reference_rank_lists(
    dist: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_cams: np.ndarray,
    g_cams: np.ndarray,
    *,
    same_camera_filter: bool,
    ap_mode: str,
    k: int,
) -> list[dict[str, Any] | None]:
    """Per query, in plain Python: AP, first-match rank and top k, or None when it has no valid match."""
    out: list[dict[str, Any] | None] = []
    for i in range(dist.shape[0]):
        order = sorted(range(dist.shape[1]), key=lambda j: (dist[i, j], j))
        kept = [
            j for j in order if not (same_camera_filter and g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])
        ]
        ranks = [r for r, j in enumerate(kept, start=1) if g_pids[j] == q_pids[i]]
        if not ranks:
            out.append(None)
            continue
        if ap_mode == "standard":
            ap = sum(n / r for n, r in enumerate(ranks, start=1)) / len(ranks)
        else:  # compute_AP.m: trapezoids between the precision before and at each hit
            ap = sum(
                ((1.0 if r == 1 else (n - 1) / (r - 1)) + n / r) / 2 for n, r in enumerate(ranks, start=1)
            ) / len(ranks)
        out.append({"ap": ap, "first": ranks[0], "top": kept[:k]})
    return out


labels = st.integers(0, 3)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    m=st.integers(1, 8),
    n=st.integers(1, 14),
    dim=st.integers(2, 4),
    k=st.integers(1, 16),
    ap_mode=st.sampled_from(["standard", "devkit"]),
    protocol=st.sampled_from(["market1501", "vehicleid"]),
)
def test_rank_queries_matches_a_plain_python_reference_with_many_ties(
    data: st.DataObject, m: int, n: int, dim: int, k: int, ap_mode: str, protocol: str
) -> None:
    # One-hot features: every cosine distance is exactly 0 or 1, so the order among the many equal
    # distances is the (distance, gallery index) rule alone, and the reference can compute it exactly.
    q_axes = np.array(data.draw(st.lists(st.integers(0, dim - 1), min_size=m, max_size=m)))
    g_axes = np.array(data.draw(st.lists(st.integers(0, dim - 1), min_size=n, max_size=n)))
    q_pids, q_cams = (np.array(data.draw(st.lists(labels, min_size=m, max_size=m))) for _ in range(2))
    g_pids, g_cams = (np.array(data.draw(st.lists(labels, min_size=n, max_size=n))) for _ in range(2))
    eye = np.eye(dim, dtype=np.float32)
    ranking = rank_queries(
        eye[q_axes], eye[g_axes], q_pids, g_pids, q_cams, g_cams,
        top_k=k, ap_mode=ap_mode, protocol=protocol, device="cpu",
    )  # fmt: skip
    dist = (q_axes[:, None] != g_axes[None, :]).astype(np.float64)
    market_rule = protocol == "market1501"
    expected = reference_rank_lists(
        dist, q_pids, g_pids, q_cams, g_cams, same_camera_filter=market_rule, ap_mode=ap_mode, k=k
    )
    for i, ref in enumerate(expected):
        top = [j for j in ranking.top_indices[i].tolist() if j >= 0]
        assert ranking.top_indices[i, len(top) :].tolist() == [-1] * (k - len(top))  # -1 only as padding
        if ref is None:
            assert not ranking.valid[i] and math.isnan(ranking.ap[i]) and ranking.first_match_rank[i] == 0
            continue
        assert ranking.valid[i]
        assert ranking.ap[i] == pytest.approx(ref["ap"], abs=1e-12)
        assert ranking.first_match_rank[i] == ref["first"]
        assert top == ref["top"]
        np.testing.assert_array_equal(ranking.top_distances[i, : len(top)], dist[i, top])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 12),
    n=st.integers(2, 30),
    ap_mode=st.sampled_from(["standard", "devkit"]),
    chunk=st.integers(1, 5),
)
def test_rank_queries_averages_to_the_evaluation_numbers(
    seed: int, m: int, n: int, ap_mode: str, chunk: int
) -> None:
    rng = np.random.default_rng(seed)
    q, g = rng.normal(size=(m, 8)).astype(np.float32), rng.normal(size=(n, 8)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 4, m), rng.integers(0, 4, n)
    q_cams, g_cams = rng.integers(0, 2, m), rng.integers(0, 2, n)
    ranking = rank_queries(
        q, g, q_pids, g_pids, q_cams, g_cams, top_k=3, ap_mode=ap_mode, device="cpu", chunk_size=chunk
    )
    try:
        result = evaluate_features(q, g, q_pids, g_pids, q_cams, g_cams, ap_mode=ap_mode, device="cpu")
    except EvaluationError:  # no valid query at all
        assert not ranking.valid.any()
        return
    valid = ranking.valid
    assert valid.sum() == result["num_valid_queries"]
    assert ranking.ap[valid].mean() == pytest.approx(result["mAP"], abs=1e-12)
    assert ranking.inp[valid].mean() == pytest.approx(result["mINP"], abs=1e-12)
    first = ranking.first_match_rank[valid]
    curve = [float(np.mean(first <= r)) for r in range(1, len(result["cmc_curve"]) + 1)]
    assert curve == pytest.approx(result["cmc_curve"], abs=1e-12)


def test_rank_queries_with_re_ranking_averages_to_the_re_ranked_evaluation() -> None:
    rng = np.random.default_rng(7)
    q, g = rng.normal(size=(12, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 5, 12), rng.integers(0, 5, 40)
    q_cams, g_cams = rng.integers(0, 3, 12), rng.integers(0, 3, 40)
    plain = rank_queries(q, g, q_pids, g_pids, q_cams, g_cams, device="cpu")
    ranking = rank_queries(q, g, q_pids, g_pids, q_cams, g_cams, rerank=True, device="cpu")
    result = evaluate_features(q, g, q_pids, g_pids, q_cams, g_cams, rerank=True, device="cpu")
    assert ranking.rerank and ranking.valid.sum() == result["num_valid_queries"]
    assert ranking.ap[ranking.valid].mean() == pytest.approx(result["mAP"], abs=1e-12)
    assert not np.array_equal(ranking.top_indices, plain.top_indices)  # re-ranking changed the lists


def test_rank_queries_refuses_a_bad_top_k() -> None:
    feats = np.eye(2, dtype=np.float32)
    with pytest.raises(EvaluationError, match="top_k"):
        rank_queries(feats, feats, [0, 1], [0, 1], [0, 0], [1, 1], top_k=0)


# ------------------------------------------------------------------- a hand-made evaluation

# Unit vectors at these angles (degrees); cosine distance 1 - cos(difference).
QUERIES = [  # (angle, identity, camera)
    (0.0, 1, 1),  # its two matches come first: AP 1
    (90.0, 2, 1),  # its nearest item is removed (same identity and camera); its match comes third
    (180.0, 3, 1),  # identity 3 is in the gallery only under camera 1: no valid match, left out
]
GALLERY = [
    (5.0, 1, 2),
    (91.0, 2, 1),  # removed from query 1's ranking (Market-1501 rule)
    (80.0, 1, 2),
    (103.0, 9, 2),
    (120.0, 2, 2),
    (180.0, 3, 1),
]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200)]


def _vectors(rows: list[tuple[float, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    angles = np.radians([a for a, _, _ in rows])
    feats = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    return feats, np.array([p for _, p, _ in rows]), np.array([c for _, _, c in rows])


def _write_crop(path: Path, colour: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 64), colour).save(path, format="JPEG", quality=95)
    return str(path)


def _add_evaluation(client: TestClient, *, status: str = "succeeded", protocol: str = "market1501") -> int:
    """An evaluation row (and its job) as the evaluation job leaves it, without running a model."""
    state = client.app.state.service
    with transaction(state.sessions) as session:
        model = session.query(ModelRow).filter_by(name="person").first()
        assert model is not None
        job = Job(kind="evaluate", status=status, params={})
        session.add(job)
        session.flush()
        ev = Evaluation(
            job_id=job.id,
            model_id=model.id,
            protocol=protocol,
            dataset={"layout": "market1501", "root": "hand-made"},
            options={"ap_mode": "standard"},
            rerank=False,
            result={"metric": "cosine"} if status == "succeeded" else None,
        )
        session.add(ev)
        session.flush()
        job.params = {"evaluation_id": ev.id}
        return ev.id


@pytest.fixture
def hand_made(client: TestClient, datasets_root: Path, tmp_path: Path) -> dict[str, Any]:
    """A succeeded evaluation over QUERIES x GALLERY, with one solid-colour crop per row."""
    evaluation_id = _add_evaluation(client)
    folder = evaluation_dir(client.app.state.settings.data_dir, evaluation_id)
    crops = datasets_root / f"hand-made-{tmp_path.name}"
    samples = {
        "query": [_write_crop(crops / f"q{i}.jpg", COLOURS[i]) for i in range(len(QUERIES))],
        "gallery": [_write_crop(crops / f"g{i}.jpg", COLOURS[i]) for i in range(len(GALLERY))],
    }
    save_feature_file(folder / "query.npz", *_vectors(QUERIES))
    save_feature_file(folder / "gallery.npz", *_vectors(GALLERY))
    (folder / SAMPLES_NAME).write_text(json.dumps(samples))
    return {"id": evaluation_id, "folder": folder, "samples": samples}


def _cos(degrees: float) -> float:
    return math.cos(math.radians(degrees))


def test_worst_queries_of_a_hand_made_evaluation(client: TestClient, hand_made: dict[str, Any]) -> None:
    ev = hand_made["id"]
    r = client.get(f"/v1/evaluations/{ev}/worst-queries", params={"k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["evaluation_id"], body["k"], body["protocol"]) == (ev, 3, "market1501")
    assert body["num_valid_queries"] == 2
    worst, second = body["queries"]  # query 2 has no valid match: left out
    assert worst["query_index"] == 1 and second["query_index"] == 0
    assert (worst["identity"], worst["camera"]) == ("2", "1")
    assert worst["ap"] == pytest.approx(1 / 3) and worst["first_match_rank"] == 3
    assert worst["image_url"] == f"/v1/evaluations/{ev}/images/query/1"
    # Gallery item 1 (same identity, same camera) is nearest but removed; item 4 is the match, third.
    assert [h["gallery_index"] for h in worst["results"]] == [2, 3, 4]
    assert [h["match"] for h in worst["results"]] == [False, False, True]
    assert [h["identity"] for h in worst["results"]] == ["1", "9", "2"]
    assert [h["score"] for h in worst["results"]] == pytest.approx([_cos(10), _cos(13), _cos(30)], abs=1e-6)
    assert worst["results"][0]["image_url"] == f"/v1/evaluations/{ev}/images/gallery/2"
    assert second["ap"] == 1.0 and second["first_match_rank"] == 1
    assert [h["gallery_index"] for h in second["results"]] == [0, 2, 1]

    # limit takes the worst first; a shorter k keeps first_match_rank over the whole ranking.
    short = client.get(f"/v1/evaluations/{ev}/worst-queries", params={"limit": 1, "k": 2}).json()
    assert [q["query_index"] for q in short["queries"]] == [1]
    assert short["queries"][0]["first_match_rank"] == 3
    assert [h["gallery_index"] for h in short["queries"][0]["results"]] == [2, 3]
    # k longer than the kept gallery: every kept item, nothing more.
    whole = client.get(f"/v1/evaluations/{ev}/worst-queries", params={"k": 100}).json()
    assert [h["gallery_index"] for h in whole["queries"][0]["results"]] == [2, 3, 4, 0, 5]
    for k in (0, 101):
        assert_problem(client.get(f"/v1/evaluations/{ev}/worst-queries", params={"k": k}), 422)


def _decode(response: Any) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    return Image.open(io.BytesIO(response.content)).convert("RGB")


def test_evaluation_images_are_the_recorded_crops(
    client: TestClient, hand_made: dict[str, Any], tmp_path: Path
) -> None:
    ev, samples = hand_made["id"], hand_made["samples"]
    for split, index in (("query", 1), ("gallery", 4), ("gallery", 4)):  # the second one is cached
        img = _decode(client.get(f"/v1/evaluations/{ev}/images/{split}/{index}"))
        assert max(img.size) <= client.app.state.settings.thumbnail_size
        mean = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(mean, COLOURS[index], atol=8)

    assert_problem(client.get(f"/v1/evaluations/{ev}/images/query/3"), 404)  # three queries: 0..2
    assert_problem(client.get(f"/v1/evaluations/{ev}/images/query/-1"), 422)
    assert_problem(client.get(f"/v1/evaluations/{ev}/images/probe/0"), 422)
    assert_problem(client.get(f"/v1/evaluations/{ev + 1000}/images/query/0"), 404)
    assert_problem(client.get(f"/v1/evaluations/{10**20}/images/query/0"), 422)  # beyond any database id

    # The crop's file deleted: 410 (a thumbnail cached earlier is not served for a missing file).
    Path(samples["gallery"][4]).unlink()
    gone = assert_problem(client.get(f"/v1/evaluations/{ev}/images/gallery/4"), 410)
    assert "no longer on disk" in gone["detail"]
    # A recorded path outside the allowed dataset roots is never read.
    outside = _write_crop(tmp_path / "outside" / "x.jpg", COLOURS[0])
    (hand_made["folder"] / SAMPLES_NAME).write_text(json.dumps({"query": [outside], "gallery": []}))
    assert_problem(client.get(f"/v1/evaluations/{ev}/images/query/0"), 403)
    # The evaluation's sample list gone: 410 for crops and rank lists alike.
    (hand_made["folder"] / SAMPLES_NAME).unlink()
    assert_problem(client.get(f"/v1/evaluations/{ev}/images/query/0"), 410)
    (hand_made["folder"] / "gallery.npz").unlink()
    assert "gallery.npz" in assert_problem(client.get(f"/v1/evaluations/{ev}/worst-queries"), 410)["detail"]


def test_worst_queries_refusals(client: TestClient) -> None:
    assert_problem(client.get("/v1/evaluations/999/worst-queries"), 404)
    assert_problem(client.get(f"/v1/evaluations/{2**31}/worst-queries"), 422)
    running = _add_evaluation(client, status="running")
    body = assert_problem(client.get(f"/v1/evaluations/{running}/worst-queries"), 409)
    assert "running" in body["detail"]
    assert_problem(client.get(f"/v1/evaluations/{running}/images/query/0"), 409)
    failed = _add_evaluation(client, status="failed")
    assert "failed" in assert_problem(client.get(f"/v1/evaluations/{failed}/worst-queries"), 409)["detail"]
    vehicles = _add_evaluation(client, protocol="vehicleid")
    body = assert_problem(client.get(f"/v1/evaluations/{vehicles}/worst-queries"), 409)
    assert "VehicleID" in body["detail"]
    gone = _add_evaluation(client)  # succeeded, but its files were never written (or were deleted)
    assert_problem(client.get(f"/v1/evaluations/{gone}/worst-queries"), 410)
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/evaluations/{evaluation_id}/worst-queries" in paths
    assert "/v1/evaluations/{evaluation_id}/images/{split}/{index}" in paths


# --------------------------------------------------------------------------- a real evaluation


def test_worst_queries_of_a_real_evaluation_agree_with_its_numbers(
    client: TestClient, market_root: Path
) -> None:
    dataset = {"layout": "market1501", "root": str(market_root)}
    r = client.post("/v1/evaluations", json={"model": "person", "dataset": dataset})
    assert r.status_code == 202, r.text
    ev = wait_for_job(client, r.headers["location"])
    assert ev["status"] == "succeeded", ev
    result = ev["result"]
    body = client.get(f"/v1/evaluations/{ev['id']}/worst-queries", params={"limit": 200, "k": 5}).json()
    queries = body["queries"]
    assert len(queries) == body["num_valid_queries"] == result["num_valid_queries"]
    aps = [q["ap"] for q in queries]
    assert aps == sorted(aps)
    assert np.mean(aps) == pytest.approx(result["mAP"], abs=1e-9)
    first = np.array([q["first_match_rank"] for q in queries])
    for rank, fraction in result["cmc"].items():
        assert np.mean(first <= int(rank)) == pytest.approx(fraction, abs=1e-9)
    for q in queries:
        assert len(q["results"]) == 5
        # No listed item is removed by the Market-1501 rule; matches are exactly the query's identity.
        assert not any(h["identity"] == q["identity"] and h["camera"] == q["camera"] for h in q["results"])
        assert all(h["match"] == (h["identity"] == q["identity"]) for h in q["results"])
        scores = [h["score"] for h in q["results"]]
        assert scores == sorted(scores, reverse=True)
        if q["first_match_rank"] <= 5:
            assert q["results"][q["first_match_rank"] - 1]["match"]
            assert not any(h["match"] for h in q["results"][: q["first_match_rank"] - 1])
        else:
            assert not any(h["match"] for h in q["results"])
    worst = queries[0]
    _decode(client.get(worst["image_url"]))
    _decode(client.get(worst["results"][0]["image_url"]))


# ------------------------------------------------------------------------ page and listings


def test_the_web_page_is_served_with_its_security_headers(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="static/app.js" defer></script>' in page.text
    files = (("/static/app.js", "javascript"), ("/static/style.css", "text/css"), ("/", "text/html"))
    for url, media in files:
        r = client.get(url)
        assert r.status_code == 200 and media in r.headers["content-type"], url
        csp = r.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "default-src 'none'" in csp and "unsafe" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    assert_problem(client.get("/static/missing.js"), 404)
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_items_and_jobs_newest_first(client: TestClient) -> None:
    gallery = create_gallery(client)
    ids = [item["id"] for item in upload(client, gallery["id"], [1, 2, 3])]
    url = f"/v1/galleries/{gallery['id']}/items"
    assert [i["id"] for i in client.get(url).json()["items"]] == ids  # default: oldest first
    page = client.get(url, params={"order": "desc", "limit": 2}).json()
    assert [i["id"] for i in page["items"]] == ids[::-1][:2]
    rest = client.get(url, params={"order": "desc", "limit": 2, "cursor": page["next_cursor"]}).json()
    assert [i["id"] for i in rest["items"]] == ids[:1] and rest["next_cursor"] is None
    assert_problem(client.get(url, params={"order": "newest"}), 422)

    jobs = [_add_evaluation(client, status="failed") for _ in range(3)]
    job_ids = [client.get(f"/v1/evaluations/{ev}").json()["job_id"] for ev in jobs]
    listed = client.get("/v1/jobs", params={"order": "desc", "kind": "evaluate", "limit": 2}).json()
    assert [j["id"] for j in listed["items"]] == job_ids[::-1][:2]
    more = client.get(
        "/v1/jobs", params={"order": "desc", "kind": "evaluate", "limit": 2, "cursor": listed["next_cursor"]}
    ).json()
    assert [j["id"] for j in more["items"]] == job_ids[:1]
    ascending = client.get("/v1/jobs", params={"order": "asc", "kind": "evaluate"}).json()
    assert [j["id"] for j in ascending["items"]] == job_ids
    assert_problem(client.get("/v1/jobs", params={"order": "DESC"}), 422)
