/*
 * The service's web page: query by image, galleries with live ingestion progress, evaluations with
 * CMC curves and rank lists. Plain JavaScript talking to the REST API under /v1; hash routes:
 *   #/search[?gallery=ID]   #/galleries   #/galleries/ID   #/evaluations   #/evaluations/ID
 * No build step and no third-party code, so the page works on a machine without internet.
 */
(() => {
  "use strict";

  const KEY_STORAGE = "reid.apiKey";
  const GALLERY_STORAGE = "reid.gallery";
  const QUERY_TYPES = ["image/jpeg", "image/png", "image/webp"];
  const RECENT_ITEMS = 24;
  const JOBS_SHOWN = 20;
  const WORST_QUERIES = 8;
  const RANK_LIST_LENGTH = 10;
  const PLOTTED_BY_DEFAULT = 5;
  const ACTIVE_POLL_MS = 1000; // while a job or evaluation runs
  const IDLE_POLL_MS = 3000; // otherwise, to notice work started by someone else
  // Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
  const PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#8C8C8C"];

  // ------------------------------------------------------------------------------------ helpers

  const $ = (selector, root = document) => root.querySelector(selector);

  /** Creates an element: el("li", {class: "card", dataset: {id: 3}}, child, "text", ...). */
  function el(tag, attrs = {}, ...children) {
    const node = tag === "svg" || SVG_TAGS.has(tag)
      ? document.createElementNS("http://www.w3.org/2000/svg", tag)
      : document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "dataset") Object.assign(node.dataset, value);
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const SVG_TAGS = new Set(["g", "line", "polyline", "circle", "text", "title", "desc", "rect", "path"]);

  function storageGet(name) {
    try {
      return window.localStorage.getItem(name) || "";
    } catch {
      return ""; // storage disabled (private mode, policy): the page works without it
    }
  }

  function storageSet(name, value) {
    try {
      if (value) window.localStorage.setItem(name, value);
      else window.localStorage.removeItem(name);
    } catch {
      /* see storageGet */
    }
  }

  const apiKey = () => storageGet(KEY_STORAGE);

  const pct = (value) => (typeof value === "number" ? `${(100 * value).toFixed(1)}%` : "–");

  function pctStd(result, key, rank) {
    if (!result) return "–";
    const value = rank === undefined ? result[key] : result.cmc && result.cmc[rank];
    const stdSource = rank === undefined ? result[`${key}_std`] : result.cmc_std && result.cmc_std[rank];
    const text = pct(value);
    return typeof stdSource === "number" ? `${text} ± ${(100 * stdSource).toFixed(1)}` : text;
  }

  function duration(seconds) {
    if (typeof seconds !== "number") return "–";
    if (seconds < 1) return `${seconds.toFixed(2)} s`;
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  function when(iso) {
    if (!iso) return "–";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
  }

  /** Identities compare as text, except that "0007" and "7" are the same numbered identity. */
  function sameIdentity(a, b) {
    if (a === null || a === undefined || b === null || b === undefined) return false;
    const x = String(a).trim();
    const y = String(b).trim();
    if (/^-?\d+$/.test(x) && /^-?\d+$/.test(y)) return Number(x) === Number(y);
    return x === y;
  }

  // Polled views re-render only what changed: no DOM churn for screen readers, no lost focus.
  const lastRendered = new WeakMap();

  function changed(node, data) {
    const signature = JSON.stringify(data);
    if (lastRendered.get(node) === signature) return false;
    lastRendered.set(node, signature);
    return true;
  }

  function statusPill(status, title) {
    return el("span", { class: `pill status-${status}`, title }, status);
  }

  // -------------------------------------------------------------------------------- API access

  class ApiError extends Error {
    constructor(status, title, detail) {
      super(detail ? `${title}: ${detail}` : title);
      this.status = status;
      this.title = title;
      this.detail = detail;
    }
  }

  /** Calls the API; rejects with an ApiError carrying the problem+json title and detail. */
  async function api(path, { method = "GET", json, form } = {}) {
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form) {
      body = form; // the browser sets the multipart boundary
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body });
    } catch (err) {
      throw new ApiError(0, "Service unreachable", `No answer from the service (${err.message}). Is it running?`);
    }
    if (response.status === 204) return null;
    const type = response.headers.get("content-type") || "";
    const data = type.includes("json") ? await response.json().catch(() => null) : null;
    if (!response.ok) {
      let title = (data && data.title) || `HTTP ${response.status}`;
      let detail = (data && data.detail) || response.statusText || "";
      if (response.status === 401 || response.status === 403) {
        if (!(data && data.title)) title = "Not allowed";
        if (!key) detail = `${detail} Set an API key at the top of the page.`.trim();
      }
      throw new ApiError(response.status, title, detail);
    }
    return data;
  }

  /** Every item of a cursor-paginated listing (at most maxPages pages). */
  async function listAll(path, { limit = 200, maxPages = 10 } = {}) {
    const items = [];
    let cursor = null;
    for (let page = 0; page < maxPages; page += 1) {
      const sep = path.includes("?") ? "&" : "?";
      const url = `${path}${sep}limit=${limit}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`;
      const data = await api(url);
      items.push(...data.items);
      cursor = data.next_cursor;
      if (!cursor) break;
    }
    return items;
  }

  // Images need the API key too when authentication is on; an <img src> cannot send a header, so
  // with a key the bytes are fetched and shown through an object URL (released on every new view).
  const objectUrls = new Set();

  function releaseImages() {
    for (const url of objectUrls) URL.revokeObjectURL(url);
    objectUrls.clear();
  }

  function showImage(img, url) {
    img.addEventListener("error", () => img.classList.add("broken"), { once: true });
    const key = apiKey();
    if (!key) {
      img.src = url;
      return;
    }
    fetch(url, { headers: { Authorization: `Bearer ${key}` } })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
      .then((blob) => {
        const objectUrl = URL.createObjectURL(blob);
        objectUrls.add(objectUrl);
        img.src = objectUrl;
      })
      .catch(() => img.classList.add("broken"));
  }

  function thumb(url, alt, extraClass = "") {
    const img = el("img", { class: `thumb ${extraClass}`.trim(), alt, loading: "lazy", decoding: "async" });
    showImage(img, url);
    return img;
  }

  // ------------------------------------------------------------------------------- error banner

  function showError(err, fallbackTitle = "Something went wrong") {
    const title = err instanceof ApiError ? err.title : fallbackTitle;
    const detail = err instanceof ApiError ? err.detail : String((err && err.message) || err);
    $("#alert-title").textContent = title;
    $("#alert-detail").textContent = detail || "";
    $("#alert").hidden = false;
  }

  function clearError() {
    $("#alert").hidden = true;
    $("#alert-title").textContent = "";
    $("#alert-detail").textContent = "";
  }

  // ------------------------------------------------------------------------- routing and polling

  let generation = 0; // bumped on every navigation: a stale poll or response sees it and stops
  let pollTimer = null;

  function stopPolling() {
    if (pollTimer !== null) window.clearTimeout(pollTimer);
    pollTimer = null;
  }

  /**
   * Runs `step` now, then again after the delay (ms) it resolves to, while the view is current.
   * A step resolving to 0 stops; an error is shown and stops too.
   */
  function poll(step) {
    const mine = generation;
    const run = async () => {
      pollTimer = null;
      let delay = 0;
      try {
        delay = await step();
      } catch (err) {
        if (mine === generation) showError(err);
      }
      if (delay && mine === generation) pollTimer = window.setTimeout(run, delay);
    };
    return run();
  }

  const ROUTES = [
    [/^\/search$/, (m, params) => showSearch(params)],
    [/^\/galleries$/, () => showGalleries()],
    [/^\/galleries\/(\d+)$/, (m) => showGallery(Number(m[1]))],
    [/^\/evaluations$/, () => showEvaluations()],
    [/^\/evaluations\/(\d+)$/, (m) => showEvaluation(Number(m[1]))],
  ];

  function route(focus) {
    const hash = window.location.hash || "#/search";
    if (!hash.startsWith("#/")) return;
    const [path, query = ""] = hash.slice(1).split("?");
    for (const [pattern, handler] of ROUTES) {
      const match = pattern.exec(path);
      if (!match) continue;
      generation += 1;
      stopPolling();
      releaseImages();
      clearError();
      const section = path.split("/")[1];
      for (const link of document.querySelectorAll("[data-nav]")) {
        if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
        else link.removeAttribute("aria-current");
      }
      for (const view of document.querySelectorAll(".view")) view.hidden = true;
      const view = handler(match, new URLSearchParams(query));
      view.hidden = false;
      const heading = $("h1", view);
      document.title = `${heading.textContent} · reid`;
      if (focus) heading.focus();
      return;
    }
    window.location.replace("#/search");
  }

  // ------------------------------------------------------------------------------------- search

  const search = { file: null, previewUrl: null, galleries: [], guessedIdentity: "" };

  async function loadGalleryChoices(wanted) {
    const select = $("#gallery-select");
    const galleries = await listAll("v1/galleries");
    search.galleries = galleries;
    const previous = wanted || select.value || storageGet(GALLERY_STORAGE);
    select.replaceChildren();
    if (!galleries.length) {
      select.append(el("option", { value: "", text: "No gallery yet" }));
      select.disabled = true;
      $("#results-summary").textContent =
        "There is no gallery yet: create one (POST /v1/galleries) and fill it with an ingestion job.";
      return;
    }
    select.disabled = false;
    for (const g of galleries) {
      select.append(el("option", { value: g.id }, `${g.name} (${g.count} items, ${g.model})`));
    }
    if (galleries.some((g) => String(g.id) === String(previous))) select.value = String(previous);
  }

  function showSearch(params) {
    const mine = generation;
    loadGalleryChoices(params.get("gallery")).catch((err) => {
      if (mine === generation) showError(err);
    });
    return $("#view-search");
  }

  function setQueryFile(file) {
    if (!file) return;
    if (file.type && !QUERY_TYPES.includes(file.type)) {
      showError(new ApiError(0, "Not an image", `${file.name} is not a JPEG, PNG or WebP image.`));
      return;
    }
    clearError();
    search.file = file;
    if (search.previewUrl) URL.revokeObjectURL(search.previewUrl);
    search.previewUrl = URL.createObjectURL(file);
    const kib = `${Math.ceil(file.size / 1024)} KiB`;
    const name = $("#query-name");
    const preview = $("#query-preview");
    name.textContent = `${file.name} · ${kib}`;
    preview.onload = () => {
      name.textContent = `${file.name} · ${preview.naturalWidth}×${preview.naturalHeight} px · ${kib}`;
    };
    preview.onerror = () => {
      name.textContent = `${file.name} · ${kib} · the browser cannot display it`;
    };
    preview.alt = `Query image ${file.name}`;
    preview.src = search.previewUrl;
    preview.hidden = false;
    $("#drop").dataset.state = "ready";
    // Market-1501-style names start with the identity ("0007_c2s1_..."): a convenient default, which
    // replaces an earlier guess but never what the user typed.
    const identity = $("#identity-input");
    const named = /^(\d{4})_c\d/.exec(file.name);
    const guess = named ? String(Number(named[1])) : "";
    if (!identity.value || identity.value === search.guessedIdentity) identity.value = guess;
    search.guessedIdentity = guess;
  }

  function isoFromLocal(value) {
    if (!value) return null;
    const date = new Date(value); // datetime-local is the browser's local time
    return Number.isNaN(date.getTime()) ? null : date.toISOString();
  }

  async function runSearch(event) {
    event.preventDefault();
    clearError();
    const galleryId = $("#gallery-select").value;
    if (!galleryId) {
      showError(new ApiError(0, "No gallery", "Choose a gallery to search."));
      return;
    }
    if (!search.file) {
      showError(new ApiError(0, "No query image", "Drop a query image or choose a file first."));
      $("#query-file").focus();
      return;
    }
    storageSet(GALLERY_STORAGE, galleryId);
    const form = new FormData();
    form.append("image", search.file, search.file.name);
    const k = $("#k-input").value.trim();
    if (k) form.append("k", k);
    const cameras = $("#cameras-input").value.trim();
    if (cameras) form.append("cameras", cameras);
    const from = isoFromLocal($("#time-from").value);
    const to = isoFromLocal($("#time-to").value);
    if (from) form.append("time_from", from);
    if (to) form.append("time_to", to);
    if ($("#rerank-input").checked) form.append("rerank", "true");

    const button = $("#search-button");
    const list = $("#results");
    const mine = generation;
    button.disabled = true;
    list.setAttribute("aria-busy", "true");
    list.dataset.state = "loading";
    $("#results-summary").textContent = "Searching…";
    const started = performance.now();
    try {
      const data = await api(`v1/galleries/${galleryId}/search`, { method: "POST", form });
      if (mine !== generation) return;
      const gallery = search.galleries.find((g) => String(g.id) === galleryId);
      renderResults(data, gallery, performance.now() - started);
    } catch (err) {
      if (mine !== generation) return;
      list.replaceChildren();
      list.dataset.state = "error";
      $("#results-summary").textContent = "The search failed.";
      showError(err);
    } finally {
      button.disabled = false;
      list.setAttribute("aria-busy", "false");
    }
  }

  function renderResults(data, gallery, ms) {
    releaseImages();
    const list = $("#results");
    const hits = (data.queries[0] && data.queries[0].results) || [];
    const identity = $("#identity-input").value.trim();
    const withTimes = hits.some((hit) => hit.captured_at); // no empty "Time" rows for untimed galleries
    let matches = 0;
    const cards = hits.map((hit, index) => {
      const rank = index + 1;
      const known = identity !== "";
      const match = known && sameIdentity(hit.identity, identity);
      if (match) matches += 1;
      const verdict = known ? (match ? "same identity" : "other identity") : "";
      const alt = `Rank ${rank}: identity ${hit.identity ?? "unknown"}, camera ${hit.camera ?? "unknown"}`;
      return el(
        "li",
        {
          class: `card${known ? (match ? " match" : " miss") : ""}`,
          dataset: { itemId: hit.item_id, identity: hit.identity ?? "", rank },
        },
        el("div", { class: "card-media" },
          thumb(hit.thumbnail_url, verdict ? `${alt}, ${verdict}` : alt),
          el("span", { class: "rank", "aria-hidden": "true" }, `#${rank}`),
          known ? el("span", { class: "verdict", "aria-hidden": "true", title: verdict }, match ? "✓" : "✗") : null),
        el("dl", { class: "meta" },
          el("div", {}, el("dt", {}, "Score"), el("dd", { class: "score" }, hit.score.toFixed(3))),
          el("div", {}, el("dt", {}, "Identity"), el("dd", {}, hit.identity ?? "–")),
          el("div", {}, el("dt", {}, "Camera"), el("dd", {}, hit.camera ?? "–")),
          withTimes ? el("div", {}, el("dt", {}, "Time"), el("dd", {}, when(hit.captured_at))) : null)
      );
    });
    list.replaceChildren(...cards);
    list.dataset.state = "done";
    const where = gallery ? ` in ${gallery.name}` : "";
    let text = `${hits.length} result${hits.length === 1 ? "" : "s"}${where} · model ${data.model}@${data.model_version} · ${Math.round(ms)} ms`;
    if (identity) text += ` · ${matches} of identity ${identity}`;
    if (!hits.length) text = `No result${where}: the gallery is empty or the filters exclude everything.`;
    $("#results-summary").textContent = text;
  }

  function wireSearch() {
    const drop = $("#drop");
    const input = $("#query-file");
    input.addEventListener("change", () => setQueryFile(input.files[0]));
    for (const name of ["dragenter", "dragover"]) {
      drop.addEventListener(name, (event) => {
        event.preventDefault();
        drop.classList.add("dragging");
      });
    }
    for (const name of ["dragleave", "dragend"]) drop.addEventListener(name, () => drop.classList.remove("dragging"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("dragging");
      const file = event.dataTransfer && event.dataTransfer.files[0];
      if (file) setQueryFile(file);
    });
    $("#search-form").addEventListener("submit", runSearch);
  }

  // ---------------------------------------------------------------------------------- galleries

  function showGalleries() {
    const mine = generation;
    const box = $("#galleries-list");
    box.replaceChildren(el("p", { class: "muted" }, "Loading…"));
    listAll("v1/galleries")
      .then((galleries) => {
        if (mine !== generation) return;
        if (!galleries.length) {
          box.replaceChildren(el("p", { class: "muted" }, "No gallery yet. Create one with POST /v1/galleries."));
          return;
        }
        box.replaceChildren(...galleries.map((g) => el("article", { class: "gallery-card" },
          el("h2", {}, el("a", { href: `#/galleries/${g.id}` }, g.name)),
          el("p", { class: "big" }, `${g.count.toLocaleString()} items`),
          el("p", { class: "muted" }, `${g.kind} · ${g.model}@${g.model_version} · ${g.index.backend} ${g.index.spec}`),
          el("p", {}, el("a", { href: `#/search?gallery=${g.id}` }, "Search"), " · ",
            el("a", { href: `#/galleries/${g.id}` }, "Jobs and items")))));
      })
      .catch((err) => {
        if (mine !== generation) return;
        box.replaceChildren();
        showError(err);
      });
    return $("#view-galleries");
  }

  function stat(term, ...value) {
    return el("div", {}, el("dt", {}, term), el("dd", {}, ...value));
  }

  function renderGalleryStats(g) {
    $("#gallery-title").textContent = g.name;
    document.title = `${g.name} · reid`;
    const snap = g.last_snapshot;
    $("#gallery-stats").replaceChildren(...[
      stat("Items", el("span", { class: "big", id: "gallery-count" }, g.count.toLocaleString())),
      stat("Model", `${g.model}@${g.model_version}`),
      stat("Kind", `${g.kind}, ${g.dim}-d embeddings`),
      stat("Index", `${g.index.backend} ${g.index.spec}, ${g.index.size ?? "–"} vectors`),
      stat("Last snapshot", snap ? `${snap.count} vectors at ${when(snap.created_at)}` : "none yet"),
      g.standby ? stat("Standby model", `${g.standby.model}@${g.standby.model_version} (${g.standby.ready ? "ready" : "building"})`) : null,
      stat("Created", when(g.created_at)),
    ].filter(Boolean));
    $("#gallery-search-link").href = `#/search?gallery=${g.id}`;
  }

  function jobRow(job) {
    const active = job.status === "queued" || job.status === "running";
    const processed = job.done + job.failed;
    const progress = job.total
      ? el("progress", { max: job.total, value: Math.min(processed, job.total), "aria-label": `Job ${job.id} progress` })
      : el("progress", { "aria-label": `Job ${job.id} progress (size not known yet)` });
    const share = job.total ? ` (${Math.floor((100 * processed) / job.total)}%)` : "";
    const cancel = active
      ? el("button", {
        type: "button",
        class: "small secondary",
        "aria-label": `Cancel job ${job.id}`,
        onclick: (event) => {
          event.currentTarget.disabled = true;
          api(`v1/jobs/${job.id}/cancel`, { method: "POST" }).catch(showError);
        },
      }, job.cancel_requested ? "Cancelling…" : "Cancel")
      : null;
    if (cancel && job.cancel_requested) cancel.disabled = true;
    return el("tr", { dataset: { jobId: job.id, status: job.status } },
      el("th", { scope: "row" }, `#${job.id}`),
      el("td", {}, job.kind),
      el("td", {}, statusPill(job.status, job.error || undefined)),
      el("td", { class: "progress-cell" }, progress,
        el("span", { class: "progress-text" }, `${job.done.toLocaleString()} / ${job.total === null ? "?" : job.total.toLocaleString()}${share}`)),
      el("td", { class: "num" }, job.failed ? el("span", { class: "bad-text" }, job.failed) : "0"),
      el("td", { class: "num" }, job.rate ? `${job.rate.toFixed(job.rate < 10 ? 1 : 0)}/s` : "–"),
      el("td", { class: "num" }, active && typeof job.eta_s === "number" ? duration(job.eta_s) : "–"),
      el("td", {}, when(job.created_at)),
      el("td", {}, cancel));
  }

  async function loadRecentItems(galleryId) {
    const page = await api(`v1/galleries/${galleryId}/items?limit=${RECENT_ITEMS}&order=desc`);
    const items = page.items; // newest first
    const grid = $("#recent-items");
    if (!items.length) {
      grid.replaceChildren(el("li", { class: "muted" }, "No item yet."));
      return;
    }
    grid.replaceChildren(...items.map((it) => el("li", { class: "card small-card", dataset: { itemId: it.id } },
      el("div", { class: "card-media" },
        thumb(it.thumbnail_url, `Item ${it.id}: identity ${it.identity ?? "unknown"}, camera ${it.camera ?? "unknown"}`)),
      el("p", { class: "caption" }, `id ${it.identity ?? "–"} · cam ${it.camera ?? "–"}`))));
  }

  function showGallery(galleryId) {
    const mine = generation;
    $("#gallery-title").textContent = `Gallery ${galleryId}`;
    for (const node of [$("#gallery-stats"), $("#jobs-table tbody"), $("#recent-items")]) {
      node.replaceChildren();
      lastRendered.delete(node);
    }
    let lastSignature = null;
    poll(async () => {
      // One page, newest first: polled every second, it must not grow with the gallery's history.
      const [gallery, jobs] = await Promise.all([
        api(`v1/galleries/${galleryId}`),
        api(`v1/jobs?gallery_id=${galleryId}&order=desc&limit=${JOBS_SHOWN}`),
      ]);
      if (mine !== generation) return 0;
      if (changed($("#gallery-stats"), gallery)) renderGalleryStats(gallery);
      const newest = jobs.items;
      const body = $("#jobs-table tbody");
      if (changed(body, newest)) {
        // Progress re-renders the rows every second: keep the keyboard focus on its job's button.
        const focusedJob = document.activeElement && document.activeElement.closest("tr[data-job-id]");
        body.replaceChildren(...(newest.length
          ? newest.map(jobRow)
          : [el("tr", {}, el("td", { colspan: 9, class: "muted" }, "No job has run on this gallery."))]));
        const again = focusedJob && body.querySelector(`tr[data-job-id="${focusedJob.dataset.jobId}"] button`);
        if (again) again.focus();
      }
      // Thumbnails are reloaded only when the gallery changed, not on every progress tick.
      const signature = `${gallery.count}/${gallery.index.size}`;
      if (signature !== lastSignature) {
        lastSignature = signature;
        await loadRecentItems(galleryId);
      }
      // Fast while a job runs; slower when idle, still picking up jobs started elsewhere.
      return newest.some((j) => j.status === "queued" || j.status === "running") ? ACTIVE_POLL_MS : IDLE_POLL_MS;
    });
    return $("#view-gallery");
  }

  // -------------------------------------------------------------------------------- evaluations

  const plotted = new Set(); // evaluation ids whose CMC curve is drawn
  let plottedChosen = false; // the user ticked or unticked a row: keep their choice

  const evaluationLabel = (ev) => `#${ev.id} ${ev.model}${ev.rerank ? " + re-rank" : ""} on ${datasetName(ev)}`;

  function datasetName(ev) {
    return (ev.result && ev.result.dataset) || (ev.dataset && ev.dataset.layout) || "?";
  }

  function evaluationRow(ev) {
    const r = ev.result;
    const done = ev.status === "succeeded" && r;
    const box = el("input", {
      type: "checkbox",
      "aria-label": `Plot the CMC curve of evaluation ${ev.id}`,
      checked: plotted.has(ev.id),
      disabled: !done,
      onchange: (event) => {
        plottedChosen = true;
        if (event.currentTarget.checked) plotted.add(ev.id);
        else plotted.delete(ev.id);
        drawOverlay();
      },
    });
    return el("tr", { dataset: { evaluationId: ev.id, status: ev.status } },
      el("td", {}, box),
      el("th", { scope: "row" }, el("a", { href: `#/evaluations/${ev.id}` }, `#${ev.id}`)),
      el("td", {}, ev.model, el("span", { class: "muted version" }, ev.model_version)),
      el("td", { title: ev.dataset && ev.dataset.root }, datasetName(ev)),
      el("td", {}, ev.protocol, ev.rerank ? el("span", { class: "muted" }, " + re-rank") : null),
      el("td", { class: "num", dataset: { metric: "mAP" } }, done ? pctStd(r, "mAP") : "–"),
      el("td", { class: "num", dataset: { metric: "rank1" } }, done ? pctStd(r, "cmc", "1") : "–"),
      el("td", { class: "num" }, done ? pctStd(r, "cmc", "5") : "–"),
      el("td", { class: "num" }, done ? pctStd(r, "cmc", "10") : "–"),
      el("td", { class: "num" }, done ? pctStd(r, "mINP") : "–"),
      el("td", { class: "num" }, duration(ev.duration_s)),
      el("td", {}, statusPill(ev.status, ev.error || undefined)));
  }

  let evaluations = [];

  function drawOverlay() {
    const series = evaluations
      .filter((ev) => plotted.has(ev.id) && ev.result && ev.result.cmc_curve)
      .map((ev) => ({ label: evaluationLabel(ev), curve: ev.result.cmc_curve }));
    cmcPlot($("#cmc-plot"), series, "CMC curves of the ticked evaluations", { width: 1000, height: 320 });
  }

  function showEvaluations() {
    const mine = generation;
    const body = $("#evaluations-table tbody");
    body.replaceChildren(el("tr", {}, el("td", { colspan: 12, class: "muted" }, "Loading…")));
    lastRendered.delete(body);
    poll(async () => {
      const rows = await listAll("v1/evaluations");
      if (mine !== generation) return 0;
      evaluations = rows.sort((a, b) => b.id - a.id);
      if (!plottedChosen) {
        plotted.clear();
        for (const ev of evaluations.filter((e) => e.status === "succeeded").slice(0, PLOTTED_BY_DEFAULT)) {
          plotted.add(ev.id);
        }
      }
      if (changed(body, [evaluations, [...plotted]])) {
        body.replaceChildren(...(evaluations.length
          ? evaluations.map(evaluationRow)
          : [el("tr", {}, el("td", { colspan: 12, class: "muted" }, "No evaluation yet (POST /v1/evaluations)."))]));
        drawOverlay();
      }
      return evaluations.some((ev) => ev.status === "queued" || ev.status === "running") ? ACTIVE_POLL_MS : IDLE_POLL_MS;
    });
    return $("#view-evaluations");
  }

  function renderEvaluationStats(ev) {
    const r = ev.result || {};
    $("#evaluation-title").textContent = `Evaluation #${ev.id}: ${ev.model} on ${datasetName(ev)}`;
    document.title = `Evaluation #${ev.id} · reid`;
    const done = ev.status === "succeeded" && ev.result;
    $("#evaluation-stats").replaceChildren(...[
      stat("Status", statusPill(ev.status), ev.error ? el("span", { class: "bad-text" }, ` ${ev.error}`) : null),
      stat("Model", `${ev.model}@${ev.model_version}`),
      stat("Dataset", `${ev.dataset.layout} at ${ev.dataset.root}`),
      stat("Protocol", `${ev.protocol}${ev.rerank ? " + re-rank" : ""}${r.ap_mode ? `, ${r.ap_mode} AP` : ""}`),
      done ? stat("mAP", el("span", { class: "big", id: "evaluation-map" }, pctStd(r, "mAP"))) : null,
      done ? stat("Rank-1 / 5 / 10", `${pctStd(r, "cmc", "1")} / ${pctStd(r, "cmc", "5")} / ${pctStd(r, "cmc", "10")}`) : null,
      done ? stat("mINP", pctStd(r, "mINP")) : null,
      done && r.num_query !== undefined ? stat("Queries / gallery", `${r.num_query} / ${r.num_gallery} (${r.num_valid_queries} valid queries)`) : null,
      stat("Duration", duration(ev.duration_s)),
      stat("Created", when(ev.created_at)),
    ].filter(Boolean));
    const trials = $("#evaluation-trials");
    if (done && Array.isArray(r.trials) && r.trials.length) {
      trials.replaceChildren(el("h2", {}, `Trials (${r.trials.length})`), el("div", { class: "table-wrap" },
        el("table", {},
          el("thead", {}, el("tr", {}, ["Trial", "mAP", "Rank-1", "Rank-5", "mINP", "Gallery"].map(
            (h) => el("th", { scope: "col", class: h === "Trial" ? "" : "num" }, h)))),
          el("tbody", {}, r.trials.map((t) => el("tr", {},
            el("th", { scope: "row" }, t.trial), el("td", { class: "num" }, pct(t.mAP)),
            el("td", { class: "num" }, pct(t.rank1)), el("td", { class: "num" }, pct(t.rank5)),
            el("td", { class: "num" }, pct(t.mINP)), el("td", { class: "num" }, t.num_gallery)))))));
    } else {
      trials.replaceChildren();
    }
    cmcPlot($("#evaluation-cmc"), done && r.cmc_curve ? [{ label: evaluationLabel(ev), curve: r.cmc_curve }] : [],
      `CMC curve of evaluation ${ev.id}`);
  }

  async function loadWorstQueries(ev) {
    const box = $("#worst-queries");
    box.dataset.state = "loading";
    let data;
    try {
      data = await api(`v1/evaluations/${ev.id}/worst-queries?limit=${WORST_QUERIES}&k=${RANK_LIST_LENGTH}`);
    } catch (err) {
      box.dataset.state = "unavailable";
      // 409: not finished, or a protocol without a fixed query set; 410: its files were deleted.
      if (err instanceof ApiError && [404, 409, 410].includes(err.status)) {
        box.replaceChildren(el("p", { class: "muted note" },
          err.status === 404 && /No resource/.test(err.detail || "")
            ? "This service does not provide rank lists yet."
            : `No rank lists for this evaluation: ${err.detail || err.title}`));
        return;
      }
      throw err;
    }
    const queries = data.queries || [];
    if (!queries.length) {
      box.replaceChildren(el("p", { class: "muted note" }, "No query to show."));
      box.dataset.state = "done";
      return;
    }
    box.replaceChildren(...queries.map((q, i) => {
      const first = q.first_match_rank ? `first match at rank ${q.first_match_rank}` : `no match in the top ${data.k}`;
      const caption = `Query ${i + 1}: identity ${q.identity}, camera ${q.camera}, AP ${pct(q.ap)}, ${first}`;
      return el("article", { class: "ranklist", "aria-label": caption },
        el("figure", { class: "query-crop" },
          el("div", { class: "card-media" }, thumb(q.image_url, `Query crop, identity ${q.identity}, camera ${q.camera}`)),
          el("figcaption", {}, el("strong", {}, `id ${q.identity}`), ` · cam ${q.camera}`, el("br"),
            `AP ${pct(q.ap)}`, el("br"), el("span", { class: "muted" }, first))),
        el("ol", { class: "ranked" }, q.results.map((hit, j) => el("li", {
          class: `card mini ${hit.match ? "match" : "miss"}`,
          dataset: { match: hit.match ? "true" : "false" },
        },
        el("div", { class: "card-media" },
          thumb(hit.image_url, `Rank ${j + 1}: identity ${hit.identity}, camera ${hit.camera}, ${hit.match ? "same identity" : "other identity"}`),
          el("span", { class: "rank", "aria-hidden": "true" }, j + 1)),
        el("p", { class: "caption" }, `id ${hit.identity}`)))));
    }));
    box.dataset.state = "done";
  }

  function showEvaluation(evaluationId) {
    const mine = generation;
    $("#evaluation-title").textContent = `Evaluation #${evaluationId}`;
    $("#evaluation-stats").replaceChildren();
    $("#evaluation-trials").replaceChildren();
    $("#evaluation-cmc").replaceChildren();
    const worst = $("#worst-queries");
    worst.replaceChildren();
    worst.dataset.state = "waiting";
    let worstLoaded = false;
    poll(async () => {
      const ev = await api(`v1/evaluations/${evaluationId}`);
      if (mine !== generation) return 0;
      renderEvaluationStats(ev);
      const active = ev.status === "queued" || ev.status === "running";
      if (ev.status === "succeeded" && !worstLoaded) {
        worstLoaded = true;
        await loadWorstQueries(ev);
      } else if (ev.status !== "succeeded") {
        worst.replaceChildren(el("p", { class: "muted note" }, active
          ? "Rank lists appear when the evaluation has finished."
          : "The evaluation did not succeed: no rank list."));
      }
      return active ? ACTIVE_POLL_MS : 0;
    });
    return $("#view-evaluation");
  }

  // ---------------------------------------------------------------------------------- CMC plot

  /**
   * Draws CMC curves (fraction of queries matched within rank r) as an SVG line plot.
   * series: [{label, curve: [cmc@1, cmc@2, ...]}]
   */
  function cmcPlot(container, series, summary, { width = 640, height = 300 } = {}) {
    container.replaceChildren();
    if (!series.length) {
      container.append(el("p", { class: "muted note" }, "No finished evaluation to plot."));
      return;
    }
    const W = width, H = height, L = 52, R = 16, T = 14, B = 42;
    const maxRank = Math.max(2, ...series.map((s) => s.curve.length));
    const x = (rank) => L + ((rank - 1) / (maxRank - 1)) * (W - L - R);
    const y = (frac) => T + (1 - frac) * (H - T - B);
    const describe = series.map((s) => `${s.label}: rank-1 ${pct(s.curve[0])}, rank-${Math.min(10, s.curve.length)} ${pct(s.curve[Math.min(10, s.curve.length) - 1])}`).join("; ");
    const svg = el("svg", {
      viewBox: `0 0 ${W} ${H}`, class: "cmc", role: "img", "aria-labelledby": `${container.id}-t ${container.id}-d`,
      preserveAspectRatio: "xMidYMid meet",
    },
    el("title", { id: `${container.id}-t` }, summary),
    el("desc", { id: `${container.id}-d` }, describe));
    const grid = el("g", { class: "grid-lines" });
    for (let v = 0; v <= 100; v += 20) {
      grid.append(el("line", { x1: L, x2: W - R, y1: y(v / 100), y2: y(v / 100) }),
        el("text", { x: L - 8, y: y(v / 100) + 4, class: "tick", "text-anchor": "end" }, `${v}%`));
    }
    const ticks = [1, 5, 10, 20, 30, 40, 50, 100].filter((r) => r <= maxRank);
    if (!ticks.includes(maxRank)) ticks.push(maxRank);
    for (const r of ticks) {
      grid.append(el("line", { x1: x(r), x2: x(r), y1: T, y2: H - B, class: "vertical" }),
        el("text", { x: x(r), y: H - B + 16, class: "tick", "text-anchor": "middle" }, r));
    }
    grid.append(el("text", { x: (L + W - R) / 2, y: H - 6, class: "axis-label", "text-anchor": "middle" }, "rank"),
      el("text", { x: 14, y: (T + H - B) / 2, class: "axis-label", "text-anchor": "middle",
        transform: `rotate(-90 14 ${(T + H - B) / 2})` }, "matched queries"));
    svg.append(grid);
    const legend = el("ul", { class: "legend" });
    series.forEach((s, i) => {
      const colour = PALETTE[i % PALETTE.length];
      const points = s.curve.map((v, r) => `${x(r + 1).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      const line = el("g", { class: "series", dataset: { label: s.label } },
        el("title", {}, `${s.label}: rank-1 ${pct(s.curve[0])}`),
        el("polyline", { points, fill: "none", stroke: colour, "stroke-width": 2.5, "stroke-linejoin": "round" }));
      for (const r of [1, 5, 10].filter((rank) => rank <= s.curve.length)) {
        line.append(el("circle", { cx: x(r), cy: y(s.curve[r - 1]), r: 3.5, fill: colour }));
      }
      svg.append(line);
      const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = colour; // CSSOM, not a style attribute: allowed by a strict CSP
      legend.append(el("li", {}, swatch, `${s.label}: rank-1 ${pct(s.curve[0])}`));
    });
    container.append(svg, legend);
  }

  // ----------------------------------------------------------------------------------- API key

  function wireKey() {
    const input = $("#api-key");
    const state = $("#key-state");
    const describe = () => {
      state.textContent = apiKey() ? "key set" : "no key";
    };
    input.value = apiKey();
    describe();
    $("#key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      storageSet(KEY_STORAGE, input.value.trim());
      describe();
      route(false); // reload the view with the new credentials
    });
    $("#key-clear").addEventListener("click", () => {
      input.value = "";
      storageSet(KEY_STORAGE, "");
      describe();
      route(false);
    });
  }

  // ------------------------------------------------------------------------------------- start

  function start() {
    wireKey();
    wireSearch();
    $("#alert-close").addEventListener("click", clearError);
    $("#skip-link").addEventListener("click", () => $("#main").focus());
    window.addEventListener("hashchange", () => route(true));
    route(false);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
