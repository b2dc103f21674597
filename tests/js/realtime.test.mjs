// fal.realtime through the official client: the token request goes through the middleware or
// the proxy, the WebSocket through installWebSocketShim (the `ws` package on Node 20).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { deflateSync } from "node:zlib";

import { ApiError } from "@fal-ai/client";

import { MODES, clientFor, installWebSocketShim, server } from "./harness.mjs";

const LCM = "fal-ai/fast-lcm-diffusion";

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(buf) {
  let c = 0xffffffff;
  for (const byte of buf) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** A solid-colour RGB PNG as a data URL (what fal's realtime quickstart sends as image_url). */
function pngDataUrl(width, height, [r, g, b]) {
  const chunk = (type, data) => {
    const out = Buffer.alloc(12 + data.length);
    out.writeUInt32BE(data.length, 0);
    out.write(type, 4, "latin1");
    data.copy(out, 8);
    out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
    return out;
  };
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header.set([8, 2, 0, 0, 0], 8); // 8-bit RGB
  const row = Buffer.concat([Buffer.from([0]), Buffer.alloc(width * 3).map((_, i) => [r, g, b][i % 3])]);
  const png = Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", header),
    chunk("IDAT", deflateSync(Buffer.concat(Array(height).fill(row)))),
    chunk("IEND", Buffer.alloc(0)),
  ]);
  return `data:image/png;base64,${png.toString("base64")}`;
}

/** Send one input on a fresh connection; resolve with the first result or error. */
function once(fal, input, timeoutMs = 120_000) {
  return new Promise((resolve, reject) => {
    let settled = false;
    const finish = (fn, value) => {
      if (!settled) {
        settled = true;
        clearTimeout(timer);
        connection.close();
        fn(value);
      }
    };
    const timer = setTimeout(() => finish(reject, new Error(`no realtime answer in ${timeoutMs} ms`)), timeoutMs);
    const connection = fal.realtime.connect(LCM, {
      connectionKey: `livegen-test-${Math.random()}`,
      onResult: (result) => finish(resolve, { result }),
      onError: (error) => finish(resolve, { error }),
    });
    connection.send(input);
  });
}

for (const mode of MODES) {
  describe(`realtime (${mode})`, () => {
    const original = globalThis.WebSocket;
    before(async () => {
      await installWebSocketShim(server().baseUrl);
    });
    after(() => {
      globalThis.WebSocket = original;
    });

    test("fal's quickstart: image_url on the base app id, sync_mode, 512x512", async () => {
      const input = { prompt: "a watercolor fox", image_url: pngDataUrl(512, 512, [200, 40, 40]), sync_mode: true };
      const { result, error } = await once(clientFor(mode), input);
      assert.equal(error, undefined, `${error}`);
      const [image] = result.images;
      assert.ok(image.url.startsWith("data:image/jpeg;base64,"), image.url.slice(0, 40));
      assert.equal(image.width, 512);
      assert.equal(image.height, 512);
    });

    test("an invalid input is reported through onError", async () => {
      const { result, error } = await once(clientFor(mode), { negative_prompt: "no prompt here" });
      assert.equal(result, undefined);
      assert.ok(error instanceof ApiError, `${error}`);
      assert.equal(error.status, 400);
    });

    test("a session outlives its token: the server closes it, the next send reconnects with a new one", async () => {
      const { baseUrl, key } = server();
      const issued = [];
      // Two-second tokens from a backend of the app's own (here: livegen's /rest/tokens/ with the key).
      const tokenProvider = async (appWithPath) => {
        const response = await fetch(`${baseUrl}/rest/tokens/`, {
          method: "POST",
          headers: { authorization: `Key ${key}`, "content-type": "application/json" },
          body: JSON.stringify({ allowed_apps: [appWithPath.split("/")[1]], token_expiration: 2 }),
        });
        issued.push(response.status);
        return await response.json();
      };
      const results = [];
      const errors = [];
      let resolveNext;
      const connection = clientFor(mode).realtime.connect(LCM, {
        connectionKey: `livegen-expiry-${mode}`,
        tokenProvider,
        onResult: (result) => {
          results.push(result);
          resolveNext?.();
        },
        onError: (error) => errors.push(error),
      });
      const input = { prompt: "a fox", image_size: { width: 64, height: 64 } };
      const next = () => new Promise((resolve) => (resolveNext = resolve));
      try {
        let arrived = next();
        connection.send(input);
        await arrived;
        await new Promise((resolve) => setTimeout(resolve, 3500)); // past the token's expiry: livegen closes (1000)
        arrived = next();
        connection.send({ ...input, prompt: "a fox, later" });
        await arrived;
      } finally {
        connection.close();
      }
      assert.equal(results.length, 2);
      assert.deepEqual(issued, [200, 200], "one token per connection");
      assert.deepEqual(errors, [], "a normal close is not an error");
    });
  });
}
