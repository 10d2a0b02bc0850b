// The chat page's images in a real headless Chromium: an attached picture is shown and
// classified by an image model, or read with the next question by a vision chat model,
// and a prompt is drawn by an image generation model, all inline in the conversation.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { chromium } from "playwright-core";
import { python, startServer } from "./server.mjs";

const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

let server;
let browser;
let redPng;
let bigPng;

before(async () => {
  server = await startServer({ slow: false, vision: true });
  redPng = join(mkdtempSync(join(tmpdir(), "ferrous-images-")), "red.png");
  bigPng = join(dirname(redPng), "big.png"); // a photo-sized picture: ~10 MB of noise
  await python([
    "-c",
    `from PIL import Image; Image.new("RGB", (40, 30), (230, 20, 20)).save(${JSON.stringify(redPng)})\n`
      + "import numpy as np\n"
      + `Image.fromarray(np.random.default_rng(0).integers(0, 256, (1800, 2400, 3), dtype=np.uint8)).save(${JSON.stringify(bigPng)})`,
  ]);
  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
}, { timeout: 600_000 });

after(async () => {
  await browser?.close();
  await server?.stop();
});

test("an attached image is classified and a prompt is drawn, inline", { timeout: 120_000 }, async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (err) => errors.push(err.message));
  await page.goto(`${server.httpUrl}/#token=${server.token}`);
  await page.waitForSelector("#status:has-text('connected as alice')");
  await page.selectOption("#model", "script"); // a text model: attached images are classified
  await page.click("#settings summary");
  await page.fill("#image-model", "colours");
  await page.fill("#draw-model", "paint");

  await page.setInputFiles("#image-file", redPng);
  const shown = page.locator(".turn.user img.picture").first();
  await shown.waitFor();
  const labels = page.locator(".turn.assistant[data-kind='classification'][data-top]").first();
  await labels.waitFor();
  assert.equal(await labels.getAttribute("data-top"), "red");
  assert.match(await labels.textContent(), /^red \d+\.\d % · /);

  await page.fill("#prompt", "a blue square");
  await page.click("#draw");
  const drawing = page.locator(".turn.assistant[data-kind='drawing'][data-seed] img.picture").first();
  await drawing.waitFor();
  const colour = await drawing.evaluate(async (img) => {
    await img.decode();
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const sum = [0, 0, 0];
    for (let i = 0; i < data.length; i += 4) for (let c = 0; c < 3; c++) sum[c] += data[i + c];
    return { size: [img.naturalWidth, img.naturalHeight], mean: sum.map((s) => s / (data.length / 4)) };
  });
  assert.deepEqual(colour.size, [32, 32]);
  const [r, g, b] = colour.mean;
  assert.ok(b > r + 30 && b > g + 30, JSON.stringify(colour.mean));

  // A model that does not draw: the page says why, and goes on.
  await page.fill("#draw-model", "colours");
  await page.fill("#prompt", "anything");
  await page.click("#draw");
  const refused = page.locator(".turn.assistant[data-kind='drawing'][data-error='true']").first();
  await refused.waitFor();
  assert.match(await refused.textContent(), /does not generate images/);
  assert.deepEqual(errors, []);
  await page.close();
});

test("an image attached for a vision chat model goes with the next question and changes the answer",
  { timeout: 120_000 }, async () => {
    const page = await browser.newPage();
    const errors = [];
    page.on("pageerror", (err) => errors.push(err.message));
    await page.goto(`${server.httpUrl}/#token=${server.token}`);
    await page.waitForSelector("#status:has-text('connected as alice')");
    await page.selectOption("#model", "seer");
    await page.click("#settings summary");
    await page.fill("#temperature", "0");
    await page.dispatchEvent("#temperature", "change");
    await page.fill("#max-tokens", "8");
    await page.dispatchEvent("#max-tokens", "change");
    const answerOf = async (n) => {
      await page.waitForFunction(
        (count) => document.querySelectorAll(".turn.assistant .stats").length === count, n);
      const answer = page.locator(".turn.assistant").nth(n - 1);
      assert.equal(await answer.getAttribute("data-finish"), "length");
      return answer.locator(".text").textContent();
    };

    await page.setInputFiles("#image-file", redPng);
    await page.locator("#attached img.picture").waitFor(); // waiting for the question
    assert.equal(await page.locator(".turn").count(), 0); // not classified
    await page.fill("#prompt", "what is this?");
    await page.click("#send");
    await page.locator(".turn.user img.picture").first().waitFor();
    const withImage = await answerOf(1);
    assert.ok(await page.locator("#attached").isHidden()); // it went with the question

    await page.click("#new-chat");
    await page.fill("#prompt", "what is this?");
    await page.click("#send");
    const without = await answerOf(1);
    assert.equal(await page.locator(".turn.user img.picture").count(), 0);
    assert.notEqual(withImage, without);

    // A photo far over the frame limit is scaled down in the page, and answered.
    await page.setInputFiles("#image-file", bigPng);
    await page.locator("#attached img.picture").waitFor();
    await page.fill("#prompt", "and this?");
    await page.click("#send");
    await answerOf(2);
    assert.equal(await page.locator(".turn.assistant .stats.error").count(), 0);
    assert.deepEqual(errors, []);
    await page.evaluate(() => localStorage.clear());
    await page.close();
  });
