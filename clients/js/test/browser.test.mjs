// The chat page in a real headless Chromium (Debian's package, driven by
// playwright-core): load it from a real server, stream an answer, stop one,
// render answers as markdown (and hostile markup as inert text), carry an
// answer over a dropped connection (resume). Screenshots,
// at a desktop and a phone size, go to the repository's artifacts/ folder.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { FerrousClient } from "../src/index.js";
import { startProxy } from "./proxy.mjs";
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

test("a typing indicator comes first, code blocks render with a copy button, the model is remembered",
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

// An answer in markdown, with every element the page renders, and markup a
// model might be made to write: each payload would set window.pwned.
const MARKDOWN = [
  "## A heading",
  "",
  "Some **bold**, *emphasis*, ~~struck~~ and `inline code`; a link to "
    + "[the docs](https://example.com/docs \"docs\") and a bare one: https://example.org/x.",
  "",
  "- first item",
  "- second item with `code`",
  "  1. nested, numbered",
  "- [x] a task done",
  "",
  "> A quotation",
  "> over two lines.",
  "",
  "| Model | Tokens/s | Note |",
  "|:------|---------:|:----:|",
  "| tiny  | 1234.5   | fast |",
  "| small | 56.7     | `q8` |",
  "",
  "```python",
  "def greet(name: str) -> str:",
  "    # Say hello.",
  "    return f\"Hello, {name}!\"",
  "```",
  "",
  "---",
  "",
  "Hostile: <img src=x onerror=\"window.pwned='img'\"> and <script>window.pwned='script'</script>",
  "",
  "<script>window.pwned = 'block script'</script>",
  "",
  "<svg onload=\"window.pwned='svg'\"><circle r=9></circle></svg>",
  "",
  "<iframe src=\"javascript:window.pwned='iframe'\"></iframe>",
  "",
  "[x](javascript:alert(1)) [click me](javascript:window.pwned='link') "
    + "<a href=\"javascript:window.pwned='raw link'\">raw link</a> "
    + "[data](data:text/html,<script>window.pwned='data'</script>) "
    + "![a picture](javascript:window.pwned='image') "
    + "<details open ontoggle=\"window.pwned='details'\">x</details> "
    + "<style>body { display: none }</style>",
].join("\n");

const PYTHON_SOURCE = "def greet(name: str) -> str:\n    # Say hello.\n    return f\"Hello, {name}!\"";

test("answers render as markdown: elements, highlighted code with a copy button, hostile markup inert",
  { timeout: 90_000 }, async () => {
    const context = await browser.newContext({
      permissions: ["clipboard-read", "clipboard-write"],
      viewport: { width: 1280, height: 900 },
    });
    const page = await context.newPage();
    const dialogs = [];
    page.on("dialog", (d) => {
      dialogs.push(d.message());
      d.dismiss();
    });
    await page.goto(`${server.httpUrl}/#token=${server.token}`);
    await page.waitForSelector("#status:has-text('connected as alice')");
    // A stored conversation, opened from the list as a person would: the page
    // renders its answer the same way as one it has just streamed.
    await page.evaluate(async ({ text }) => {
      const saved = await import("/history.js");
      await saved.save({
        id: "markdown", title: "Markdown", model: "script",
        turns: [{ role: "user", text: "Show me markdown" }, { role: "assistant", text, stats: "42 tokens" }],
      });
    }, { text: MARKDOWN });
    await page.reload();
    await page.waitForSelector("#status:has-text('connected as alice')");
    await page.locator("#history-list li .open", { hasText: "Markdown" }).click();
    const answer = page.locator(".turn.assistant .text");
    await answer.locator("h2").waitFor();

    const shown = await answer.evaluate((el) => {
      const text = (selector) => [...el.querySelectorAll(selector)].map((n) => n.textContent.trim());
      return {
        heading: text("h2"),
        items: text("ul > li").length,
        nested: text("ul ol > li"),
        task: el.querySelector("li input[type=checkbox]")?.checked,
        bold: text("strong"),
        em: text("em"),
        del: text("del"),
        inline: text("p code.inline"),
        quote: [...el.querySelectorAll("blockquote")].map((n) => n.innerText.trim()), // a line break: <br>
        headers: text("table th"),
        cells: text("table td"),
        links: [...el.querySelectorAll("a[href]")].map((a) => [a.textContent, a.href, a.target, a.rel]),
      };
    });
    assert.deepEqual(shown.heading, ["A heading"]);
    assert.equal(shown.items, 3);
    assert.deepEqual(shown.nested, ["nested, numbered"]);
    assert.equal(shown.task, true);
    assert.deepEqual(shown.bold, ["bold"]);
    assert.deepEqual(shown.em, ["emphasis"]);
    assert.deepEqual(shown.del, ["struck"]);
    assert.deepEqual(shown.inline, ["inline code"]);
    assert.deepEqual(shown.quote, ["A quotation\nover two lines."]);
    assert.deepEqual(shown.headers, ["Model", "Tokens/s", "Note"]);
    assert.deepEqual(shown.cells, ["tiny", "1234.5", "fast", "small", "56.7", "q8"]);
    assert.deepEqual(shown.links, [
      ["the docs", "https://example.com/docs", "_blank", "noopener noreferrer"],
      ["https://example.org/x", "https://example.org/x", "_blank", "noopener noreferrer"],
    ]);

    // The fenced block: highlighted as Python, labelled, copied as its source.
    const block = answer.locator(".code").first();
    assert.equal(await block.locator(".lang").textContent(), "python");
    const code = block.locator("pre code");
    assert.match(await code.getAttribute("class"), /\bhljs\b.*\blanguage-python\b/);
    assert.equal(await code.textContent(), PYTHON_SOURCE);
    assert.ok(await code.locator(".hljs-keyword").count() >= 2); // def, return
    assert.ok(await code.locator(".hljs-comment").count() >= 1);
    assert.ok(await code.locator(".hljs-string").count() >= 1);
    const colour = (selector) => code.locator(selector).first().evaluate((n) => getComputedStyle(n).color);
    assert.notEqual(await colour(".hljs-keyword"), await colour(".hljs-comment"));
    await block.locator("button.copy").click();
    await page.waitForFunction(() => document.querySelector(".code button.copy")?.textContent === "Copied");
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), PYTHON_SOURCE);
    await page.waitForFunction(() => document.querySelector(".code button.copy")?.textContent === "Copy");

    // Hostile markup is shown as text and does nothing, even when clicked.
    await page.locator(".turn.assistant p", { hasText: "click me" }).click();
    await page.waitForTimeout(300); // time for an image's error or a frame's load to fire
    const inert = await page.evaluate(() => {
      const root = document.querySelector("#conversation");
      const all = [...root.querySelectorAll("*")];
      return {
        pwned: window.pwned ?? null,
        handlers: all.flatMap((el) => [...el.attributes].filter((a) => /^on/i.test(a.name)).map((a) => a.name)),
        dangerous: root.querySelectorAll("script, img, svg, iframe, style, details, object, embed, form").length,
        styled: root.querySelectorAll("[style]").length,
        hrefs: [...root.querySelectorAll("[href], [src]")].map((el) => el.getAttribute("href") ?? el.getAttribute("src")),
        links: [...root.querySelectorAll("a")].map((a) => a.textContent),
        text: root.querySelector(".turn.assistant .text").textContent,
        hidden: getComputedStyle(document.body).display,
      };
    });
    assert.equal(inert.pwned, null);
    assert.deepEqual(dialogs, []);
    assert.deepEqual(inert.handlers, []);
    assert.equal(inert.dangerous, 0);
    assert.equal(inert.styled, 0);
    for (const href of inert.hrefs) assert.match(href, /^https:\/\//, href);
    assert.deepEqual(inert.links, ["the docs", "https://example.org/x"]); // the others: text
    for (const shown of ["x click me", "data a picture"]) assert.ok(inert.text.includes(shown), shown);
    assert.notEqual(inert.hidden, "none");
    for (const literal of ["<img src=x onerror=", "<script>window.pwned='script'</script>",
      "<svg onload=", "<a href=\"javascript:", "<style>body { display: none }</style>"]) {
      assert.ok(inert.text.includes(literal), `${literal} is shown as text`);
    }
    assert.equal(page.url().startsWith(server.httpUrl), true);

    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: join(artifacts, "chat-page-markdown.png"), fullPage: true });
    await page.click("#theme"); // auto, light, dark
    await page.click("#theme");
    await page.screenshot({ path: join(artifacts, "chat-page-markdown-dark.png"), fullPage: true });
    await page.click("#theme");
    await page.setViewportSize({ width: 390, height: 844 });
    await page.screenshot({ path: join(artifacts, "chat-page-markdown-phone.png"), fullPage: true });
    await context.close();
  });

test("a streaming answer renders at most once a frame; an unclosed fence is a code block in progress",
  { timeout: 60_000 }, async () => {
    const page = await browser.newPage();
    await page.goto(`${server.httpUrl}/#token=${server.token}`);
    await page.waitForSelector("#status:has-text('connected as alice')");
    const seen = await page.evaluate(async () => {
      const { liveAnswer } = await import("/render.js");
      const into = document.createElement("div");
      into.className = "text";
      document.querySelector("#conversation").append(into);
      let renders = 0;
      new MutationObserver(() => { renders += 1; }).observe(into, { childList: true });
      const frame = () => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
      const view = liveAnswer(into);
      const text = "Here:\n```python\ndef f():\n    return 1\n```\nDone, **really**.";
      const cut = text.indexOf("1\n```");
      // Token by token, all within one frame: nothing is rendered until the frame.
      for (let i = 1; i <= cut; i += 1) view.update(text.slice(0, i));
      const before = renders;
      await frame();
      await frame();
      const midway = {
        renders: renders - before,
        code: into.querySelector(".code pre code")?.textContent,
        lang: into.querySelector(".code .lang")?.textContent,
        keyword: into.querySelectorAll(".code .hljs-keyword").length,
        copy: into.querySelectorAll(".code button.copy").length,
        after: into.querySelector(".code")?.nextElementSibling?.outerHTML ?? null,
      };
      for (let i = cut + 1; i <= text.length; i += 1) view.update(text.slice(0, i));
      view.done(text);
      const final = {
        code: into.querySelector(".code pre code")?.textContent,
        strong: into.querySelector(".code + p strong")?.textContent,
      };
      await frame();
      return { before, midway, final, last: into.querySelector("p:last-child")?.textContent };
    });
    assert.equal(seen.before, 0);
    assert.deepEqual(seen.midway, {
      renders: 1, code: "def f():\n    return ", lang: "python", keyword: 2, copy: 1, after: null,
    });
    assert.deepEqual(seen.final, { code: "def f():\n    return 1", strong: "really" });
    assert.equal(seen.last, "Done, really.");
  });

test("a connection dropped mid-answer resumes: the answer goes on in its bubble, each piece once",
  { timeout: 90_000 }, async () => {
    // The page goes through a TCP proxy that cuts the connection as a network
    // would (no close frame), and holds the first reconnection for a moment.
    const proxy = await startProxy(server.port);
    const direct = await FerrousClient.connect({ url: server.url, token: server.token });
    try {
      const question = "Keep going";
      const options = { max_tokens: 600 };
      const expected = await direct.chat({ model: "slow", messages: question, options }).text();

      const page = await browser.newPage();
      await page.goto(`http://127.0.0.1:${proxy.port}/#token=${server.token}`);
      await page.waitForSelector("#status:has-text('connected as alice')");
      await page.evaluate(() => {
        window.statuses = [];
        const status = document.querySelector("#status");
        new MutationObserver(() => window.statuses.push(status.textContent))
          .observe(status, { childList: true, characterData: true, subtree: true });
      });
      await page.selectOption("#model", "slow");
      await page.click("#settings summary");
      await page.fill("#max-tokens", String(options.max_tokens));
      await page.dispatchEvent("#max-tokens", "change");
      await page.fill("#prompt", question);
      await page.click("#send");
      await page.waitForFunction(() => document.querySelector(".turn.assistant .text")?.textContent.length > 20);

      proxy.mode = "hold";
      proxy.drop();
      await page.waitForSelector("#status:has-text('reconnecting…')");
      await page.waitForSelector(".turn.assistant .live:has-text('reconnecting…')");
      const cut = await page.locator(".turn.assistant .text").textContent();
      assert.equal(await page.locator(".turn.assistant .stats").count(), 0, "cut mid-answer");
      assert.ok(cut.length < expected.length && expected.startsWith(cut), cut);
      await page.waitForTimeout(300);
      proxy.mode = "open";

      const answer = page.locator(".turn.assistant").first();
      await answer.locator(".stats").waitFor();
      assert.equal(await answer.locator(".text").textContent(), expected);
      assert.equal(await answer.getAttribute("data-finish"), "length");
      assert.match(await answer.locator(".stats").textContent(), /^600 tokens/);
      assert.equal(await page.locator(".turn.assistant").count(), 1);
      assert.equal(await answer.locator(".stats.error").count(), 0);
      const statuses = await page.evaluate(() => window.statuses);
      assert.deepEqual(statuses, ["reconnecting…", "connected as alice"]);
      // The page goes on: the next question is answered on the same session.
      await page.selectOption("#model", "script");
      await page.fill("#max-tokens", "13");
      await page.dispatchEvent("#max-tokens", "change");
      await page.fill("#prompt", "And again");
      await page.click("#send");
      await page.waitForFunction(() => document.querySelectorAll(".turn.assistant .stats").length === 2);
      assert.ok(proxy.connections >= 2);
    } finally {
      await direct.close();
      await proxy.close();
    }
  });
