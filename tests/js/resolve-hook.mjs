// Module resolution hook (registered by harness.mjs): a bare import that cannot be resolved
// from where it is written ("@fal-ai/client" inside clients/js/livegen.mjs, which lives outside
// any node_modules tree) is resolved again from tests/js, where `npm ci` installed it. The
// shipped helper therefore stays a single copyable file, and there is one copy of the client.
const FALLBACK_PARENT = new URL("./package.json", import.meta.url).href;

export async function resolve(specifier, context, nextResolve) {
  try {
    return await nextResolve(specifier, context);
  } catch (err) {
    const bare = !/^(\.|\/|[a-zA-Z][a-zA-Z0-9+.-]*:)/.test(specifier);
    if (err?.code !== "ERR_MODULE_NOT_FOUND" || !bare || context.parentURL === FALLBACK_PARENT) {
      throw err;
    }
    return nextResolve(specifier, { ...context, parentURL: FALLBACK_PARENT });
  }
}
