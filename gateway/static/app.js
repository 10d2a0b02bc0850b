// The chat page: a thin UI over the JS client (./ferrous-client.js), nothing else.
//
// Credentials: a token in the URL fragment (#token=..., never sent to the
// server in a request line), else one remembered in this browser, else the
// page asks for one. The token is offered to the server as a WebSocket
// subprotocol, which is how browsers authenticate without headers.
import { FerrousClient, UnauthorizedError } from "./ferrous-client.js";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), status: $("status"), banner: $("banner"), auth: $("auth"), token: $("token"),
  conversation: $("conversation"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"),
};

let client = null;
let conversationId = null;
let current = null; // { gen, controller }
let turn = 0;

function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}/v1/ws`;
}

function showBanner(text) {
  ui.banner.textContent = text;
  ui.banner.hidden = !text;
}

function setStatus(text) {
  ui.status.textContent = text;
}

function setBusy(busy) {
  ui.send.disabled = busy || !client;
  ui.prompt.disabled = !client;
  ui.stop.disabled = !busy;
}

function tokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    localStorage.setItem("ferrous.token", token);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return token || localStorage.getItem("ferrous.token");
}

async function connect(token) {
  showBanner("");
  setStatus("connecting…");
  try {
    client = await FerrousClient.connect({
      url: wsUrl(),
      token,
      onstatechange: (state) => setStatus(state),
    });
  } catch (err) {
    client = null;
    setBusy(false);
    if (err instanceof UnauthorizedError) {
      localStorage.removeItem("ferrous.token");
      showBanner("Authentication failed: the token is missing, expired or not valid here. "
        + "Run `ferrous token` and paste the result below.");
      ui.auth.hidden = false;
      setStatus("not signed in");
    } else {
      showBanner(`The server is unreachable (${err.message}). Is \`ferrous serve\` running?`);
      setStatus("offline");
    }
    return;
  }
  ui.auth.hidden = true;
  setStatus(`connected as ${client.ready.user}`);
  ui.model.replaceChildren(...client.ready.models.map((name) => new Option(name, name)));
  ui.model.disabled = false;
  setBusy(false);
  ui.prompt.focus();
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = text;
  ui.conversation.append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function ask(text) {
  turn += 1;
  addTurn("user", text);
  const answer = addTurn("assistant", "");
  answer.dataset.turn = String(turn);
  const body = document.createElement("span");
  body.className = "text";
  answer.append(body);
  const controller = new AbortController();
  const started = performance.now();
  let firstAt = 0;
  let deltas = 0;
  const gen = client.chat({
    model: ui.model.value,
    messages: [{ role: "user", content: text }],
    conversation: conversationId ?? undefined,
    signal: controller.signal,
  });
  current = { gen, controller };
  setBusy(true);
  try {
    for await (const delta of gen) {
      if (!firstAt) firstAt = performance.now();
      deltas += 1;
      body.textContent += delta.text;
      answer.scrollIntoView({ block: "end" });
    }
  } catch (err) {
    const note = document.createElement("span");
    note.className = "stats error";
    note.textContent = `error: ${err.code ?? "connection"}: ${err.message}`;
    answer.append(note);
  } finally {
    current = null;
    setBusy(false);
  }
  conversationId = gen.conversation ?? conversationId;
  const done = gen.done;
  if (done) {
    const stats = document.createElement("span");
    stats.className = "stats";
    const ttft = firstAt ? Math.round(firstAt - started) : 0;
    const reason = done.finish_reason === "cancelled" ? "stopped · " : "";
    stats.textContent = `${reason}${done.usage.completion_tokens} tokens · `
      + `${done.timings.decode_tok_s.toFixed(1)} tok/s · first token ${ttft} ms`;
    answer.dataset.finish = done.finish_reason;
    answer.append(stats);
  }
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || !client || current) return;
  ui.prompt.value = "";
  ask(text);
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => current?.controller.abort());

ui.auth.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = ui.token.value.trim();
  if (!token) return;
  localStorage.setItem("ferrous.token", token);
  connect(token);
});

connect(tokenFromFragment());
