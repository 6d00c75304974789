// The playground: picks an image, calls this server's /v1 routes, shows the answer as it streams in
// and draws boxes and points over the image. Plain JS, no dependencies: the page must work offline
// and without a build step, and EventSource cannot POST, so the SSE body is read from fetch().

const SVG_NS = "http://www.w3.org/2000/svg";
const KEY_STORAGE = "moondream-playground-api-key";

const $ = (id) => document.getElementById(id);
const el = {
  status: $("server-status"),
  dropzone: $("dropzone"),
  file: $("file"),
  stage: $("stage"),
  frame: $("frame"),
  image: $("image"),
  overlay: $("overlay"),
  info: $("image-info"),
  form: $("form"),
  length: $("length"),
  question: $("question"),
  reasoning: $("reasoning"),
  object: $("object"),
  temperature: $("temperature"),
  topP: $("top-p"),
  maxTokens: $("max-tokens"),
  maxObjects: $("max-objects"),
  stream: $("stream"),
  apiKey: $("api-key"),
  run: $("run"),
  stop: $("stop"),
  result: $("result"),
  error: $("error"),
  answer: $("answer"),
  reasoningBox: $("reasoning-box"),
  reasoningText: $("reasoning-text"),
  coords: $("coords"),
  coordsCaption: $("coords-caption"),
  coordsHead: $("coords-head"),
  coordsBody: $("coords-body"),
  timings: $("timings"),
  raw: $("raw"),
  rawText: $("raw-text"),
};

// The chosen image: its data URL (sent as is) and its pixel size (the grid coordinates refer to).
let image = null;
let controller = null;

// ------------------------------------------------------------------------------------ image

function isImageFile(file) {
  return file && file.type.startsWith("image/");
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function setImage(file) {
  if (!isImageFile(file)) {
    showError(`"${file ? file.name : "That"}" is not an image file.`);
    return;
  }
  const dataUrl = await readAsDataUrl(file);
  // Decoded aside first, so that a file the browser cannot show leaves the current image in place.
  const probe = new Image();
  probe.src = dataUrl;
  try {
    await probe.decode();
  } catch {
    showError(`This browser cannot display "${file.name}"; try a JPEG, PNG or WebP image.`);
    return;
  }
  // naturalWidth/Height follow the EXIF orientation, as the server's coordinates do.
  image = { dataUrl, name: file.name, width: probe.naturalWidth, height: probe.naturalHeight };
  el.image.src = dataUrl;
  el.image.alt = `The chosen image, ${file.name}`;
  el.frame.style.setProperty("--aspect", String(image.width / image.height));
  el.overlay.setAttribute("viewBox", `0 0 ${image.width} ${image.height}`);
  el.overlay.setAttribute("preserveAspectRatio", "none");
  el.info.textContent = `${file.name} · ${image.width} × ${image.height} px · ${formatBytes(file.size)}`;
  el.stage.hidden = false;
  el.dropzone.classList.add("compact");
  clearResult();
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

el.file.addEventListener("change", () => {
  if (el.file.files.length) setImage(el.file.files[0]);
  el.file.value = ""; // picking the same file again still counts as a change
});
// A file dropped anywhere on the page is taken (the browser would otherwise navigate to it).
for (const type of ["dragenter", "dragover"]) {
  document.addEventListener(type, (event) => {
    event.preventDefault();
    el.dropzone.classList.add("over");
  });
}
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) el.dropzone.classList.remove("over");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  el.dropzone.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) setImage(file);
});
document.addEventListener("paste", (event) => {
  const file = [...event.clipboardData.files].find(isImageFile);
  if (file) setImage(file);
});

// ------------------------------------------------------------------------------------ form

function skill() {
  return el.form.elements.skill.value;
}

function showFieldsFor(current) {
  for (const node of el.form.querySelectorAll("[data-skills]")) {
    node.hidden = !node.dataset.skills.split(" ").includes(current);
  }
}

el.form.addEventListener("change", (event) => {
  if (event.target.name === "skill") showFieldsFor(skill());
});

// The key is kept for this tab only (session storage), so a reload does not ask for it again.
function remembered() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled: the field just starts empty
  }
}
el.apiKey.value = remembered();
el.apiKey.addEventListener("input", () => {
  el.apiKey.removeAttribute("aria-invalid");
  try {
    sessionStorage.setItem(KEY_STORAGE, el.apiKey.value);
  } catch {
    // storage disabled: the key still works for this page
  }
});

function numberField(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

function buildRequest(current) {
  const body = {};
  if (image) body.image_url = image.dataUrl;
  const settings = {};
  if (current === "caption" || current === "query") {
    settings.temperature = numberField(el.temperature);
    settings.top_p = numberField(el.topP);
    settings.max_tokens = numberField(el.maxTokens);
    body.stream = el.stream.checked;
  } else {
    settings.max_objects = numberField(el.maxObjects);
  }
  if (current === "caption") body.length = el.length.value;
  if (current === "query") body.question = el.question.value.trim();
  // A reasoning answer is not streamed (the stream would carry the answer only), so ask for JSON.
  if (current === "query" && el.reasoning.checked) {
    body.reasoning = true;
    body.stream = false;
  }
  if (current === "detect" || current === "point") body.object = el.object.value.trim();
  const set = Object.fromEntries(Object.entries(settings).filter(([, v]) => v !== undefined));
  if (Object.keys(set).length) body.settings = set;
  return body;
}

// What the page can tell before asking the server (the server checks everything again).
function problemWith(current, body) {
  if (!image && current !== "query") return "Choose an image first.";
  if (current === "query" && !body.question) return "Type a question.";
  if ((current === "detect" || current === "point") && !body.object) return "Name the object to look for.";
  for (const input of [el.temperature, el.topP, el.maxTokens, el.maxObjects]) {
    if (!input.closest("[hidden]") && !input.checkValidity()) {
      return `${input.labels[0].firstChild.textContent.trim()}: ${input.validationMessage}`;
    }
  }
  return null;
}

el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  run();
});
el.stop.addEventListener("click", () => controller && controller.abort());

// ------------------------------------------------------------------------------------ requests

async function run() {
  const current = skill();
  const body = buildRequest(current);
  clearResult();
  const problem = problemWith(current, body);
  if (problem) {
    showError(problem);
    return;
  }
  controller = new AbortController();
  setRunning(true);
  const headers = { "Content-Type": "application/json" };
  const key = el.apiKey.value.trim();
  if (key) headers["X-Moondream-Auth"] = key;
  const started = performance.now();
  const target = image; // what the answer's coordinates will refer to, whatever is picked meanwhile
  try {
    const response = await send(`/v1/${current}`, {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (response.status === 401) el.apiKey.setAttribute("aria-invalid", "true");
    if (!response.ok) throw new Error(await describeHttpError(response));
    const type = response.headers.get("Content-Type") || "";
    if (type.startsWith("text/event-stream")) {
      await readStream(response, started);
    } else {
      showAnswer(current, await response.json(), started, target);
    }
    if (el.result.dataset.state !== "error") el.result.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      el.result.dataset.state = "stopped";
      addTiming("Stopped after", ms(performance.now() - started));
    } else {
      showError(err.message);
      if (el.apiKey.getAttribute("aria-invalid") === "true") el.apiKey.focus();
    }
  } finally {
    controller = null;
    setRunning(false);
  }
}

// fetch() rejects with a TypeError when the server cannot be reached: say so in words.
async function send(url, options) {
  try {
    return await fetch(url, options);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Error(`Could not reach the server: ${err.message}`);
  }
}

async function describeHttpError(response) {
  let message = response.statusText;
  try {
    const payload = await response.json();
    const detail = payload.error ? payload.error.message : payload.detail;
    if (typeof detail === "string") message = detail;
    else if (Array.isArray(detail)) message = detail.map((d) => d.msg).join("; ");
  } catch {
    // not JSON: keep the status text
  }
  let text = `Error ${response.status}: ${message}`;
  if (response.status === 401) text += " — enter this server's API key in the API key field.";
  const retry = response.headers.get("Retry-After");
  if (retry) text += ` Retry after ${retry} s.`;
  return text;
}

// Server-sent events from a fetch() body: events are separated by a blank line, and an event's
// "data:" lines joined by newlines hold one JSON object. Comment lines (": ping") are skipped.
async function* sseEvents(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const onAbort = () => reader.cancel();
  signal.addEventListener("abort", onAbort);
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (signal.aborted) throw new DOMException("stopped", "AbortError");
      if (done) return;
      buffer += value;
      let match;
      while ((match = /\r?\n\r?\n/.exec(buffer))) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield JSON.parse(data);
      }
    }
  } finally {
    signal.removeEventListener("abort", onAbort);
    reader.releaseLock();
  }
}

async function readStream(response, started) {
  el.result.dataset.state = "streaming";
  el.answer.hidden = false;
  let first = null;
  let pieces = 0;
  let completed = false;
  for await (const event of sseEvents(response.body, controller.signal)) {
    if (event.chunk) {
      if (first === null) first = performance.now();
      pieces += 1;
      el.answer.append(event.chunk);
    }
    if (event.error) showError(`The answer stopped early: ${event.error.message}`);
    if (event.completed) {
      completed = true;
      el.rawText.textContent = JSON.stringify(event, null, 2);
      el.raw.hidden = false;
      break;
    }
  }
  const end = performance.now();
  if (!completed) showError("The connection closed before the answer was complete.");
  if (first !== null) addTiming("Time to first token", ms(first - started), "ttft");
  addTiming("Total", ms(end - started), "total");
  addTiming("Streamed pieces", String(pieces));
}

function showAnswer(current, payload, started, target) {
  const end = performance.now();
  el.rawText.textContent = JSON.stringify(payload, null, 2);
  el.raw.hidden = false;
  if (current === "caption" || current === "query") {
    el.answer.hidden = false;
    el.answer.textContent = current === "caption" ? payload.caption : payload.answer;
    if (payload.reasoning) showReasoning(payload.reasoning, target);
  } else if (current === "detect") {
    drawBoxes(payload.objects, target);
  } else {
    drawPoints(payload.points, target);
  }
  const m = payload.metrics;
  if (m && (current === "caption" || current === "query")) {
    addTiming("Time to first token", ms(m.ttft_ms), "ttft");
  }
  addTiming("Total", ms(end - started), "total");
  if (m) addTiming("Server: prefill / decode", `${ms(m.prefill_time_ms)} / ${ms(m.decode_time_ms)}`);
  if (m && (current === "caption" || current === "query")) {
    addTiming("Tokens in / out", `${m.input_tokens} / ${m.output_tokens}`);
  }
}

// ------------------------------------------------------------------------------------ overlay

function svg(name, attrs) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

// Shapes live in the image's own pixel grid (the SVG's viewBox), so they scale with the image. They
// are drawn only over the image the request was about (none for a text-only query, none if another
// image was picked while the request ran); the table lists the coordinates in any case.
function label(index, x, y, size) {
  const text = svg("text", { x, y, class: "label", "font-size": size });
  text.textContent = String(index + 1);
  return text;
}

function onShownImage(target) {
  return target !== null && target === image;
}

function drawBoxes(boxes, target) {
  const { width: w, height: h } = target || {};
  const size = Math.max(w, h) * 0.035;
  const drawn = onShownImage(target) ? boxes : [];
  drawn.forEach((b, i) => {
    const group = svg("g", { class: "shape", "data-index": i });
    group.append(
      svg("rect", {
        class: "box",
        x: b.x_min * w,
        y: b.y_min * h,
        width: (b.x_max - b.x_min) * w,
        height: (b.y_max - b.y_min) * h,
        "data-index": i,
      }),
      label(i, b.x_min * w + size * 0.25, Math.max(b.y_min * h, 0) + size, size),
    );
    el.overlay.append(group);
  });
  fillTable(
    boxes.length ? `${boxes.length} box${boxes.length === 1 ? "" : "es"}.` : "Nothing found.",
    ["#", "x_min", "y_min", "x_max", "y_max"],
    boxes.map((b) => [b.x_min, b.y_min, b.x_max, b.y_max]),
  );
}

// The reasoning text with its grounded spans marked, and the points they refer to drawn.
function showReasoning(reasoning, target) {
  // start_idx/end_idx count characters (code points), not UTF-16 units.
  const chars = Array.from(reasoning.text);
  const points = [];
  const nodes = [];
  let at = 0;
  for (const g of [...reasoning.grounding].sort((a, b) => a.start_idx - b.start_idx)) {
    const first = points.length + 1;
    points.push(...g.points.map(([x, y]) => ({ x, y })));
    if (g.start_idx < at) continue; // overlaps the previous span: its points are still drawn
    nodes.push(chars.slice(at, g.start_idx).join(""));
    const mark = document.createElement("mark");
    mark.textContent = chars.slice(g.start_idx, g.end_idx).join("");
    const last = points.length;
    mark.title = last > first ? `points ${first}–${last}` : `point ${first}`;
    nodes.push(mark);
    at = Math.max(at, g.end_idx);
  }
  nodes.push(chars.slice(at).join(""));
  el.reasoningText.replaceChildren(...nodes);
  el.reasoningBox.hidden = false;
  if (points.length) drawPoints(points, target, "the reasoning looked at");
}

function drawPoints(points, target, what = "") {
  const { width: w, height: h } = target || {};
  const r = Math.max(w, h) * 0.012;
  const drawn = onShownImage(target) ? points : [];
  drawn.forEach((p, i) => {
    const group = svg("g", { class: "shape", "data-index": i });
    group.append(
      svg("circle", { class: "point", cx: p.x * w, cy: p.y * h, r, "data-index": i }),
      label(i, p.x * w + r * 1.3, p.y * h - r * 1.3, r * 2.8),
    );
    el.overlay.append(group);
  });
  const count = `${points.length} point${points.length === 1 ? "" : "s"}`;
  fillTable(
    points.length ? `${what ? `${count} ${what}` : count}.` : "Nothing found.",
    ["#", "x", "y"],
    points.map((p) => [p.x, p.y]),
  );
}

function fillTable(caption, columns, rows) {
  el.coordsCaption.textContent =
    `${caption} Coordinates are fractions of the image's width and height, from the top-left corner.`;
  const head = document.createElement("tr");
  for (const name of columns) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = name;
    head.append(th);
  }
  el.coordsHead.replaceChildren(head);
  el.coordsBody.replaceChildren(
    ...rows.map((values, i) => {
      const tr = document.createElement("tr");
      tr.dataset.index = String(i);
      tr.tabIndex = 0;
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = String(i + 1);
      tr.append(th);
      for (const v of values) {
        const td = document.createElement("td");
        td.textContent = v.toFixed(3);
        td.title = String(v);
        tr.append(td);
      }
      return tr;
    }),
  );
  el.coords.hidden = false;
}

// Hovering or focusing a row highlights its shape, and hovering a shape highlights its row.
function highlight(index) {
  for (const node of el.overlay.querySelectorAll(".shape")) {
    node.classList.toggle("active", node.dataset.index === index);
  }
  for (const row of el.coordsBody.rows) row.classList.toggle("active", row.dataset.index === index);
}
for (const type of ["mouseover", "focusin"]) {
  el.coordsBody.addEventListener(type, (event) => {
    const row = event.target.closest("tr");
    highlight(row ? row.dataset.index : null);
  });
}
el.coordsBody.addEventListener("mouseleave", () => highlight(null));
el.coordsBody.addEventListener("focusout", () => highlight(null));

// ------------------------------------------------------------------------------------ result

function ms(value) {
  return `${Math.round(value).toLocaleString("en")} ms`;
}

function addTiming(name, value, key) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  if (key) dd.dataset.key = key;
  el.timings.append(dt, dd);
  el.timings.hidden = false;
}

function showError(message) {
  el.error.textContent = message;
  el.error.hidden = false;
  el.result.dataset.state = "error";
}

function clearResult() {
  el.result.dataset.state = "idle";
  el.error.hidden = true;
  el.error.textContent = "";
  el.answer.hidden = true;
  el.answer.textContent = "";
  el.reasoningBox.hidden = true;
  el.reasoningText.replaceChildren();
  el.coords.hidden = true;
  el.coordsHead.replaceChildren();
  el.coordsBody.replaceChildren();
  el.timings.hidden = true;
  el.timings.replaceChildren();
  el.raw.hidden = true;
  el.rawText.textContent = "";
  el.overlay.replaceChildren();
}

function setRunning(running) {
  // Screen readers announce the result once, when it is complete, not every streamed piece.
  el.result.setAttribute("aria-busy", String(running));
  el.run.disabled = running;
  el.run.textContent = running ? "Running…" : "Run";
  el.stop.hidden = !running;
  if (running) el.result.dataset.state = "running";
}

// ------------------------------------------------------------------------------------ server

async function checkServer() {
  try {
    const response = await fetch("/health");
    const h = await response.json();
    const what = `${h.model}${h.revision ? ` @ ${h.revision}` : ""} · ${h.device} · ${h.dtype}`;
    if (h.ready) {
      el.status.textContent = `${what} · ready`;
      el.status.dataset.state = "ready";
    } else if (h.error) {
      el.status.textContent = `${what} · failed to load: ${h.error}`;
      el.status.dataset.state = "failed";
    } else {
      el.status.textContent = `${what} · loading the model…`;
      el.status.dataset.state = "loading";
      setTimeout(checkServer, 2000);
    }
  } catch {
    el.status.textContent = "The server does not answer /health.";
    el.status.dataset.state = "failed";
  }
}

showFieldsFor(skill());
checkServer();
