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

test("a typing indicator comes first, code blocks render as text, the model is remembered",
  { timeout: 90_000 }, async () => {
    const page = await browser.newPage();
    await page.goto(`${server.httpUrl}/#token=${server.token}`);
    await page.waitForSelector("#status:has-text('connected as alice')");
    const icon = await page.request.get(`${server.httpUrl}/favicon.svg`);
    assert.equal(icon.status(), 200);
    await page.selectOption("#model", "script");

    // What appears, in order: the typing indicator, then the answer's text.
    await page.evaluate(() => {
      const seen = [];
      window.seen = seen;
      new MutationObserver((records) => {
        for (const r of records) {
          for (const n of r.addedNodes) {
            if (n.classList?.contains("typing")) seen.push("typing");
          }
        }
        const text = document.querySelector(".turn.assistant .text");
        if (text?.textContent && !seen.includes("text")) seen.push("text");
      }).observe(document.querySelector("#conversation"), { childList: true, subtree: true });
    });
    await page.fill("#prompt", "Say it");
    await page.click("#send");
    const answer = page.locator(".turn.assistant").first();
    await answer.locator(".stats").waitFor();
    assert.deepEqual(await page.evaluate(() => window.seen.slice(0, 2)), ["typing", "text"]);
    assert.equal(await answer.locator(".typing").count(), 0);

    // The page's own renderer (render.js), on an answer with code and a markup attempt.
    const shown = await page.evaluate(async () => {
      const { renderAnswer } = await import("/render.js");
      const into = document.createElement("span");
      renderAnswer(into, "Run `it`:\n```py\nprint(1)\n```\nand <img src=x onerror=alert(1)>");
      document.querySelector(".turn.assistant").append(into);
      return {
        code: into.querySelector(".code pre code")?.textContent,
        lang: into.querySelector(".code .lang")?.textContent,
        copy: into.querySelectorAll(".code button.copy").length,
        inline: into.querySelector("code.inline")?.textContent,
        images: into.querySelectorAll("img").length,
        text: into.textContent,
      };
    });
    assert.deepEqual(
      { ...shown, text: undefined },
      { code: "print(1)", lang: "py", copy: 1, inline: "it", images: 0, text: undefined },
    );
    assert.ok(shown.text.endsWith("and <img src=x onerror=alert(1)>"), shown.text);

    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: join(artifacts, "chat-page-code.png"), fullPage: true });
    await page.setViewportSize({ width: 390, height: 780 });
    await page.screenshot({ path: join(artifacts, "chat-page-phone.png"), fullPage: true });

    await page.selectOption("#model", "slow");
    await page.reload();
    await page.waitForSelector("#status:has-text('connected as alice')");
    assert.equal(await page.inputValue("#model"), "slow");
  });

test("settings go with the request: a max-tokens limit cuts the answer; a new chat starts empty",
  { timeout: 90_000 }, async () => {
    const page = await browser.newPage();
    await page.goto(`${server.httpUrl}/#token=${server.token}`);
    await page.waitForSelector("#status:has-text('connected as alice')");
    await page.selectOption("#model", "slow");
    await page.click("#settings summary");
    await page.fill("#max-tokens", "3");
    await page.dispatchEvent("#max-tokens", "change");
    await page.fill("#system", "Be brief.");
    await page.dispatchEvent("#system", "change");
    await page.fill("#prompt", "Hello");
    await page.click("#send");
    const answer = page.locator(".turn.assistant").first();
    await answer.locator(".stats").waitFor();
    assert.equal(await answer.getAttribute("data-finish"), "length");
    assert.match(await answer.locator(".stats").textContent(), /^3 tokens/);
    await page.reload();
    await page.waitForSelector("#status:has-text('connected as alice')");
    assert.equal(await page.inputValue("#max-tokens"), "3");  // kept in this browser
    assert.equal(await page.inputValue("#system"), "Be brief.");
    await page.click("#new-chat");
    assert.equal(await page.locator(".turn").count(), 0);
    await page.evaluate(() => localStorage.clear());
  });

test("conversations are kept in the browser: switched, continued, regenerated, renamed, deleted",
  { timeout: 120_000 }, async () => {
    const page = await browser.newPage();
    page.on("dialog", (d) => d.accept(d.type() === "prompt" ? "Renamed chat" : undefined));
    await page.goto(`${server.httpUrl}/#token=${server.token}`);
    await page.waitForSelector("#status:has-text('connected as alice')");
    await page.selectOption("#model", "script");
    const answered = async (n) => {
      await page.waitForFunction(
        (count) => document.querySelectorAll(".turn.assistant .stats").length === count, n);
    };
    const send = async (text, n) => {
      await page.fill("#prompt", text);
      await page.click("#send");
      await answered(n);
    };
    await send("first question", 1);
    await send("second question", 2);
    await page.click("#new-chat");
    await send("another topic", 1);
    const titles = () => page.locator("#history-list li .open").allTextContents();
    await page.waitForFunction(() => document.querySelectorAll("#history-list li").length === 2);
    assert.deepEqual(await titles(), ["another topic", "first question"]);  // latest first
    assert.equal(await page.locator("#history-list li.current .open").textContent(), "another topic");

    // After a reload (the server's copy does not matter): open the first, continue it.
    await page.reload();
    await page.waitForSelector("#status:has-text('connected as alice')");
    await page.waitForFunction(() => document.querySelectorAll("#history-list li").length === 2);
    await page.locator("#history-list li .open", { hasText: "first question" }).click();
    await page.waitForFunction(() => document.querySelectorAll(".turn").length === 4);
    assert.deepEqual(await page.locator(".turn.user .said").allTextContents(),
      ["first question", "second question"]);
    await send("third question", 3);
    assert.equal(await page.locator(".turn").count(), 6);

    // Regenerate replaces the last answer; the question stays, once.
    await page.locator("button.regenerate").click();
    await answered(3);
    assert.deepEqual(await page.locator(".turn.user .said").allTextContents(),
      ["first question", "second question", "third question"]);
    assert.equal(await page.locator("button.regenerate").count(), 1);

    await page.locator("#history-list li.current .rename").click();
    await page.waitForFunction(() =>
      document.querySelector("#history-list li.current .open")?.textContent === "Renamed chat");
    await page.locator("#history-list li", { hasText: "another topic" }).locator(".delete").click();
    await page.waitForFunction(() => document.querySelectorAll("#history-list li").length === 1);
    await page.reload();
    await page.waitForFunction(() => document.querySelectorAll("#history-list li").length === 1);
    assert.deepEqual(await titles(), ["Renamed chat"]);
  });

test("a question can be edited and sent again; the theme is switched and remembered",
  { timeout: 90_000 }, async () => {
    const page = await browser.newPage();
    await page.goto(`${server.httpUrl}/#token=${server.token}`);
    await page.waitForSelector("#status:has-text('connected as alice')");
    await page.selectOption("#model", "script");
    for (const [text, n] of [["first try", 1], ["second", 2]]) {
      await page.fill("#prompt", text);
      await page.click("#send");
      await page.waitForFunction(
        (count) => document.querySelectorAll(".turn.assistant .stats").length === count, n);
    }
    // Editing the first question takes it and everything after it back.
    await page.locator(".turn.user").first().locator("button.edit").click();
    assert.equal(await page.inputValue("#prompt"), "first try");
    assert.equal(await page.locator(".turn").count(), 0);
    await page.fill("#prompt", "first, edited");
    await page.click("#send");
    await page.waitForFunction(() => document.querySelectorAll(".turn.assistant .stats").length === 1);
    assert.deepEqual(await page.locator(".turn.user .said").allTextContents(), ["first, edited"]);
    await page.reload();
    await page.waitForSelector("#status:has-text('connected as alice')");
    assert.deepEqual(await page.locator("#history-list li .open").allTextContents(), ["first, edited"]);
    await page.locator("#history-list li .open").first().click();
    await page.waitForFunction(() => document.querySelectorAll(".turn").length === 2);
    assert.deepEqual(await page.locator(".turn.user .said").allTextContents(), ["first, edited"]);

    const theme = () => page.evaluate(() => document.documentElement.dataset.theme ?? "auto");
    assert.equal(await theme(), "auto");
    await page.click("#theme");
    assert.equal(await theme(), "light");
    await page.click("#theme");
    assert.equal(await theme(), "dark");
    await page.reload();
    assert.equal(await theme(), "dark");
    await page.screenshot({ path: join(artifacts, "chat-page-dark.png"), fullPage: true });
  });
