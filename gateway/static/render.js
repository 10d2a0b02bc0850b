// How the chat page shows an answer (imported by app.js; no dependencies).
//
// Answers are plain text with fenced code blocks (```lang ... ```) shown as code
// with a copy button, and `inline code`. Everything is built as DOM nodes from
// text (textContent), never parsed as HTML: a model's output cannot inject markup.
export function renderAnswer(into, text) {
  const nodes = [];
  const fence = /```([\w+.#-]*)[^\S\n]*\n?([\s\S]*?)(?:```|$)/g;
  let at = 0;
  for (const m of text.matchAll(fence)) {
    if (m.index > at) nodes.push(...inline(text.slice(at, m.index)));
    nodes.push(codeBlock(m[1], m[2].replace(/\n$/, "")));
    at = m.index + m[0].length;
  }
  if (at < text.length) nodes.push(...inline(text.slice(at)));
  into.replaceChildren(...nodes);
}

function inline(text) {
  return text.split(/(`[^`\n]+`)/).filter(Boolean).map((part) => {
    if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) {
      const code = document.createElement("code");
      code.className = "inline";
      code.textContent = part.slice(1, -1);
      return code;
    }
    return document.createTextNode(part);
  });
}

function codeBlock(lang, source) {
  const wrap = document.createElement("div");
  wrap.className = "code";
  if (lang) {
    const label = document.createElement("span");
    label.className = "lang";
    label.textContent = lang;
    wrap.append(label);
  }
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  code.textContent = source;
  pre.append(code);
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy";
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(source);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  wrap.append(pre, copy);
  return wrap;
}
