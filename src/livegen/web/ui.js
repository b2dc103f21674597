// The page's output side: the current image with its download link, the gallery of recent
// frames, the frames/s and latency counters, the status pill and the error box.

const $ = (id) => document.getElementById(id);

/** The shown image and the last `size` frames. Result images that came as bytes are blob:
 * URLs; each is revoked once it is neither shown nor in the gallery. */
export class Frames {
  constructor({ size = 12 } = {}) {
    this.size = size;
    this.current = null;
    this.thumbs = []; // newest first: {url, info}
  }

  push(url, info) {
    this.thumbs.unshift({ url, info });
    const gallery = $("gallery");
    gallery.prepend(this.thumb(url, info));
    const evicted = this.thumbs.splice(this.size);
    for (let i = 0; i < evicted.length; i++) gallery.lastElementChild.remove();
    this.show(url, info);
    for (const old of evicted) this.release(old.url);
  }

  thumb(url, info) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = info.prompt ? `earlier frame: ${info.prompt}` : "earlier frame";
    img.title = `seed ${info.seed}`;
    img.addEventListener("click", () => this.show(url, info));
    return img;
  }

  show(url, info) {
    const previous = this.current;
    this.current = url;
    const image = $("result");
    image.src = url;
    image.dataset.prompt = info.prompt ?? "";
    image.dataset.source = info.source ?? "";
    image.dataset.seed = String(info.seed ?? "");
    if (info.strokes !== undefined) image.dataset.strokes = String(info.strokes);
    $("placeholder").hidden = true;
    const download = $("download");
    download.href = url;
    const ext = (info.contentType ?? "image/jpeg").split("/")[1].replace("jpeg", "jpg");
    download.download = `livegen-${info.seed ?? "image"}.${ext}`;
    download.removeAttribute("aria-disabled");
    if (previous && previous !== url) this.release(previous);
  }

  release(url) {
    if (url.startsWith("blob:") && url !== this.current && !this.thumbs.some((t) => t.url === url)) {
      URL.revokeObjectURL(url);
    }
  }
}

/** A result's first image as a URL: the data URL the server sent, or a blob: URL for bytes. */
export function imageUrl(output) {
  const image = output.images?.[0];
  if (!image) return null;
  if (image.content instanceof Uint8Array) {
    return URL.createObjectURL(new Blob([image.content], { type: image.content_type || "image/jpeg" }));
  }
  return image.url || null;
}

/** Frames per second over a sliding window, page-measured latency and the server's timing. */
export class Stats {
  constructor(windowMs = 2000) {
    this.windowMs = windowMs;
    this.times = [];
    this.count = 0;
    setInterval(() => this.render(), 500); // so frames/s falls back to 0 when results stop
  }

  result(latencyMs) {
    this.times.push(performance.now());
    this.count += 1;
    if (latencyMs !== null) $("latency").textContent = latencyMs.toFixed(0);
    $("frames").textContent = String(this.count);
    this.render();
  }

  serverTiming(seconds) {
    $("server-ms").textContent = (seconds * 1000).toFixed(0);
  }

  render() {
    const now = performance.now();
    while (this.times.length && now - this.times[0] > this.windowMs) this.times.shift();
    $("fps").textContent = (this.times.length / (this.windowMs / 1000)).toFixed(1);
  }
}

export function setStatus(state, text) {
  const pill = $("status");
  pill.dataset.state = state;
  pill.textContent = text;
}

let errorKind = null;

/** Show a message in plain words; `kind` lets a later success clear only what it resolves. */
export function showError(message, kind = "other") {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  errorKind = kind;
}

export function clearError(...kinds) {
  if (errorKind === null || (kinds.length && !kinds.includes(errorKind))) return;
  const box = $("error");
  box.hidden = true;
  box.textContent = "";
  errorKind = null;
}
