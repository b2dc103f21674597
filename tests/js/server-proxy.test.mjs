// Keys out of the browser, fal's way: an app's backend runs fal's own @fal-ai/server-proxy
// (1.2.1, the Express handler) holding the livegen key, configured to allow livegen's URLs; the
// client holds no key: the helper rewrites fal's URLs to livegen's, then `proxyUrl` sends each
// request to the backend, which adds `Authorization: Key` and forwards it. Realtime gets its
// token through the backend and opens the WebSocket to livegen itself; uploads PUT straight to
// the upload URL livegen hands out.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import express from "express";

import { TURBO, TURBO_INPUT, createLivegenClient, installWebSocketShim, server } from "./harness.mjs";

const INPUT = { ...TURBO_INPUT, image_size: { width: 64, height: 64 } };

describe("@fal-ai/server-proxy in front of livegen", () => {
  let backend;
  let proxyUrl;
  const sent = []; // every request the keyless client made: [method, url, authorization header]
  const original = globalThis.WebSocket;

  before(async () => {
    const { baseUrl } = server();
    const warn = console.warn;
    console.warn = () => {}; // the proxy warns, on import too, that it allows unauthenticated callers
    const { createHandler, route } = await import("@fal-ai/server-proxy/express");
    const handler = createHandler({
      allowedUrlPatterns: [`${new URL(baseUrl).host}/**`], // livegen's URLs, not fal's
      allowedEndpoints: ["fal-ai/**", "queue/fal-ai/**", "rest/tokens/", "rest/storage/upload/*"],
    });
    console.warn = warn;
    const app = express();
    app.all(route, express.json({ limit: "20mb" }), handler); // FAL_KEY (the livegen key) is the backend's
    backend = await new Promise((resolve) => {
      const listening = app.listen(0, "127.0.0.1", () => resolve(listening));
    });
    proxyUrl = `http://127.0.0.1:${backend.address().port}${route}`;
    await installWebSocketShim(baseUrl);
  });

  after(() => {
    backend.close();
    globalThis.WebSocket = original;
  });

  function keylessClient() {
    return createLivegenClient({
      baseUrl: server().baseUrl,
      credentials: () => undefined, // no key here: FAL_KEY is only the backend's
      proxyUrl: { url: proxyUrl, when: "always" }, // in a browser, the plain string "/api/fal/proxy"
      fetch: (url, init) => {
        sent.push([init?.method ?? "GET", String(url), new Headers(init?.headers).get("authorization")]);
        return fetch(url, init);
      },
    });
  }

  test("run, queue with the status stream, stream, upload and realtime, with no key in the client", async () => {
    const fal = keylessClient();
    const { data, requestId } = await fal.run(TURBO, { input: INPUT });
    assert.equal(data.images[0].width, 64);
    assert.match(requestId, /^[0-9a-f-]{36}$/);

    const statuses = [];
    const queued = await fal.subscribe(TURBO, {
      input: INPUT,
      mode: "streaming",
      onQueueUpdate: (update) => statuses.push(update.status),
    });
    assert.equal(queued.data.images[0].width, 64);
    assert.equal(statuses.at(-1), "COMPLETED");

    const stream = await fal.stream(TURBO, { input: INPUT });
    assert.equal((await stream.done()).images[0].width, 64);

    const url = await fal.storage.upload(new Blob([new Uint8Array(512)], { type: "image/png" }));
    assert.ok(url.startsWith(server().baseUrl + "/cdn/files/"), url);

    const frame = await new Promise((resolve, reject) => {
      const connection = fal.realtime.connect(TURBO, {
        connectionKey: "livegen-server-proxy",
        onResult: (result) => {
          connection.close();
          resolve(result);
        },
        onError: reject,
      });
      connection.send(INPUT);
    });
    assert.equal(frame.images[0].width, 64);

    assert.ok(sent.length >= 6, `${sent.length} requests`);
    for (const [method, target, authorization] of sent) {
      assert.equal(authorization, null, `${method} ${target} carried a key`);
      // everything through the backend, but the upload's PUT, which goes to the URL livegen gave
      assert.ok(target === proxyUrl || (method === "PUT" && target.startsWith(server().baseUrl + "/cdn/uploads/")), target);
    }
  });

  test("the backend forwards only to livegen's endpoints", async () => {
    const refused = await fetch(proxyUrl, {
      method: "POST",
      headers: { "content-type": "application/json", "x-fal-target-url": "https://example.com/steal" },
      body: "{}",
    });
    assert.equal(refused.status, 400);
    const keys = await fetch(proxyUrl, {
      method: "POST",
      headers: { "content-type": "application/json", "x-fal-target-url": `${server().baseUrl}/rest/other` },
      body: "{}",
    });
    assert.equal(keys.status, 400, "a livegen URL outside allowedEndpoints");
  });
});
