import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { FerrousClient, utf8Length } from "../src/index.js";
import { SCRIPT, startServer, recording } from "./server.mjs";

const GREEDY = { temperature: 0, repeat_penalty: 1 };
const T = { timeout: 30_000 };
const WINDOW = 16;

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;

before(async () => {
  server = await startServer({ slow: false });
}, { timeout: 90_000 });

after(async () => {
  await server?.stop();
});

test("with credits, a slow consumer never holds more than the window plus one delta", T, async () => {
  const { sent, RecordingWebSocket } = recording();
  const client = await FerrousClient.connect({
    url: server.url,
    token: server.token,
    credits: WINDOW,
    WebSocket: RecordingWebSocket,
  });
  try {
    assert.equal(client.ready.flow_control, true);
    assert.equal(sent[0].type, "hello");
    assert.equal(sent[0].credits, WINDOW);

    const repeats = 8;
    const gen = client.chat({
      model: "script",
      messages: "hi",
      options: { ...GREEDY, max_tokens: 13 * repeats },
    });
    let text = "";
    let maxHeld = 0;
    let maxDelta = 0;
    const sampler = setInterval(() => {
      maxHeld = Math.max(maxHeld, gen.bufferedBytes);
    }, 1);
    try {
      for await (const delta of gen) {
        const n = utf8Length(delta.text);
        // Until this delta was handed over, the client held it too.
        maxHeld = Math.max(maxHeld, gen.bufferedBytes + n);
        maxDelta = Math.max(maxDelta, n);
        text += delta.text;
        await sleep(25);
        maxHeld = Math.max(maxHeld, gen.bufferedBytes);
      }
    } finally {
      clearInterval(sampler);
    }
    assert.equal(text, SCRIPT.repeat(repeats));
    assert.equal(gen.done?.finish_reason, "length");
    assert.equal(maxDelta, 4); // 🙂
    assert.ok(maxHeld <= WINDOW + maxDelta, `held ${maxHeld} bytes, window ${WINDOW}`);
    assert.ok(maxHeld >= WINDOW / 2, `the consumer was slow, the buffer should fill (held ${maxHeld})`);

    const total = utf8Length(text);
    const granted = sent.filter((m) => m.type === "credit").reduce((a, m) => a + m.bytes, 0);
    assert.ok(granted <= total, `granted ${granted} of ${total} bytes read`);
    assert.ok(granted >= total - WINDOW - maxDelta, `granted ${granted}: too little for ${total} bytes`);
    assert.equal(gen.bufferedBytes, 0);
    assert.equal(client.bufferedBytes, 0);
  } finally {
    await client.close();
  }
});

test("two generations read one after the other do not deadlock on the shared window", T, async () => {
  const client = await FerrousClient.connect({ url: server.url, token: server.token, credits: WINDOW });
  try {
    const a = client.generate({ model: "script", prompt: "a", options: { ...GREEDY, max_tokens: 13 * 4 } });
    const b = client.generate({ model: "script", prompt: "b", options: { ...GREEDY, max_tokens: 13 * 4 } });
    assert.equal(await b.text(), SCRIPT.repeat(4));
    assert.equal(await a.text(), SCRIPT.repeat(4));
    assert.equal(client.bufferedBytes, 0);
    // The window is whole again afterwards: one more generation streams fine.
    const c = client.chat({ model: "script", messages: "c", options: { ...GREEDY, max_tokens: 13 * 3 } });
    assert.equal(await c.text(), SCRIPT.repeat(3));
  } finally {
    await client.close();
  }
});

test("leaving a generation early under flow control returns its credit", T, async () => {
  const { sent, RecordingWebSocket } = recording();
  const client = await FerrousClient.connect({
    url: server.url,
    token: server.token,
    credits: WINDOW,
    WebSocket: RecordingWebSocket,
  });
  try {
    const gen = client.generate({ model: "script", prompt: "a", options: { ...GREEDY, max_tokens: 400 } });
    let n = 0;
    for await (const _ of gen) {
      await sleep(10);
      if (++n === 3) break;
    }
    assert.equal(sent.filter((m) => m.type === "cancel" && m.id === gen.id).length, 1);
    // What still arrives for it is dropped and credited at once, so the next one streams.
    const next = client.chat({ model: "script", messages: "b", options: { ...GREEDY, max_tokens: 13 * 2 } });
    assert.equal(await next.text(), SCRIPT.repeat(2));
    assert.equal(gen.bufferedBytes, 0);
    assert.equal(client.bufferedBytes, 0);
  } finally {
    await client.close();
  }
});
