// The playground's RealtimeClient with a fake WebSocket, fake timers and a fake clock: token
// refresh, reconnect with backoff, latest-wins sending and the in-flight window.
// Run by tests/web/test_js.py; the real thing against a live server is test_playground.py.
import assert from "node:assert/strict";
import { beforeEach, test } from "node:test";

import { decode, encode } from "../../src/livegen/web/msgpack.js";
import { AuthError, MAX_BUFFERING, RealtimeClient, requestToken, TokenError } from "../../src/livegen/web/realtime.js";

const TURBO = "fal-ai/fast-turbo-diffusion";

class FakeClock {
  constructor() {
    this.t = 0;
    this.timers = [];
    this.nextId = 1;
  }

  now = () => this.t;

  setTimeout(fn, ms) {
    const id = this.nextId++;
    this.timers.push({ id, at: this.t + ms, fn });
    return id;
  }

  clearTimeout(id) {
    this.timers = this.timers.filter((t) => t.id !== id);
  }

  /** Move time forward, running due timers in order. */
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      this.timers.sort((a, b) => a.at - b.at);
      const next = this.timers[0];
      if (!next || next.at > end) break;
      this.timers.shift();
      this.t = next.at;
      next.fn();
      await settle();
    }
    this.t = end;
    await settle();
  }
}

const settle = () => new Promise((resolve) => setImmediate(resolve));

let sockets;
class FakeSocket {
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closedWith = null;
    sockets.push(this);
  }

  send(data) {
    this.sent.push(decode(data));
  }

  close(code) {
    this.closedWith = code;
  }

  // server side
  open() {
    this.onopen();
  }

  result(output) {
    this.onmessage({ data: encode(output).buffer });
  }

  text(message) {
    this.onmessage({ data: JSON.stringify(message) });
  }

  drop(code = 1006) {
    this.onclose({ code });
  }
}

let clock;
let tokens; // the token requests: [alias, seconds]
let events;
let tokenAnswer;

function makeClient(extra = {}) {
  return new RealtimeClient({
    app: TURBO,
    base: "http://127.0.0.1:8000",
    tokenProvider: async (alias, seconds) => {
      tokens.push([alias, seconds]);
      return tokenAnswer(tokens.length);
    },
    WebSocketImpl: FakeSocket,
    now: clock.now,
    timers: clock,
    random: () => 0.5,
    on: {
      result: (output, info) => events.push(["result", output.request_id, info]),
      error: (error) => events.push(["error", error]),
      status: (state) => events.push(["status", state]),
      timing: (s) => events.push(["timing", s]),
    },
    ...extra,
  });
}

const errors = () => events.filter((e) => e[0] === "error").map((e) => e[1]);

beforeEach(() => {
  clock = new FakeClock();
  sockets = [];
  tokens = [];
  events = [];
  tokenAnswer = (n) => `token-${n}`;
});

test("the first send fetches an app-scoped token and opens the socket with it", async () => {
  const client = makeClient();
  client.send({ prompt: "a" });
  await settle();
  assert.deepEqual(tokens, [["fast-turbo-diffusion", 120]]);
  assert.equal(sockets.length, 1);
  const url = new URL(sockets[0].url);
  assert.equal(url.origin, "ws://127.0.0.1:8000");
  assert.equal(url.pathname, `/${TURBO}/realtime`);
  assert.equal(url.searchParams.get("fal_jwt_token"), "token-1");
  assert.equal(url.searchParams.get("max_buffering"), String(MAX_BUFFERING));
  sockets[0].open();
  assert.deepEqual(sockets[0].sent, [{ prompt: "a", request_id: "1" }]);
});

test("https pages use wss and tokens are URL-encoded", async () => {
  tokenAnswer = () => "a+b/c=";
  const client = makeClient({ base: "https://gen.example:8443" });
  client.send({ prompt: "a" });
  await settle();
  assert.ok(sockets[0].url.startsWith("wss://gen.example:8443/"));
  assert.equal(new URL(sockets[0].url).searchParams.get("fal_jwt_token"), "a+b/c=");
});

test("a base URL with a path prefix (a server behind a reverse proxy) keeps the prefix", async () => {
  for (const base of ["https://example.com/livegen", "https://example.com/livegen/"]) {
    sockets = [];
    const client = makeClient({ base });
    client.send({ prompt: "a" });
    await settle();
    assert.equal(sockets.at(-1).url.split("?")[0], `wss://example.com/livegen/${TURBO}/realtime`);
    client.close();
  }
});

test("latest wins while connecting and while the in-flight window is full", async () => {
  const client = makeClient();
  for (const prompt of ["a", "b", "c"]) client.send({ prompt });
  await settle();
  sockets[0].open();
  assert.deepEqual(sockets[0].sent.map((f) => f.prompt), ["c"]);
  client.send({ prompt: "d" });
  client.send({ prompt: "e" });
  assert.equal(sockets[0].sent.length, 1, "one frame in flight at a time by default");
  assert.equal(client.wantsFrame(), false);
  sockets[0].result({ request_id: "1", images: [] });
  assert.deepEqual(sockets[0].sent.map((f) => f.prompt), ["c", "e"]);
  assert.equal(events.find((e) => e[0] === "result")[2].latencyMs, 0);
});

test("two frames in flight when asked, each answered once", async () => {
  const client = makeClient({ maxInFlight: 2 });
  client.send({ prompt: "a" });
  await settle();
  sockets[0].open();
  client.send({ prompt: "b" });
  client.send({ prompt: "c" });
  assert.deepEqual(sockets[0].sent.map((f) => f.request_id), ["1", "2"]);
  sockets[0].text({ type: "x-fal-error", error: "INVALID_INPUT", reason: "bad" }); // answers "1"
  assert.deepEqual(sockets[0].sent.map((f) => f.request_id), ["1", "2", "3"]);
  sockets[0].text({ type: "x-fal-message", action: "timings", timing: 0.25 });
  sockets[0].result({ request_id: "3", images: [] }); // answers "2" and "3"
  assert.equal(client.inFlight.size, 0);
  assert.deepEqual(errors(), [{ kind: "frame", code: "INVALID_INPUT", message: "bad" }]);
  assert.ok(events.some((e) => e[0] === "timing" && e[1] === 0.25));
});

test("the token is refreshed in the background at 90 % of its lifetime; the socket stays", async () => {
  const client = makeClient();
  client.send({ prompt: "a" });
  await settle();
  sockets[0].open();
  await clock.advance(107_000);
  assert.equal(tokens.length, 1);
  await clock.advance(1_000);
  assert.equal(tokens.length, 2, "a new token at 108 s");
  assert.equal(sockets[0].closedWith, null, "the open socket is kept");
  await clock.advance(108_000);
  assert.equal(tokens.length, 3, "and again 108 s later");
  sockets[0].drop();
  await clock.advance(600);
  assert.equal(tokens.length, 3, "the reconnect uses the fresh token, no extra request");
  assert.equal(new URL(sockets[1].url).searchParams.get("fal_jwt_token"), "token-3");
});

test("a failed background refresh is retried after 6 s", async () => {
  const client = makeClient();
  client.send({ prompt: "a" });
  await settle();
  sockets[0].open();
  tokenAnswer = (n) => (n === 2 ? Promise.reject(new TokenError("down")) : `token-${n}`);
  await clock.advance(108_000);
  assert.equal(tokens.length, 2);
  await clock.advance(5_999);
  assert.equal(tokens.length, 2);
  await clock.advance(1);
  assert.equal(tokens.length, 3);
  assert.equal(client.token.value, "token-3");
  assert.deepEqual(errors(), [], "the user is not bothered while the socket works");
});

test("an idle client fetches a new token only when the old one is past 90 %", async () => {
  const client = makeClient();
  const idleOut = async (socket) => {
    socket.open();
    socket.result({ request_id: socket.sent[0].request_id });
    socket.text({ type: "x-fal-error", error: "TIMEOUT", reason: "no inputs, reconnect when needed!" });
    socket.drop(1000);
    await settle();
  };
  client.send({ prompt: "a" });
  await settle();
  await idleOut(sockets[0]);
  assert.equal(client.state, "idle");
  assert.deepEqual(errors(), [], "an idle timeout is not an error");
  await clock.advance(50_000);
  client.send({ prompt: "b" });
  await settle();
  assert.equal(tokens.length, 1, "at 50 s the token is still fresh");
  await idleOut(sockets[1]);
  assert.deepEqual(clock.timers, [], "no background refresh while idle");
  await clock.advance(59_000);
  client.send({ prompt: "c" });
  await settle();
  assert.equal(tokens.length, 2, "at 109 s a new one");
  assert.equal(new URL(sockets[2].url).searchParams.get("fal_jwt_token"), "token-2");
});

test("a lost connection reconnects with backoff and re-sends the unanswered frame", async () => {
  const client = makeClient();
  client.send({ prompt: "a" });
  await settle();
  sockets[0].open();
  sockets[0].drop(1006);
  assert.deepEqual(errors(), [{ kind: "lost", code: 1006, retryInMs: 500 }]);
  assert.equal(client.state, "waiting");
  await clock.advance(499);
  assert.equal(sockets.length, 1);
  await clock.advance(1);
  assert.equal(sockets.length, 2);
  sockets[1].drop(1006); // refused: never opened
  assert.deepEqual(errors()[1], { kind: "refused", code: 1006, retryInMs: 1000 });
  await clock.advance(1000);
  assert.equal(tokens.length, 2, "a refused handshake drops the token");
  sockets[2].drop(1006);
  assert.equal(errors()[2].retryInMs, 2000);
  await clock.advance(2000);
  sockets[3].open();
  assert.deepEqual(sockets[3].sent.map((f) => f.prompt), ["a"]);
  sockets[3].result({ request_id: sockets[3].sent[0].request_id });
  sockets[3].drop(1006);
  assert.equal(errors().at(-1).retryInMs, 500, "a result resets the backoff");
});

test("the backoff stops growing at 10 s", async () => {
  const client = makeClient();
  client.send({ prompt: "a" });
  await settle();
  for (let i = 0; i < 8; i++) {
    sockets.at(-1).drop(1006);
    await clock.advance(errors().at(-1).retryInMs);
  }
  assert.deepEqual(errors().map((e) => e.retryInMs), [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
});

test("an error that closes the session reconnects without a second message", async () => {
  const client = makeClient();
  client.send({ prompt: "a" });
  await settle();
  sockets[0].open();
  sockets[0].text({ type: "x-fal-error", error: "INTERNAL_ERROR", reason: "boom" });
  sockets[0].drop(1000);
  assert.deepEqual(errors(), [{ kind: "frame", code: "INTERNAL_ERROR", message: "boom" }]);
  assert.equal(client.state, "waiting");
});

test("a rejected key stops: no retries, one auth error", async () => {
  tokenAnswer = () => Promise.reject(new AuthError("That API key was not accepted."));
  const client = makeClient();
  client.send({ prompt: "a" });
  await settle();
  await clock.advance(60_000);
  assert.equal(tokens.length, 1);
  assert.equal(sockets.length, 0);
  assert.deepEqual(errors(), [{ kind: "auth", message: "That API key was not accepted." }]);
  assert.equal(client.state, "idle");
});

test("switching app closes the socket and fetches a token for the new app", async () => {
  const client = makeClient();
  client.send({ prompt: "a" });
  await settle();
  sockets[0].open();
  client.setApp("fal-ai/fast-lcm-diffusion");
  client.send({ prompt: "b" });
  await settle();
  assert.equal(sockets[0].closedWith, 1000);
  assert.deepEqual(tokens.at(-1), ["fast-lcm-diffusion", 120]);
  assert.ok(sockets[1].url.includes("/fal-ai/fast-lcm-diffusion/realtime?"));
  sockets[0].result({ request_id: "1" }); // a late answer on the old socket is ignored
  assert.equal(events.filter((e) => e[0] === "result").length, 0);
});

test("requestToken sends the key only in the Authorization header", async () => {
  const calls = [];
  const fetchImpl = async (url, init) => {
    calls.push([url, init]);
    return { ok: true, status: 200, json: async () => "tok" };
  };
  assert.equal(await requestToken("secret-key", "fast-lcm-diffusion", { fetchImpl }), "tok");
  const [url, init] = calls[0];
  assert.equal(url, "rest/tokens/"); // relative to the page: a path prefix in front of livegen is kept
  assert.equal(init.method, "POST");
  assert.equal(init.headers.Authorization, "Key secret-key");
  assert.deepEqual(JSON.parse(init.body), { allowed_apps: ["fast-lcm-diffusion"], token_expiration: 120 });
  const answer = (status) => async () => ({ ok: status < 400, status, json: async () => ({ detail: "x" }) });
  await assert.rejects(requestToken("k", "a", { fetchImpl: answer(401) }), AuthError);
  await assert.rejects(requestToken("k", "a", { fetchImpl: answer(429) }), TokenError);
  await assert.rejects(requestToken("k", "a", { fetchImpl: answer(200) }), TokenError); // not a string
  await assert.rejects(requestToken("k", "a", { fetchImpl: () => Promise.reject(new Error("offline")) }), TokenError);
});
