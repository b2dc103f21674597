// Shared set-up for the Node tests (not a test file itself).
//
// The server under test comes from the environment: LIVEGEN_BASE_URL and FAL_KEY (a valid
// livegen key). tests/compat/test_js_client.py sets both for its live server.
import { register } from "node:module";

register("./resolve-hook.mjs", import.meta.url);

// Imported after the hook is registered, so the helper's bare imports resolve from here.
const helper = await import("../../clients/js/livegen.mjs");
export const { createLivegenClient, installWebSocketShim, toLivegenUrl, toLivegenWebSocketUrl } = helper;

export const MODES = ["middleware", "proxy"];
export const TURBO = "fal-ai/fast-turbo-diffusion";
export const TURBO_INPUT = { prompt: "a red fox", model_name: "stabilityai/sd-turbo" };

/** The live server's base URL and key, from the environment. */
export function server() {
  const baseUrl = process.env.LIVEGEN_BASE_URL;
  const key = process.env.FAL_KEY;
  if (!baseUrl || !key) {
    throw new Error("set LIVEGEN_BASE_URL and FAL_KEY to a running livegen server and one of its keys");
  }
  return { baseUrl: baseUrl.replace(/\/+$/, ""), key };
}

/** A fal client for the live server in `mode`; `credentials` defaults to the valid key. */
export function clientFor(mode, options = {}) {
  const { baseUrl, key } = server();
  return createLivegenClient({ baseUrl, mode, credentials: key, ...options });
}
