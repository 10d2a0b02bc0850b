// The chat page's voice in a real headless Chromium whose microphone is a WAV
// file (Chromium's fake capture device): the page hears a spoken question,
// shows its transcript, and the answer comes as text and audio.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { FerrousClient } from "../src/index.js";
import { startServer } from "./server.mjs";

const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const RATE = 24000;

let server;
let browser;

/** 16-bit mono PCM at `rate` as a WAV file. @param {Uint8Array} pcm @param {number} rate */
function wav(pcm, rate) {
  const header = Buffer.alloc(44);
  header.write("RIFF", 0);
  header.writeUInt32LE(36 + pcm.length, 4);
  header.write("WAVEfmt ", 8);
  header.writeUInt32LE(16, 16);
  header.writeUInt16LE(1, 20); // PCM
  header.writeUInt16LE(1, 22); // mono
  header.writeUInt32LE(rate, 24);
  header.writeUInt32LE(rate * 2, 28);
  header.writeUInt16LE(2, 32);
  header.writeUInt16LE(16, 34);
  header.write("data", 36);
  header.writeUInt32LE(pcm.length, 40);
  return Buffer.concat([header, Buffer.from(pcm)]);
}

before(async () => {
  server = await startServer({ slow: false, voice: true });
  // The question, spoken by the server's own voice, then silence (the file loops).
  const client = await FerrousClient.connect({ url: server.url, token: server.token });
  const speech = await client.speak({ model: "voice", text: "Green apples sit on the kitchen table." }).audio();
  await client.close();
  const silence = new Uint8Array(2 * RATE * 3);
  const file = join(mkdtempSync(join(tmpdir(), "ferrous-voice-")), "question.wav");
  writeFileSync(file, wav(Buffer.concat([Buffer.from(silence.subarray(0, RATE)), Buffer.from(speech), Buffer.from(silence)]), RATE));
  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
      `--use-file-for-fake-audio-capture=${file}`, "--autoplay-policy=no-user-gesture-required"],
  });
}, { timeout: 600_000 });

after(async () => {
  await browser?.close();
  await server?.stop();
});

test("hands-free: a spoken question is transcribed and answered in text and speech", { timeout: 120_000 }, async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (err) => errors.push(err.message));
  await page.goto(`${server.httpUrl}/#token=${server.token}`);
  await page.waitForSelector("#status:has-text('connected as alice')");
  await page.selectOption("#model", "script");
  await page.click("#hands-free");
  await page.waitForSelector("#hands-free[aria-pressed='true']"); // once the microphone is open

  const heard = page.locator(".turn.user[data-final='true']").first();
  await heard.waitFor({ timeout: 60_000 });
  const words = (await heard.textContent()).toLowerCase();
  assert.ok(words.includes("table") && words.includes("kitchen"), words);

  const answer = page.locator(".turn.assistant[data-voice='true'][data-finish]").first();
  await answer.waitFor({ timeout: 60_000 });
  assert.ok((await answer.locator(".text").textContent()).startsWith("Hi"));
  assert.ok(Number(await answer.getAttribute("data-audio-chunks")) >= 1);

  await page.click("#hands-free"); // stop listening: the stream ends
  await page.waitForFunction(() => document.querySelector("#hands-free").getAttribute("aria-pressed") === "false");
  assert.deepEqual(errors, []);
  await page.close();
});
