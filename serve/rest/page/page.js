// The draw-a-digit page: pointer drawing on a canvas (mouse, touch, pen), or a chosen or dropped
// photo, sent to POST /v1/classify; the answer is drawn as a digit, ten bars and the 28x28 input.
// Where the server serves several models or versions, a list picks the one that reads the digit.
// Its URLs are relative to the page, so that it works where a path prefix leads to the server (an
// ingress routing /digits/ to it, `kubectl proxy`'s URL of a service).
"use strict";

const pad = document.getElementById("pad");
const ink = pad.getContext("2d");
const fileInput = document.getElementById("file");
const statusLine = document.getElementById("status");
const digitOut = document.getElementById("digit");
const seen = document.getElementById("seen");
const bars = document.getElementById("bars");
const about = document.getElementById("about");
const tokenBox = document.getElementById("token-box");
const tokenInput = document.getElementById("token");
const modelBox = document.getElementById("model-box");
const modelChoice = document.getElementById("model");

const LIVE_INTERVAL_MS = 150; // while drawing: at most one request per interval
// A photo over this many bytes (a phone's are 3-8 MB; the server takes 4 MiB by default) is sent
// scaled down to PHOTO_SIDE pixels on its longer side, as JPEG (PNG where it has transparency, which
// JPEG would lose): the model reads 28x28 pixels of it either way. As PNG, a noisy photo scaled so
// was 1.2 MB, 6x the JPEG's bytes (seconds on a phone's uplink), and 3x the server's work to decode.
const PHOTO_BYTES = 1 << 20;
const PHOTO_SIDE = 1024;
const PHOTO_QUALITY = 0.9; // as resserve classify's
let drawing = false;
let drawn = false;
let last = null;
let busy = false; // a request in flight: the next drawing waits for it
let again = false; // the drawing changed while a request was in flight
let lastSent = 0;
let generation = 0; // bumped by every clear, photo and choice of model: older answers are not shown
let photo = null; // the photo on the pad, as sent ({blob, name}), if any: sent again once a token is given

function clearPad() {
  generation++;
  again = false;
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
  drawn = false;
  photo = null;
  digitOut.textContent = "–";
  seen.removeAttribute("src");
  showBars(null);
  setStatus("Draw something to start.");
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function showBars(probabilities) {
  bars.replaceChildren();
  const best = probabilities ? probabilities.indexOf(Math.max(...probabilities)) : -1;
  for (let d = 0; d < 10; d++) {
    const p = probabilities ? probabilities[d] : 0;
    const item = document.createElement("li");
    item.className = d === best ? "best" : "";
    item.innerHTML = `<span>${d}</span><div class="bar"><span style="width:${(p * 100).toFixed(1)}%"></span></div>` +
      `<span class="pct">${(p * 100).toFixed(1)}%</span>`;
    item.setAttribute("aria-label", `${d}: ${(p * 100).toFixed(1)} percent`);
    bars.appendChild(item);
  }
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

function stroke(to) {
  ink.strokeStyle = "#000";
  ink.lineWidth = pad.width / 14;
  ink.lineCap = ink.lineJoin = "round";
  ink.beginPath();
  ink.moveTo(...(last || to));
  ink.lineTo(...to);
  ink.stroke();
  last = to;
  drawn = true;
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  last = null;
  stroke(point(event));
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  for (const e of event.getCoalescedEvents ? event.getCoalescedEvents() : [event]) stroke(point(e));
  if (performance.now() - lastSent > LIVE_INTERVAL_MS) sendDrawing();
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => {
    if (!drawing) return;
    drawing = false;
    last = null;
    sendDrawing();
  });
}
pad.addEventListener("keydown", (event) => {
  if (event.key === "Delete" || event.key === "Backspace" || event.key === "Escape") clearPad();
});
document.getElementById("clear").addEventListener("click", clearPad);

function sendDrawing() {
  if (!drawn) return;
  if (busy) { again = true; return; }
  busy = true;
  lastSent = performance.now();
  pad.toBlob((blob) => classify(blob, "your drawing"), "image/png");
}

function withToken(headers) {
  const token = sessionStorage.getItem("resserve-token");
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

// The models the server serves (KServe's repository index): a choice only where there are several.
// Each model's first entry is its latest version, which requests that name none get. Listed again
// when the tab is shown again and when the model chosen is no longer served (unloaded, or its
// package removed from a folder the server polls); resolves to whether the choice changed.
async function listModels() {
  const before = chosenModel();
  try {
    const response = await fetch("v2/repository/index", {
      method: "POST", body: '{"ready": true}', headers: withToken({ "Content-Type": "application/json" }) });
    if (!response.ok) return false; // a token is wanted first (asked again once one is given)
    const served = await response.json();
    const options = [];
    for (const name of new Set(served.map((entry) => entry.name))) {
      const versions = served.filter((entry) => entry.name === name).map((entry) => entry.version)
        .sort((a, b) => Number(b) - Number(a));
      options.push([versions.length > 1 ? `${name} (latest: v${versions[0]})` : `${name} v${versions[0]}`,
        new URLSearchParams({ model: name }).toString()]);
      if (versions.length > 1) {
        for (const version of versions) {
          options.push([`${name} v${version}`, new URLSearchParams({ model: name, version }).toString()]);
        }
      }
    }
    modelChoice.replaceChildren(...options.map(([label, query]) => new Option(label, query)));
    if (options.some(([, query]) => query === before)) modelChoice.value = before;
    modelBox.hidden = served.length < 2;
  } catch { /* no list: the server's default model reads the digit */ }
  return chosenModel() !== before;
}

// The query that names the model chosen ("": the server's default)
function chosenModel() {
  return modelBox.hidden ? "" : modelChoice.value;
}

// The list read again; where the model chosen is gone, the digit is read again by the one now chosen.
async function refreshModels() {
  if (await listModels()) {
    generation++;
    resend();
  }
}

async function classify(blob, what) {
  const started = performance.now();
  const asked = generation;
  const headers = withToken({ "Content-Type": blob.type || "application/octet-stream" });
  const token = headers.Authorization;
  const chosen = chosenModel();
  let gone = false; // the model chosen is not served (any more)
  busy = true;
  try {
    const response = await fetch(`v1/classify${chosen && "?"}${chosen}`, { method: "POST", body: blob, headers });
    // a proxy in front of the server may answer in HTML (a 413 for a large photo, a 502): name its status
    const answer = await response.json()
      .catch(() => ({ error: `HTTP ${response.status} ${response.statusText}`.trim() }));
    if (asked !== generation) {
      // cleared, or a photo chosen, since this was sent: its answer is stale
    } else if (response.status === 401) {
      tokenBox.hidden = false;
      tokenInput.focus();
      setStatus(token ? "The server refused this token: enter another below."
        : "This server needs a bearer token: enter it below.", true);
    } else if (!response.ok) {
      gone = response.status === 404 && chosen !== "";
      setStatus(`The server could not classify ${what}: ${answer.error}`, true);
    } else {
      tokenBox.hidden = true; // answered: a refusal of an earlier request is over
      show(answer, performance.now() - started);
    }
  } catch (error) {
    setStatus(`No answer from the server: ${error.message}`, true);
  } finally {
    busy = false;
    if (gone) await refreshModels();
    if (again) { again = false; sendDrawing(); }
  }
}

function show(answer, roundTripMs) {
  const result = answer.results[0];
  digitOut.textContent = String(result.digit);
  seen.src = `data:image/png;base64,${result.input_png}`;
  showBars(result.probabilities);
  setStatus(`${result.digit}, with ${(result.confidence * 100).toFixed(1)}% confidence: ` +
    `${roundTripMs.toFixed(0)} ms round trip, ${answer.server_ms.toFixed(1)} ms in the server.`);
  about.textContent = `${answer.model} v${answer.model_version} on ${answer.backend} ` +
    `(${answer.device}, ${answer.precision})`;
}

async function classifyFile(file) {
  if (!file) return;
  const mine = ++generation;
  drawn = false;
  let blob = file; // the server gets the file itself, or a smaller copy of a large photo
  try { // show the photo on the pad, fitted
    const picture = await createImageBitmap(file);
    const scale = Math.min(pad.width / picture.width, pad.height / picture.height);
    const [w, h] = [picture.width * scale, picture.height * scale];
    ink.fillStyle = "#fff";
    ink.fillRect(0, 0, pad.width, pad.height);
    ink.drawImage(picture, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    if (file.size > PHOTO_BYTES) blob = await scaledDown(picture);
  } catch { /* not an image the browser can show: the server will say what is wrong */ }
  if (mine !== generation) return; // cleared, or another photo chosen, while this one was read
  photo = { blob, name: file.name };
  classify(blob, file.name);
}

function scaledDown(picture) {
  const scale = Math.min(1, PHOTO_SIDE / Math.max(picture.width, picture.height));
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [Math.round(picture.width * scale), Math.round(picture.height * scale)];
  const context = canvas.getContext("2d");
  context.drawImage(picture, 0, 0, canvas.width, canvas.height);
  const type = transparent(context) ? "image/png" : "image/jpeg";
  return new Promise((resolve) => canvas.toBlob(resolve, type, PHOTO_QUALITY));
}

function transparent(context) {
  const pixels = context.getImageData(0, 0, context.canvas.width, context.canvas.height).data;
  for (let alpha = 3; alpha < pixels.length; alpha += 4) if (pixels[alpha] < 255) return true;
  return false;
}

fileInput.addEventListener("change", () => classifyFile(fileInput.files[0]));
pad.addEventListener("dragover", (event) => { event.preventDefault(); pad.classList.add("dragging"); });
pad.addEventListener("dragleave", () => pad.classList.remove("dragging"));
pad.addEventListener("drop", (event) => {
  event.preventDefault();
  pad.classList.remove("dragging");
  classifyFile(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => { // an image copied elsewhere (a screenshot, a browser's image)
  const file = [...event.clipboardData.files].find((item) => item.type.startsWith("image/"));
  if (!file) return; // text: pasted where it goes (the token box)
  event.preventDefault();
  classifyFile(file);
});
tokenBox.addEventListener("submit", (event) => { // the button or Enter
  event.preventDefault();
  sessionStorage.setItem("resserve-token", tokenInput.value.trim());
  tokenBox.hidden = true;
  setStatus("Token saved for this tab.");
  listModels();
  resend(); // what was refused for want of a token, now with it
});
modelChoice.addEventListener("change", () => { // the same digit, read by the model chosen
  generation++;
  resend();
});

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") refreshModels(); // models loaded or unloaded meanwhile
});

function resend() {
  if (drawn) sendDrawing();
  else if (photo) classify(photo.blob, photo.name);
}

clearPad();
listModels();
