// Point the official fal.ai JavaScript client (@fal-ai/client, written against 1.10.1) at a
// livegen server. Copy this file into your project next to an installed @fal-ai/client.
//
//   import { createLivegenClient, installWebSocketShim } from "./livegen.mjs";
//
//   const BASE = "http://127.0.0.1:8000";                 // livegen base URL
//   const fal = createLivegenClient({ baseUrl: BASE, credentials: process.env.FAL_KEY });
//   const { data, requestId } = await fal.run("fal-ai/fast-turbo-diffusion", {
//     input: { prompt: "a red fox" },
//   });
//
//   await installWebSocketShim(BASE);                     // before the first fal.realtime use
//
// The client hard-codes fal's hosts (https://fal.run, https://queue.fal.run,
// https://rest.fal.ai, wss://fal.run). Two ways to aim its HTTP traffic at livegen:
//
// * mode "middleware" (default): a requestMiddleware rewrites each URL to livegen's layout
//   (fal.run/X -> BASE/X, queue.fal.run/X -> BASE/queue/X, rest.fal.ai/X -> BASE/rest/X).
// * mode "proxy": the client's own proxy support sends every request to BASE/api/fal/proxy
//   with the original URL in the x-fal-target-url header; livegen dispatches it internally.
//   The caller still needs a key: livegen's proxy route injects none.
//
// To keep the key out of a browser, use mode "middleware" with a `proxyUrl` of your backend's
// route running fal's @fal-ai/server-proxy, which adds the key (its allowedUrlPatterns set to
// livegen's host): URLs are rewritten to livegen's first, then sent through that proxy (README).
//
// One call bypasses both: fal.stream(..., {connectionMode: "client"}) (a browser holding a
// token, not a key) fetches https://fal.run/{app}/stream?fal_jwt_token=... with the client's
// `fetch` directly, so in both modes the client also gets a `fetch` that rewrites fal's hosts the
// same way (yours, if you pass one, does the fetching). Realtime opens
// `new WebSocket("wss://fal.run/...")` on the global constructor, so it needs
// installWebSocketShim in both modes.

import { createFalClient, withMiddleware } from "@fal-ai/client";

const PREFIXES = { "fal.run": "", "queue.fal.run": "/queue", "rest.fal.ai": "/rest" };
const SHIM = Symbol.for("livegen.websocketShim");

function trimBase(baseUrl) {
  const base = String(baseUrl).replace(/\/+$/, "");
  if (!/^https?:\/\/[^/]/.test(base)) {
    throw new TypeError(`livegen baseUrl must be an http(s) URL, got ${JSON.stringify(baseUrl)}`);
  }
  return base;
}

/** `url` on one of fal's HTTP hosts, rewritten to livegen's layout; other URLs unchanged. */
export function toLivegenUrl(url, baseUrl) {
  const u = new URL(url);
  if (u.protocol !== "https:" || !(u.hostname in PREFIXES)) {
    return url;
  }
  return `${trimBase(baseUrl)}${PREFIXES[u.hostname]}${u.pathname}${u.search}`;
}

/** `url` on wss://fal.run, rewritten to livegen's WebSocket base; other URLs unchanged. */
export function toLivegenWebSocketUrl(url, baseUrl) {
  const u = new URL(String(url));
  if (u.protocol !== "wss:" || u.hostname !== "fal.run") {
    return url;
  }
  const wsBase = trimBase(baseUrl).replace(/^http/, "ws"); // http -> ws, https -> wss
  return `${wsBase}${u.pathname}${u.search}`;
}

/**
 * A fal client (createFalClient) whose HTTP requests go to the livegen server at `baseUrl`.
 *
 * `credentials` is a livegen API key (default: FAL_KEY, as in @fal-ai/client). `mode` is
 * "middleware" (rewrite URLs in the client) or "proxy" (use livegen's /api/fal/proxy route).
 * Any other option is passed to createFalClient; a `requestMiddleware` of yours runs first.
 */
export function createLivegenClient({ baseUrl, mode = "middleware", ...config } = {}) {
  const base = trimBase(baseUrl);
  const fetch = livegenFetch(base, config.fetch);
  if (mode === "proxy") {
    return createFalClient({ ...config, fetch, proxyUrl: { url: `${base}/api/fal/proxy`, when: "always" } });
  }
  if (mode !== "middleware") {
    throw new TypeError(`mode must be "middleware" or "proxy", got ${JSON.stringify(mode)}`);
  }
  const rewrite = async (request) => ({ ...request, url: toLivegenUrl(request.url, base) });
  return createFalClient({
    ...config,
    fetch,
    requestMiddleware: config.requestMiddleware ? withMiddleware(config.requestMiddleware, rewrite) : rewrite,
  });
}

/** A fetch that sends requests for fal's HTTP hosts to livegen (via `inner`, default the global fetch). */
export function livegenFetch(baseUrl, inner) {
  const base = trimBase(baseUrl);
  return (input, init) => {
    const url = typeof input === "string" || input instanceof URL ? toLivegenUrl(String(input), base) : input;
    return inner ? inner(url, init) : globalThis.fetch(url, init);
  };
}

/**
 * Make `new WebSocket("wss://fal.run/...")` (what fal.realtime opens) connect to livegen.
 *
 * Replaces globalThis.WebSocket with a subclass that rewrites the URL; other URLs pass
 * through. Without a global WebSocket (Node 20 without --experimental-websocket) the `ws`
 * package is used, so install it. Call once, before the first realtime connection; calling
 * again re-targets the shim. Returns the installed class.
 */
export async function installWebSocketShim(baseUrl) {
  const base = trimBase(baseUrl);
  const current = globalThis.WebSocket;
  if (current?.[SHIM]) {
    current[SHIM].base = base;
    return current;
  }
  const Native = current ?? (await importWs());
  const target = { base };

  class LivegenWebSocket extends Native {
    constructor(url, ...rest) {
      super(toLivegenWebSocketUrl(url, target.base), ...rest);
    }
  }
  Object.defineProperty(LivegenWebSocket, SHIM, { value: target });
  globalThis.WebSocket = LivegenWebSocket;
  return LivegenWebSocket;
}

async function importWs() {
  try {
    const ws = await import("ws");
    return ws.WebSocket ?? ws.default;
  } catch (err) {
    throw new Error(
      "No global WebSocket: use Node >= 22 (or --experimental-websocket), or `npm install ws`",
      { cause: err },
    );
  }
}
