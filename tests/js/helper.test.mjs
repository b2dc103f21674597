// The shipped helper (clients/js/livegen.mjs) on its own: URL rewriting and the WebSocket shim.
// These need no server.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { createLivegenClient, installWebSocketShim, toLivegenUrl, toLivegenWebSocketUrl } from "./harness.mjs";

describe("toLivegenUrl", () => {
  const base = "https://gen.example.com/prefix/";
  for (const [from, to] of [
    ["https://fal.run/fal-ai/fast-lcm-diffusion", "/fal-ai/fast-lcm-diffusion"],
    ["https://queue.fal.run/fal-ai/x/requests/1/status?logs=1", "/queue/fal-ai/x/requests/1/status?logs=1"],
    ["https://rest.fal.ai/tokens/", "/rest/tokens/"],
    ["https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3", "/rest/storage/upload/initiate?storage_type=fal-cdn-v3"],
  ]) {
    test(from, () => assert.equal(toLivegenUrl(from, base), `https://gen.example.com/prefix${to}`));
  }
  test("other URLs pass through", () => {
    for (const url of ["https://example.com/x", "http://127.0.0.1:8000/cdn/files/a/b.png", "https://v3.fal.media/x"]) {
      assert.equal(toLivegenUrl(url, base), url);
    }
  });
  test("a base URL must be http(s)", () => {
    assert.throws(() => toLivegenUrl("https://fal.run/a/b", "gen.example.com"), TypeError);
  });
});

describe("toLivegenWebSocketUrl", () => {
  test("wss://fal.run keeps path, query and the base's prefix", () => {
    const url = "wss://fal.run/fal-ai/fast-lcm-diffusion/realtime?fal_jwt_token=t&max_buffering=5";
    assert.equal(
      toLivegenWebSocketUrl(url, "http://127.0.0.1:8000/lg"),
      "ws://127.0.0.1:8000/lg/fal-ai/fast-lcm-diffusion/realtime?fal_jwt_token=t&max_buffering=5",
    );
    assert.equal(toLivegenWebSocketUrl(url, "https://gen.example.com").slice(0, 30), "wss://gen.example.com/fal-ai/f");
  });
  test("other URLs pass through", () => {
    assert.equal(toLivegenWebSocketUrl("wss://example.com/x", "http://h"), "wss://example.com/x");
  });
});

describe("createLivegenClient", () => {
  test("rejects an unknown mode", () => {
    assert.throws(() => createLivegenClient({ baseUrl: "http://h", mode: "tunnel" }), /mode must be/);
  });

  // A fetch that records what the client sends, so both modes can be checked without a server.
  function recordingFetch(seen) {
    return async (url, init) => {
      seen.push({ url: String(url), headers: new Headers(init.headers), method: init.method });
      return new Response(JSON.stringify({ ok: true }), { headers: { "content-type": "application/json" } });
    };
  }

  test("middleware mode rewrites each fal host", async () => {
    const seen = [];
    const fal = createLivegenClient({ baseUrl: "http://h:1", credentials: "k", fetch: recordingFetch(seen) });
    await fal.run("fal-ai/a", { input: { prompt: "p" } });
    await fal.queue.status("fal-ai/a/sub", { requestId: "r1", logs: true });
    assert.deepEqual(
      seen.map((s) => `${s.method} ${s.url}`),
      ["POST http://h:1/fal-ai/a", "GET http://h:1/queue/fal-ai/a/requests/r1/status?logs=1"],
    );
    assert.equal(seen[0].headers.get("authorization"), "Key k");
  });

  test("proxy mode sends everything to /api/fal/proxy with x-fal-target-url", async () => {
    const seen = [];
    const fal = createLivegenClient({ baseUrl: "http://h:1/", mode: "proxy", credentials: "k", fetch: recordingFetch(seen) });
    await fal.run("fal-ai/a", { input: { prompt: "p" } });
    assert.equal(seen[0].url, "http://h:1/api/fal/proxy");
    assert.equal(seen[0].headers.get("x-fal-target-url"), "https://fal.run/fal-ai/a");
    assert.equal(seen[0].headers.get("authorization"), "Key k");
  });

  test("a caller's requestMiddleware runs before the rewrite", async () => {
    const seen = [];
    const fal = createLivegenClient({
      baseUrl: "http://h:1",
      credentials: "k",
      fetch: recordingFetch(seen),
      requestMiddleware: async (req) => ({ ...req, headers: { ...req.headers, "x-fal-runner-hint": "h" } }),
    });
    await fal.run("fal-ai/a", { input: { prompt: "p" } });
    assert.equal(seen[0].url, "http://h:1/fal-ai/a");
    assert.equal(seen[0].headers.get("x-fal-runner-hint"), "h");
  });

  for (const mode of ["middleware", "proxy"]) {
    test(`${mode} mode: the client's own fetch of fal.stream's client connection mode goes to livegen`, async () => {
      const seen = [];
      const fal = createLivegenClient({ baseUrl: "http://h:1", mode, credentials: "k", fetch: recordingFetch(seen) });
      const stream = await fal.stream("fal-ai/a", {
        input: { prompt: "p" },
        connectionMode: "client",
        tokenProvider: async () => "t0k",
      });
      await stream.done();
      assert.deepEqual(seen.map((s) => `${s.method} ${s.url}`), ["POST http://h:1/fal-ai/a/stream?fal_jwt_token=t0k"]);
      assert.equal(seen[0].headers.get("authorization"), null); // a token, not the key
    });
  }
});

describe("installWebSocketShim", () => {
  const original = globalThis.WebSocket;
  after(() => {
    globalThis.WebSocket = original;
  });

  test("rewrites wss://fal.run on the global constructor and is idempotent", async () => {
    class FakeWebSocket {
      static OPEN = 1;
      constructor(url, protocols) {
        this.url = url;
        this.protocols = protocols;
      }
    }
    globalThis.WebSocket = FakeWebSocket;
    const Shim = await installWebSocketShim("http://127.0.0.1:9/base");
    assert.equal(globalThis.WebSocket, Shim);
    assert.equal(Shim.OPEN, 1, "static members of the native class survive");
    const ws = new WebSocket("wss://fal.run/fal-ai/fast-lcm-diffusion/realtime?fal_jwt_token=t");
    assert.ok(ws instanceof FakeWebSocket);
    assert.equal(ws.url, "ws://127.0.0.1:9/base/fal-ai/fast-lcm-diffusion/realtime?fal_jwt_token=t");
    assert.equal(new WebSocket("ws://elsewhere/x", ["p"]).url, "ws://elsewhere/x");

    assert.equal(await installWebSocketShim("https://gen.example.com"), Shim, "installed once");
    assert.equal(new WebSocket("wss://fal.run/a/b/realtime").url, "wss://gen.example.com/a/b/realtime");
  });

  test("falls back to the ws package without a global WebSocket", async () => {
    delete globalThis.WebSocket;
    const { WebSocket: Ws } = await import("ws");
    const Shim = await installWebSocketShim("http://127.0.0.1:9");
    assert.ok(Shim.prototype instanceof Ws);
    assert.equal(Shim.OPEN, Ws.OPEN);
  });
});
