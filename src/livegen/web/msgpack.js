// A small msgpack codec: the subset fal's realtime protocol uses (maps, arrays, strings,
// binary, integers, floats, booleans, nil), so the playground needs no bundled library.
// Encoding follows @msgpack/msgpack and Python's msgpack.packb(use_bin_type=True): the
// smallest integer form, float64 for non-integers, str8/16/32 for strings, bin for bytes.
// Tests: tests/web/msgpack.test.mjs (against @msgpack/msgpack) and tests/web/test_msgpack.py.

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

class Writer {
  constructor() {
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }

  reserve(n) {
    if (this.pos + n <= this.buf.length) return;
    const bigger = new Uint8Array(Math.max(this.buf.length * 2, this.pos + n));
    bigger.set(this.buf);
    this.buf = bigger;
    this.view = new DataView(bigger.buffer);
  }

  u8(n) { this.reserve(1); this.view.setUint8(this.pos, n); this.pos += 1; }
  u16(n) { this.reserve(2); this.view.setUint16(this.pos, n); this.pos += 2; }
  u32(n) { this.reserve(4); this.view.setUint32(this.pos, n); this.pos += 4; }
  i8(n) { this.reserve(1); this.view.setInt8(this.pos, n); this.pos += 1; }
  i16(n) { this.reserve(2); this.view.setInt16(this.pos, n); this.pos += 2; }
  i32(n) { this.reserve(4); this.view.setInt32(this.pos, n); this.pos += 4; }
  u64(n) { this.reserve(8); this.view.setBigUint64(this.pos, BigInt(n)); this.pos += 8; }
  i64(n) { this.reserve(8); this.view.setBigInt64(this.pos, BigInt(n)); this.pos += 8; }
  f64(n) { this.reserve(8); this.view.setFloat64(this.pos, n); this.pos += 8; }

  bytes(b) {
    this.reserve(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
  }

  // A header for a length-prefixed type: [fixmask, fixlimit] or null, then the 8/16/32-bit tags.
  length(n, fix, tag8, tag16, tag32) {
    if (fix && n < fix[1]) this.u8(fix[0] | n);
    else if (tag8 && n < 0x100) { this.u8(tag8); this.u8(n); }
    else if (n < 0x10000) { this.u8(tag16); this.u16(n); }
    else if (n <= 0xffffffff) { this.u8(tag32); this.u32(n); }
    else throw new RangeError("msgpack: too long");
  }
}

/** Encode a value as msgpack; returns a Uint8Array. `undefined` map values are left out. */
export function encode(value) {
  const w = new Writer();
  write(w, value, 0);
  return w.buf.slice(0, w.pos);
}

function write(w, value, depth) {
  if (depth > 100) throw new RangeError("msgpack: nested too deep");
  if (value === null || value === undefined) w.u8(0xc0);
  else if (value === false) w.u8(0xc2);
  else if (value === true) w.u8(0xc3);
  else if (typeof value === "number") writeNumber(w, value);
  else if (typeof value === "bigint") writeBigInt(w, value);
  else if (typeof value === "string") {
    const b = utf8Encoder.encode(value);
    w.length(b.length, [0xa0, 32], 0xd9, 0xda, 0xdb);
    w.bytes(b);
  } else if (value instanceof Uint8Array || value instanceof ArrayBuffer) {
    const b = value instanceof Uint8Array ? value : new Uint8Array(value);
    w.length(b.length, null, 0xc4, 0xc5, 0xc6);
    w.bytes(b);
  } else if (Array.isArray(value)) {
    w.length(value.length, [0x90, 16], null, 0xdc, 0xdd);
    for (const item of value) write(w, item, depth + 1);
  } else if (typeof value === "object") {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined);
    w.length(entries.length, [0x80, 16], null, 0xde, 0xdf);
    for (const [k, v] of entries) {
      write(w, k, depth + 1);
      write(w, v, depth + 1);
    }
  } else throw new TypeError(`msgpack: cannot encode a ${typeof value}`);
}

function writeNumber(w, n) {
  if (!Number.isSafeInteger(n)) return w.u8(0xcb), w.f64(n); // also NaN, ±Infinity, 2**53+
  if (n >= 0) {
    if (n < 0x80) w.u8(n);
    else if (n < 0x100) { w.u8(0xcc); w.u8(n); }
    else if (n < 0x10000) { w.u8(0xcd); w.u16(n); }
    else if (n <= 0xffffffff) { w.u8(0xce); w.u32(n); }
    else { w.u8(0xcf); w.u64(n); }
  } else if (n >= -32) w.u8(0xe0 | (n + 32));
  else if (n >= -0x80) { w.u8(0xd0); w.i8(n); }
  else if (n >= -0x8000) { w.u8(0xd1); w.i16(n); }
  else if (n >= -0x80000000) { w.u8(0xd2); w.i32(n); }
  else { w.u8(0xd3); w.i64(n); }
}

function writeBigInt(w, n) {
  if (n >= 0n && n < 2n ** 64n) { w.u8(0xcf); w.u64(n); }
  else if (n < 0n && n >= -(2n ** 63n)) { w.u8(0xd3); w.i64(n); }
  else throw new RangeError("msgpack: integer out of range");
}

/** Decode one msgpack value from a Uint8Array or ArrayBuffer. Integers beyond 2**53 come back
 * as BigInt; bin as Uint8Array (a copy, safe to keep). */
export function decode(input) {
  const bytes = input instanceof Uint8Array ? input : new Uint8Array(input);
  const r = new Reader(bytes);
  const value = r.read(0);
  if (r.pos !== bytes.length) throw new RangeError(`msgpack: ${bytes.length - r.pos} extra bytes`);
  return value;
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  take(n) {
    if (this.pos + n > this.bytes.length) throw new RangeError("msgpack: truncated input");
    const at = this.pos;
    this.pos += n;
    return at;
  }

  u8() { return this.view.getUint8(this.take(1)); }
  u16() { return this.view.getUint16(this.take(2)); }
  u32() { return this.view.getUint32(this.take(4)); }
  str(n) { const at = this.take(n); return utf8Decoder.decode(this.bytes.subarray(at, at + n)); }
  bin(n) { const at = this.take(n); return this.bytes.slice(at, at + n); }

  int64(signed) {
    const at = this.take(8);
    const big = signed ? this.view.getBigInt64(at) : this.view.getBigUint64(at);
    const small = Number(big);
    return Number.isSafeInteger(small) ? small : big;
  }

  array(n, depth) {
    const out = new Array(n);
    for (let i = 0; i < n; i++) out[i] = this.read(depth + 1);
    return out;
  }

  map(n, depth) {
    const out = {};
    for (let i = 0; i < n; i++) {
      const key = this.read(depth + 1);
      // defineProperty: a "__proto__" key is data, not a prototype change.
      Object.defineProperty(out, String(key), { value: this.read(depth + 1), enumerable: true, writable: true, configurable: true });
    }
    return out;
  }

  read(depth) {
    if (depth > 100) throw new RangeError("msgpack: nested too deep");
    const t = this.u8();
    if (t < 0x80) return t;
    if (t < 0x90) return this.map(t & 0x0f, depth);
    if (t < 0xa0) return this.array(t & 0x0f, depth);
    if (t < 0xc0) return this.str(t & 0x1f);
    if (t >= 0xe0) return t - 0x100;
    switch (t) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return this.bin(this.u8());
      case 0xc5: return this.bin(this.u16());
      case 0xc6: return this.bin(this.u32());
      case 0xca: return this.view.getFloat32(this.take(4));
      case 0xcb: return this.view.getFloat64(this.take(8));
      case 0xcc: return this.u8();
      case 0xcd: return this.u16();
      case 0xce: return this.u32();
      case 0xcf: return this.int64(false);
      case 0xd0: return this.view.getInt8(this.take(1));
      case 0xd1: return this.view.getInt16(this.take(2));
      case 0xd2: return this.view.getInt32(this.take(4));
      case 0xd3: return this.int64(true);
      case 0xd9: return this.str(this.u8());
      case 0xda: return this.str(this.u16());
      case 0xdb: return this.str(this.u32());
      case 0xdc: return this.array(this.u16(), depth);
      case 0xdd: return this.array(this.u32(), depth);
      case 0xde: return this.map(this.u16(), depth);
      case 0xdf: return this.map(this.u32(), depth);
      default: throw new TypeError(`msgpack: unsupported type 0x${t.toString(16)} (extensions are not used here)`);
    }
  }
}
