import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  BadRequestError,
  ConflictError,
  ConnectionError,
  FerrousClient,
  ModelNotFoundError,
  NotFoundError,
  UnauthorizedError,
  fetchTicket,
} from "../src/index.js";
import { SCRIPT, freePort, startServer } from "./server.mjs";

const GREEDY = { temperature: 0, repeat_penalty: 1 };
const T = { timeout: 30_000 };

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
/** @type {FerrousClient} */
let client;

before(async () => {
  server = await startServer();
  client = await FerrousClient.connect({ url: server.url, token: server.token });
}, { timeout: 90_000 });

after(async () => {
  await client?.close();
  await server?.stop();
});

test("a chat streams the script exactly, and done carries usage and timings", T, async () => {
  assert.equal(client.state, "open");
  assert.equal(client.ready.user, "alice");
  // The configured models, then the catalog the server can pull on first use.
  assert.deepEqual(client.ready.models.slice(0, 2), ["script", "slow"]);
  assert.ok(client.ready.models.includes("smollm2"));
  assert.match(client.ready.session, /^s-[0-9a-f]{12}$/);

  const gen = client.chat({
    model: "script",
    messages: [{ role: "user", content: "Say hi" }],
    options: { ...GREEDY, max_tokens: 13 },
  });
  const seqs = [];
  let text = "";
  for await (const delta of gen) {
    seqs.push(delta.seq);
    text += delta.text;
  }
  assert.equal(text, SCRIPT);
  assert.deepEqual(seqs, seqs.map((_, i) => i));
  assert.equal(gen.done?.finish_reason, "length");
  assert.equal(gen.done?.usage.completion_tokens, 13);
  assert.ok((gen.done?.usage.prompt_tokens ?? 0) > 0);
  for (const key of ["load_ms", "queue_ms", "ttft_ms", "total_ms", "decode_tok_s"]) {
    assert.equal(typeof gen.done?.timings[key], "number", key);
  }
  assert.ok((gen.done?.timings.total_ms ?? 0) > 0);
  assert.match(gen.conversation ?? "", /^c-[0-9a-f]{16}$/);
  assert.equal(gen.started?.conversation, gen.conversation);
  assert.equal(gen.bufferedBytes, 0);

  // The next turn continues the conversation the server keeps.
  const again = client.chat({
    model: "script",
    conversation: gen.conversation,
    messages: "Again",
    options: { ...GREEDY, max_tokens: 13 },
  });
  assert.equal(await again.text(), SCRIPT);
  assert.equal(again.conversation, gen.conversation);
  assert.ok((again.done?.usage.prompt_tokens ?? 0) > (gen.done?.usage.prompt_tokens ?? 0));
});

test("concurrent generations are demultiplexed by id", T, async () => {
  const gens = [
    client.generate({ model: "script", prompt: "a", options: { ...GREEDY, max_tokens: 26 } }),
    client.chat({ model: "script", messages: "b", options: { ...GREEDY, max_tokens: 13 } }),
    client.generate({ model: "slow", prompt: "c", options: { ...GREEDY, max_tokens: 39 }, id: "custom.id-1" }),
  ];
  assert.equal(new Set(gens.map((g) => g.id)).size, 3);
  assert.equal(gens[2].id, "custom.id-1");
  const texts = await Promise.all(gens.map((g) => g.text()));
  assert.deepEqual(texts, [SCRIPT.repeat(2), SCRIPT, SCRIPT.repeat(3)]);
  assert.equal(gens[0].conversation, null);
  assert.deepEqual(gens.map((g) => g.done?.finish_reason), ["length", "length", "length"]);
});

test("aborting the signal mid-stream ends the iteration after done (cancelled)", T, async () => {
  const controller = new AbortController();
  const gen = client.generate({
    model: "slow",
    prompt: "Once upon a time",
    options: { ...GREEDY, max_tokens: 3000 },
    signal: controller.signal,
  });
  let text = "";
  let n = 0;
  for await (const delta of gen) {
    text += delta.text;
    if (++n === 3) controller.abort();
  }
  assert.ok(n >= 3);
  assert.equal(gen.done?.finish_reason, "cancelled");
  assert.ok((gen.done?.usage.completion_tokens ?? 3000) < 3000);
  assert.ok(SCRIPT.repeat(300).startsWith(text));
  assert.equal(gen.error, null);
});

test("a signal aborted before the call still ends with done (cancelled)", T, async () => {
  const gen = client.generate({
    model: "slow",
    prompt: "x",
    options: { ...GREEDY, max_tokens: 3000 },
    signal: AbortSignal.abort(),
  });
  const text = await gen.text();
  assert.ok(SCRIPT.repeat(300).startsWith(text));
  assert.equal(gen.done?.finish_reason, "cancelled");
});

test("breaking out of for await cancels the generation", T, async () => {
  /** @type {any[]} */
  const sent = [];
  class RecordingWebSocket extends WebSocket {
    /** @param {string} data */
    send(data) {
      sent.push(JSON.parse(data));
      super.send(data);
    }
  }
  const own = await FerrousClient.connect({ url: server.url, token: server.token, WebSocket: RecordingWebSocket });
  try {
    const gen = own.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 3000 } });
    let n = 0;
    for await (const _ of gen) if (++n === 2) break;
    assert.deepEqual(sent.filter((m) => m.type === "cancel"), [{ type: "cancel", id: gen.id }]);
    assert.equal(gen.bufferedBytes, 0);
    const deadline = Date.now() + 10_000;
    while (!gen.finished && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    assert.equal(gen.done?.finish_reason, "cancelled");
    // Iterating again after leaving yields nothing.
    for await (const _ of gen) assert.fail("no more deltas");

    // cancel() keeps the iteration going until the server's done.
    const other = own.generate({ model: "slow", prompt: "y", options: { ...GREEDY, max_tokens: 3000 } });
    let m = 0;
    for await (const _ of other) if (++m === 2) other.cancel();
    assert.equal(other.done?.finish_reason, "cancelled");
    assert.equal(sent.filter((x) => x.type === "cancel").length, 2);
  } finally {
    await own.close();
  }
});

test("an unknown model rejects that generation with ModelNotFoundError carrying its id", T, async () => {
  const gen = client.chat({ model: "llama-9000", messages: "hi" });
  await assert.rejects(gen.text(), (err) => {
    assert.ok(err instanceof ModelNotFoundError);
    assert.equal(err.code, "model_not_found");
    assert.equal(err.id, gen.id);
    assert.equal(err.retryable, false);
    return true;
  });
  assert.equal(gen.error?.code, "model_not_found");
  // The session is unaffected.
  const ok = client.chat({ model: "script", messages: "hi", options: { ...GREEDY, max_tokens: 13 } });
  assert.equal(await ok.text(), SCRIPT);
});

test("requests the server cannot decode fail their own generation", T, async () => {
  // An unknown option field: the server answers bad_request without an id.
  const gen = client.generate({ model: "script", prompt: "x", options: /** @type {any} */ ({ temprature: 0 }) });
  await assert.rejects(gen.text(), (err) => err instanceof BadRequestError && err.id === gen.id && /temprature/.test(err.message));
  // Checked locally: ids, messages, duplicate running ids.
  await assert.rejects(client.generate({ model: "script", prompt: "x", id: "no spaces" }).text(), BadRequestError);
  await assert.rejects(client.chat({ model: "script", messages: [] }).text(), BadRequestError);
  const running = client.generate({ model: "slow", prompt: "x", id: "dup", options: { ...GREEDY, max_tokens: 3000 } });
  await assert.rejects(client.generate({ model: "script", prompt: "x", id: "dup" }).text(), ConflictError);
  running.cancel();
  await running.text();
  assert.equal(running.done?.finish_reason, "cancelled");
  const after = client.generate({ model: "script", prompt: "x", options: { ...GREEDY, max_tokens: 13 } });
  assert.equal(await after.text(), SCRIPT);
});

test("forget deletes a conversation and rejects an unknown one", T, async () => {
  const gen = client.chat({ model: "script", messages: "hi", options: { ...GREEDY, max_tokens: 13 } });
  await gen.text();
  await client.forget(/** @type {string} */ (gen.conversation));
  await assert.rejects(client.forget(/** @type {string} */ (gen.conversation)), NotFoundError);
});

test("a bad token is an UnauthorizedError, not retried", T, async () => {
  const started = Date.now();
  await assert.rejects(
    FerrousClient.connect({ url: server.url, token: "eyJhbGciOiJIUzI1NiJ9.e30.bad" }),
    (err) => err instanceof UnauthorizedError && err.retryable === false,
  );
  assert.ok(Date.now() - started < 5000);
  await assert.rejects(FerrousClient.connect({ url: server.url }), UnauthorizedError);
});

test("an unreachable server is a retryable ConnectionError", T, async () => {
  const port = await freePort();
  const states = [];
  await assert.rejects(
    FerrousClient.connect({
      url: `ws://127.0.0.1:${port}/v1/ws`,
      token: server.token,
      reconnect: { attempts: 2, minDelayMs: 10, maxDelayMs: 20 },
      onstatechange: (s) => states.push(s),
    }),
    (err) => err instanceof ConnectionError && err.retryable && /unreachable/.test(err.message),
  );
  assert.deepEqual(states, ["closed"]);
});

test("a ticket opens one session and is spent", T, async () => {
  const ticket = await fetchTicket(`${server.httpUrl}/v1/tickets`, { token: server.token });
  const url = `${server.url}?ticket=${encodeURIComponent(ticket)}`;
  const first = await FerrousClient.connect({ url, reconnect: false });
  assert.equal(first.ready.user, "alice");
  const gen = first.chat({ model: "script", messages: "hi", options: { ...GREEDY, max_tokens: 13 } });
  assert.equal(await gen.text(), SCRIPT);
  await first.close();
  assert.equal(first.state, "closed");
  await assert.rejects(FerrousClient.connect({ url, reconnect: false }), UnauthorizedError);

  // ticketUrl: the client fetches a fresh ticket for every connection.
  const viaTicket = await FerrousClient.connect({ url: server.url, token: server.token, ticketUrl: "/v1/tickets" });
  assert.equal(viaTicket.ready.user, "alice");
  await viaTicket.close();

  // A refused ticket request is read from its JSON body.
  await assert.rejects(
    FerrousClient.connect({ url: server.url, token: "bad", ticketUrl: `${server.httpUrl}/v1/tickets` }),
    (err) => err instanceof UnauthorizedError && err.status === 401 && err.message.length > 0,
  );
});

test("after close, new generations fail and running ones reject", T, async () => {
  const other = await FerrousClient.connect({ url: server.url, token: server.token });
  const running = other.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 3000 } });
  const it = running[Symbol.asyncIterator]();
  await it.next();
  await other.close();
  await assert.rejects(
    (async () => {
      for (;;) if ((await it.next()).done) break;
    })(),
    (err) => err instanceof ConnectionError && err.retryable === false,
  );
  await assert.rejects(other.chat({ model: "script", messages: "hi" }).text(), ConnectionError);
});
