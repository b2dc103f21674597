// fal.run through the official client, in both ways of pointing it at livegen.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { ApiError, ValidationError } from "@fal-ai/client";

import { MODES, TURBO, TURBO_INPUT, clientFor } from "./harness.mjs";

function jpegSize(dataUrl) {
  const prefix = "data:image/jpeg;base64,";
  assert.ok(dataUrl.startsWith(prefix), dataUrl.slice(0, 40));
  const bytes = Buffer.from(dataUrl.slice(prefix.length), "base64");
  assert.deepEqual([...bytes.subarray(0, 3)], [0xff, 0xd8, 0xff], "not a JPEG");
  // Walk the JPEG segments to the start-of-frame marker, which holds the real size.
  for (let i = 2; i + 9 < bytes.length; ) {
    const marker = bytes[i + 1];
    if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
      return { height: bytes.readUInt16BE(i + 5), width: bytes.readUInt16BE(i + 7) };
    }
    i += 2 + bytes.readUInt16BE(i + 2);
  }
  throw new Error("no SOF marker in the JPEG");
}

for (const mode of MODES) {
  describe(`fal.run (${mode})`, () => {
    test("text-to-image returns an inline 512x512 JPEG and a request id", async () => {
      const { data, requestId } = await clientFor(mode).run(TURBO, { input: TURBO_INPUT });
      const [image] = data.images;
      assert.equal(image.width, 512);
      assert.equal(image.height, 512);
      assert.equal(image.content_type, "image/jpeg");
      assert.deepEqual(jpegSize(image.url), { width: 512, height: 512 });
      assert.equal(typeof data.seed, "number");
      assert.match(requestId, /^[0-9a-f-]{36}$/);
    });

    test("method get sends the input in the query string", async () => {
      const input = { ...TURBO_INPUT, seed: 42, image_size: "square" };
      const { data } = await clientFor(mode).run(TURBO, { input, method: "get" });
      assert.equal(data.seed, 42);
      assert.deepEqual(jpegSize(data.images[0].url), { width: 512, height: 512 });
    });

    test("a missing prompt is a ValidationError at body.prompt", async () => {
      const fal = clientFor(mode);
      const err = await fal.run(TURBO, { input: { model_name: "stabilityai/sd-turbo" } }).then(
        () => assert.fail("expected a ValidationError"),
        (e) => e,
      );
      assert.ok(err instanceof ValidationError, `${err}`);
      assert.equal(err.status, 422);
      assert.deepEqual(err.fieldErrors[0].loc, ["body", "prompt"]);
      assert.equal(err.getFieldErrors("prompt").length, 1);
      assert.ok(err.requestId, "x-fal-request-id on the 422");
    });

    test("a wrong key is an ApiError 401", async () => {
      const fal = clientFor(mode, { credentials: "not-a-livegen-key" });
      const err = await fal.run(TURBO, { input: TURBO_INPUT }).then(
        () => assert.fail("expected an ApiError"),
        (e) => e,
      );
      assert.ok(err instanceof ApiError, `${err}`);
      assert.ok(!(err instanceof ValidationError));
      assert.equal(err.status, 401);
      assert.equal(err.body.error_type, "unauthorized");
    });
  });
}
