// Image sources for image-to-image: the webcam and a sketch canvas. Both hand out JPEG bytes
// of a 512×512 square, sent as the frame's `image_bytes` (msgpack bin), like fal's camera demos.

export const SIDE = 512;

/** A canvas's pixels as JPEG bytes. */
export async function jpegBytes(canvas, quality = 0.85) {
  const blob = await new Promise((resolve, reject) =>
    canvas.toBlob((b) => (b ? resolve(b) : reject(new Error("the canvas could not be encoded"))), "image/jpeg", quality),
  );
  return new Uint8Array(await blob.arrayBuffer());
}

export class Webcam {
  constructor(video, scratch) {
    this.video = video;
    this.scratch = scratch; // a hidden SIDE×SIDE canvas
    this.stream = null;
  }

  get running() {
    return this.stream !== null;
  }

  async start() {
    if (this.stream) return;
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error("this browser offers no camera here (a camera needs https:// or http://localhost)");
    }
    this.stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 } },
      audio: false,
    });
    this.video.srcObject = this.stream;
    await this.video.play().catch(() => {}); // autoplay is enough where play() is refused
  }

  stop() {
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.stream = null;
    this.video.srcObject = null;
  }

  /** The current frame, center-cropped to a square and scaled to SIDE×SIDE; null before the
   * first frame has arrived. */
  async grab() {
    const { videoWidth: w, videoHeight: h } = this.video;
    if (!this.stream || !w || !h) return null;
    const side = Math.min(w, h);
    const ctx = this.scratch.getContext("2d");
    ctx.drawImage(this.video, (w - side) / 2, (h - side) / 2, side, side, 0, 0, SIDE, SIDE);
    return jpegBytes(this.scratch);
  }
}

export class Sketch {
  /** `onChange` is called while a stroke is drawn and when it ends (the caller throttles). */
  constructor(canvas, { color, size, onChange }) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.color = color;
    this.size = size;
    this.onChange = onChange;
    this.last = null;
    this.clear();
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "pointerleave"]) canvas.addEventListener(type, () => this.up());
  }

  clear() {
    const { ctx, canvas } = this;
    const sky = ctx.createLinearGradient(0, 0, 0, canvas.height);
    sky.addColorStop(0, "#bcd7f5");
    sky.addColorStop(0.62, "#eef4fb");
    sky.addColorStop(0.62, "#8fbf73");
    sky.addColorStop(1, "#5f9a4b");
    ctx.fillStyle = sky;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }

  point(event) {
    const rect = this.canvas.getBoundingClientRect();
    return [
      ((event.clientX - rect.left) * this.canvas.width) / rect.width,
      ((event.clientY - rect.top) * this.canvas.height) / rect.height,
    ];
  }

  down(event) {
    this.canvas.setPointerCapture?.(event.pointerId);
    this.last = this.point(event);
    this.stroke(this.last);
  }

  move(event) {
    if (this.last) this.stroke(this.point(event));
  }

  up() {
    if (!this.last) return;
    this.last = null;
    this.onChange();
  }

  stroke(to) {
    const { ctx } = this;
    ctx.strokeStyle = this.color();
    ctx.lineWidth = this.size();
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...this.last);
    ctx.lineTo(...to);
    ctx.stroke();
    this.last = to;
    this.onChange();
  }

  bytes() {
    return jpegBytes(this.canvas);
  }
}
