// Session resume after a dropped connection, against a real server: the
// connection goes through a TCP proxy (./proxy.mjs) that cuts it the way a
// network does, at a chosen byte, without a close frame either way.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { ConnectionError, FerrousClient, ResumeExpiredError, utf8Length } from "../src/index.js";
import { startProxy } from "./proxy.mjs";
import { SCRIPT, startServer, recording } from "./server.mjs";

const GREEDY = { temperature: 0, repeat_penalty: 1, seed: 7 };
const TRIALS = Number(process.env.RESUME_TRIALS || 12);

/** A small seeded generator (mulberry32), so that a failing trial can be run again. */
function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** @param {() => boolean} cond @param {number} ms @param {string} [what] */
async function until(cond, ms, what = "a condition") {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/**
 * Read a generation to its end, with the seq of every delta.
 * @param {import("../src/index.js").Generation} gen @param {number} [pauseMs] a slow reader
 */
async function collect(gen, pauseMs = 0) {
  let text = "";
  /** @type {number[]} */
  const seqs = [];
  for await (const delta of gen) {
    text += delta.text;
    seqs.push(delta.seq);
    if (pauseMs) await sleep(pauseMs);
  }
  return { text, seqs };
}

/** @param {number[]} seqs */
function assertSeqs(seqs) {
  assert.deepEqual(seqs, seqs.map((_, i) => i), "every delta once, in order");
}

describe("resume with the server's default window", () => {
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;

  before(async () => {
    server = await startServer();
  }, { timeout: 90_000 });

  after(async () => {
    await server?.stop();
  });

  test(`a connection cut at a random byte resumes: the same text, every delta once (${TRIALS} trials)`, { timeout: 240_000 }, async () => {
    const seed = Number(process.env.RESUME_SEED || Date.now() % 1_000_000);
    const rnd = random(seed);
    const where = `(RESUME_SEED=${seed})`;

    // Uninterrupted runs, for reference.
    const direct = await FerrousClient.connect({ url: server.url, token: server.token });
    /** @type {Map<string, { text: string, bytes: number, tokens: number }>} */
    const reference = new Map();
    const configs = [
      { model: "slow", max_tokens: 300 },
      { model: "slow", max_tokens: 120 },
      { model: "script", max_tokens: 200 },
    ];
    for (const c of configs) {
      const gen = direct.generate({ model: c.model, prompt: "Once", options: { ...GREEDY, max_tokens: c.max_tokens } });
      let bytes = 600; // queued, started, done
      let text = "";
      for await (const d of gen) {
        text += d.text;
        bytes += utf8Length(JSON.stringify(d)) + 14; // frame header and the "n" field
      }
      reference.set(`${c.model}/${c.max_tokens}`, { text, bytes, tokens: gen.done?.usage.completion_tokens ?? 0 });
    }
    await direct.close();

    // Two clients, each through its own proxy: one without flow control and
    // without reconnection (a resume is tried all the same), one with a small
    // credit window and the default reconnect policy.
    const setups = await Promise.all(
      [{ reconnect: false }, { credits: 64 }].map(async (options) => {
        const proxy = await startProxy(server.port);
        const { sent, RecordingWebSocket } = recording();
        /** @type {{ state: string, resumed: boolean }[]} */
        const states = [];
        const client = await FerrousClient.connect({
          url: proxy.url,
          token: server.token,
          WebSocket: RecordingWebSocket,
          ...options,
        });
        client.addEventListener("statechange", (ev) => states.push({ state: ev.state, resumed: ev.resumed }));
        return { proxy, client, sent, states, session: client.ready.session, cuts: 0 };
      }),
    );
    try {
      for (const s of setups) {
        assert.ok(s.client.ready.resume_token, "the server offers resume");
        assert.ok((s.client.ready.resume_window ?? 0) > 0);
      }
      for (let trial = 0; trial < TRIALS; trial++) {
        const s = setups[Math.floor(rnd() * setups.length)];
        const { client, proxy } = s;
        await until(() => client.state === "open" && proxy.open === 1, 10_000, "an open connection");
        const config = configs[Math.floor(rnd() * configs.length)];
        const ref = /** @type {{ text: string, bytes: number, tokens: number }} */ (reference.get(`${config.model}/${config.max_tokens}`));
        const count = rnd() < 0.3 ? 2 : 1;
        // Mostly on the way to the client, sometimes in the requests themselves
        // (then the server may never have read one, and the client sends it again).
        const up = rnd() < 0.25;
        const at = up ? 1 + Math.floor(rnd() * 140 * count) : 1 + Math.floor(rnd() * ref.bytes * count);
        const before = proxy.connections;
        proxy.cut(up ? "up" : "down", at);
        const gens = [];
        for (let i = 0; i < count; i++) {
          const options = { ...GREEDY, max_tokens: config.max_tokens };
          gens.push(
            i % 2 === 0
              ? client.generate({ model: config.model, prompt: "Once", options })
              : client.chat({ model: config.model, messages: [{ role: "user", content: "Once" }], options }),
          );
        }
        const results = await Promise.all(gens.map((g) => collect(g)));
        proxy.disarm();
        const what = `trial ${trial}: ${config.model}/${config.max_tokens} x${count}, cut ${up ? "up" : "down"} at ${at} ${where}`;
        for (const [i, r] of results.entries()) {
          if (gens[i].kind === "generate") assert.equal(r.text, ref.text, what);
          else assert.ok(r.text.length > 0 && SCRIPT.repeat(400).startsWith(r.text), what);
          assertSeqs(r.seqs);
          assert.equal(gens[i].error, null, what);
          assert.equal(gens[i].done?.finish_reason, "length", what);
          if (gens[i].kind === "generate") assert.equal(gens[i].done?.usage.completion_tokens, ref.tokens, what);
        }
        if (proxy.connections > before) s.cuts += 1;
        assert.equal(client.ready.session, s.session, `the session goes on: ${what}`);
      }
      let resumes = 0;
      for (const s of setups) {
        const { sent, states, client } = s;
        await until(() => client.state === "open", 10_000, "the last resume");
        const hellos = sent.filter((m) => m.type === "hello");
        const resuming = hellos.slice(1);
        assert.equal(resuming.length, s.cuts, "one resume per cut");
        for (const h of resuming) {
          assert.equal(h.resume, client.ready.resume_token);
          assert.equal(typeof h.last, "number");
        }
        if (s.cuts > 0) {
          assert.equal(client.ready.resumed, true);
          assert.deepEqual(
            states.filter((x) => x.state === "open").map((x) => x.resumed),
            resuming.map(() => true),
          );
          assert.deepEqual(new Set(states.map((x) => x.state)), new Set(["reconnecting", "open"]));
        }
        // Acks let the server free what it keeps.
        const acks = sent.filter((m) => m.type === "ack").map((m) => m.n);
        assert.ok(acks.length > 0);
        assert.deepEqual(acks, [...acks].sort((a, b) => a - b), "acks never go back");
        assert.equal(client.bufferedBytes, 0);
        resumes += resuming.length;
      }
      assert.ok(resumes >= TRIALS / 3, `only ${resumes} of ${TRIALS} trials cut a connection ${where}`);
    } finally {
      for (const s of setups) {
        await s.client.close();
        await s.proxy.close();
      }
    }
  });

  test("a request cut before the server read it is sent again after the resume, once", { timeout: 60_000 }, async () => {
    const proxy = await startProxy(server.port);
    const { sent, RecordingWebSocket } = recording();
    const client = await FerrousClient.connect({ url: proxy.url, token: server.token, WebSocket: RecordingWebSocket });
    try {
      const session = client.ready.session;
      proxy.cut("up", 10); // the request's first 10 bytes only
      const gen = client.generate({ model: "script", prompt: "x", options: { ...GREEDY, max_tokens: 26 } });
      const { text, seqs } = await collect(gen);
      assert.equal(text, SCRIPT.repeat(2));
      assertSeqs(seqs);
      assert.equal(client.ready.session, session);
      assert.equal(client.ready.resumed, true);
      assert.deepEqual(client.ready.generations, []);
      assert.equal(sent.filter((m) => m.type === "generate" && m.id === gen.id).length, 2);
    } finally {
      await client.close();
      await proxy.close();
    }
  });

  test("flow control goes on after resumes: a slow reader gets the whole text, memory stays bounded", { timeout: 60_000 }, async () => {
    const WINDOW = 32;
    const proxy = await startProxy(server.port);
    const client = await FerrousClient.connect({ url: proxy.url, token: server.token, credits: WINDOW });
    try {
      const gen = client.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 13 * 12 } });
      let held = 0;
      const sampler = setInterval(() => (held = Math.max(held, gen.bufferedBytes)), 1);
      /** @type {number[]} */
      const seqs = [];
      let text = "";
      let cuts = 0;
      try {
        for await (const d of gen) {
          text += d.text;
          seqs.push(d.seq);
          held = Math.max(held, gen.bufferedBytes + utf8Length(d.text));
          if (seqs.length % 25 === 10 && cuts < 3) {
            cuts += 1;
            proxy.drop();
          }
          await sleep(3);
        }
      } finally {
        clearInterval(sampler);
      }
      assert.equal(cuts, 3);
      assert.equal(text, SCRIPT.repeat(12));
      assertSeqs(seqs);
      assert.equal(client.ready.resumed, true);
      // The window, plus what the server sent again after a cut (at most a
      // window and a delta of the old one), plus one delta.
      assert.ok(held <= 2 * WINDOW + 8, `held ${held} bytes with a window of ${WINDOW}`);
      assert.equal(client.bufferedBytes, 0);
      // And the window is whole afterwards.
      const next = client.generate({ model: "slow", prompt: "y", options: { ...GREEDY, max_tokens: 13 * 3 } });
      assert.equal(await next.text(), SCRIPT.repeat(3));
    } finally {
      await client.close();
      await proxy.close();
    }
  });

  test("a connection the server closes because another one resumed the session is not resumed", { timeout: 60_000 }, async () => {
    const client = await FerrousClient.connect({ url: server.url, token: server.token });
    try {
      const session = client.ready.session;
      const gen = client.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 3000 } });
      const it = gen[Symbol.asyncIterator]();
      await it.next();
      // Someone else with the same credential presents the resume token.
      const other = new WebSocket(server.url, ["ferrous.v1.json", `ferrous.token.${server.token}`]);
      const ready = await new Promise((resolve, reject) => {
        other.onopen = () =>
          other.send(JSON.stringify({ type: "hello", protocol: 1, resume: client.ready.resume_token, last: 0 }));
        other.onmessage = (ev) => {
          const msg = JSON.parse(String(ev.data));
          if (msg.type === "ready") resolve(msg);
        };
        other.onerror = reject;
      });
      assert.equal(/** @type {any} */ (ready).resumed, true);
      await assert.rejects(
        (async () => {
          for (;;) if ((await it.next()).done) break;
        })(),
        (err) => err instanceof ConnectionError && !(err instanceof ResumeExpiredError) && /4000/.test(err.message),
      );
      // The client opens a new session by its reconnect policy instead.
      await until(() => client.state === "open", 10_000, "a new session");
      assert.notEqual(client.ready.session, session);
      assert.equal(await client.generate({ model: "script", prompt: "x", options: { ...GREEDY, max_tokens: 13 } }).text(), SCRIPT);
      other.close(1000);
    } finally {
      await client.close();
    }
  });

  test("closing the client while it resumes fails what was in flight, once", { timeout: 60_000 }, async () => {
    const proxy = await startProxy(server.port);
    const client = await FerrousClient.connect({ url: proxy.url, token: server.token });
    try {
      const gen = client.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 3000 } });
      const it = gen[Symbol.asyncIterator]();
      await it.next();
      proxy.mode = "hold";
      proxy.drop();
      await until(() => client.state === "reconnecting", 5000, "reconnecting");
      await client.close();
      assert.equal(client.state, "closed");
      await assert.rejects(
        (async () => {
          for (;;) if ((await it.next()).done) break;
        })(),
        (err) => err instanceof ConnectionError && err.retryable === false,
      );
    } finally {
      await client.close();
      await proxy.close();
    }
  });

  test("a server restarted within the window does not know the session: ResumeExpiredError", { timeout: 90_000 }, async () => {
    const client = await FerrousClient.connect({ url: server.url, token: server.token });
    try {
      const gen = client.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 3000 } });
      const it = gen[Symbol.asyncIterator]();
      await it.next();
      await server.restart();
      await assert.rejects(
        (async () => {
          for (;;) if ((await it.next()).done) break;
        })(),
        (err) => err instanceof ResumeExpiredError && err.id === gen.id,
      );
      await until(() => client.state === "open", 10_000, "a new session");
      assert.equal(await client.generate({ model: "script", prompt: "x", options: { ...GREEDY, max_tokens: 13 } }).text(), SCRIPT);
    } finally {
      await client.close();
    }
  });
});

describe("resume with a short window", () => {
  const WINDOW_S = 1.5;
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;

  before(async () => {
    server = await startServer({ env: { FERROUS_LIMITS__RESUME_WINDOW: String(WINDOW_S) } });
  }, { timeout: 90_000 });

  after(async () => {
    await server?.stop();
  });

  test("a resume that reaches the server after its window: ResumeExpiredError, then a new session", { timeout: 60_000 }, async () => {
    const proxy = await startProxy(server.port);
    const { sent, RecordingWebSocket } = recording();
    /** @type {{ state: string, resumed: boolean }[]} */
    const states = [];
    const client = await FerrousClient.connect({ url: proxy.url, token: server.token, WebSocket: RecordingWebSocket });
    client.addEventListener("statechange", (ev) => states.push({ state: ev.state, resumed: ev.resumed }));
    try {
      assert.equal(client.ready.resume_window, WINDOW_S);
      const session = client.ready.session;
      const gen = client.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 3000 } });
      const it = gen[Symbol.asyncIterator]();
      let text = "";
      for (let i = 0; i < 3; i++) text += (await it.next()).value?.text ?? "";
      // The resume attempt waits in the proxy until the server's window passed.
      proxy.mode = "hold";
      proxy.drop();
      await sleep(WINDOW_S * 1000 + 1000);
      proxy.mode = "open";
      await assert.rejects(
        (async () => {
          for (;;) {
            const r = await it.next();
            if (r.done) break;
            text += r.value.text;
          }
        })(),
        (err) => {
          assert.ok(err instanceof ResumeExpiredError, String(err));
          assert.equal(err.code, "resume_expired");
          assert.equal(err.id, gen.id);
          assert.equal(err.retryable, true);
          return true;
        },
      );
      assert.ok(SCRIPT.repeat(300).startsWith(text));
      assert.equal(gen.done, null);
      assert.equal(client.state, "open");
      assert.notEqual(client.ready.session, session);
      assert.ok(!client.ready.resumed);
      assert.deepEqual(states, [{ state: "reconnecting", resumed: false }, { state: "open", resumed: false }]);
      const hellos = sent.filter((m) => m.type === "hello");
      assert.equal(hellos.length, 2);
      assert.equal(typeof hellos[1].resume, "string");
      assert.ok(hellos[1].last >= 3);
      // The client works on the new session, and offers a new resume.
      assert.notEqual(client.ready.resume_token, hellos[1].resume);
      const next = client.chat({ model: "script", messages: "hi", options: { ...GREEDY, max_tokens: 13 } });
      assert.equal(await next.text(), SCRIPT);
    } finally {
      await client.close();
      await proxy.close();
    }
  });

  test("a server unreachable for the whole window: ConnectionError, then a new session by the reconnect policy", { timeout: 60_000 }, async () => {
    const proxy = await startProxy(server.port);
    const client = await FerrousClient.connect({
      url: proxy.url,
      token: server.token,
      reconnect: { attempts: 50, minDelayMs: 100, maxDelayMs: 300 },
    });
    try {
      const session = client.ready.session;
      const gen = client.generate({ model: "slow", prompt: "x", options: { ...GREEDY, max_tokens: 3000 } });
      const it = gen[Symbol.asyncIterator]();
      await it.next();
      proxy.mode = "refuse";
      proxy.drop();
      const started = Date.now();
      await assert.rejects(
        (async () => {
          for (;;) if ((await it.next()).done) break;
        })(),
        (err) => err instanceof ConnectionError && err.retryable && /resumed within/.test(err.message),
      );
      assert.ok(Date.now() - started >= WINDOW_S * 1000 - 50);
      assert.equal(client.state, "reconnecting");
      proxy.mode = "open";
      await until(() => client.state === "open", 10_000, "a new session");
      assert.notEqual(client.ready.session, session);
      assert.equal(await client.generate({ model: "script", prompt: "x", options: { ...GREEDY, max_tokens: 13 } }).text(), SCRIPT);
    } finally {
      await client.close();
      await proxy.close();
    }
  });

});
