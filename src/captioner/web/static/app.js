// captioner web page: upload a photo, show the caption, overlay per-word attention.
// Plain JS, no dependencies, nothing fetched from outside this server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    health: $("health"), dropzone: $("dropzone"), file: $("file"), stage: $("stage"),
    preview: $("preview"), overlay: $("overlay"), placeholder: $("placeholder"),
    beam: $("beam"), beamOut: $("beam-out"), maxlen: $("maxlen"), maxlenOut: $("maxlen-out"),
    error: $("error"), busy: $("busy"), empty: $("empty"), output: $("output"),
    caption: $("caption"), words: $("words"), score: $("score"), alts: $("alternatives"),
    concepts: $("concepts"), conceptsBlock: $("concepts-block"), inDomain: $("in-domain"),
    oodWarning: $("ood-warning"),
    pick: $("pick"), altsBlock: $("alts-block"), hint: $("attn-hint"), legend: $("legend"),
  };

  const state = {
    maxUploadBytes: null, objectUrl: null, controller: null,
    attention: null, // {grid: [[[...]]], shape: [T, g, g]}
    pinned: null, // index of the clicked word, or null
    shown: null, // index currently drawn
    lastFile: null,
  };

  // ---------------------------------------------------------------- health
  async function checkHealth() {
    try {
      const r = await fetch("/healthz", { cache: "no-store" });
      const h = await r.json();
      state.maxUploadBytes = h.max_upload_bytes ?? null;
      els.health.textContent = h.model_loaded ? `model ready · v${h.version}` : "model loading…";
      els.health.className = "health " + (h.model_loaded ? "ok" : "bad");
      if (!h.model_loaded) setTimeout(checkHealth, 2000);
    } catch {
      els.health.textContent = "server unreachable";
      els.health.className = "health bad";
      setTimeout(checkHealth, 4000);
    }
  }

  // ---------------------------------------------------------------- ui helpers
  function showError(title, message) {
    els.error.replaceChildren();
    const strong = document.createElement("strong");
    strong.textContent = title;
    els.error.append(strong, document.createTextNode(message));
    els.error.hidden = false;
  }
  function clearError() { els.error.hidden = true; els.error.replaceChildren(); }
  function setBusy(busy) {
    els.busy.hidden = !busy;
    els.dropzone.setAttribute("aria-busy", String(busy));
  }
  const fmtMB = (n) => `${(n / (1024 * 1024)).toFixed(n < 1024 * 1024 ? 2 : 1)} MB`;
  const fmtScore = (s) => (s === null || s === undefined ? "–" : Number(s).toFixed(3));

  // ---------------------------------------------------------------- file handling
  function handleFile(file) {
    if (!file) return;
    state.lastFile = file;
    clearError();
    if (state.maxUploadBytes && file.size > state.maxUploadBytes) {
      showError("File too large", `${file.name} is ${fmtMB(file.size)}; the server accepts at most ${fmtMB(state.maxUploadBytes)}.`);
      return;
    }
    showPreview(file);
    upload(file);
  }

  function showPreview(file) {
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(file);
    clearOverlay();
    els.preview.src = state.objectUrl;
    els.stage.hidden = false;
    els.placeholder.hidden = true;
    els.dropzone.classList.add("has-image");
    els.pick.textContent = "Choose another photo…";
  }

  function hidePreview() {
    els.stage.hidden = true;
    els.placeholder.hidden = false;
    els.dropzone.classList.remove("has-image");
    els.pick.textContent = "Choose a photo…";
    els.preview.removeAttribute("src");
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = null;
  }

  async function upload(file) {
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    const params = new URLSearchParams({
      beam_size: els.beam.value, max_length: els.maxlen.value, attention: "true",
    });
    const body = new FormData();
    body.append("image", file, file.name || "upload");
    setBusy(true);
    els.output.hidden = true;
    els.empty.hidden = true;
    state.attention = null;
    try {
      const r = await fetch(`/v1/captions?${params}`, { method: "POST", body, signal: controller.signal });
      let data = null;
      try { data = await r.json(); } catch { data = null; }
      if (!r.ok) {
        const detail = data && typeof data.detail === "string" ? data.detail : `HTTP ${r.status}`;
        const title = {
          413: "File too large", 415: "Not a supported image", 422: "Could not read this image",
          503: "Server busy",
        }[r.status] || "Something went wrong";
        showError(title, detail);
        if (r.status === 415 || r.status === 422 || r.status === 413) hidePreview();
        els.empty.hidden = false;
        return;
      }
      render(data);
    } catch (err) {
      if (err.name === "AbortError") return;
      showError("Upload failed", "Could not reach the server. Is it still running?");
      els.empty.hidden = false;
    } finally {
      if (state.controller === controller) { setBusy(false); state.controller = null; }
    }
  }

  // ---------------------------------------------------------------- rendering
  function render(data) {
    els.caption.textContent = data.caption;
    els.score.textContent = fmtScore(data.score);
    state.attention = data.attention || null;
    state.pinned = null;
    els.words.replaceChildren();
    data.tokens.forEach((tok, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "word";
      b.textContent = tok;
      b.dataset.index = String(i);
      b.setAttribute("aria-pressed", "false");
      b.title = "Show where the model looked for this word";
      els.words.append(b);
    });
    els.hint.hidden = !state.attention;
    els.legend.hidden = !state.attention;
    els.alts.replaceChildren();
    (data.alternatives || []).forEach((alt, i) => {
      const li = document.createElement("li");
      if (i === 0) li.className = "best";
      const t = document.createElement("span");
      t.className = "text";
      t.textContent = alt.caption;
      const s = document.createElement("span");
      s.className = "s";
      s.textContent = fmtScore(alt.score);
      li.append(t, s);
      els.alts.append(li);
    });
    els.altsBlock.hidden = !(data.alternatives && data.alternatives.length > 1);
    els.concepts.replaceChildren();
    (data.concepts || []).forEach((c) => {
      const li = document.createElement("li");
      li.textContent = `${c.word} ${c.probability.toFixed(2)}`;
      els.concepts.append(li);
    });
    const grounded = data.in_domain !== null && data.in_domain !== undefined;
    els.conceptsBlock.hidden = !grounded && !(data.concepts && data.concepts.length);
    els.inDomain.textContent = grounded ? data.in_domain.toFixed(3) : "n/a";
    els.oodWarning.hidden = !data.out_of_domain;
    els.output.hidden = false;
    els.empty.hidden = true;
    clearOverlay();
  }

  function wordFromEvent(ev) {
    const b = ev.target.closest && ev.target.closest(".word");
    return b && els.words.contains(b) ? Number(b.dataset.index) : null;
  }

  els.words.addEventListener("mouseover", (ev) => {
    const i = wordFromEvent(ev);
    if (i !== null) drawAttention(i);
  });
  els.words.addEventListener("mouseleave", () => restore());
  els.words.addEventListener("focusin", (ev) => {
    const i = wordFromEvent(ev);
    if (i !== null) drawAttention(i);
  });
  els.words.addEventListener("focusout", () => restore());
  els.words.addEventListener("click", (ev) => {
    const i = wordFromEvent(ev);
    if (i === null) return;
    state.pinned = state.pinned === i ? null : i;
    for (const b of els.words.children) {
      b.setAttribute("aria-pressed", String(Number(b.dataset.index) === state.pinned));
    }
    state.pinned === null ? clearOverlay() : drawAttention(i);
  });

  function restore() {
    if (state.pinned !== null) drawAttention(state.pinned);
    else clearOverlay();
  }

  // ---------------------------------------------------------------- attention overlay
  // Heat ramp: transparent blue -> cyan -> yellow -> red, more opaque where attention is high.
  const STOPS = [
    [0.0, [40, 60, 200]], [0.35, [0, 190, 230]], [0.6, [120, 230, 80]],
    [0.8, [255, 210, 0]], [1.0, [240, 40, 20]],
  ];
  function heat(v) {
    for (let k = 1; k < STOPS.length; k++) {
      const [p1, c1] = STOPS[k];
      const [p0, c0] = STOPS[k - 1];
      if (v <= p1) {
        const t = (v - p0) / (p1 - p0 || 1);
        return c0.map((c, j) => Math.round(c + (c1[j] - c) * t));
      }
    }
    return STOPS[STOPS.length - 1][1];
  }

  // Where the picture actually is inside the <img> box (object-fit: contain).
  function imageRect() {
    const img = els.preview;
    const bw = img.clientWidth, bh = img.clientHeight;
    const nw = img.naturalWidth || bw, nh = img.naturalHeight || bh;
    const scale = Math.min(bw / nw, bh / nh);
    const w = nw * scale, h = nh * scale;
    return { x: img.offsetLeft + (bw - w) / 2, y: img.offsetTop + (bh - h) / 2, w, h };
  }

  function sizeOverlay() {
    const r = imageRect();
    const dpr = window.devicePixelRatio || 1;
    const c = els.overlay;
    c.style.left = `${r.x}px`;
    c.style.top = `${r.y}px`;
    c.style.width = `${r.w}px`;
    c.style.height = `${r.h}px`;
    c.width = Math.max(1, Math.round(r.w * dpr));
    c.height = Math.max(1, Math.round(r.h * dpr));
  }

  function clearOverlay() {
    state.shown = null;
    const c = els.overlay;
    c.getContext("2d").clearRect(0, 0, c.width, c.height);
    delete c.dataset.token;
  }

  function drawAttention(index) {
    const a = state.attention;
    if (!a || !a.grid || !a.grid[index] || !els.preview.naturalWidth) return;
    const map = a.grid[index];
    const rows = map.length, cols = map[0].length;
    let max = 0;
    for (const row of map) for (const v of row) if (v > max) max = v;
    if (!(max > 0)) max = 1;

    // The map with one replicated cell of padding on each side, so the blur below does not
    // fade the picture's borders.
    const small = document.createElement("canvas");
    small.width = cols + 2;
    small.height = rows + 2;
    const sctx = small.getContext("2d");
    const img = sctx.createImageData(cols + 2, rows + 2);
    for (let y = 0; y < rows + 2; y++) {
      for (let x = 0; x < cols + 2; x++) {
        const sy = Math.min(rows - 1, Math.max(0, y - 1));
        const sx = Math.min(cols - 1, Math.max(0, x - 1));
        const v = Math.min(1, Math.max(0, map[sy][sx] / max));
        const [r, g, b] = heat(v);
        const o = (y * (cols + 2) + x) * 4;
        img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b;
        img.data[o + 3] = Math.round(255 * (0.22 + 0.56 * Math.pow(v, 0.8)));
      }
    }
    sctx.putImageData(img, 0, 0);

    sizeOverlay();
    const c = els.overlay;
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, c.height);
    ctx.save();
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    const cw = c.width / cols, ch = c.height / rows;
    // Smooth upsampling plus a blur hides the grid seams.
    ctx.filter = `blur(${Math.max(2, Math.min(cw, ch) * 0.28).toFixed(1)}px)`;
    ctx.drawImage(small, 0, 0, cols + 2, rows + 2, -cw, -ch, c.width + 2 * cw, c.height + 2 * ch);
    ctx.restore();
    state.shown = index;
    c.dataset.token = String(index);
  }

  window.addEventListener("resize", () => {
    if (state.shown !== null) drawAttention(state.shown);
  });
  els.preview.addEventListener("load", () => {
    if (state.shown !== null) drawAttention(state.shown);
  });

  // ---------------------------------------------------------------- inputs
  els.file.addEventListener("change", () => {
    handleFile(els.file.files && els.file.files[0]);
    els.file.value = "";
  });
  els.dropzone.addEventListener("keydown", (ev) => {
    if ((ev.key === "Enter" || ev.key === " ") && ev.target === els.dropzone) {
      ev.preventDefault();
      els.file.click();
    }
  });
  for (const type of ["dragenter", "dragover"]) {
    els.dropzone.addEventListener(type, (ev) => {
      ev.preventDefault();
      els.dropzone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "dragend"]) {
    els.dropzone.addEventListener(type, (ev) => {
      if (!els.dropzone.contains(ev.relatedTarget)) els.dropzone.classList.remove("dragging");
    });
  }
  els.dropzone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    els.dropzone.classList.remove("dragging");
    const f = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
    if (f) handleFile(f);
  });
  // A file dropped outside the drop zone must not navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  document.addEventListener("paste", (ev) => {
    const items = ev.clipboardData ? [...ev.clipboardData.files] : [];
    if (items.length) handleFile(items[0]);
  });

  const syncOptions = () => {
    els.beamOut.textContent = els.beam.value;
    els.maxlenOut.textContent = els.maxlen.value;
  };
  for (const input of [els.beam, els.maxlen]) {
    input.addEventListener("input", syncOptions);
    input.addEventListener("change", () => { if (state.lastFile && !els.stage.hidden) upload(state.lastFile); });
  }
  syncOptions();
  checkHealth();
})();
