// A real FerrousForge server for the tests: a temporary FERROUS_HOME, two tiny
// scripted models, a free port, and a token for user "alice".
//
//   const server = await startServer();
//   ... server.url, server.httpUrl, server.token ...
//   await server.kill();     // abrupt: SIGKILL to the server's process group
//   await server.restart();  // same port, same home (the token stays valid)
//   server.pause();          // SIGSTOP: connections stay open, nothing answers
//   server.resume();         // SIGCONT
//   await server.stop();     // SIGTERM, then SIGKILL if it does not exit
//
// startServer({ env: { FERROUS_LIMITS__RESUME_WINDOW: "2" } }) sets configuration
// through FERROUS_* variables (see gateway/config.py) for the server's commands.
//
// The Python interpreter is $FERROUS_PYTHON or `python` (with the project's
// virtualenv on PATH); it runs from the repository root so `engine` and
// `gateway` import.

import { execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.FERROUS_PYTHON || "python";
export const SCRIPT = "Hi ö你🙂!";

/** The environment for python: inherited FERROUS_* variables left out (the server's config rejects unknown ones). */
function childEnv(extra) {
  /** @type {Record<string, string>} */
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v !== undefined && !k.startsWith("FERROUS_")) env[k] = v;
  }
  return { ...env, ...extra };
}

// Servers and temporary homes still around when this process ends are removed.
const live = new Set();
const homes = new Set();
function cleanUp() {
  for (const child of live) killGroup(child, "SIGKILL");
  for (const home of homes) rmSync(home, { recursive: true, force: true });
}
process.on("exit", cleanUp);
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.once(signal, () => {
    cleanUp();
    process.kill(process.pid, signal);
  });
}

function killGroup(child, signal) {
  try {
    process.kill(-child.pid, signal);
  } catch {
    try {
      child.kill(signal);
    } catch {
      // already gone
    }
  }
}

/** Run python with args from the repository root; resolves to stdout. */
export function python(args, { env = {}, timeoutMs = 60_000 } = {}) {
  return new Promise((resolvePromise, reject) => {
    execFile(
      PYTHON,
      args,
      { cwd: REPO_ROOT, env: childEnv(env), timeout: timeoutMs, maxBuffer: 1 << 20 },
      (err, stdout, stderr) => {
        if (err) reject(new Error(`${PYTHON} ${args.join(" ")} failed: ${err.message}\n${stderr}`));
        else resolvePromise(stdout);
      },
    );
  });
}

export function freePort() {
  return new Promise((resolvePromise, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = /** @type {import("node:net").AddressInfo} */ (srv.address());
      srv.close(() => resolvePromise(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function healthy(httpUrl) {
  try {
    const res = await fetch(`${httpUrl}/healthz`, { signal: AbortSignal.timeout(1000) });
    return res.ok;
  } catch {
    return false;
  }
}

/**
 * Write the models, start the server, wait for /healthz, issue a token.
 * @param {{ slow?: boolean, voice?: boolean, vision?: boolean, logLevel?: string, env?: Record<string, string> }} [options]
 *   vision: also "colours" (a tiny image classifier) and "paint" (a tiny
 *   text-to-image model), written by engine.tinyvision, and "seer" (a tiny
 *   vision language model, engine.tinyprojector);
 *   slow: also serve the slower model "slow"; voice: also "whisper" (speech
 *   recognition), "voice" (speech synthesis) and voice-activity detection, from
 *   their wheels; env: FERROUS_* configuration
 */
export async function startServer({ slow = true, voice = false, vision = false, logLevel = "warning", env: config = {} } = {}) {
  const home = mkdtempSync(join(tmpdir(), "ferrous-js-test-"));
  homes.add(home);
  const scriptPath = join(home, "script.gguf");
  const slowPath = join(home, "slow.gguf");
  const models = [python(["-m", "engine.tinymodels", scriptPath, "--script", SCRIPT])];
  if (slow) {
    models.push(
      python([
        "-c",
        "import sys\n" +
          "from engine.tinymodels import write_tiny_llama, TinyLlamaSpec\n" +
          "write_tiny_llama(sys.argv[1], script=sys.argv[2], " +
          "spec=TinyLlamaSpec(n_embd=256, n_layer=8, n_head=4, n_ff=1024, n_ctx=4096))",
        slowPath,
        SCRIPT,
      ]),
    );
  }
  await Promise.all(models);
  /** @type {string[]} */
  const voiceModels = [];
  if (voice) {
    const [whisper, speech, vad] = await Promise.all(
      ["engine.whispertiny", "engine.hibarivoices", "engine.silerovad"].map(async (m) =>
        (await python(["-m", m], { timeoutMs: 600_000 })).trim(),
      ),
    );
    voiceModels.push("--model", `whisper=${whisper}`, "--model", `voice=${speech}`);
    config = { ...config, FERROUS_VOICE__VAD_MODEL: vad };
  }
  if (vision) {
    const colours = join(home, "colours");
    const paint = join(home, "paint");
    const seer = join(home, "seer");
    await Promise.all([
      python(["-m", "engine.tinyvision", colours, "classifier"]),
      python(["-m", "engine.tinyvision", paint, "diffusion"]),
      python(["-m", "engine.tinyprojector", seer]),
    ]);
    voiceModels.push("--model", `colours=${colours}`, "--model", `paint=${paint}`, "--model", `seer=${seer}`);
  }
  const env = { ...config, FERROUS_HOME: home };
  const token = (await python(["-m", "gateway.cli", "token", "--sub", "alice"], { env })).trim();
  const port = await freePort();
  const httpUrl = `http://127.0.0.1:${port}`;
  const args = ["-m", "gateway.cli", "serve", "--port", String(port), "--workers", "1", "--threads", "1"];
  args.push("--model", `script=${scriptPath}`);
  if (slow) args.push("--model", `slow=${slowPath}`);
  args.push(...voiceModels);
  args.push("--log-level", logLevel);

  /** @type {import("node:child_process").ChildProcess | null} */
  let child = null;
  let output = "";

  async function start() {
    output = "";
    const proc = spawn(PYTHON, args, {
      cwd: REPO_ROOT,
      env: childEnv(env),
      detached: true, // its own process group, so its workers go with it
      stdio: ["ignore", "pipe", "pipe"],
    });
    child = proc;
    live.add(proc);
    const exited = new Promise((r) => proc.once("exit", r));
    proc.exitPromise = exited;
    exited.then(() => live.delete(proc));
    proc.stdout.on("data", (d) => (output += d));
    proc.stderr.on("data", (d) => (output += d));
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      if (proc.exitCode !== null || proc.signalCode !== null) {
        throw new Error(`the server exited (${proc.exitCode ?? proc.signalCode}):\n${output}`);
      }
      if (await healthy(httpUrl)) return;
      await sleep(100);
    }
    killGroup(proc, "SIGKILL");
    throw new Error(`the server did not answer /healthz within 30 s:\n${output}`);
  }

  function waitExit(proc, ms) {
    return new Promise((resolvePromise) => {
      const timer = setTimeout(() => resolvePromise(false), ms);
      proc.exitPromise.then(() => {
        clearTimeout(timer);
        resolvePromise(true);
      });
    });
  }

  async function kill() {
    const proc = child;
    if (!proc) return;
    child = null;
    killGroup(proc, "SIGKILL");
    await waitExit(proc, 10_000);
  }

  async function stop() {
    const proc = child;
    if (!proc) return;
    child = null;
    if (proc.exitCode === null && proc.signalCode === null) {
      killGroup(proc, "SIGTERM");
      if (!(await waitExit(proc, 15_000))) {
        killGroup(proc, "SIGKILL");
        await waitExit(proc, 5_000);
      }
    }
  }

  /** SIGSTOP / SIGCONT the server's process group: it keeps its sockets but answers nothing. */
  function signalGroup(signal) {
    if (child) killGroup(child, signal);
  }

  await start();
  return {
    home,
    port,
    httpUrl,
    url: `ws://127.0.0.1:${port}/v1/ws`,
    token,
    get output() {
      return output;
    },
    start,
    kill,
    pause: () => signalGroup("SIGSTOP"),
    resume: () => signalGroup("SIGCONT"),
    async restart() {
      await kill();
      await start();
    },
    async stop() {
      await stop();
      rmSync(home, { recursive: true, force: true });
      homes.delete(home);
    },
  };
}

/**
 * A WebSocket class that records every message the client sends (parsed), to
 * check what went over the wire: `new FerrousClient({ WebSocket: RecordingWebSocket })`.
 */
export function recording() {
  /** @type {any[]} */
  const sent = [];
  class RecordingWebSocket extends WebSocket {
    /** @param {string} data */
    send(data) {
      sent.push(JSON.parse(data));
      super.send(data);
    }
  }
  return { sent, RecordingWebSocket };
}
