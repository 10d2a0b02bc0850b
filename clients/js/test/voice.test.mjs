import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { FerrousClient } from "../src/index.js";
import { startServer } from "./server.mjs";

const T = { timeout: 120_000 };
const RATE = 24000;

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;

before(async () => {
  server = await startServer({ slow: false, voice: true });
}, { timeout: 600_000 });

after(async () => {
  await server?.stop();
});

/** @param {number} seconds */
const silence = (seconds) => new Uint8Array(2 * Math.round(RATE * seconds));

/** @param {Uint8Array[]} parts */
function join(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

test("speak, then listen to it and get the words back, with flow control on the audio", T, async () => {
  const client = await FerrousClient.connect({ url: server.url, token: server.token, credits: 32 * 1024 });
  try {
    const speech = await client.speak({ model: "voice", text: "The quick brown fox jumps over the lazy dog." }).audio();
    assert.ok(speech.length > 64 * 1024, "more audio than the window: credit was granted as it was read");

    const stream = client.listen({ model: "whisper", rate: RATE });
    const audio = join([silence(0.3), speech, silence(1.0)]);
    for (let i = 0; i < audio.length; i += 9600) stream.send(audio.subarray(i, i + 9600));
    stream.end();
    const kinds = [];
    for await (const msg of stream) kinds.push(msg.type === "speech" ? `speech:${msg.event}` : msg.type);
    assert.deepEqual(kinds.slice(0, 2), ["started", "speech:start"]);
    assert.deepEqual(kinds.slice(-3), ["speech:end", "transcript", "done"]);
    assert.equal(stream.transcripts.length, 1);
    const words = stream.transcripts[0].toLowerCase();
    for (const w of ["fox", "lazy", "dog"]) assert.ok(words.includes(w), stream.transcripts[0]);
    assert.equal(stream.done.finish_reason, "stop");
  } finally {
    await client.close();
  }
});

test("a spoken question is answered in text and in speech", T, async () => {
  const client = await FerrousClient.connect({ url: server.url, token: server.token });
  try {
    const question = await client.speak({ model: "voice", text: "Green apples sit on the kitchen table." }).audio();
    const stream = client.listen({
      model: "whisper",
      rate: RATE,
      reply: { model: "script", voice: "voice", options: { max_tokens: 26 } },
    });
    stream.send(join([silence(0.3), question, silence(1.0)]));
    const order = [];
    let text = "";
    let audioBytes = 0;
    for await (const msg of stream) {
      order.push(`${msg.type}:${msg.id}`);
      if (msg.type === "delta") text += msg.text;
      if (msg.type === "audio") audioBytes += msg.data.length;
      if (msg.type === "done" && msg.id === `${stream.id}.1`) stream.end();
    }
    const answer = `${stream.id}.1`;
    assert.ok(order.indexOf("transcript:" + stream.id) < order.indexOf(`started:${answer}`));
    assert.ok(order.indexOf(`started:${answer}`) < order.indexOf(`audio:${answer}`));
    assert.ok(text.length > 0 && audioBytes > 0);
    assert.equal(stream.answering, null);
    assert.equal(order.at(-1), `done:${stream.id}`);
  } finally {
    await client.close();
  }
});
