// fal.storage.upload through the official client: the initiate call goes through the
// middleware or the proxy, the PUT goes straight to the upload_url livegen returned.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { describe, test } from "node:test";

import { MODES, clientFor, server } from "./harness.mjs";

for (const mode of MODES) {
  describe(`storage (${mode})`, () => {
    for (const [name, type] of [
      ["binary", "application/octet-stream"],
      ["png-typed", "image/png"],
    ]) {
      test(`upload of a ${name} Blob round-trips byte-identical`, async () => {
        const bytes = randomBytes(256 * 1024 + 7);
        const url = await clientFor(mode).storage.upload(new Blob([bytes], { type }));
        assert.equal(typeof url, "string");
        assert.ok(url.startsWith(server().baseUrl), `${url} is served by livegen`);
        const response = await fetch(url); // no key: file URLs are public
        assert.equal(response.status, 200);
        assert.deepEqual(Buffer.from(await response.arrayBuffer()), bytes);
      });
    }

    test("a Blob over 90 MB goes up in parts (initiate-multipart, part PUTs, complete)", async () => {
      const bytes = randomBytes(90 * 1024 * 1024 + 4099); // the client's threshold is 90 MB
      const url = await clientFor(mode).storage.upload(new Blob([bytes], { type: "application/octet-stream" }));
      const response = await fetch(url);
      assert.equal(response.status, 200);
      const got = Buffer.from(await response.arrayBuffer());
      assert.equal(got.length, bytes.length);
      assert.ok(got.equals(bytes), "byte-identical");
    });
  });
}
