// fal's object lifecycle through the official client: `storageSettings` on run and queue (the
// x-fal-object-lifecycle-preference header) and `lifecycle` on uploads (X-Fal-Object-Lifecycle)
// set how long livegen serves the files they store. Seen from outside as the file's Cache-Control
// max-age, which livegen keeps within the file's remaining lifetime.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { MODES, TURBO, TURBO_INPUT, clientFor } from "./harness.mjs";

const INPUT = { ...TURBO_INPUT, sync_mode: false, image_size: { width: 64, height: 64 } };
const DAY = 86400;

async function maxAge(url) {
  const response = await fetch(url);
  assert.equal(response.status, 200, url);
  const match = /max-age=(\d+)/.exec(response.headers.get("cache-control"));
  assert.ok(match, response.headers.get("cache-control"));
  return Number(match[1]);
}

for (const mode of MODES) {
  describe(`object lifecycle (${mode})`, () => {
    test('fal.run with expiresIn "immediate" (60 s): the file is served for a minute', async () => {
      const { data } = await clientFor(mode).run(TURBO, { input: INPUT, storageSettings: { expiresIn: "immediate" } });
      const age = await maxAge(data.images[0].url);
      assert.ok(age > 0 && age <= 60, `max-age ${age}`);
      const plain = await clientFor(mode).run(TURBO, { input: INPUT });
      assert.equal(await maxAge(plain.data.images[0].url), DAY, "without a preference: the server's default");
    });

    test("fal.subscribe keeps the preference with the queued job", async () => {
      const { data } = await clientFor(mode).subscribe(TURBO, {
        input: INPUT,
        storageSettings: { expiresIn: 120 },
        pollInterval: 100,
      });
      const age = await maxAge(data.images[0].url);
      assert.ok(age > 60 && age <= 120, `max-age ${age}`);
    });

    test("fal.storage.upload with a lifecycle", async () => {
      const url = await clientFor(mode).storage.upload(new Blob([new Uint8Array(1000)], { type: "image/png" }), {
        lifecycle: { expiresIn: "immediate" },
      });
      const age = await maxAge(url);
      assert.ok(age > 0 && age <= 60, `max-age ${age}`);
    });
  });
}
