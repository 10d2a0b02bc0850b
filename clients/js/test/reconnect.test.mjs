import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { ConnectionError, FerrousClient } from "../src/index.js";
import { SCRIPT, startServer } from "./server.mjs";

const GREEDY = { temperature: 0, repeat_penalty: 1 };

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;

before(async () => {
  server = await startServer();
}, { timeout: 90_000 });

after(async () => {
  await server?.stop();
});

/** @param {() => boolean} cond @param {number} ms */
async function until(cond, ms) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error("timed out waiting");
    await sleep(10);
  }
}

// Without resume (see resume.test.mjs for it): a new session after every drop.
test("after the server restarts, the client reconnects; in-flight generations fail once and are never resent", { timeout: 90_000 }, async () => {
  /** @type {any[]} */
  const sent = [];
  class RecordingWebSocket extends WebSocket {
    /** @param {string} data */
    send(data) {
      sent.push(JSON.parse(data));
      super.send(data);
    }
  }
  /** @type {string[]} */
  const states = [];
  const client = await FerrousClient.connect({
    url: server.url,
    token: server.token,
    WebSocket: RecordingWebSocket,
    reconnect: { attempts: 60, minDelayMs: 100, maxDelayMs: 500 },
    resume: false,
    onstatechange: (state) => states.push(state),
  });
  try {
    const firstSession = client.ready.session;
    const inflight = client.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 3000 } });
    const it = inflight[Symbol.asyncIterator]();
    let text = "";
    for (let i = 0; i < 3; i++) {
      const r = await it.next();
      assert.equal(r.done, false);
      text += r.value?.text ?? "";
    }

    await server.kill();

    // The in-flight generation yields what had arrived, then rejects.
    await assert.rejects(
      (async () => {
        for (;;) {
          const r = await it.next();
          if (r.done) break;
          text += r.value.text;
        }
      })(),
      (err) => {
        assert.ok(err instanceof ConnectionError, String(err));
        assert.equal(err.retryable, true);
        assert.equal(err.id, inflight.id);
        return true;
      },
    );
    assert.ok(SCRIPT.repeat(300).startsWith(text));
    assert.equal(inflight.done, null);
    await until(() => client.state === "reconnecting", 5000);

    // A call made while reconnecting waits for the new session.
    const queued = client.chat({ model: "script", messages: "hi", options: { ...GREEDY, max_tokens: 13 } });
    await sleep(300);
    assert.equal(client.state, "reconnecting");

    await server.start();
    assert.equal(await queued.text(), SCRIPT);
    assert.equal(client.state, "open");
    assert.notEqual(client.ready.session, firstSession);

    const after = client.chat({ model: "script", messages: "again", options: { ...GREEDY, max_tokens: 13 } });
    assert.equal(await after.text(), SCRIPT);
    assert.equal(after.conversation === queued.conversation, false);

    const requests = sent.filter((m) => m.type === "generate" || m.type === "chat");
    assert.equal(requests.filter((m) => m.id === inflight.id).length, 1, "the in-flight request was sent once");
    assert.equal(new Set(requests.map((m) => m.id)).size, requests.length);
    assert.equal(sent.filter((m) => m.type === "hello").length, 2);
    assert.deepEqual(states, ["open", "reconnecting", "open"]);
  } finally {
    await client.close();
  }
  assert.equal(client.state, "closed");
});

test("with reconnect off, a dropped connection closes the client", { timeout: 90_000 }, async () => {
  const states = [];
  const client = await FerrousClient.connect({
    url: server.url,
    token: server.token,
    reconnect: false,
    resume: false,
    onstatechange: (state) => states.push(state),
  });
  const gen = client.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 3000 } });
  const it = gen[Symbol.asyncIterator]();
  await it.next();
  await server.restart();
  await assert.rejects(
    (async () => {
      for (;;) if ((await it.next()).done) break;
    })(),
    (err) => err instanceof ConnectionError && err.retryable,
  );
  await until(() => client.state === "closed", 5000);
  assert.deepEqual(states, ["open", "closed"]);
  await assert.rejects(client.chat({ model: "script", messages: "hi" }).text(), ConnectionError);
  await client.close();
});

test("heartbeats detect a server that stops answering, and the client resumes the session", { timeout: 60_000 }, async () => {
  /** @type {string[]} */
  const states = [];
  const client = await FerrousClient.connect({
    url: server.url,
    token: server.token,
    heartbeatMs: 200,
    reconnect: { attempts: 100, minDelayMs: 100, maxDelayMs: 300 },
    onstatechange: (state) => states.push(state),
  });
  try {
    // Idle but answered: the connection stays open.
    await sleep(800);
    assert.equal(client.state, "open");
    const session = client.ready.session;
    const gen = client.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 500 } });
    const it = gen[Symbol.asyncIterator]();
    let text = (await it.next()).value?.text ?? "";

    server.pause();
    try {
      await until(() => client.state === "reconnecting", 5000);
    } finally {
      server.resume();
    }
    await until(() => client.state === "open", 30_000);
    // The silent connection was left to the server (a close frame would have
    // ended the session there), and the session goes on where it was.
    assert.equal(client.ready.session, session);
    assert.equal(client.ready.resumed, true);
    for (let r = await it.next(); !r.done; r = await it.next()) text += r.value.text;
    assert.equal(gen.done?.usage.completion_tokens, 500);
    const uninterrupted = client.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 500 } });
    assert.equal(text, await uninterrupted.text());
    const next = client.chat({ model: "script", messages: "hi", options: { ...GREEDY, max_tokens: 13 } });
    assert.equal(await next.text(), SCRIPT);
    assert.deepEqual(states, ["open", "reconnecting", "open"]);
  } finally {
    await client.close();
  }
});
