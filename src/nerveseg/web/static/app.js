// nerveseg page: cases, viewer, corrections, cine, CTS screening and fine-tuning.
// Plain ES module, no library, no CDN: everything it needs comes from this server.

const NERVE = 1, VESSEL = 2;
const COLORS = {
  nerveFill: [255, 60, 60], nerveLine: [255, 225, 60],
  vesselFill: [60, 140, 255], vesselLine: [120, 230, 255],
};
const MAX_UNDO = 40;

const $ = (id) => document.getElementById(id);
const S = {
  token: sessionStorage.getItem("nerveseg-token") || "",
  cases: new Map(),        // id -> case JSON
  order: [],               // ids, upload order
  current: null,           // case JSON
  frame: 0,
  w: 0, h: 0,
  labels: null,            // Uint8Array of the current frame
  image: null,             // canvas with the grey frame
  maskCanvas: document.createElement("canvas"),
  frameCache: new Map(),   // "id/frame" -> {image, labels}
  undo: [], redo: [],
  tool: "pan", brush: 10, opacity: 0.35, outline: true,
  zoom: 1, panX: 0, panY: 0,
  playing: false, playTimer: null,
  scaleLine: null,
  jobPoll: null,
};

// ------------------------------------------------------------------------------------------
// API

async function api(path, opts = {}) {
  const headers = new Headers(opts.headers || {});
  if (S.token) headers.set("Authorization", "Bearer " + S.token);
  const response = await fetch(path, { ...opts, headers });
  if (!response.ok) {
    let detail = response.status + " " + response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    const err = new Error(detail);
    err.status = response.status;
    if (response.status === 401) showTokenForm();
    throw err;
  }
  return response;
}
const apiJSON = async (path, opts) => (await api(path, opts)).json();
const postJSON = (path, body, method = "POST") =>
  apiJSON(path, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

function showError(message, info = false) {
  const el = $("alert");
  el.textContent = message;
  el.classList.toggle("info", info);
  el.hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { el.hidden = true; }, info ? 4000 : 12000);
}

function showTokenForm() { $("token-form").hidden = false; $("token-input").focus(); }

// ------------------------------------------------------------------------------------------
// images <-> label maps

async function loadImage(path) {
  const blob = await (await api(path)).blob();
  const bitmap = await createImageBitmap(blob);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width; canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  return canvas;
}

async function loadLabels(path) {
  // the palette mask PNG: black 0, red 1 (nerve), blue 2 (vessel)
  const canvas = await loadImage(path);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const labels = new Uint8Array(canvas.width * canvas.height);
  for (let i = 0, p = 0; i < labels.length; i++, p += 4) {
    const r = data[p], b = data[p + 2];
    labels[i] = r > 127 && b < 127 ? NERVE : (b > 127 && r < 127 ? VESSEL : 0);
  }
  return labels;
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

async function labelsToPNG(labels, w, h) {
  // 8-bit grey PNG whose values are the labels (0/1/2): what PUT .../mask takes
  const raw = new Uint8Array((w + 1) * h);
  for (let y = 0; y < h; y++) {
    raw[y * (w + 1)] = 0; // filter: none
    raw.set(labels.subarray(y * w, (y + 1) * w), y * (w + 1) + 1);
  }
  const zipped = new Uint8Array(await new Response(
    new Blob([raw]).stream().pipeThrough(new CompressionStream("deflate"))).arrayBuffer());
  const chunk = (type, data) => {
    const out = new Uint8Array(12 + data.length);
    const view = new DataView(out.buffer);
    view.setUint32(0, data.length);
    for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
    out.set(data, 8);
    view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
    return out;
  };
  const ihdr = new Uint8Array(13);
  const v = new DataView(ihdr.buffer);
  v.setUint32(0, w); v.setUint32(4, h);
  ihdr[8] = 8; ihdr[9] = 0; ihdr[10] = 0; ihdr[11] = 0; ihdr[12] = 0;
  const signature = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
  return new Blob([signature, chunk("IHDR", ihdr), chunk("IDAT", zipped), chunk("IEND", new Uint8Array(0))],
    { type: "image/png" });
}

// ------------------------------------------------------------------------------------------
// drawing

const view = $("view");
const ctx = view.getContext("2d");

function renderMask() {
  // fill at full alpha (the opacity is applied when drawn); outline drawn opaque on top
  const { w, h, labels } = S;
  if (!labels) return;
  S.maskCanvas.width = w; S.maskCanvas.height = h;
  const mctx = S.maskCanvas.getContext("2d");
  const img = mctx.createImageData(w, h);
  const d = img.data;
  let nerve = 0, outline = 0;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x, v = labels[i];
      if (!v) continue;
      if (v === NERVE) nerve++;
      const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
        labels[i - 1] !== v || labels[i + 1] !== v || labels[i - w] !== v || labels[i + w] !== v;
      const p = i * 4;
      let c;
      if (edge && S.outline) { c = v === NERVE ? COLORS.nerveLine : COLORS.vesselLine; d[p + 3] = 255; outline++; }
      else { c = v === NERVE ? COLORS.nerveFill : COLORS.vesselFill; d[p + 3] = 254; }
      d[p] = c[0]; d[p + 1] = c[1]; d[p + 2] = c[2];
    }
  }
  mctx.putImageData(img, 0, 0);
  const viewer = $("viewer");
  viewer.dataset.nervePixels = nerve;
  viewer.dataset.outlinePixels = outline;
}

function resizeCanvas() {
  const r = view.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  view.width = Math.max(1, Math.round(r.width * dpr));
  view.height = Math.max(1, Math.round(r.height * dpr));
}

function fit() {
  if (!S.image) return;
  resizeCanvas();
  S.zoom = Math.min(view.width / S.w, view.height / S.h);
  S.panX = (view.width - S.w * S.zoom) / 2;
  S.panY = (view.height - S.h * S.zoom) / 2;
  S.userView = false;
  draw();
}

function draw() {
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, view.width, view.height);
  if (!S.image) return;
  ctx.setTransform(S.zoom, 0, 0, S.zoom, S.panX, S.panY);
  ctx.imageSmoothingEnabled = S.zoom < 2;
  ctx.drawImage(S.image, 0, 0);
  if (S.labels) {
    // fill pixels have alpha 254, outline 255: draw the fill with the opacity, the outline opaque
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = S.opacity;
    ctx.drawImage(S.maskCanvas, 0, 0);
    ctx.globalAlpha = 1;
    if (S.outline) drawOutlineOnly();
  }
  if (S.scaleLine) {
    const l = S.scaleLine;
    ctx.strokeStyle = "#4fa3ff"; ctx.lineWidth = 2 / S.zoom;
    ctx.beginPath(); ctx.moveTo(l.x0, l.y0); ctx.lineTo(l.x1, l.y1); ctx.stroke();
  }
  if (S.cursor && (S.tool === "brush" || S.tool === "eraser")) {
    ctx.strokeStyle = S.tool === "brush" ? "#ffe13c" : "#ffffff"; ctx.lineWidth = 1 / S.zoom;
    ctx.beginPath(); ctx.arc(S.cursor.x, S.cursor.y, S.brush / 2, 0, 2 * Math.PI); ctx.stroke();
  }
}

let outlineCanvas = document.createElement("canvas");
let outlineFor = null;
function drawOutlineOnly() {
  if (outlineFor !== S.maskCanvas.dataset.version) {
    outlineCanvas.width = S.w; outlineCanvas.height = S.h;
    const octx = outlineCanvas.getContext("2d");
    const src = S.maskCanvas.getContext("2d").getImageData(0, 0, S.w, S.h);
    const d = src.data;
    for (let p = 3; p < d.length; p += 4) if (d[p] !== 255) d[p] = 0;
    octx.putImageData(src, 0, 0);
    outlineFor = S.maskCanvas.dataset.version;
  }
  ctx.drawImage(outlineCanvas, 0, 0);
}

let maskVersion = 0;
function maskChanged() {
  renderMask();
  S.maskCanvas.dataset.version = String(++maskVersion);
  draw();
  const key = S.current.id + "/" + S.frame;
  if (S.frameCache.has(key)) S.frameCache.get(key).labels = S.labels;
}

// ------------------------------------------------------------------------------------------
// cases

async function uploadFiles(files) {
  const params = new URLSearchParams();
  const mm = parseFloat($("opt-mm").value);
  if (mm > 0) params.set("mm_per_pixel", mm);
  params.set("threshold", $("opt-threshold").value || "0.5");
  params.set("postprocess", $("opt-post").value);
  const smooth = parseFloat($("opt-smooth").value);
  if (smooth > 0) params.set("temporal_smoothing", smooth);
  let first = null, n = 0;
  for (const file of files) {
    n++;
    $("upload-status").textContent = `Segmenting ${file.name} (${n} of ${files.length})…`;
    params.set("name", file.name);
    try {
      const c = await apiJSON("/api/cases?" + params, {
        method: "POST", headers: { "Content-Type": "application/octet-stream" }, body: file,
      });
      S.cases.set(c.id, c);
      S.order.push(c.id);
      await addCaseToList(c);
      if (!first) first = c.id;
    } catch (err) {
      showError(err.message);
    }
  }
  $("upload-status").textContent = first ? `Done: ${files.length} file(s).` : "";
  if (first) await selectCase(first);
}

function qcBadges(flags) {
  return flags.map((f) => {
    const b = document.createElement("span");
    // "corrected" replaces low_confidence on a mask the clinician corrected: a fact, not a warning
    b.className = "badge " + (f === "no_nerve" ? "bad" : f === "corrected" ? "" : "warn");
    b.textContent = f.replace("_", " ");
    return b;
  });
}

async function addCaseToList(c) {
  appendListItem(c);
  await refreshThumbnail(c.id);
}

function appendListItem(c) {  // the list item without its thumbnail, at the end of the list
  const li = document.createElement("li");
  li.dataset.id = c.id;
  li.tabIndex = 0;
  const img = document.createElement("img");
  img.alt = "";
  li.append(img);
  const info = document.createElement("div");
  li.append(info);
  $("case-list").append(li);
  updateListItem(c);
  li.addEventListener("click", () => selectCase(c.id));
  li.addEventListener("keydown", (e) => { if (e.key === "Enter") selectCase(c.id); });
  return li;
}

async function refreshThumbnail(id) {
  const li = document.querySelector(`#case-list li[data-id="${id}"]`);
  if (!li) return;
  try {
    const blob = await (await api(`/api/cases/${id}/thumbnail.png`)).blob();
    const img = li.querySelector("img");
    if (img.src) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
  } catch (e) { /* evicted: the list item says so when clicked */ }
}

function updateListItem(c) {
  const li = document.querySelector(`#case-list li[data-id="${c.id}"]`);
  if (!li) return;
  const info = li.querySelector("div");
  info.replaceChildren();
  const name = document.createElement("div");
  name.className = "case-name";
  name.textContent = c.name;
  const meta = document.createElement("div");
  meta.className = "muted";
  meta.textContent = `${c.kind}, ${c.n_frames} frame${c.n_frames > 1 ? "s" : ""}` + (c.calibrated ? ", mm" : ", px only")
    + (c.model_route ? `, ${c.model_route} model` : "");
  const badges = document.createElement("div");
  badges.className = "badges";
  // the list says "edited" for a corrected mask, so its "corrected" flag is not repeated here
  const flags = (c.frames ? [...new Set(c.frames.flatMap((f) => f.qc_flags))] : c.qc_flags).filter((f) => f !== "corrected");
  badges.append(...qcBadges(flags));
  if (!flags.length) { const ok = document.createElement("span"); ok.className = "badge ok"; ok.textContent = "QC ok"; badges.append(ok); }
  // a case from GET /api/cases (after a reload) has counts, not frames
  const edited = c.frames ? c.frames.some((f) => f.edited) : c.edited_frames > 0;
  const saved = c.frames ? c.frames.some((f) => f.saved_as) : c.saved_frames > 0;
  if (edited) { const e = document.createElement("span"); e.className = "badge"; e.textContent = "edited"; badges.append(e); }
  if (saved) { const s = document.createElement("span"); s.className = "badge ok"; s.textContent = "saved"; badges.append(s); }
  if (c.tags && c.tags.region) { const t = document.createElement("span"); t.className = "badge"; t.textContent = [c.tags.region, c.tags.side].filter(Boolean).join(" "); badges.append(t); }
  info.append(name, meta, badges);
}

async function selectCase(id) {
  stopPlaying();
  let c = S.cases.get(id);
  try {
    c = await apiJSON(`/api/cases/${id}`);
  } catch (err) {
    showError(err.message);
    return;
  }
  S.cases.set(id, c);
  S.current = c;
  document.querySelectorAll("#case-list li").forEach((li) => li.classList.toggle("selected", li.dataset.id === id));
  $("case-title").textContent = c.name;
  $("empty-hint").hidden = true;
  $("tag-subject").value = c.tags.subject || "";
  $("tag-region").value = c.tags.region || "";
  $("tag-side").value = c.tags.side || "";
  for (const el of ["tag-subject", "tag-region", "tag-side", "save", "dl-mask", "dl-csv", "reset"]) $(el).disabled = false;
  $("save-all").hidden = c.n_frames < 2;
  $("save-all").disabled = c.n_frames < 2;
  // a DICOM SEG and SR attach to the source image's study: an image file or video has none
  const dicom = c.kind === "dicom";
  $("dl-dicom").disabled = !dicom;
  $("dl-dicom").title = dicom
    ? "the current masks as a DICOM Segmentation and the measurements as a DICOM SR (TID 1500), one zip, referencing this image"
    : "only for a case uploaded from a DICOM file: an image file or video has no study to attach results to";
  $("warnings").textContent = c.warnings.join(" ");
  const cine = c.n_frames > 1;
  $("cine").hidden = !cine;
  $("scrub").max = c.n_frames - 1;
  await showFrame(0);
  fit();
}

async function frameData(c, index) {
  const key = c.id + "/" + index;
  if (!S.frameCache.has(key)) {
    const [image, labels] = await Promise.all([
      loadImage(`/api/cases/${c.id}/frames/${index}/image.png`),
      loadLabels(`/api/cases/${c.id}/frames/${index}/mask.png`),
    ]);
    S.frameCache.set(key, { image, labels });
    if (S.frameCache.size > 200) S.frameCache.delete(S.frameCache.keys().next().value);
  }
  return S.frameCache.get(key);
}

async function showFrame(index) {
  const c = S.current;
  if (!c) return;
  const data = await frameData(c, index);
  if (S.current !== c) return;
  S.frame = index;
  S.image = data.image;
  S.w = data.image.width; S.h = data.image.height;
  S.labels = data.labels;
  S.undo = []; S.redo = [];  // undo history belongs to one frame
  updateUndoButtons();
  const viewer = $("viewer");
  viewer.dataset.frame = index;
  viewer.dataset.w = S.w;
  viewer.dataset.h = S.h;
  $("scrub").value = index;
  $("frame-label").textContent = `frame ${index + 1} / ${c.n_frames}`;
  maskChanged();
  showMeasurements();
  drawPlot();
}

function fmt(v, digits = 2) {
  return v === null || v === undefined ? "–" : (typeof v === "number" ? v.toFixed(digits) : String(v));
}

function showMeasurements(pending = false) {
  const c = S.current;
  const m = c.frames[S.frame];
  const body = $("measurements").querySelector("tbody");
  body.replaceChildren();
  const row = (label, value, cls) => {
    const tr = document.createElement("tr");
    if (cls) tr.className = cls;
    const th = document.createElement("th"); th.textContent = label;
    const td = document.createElement("td"); td.textContent = value;
    td.id = "m-" + label.toLowerCase().replace(/[^a-z]+/g, "-");
    tr.append(th, td); body.append(tr);
    return td;
  };
  const csa = m.area_mm2 !== null ? `${fmt(m.area_mm2)} mm²` : `${m.area_px} px`;
  const td = row("Nerve CSA", csa + (pending ? " …" : ""), "primary");
  td.id = "csa-value";
  td.dataset.areaPx = m.area_px;
  row("Area", `${m.area_px} px`);
  row("Perimeter", m.perimeter_mm !== null ? `${fmt(m.perimeter_mm)} mm` : `${fmt(m.perimeter_px, 1)} px`);
  row("Circularity", fmt(m.circularity, 3));
  row("Flattening", fmt(m.flattening, 2));
  row("Components", String(m.n_components));
  row("Confidence", fmt(m.confidence, 3));
  if (m.vessel_area_px !== null && m.vessel_area_px !== undefined) row("Vessel area", `${m.vessel_area_px} px`);
  row("Pixel size", m.spacing_mm ? `${m.spacing_mm} mm` : "not calibrated: use Scale");
  if (m.spacing_source) row("Calibration", m.spacing_source);
  const qc = row("QC", m.qc_flags.length ? "" : "ok");
  qc.append(...qcBadges(m.qc_flags));
  if (m.edited) row("Mask", "corrected" + (m.saved_as ? ", saved" : ""));
  else if (m.saved_as) row("Mask", "saved");
  // a routed model (one per anatomy): which one drew this case, so a wrong anatomy is seen at once
  if (c.model_route) row("Model route", c.model_route);
}

function instantArea() {
  // the area from the mask in the browser, shown while the server re-measures
  const c = S.current, m = c.frames[S.frame];
  let n = 0;
  for (let i = 0; i < S.labels.length; i++) if (S.labels[i] === NERVE) n++;
  const per = m.area_mm2 !== null && m.area_px ? m.area_mm2 / m.area_px : null;
  c.frames[S.frame] = { ...m, area_px: n, area_mm2: per !== null ? n * per : m.area_mm2 };
  showMeasurements(true);
}

function updateFrameMeasurement(m) {
  const c = S.current;
  c.frames[m.frame] = m;
  if (m.frame === S.frame) showMeasurements();
  updateListItem(c);
  drawPlot();
  refreshThumbnail(c.id);
}

// ------------------------------------------------------------------------------------------
// corrections

function pushUndo() {
  S.undo.push(S.labels.slice());
  if (S.undo.length > MAX_UNDO) S.undo.shift();
  S.redo = [];
  updateUndoButtons();
}

function updateUndoButtons() {
  $("undo").disabled = !S.undo.length;
  $("redo").disabled = !S.redo.length;
}

let sending = Promise.resolve();
function sendMask() {
  const c = S.current, frame = S.frame, labels = S.labels.slice(), w = S.w, h = S.h;
  sending = sending.then(async () => {
    try {
      const png = await labelsToPNG(labels, w, h);
      const m = await apiJSON(`/api/cases/${c.id}/frames/${frame}/mask`, {
        method: "PUT", headers: { "Content-Type": "image/png" }, body: png,
      });
      if (S.current === c) updateFrameMeasurement(m);
    } catch (err) { showError(err.message); }
  });
  return sending;
}

function paint(x0, y0, x1, y1, value) {
  const r = S.brush / 2, r2 = r * r;
  const steps = Math.max(1, Math.ceil(Math.hypot(x1 - x0, y1 - y0) / Math.max(1, r / 2)));
  for (let s = 0; s <= steps; s++) {
    const cx = x0 + (x1 - x0) * s / steps, cy = y0 + (y1 - y0) * s / steps;
    const xa = Math.max(0, Math.floor(cx - r)), xb = Math.min(S.w - 1, Math.ceil(cx + r));
    const ya = Math.max(0, Math.floor(cy - r)), yb = Math.min(S.h - 1, Math.ceil(cy + r));
    for (let y = ya; y <= yb; y++) {
      for (let x = xa; x <= xb; x++) {
        const dx = x + 0.5 - cx, dy = y + 0.5 - cy;
        if (dx * dx + dy * dy <= r2) {
          const i = y * S.w + x;
          if (value === 0) { if (S.labels[i] === NERVE) S.labels[i] = 0; } else S.labels[i] = value;
        }
      }
    }
  }
}

function undo() {
  if (!S.undo.length) return;
  S.redo.push(S.labels);
  S.labels = S.undo.pop();
  updateUndoButtons(); maskChanged(); instantArea(); sendMask();
}

function redo() {
  if (!S.redo.length) return;
  S.undo.push(S.labels);
  S.labels = S.redo.pop();
  updateUndoButtons(); maskChanged(); instantArea(); sendMask();
}

async function keepAt(x, y) {
  const c = S.current, frame = S.frame;
  const before = S.labels.slice();
  try {
    const r = await postJSON(`/api/cases/${c.id}/frames/${frame}/keep`, { x: Math.floor(x), y: Math.floor(y) });
    const labels = await loadLabels(`/api/cases/${c.id}/frames/${frame}/mask.png`);
    if (S.current !== c || S.frame !== frame) return;
    S.undo.push(before); S.redo = []; updateUndoButtons();
    S.labels = labels;
    maskChanged();
    updateFrameMeasurement(r.measurement);
    showError(r.action, true);
  } catch (err) { showError(err.message); }
}

async function resetMask() {
  const c = S.current, frame = S.frame;
  try {
    const m = await postJSON(`/api/cases/${c.id}/frames/${frame}/reset`, {});
    S.undo.push(S.labels.slice()); S.redo = []; updateUndoButtons();
    S.labels = await loadLabels(`/api/cases/${c.id}/frames/${frame}/mask.png`);
    maskChanged();
    updateFrameMeasurement(m);
  } catch (err) { showError(err.message); }
}

// ------------------------------------------------------------------------------------------
// pointer: pan, zoom, brush, keep, scale

function toImage(e) {
  const r = view.getBoundingClientRect();
  const dpr = view.width / r.width;
  return { x: ((e.clientX - r.left) * dpr - S.panX) / S.zoom, y: ((e.clientY - r.top) * dpr - S.panY) / S.zoom };
}

let drag = null;
view.addEventListener("pointerdown", (e) => {
  if (!S.image) return;
  view.setPointerCapture(e.pointerId);
  const p = toImage(e);
  const panning = S.tool === "pan" || e.button === 1 || e.shiftKey;
  if (panning) { drag = { kind: "pan", sx: e.clientX, sy: e.clientY, px: S.panX, py: S.panY }; S.userView = true; return; }
  if (S.tool === "brush" || S.tool === "eraser") {
    stopPlaying();
    pushUndo();
    const value = S.tool === "brush" ? NERVE : 0;
    paint(p.x, p.y, p.x, p.y, value);
    drag = { kind: "paint", x: p.x, y: p.y, value };
    maskChanged(); instantArea();
  } else if (S.tool === "keep") {
    stopPlaying();
    keepAt(p.x, p.y);
  } else if (S.tool === "scale") {
    S.scaleLine = { x0: p.x, y0: p.y, x1: p.x, y1: p.y };
    drag = { kind: "scale" };
    draw();
  }
});

view.addEventListener("pointermove", (e) => {
  if (!S.image) return;
  const p = toImage(e);
  S.cursor = p;
  if (!drag) { if (S.tool === "brush" || S.tool === "eraser") draw(); return; }
  if (drag.kind === "pan") {
    const dpr = view.width / view.getBoundingClientRect().width;
    S.panX = drag.px + (e.clientX - drag.sx) * dpr;
    S.panY = drag.py + (e.clientY - drag.sy) * dpr;
    draw();
  } else if (drag.kind === "paint") {
    paint(drag.x, drag.y, p.x, p.y, drag.value);
    drag.x = p.x; drag.y = p.y;
    maskChanged(); instantArea();
  } else if (drag.kind === "scale") {
    S.scaleLine.x1 = p.x; S.scaleLine.y1 = p.y;
    draw();
  }
});

function endDrag() {
  if (!drag) return;
  if (drag.kind === "paint") sendMask();
  if (drag.kind === "scale") {
    const l = S.scaleLine;
    const px = Math.hypot(l.x1 - l.x0, l.y1 - l.y0);
    $("scale-px").textContent = px.toFixed(1);
    $("scale-form").hidden = false;
    $("scale-mm").focus();
  }
  drag = null;
}
view.addEventListener("pointerup", endDrag);
view.addEventListener("pointercancel", endDrag);
view.addEventListener("pointerleave", () => { S.cursor = null; draw(); });

view.addEventListener("wheel", (e) => {
  if (!S.image) return;
  e.preventDefault();
  const r = view.getBoundingClientRect();
  const dpr = view.width / r.width;
  const mx = (e.clientX - r.left) * dpr, my = (e.clientY - r.top) * dpr;
  const factor = Math.exp(-e.deltaY * 0.0015);
  const zoom = Math.min(40, Math.max(0.05, S.zoom * factor));
  S.panX = mx - (mx - S.panX) * (zoom / S.zoom);
  S.panY = my - (my - S.panY) * (zoom / S.zoom);
  S.zoom = zoom;
  S.userView = true;
  draw();
}, { passive: false });

async function applyScale() {
  const l = S.scaleLine, mm = parseFloat($("scale-mm").value);
  if (!l || !(mm > 0)) { showError("type the line's length in mm"); return; }
  try {
    const c = await postJSON(`/api/cases/${S.current.id}/scale`, { x0: l.x0, y0: l.y0, x1: l.x1, y1: l.y1, length_mm: mm });
    S.cases.set(c.id, c); S.current = c;
    S.scaleLine = null; $("scale-form").hidden = true;
    showMeasurements(); updateListItem(c); drawPlot(); draw();
  } catch (err) { showError(err.message); }
}

// ------------------------------------------------------------------------------------------
// cine

function drawPlot() {
  const c = S.current;
  const canvas = $("csa-plot");
  if (!c || c.n_frames < 2) return;
  const r = canvas.getBoundingClientRect();
  canvas.width = Math.max(200, Math.round(r.width)); canvas.height = 120;
  const g = canvas.getContext("2d");
  const mm = c.frames.every((f) => f.area_mm2 !== null);
  const values = c.frames.map((f) => (mm ? f.area_mm2 : f.area_px));
  const max = Math.max(...values, 1e-9), W = canvas.width, H = canvas.height, L = 46, B = 18;
  g.clearRect(0, 0, W, H);
  g.fillStyle = "#9aa3ad"; g.font = "11px system-ui, sans-serif";
  g.fillText(mm ? "CSA mm²" : "CSA px", 4, 12);
  g.fillText(max.toFixed(mm ? 1 : 0), 4, 26);
  g.fillText("0", 4, H - B);
  const x = (i) => L + (W - L - 8) * (c.n_frames === 1 ? 0 : i / (c.n_frames - 1));
  const y = (v) => H - B - (H - B - 8) * (v / max);
  g.strokeStyle = "#2e343b"; g.beginPath(); g.moveTo(L, H - B); g.lineTo(W - 8, H - B); g.stroke();
  g.strokeStyle = "#ff6b6b"; g.lineWidth = 1.5; g.beginPath();
  values.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
  g.stroke();
  g.strokeStyle = "#4fa3ff"; g.beginPath(); g.moveTo(x(S.frame), 4); g.lineTo(x(S.frame), H - B); g.stroke();
  g.fillStyle = "#4fa3ff"; g.beginPath(); g.arc(x(S.frame), y(values[S.frame]), 3.5, 0, 2 * Math.PI); g.fill();
  g.fillStyle = "#9aa3ad"; g.fillText(`frame ${S.frame + 1}: ${values[S.frame].toFixed(mm ? 2 : 0)}`, L + 4, H - 4);
}

function stopPlaying() {
  S.playing = false;
  clearTimeout(S.playTimer);
  $("play").textContent = "Play";
  $("cine").dataset.playing = "false";
}

async function playStep() {
  if (!S.playing || !S.current) return;
  const c = S.current;
  const started = performance.now();
  await showFrame((S.frame + 1) % c.n_frames);
  const period = 1000 / Math.min(30, Math.max(1, c.fps || 10));
  S.playTimer = setTimeout(playStep, Math.max(0, period - (performance.now() - started)));
}

function togglePlay() {
  if (!S.current || S.current.n_frames < 2) return;
  if (S.playing) { stopPlaying(); return; }
  S.playing = true;
  $("play").textContent = "Pause";
  $("cine").dataset.playing = "true";
  playStep();
}

$("csa-plot").addEventListener("click", (e) => {
  const c = S.current;
  if (!c) return;
  const r = e.currentTarget.getBoundingClientRect();
  const L = 46, W = r.width;
  const i = Math.round(((e.clientX - r.left - L) / (W - L - 8)) * (c.n_frames - 1));
  stopPlaying();
  showFrame(Math.max(0, Math.min(c.n_frames - 1, i)));
});

// ------------------------------------------------------------------------------------------
// saving, downloads, tags, report

async function save(all = false, overwrite = false) {
  const c = S.current;
  const frames = all ? null : [S.frame];
  try {
    await sending;
    const r = await postJSON(`/api/cases/${c.id}/save`, { frames, overwrite });
    // a mask saved as the model made it is marked so (manifest.csv: corrected = no): it teaches
    // the model nothing new, and a validation figure on it is the model agreeing with itself
    const uncorrected = r.saved.filter((s) => !s.corrected).length;
    $("save-status").textContent = `Saved ${r.saved.map((s) => s.image).join(", ")}` +
      (uncorrected ? ` (${uncorrected === r.saved.length ? "" : uncorrected + " of them "}the model's own mask, not corrected)` : "") +
      `; the workspace holds ${r.workspace_pairs} pair(s).`;
    const fresh = await apiJSON(`/api/cases/${c.id}`);
    S.cases.set(c.id, fresh);
    if (S.current && S.current.id === c.id) { S.current = fresh; showMeasurements(); }
    updateListItem(fresh);
    refreshFinetune();
  } catch (err) {
    if (err.status === 409 && !overwrite) {
      if (window.confirm(err.message + "\n\nReplace it?")) return save(all, true);
      $("save-status").textContent = "Not saved: " + err.message;
    } else showError(err.message);
  }
}

async function download(path, filename) {
  try {
    const blob = await (await api(path)).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = filename;
    document.body.append(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
  } catch (err) { showError(err.message); }
}

// The SEG and SR of the case's current masks: corrections still being sent are waited for
// first, so the download holds what the page shows. The server's notes (no calibration, so no
// mm² in the SR; no SEG for an empty mask) are shown, not only left in the zip.
async function downloadDicom() {
  const c = S.current;
  try {
    await sending;
    const response = await api(`/api/cases/${c.id}/dicom.zip`);
    const notes = response.headers.get("X-Nerveseg-Notes");
    const blob = await response.blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${stemOf(c.name)}_dicom.zip`;
    document.body.append(a);
    a.click();
    setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    if (notes) showError(notes.replaceAll("^2", "²"), true);
  } catch (err) { showError(err.message); }
}

const stemOf = (name) => name.replace(/\.[^.]*$/, "");

// Tag saves go one at a time, in the order of the changes: two quick changes (region, then side)
// sent at once could be applied, or answered, out of order, leaving the older tags in place.
let tagSaves = Promise.resolve();

function saveTags() {
  const c = S.current;
  if (!c) return tagSaves;
  const tags = { subject: $("tag-subject").value.trim(), region: $("tag-region").value, side: $("tag-side").value };
  tagSaves = tagSaves.then(async () => {
    try {
      const fresh = await postJSON(`/api/cases/${c.id}/tags`, tags, "PUT");
      S.cases.set(c.id, fresh);
      if (S.current && S.current.id === c.id) S.current = fresh;
      updateListItem(fresh);
    } catch (err) { showError(err.message); }
  });
  return tagSaves;
}

async function showReport() {
  const out = $("report-out");
  try {
    const r = await apiJSON("/api/report");
    out.replaceChildren();
    const note = document.createElement("p");
    note.className = "muted";
    note.textContent = r.note + ` ${r.n_tagged_cases} tagged case(s).`;
    out.append(note);
    if (!r.rows.length) {
      const p = document.createElement("p");
      p.textContent = "Tag cases with a subject, site (wrist / forearm) and side to pair them.";
      out.append(p);
    } else {
      const t = document.createElement("table");
      t.className = "report-table";
      t.innerHTML = "<thead><tr><th>subject</th><th>side</th><th>wrist mm²</th><th>forearm mm²</th><th>WFR</th><th>ΔCSA</th></tr></thead>";
      const tb = document.createElement("tbody");
      for (const row of r.rows) {
        const tr = document.createElement("tr");
        const cells = [row.subject, row.side, fmt(row.wrist_csa_mm2), fmt(row.forearm_csa_mm2), fmt(row.wfr), fmt(row.delta_csa_mm2)];
        const flags = [null, null, row.wrist_csa_flag, null, row.wfr_flag, row.delta_csa_flag];
        cells.forEach((v, i) => {
          const td = document.createElement("td");
          td.textContent = v;
          if (flags[i]) td.className = "flag";
          tr.append(td);
        });
        tb.append(tr);
        if (row.notes) {
          const nr = document.createElement("tr");
          const td = document.createElement("td");
          td.colSpan = 6; td.className = "muted"; td.textContent = row.notes;
          nr.append(td); tb.append(nr);
        }
      }
      t.append(tb);
      out.append(t);
    }
    const cut = document.createElement("ul");
    cut.className = "sources";
    const labels = { wrist_csa_mm2: `wrist CSA ≥ ${r.cutoffs.wrist_csa_mm2} mm²`, wfr: `WFR ≥ ${r.cutoffs.wfr}`, delta_csa_mm2: `ΔCSA ≥ ${r.cutoffs.delta_csa_mm2} mm²` };
    for (const k of Object.keys(labels)) {
      const li = document.createElement("li");
      li.textContent = `${labels[k]}: ${r.sources[k]}`;
      cut.append(li);
    }
    out.append(cut);
  } catch (err) { showError(err.message); }
}

// ------------------------------------------------------------------------------------------
// model and fine-tuning

async function loadModel() {
  try {
    const m = await apiJSON("/api/model");
    $("model-summary").textContent = `${m.architecture}, ${m.parameters ? m.parameters.toLocaleString() + " parameters" : ""}, ` +
      `${m.classes.join(" + ")}, ${m.input_size} px` + (m.routes && m.routes.length ? `, one model per anatomy (${m.routes.join(", ")}), chosen per image` : m.members > 1 ? `, ensemble of ${m.members}` : "") + (m.shipped ? " (shipped model)" : " (" + m.in_use.split("/").pop() + ")");
    const card = $("model-card");
    card.replaceChildren();
    const dl = document.createElement("dl");
    const add = (k, v) => { if (v === null || v === undefined || v === "") return; const dt = document.createElement("dt"); dt.textContent = k; const dd = document.createElement("dd"); dd.textContent = v; dl.append(dt, dd); };
    add("Architecture", `${m.architecture} (${m.parameters ? m.parameters.toLocaleString() : "?"} parameters), ${m.backend}`);
    add("Recipe", `${m.recipe.epochs} epochs, ${m.recipe.schedule} lr ${m.recipe.lr}, batch ${m.recipe.batch_size}, augment ${m.recipe.augment.join(", ")}; ${m.recipe.train_images} training / ${m.recipe.val_images} validation images`);
    if (m.best_val_dice !== null) add("Best validation Dice", m.best_val_dice.toFixed(3));
    if (m.card) { add("Data", m.card.data); add("Validation", m.card.validation); add("Limits", m.card.limits); add("Use", m.card.use); }
    add("Run folder", m.in_use);
    card.append(dl);
    $("opt-threshold").value = m.threshold;  // the cut chosen with this model; the user may change it
    $("ft-epochs").value = $("ft-epochs").value || 10;
  } catch (err) { showError(err.message); }
}

async function refreshFinetune() {
  try {
    const r = await apiJSON("/api/finetune");
    const ws = await apiJSON("/api/workspace");
    $("ft-info").textContent = `Workspace ${ws.root}: ${ws.pairs} pair(s)` +
      (ws.uncorrected ? ` (${ws.corrected} corrected by hand, ${ws.uncorrected} the model's own mask)` : "") + "." +
      (r.available ? "" : " This nerveseg's train has no --init-from: fine-tuning unavailable.");
    const running = r.jobs.find((j) => j.state === "running" || j.state === "evaluating");
    $("ft-start").disabled = !r.available || ws.pairs < 1 || !!running;
    if (running && !S.jobPoll) pollJob(running.id);
  } catch (err) { /* shown by the calls that matter */ }
}

async function startFinetune() {
  try {
    const job = await postJSON("/api/finetune", { epochs: parseInt($("ft-epochs").value, 10) || 10 });
    $("ft-start").disabled = true;
    $("ft-result").replaceChildren();
    pollJob(job.id);
  } catch (err) { showError(err.message); }
}

async function stopFinetune() {
  const id = $("ft-stop").dataset.job;
  if (!id) return;
  $("ft-stop").disabled = true;
  try {
    await apiJSON(`/api/finetune/${id}/cancel`, { method: "POST" });
    pollJob(id);
  } catch (err) { showError(err.message); $("ft-stop").disabled = false; }
}

function validationText(j) {
  // what the Dice figure is: held-out workspace pairs (some maybe the model's own masks), or none
  const v = j.validation || {};
  if (v.held_out === false) return ", no held-out check";
  if (j.best_val_dice === null) return "";
  const n = v.val_images ? ` on ${v.val_images} held-out pair(s)` : "";
  return `, best validation Dice ${j.best_val_dice.toFixed(3)}${n}`;
}

function pollJob(id) {
  clearTimeout(S.jobPoll);
  const tick = async () => {
    try {
      const j = await apiJSON(`/api/finetune/${id}`);
      const bar = $("ft-progress");
      bar.hidden = false; bar.value = j.progress;
      $("ft-status").textContent = `Job ${j.id}: ${j.state === "cancelled" ? "stopped" : j.state}, ` +
        `epoch ${j.epochs_done} / ${j.epochs}${validationText(j)}, ${Math.round(j.seconds)} s`;
      $("ft-note").textContent = (j.validation && j.validation.note) || "";
      const stop = $("ft-stop");
      stop.hidden = j.state !== "running";
      stop.dataset.job = j.id;
      if (j.state === "running" || j.state === "evaluating") { S.jobPoll = setTimeout(tick, 2000); return; }
      stop.disabled = false;
      S.jobPoll = null;
      showJobResult(j);
      refreshFinetune();
    } catch (err) { showError(err.message); S.jobPoll = null; }
  };
  tick();
}

function showJobResult(j) {
  const out = $("ft-result");
  out.replaceChildren();
  if (j.state === "failed") {
    const p = document.createElement("p"); p.textContent = j.error; out.append(p);
    const pre = document.createElement("pre"); pre.className = "log"; pre.textContent = j.log_tail; out.append(pre);
    return;
  }
  if (j.state === "cancelled") {
    const p = document.createElement("p"); p.className = "muted";
    p.textContent = "Stopped: the run was not finished, so there is no model to use.";
    out.append(p);
    return;
  }
  if (j.state !== "finished") return;
  const cmp = j.comparison || {};
  if (cmp.old && cmp.new) {
    const t = document.createElement("table");
    t.className = "compare";
    t.innerHTML = "<thead><tr><th></th><th>Dice on the run's held-out workspace pairs</th></tr></thead>";
    const tb = document.createElement("tbody");
    for (const [label, s] of [["current model", cmp.old], ["fine-tuned", cmp.new]]) {
      const tr = document.createElement("tr");
      const a = document.createElement("td"); a.textContent = label;
      const b = document.createElement("td"); b.textContent = `${s.dice_mean.toFixed(3)} (n = ${cmp.val_images})`;
      tr.append(a, b); tb.append(tr);
    }
    t.append(tb); out.append(t);
  } else {
    const p = document.createElement("p"); p.className = "muted";
    p.textContent = cmp.note || cmp.error || "no validation figures";
    out.append(p);
  }
  const use = document.createElement("button");
  use.textContent = "Use the fine-tuned model for new uploads";
  use.id = "ft-use";
  use.addEventListener("click", async () => {
    try { await postJSON("/api/model", { run: j.id }); await loadModel(); showError("New uploads use the fine-tuned model.", true); }
    catch (err) { showError(err.message); }
  });
  const back = document.createElement("button");
  back.textContent = "Back to the original model";
  back.addEventListener("click", async () => {
    try { await postJSON("/api/model", { run: "original" }); await loadModel(); } catch (err) { showError(err.message); }
  });
  const buttons = document.createElement("div"); buttons.className = "buttons"; buttons.append(use, back);
  out.append(buttons);
}

// ------------------------------------------------------------------------------------------
// wiring

function setTool(tool) {
  S.tool = tool;
  document.querySelectorAll("#tools .tool").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
  view.style.cursor = tool === "pan" ? "grab" : "crosshair";
  if (tool !== "scale") { S.scaleLine = null; $("scale-form").hidden = true; }
  draw();
}

function wire() {
  document.querySelectorAll("#tools .tool").forEach((b) => b.addEventListener("click", () => setTool(b.dataset.tool)));
  $("file-input").addEventListener("change", (e) => { uploadFiles([...e.target.files]); e.target.value = ""; });
  const dz = $("dropzone");
  for (const target of [dz, $("viewer")]) {
    target.addEventListener("dragover", (e) => { e.preventDefault(); dz.classList.add("over"); });
    target.addEventListener("dragleave", () => dz.classList.remove("over"));
    target.addEventListener("drop", (e) => { e.preventDefault(); dz.classList.remove("over"); uploadFiles([...e.dataTransfer.files]); });
  }
  $("brush-size").addEventListener("input", (e) => { S.brush = +e.target.value; $("brush-size-value").textContent = e.target.value; draw(); });
  $("opacity").addEventListener("input", (e) => { S.opacity = e.target.value / 100; draw(); });
  $("show-mask").addEventListener("change", (e) => { S.outline = e.target.checked; if (S.labels) maskChanged(); });
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("reset").addEventListener("click", resetMask);
  $("zoom-fit").addEventListener("click", fit);
  $("scale-apply").addEventListener("click", applyScale);
  $("scale-cancel").addEventListener("click", () => { S.scaleLine = null; $("scale-form").hidden = true; draw(); });
  $("play").addEventListener("click", togglePlay);
  $("scrub").addEventListener("input", (e) => { stopPlaying(); showFrame(+e.target.value); });
  $("save").addEventListener("click", () => save(false));
  $("save-all").addEventListener("click", () => save(true));
  $("dl-mask").addEventListener("click", () => download(`/api/cases/${S.current.id}/frames/${S.frame}/mask.png?download=true`, `${stemOf(S.current.name)}_f${S.frame}_mask.png`));
  $("dl-csv").addEventListener("click", () => download(`/api/cases/${S.current.id}/measurements.csv`, `${stemOf(S.current.name)}_measurements.csv`));
  $("dl-report").addEventListener("click", () => download("/api/report.md", "screening_report.md"));
  $("dl-dicom").addEventListener("click", downloadDicom);
  $("report").addEventListener("click", showReport);
  for (const id of ["tag-subject", "tag-region", "tag-side"]) $(id).addEventListener("change", saveTags);
  $("ft-start").addEventListener("click", startFinetune);
  $("ft-stop").addEventListener("click", stopFinetune);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    S.token = $("token-input").value.trim();
    sessionStorage.setItem("nerveseg-token", S.token);
    $("token-form").hidden = true;
    start();
  });
  // keep the canvas buffer the size of its box (panels and the cine bar change it), so the
  // image is never stretched; re-fit unless the user has zoomed or panned
  new ResizeObserver(() => {
    if (S.userView) { resizeCanvas(); draw(); } else fit();
    drawPlot();
  }).observe($("viewer"));
  window.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); undo(); }
    else if ((e.ctrlKey || e.metaKey) && (e.key === "y" || (e.shiftKey && e.key === "Z"))) { e.preventDefault(); redo(); }
    else if (e.key === " " && S.current && S.current.n_frames > 1) { e.preventDefault(); togglePlay(); }
    else if (e.key === "b") setTool("brush");
    else if (e.key === "e") setTool("eraser");
    else if (e.key === "k") setTool("keep");
    else if (e.key === "p") setTool("pan");
  });
}

async function start() {
  try {
    const health = await (await fetch("/api/health")).json();
    if (health.auth_required && !S.token) { showTokenForm(); return; }
    await loadModel();
    await refreshFinetune();
    const cases = await apiJSON("/api/cases");
    // The server's order (upload order) is the list's, whatever the timing: a file the clinician
    // uploads while this list loads must not land between the older cases. So every item is placed
    // at once, the server's cases first, and only then are the thumbnails fetched.
    const list = $("case-list");
    const known = new Set(cases.map((c) => c.id));
    const uploadedHere = [...list.children].filter((li) => !known.has(li.dataset.id));
    const fresh = cases.filter((c) => !S.cases.has(c.id));
    for (const c of fresh) { S.cases.set(c.id, c); appendListItem(c); }
    list.replaceChildren(...cases.map((c) => list.querySelector(`li[data-id="${c.id}"]`)).filter(Boolean), ...uploadedHere);
    S.order = [...list.children].map((li) => li.dataset.id);
    for (const c of fresh) await refreshThumbnail(c.id);
  } catch (err) { showError(err.message); }
}

// a token handed over in the address (#token=...) is kept for this tab only and removed from the URL
if (location.hash.startsWith("#token=")) {
  S.token = decodeURIComponent(location.hash.slice(7));
  sessionStorage.setItem("nerveseg-token", S.token);
  history.replaceState(null, "", location.pathname);
}
wire();
setTool("pan");
start();
