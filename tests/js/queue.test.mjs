// The queue through the official client: subscribe (polling and streaming) and the
// submit/status/result/cancel calls, in both ways of pointing the client at livegen.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { ApiError } from "@fal-ai/client";

import { MODES, TURBO, TURBO_INPUT, clientFor } from "./harness.mjs";

const STATUSES = new Set(["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]);
// Small images: these tests are about the queue protocol, and the server generates on a CPU.
const INPUT = { ...TURBO_INPUT, image_size: { width: 256, height: 256 } };
// Slow enough on a CPU to be caught before it finishes (50 steps; the engine stops between steps).
const SLOW_INPUT = { ...TURBO_INPUT, prompt: "a slow one", num_inference_steps: 50 };

function assertImage(data) {
  const [image] = data.images;
  assert.equal(image.width, 256);
  assert.equal(image.height, 256);
  assert.ok(image.url.startsWith("data:image/jpeg;base64,") || image.url.startsWith("http"), image.url.slice(0, 40));
}

async function waitCompleted(fal, requestId) {
  for (let i = 0; i < 600; i++) {
    const status = await fal.queue.status(TURBO, { requestId, logs: true });
    assert.ok(STATUSES.has(status.status), status.status);
    if (status.status === "COMPLETED") {
      return status;
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`request ${requestId} did not complete`);
}

for (const mode of MODES) {
  describe(`queue (${mode})`, () => {
    for (const subscribeMode of ["polling", "streaming"]) {
      test(`fal.subscribe in ${subscribeMode} mode reports updates with logs`, async () => {
        const updates = [];
        let enqueued;
        const { data, requestId } = await clientFor(mode).subscribe(TURBO, {
          input: INPUT,
          logs: true,
          mode: subscribeMode,
          pollInterval: 100,
          onEnqueue: (id) => {
            enqueued = id;
          },
          onQueueUpdate: (update) => updates.push(update),
        });
        assertImage(data);
        assert.ok(enqueued, "onEnqueue was called");
        assert.equal(requestId, enqueued);
        assert.ok(updates.length > 0, "onQueueUpdate was called");
        for (const update of updates) {
          assert.ok(STATUSES.has(update.status), update.status);
        }
        const last = updates.at(-1);
        assert.equal(last.status, "COMPLETED");
        assert.ok(Array.isArray(last.logs), "logs requested, so a list");
        assert.ok(last.logs.length > 0, "at least one log line");
        for (const entry of last.logs) {
          assert.equal(typeof entry.message, "string");
          assert.equal(typeof entry.timestamp, "string");
        }
      });
    }

    test("submit, status, result", async () => {
      const fal = clientFor(mode);
      const submitted = await fal.queue.submit(TURBO, { input: INPUT });
      assert.ok(submitted.request_id);
      assert.ok(STATUSES.has(submitted.status));
      const done = await waitCompleted(fal, submitted.request_id);
      assert.ok(Array.isArray(done.logs));
      const { data, requestId } = await fal.queue.result(TURBO, { requestId: submitted.request_id });
      assertImage(data);
      assert.equal(requestId, submitted.request_id);
    });

    test("cancel stops a request, which then completes with an error", async () => {
      const fal = clientFor(mode);
      const { request_id: requestId } = await fal.queue.submit(TURBO, { input: SLOW_INPUT });
      await fal.queue.cancel(TURBO, { requestId }); // resolves on 202 CANCELLATION_REQUESTED
      const done = await waitCompleted(fal, requestId);
      assert.ok(done.error, "a cancelled request is COMPLETED with an error");
      const err = await fal.queue.result(TURBO, { requestId }).then(
        () => assert.fail("the result of a cancelled request is an error"),
        (e) => e,
      );
      assert.ok(err instanceof ApiError, `${err}`);
      assert.ok(err.status >= 400, `${err.status}`);
      const again = await fal.queue.cancel(TURBO, { requestId }).then(
        () => assert.fail("cancelling twice is an error"),
        (e) => e,
      );
      assert.equal(again.status, 400);
      assert.equal(again.body.status, "ALREADY_COMPLETED");
    });

    test("cancel of an unknown request is an ApiError 404", async () => {
      const err = await clientFor(mode)
        .queue.cancel(TURBO, { requestId: "00000000-0000-0000-0000-000000000000" })
        .then(
          () => assert.fail("expected an ApiError"),
          (e) => e,
        );
      assert.ok(err instanceof ApiError, `${err}`);
      assert.equal(err.status, 404);
    });
  });
}
