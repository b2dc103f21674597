// livegen playground: the controls, wired to a RealtimeClient (realtime.js). Text-to-image as
// you type; image-to-image from the webcam (continuously) or from a sketch (on each stroke).
import { AuthError, RealtimeClient, requestToken } from "./realtime.js";
import { Sketch, Webcam } from "./sources.js";
import { clearError, Frames, imageUrl, setStatus, showError, Stats } from "./ui.js";

const $ = (id) => document.getElementById(id);
const KEY = "livegen.apiKey"; // sessionStorage: this tab only, gone when it closes
const THROTTLE_MS = 120;
const APPS = {
  "fal-ai/fast-turbo-diffusion": {
    models: ["stabilityai/sd-turbo", "stabilityai/sdxl-turbo"],
    steps: 1,
    guidance: 1,
  },
  "fal-ai/fast-lcm-diffusion": {
    models: ["runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"],
    steps: 4,
    guidance: 1.5,
  },
};
const FRAME_ERRORS = {
  MODEL_UNAVAILABLE: (r) => `That model is not available on this server: ${r}`,
  INVALID_INPUT: (r) => `The server did not accept these settings: ${r}`,
  PAYLOAD_TOO_LARGE: (r) => `That image is too large for the server: ${r}`,
  OVERLOADED: () => "The server is overloaded; some frames were skipped.",
  INTERNAL_ERROR: (r) => `The server hit an error (${r}). Reconnecting…`,
};

const frames = new Frames();
const stats = new Stats();
const webcam = new Webcam($("video"), $("frame"));
const sketch = new Sketch($("sketch"), {
  color: () => $("brush-color").value,
  size: () => Number($("brush-size").value),
  onChange: () => {
    sketch.strokes = (sketch.strokes ?? 0) + 1;
    throttledSend();
  },
});
let mode = "text";
let connectionLost = false; // since the last open socket: refusals then read "Connection lost: …"

const client = new RealtimeClient({
  app: $("app").value,
  tokenProvider: (alias, seconds) => {
    const key = sessionStorage.getItem(KEY);
    if (!key) return Promise.reject(new AuthError("Enter an API key first."));
    return requestToken(key, alias, { seconds });
  },
  on: { result: onResult, timing: (s) => stats.serverTiming(s), error: onError, status: onStatus },
});

// -- frames ---------------------------------------------------------------------------------

function baseFrame() {
  const size = Number($("size").value);
  const frame = {
    prompt: $("prompt").value.trim(),
    model_name: $("model").value,
    image_size: { width: size, height: size },
    num_inference_steps: Number($("steps").value) || 1,
    guidance_scale: Number($("guidance").value) || 0,
    sync_mode: true,
  };
  if (!$("random-seed").checked) frame.seed = Number($("seed").value) || 0;
  return frame;
}

/** Image-to-image runs int(steps × strength) denoising steps, which must be at least 1. */
function imageFrame(bytes) {
  const strength = Number($("strength").value);
  const frame = { ...baseFrame(), image_bytes: bytes, strength };
  let steps = frame.num_inference_steps;
  while (Math.trunc(steps * strength) < 1) steps += 1;
  const note = $("steps-note");
  note.hidden = steps === frame.num_inference_steps;
  if (!note.hidden) note.textContent = `At strength ${strength} image-to-image needs ${steps} steps to run one; sending ${steps}.`;
  frame.num_inference_steps = steps;
  return frame;
}

function promptReady() {
  const ready = $("prompt").value.trim() !== "";
  if (!ready) $("placeholder").textContent = "Type a prompt — the image follows as you type.";
  return ready;
}

let sketchSeq = 0;
async function sendCurrent() {
  if (!promptReady()) return;
  if (mode === "text") client.send(baseFrame(), { source: "text" });
  else if (mode === "sketch") {
    const seq = ++sketchSeq;
    const strokes = sketch.strokes ?? 0;
    const bytes = await sketch.bytes();
    if (seq === sketchSeq && mode === "sketch") client.send(imageFrame(bytes), { source: "sketch", strokes });
  } // webcam: the loop below picks up the new settings with its next frame
}

/** Leading and trailing: the first change goes out at once, then at most one per interval,
 * and the last change always goes out (it reads the controls when it runs: latest wins). */
function throttle(fn, ms) {
  let last = -Infinity;
  let timer = null;
  return () => {
    const wait = last + ms - performance.now();
    if (wait <= 0) {
      last = performance.now();
      fn();
    } else if (timer === null) {
      timer = setTimeout(() => {
        timer = null;
        last = performance.now();
        fn();
      }, wait);
    }
  };
}
const throttledSend = throttle(sendCurrent, THROTTLE_MS);

let grabbing = false;
let webcamRun = 0; // one loop at a time, even after quick tab switches
async function webcamLoop(run) {
  if (mode !== "webcam" || run !== webcamRun) return;
  if (!grabbing && webcam.running && promptReady() && client.wantsFrame()) {
    grabbing = true;
    try {
      const bytes = await webcam.grab();
      if (bytes && mode === "webcam") client.send(imageFrame(bytes), { source: "webcam" });
    } finally {
      grabbing = false;
    }
  }
  requestAnimationFrame(() => webcamLoop(run));
}

// -- results and errors ---------------------------------------------------------------------

function onResult(output, { latencyMs, meta }) {
  const url = imageUrl(output);
  if (url) {
    const image = output.images[0];
    frames.push(url, {
      prompt: output.prompt,
      seed: output.seed,
      source: meta?.source,
      strokes: meta?.strokes,
      contentType: image.content_type,
    });
  }
  stats.result(latencyMs);
  clearError();
}

function onError(error) {
  const secs = error.retryInMs ? ` Retrying in ${(error.retryInMs / 1000).toFixed(0)} s…` : "";
  switch (error.kind) {
    case "auth":
      stop();
      showError(`${error.message} Check it and enter it again.`, "auth");
      return;
    case "token":
      showConnectionError(error.message, secs);
      return;
    case "lost":
      connectionLost = true;
      showError(`Connection lost.${secs}`, "connection");
      return;
    case "refused":
      explainRefusal(secs);
      return;
    default: {
      const describe = FRAME_ERRORS[error.code] ?? ((r) => `${error.code}: ${r}`);
      showError(describe(error.message), "frame");
    }
  }
}

/** A browser cannot see why a WebSocket handshake was refused; /readyz (no key needed) says
 * whether the server is loading, failed or shutting down. Otherwise it is full. */
async function explainRefusal(secs) {
  let message;
  try {
    const ready = await (await fetch("readyz", { cache: "no-store" })).json();
    if (ready.status === "loading") message = "The server is still loading its models.";
    else if (ready.status === "failed") message = `The server failed to start: ${ready.error}.`;
    else if (ready.status === "draining") message = "The server is shutting down.";
    else message = "The server is full (it has reached its limit of realtime sessions).";
  } catch {
    message = "The server cannot be reached.";
  }
  if (client.state !== "open") showConnectionError(message, secs); // unless it recovered meanwhile
}

function showConnectionError(message, secs) {
  const text = connectionLost ? `Connection lost: ${message[0].toLowerCase()}${message.slice(1)}` : message;
  showError(text + secs, "connection");
}

function onStatus(state, info) {
  const app = client.app.split("/")[1];
  if (state === "open") {
    connectionLost = false;
    setStatus("open", `live · ${app}`);
    clearError("connection");
  } else if (state === "connecting") setStatus("connecting", "connecting…");
  else if (state === "waiting") setStatus("waiting", `reconnecting in ${(info.retryInMs / 1000).toFixed(0)} s`);
  else setStatus("idle", "idle");
}

// -- controls -------------------------------------------------------------------------------

async function setMode(next) {
  mode = next;
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.mode === next));
  $("source").hidden = next === "text";
  $("video").hidden = next !== "webcam";
  $("sketch-box").hidden = next !== "sketch";
  $("steps-note").hidden = true;
  client.maxInFlight = next === "webcam" ? 2 : 1; // pipelined for video, freshest for typing
  if (next !== "webcam") webcam.stop();
  if (next === "webcam") {
    try {
      await webcam.start();
    } catch (error) {
      showError(`The webcam could not be opened: ${error.message}`, "webcam");
      return;
    }
    if (mode !== "webcam") webcam.stop(); // switched away while the camera was starting
    else webcamLoop(++webcamRun);
  } else throttledSend();
}

async function fillModels() {
  const config = APPS[$("app").value];
  const options = config.models.map((m) => new Option(m, m));
  $("model").replaceChildren(...options);
  $("steps").value = config.steps;
  $("guidance").value = config.guidance;
  try {
    const ready = await (await fetch("readyz", { cache: "no-store" })).json();
    for (const option of options) {
      const state = ready.models?.[option.value];
      if (state && state !== "loaded") option.textContent = `${option.value} (${state})`;
    }
  } catch {
    // only a label: the server reports an unloaded model when it is asked for it
  }
}

function start() {
  $("key-form").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = false;
  clearError("auth");
  setMode(mode);
}

function stop() {
  client.close();
  webcam.stop();
  sessionStorage.removeItem(KEY);
  $("main").hidden = true;
  $("forget").hidden = true;
  $("key-form").hidden = false;
  $("key").focus();
  setStatus("idle", "not connected");
}

function init() {
  fillModels();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("key").value = "";
    start();
  });
  $("forget").addEventListener("click", () => {
    stop();
    clearError();
  });
  $("app").addEventListener("change", () => {
    fillModels();
    client.setApp($("app").value);
    throttledSend();
  });
  for (const id of ["prompt", "model", "size", "steps", "guidance", "seed", "random-seed", "strength"]) {
    $(id).addEventListener("input", throttledSend);
  }
  $("strength").addEventListener("input", () => {
    $("strength-value").textContent = Number($("strength").value).toFixed(2);
  });
  $("clear-sketch").addEventListener("click", () => {
    sketch.clear();
    sketch.onChange();
  });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  if (sessionStorage.getItem(KEY)) start();
  else $("key").focus();
}

init();
