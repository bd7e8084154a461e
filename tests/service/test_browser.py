"""The web page in a real headless browser (Debian's Chromium driven by Selenium) against `reid serve`.

One real service process on 127.0.0.1 (a tiny exported ViT, a synthetic Market-1501 gallery that an
ingestion job fills, two evaluation jobs) and one browser, shared by the tests of this module. The tests
walk the main flow: choose or drop a query image and check the ranked results and their green/red
outlines against the API's own answer, see a refused upload's problem+json title and detail, watch the
gallery page pick up a new ingestion job, open the evaluations with their CMC curves and rank lists, and
keep an API key that the page then sends as a bearer token. No test may leave a JavaScript error.

Screenshots of the three pages and of an evaluation's rank lists go to each test's temporary folder,
and also to ``$REID_SCREENSHOT_DIR`` when set (``REID_SCREENSHOT_DIR=docs/screenshots`` refreshes the
README's).
Without Chromium, its driver or Selenium the tests are skipped, unless ``REID_REQUIRE_BROWSER=1`` (CI)
turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
VIEWPORT = (1200, 800)
SERVER_START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 30.0
WAIT_S = 15.0


def _require_browser() -> tuple[str, str]:
    """Paths of the Chromium binary and of chromedriver; skip (or fail in CI) when missing."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install selenium)")
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None:
        missing.append("Chromium (apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        message = "browser test needs " + ", ".join(missing)
        if os.environ.get("REID_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (REID_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    assert browser is not None and driver is not None
    return browser, driver


# ------------------------------------------------------------------------------------------ service


@dataclass
class Served:
    """A running service with one filled gallery and finished evaluations."""

    base: str
    dataset_root: Path
    gallery: dict[str, Any]
    evaluations: list[dict[str, Any]]
    query_image: Path
    query_pid: int
    expected_matches: int


def _free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls ``check`` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _finished(client: Any, url: str) -> dict[str, Any]:
    """Waits for the job or evaluation at ``url`` to end, and requires that it succeeded."""

    def done() -> dict[str, Any] | None:
        body = client.get(url).json()
        return body if body["status"] not in ("queued", "running") else None

    body = _wait_for(done, JOB_TIMEOUT_S, url)
    assert body["status"] == "succeeded", body
    return body


def _export_tiny_model(out: Path) -> Path:
    """A random two-block ViT, exported in a second.

    Its retrieval quality does not matter (every check compares the page with the API's own answer),
    but unlike the service tests' random CNNs its scores spread, so the screenshots read well.
    """
    import torch

    from training.data.transforms import Preprocess
    from training.export import export_model
    from training.model import ReIDModel

    torch.manual_seed(0)
    model = ReIDModel(
        "vit_small_patch16_224",
        num_classes=0,
        img_size=(64, 32),
        backbone_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2},
    ).eval()
    prep = Preprocess(size=(64, 32), interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return export_model(model, out, kind="person", preprocess=prep)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`reid serve` in a subprocess, with a filled gallery and two finished evaluations."""
    _require_browser()  # before the expensive part
    import httpx

    from training.data.registry import build_dataset
    from training.data.synthetic import write_synthetic

    tmp = tmp_path_factory.mktemp("browser")
    roots = tmp / "datasets"
    # Three cameras and twelve identities: a gallery of a few dozen crops, several per identity.
    market = write_synthetic(
        roots / "market", layout="market1501", ids=12, images_per_id=6, cameras=3, seed=0, progress=False
    )
    model_dir = _export_tiny_model(tmp / "model")
    port = _free_port()
    log = tmp / "server.log"
    cmd = [
        sys.executable, "-m", "reid_cli", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", f"person={model_dir}",
        "--data-dir", str(tmp / "data"),
        "--dataset-root", str(roots),
        "--device", "cpu",
        "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10.0) as client:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"reid serve exited with {proc.returncode}:\n{log.read_text()}")
                try:
                    return client.get("/health/ready").status_code == 200
                except httpx.TransportError:
                    return False

            _wait_for(ready, SERVER_START_TIMEOUT_S, "reid serve to be ready")
            page = client.get("/")
            assert page.status_code == 200 and "text/html" in page.headers.get("content-type", ""), (
                "the service does not serve the web page at / (service/static/index.html): "
                f"GET / answered {page.status_code}"
            )

            gallery = client.post("/v1/galleries", json={"name": "lobby", "model": "person"}).json()
            job = client.post(
                f"/v1/galleries/{gallery['id']}/ingest-jobs",
                json={"source": {"layout": "market1501", "root": str(market), "split": "gallery"}},
            )
            assert job.status_code == 202, job.text
            _finished(client, job.headers["location"])
            locations = []
            for rerank in (False, True):
                ev = client.post(
                    "/v1/evaluations",
                    json={
                        "model": "person",
                        "dataset": {"layout": "market1501", "root": str(market)},
                        "protocol": "market1501",
                        "rerank": rerank,
                    },
                )
                assert ev.status_code == 202, ev.text
                locations.append(ev.headers["location"])
            evaluations = [_finished(client, url) for url in locations]
            gallery = client.get(f"/v1/galleries/{gallery['id']}").json()

        dataset = build_dataset("market1501", market)
        query = dataset.query[0]
        yield Served(
            base=base,
            dataset_root=market,
            gallery=gallery,
            evaluations=evaluations,
            query_image=Path(query.path),
            query_pid=query.pid,
            expected_matches=sum(s.pid == query.pid for s in dataset.gallery),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="module")
def browser(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium through the system chromedriver (never a downloaded one), fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _require_browser()
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--lang=en-US",
        f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # Network events, to see the headers the page sends.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        # The exact CSS viewport, so the screenshots have the same size on every machine.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False},
        )
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    """WebDriverWait with a message that names what was awaited and the page's error banner."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        alert = driver.execute_script(
            "const a = document.getElementById('alert'); return a.hidden ? '' : a.innerText;"
        )
        raise AssertionError(f"timed out waiting for {what}; page error banner: {alert!r}") from None


def _images_loaded(driver: Any, selector: str) -> bool:
    """Whether the images matching ``selector`` exist and have all been decoded."""
    return bool(
        driver.execute_script(
            "const imgs = [...document.querySelectorAll(arguments[0])];"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);",
            selector,
        )
    )


def _screenshot(driver: Any, tmp_path: Path, name: str, *, publish: bool = True, top: bool = True) -> Path:
    """Saves a PNG of the viewport (and, if ``publish``, copies it to $REID_SCREENSHOT_DIR when set)."""
    from PIL import Image

    driver.execute_script("document.activeElement && document.activeElement.blur();")
    if top:
        driver.execute_script("window.scrollTo(0, 0);")
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"screenshot {name} failed"
    with Image.open(path) as img:
        assert img.size == VIEWPORT, img.size
        # A blank or single-colour page would mean the page did not render.
        assert len(img.convert("RGB").resize((200, 133)).getcolors(1 << 16) or []) > 50
    target = os.environ.get("REID_SCREENSHOT_DIR")
    if target and publish:
        Path(target).mkdir(parents=True, exist_ok=True)
        # A 256-colour palette keeps the repository's copies near 100 KB, with no visible change.
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            small = rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            small.save(Path(target) / path.name, optimize=True)
    return path


def _api_search(served: Served, image: Path, **form: str) -> dict[str, Any]:
    """The API's answer to the search the page makes, for comparison."""
    import httpx

    with image.open("rb") as fh:
        answer = httpx.post(
            f"{served.base}/v1/galleries/{served.gallery['id']}/search",
            files={"image": (image.name, fh, "image/jpeg")},
            data=form,
            timeout=10.0,
        )
    assert answer.status_code == 200, answer.text
    return answer.json()


def _result_cards(driver: Any) -> list[dict[str, Any]]:
    """What the results grid shows, card by card, best first."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#results > li')].map(li => ({"
        "  item: Number(li.dataset.itemId), identity: li.dataset.identity,"
        "  match: li.classList.contains('match'), miss: li.classList.contains('miss'),"
        "  outline: getComputedStyle(li).outlineColor, text: li.innerText}));"
    )


def _api_request_headers(driver: Any) -> list[dict[str, str]]:
    """Headers of the /v1 requests the page sent since the last call (from Chromium's network log)."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            if "/v1/" in request["url"]:
                out.append(request["headers"])
    return out


def _search(driver: Any) -> None:
    """Presses Search and waits for the answer (results or an error)."""
    from selenium.webdriver.common.by import By

    driver.execute_script("document.getElementById('results').dataset.state = 'stale';")
    driver.find_element(By.ID, "search-button").click()
    _wait(
        driver,
        lambda d: d.find_element(By.ID, "results").get_attribute("data-state") in ("done", "error"),
        "the search to finish",
    )


def _assert_no_script_errors(driver: Any) -> None:
    """No JavaScript error in the console since the last call (refused requests are expected)."""
    errors = [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]
    assert not errors, errors


def _pct(fraction: float) -> str:
    """A fraction as the page writes it."""
    return f"{100 * fraction:.1f}%"


def _open(driver: Any, served: Served, route: str) -> None:
    """Loads the page afresh at ``route`` (a hash route), so that each test starts from a clean page."""
    from selenium.webdriver.common.by import By

    driver.get(f"{served.base}/{route}")
    driver.refresh()  # a hash-only change would not reload the page
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, ".view:not([hidden])"), "a view")


def _choose_query(driver: Any, image: Path) -> None:
    """Picks the query through the file input, as a keyboard or mouse user would."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "query-file").send_keys(str(image))
    _wait(driver, lambda d: d.find_element(By.ID, "query-preview").is_displayed(), "the query preview")


def _wait_for_gallery_choice(driver: Any) -> Any:
    """The gallery <select> once the page has filled it from GET /v1/galleries."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def loaded(d: Any) -> Any:
        select = Select(d.find_element(By.ID, "gallery-select"))
        return select if select.options and select.options[0].get_attribute("value") else None

    return _wait(driver, loaded, "the gallery list")


def test_search_shows_the_ranked_results_outlined_by_identity(
    served: Served, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    driver, gallery = browser, served.gallery
    _open(driver, served, "")
    assert driver.find_element(By.ID, "view-search").is_displayed()
    assert driver.find_element(By.CSS_SELECTOR, '[data-nav="search"]').get_attribute("aria-current") == "page"
    select = _wait_for_gallery_choice(driver)
    assert [o.get_attribute("value") for o in select.options] == [str(gallery["id"])]
    assert f"{gallery['count']} items" in select.first_selected_option.text

    _choose_query(driver, served.query_image)
    identity = driver.find_element(By.ID, "identity-input")
    assert identity.get_attribute("value") == str(served.query_pid), "identity not read from the file name"
    k = driver.find_element(By.ID, "k-input")
    k.clear()
    k.send_keys(str(gallery["count"]))  # the whole gallery: every item of the identity must be green
    _search(driver)
    _wait(driver, lambda d: _images_loaded(d, "#results img"), "the result thumbnails")
    cards = _result_cards(driver)
    api = _api_search(served, served.query_image, k=str(gallery["count"]))["queries"][0]["results"]
    assert [c["item"] for c in cards] == [hit["item_id"] for hit in api]
    assert len(cards) == gallery["count"]
    for card, hit in zip(cards, api, strict=True):
        same = hit["identity"] == str(served.query_pid)
        assert (card["match"], card["miss"]) == (same, not same), card
        assert f"{hit['score']:.3f}" in card["text"]
        assert hit["identity"] in card["text"] and hit["camera"] in card["text"]
    assert sum(c["match"] for c in cards) == served.expected_matches > 0
    assert len({c["outline"] for c in cards}) == 2, "matches and non-matches must look different"
    summary = driver.find_element(By.ID, "results-summary").text
    assert f"{served.expected_matches} of identity {served.query_pid}" in summary
    _screenshot(driver, tmp_path, "search")

    # A camera filter reaches the server: the page shows what the API answers for that filter.
    camera = api[0]["camera"]
    driver.find_element(By.ID, "cameras-input").send_keys(camera)
    _search(driver)
    filtered = _result_cards(driver)
    expected = _api_search(served, served.query_image, k=str(gallery["count"]), cameras=camera)
    assert [c["item"] for c in filtered] == [h["item_id"] for h in expected["queries"][0]["results"]]
    assert 0 < len(filtered) < len(cards)
    _assert_no_script_errors(driver)


DROP_SCRIPT = """
const [url, name, type, done] = arguments;
fetch(url).then(r => r.blob()).then(blob => {
  const transfer = new DataTransfer();
  transfer.items.add(new File([blob], name, {type}));
  const drop = document.getElementById('drop');
  drop.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true, cancelable: true}));
  drop.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
  done(true);
}, err => done(String(err)));
"""


def test_search_accepts_a_dropped_image(served: Served, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    driver, gallery = browser, served.gallery
    _open(driver, served, "#/search")
    _wait_for_gallery_choice(driver)
    # Drop a gallery item's own thumbnail: it must come back first, as its own nearest neighbour.
    item = _api_search(served, served.query_image, k="1")["queries"][0]["results"][0]
    name = "0099_c1s1_000001_01.jpg"  # Market-1501-style name: identity 99 is guessed from it
    assert driver.execute_async_script(DROP_SCRIPT, item["thumbnail_url"], name, "image/jpeg") is True
    _wait(driver, lambda d: d.find_element(By.ID, "query-preview").is_displayed(), "the dropped image")
    assert name in driver.find_element(By.ID, "query-name").text
    assert driver.find_element(By.ID, "identity-input").get_attribute("value") == "99"
    _search(driver)
    cards = _result_cards(driver)
    assert cards and cards[0]["item"] == item["item_id"], cards[:3]
    assert not any(c["match"] for c in cards)  # nothing in the gallery is identity 99: all red
    assert len(cards) == min(10, gallery["count"])  # the default k

    # Something that is not an image is refused in the page, before any upload.
    assert driver.execute_async_script(DROP_SCRIPT, "/openapi.json", "notes.txt", "text/plain") is True
    assert driver.find_element(By.ID, "alert-title").text == "Not an image"
    assert name in driver.find_element(By.ID, "query-name").text  # the previous query is kept
    _assert_no_script_errors(driver)


def test_search_shows_the_problem_details_of_a_refused_upload(
    served: Served, browser: Any, tmp_path: Path
) -> None:
    import httpx
    from selenium.webdriver.common.by import By

    driver = browser
    fake = tmp_path / "not-an-image.jpg"
    fake.write_text("this is text, not a JPEG")
    with fake.open("rb") as fh:
        problem = httpx.post(
            f"{served.base}/v1/galleries/{served.gallery['id']}/search",
            files={"image": (fake.name, fh, "image/jpeg")},
            timeout=10.0,
        )
    assert 400 <= problem.status_code < 500, problem.text
    assert problem.headers["content-type"].startswith("application/problem+json")

    _open(driver, served, "#/search")
    _wait_for_gallery_choice(driver)
    driver.find_element(By.ID, "query-file").send_keys(str(fake))
    _search(driver)
    alert = driver.find_element(By.ID, "alert")
    assert alert.is_displayed()
    assert driver.find_element(By.ID, "alert-title").text == problem.json()["title"]
    assert driver.find_element(By.ID, "alert-detail").text == problem.json()["detail"]
    assert driver.find_elements(By.CSS_SELECTOR, "#results > li") == []
    driver.find_element(By.ID, "alert-close").click()
    assert not alert.is_displayed()
    _assert_no_script_errors(driver)


def test_gallery_page_shows_counts_jobs_and_new_jobs_live(
    served: Served, browser: Any, tmp_path: Path
) -> None:
    import httpx
    from selenium.webdriver.common.by import By

    driver, gallery = browser, served.gallery
    _open(driver, served, "#/search")
    driver.find_element(By.CSS_SELECTOR, '[data-nav="galleries"]').click()
    _wait(driver, lambda d: d.find_elements(By.LINK_TEXT, gallery["name"]), "the gallery list")[0].click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs-table tr[data-job-id]"), "the jobs")
    assert driver.current_url.endswith(f"#/galleries/{gallery['id']}")
    assert driver.find_element(By.ID, "gallery-title").text == gallery["name"]
    assert driver.find_element(By.ID, "gallery-count").text == str(gallery["count"])
    first_job = driver.find_element(By.CSS_SELECTOR, "#jobs-table tr[data-job-id]")
    assert first_job.get_attribute("data-status") == "succeeded"
    assert f"{gallery['count']} / {gallery['count']} (100%)" in first_job.text
    _wait(driver, lambda d: _images_loaded(d, "#recent-items img"), "the recent items")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#recent-items img")) == min(24, gallery["count"])
    _screenshot(driver, tmp_path, "gallery")

    # A job started elsewhere appears without a reload, and its progress ends at succeeded.
    again = httpx.post(
        f"{served.base}/v1/galleries/{gallery['id']}/ingest-jobs",
        json={"source": {"layout": "market1501", "root": str(served.dataset_root), "split": "gallery"}},
        timeout=10.0,
    )
    assert again.status_code == 202, again.text
    row = f'#jobs-table tr[data-job-id="{again.json()["id"]}"][data-status="succeeded"]'
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, row), "the new job to appear as succeeded")
    _assert_no_script_errors(driver)


def test_evaluation_pages_show_the_table_the_cmc_curves_and_rank_lists(
    served: Served, browser: Any, tmp_path: Path
) -> None:
    import httpx
    from selenium.webdriver.common.by import By

    driver = browser
    _open(driver, served, "#/search")
    driver.find_element(By.CSS_SELECTOR, '[data-nav="evaluations"]').click()
    rows = "#evaluations-table tr[data-evaluation-id]"
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, rows)) == len(served.evaluations), "rows")
    for ev in served.evaluations:
        row = driver.find_element(By.CSS_SELECTOR, f'#evaluations-table tr[data-evaluation-id="{ev["id"]}"]')
        assert row.get_attribute("data-status") == "succeeded"
        assert row.find_element(By.CSS_SELECTOR, '[data-metric="mAP"]').text == _pct(ev["result"]["mAP"])
        assert row.find_element(By.CSS_SELECTOR, '[data-metric="rank1"]').text == _pct(
            ev["result"]["cmc"]["1"]
        )
    curves = driver.find_elements(By.CSS_SELECTOR, "#cmc-plot svg polyline")
    assert len(curves) == len(served.evaluations)
    _screenshot(driver, tmp_path, "evaluation")
    # Unticking a row removes its curve; ticking it again brings it back.
    box = "#evaluations-table tbody input[type=checkbox]"
    driver.find_element(By.CSS_SELECTOR, box).click()
    assert len(driver.find_elements(By.CSS_SELECTOR, "#cmc-plot svg polyline")) == len(served.evaluations) - 1
    driver.find_element(By.CSS_SELECTOR, box).click()
    assert len(driver.find_elements(By.CSS_SELECTOR, "#cmc-plot svg polyline")) == len(served.evaluations)

    ev = served.evaluations[0]
    driver.find_element(By.LINK_TEXT, f"#{ev['id']}").click()
    _wait(driver, lambda d: d.find_elements(By.ID, "evaluation-map"), "the evaluation's numbers")
    assert driver.current_url.endswith(f"#/evaluations/{ev['id']}")
    assert driver.find_element(By.ID, "evaluation-map").text == _pct(ev["result"]["mAP"])
    points = driver.find_element(By.CSS_SELECTOR, "#evaluation-cmc svg polyline").get_attribute("points")
    assert len(points.split()) == len(ev["result"]["cmc_curve"])

    def rank_lists_settled(d: Any) -> bool:
        return d.find_element(By.ID, "worst-queries").get_attribute("data-state") in ("done", "unavailable")

    _wait(driver, rank_lists_settled, "the rank lists")
    # The page shows the API's worst queries (the page asks for 8 queries of 10 results), in its order,
    # each result outlined as the API says.
    worst = httpx.get(
        f"{served.base}/v1/evaluations/{ev['id']}/worst-queries", params={"limit": 8, "k": 10}, timeout=10.0
    ).json()["queries"]
    ranklists = driver.find_elements(By.CSS_SELECTOR, "#worst-queries .ranklist")
    assert ranklists, "the service has rank lists but the page shows none"
    assert len(ranklists) == len(worst)
    for ranklist, query in zip(ranklists, worst, strict=True):
        assert f"AP {_pct(query['ap'])}" in ranklist.text
        assert f"first match at rank {query['first_match_rank']}" in ranklist.text
        ranked = ranklist.find_elements(By.CSS_SELECTOR, ".ranked > li")
        assert 0 < len(ranked) <= 10
        assert [li.get_attribute("data-match") for li in ranked] == [
            "true" if hit["match"] else "false" for hit in query["results"]
        ]
    # Crops load lazily: bring the first rank list into view, then its crops must load.
    driver.execute_script("document.querySelector('#worst-queries .ranklist').scrollIntoView();")
    first = "#worst-queries .ranklist:first-child img"
    _wait(driver, lambda d: _images_loaded(d, first), "the rank-list crops")
    # The screenshot starts at the section's heading, with the crops of the rank lists in view loaded.
    driver.execute_script("document.getElementById('worst-title').scrollIntoView();")
    shown = "#worst-queries .ranklist:nth-child(-n+3) img"
    _wait(driver, lambda d: _images_loaded(d, shown), "the crops of the rank lists in view")
    _screenshot(driver, tmp_path, "evaluation-detail", top=False)
    _assert_no_script_errors(driver)


def test_api_key_is_stored_and_sent_as_a_bearer_token(served: Served, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    _open(driver, served, "#/evaluations")
    driver.get_log("performance")  # drop the network events so far
    driver.find_element(By.ID, "api-key").send_keys("test-key-123")
    driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    assert driver.execute_script("return localStorage.getItem('reid.apiKey');") == "test-key-123"
    sent = _wait(driver, _api_request_headers, "an API request after saving the key")
    assert all(h.get("Authorization") == "Bearer test-key-123" for h in sent), sent
    driver.refresh()  # the key survives a reload
    _wait(driver, lambda d: d.find_element(By.ID, "key-state").text == "key set", "the stored key")
    assert driver.find_element(By.ID, "api-key").get_attribute("value") == "test-key-123"
    driver.find_element(By.ID, "key-clear").click()
    assert driver.execute_script("return localStorage.getItem('reid.apiKey');") is None
    driver.get_log("performance")
    driver.refresh()
    sent = _wait(driver, _api_request_headers, "an API request without a key")
    assert all("Authorization" not in h for h in sent), sent
    _assert_no_script_errors(driver)
