// How the chat page shows an answer (imported by app.js).
//
// Answers are markdown (CommonMark with GitHub's tables, task lists,
// strikethrough and bare links), rendered by marked, with code blocks
// highlighted by highlight.js and given a language label and a copy button.
// The libraries are bundled in ./vendor/markdown.js (built from
// ../static-src/, committed: nothing is built or fetched at run time).
//
// A model's output is never trusted as HTML:
//   * raw HTML in the markdown is shown as text, not parsed as markup;
//   * the rendered HTML then goes through DOMPurify, allowing only the
//     elements and attributes markdown produces: no scripts, no event
//     handlers, no styles; a link to anything but an http(s) or mailto URL
//     shows as its text;
//   * images are shown as links (an answer loads nothing by itself), and
//     links open in a new tab with rel="noopener noreferrer".
import { DOMPurify, Marked, hljs } from "./vendor/markdown.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

const markdown = new Marked({ gfm: true, breaks: true });
markdown.use({
  renderer: {
    // Raw HTML, as a block or inline: its text, escaped.
    html({ text, block }) {
      return block ? `<p class="raw">${escapeHtml(text.replace(/\n+$/, ""))}</p>\n` : escapeHtml(text);
    },
    codespan({ text }) {
      return `<code class="inline">${escapeHtml(text)}</code>`;
    },
    // A fenced block, or an indented one. While an answer streams, a fence not
    // closed yet is a code block running to the end of the text so far.
    code({ text, lang }) {
      const label = (lang ?? "").match(/^\S*/)[0];
      const source = text.replace(/\n$/, "");
      const known = label && hljs.getLanguage(label) ? label : "";
      const body = known
        ? hljs.highlight(source, { language: known, ignoreIllegals: true }).value
        : escapeHtml(source);
      const cls = known ? `hljs language-${escapeHtml(known)}` : "hljs";
      const tag = label ? `<span class="lang">${escapeHtml(label)}</span>` : "";
      return `<div class="code">${tag}<pre><code class="${cls}">${body}</code></pre></div>\n`;
    },
    image({ href, text }) {
      return `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`;
    },
  },
});

const PURIFY = {
  ALLOWED_TAGS: [
    "a", "blockquote", "br", "code", "del", "div", "em", "h1", "h2", "h3", "h4", "h5", "h6",
    "hr", "input", "li", "ol", "p", "pre", "span", "strong", "table", "tbody", "td", "th",
    "thead", "tr", "ul",
  ],
  ALLOWED_ATTR: ["align", "checked", "class", "disabled", "href", "start", "title", "type"],
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};
// Where a link may lead (DOMPurify's own rule, which also allows relative URLs
// and a few other schemes, has removed javascript: and data: already).
const LINKABLE = /^(?:https?|mailto):/i;

/** Render `text` (markdown) into the element `into`, replacing what it showed. */
export function renderAnswer(into, text) {
  const html = markdown.parse(text, { async: false }).trim();
  const fragment = DOMPurify.sanitize(html, PURIFY);
  for (const a of fragment.querySelectorAll("a")) {
    if (LINKABLE.test(a.getAttribute("href") ?? "")) {
      a.target = "_blank";
      a.rel = "noopener noreferrer";
    } else {
      a.replaceWith(...a.childNodes); // a link elsewhere shows as its text
    }
  }
  for (const input of fragment.querySelectorAll("input")) {
    if (input.type !== "checkbox") input.remove();
    else input.disabled = true;
  }
  for (const block of fragment.querySelectorAll("div.code")) block.append(copyButton(block));
  into.replaceChildren(fragment);
}

/**
 * An answer that grows while it streams: `update(text)` with the text so far
 * (cheap: it renders at most once per animation frame, and leaves frames out
 * while rendering takes long), `done(text)` renders the final text at once.
 */
export function liveAnswer(into) {
  let text = "";
  let frame = 0;
  let notBefore = 0;
  const draw = (now) => {
    frame = 0;
    if (now < notBefore) {
      frame = requestAnimationFrame(draw);
      return;
    }
    const started = performance.now();
    renderAnswer(into, text);
    // At most about a quarter of the time goes to rendering a long answer.
    notBefore = started + 4 * (performance.now() - started);
  };
  return {
    update(next) {
      text = next;
      if (!frame) frame = requestAnimationFrame(draw);
    },
    done(final = text) {
      if (frame) cancelAnimationFrame(frame);
      frame = 0;
      text = final;
      renderAnswer(into, text);
    },
  };
}

function copyButton(block) {
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy";
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(block.querySelector("pre code")?.textContent ?? "");
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  return copy;
}
