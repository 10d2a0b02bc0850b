// The chat page in a real headless Chromium (Debian's package, driven by
// playwright-core): load it from a real server, stream an answer, stop one.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startServer } from "./server.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const artifacts = join(here, "..", "..", "..", "artifacts");
const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

test("the page streams an answer and stops one mid-way", { timeout: 90_000 }, async () => {
  const page = await browser.newPage();
  await page.goto(`${server.httpUrl}/#token=${server.token}`);
  await page.waitForSelector("#status:has-text('connected as alice')");
  await page.selectOption("#model", "script");

  await page.fill("#prompt", "Say it");
  await page.click("#send");
  const first = page.locator(".turn.assistant").first();
  await first.locator(".stats").waitFor();
  const text = await first.locator(".text").textContent();
  assert.ok(text.startsWith("Hi ö你🙂!"), text);
  assert.match(await first.locator(".stats").textContent(), /tok\/s · first token \d+ ms/);

  await page.selectOption("#model", "slow");
  await page.fill("#prompt", "Keep going");
  await page.click("#send");
  const second = page.locator(".turn.assistant").nth(1);
  await page.waitForFunction(() => {
    const t = document.querySelectorAll(".turn.assistant .text")[1];
    return t && t.textContent.length > 20;
  });
  await page.click("#stop");
  await second.locator(".stats").waitFor();
  assert.equal(await second.getAttribute("data-finish"), "cancelled");
  assert.match(await second.locator(".stats").textContent(), /^stopped/);
  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: join(artifacts, "chat-page.png"), fullPage: true });
});

test("a bad token gets a clear message", { timeout: 60_000 }, async () => {
  const page = await browser.newPage();
  await page.goto(`${server.httpUrl}/#token=not-a-token`);
  await page.waitForSelector("#banner:not([hidden])");
  assert.match(await page.textContent("#banner"), /Authentication failed/);
  assert.equal(await page.isVisible("#auth"), true);
});
