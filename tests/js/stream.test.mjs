// fal.stream through the official client, in both ways of pointing it at livegen: with the key
// (connectionMode "server", the default), and as a browser holding only a token would
// (connectionMode "client": the client fetches https://fal.run/{app}/stream?fal_jwt_token=...
// itself, bypassing requestMiddleware and proxyUrl; the helper's fetch sends it to livegen).
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { ApiError } from "@fal-ai/client";

import { MODES, TURBO, TURBO_INPUT, clientFor, server } from "./harness.mjs";

const INPUT = { ...TURBO_INPUT, image_size: { width: 64, height: 64 } };

async function collect(stream) {
  const events = [];
  for await (const event of stream) {
    events.push(event);
  }
  return { events, done: await stream.done() };
}

function assertOutput(output) {
  assert.equal(output.images.length, 1);
  assert.equal(output.images[0].width, 64);
  assert.ok(output.images[0].url.startsWith("data:image/jpeg;base64,"), output.images[0].url.slice(0, 40));
}

/** A token for `appWithPath` from livegen's /rest/tokens/, as a user's own backend would get one. */
async function tokenProvider(appWithPath) {
  const { baseUrl, key } = server();
  const alias = appWithPath.split("/")[1];
  const response = await fetch(`${baseUrl}/rest/tokens/`, {
    method: "POST",
    headers: { authorization: `Key ${key}`, "content-type": "application/json" },
    body: JSON.stringify({ allowed_apps: [alias], token_expiration: 60 }),
  });
  assert.equal(response.status, 200);
  return await response.json();
}

for (const mode of MODES) {
  describe(`fal.stream (${mode})`, () => {
    test("with the key: one event, the output, and the request id", async () => {
      const stream = await clientFor(mode).stream(TURBO, { input: INPUT });
      const { events, done } = await collect(stream);
      assert.equal(events.length, 1);
      assertOutput(events[0]);
      assert.deepEqual(done, events[0]);
      assert.match(stream.requestId, /^[0-9a-f-]{36}$/);
    });

    test("connectionMode client: a token in the URL, no key", async () => {
      const asked = [];
      const stream = await clientFor(mode).stream(TURBO, {
        input: INPUT,
        connectionMode: "client",
        tokenProvider: async (app) => {
          asked.push(app);
          return tokenProvider(app);
        },
      });
      const { events } = await collect(stream);
      assert.deepEqual(asked, [`${TURBO}/stream`]);
      assert.equal(events.length, 1);
      assertOutput(events[0]);
    });

    test("connectionMode client with the default token provider (the key fetches the token)", async () => {
      const warn = console.warn;
      console.warn = () => {}; // the client warns that the default provider is deprecated
      try {
        const stream = await clientFor(mode).stream(TURBO, { input: INPUT, connectionMode: "client" });
        assertOutput((await collect(stream)).done);
      } finally {
        console.warn = warn;
      }
    });

    test("a token for another app is an ApiError 403", async () => {
      const stream = await clientFor(mode).stream(TURBO, {
        input: INPUT,
        connectionMode: "client",
        tokenProvider: () => tokenProvider("fal-ai/fast-lcm-diffusion"),
      });
      const err = await stream.done().then(
        () => assert.fail("expected a 403"),
        (e) => e,
      );
      assert.ok(err instanceof ApiError, String(err));
      assert.equal(err.status, 403);
      assert.match(err.body.detail, /not valid for fast-turbo-diffusion/);
    });

    test("invalid input is an ApiError 422 before any event", async () => {
      const stream = await clientFor(mode).stream(TURBO, { input: { ...INPUT, num_inference_steps: 0 } });
      const err = await stream.done().then(
        () => assert.fail("expected a 422"),
        (e) => e,
      );
      assert.equal(err.status, 422);
      assert.deepEqual(err.body.detail[0].loc, ["body", "num_inference_steps"]);
    });
  });
}
