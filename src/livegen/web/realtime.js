// fal's realtime protocol from a browser, as a small client with no DOM code (it also runs in
// Node, where tests/web/realtime.test.mjs drives it with fake sockets, timers and a clock).
//
// - Auth: the API key only ever goes to POST /rest/tokens/, in an Authorization header. The
//   WebSocket URL carries the short-lived, app-scoped token that returns
//   (`?fal_jwt_token=`, as fal's clients do); no HTTP request URL carries either.
// - Tokens: a token is used for new connections until 90 % of its lifetime; while a socket is
//   open the next one is fetched in the background at that point (retried after 6 s on
//   failure), like fal's JS client. An open socket is not torn down for a refresh; the server
//   closes it (1000, "token expired…") when its token expires, and the client reconnects
//   quietly with the fresh one.
// - Sending: latest wins. One frame waits while connecting or while `maxInFlight` frames are
//   being rendered; a newer frame replaces it. `max_buffering` is sized so the server never
//   has to drop a frame, so each frame gets exactly one answer (a result or an x-fal-error).
// - Failures: a refused handshake or a lost connection reconnects with exponential backoff
//   (0.5 s doubling to 10 s), re-sending the newest unanswered frame. A bad key stops.
import { decode, encode } from "./msgpack.js";

export const TOKEN_SECONDS = 120;
const REFRESH_AT = 0.9;
const TOKEN_RETRY_MS = 6000;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 10_000;
const STALE_MS = 120_000; // an answer this late is not coming: free its slot
export const MAX_BUFFERING = 2;

export class AuthError extends Error {}
export class TokenError extends Error {}

/** POST rest/tokens/ (relative to the page, so a server behind a path prefix works) with the key in
 * the Authorization header; returns the bare token string. */
export async function requestToken(key, alias, { seconds = TOKEN_SECONDS, fetchImpl = (...a) => fetch(...a) } = {}) {
  let response;
  try {
    response = await fetchImpl("rest/tokens/", {
      method: "POST",
      headers: { Authorization: `Key ${key}`, "Content-Type": "application/json" },
      body: JSON.stringify({ allowed_apps: [alias], token_expiration: seconds }),
      cache: "no-store",
    });
  } catch {
    throw new TokenError("The server cannot be reached.");
  }
  if (response.status === 401 || response.status === 403) throw new AuthError("That API key was not accepted.");
  if (response.status === 429) throw new TokenError("Too many requests with this key right now.");
  if (!response.ok) throw new TokenError(`The server could not issue a session token (HTTP ${response.status}).`);
  const token = await response.json();
  if (typeof token !== "string" || !token) throw new TokenError("The token endpoint answered something unexpected.");
  return token;
}

export class RealtimeClient {
  /**
   * @param {object} o
   * @param {string} o.app              e.g. "fal-ai/fast-turbo-diffusion"
   * @param {(alias: string, seconds: number) => Promise<string>} o.tokenProvider
   * @param {string} [o.base]           the server's http(s) base URL, a path prefix included
   *                                    (default: the folder of this page, which livegen serves at its root)
   * @param {object} [o.on]             handlers: result(output, {latencyMs, meta}), timing(seconds),
   *                                    error({kind, code, message, retryInMs}), status(state, info)
   */
  constructor(o) {
    this.app = o.app;
    this.tokenProvider = o.tokenProvider;
    this.base = new URL(o.base ?? ".", globalThis.location?.href).href.replace(/\/?$/, "/");
    this.on = o.on ?? {};
    this.tokenSeconds = o.tokenSeconds ?? TOKEN_SECONDS;
    this.maxInFlight = o.maxInFlight ?? 1;
    this.WebSocketImpl = o.WebSocketImpl ?? globalThis.WebSocket;
    this.now = o.now ?? (() => performance.now());
    this.timers = o.timers ?? globalThis;
    this.random = o.random ?? Math.random;
    this.state = "idle"; // idle | connecting | open | waiting (backoff)
    this.ws = null;
    this.token = null; // {value, app, at}
    this.tokenFetch = null;
    this.pending = null; // {frame, meta}
    this.inFlight = new Map(); // request_id -> {frame, meta, sentAt}
    this.seq = 0;
    this.failures = 0; // consecutive, for the backoff; reset by a result
    this.epoch = 0; // bumped by setApp/close: an older connect() attempt gives up
    this.refreshTimer = null;
    this.retryTimer = null;
  }

  /** Queue a frame (latest wins) and send it as soon as a slot is free. */
  send(frame, meta = null) {
    this.pending = { frame, meta };
    this.pump();
  }

  /** True when a new frame would go out (or wait alone) now: for sources that produce frames
   * continuously, so they encode only what will be sent. */
  wantsFrame() {
    this.expireStale();
    if (this.pending) return false;
    return this.state !== "open" || this.inFlight.size < this.maxInFlight;
  }

  /** Switch app: tokens are scoped to one app, so this drops the token and the socket. */
  setApp(app) {
    if (app === this.app) return;
    this.app = app;
    this.token = null;
    this.reset();
    this.pump();
  }

  /** Close everything (e.g. the key was forgotten). */
  close() {
    this.pending = null;
    this.token = null;
    this.reset();
  }

  // -- sending --------------------------------------------------------------------------------

  pump() {
    this.expireStale();
    if (!this.pending) return;
    if (this.state === "idle") {
      this.connect();
      return;
    }
    if (this.state !== "open" || this.inFlight.size >= this.maxInFlight) return;
    const { frame, meta } = this.pending;
    this.pending = null;
    const requestId = String(++this.seq);
    this.inFlight.set(requestId, { frame, meta, sentAt: this.now() });
    this.ws.send(encode({ ...frame, request_id: requestId }));
  }

  expireStale() {
    for (const [id, entry] of this.inFlight) {
      if (this.now() - entry.sentAt > STALE_MS) this.inFlight.delete(id);
    }
  }

  /** The entry a result or error answers: results carry request_id; errors answer the oldest
   * frame (the server renders a session's frames in order). Older entries were answered. */
  settle(requestId) {
    const id = requestId ?? this.inFlight.keys().next().value;
    const entry = this.inFlight.get(id);
    if (entry === undefined) return null;
    for (const key of [...this.inFlight.keys()]) {
      this.inFlight.delete(key);
      if (key === id) break;
    }
    return entry;
  }

  // -- connecting -------------------------------------------------------------------------------

  async connect() {
    const epoch = this.epoch;
    this.setState("connecting");
    let token;
    try {
      token = await this.validToken();
    } catch (error) {
      if (epoch === this.epoch) this.tokenFailed(error);
      return;
    }
    if (epoch !== this.epoch) return;
    const url = new URL(`${this.app}/realtime`, this.base);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = new URLSearchParams({ fal_jwt_token: token, max_buffering: String(MAX_BUFFERING) }).toString();
    const ws = new this.WebSocketImpl(url.toString());
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => this.opened(ws);
    ws.onmessage = (event) => this.received(ws, event.data);
    ws.onclose = (event) => this.closed(ws, event);
    ws.onerror = () => {}; // a close event with the details follows
  }

  opened(ws) {
    if (ws !== this.ws) return;
    ws.wasOpen = true;
    this.setState("open");
    this.scheduleRefresh();
    this.pump();
  }

  closed(ws, event) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.timers.clearTimeout(this.refreshTimer);
    const unanswered = [...this.inFlight.values()];
    this.inFlight.clear();
    if (!this.pending && unanswered.length) this.pending = unanswered[unanswered.length - 1];
    if (ws.idleTimeout || (event.code === 1000 && event.reason?.startsWith("token expired"))) {
      // The server's idle timeout, or the end of the token's lifetime (by then the refresh has
      // fetched the next token): reconnect on the next frame, quietly.
      this.setState("idle");
      this.pump();
      return;
    }
    const delay = this.backoff();
    if (!ws.wasOpen) {
      this.token = null; // it may be what was refused: the retry fetches a new one
      this.emitError({ kind: "refused", code: event.code, retryInMs: delay });
    } else if (!ws.sawError || event.code !== 1000) {
      this.emitError({ kind: "lost", code: event.code, retryInMs: delay });
    }
    this.retryAfter(delay);
  }

  received(ws, data) {
    if (ws !== this.ws) return;
    if (typeof data === "string") {
      this.control(ws, data);
      return;
    }
    let output;
    try {
      output = decode(data);
    } catch (error) {
      this.settle();
      this.emitError({ kind: "frame", code: "BAD_RESULT", message: `Could not read a result: ${error.message}` });
      this.pump();
      return;
    }
    const entry = this.settle(output.request_id);
    this.failures = 0;
    const latencyMs = entry ? this.now() - entry.sentAt : null;
    this.on.result?.(output, { latencyMs, meta: entry?.meta ?? null });
    this.pump();
  }

  control(ws, text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return; // not part of the protocol: ignored, like fal's clients ignore unknown meta
    }
    if (message.type === "x-fal-message") {
      if (message.action === "timings" && typeof message.timing === "number") this.on.timing?.(message.timing);
    } else if (message.type === "x-fal-error") {
      if (message.error === "TIMEOUT") {
        ws.idleTimeout = true;
        return;
      }
      ws.sawError = true;
      this.settle();
      this.emitError({ kind: "frame", code: message.error, message: message.reason ?? "" });
      this.pump();
    } else if (message.status === "error" && message.error === "Unauthorized") {
      this.token = null; // fal's in-band refusal: reconnect with a new token
      ws.close(1000);
    }
  }

  // -- tokens ---------------------------------------------------------------------------------

  tokenIsFresh() {
    const t = this.token;
    return t !== null && t.app === this.app && this.now() - t.at < REFRESH_AT * this.tokenSeconds * 1000;
  }

  async validToken() {
    return this.tokenIsFresh() ? this.token.value : this.fetchToken();
  }

  /** One request at a time per app; the result is kept only if the app is still the same. */
  fetchToken() {
    if (this.tokenFetch?.app === this.app) return this.tokenFetch.promise;
    const app = this.app;
    const at = this.now(); // the lifetime counts from the request, to be safe
    const promise = this.tokenProvider(app.split("/")[1], this.tokenSeconds)
      .then((value) => {
        if (app === this.app) this.token = { value, app, at };
        return value;
      })
      .finally(() => {
        if (this.tokenFetch?.promise === promise) this.tokenFetch = null;
      });
    this.tokenFetch = { app, promise };
    return promise;
  }

  scheduleRefresh() {
    this.timers.clearTimeout(this.refreshTimer);
    const due = this.token ? this.token.at + REFRESH_AT * this.tokenSeconds * 1000 - this.now() : 0;
    this.refreshTimer = this.timers.setTimeout(() => this.refresh(), Math.max(0, due));
  }

  async refresh() {
    if (this.state !== "open") return;
    const epoch = this.epoch;
    try {
      await this.fetchToken();
    } catch (error) {
      if (epoch !== this.epoch || this.state !== "open") return;
      if (error instanceof AuthError) {
        this.tokenFailed(error); // the key was revoked: stop here too
        return;
      }
      this.refreshTimer = this.timers.setTimeout(() => this.refresh(), TOKEN_RETRY_MS);
      return;
    }
    if (epoch === this.epoch && this.state === "open") this.scheduleRefresh();
  }

  tokenFailed(error) {
    if (error instanceof AuthError) {
      this.pending = null;
      this.reset();
      this.emitError({ kind: "auth", message: error.message });
      return;
    }
    const delay = this.backoff();
    this.emitError({ kind: "token", message: error.message, retryInMs: delay });
    this.retryAfter(delay);
  }

  // -- state ----------------------------------------------------------------------------------

  backoff() {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.failures);
    this.failures += 1;
    return Math.round(base * (0.8 + 0.4 * this.random()));
  }

  retryAfter(delay) {
    this.setState("waiting", { retryInMs: delay });
    const epoch = this.epoch;
    this.retryTimer = this.timers.setTimeout(() => {
      if (epoch !== this.epoch) return;
      this.setState("idle");
      this.connect(); // reconnect even with nothing to send, so the page shows it is back
    }, delay);
  }

  /** Drop the socket and all timers; back to idle. Pending frames stay queued. */
  reset() {
    this.epoch += 1;
    this.timers.clearTimeout(this.refreshTimer);
    this.timers.clearTimeout(this.retryTimer);
    this.inFlight.clear();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000);
    }
    this.setState("idle");
  }

  setState(state, info = {}) {
    this.state = state;
    this.on.status?.(state, info);
  }

  emitError(error) {
    this.on.error?.(error);
  }
}
