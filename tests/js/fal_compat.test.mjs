// Wire-compatibility tests: the official JavaScript client (@fal-ai/client, pinned to 1.10.1 in
// package.json) talking to a running wanserve server through its fal proxy endpoint.
//
// How to run (from the repository root, with a server already listening):
//
//   (cd tests/js && npm ci)
//   WANSERVE_URL=http://127.0.0.1:PORT node --test tests/js/fal_compat.test.mjs
//
// Optional: WANSERVE_KEY=<key> is sent as `Authorization: Key <key>` when the server requires one.
// Without WANSERVE_URL every test is skipped. The tests run one at a time (each generation takes
// several seconds on the CPU test server), so timeouts are generous.
//
// How the client is pointed at the server: `fal.config({ proxyUrl: { url, when: "always" } })`.
// In 1.10.1 `createConfig` turns the object form into `withProxy({ targetUrl: url, when })`; with
// `when: "always"` every request that goes through `dispatchRequest` (submit, status, status
// stream, result, cancel, storage upload initiate) is sent to `url` with the original
// `https://queue.fal.run/...` or `https://rest.fal.ai/...` URL in the `x-fal-target-url` header.
// (The plain string form only applies when `window.document` exists, i.e. never in Node.)
// The storage PUT to `upload_url` is NOT proxied: it is a direct `config.fetch`.
//
// A recording `fetch` is also configured (it only wraps globalThis.fetch) so the tests can check
// what actually went over the wire: the proxy headers, the upload PUT, and the submitted body.

import { before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { ApiError, ValidationError, fal } from "@fal-ai/client";

const WANSERVE_URL = (process.env.WANSERVE_URL ?? "").replace(/\/+$/, "");
const WANSERVE_KEY = process.env.WANSERVE_KEY || undefined;
const PROXY_URL = `${WANSERVE_URL}/api/fal/proxy`;

const APP = "fal-ai/wan-22";
const LORA_APP = "fal-ai/wan-22/lora";
const CHEAP_INPUT = Object.freeze({
  prompt: "a red fox in snow",
  resolution: "480p",
  num_inference_steps: 1,
  guidance_scale: 1,
  guidance_scale_2: 1,
  seed: 7,
});
const QUEUE_STATUSES = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"];
const UPLOAD_INITIATE_TARGET = "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3";

const GENERATION_TIMEOUT_MS = 240_000; // one test that runs one cheap generation
const CANCEL_TIMEOUT_MS = 420_000; // two slow jobs, both cancelled

// ---------------------------------------------------------------------------------------------
// Recording fetch: every request the client makes, with normalised headers and the string body.
// For upload-initiate calls the JSON response is recorded too (to learn the file_url).

/** @type {{url: string, method: string, headers: Headers, body: string | undefined, response?: any}[]} */
const calls = [];

async function recordingFetch(input, init = {}) {
  const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
  const headers = new Headers(init.headers ?? {});
  const entry = {
    url,
    method: (init.method ?? "GET").toUpperCase(),
    headers,
    body: typeof init.body === "string" ? init.body : undefined,
  };
  calls.push(entry);
  const response = await globalThis.fetch(input, init);
  const target = headers.get("x-fal-target-url") ?? "";
  if (target.includes("/storage/upload/initiate") && response.ok) {
    entry.response = await response.clone().json().catch(() => undefined);
  }
  return response;
}

const targetOf = (call) => call.headers.get("x-fal-target-url");

// ---------------------------------------------------------------------------------------------
// Helpers

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `fal.queue.status` until COMPLETED; checks every status on the way. Returns the last. */
async function waitForCompleted(requestId, { deadlineMs = 180_000, app = APP } = {}) {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const status = await fal.queue.status(app, { requestId, logs: true });
    assert.ok(QUEUE_STATUSES.includes(status.status), `unexpected status ${JSON.stringify(status)}`);
    if (status.status === "COMPLETED") return status;
    assert.ok(Date.now() < deadline, `request ${requestId} not COMPLETED after ${deadlineMs} ms`);
    await sleep(500);
  }
}

/** Checks the output of `fal-ai/wan-22` as the client returns it: `{data, requestId}`. */
function assertVideoResult(result, { seed = 7 } = {}) {
  assert.equal(typeof result, "object");
  assert.equal(typeof result.requestId, "string");
  assert.ok(result.requestId.length > 0, "result.requestId is empty (x-fal-request-id header missing?)");
  const { data } = result;
  assert.equal(typeof data, "object", `result.data is not an object: ${JSON.stringify(data)}`);
  assert.equal(typeof data.video, "object", `no video in ${JSON.stringify(data)}`);
  assert.equal(typeof data.video.url, "string");
  const url = new URL(data.video.url); // throws when it is not an absolute URL
  assert.ok(["http:", "https:"].includes(url.protocol), `video url ${data.video.url}`);
  assert.equal(data.video.content_type, "video/mp4");
  assert.equal(data.seed, seed);
}

/** Downloads a URL (plainly, no credentials) and returns {response, bytes}. */
async function download(url) {
  const response = await globalThis.fetch(url);
  const bytes = Buffer.from(await response.arrayBuffer());
  return { response, bytes };
}

function mediaType(response) {
  return (response.headers.get("content-type") ?? "").split(";")[0].trim().toLowerCase();
}

async function assertMp4Url(url) {
  const { response, bytes } = await download(url);
  assert.equal(response.status, 200, `GET ${url}`);
  assert.equal(mediaType(response), "video/mp4");
  assert.ok(bytes.length > 8, `video is only ${bytes.length} bytes`);
  assert.equal(bytes.subarray(4, 8).toString("latin1"), "ftyp", "no mp4 ftyp box at offset 4");
}

function randomBytes(n, prefix = []) {
  const bytes = new Uint8Array(prefix.length + n);
  bytes.set(prefix, 0);
  for (let i = prefix.length; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return bytes;
}

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/** Best effort: cancel a request and wait for it to finish so later tests start on an idle queue. */
async function cleanUp(requestId, app = APP) {
  try {
    await fal.queue.cancel(app, { requestId });
  } catch {
    // already completed, unknown, ...: nothing to do
  }
  try {
    await waitForCompleted(requestId, { deadlineMs: 120_000, app });
  } catch {
    // the test that called us reports its own failure
  }
}

// ---------------------------------------------------------------------------------------------

describe(
  "fal-ai/wan-22 through @fal-ai/client 1.10.1",
  { concurrency: false, skip: WANSERVE_URL ? false : "WANSERVE_URL is not set" },
  () => {
    before(() => {
      fal.config({
        proxyUrl: { url: PROXY_URL, when: "always" },
        // Explicitly undefined when unset, so a FAL_KEY in the environment is never sent here.
        credentials: WANSERVE_KEY,
        fetch: recordingFetch,
      });
    });

    it("422: subscribe rejects with ValidationError naming num_frames", { timeout: 60_000 }, async () => {
      await assert.rejects(
        fal.subscribe(APP, { input: { prompt: "x", num_frames: 500 } }),
        (error) => {
          assert.ok(error instanceof ValidationError, `expected ValidationError, got ${error?.name}: ${error}`);
          assert.equal(error.status, 422);
          const fieldErrors = error.fieldErrors;
          assert.ok(Array.isArray(fieldErrors), "fieldErrors is not an array");
          assert.ok(
            fieldErrors.some((e) => Array.isArray(e.loc) && e.loc.includes("num_frames")),
            `no field error for num_frames in ${JSON.stringify(fieldErrors)}`,
          );
          assert.ok(error.getFieldErrors("num_frames").length >= 1);
          return true;
        },
      );
    });

    it("storage.upload returns a URL that serves exactly the uploaded bytes", { timeout: 60_000 }, async () => {
      calls.length = 0;
      const bytes = randomBytes(512, PNG_SIGNATURE);
      const url = await fal.storage.upload(new Blob([bytes], { type: "image/png" }));
      assert.equal(typeof url, "string");
      assert.ok(/^https?:\/\//.test(url), `upload returned ${url}`);

      // What went over the wire: initiate through the proxy, then a direct PUT to upload_url.
      const initiate = calls.find((c) => targetOf(c) === UPLOAD_INITIATE_TARGET);
      assert.ok(initiate, "no upload initiate request was sent through the proxy");
      assert.equal(initiate.url, PROXY_URL);
      assert.equal(initiate.method, "POST");
      const initiateBody = JSON.parse(initiate.body);
      assert.equal(initiateBody.content_type, "image/png");
      assert.match(initiateBody.file_name, /\.png$/);
      assert.equal(initiate.response?.file_url, url);
      const put = calls.find((c) => c.method === "PUT" && c.url === initiate.response.upload_url);
      assert.ok(put, "no PUT to upload_url");
      assert.equal(put.headers.get("x-fal-target-url"), null, "the upload PUT must not be proxied");

      const { response, bytes: served } = await download(url);
      assert.equal(response.status, 200, `GET ${url}`);
      assert.equal(mediaType(response), "image/png");
      assert.ok(Buffer.from(bytes).equals(served), "served bytes differ from the uploaded bytes");
    });

    it("subscribe (polling, logs) returns the video and reports denoising steps", { timeout: GENERATION_TIMEOUT_MS }, async () => {
      const updates = [];
      let enqueuedId;
      const result = await fal.subscribe(APP, {
        input: { ...CHEAP_INPUT },
        logs: true,
        pollInterval: 250,
        onEnqueue: (requestId) => {
          enqueuedId = requestId;
        },
        onQueueUpdate: (update) => updates.push(structuredClone(update)),
      });
      assertVideoResult(result);
      assert.equal(result.requestId, enqueuedId, "x-fal-request-id of the result is not the request id");

      assert.ok(updates.length > 0, "onQueueUpdate was never called");
      for (const u of updates) assert.ok(QUEUE_STATUSES.includes(u.status), `bad update ${JSON.stringify(u)}`);
      assert.equal(updates.at(-1).status, "COMPLETED");
      const stepUpdate = updates.find(
        (u) =>
          u.status === "IN_PROGRESS" &&
          Array.isArray(u.logs) &&
          u.logs.some((log) => typeof log?.message === "string" && /step 1\/1/.test(log.message)),
      );
      assert.ok(
        stepUpdate,
        `no IN_PROGRESS update with a "step 1/1" log line; updates: ${JSON.stringify(updates).slice(0, 2000)}`,
      );
      for (const log of stepUpdate.logs) {
        assert.equal(typeof log.message, "string");
        assert.equal(typeof log.timestamp, "string");
        assert.equal(typeof log.level, "string");
      }

      await assertMp4Url(result.data.video.url);
    });

    it("subscribe (streaming) returns the same shape and never repeats a log line", { timeout: GENERATION_TIMEOUT_MS }, async () => {
      calls.length = 0;
      const updates = [];
      let streamLogs;
      const result = await fal.subscribe(APP, {
        input: { ...CHEAP_INPUT },
        logs: true,
        mode: "streaming",
        onQueueUpdate: (update) => {
          // In streaming mode the client hands every update the SAME accumulated `logs` array
          // (it pushes each event's logs into it), so keep a reference and clone the rest.
          if (Array.isArray(update.logs)) streamLogs = update.logs;
          updates.push(structuredClone(update));
        },
      });
      assertVideoResult(result);

      const stream = calls.find((c) => /\/requests\/[^/]+\/status\/stream\?logs=1$/.test(targetOf(c) ?? ""));
      assert.ok(stream, "the client did not request .../status/stream through the proxy");
      assert.equal(stream.method, "GET");

      assert.ok(updates.length > 0, "no server-sent status events");
      for (const u of updates) assert.ok(QUEUE_STATUSES.includes(u.status), `bad event ${JSON.stringify(u)}`);
      assert.equal(updates.at(-1).status, "COMPLETED", "the stream closed before a COMPLETED event");

      assert.ok(Array.isArray(streamLogs) && streamLogs.length > 0, "no logs arrived over the stream");
      const keys = streamLogs.map((log) => `${log.timestamp}\u0000${log.message}`);
      const duplicates = keys.filter((key, i) => keys.indexOf(key) !== i);
      assert.deepEqual(duplicates, [], "log lines repeated across events: send only new lines per event");
      assert.ok(streamLogs.some((log) => /step 1\/1/.test(log.message)), "no step log over the stream");
    });

    it("queue.submit / status / result", { timeout: GENERATION_TIMEOUT_MS }, async () => {
      const submitted = await fal.queue.submit(APP, { input: { ...CHEAP_INPUT } });
      assert.equal(typeof submitted.request_id, "string");
      assert.ok(submitted.request_id.length > 0);
      assert.ok(QUEUE_STATUSES.includes(submitted.status), `submit status ${submitted.status}`);
      for (const key of ["response_url", "status_url", "cancel_url"]) {
        assert.equal(typeof submitted[key], "string", `submit response lacks ${key}`);
      }
      const requestId = submitted.request_id;

      const first = await fal.queue.status(APP, { requestId, logs: true });
      assert.ok(QUEUE_STATUSES.includes(first.status), `status ${JSON.stringify(first)}`);
      assert.equal(first.request_id, requestId);

      const deadline = Date.now() + 180_000;
      let status = first;
      for (;;) {
        if (status.status === "IN_QUEUE") {
          assert.equal(typeof status.queue_position, "number", "IN_QUEUE without queue_position");
        } else {
          assert.ok("logs" in status, `${status.status} status without a logs key`);
        }
        if (status.status === "COMPLETED") break;
        assert.ok(Date.now() < deadline, "not COMPLETED in time");
        await sleep(500);
        status = await fal.queue.status(APP, { requestId, logs: true });
        assert.ok(QUEUE_STATUSES.includes(status.status), `status ${JSON.stringify(status)}`);
      }
      assert.equal(status.error ?? null, null, `completed with error ${status.error}`);

      const result = await fal.queue.result(APP, { requestId });
      assertVideoResult(result);
      assert.equal(result.requestId, requestId);
    });

    it("queue.submit with method \"get\" sends the input as query parameters, typed by the schema", { timeout: 60_000 }, async () => {
      await assert.rejects(
        fal.queue.submit(APP, { input: { ...CHEAP_INPUT, num_frames: 80 }, method: "get" }),
        (error) => {
          assert.ok(error instanceof ValidationError, `expected ValidationError, got ${error?.name}: ${error}`);
          assert.ok(error.getFieldErrors("num_frames").length >= 1, JSON.stringify(error.fieldErrors));
          return true;
        },
      );
      const submitted = await fal.queue.submit(APP, { input: { ...CHEAP_INPUT, seed: 11 }, method: "get" });
      const get = calls.find((c) => c.method === "GET" && (targetOf(c) ?? c.url).startsWith(`https://queue.fal.run/${APP}?`));
      assert.ok(get, `no GET submit in ${JSON.stringify(calls.map((c) => [c.method, targetOf(c) ?? c.url]))}`);
      assert.ok(QUEUE_STATUSES.includes(submitted.status), JSON.stringify(submitted));
      // Not left running for the next tests (a 400 if it completed already).
      await fal.queue.cancel(APP, { requestId: submitted.request_id }).catch((error) => assert.equal(error.status, 400));
    });

    it("queue.cancel: a cancelled request completes and its result rejects with 499", { timeout: CANCEL_TIMEOUT_MS }, async () => {
      const slow = { ...CHEAP_INPUT, num_inference_steps: 20 };
      // A occupies the worker; B, submitted right behind it, is still queued when cancelled.
      const a = await fal.queue.submit(APP, { input: { ...slow, seed: 1 } });
      const b = await fal.queue.submit(APP, { input: { ...slow, seed: 2 } });
      let aCancelled = false;
      try {
        await fal.queue.cancel(APP, { requestId: b.request_id }); // must be 2xx
        // Cancel A too (normally while it runs) so the test does not wait for 20 steps.
        try {
          await fal.queue.cancel(APP, { requestId: a.request_id });
          aCancelled = true;
        } catch (error) {
          assert.ok(error instanceof ApiError, `cancel of A: ${error}`);
        }

        const bStatus = await waitForCompleted(b.request_id);
        assert.equal(bStatus.error_type, "client_cancelled", `status of B: ${JSON.stringify(bStatus)}`);
        assert.equal(typeof bStatus.error, "string");

        const assertCancelled = (error) => {
          assert.ok(error instanceof ApiError, `expected ApiError, got ${error?.name}: ${error}`);
          assert.ok(!(error instanceof ValidationError), "cancellation must not be a 422");
          assert.equal(error.status, 499);
          assert.equal(error.body?.error_type, "client_cancelled");
          // its message is the body's (499 has no reason phrase for the client to fall back on)
          assert.equal(error.message, "Request was cancelled");
          return true;
        };
        await assert.rejects(fal.queue.result(APP, { requestId: b.request_id }), assertCancelled);

        await waitForCompleted(a.request_id, { deadlineMs: 300_000 });
        if (aCancelled) {
          await assert.rejects(fal.queue.result(APP, { requestId: a.request_id }), assertCancelled);
        }
      } finally {
        await cleanUp(b.request_id);
        await cleanUp(a.request_id);
      }
    });

    // Automatic upload of Blobs found in the input. 1.10.1 exposes `fal.storage.transformInput`
    // (the very function `queue.submit`, `subscribe`, `run` and `stream` call on `input`), so the
    // first test calls it directly: no LoRA support is needed on the server. The second test
    // checks that `queue.submit` really applies it, from the body the recording fetch saw, and that
    // the server then judges the uploaded bytes (random, so not a LoRA) as a 422 on loras.0.path.
    it("storage.transformInput replaces a Blob in the input with an uploaded URL", { timeout: 60_000 }, async () => {
      const bytes = randomBytes(300);
      const input = {
        ...CHEAP_INPUT,
        loras: [{ path: new Blob([bytes], { type: "application/octet-stream" }), scale: 1.0 }],
      };
      const transformed = await fal.storage.transformInput(input);
      assert.equal(transformed.prompt, CHEAP_INPUT.prompt);
      assert.equal(transformed.seed, 7);
      assert.equal(transformed.loras.length, 1);
      assert.equal(transformed.loras[0].scale, 1.0);
      const url = transformed.loras[0].path;
      assert.equal(typeof url, "string", "the Blob was not replaced by a URL");
      assert.ok(/^https?:\/\//.test(url), `transformed path ${url}`);
      const { response, bytes: served } = await download(url);
      assert.equal(response.status, 200, `GET ${url}`);
      assert.ok(Buffer.from(bytes).equals(served), "served bytes differ from the uploaded bytes");
    });

    it("queue.submit to fal-ai/wan-22/lora uploads the Blob and submits its URL", { timeout: 120_000 }, async () => {
      calls.length = 0;
      const bytes = randomBytes(300);
      const submitted = await fal.queue.submit(LORA_APP, {
        input: {
          ...CHEAP_INPUT,
          loras: [{ path: new Blob([bytes], { type: "application/octet-stream" }), scale: 1.0 }],
        },
      });
      try {
        const initiate = calls.find((c) => targetOf(c) === UPLOAD_INITIATE_TARGET);
        assert.ok(initiate?.response?.file_url, "no upload initiate before the submit");
        const submit = calls.find(
          (c) => c.method === "POST" && targetOf(c) === `https://queue.fal.run/${LORA_APP}`,
        );
        assert.ok(submit, "no submit to https://queue.fal.run/fal-ai/wan-22/lora through the proxy");
        assert.ok(calls.indexOf(initiate) < calls.indexOf(submit), "the upload must precede the submit");
        const body = JSON.parse(submit.body);
        assert.equal(body.loras[0].path, initiate.response.file_url);
        assert.equal(body.loras[0].scale, 1.0);
        assert.equal(body.prompt, CHEAP_INPUT.prompt);
        const { bytes: served } = await download(initiate.response.file_url);
        assert.ok(Buffer.from(bytes).equals(served), "served bytes differ from the uploaded bytes");
        const status = await waitForCompleted(submitted.request_id, { app: LORA_APP });
        assert.equal(status.error_type, "invalid_lora");
        await assert.rejects(fal.queue.result(LORA_APP, { requestId: submitted.request_id }), (error) => {
          assert.ok(error instanceof ValidationError, `expected ValidationError, got ${error?.name}: ${error}`);
          assert.equal(error.status, 422);
          const [fieldError] = error.fieldErrors;
          assert.deepEqual(fieldError.loc, ["body", "loras", 0, "path"]);
          assert.match(fieldError.msg, /not a valid safetensors file/);
          return true;
        });
      } finally {
        await cleanUp(submitted.request_id, LORA_APP);
      }
    });
  },
);
