// The playground's msgpack codec against @msgpack/msgpack (the codec fal's JS client uses,
// installed in tests/js by scripts/test) and against byte strings from the msgpack spec.
// Run by tests/web/test_js.py; the wire check against Python's msgpack is in test_msgpack.py.
import assert from "node:assert/strict";
import { test } from "node:test";

import { decode, encode } from "../../src/livegen/web/msgpack.js";

const reference = await import(new URL("../js/node_modules/@msgpack/msgpack/dist.esm/index.mjs", import.meta.url));

const hex = (bytes) => Buffer.from(bytes).toString("hex");
const VALUES = [
  null, true, false, 0, 1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, Number.MAX_SAFE_INTEGER,
  -1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31), -(2 ** 31) - 1, Number.MIN_SAFE_INTEGER,
  0.5, -1.25, 1e300, 3.141592653589793, "", "a", "x".repeat(31), "x".repeat(32), "x".repeat(255), "x".repeat(256),
  "x".repeat(70000), "héllo ✓ 🦊", [], [1, [2, [3]]], new Array(16).fill(7), new Array(70000).fill(0), {},
  { a: 1, b: [true, null], c: { d: "e" } }, Object.fromEntries(Array.from({ length: 20 }, (_, i) => [`k${i}`, i])),
  new Uint8Array([]), new Uint8Array([1, 2, 3]), new Uint8Array(300), new Uint8Array(70000),
];

test("encodes exactly like @msgpack/msgpack", () => {
  for (const value of VALUES) {
    assert.equal(hex(encode(value)), hex(reference.encode(value)), `value ${JSON.stringify(value)?.slice(0, 40)}`);
  }
});

test("decodes what @msgpack/msgpack encodes", () => {
  for (const value of VALUES) assert.deepEqual(decode(reference.encode(value)), value);
});

test("decodes the forms other encoders choose", () => {
  const cases = [
    ["ca3fc00000", 1.5], // float32
    ["d0ff", -1], // int8 for a small negative
    ["cc05", 5], // uint8 for a positive fixint
    ["cf0000000000000001", 1],
    ["cfffffffffffffffff", 2n ** 64n - 1n], // beyond 2**53: BigInt
    ["d38000000000000000", -(2n ** 63n)],
    ["d90161", "a"],
    ["dc0001c0", [null]],
    ["de0001a16101", { a: 1 }],
  ];
  for (const [bytes, value] of cases) assert.deepEqual(decode(Buffer.from(bytes, "hex")), value, bytes);
});

test("a fal realtime frame: a map with a prompt, numbers and image bytes", () => {
  const frame = {
    prompt: "a fox",
    image_bytes: new Uint8Array([0xff, 0xd8, 0xff]),
    strength: 0.6,
    num_inference_steps: 2,
    image_size: { width: 512, height: 512 },
    seed: 42,
    sync_mode: true,
    request_id: "7",
    skipped: undefined,
  };
  const { skipped, ...sent } = frame;
  assert.deepEqual(reference.decode(encode(frame)), sent);
  assert.deepEqual(decode(encode(frame)), sent);
});

test("bin comes back as a copy that outlives the input buffer", () => {
  const bytes = encode({ content: new Uint8Array([1, 2, 3]) });
  const { content } = decode(bytes);
  bytes.fill(0);
  assert.deepEqual(content, new Uint8Array([1, 2, 3]));
});

test("rejects truncated, trailing and unsupported input", () => {
  assert.throws(() => decode(Buffer.from("a3616263", "hex").subarray(0, 3)), /truncated/);
  assert.throws(() => decode(Buffer.from("c4056162", "hex")), /truncated/);
  assert.throws(() => decode(Buffer.from("0101", "hex")), /extra bytes/);
  assert.throws(() => decode(Buffer.from("c1", "hex")), /unsupported/);
  assert.throws(() => decode(Buffer.from("d40100", "hex")), /unsupported/); // fixext: not used by fal
  assert.throws(() => decode(Buffer.from("a2c328", "hex")), TypeError); // invalid UTF-8
  assert.throws(() => encode(() => 1), TypeError);
});

test("a __proto__ key is plain data", () => {
  const decoded = decode(reference.encode(JSON.parse('{"__proto__": {"polluted": 1}}')));
  assert.equal(Object.getPrototypeOf(decoded), Object.prototype);
  assert.deepEqual(Object.keys(decoded), ["__proto__"]);
  assert.equal({}.polluted, undefined);
});
