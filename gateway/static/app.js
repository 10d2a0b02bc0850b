// The chat page: a thin UI over the JS client (./ferrous-client.js), nothing else.
//
// Credentials: a token in the URL fragment (#token=..., never sent to the
// server in a request line), else one remembered in this browser, else the
// page asks for one. The token is offered to the server as a WebSocket
// subprotocol, which is how browsers authenticate without headers.
import { FerrousClient, UnauthorizedError } from "./ferrous-client.js";
import { liveAnswer, renderAnswer } from "./render.js";
import * as saved from "./history.js";
import { Microphone, Player } from "./voice.js";
import { base64Of, classify, draw, forChat, picture, readsImages } from "./images.js";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), status: $("status"), banner: $("banner"), auth: $("auth"), token: $("token"),
  conversation: $("conversation"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), newChat: $("new-chat"), historyList: $("history-list"),
  theme: $("theme"),
  system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"),
  asrModel: $("asr-model"), voiceModel: $("voice-model"), talk: $("talk"), handsFree: $("hands-free"),
  voiceState: $("voice-state"),
  imageModel: $("image-model"), drawModel: $("draw-model"), attach: $("attach"),
  imageFile: $("image-file"), draw: $("draw"), attached: $("attached"),
};

// Settings live in this browser: the system prompt opens each new conversation,
// temperature and max tokens go with every request (empty: the model's defaults).
const SETTINGS = {
  system: "ferrous.system", temperature: "ferrous.temperature", maxTokens: "ferrous.maxTokens",
  asrModel: "ferrous.asrModel", voiceModel: "ferrous.voiceModel",
  imageModel: "ferrous.imageModel", drawModel: "ferrous.drawModel",
};
for (const [field, key] of Object.entries(SETTINGS)) {
  ui[field].value = localStorage.getItem(key) ?? "";
  ui[field].addEventListener("change", () => localStorage.setItem(key, ui[field].value));
}

// Theme: as the system says (auto), or light or dark, remembered in this browser.
const THEMES = ["auto", "light", "dark"];
function applyTheme(theme) {
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  ui.theme.textContent = `Theme: ${theme}`;
}
applyTheme(localStorage.getItem("ferrous.theme") ?? "auto");
ui.theme.addEventListener("click", () => {
  const now = localStorage.getItem("ferrous.theme") ?? "auto";
  const next = THEMES[(THEMES.indexOf(now) + 1) % THEMES.length];
  localStorage.setItem("ferrous.theme", next);
  applyTheme(next);
});

function options() {
  const out = {};
  const temperature = Number.parseFloat(ui.temperature.value);
  if (Number.isFinite(temperature)) out.temperature = temperature;
  const maxTokens = Number.parseInt(ui.maxTokens.value, 10);
  if (Number.isInteger(maxTokens) && maxTokens > 0) out.max_tokens = maxTokens;
  return Object.keys(out).length ? out : undefined;
}

let client = null;
// The server's id for the conversation on screen, while this page holds one; null
// when the next turn starts (or replays) a conversation on the server.
let conversationId = null;
let record = null; // the conversation on screen, as stored in this browser
let current = null; // { gen, controller, live }
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

// The connection dropped: the client resumes the session by itself, and an
// answer being written goes on in its bubble, each piece once. Meanwhile the
// header and the answer say so; a session that could not be resumed is a new
// one (the answer in flight then ends with an error note).
function showConnection(event) {
  if (event.state === "reconnecting") {
    setStatus("reconnecting…");
    if (current) current.live.textContent = "reconnecting…";
  } else if (event.state === "open") {
    setStatus(`connected as ${client.ready.user}`);
    if (current) current.live.textContent = "";
  } else if (event.state === "closed") {
    setStatus("offline: reload the page to connect again");
  }
}

function setBusy(busy) {
  ui.send.disabled = busy || !client;
  ui.prompt.disabled = !client;
  ui.stop.disabled = !busy;
  ui.talk.disabled = ui.handsFree.disabled = busy || !client || !navigator.mediaDevices;
  ui.attach.disabled = ui.draw.disabled = busy || !client;
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

let bearer = null; // the page's token, for the HTTP image routes

async function connect(token) {
  bearer = token || null;
  showBanner("");
  setStatus("connecting…");
  try {
    client = await FerrousClient.connect({ url: wsUrl(), token });
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
  client.addEventListener("statechange", showConnection);
  setStatus(`connected as ${client.ready.user}`);
  const models = client.ready.models;
  ui.model.replaceChildren(...models.map((name) => new Option(name, name)));
  // The model used last in this browser, else a chat model the server ships.
  const remembered = localStorage.getItem("ferrous.model");
  const preferred = [remembered, "smollm2", "smollm2:latest"].find((m) => m && models.includes(m));
  if (preferred) ui.model.value = preferred;
  ui.model.disabled = false;
  setBusy(false);
  ui.prompt.focus();
}

// A question: its text, and a button to take it (and all after it) back into the
// composer, edit it and send it again (the conversation continues from before it).
function showUser(text, index, images = []) {
  const div = addTurn("user", "");
  const said = document.createElement("span");
  said.className = "said";
  said.textContent = text;
  for (const file of images) div.append(picture(URL.createObjectURL(file), file.name));
  div.append(said, button("edit", "✎", "edit and send again", () => {
    if (current) return;
    const upTo = Number(div.dataset.index);
    if (record && Number.isInteger(upTo)) record.turns = record.turns.slice(0, upTo);
    while (div.nextElementSibling) div.nextElementSibling.remove();
    div.remove();
    conversationId = null; // the server's copy holds what is being replaced
    ui.prompt.value = text;
    ui.prompt.focus();
    offerRegenerate();
  }));
  div.dataset.index = String(index);
  return div;
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  div.textContent = text;
  ui.conversation.append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function showAssistant(text, stats, finish) {
  const answer = addTurn("assistant", "");
  const body = document.createElement("div");
  body.className = "text";
  renderAnswer(body, text);
  answer.append(body);
  if (stats) {
    const line = document.createElement("span");
    line.className = "stats";
    line.textContent = stats;
    answer.append(line);
  }
  if (finish) answer.dataset.finish = finish;
  return answer;
}

// -- conversations kept in this browser -------------------------------------------------

function button(className, text, title, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.title = title;
  b.addEventListener("click", onclick);
  return b;
}

async function showHistory() {
  const items = (await saved.list()).map((r) => {
    const li = document.createElement("li");
    li.dataset.id = r.id;
    if (record && r.id === record.id) li.className = "current";
    const open = button("open", r.title, r.title, () => openConversation(r.id));
    const rename = button("rename", "✎", "rename", async () => {
      const title = prompt("Rename the conversation", r.title);
      if (title?.trim()) {
        await saved.save({ ...r, title: title.trim() });
        if (record?.id === r.id) record.title = title.trim();
        await showHistory();
      }
    });
    const remove = button("delete", "×", "delete", async () => {
      if (!confirm(`Delete "${r.title}"?`)) return;
      await saved.remove(r.id);
      if (record?.id === r.id) newChat();
      await showHistory();
    });
    li.append(open, rename, remove);
    return li;
  });
  ui.historyList.replaceChildren(...items);
}

async function openConversation(id) {
  if (current) return;
  const stored = await saved.get(id);
  if (!stored) return;
  record = stored;
  conversationId = null; // the next turn replays it: the server may not hold it any more
  ui.conversation.replaceChildren();
  for (const t of stored.turns) {
    if (t.role === "user") showUser(t.text, stored.turns.indexOf(t));
    else showAssistant(t.text, t.stats, t.finish);
  }
  if ([...ui.model.options].some((o) => o.value === stored.model)) ui.model.value = stored.model;
  offerRegenerate();
  await showHistory();
}

function newChat() {
  record = null;
  conversationId = null;
  ui.conversation.replaceChildren();
  showHistory();
  ui.prompt.focus();
}

// The last answer may be asked for again: its turn is taken back and re-sent.
function offerRegenerate() {
  for (const b of ui.conversation.querySelectorAll("button.regenerate")) b.remove();
  const answers = ui.conversation.querySelectorAll(".turn.assistant");
  const last = answers[answers.length - 1];
  if (!last || !record || record.turns.length < 2) return;
  const again = button("regenerate", "Regenerate", "ask for this answer again", async () => {
    if (current || !client) return;
    const question = record.turns[record.turns.length - 2];
    record.turns.splice(-2, 2);
    last.previousElementSibling?.remove();
    last.remove();
    conversationId = null; // the server's copy has the answer being replaced
    await ask(question.text);
  });
  last.append(again);
}

async function ask(text) {
  turn += 1;
  const earlier = record?.turns ?? [];
  if (!record) record = { id: crypto.randomUUID(), title: saved.titleOf(text), model: ui.model.value, turns: [] };
  else if (!record.turns.length) record.title = saved.titleOf(text); // its first question was edited
  const images = attached; // pictures for a vision model go with this question
  attached = [];
  showAttached();
  showUser(text, earlier.length, images);
  const answer = addTurn("assistant", "");
  answer.dataset.turn = String(turn);
  const body = document.createElement("div");
  body.className = "text";
  const view = liveAnswer(body); // re-rendered at most once a frame while it streams
  const typing = document.createElement("span");
  typing.className = "typing";
  typing.setAttribute("aria-label", "the model is thinking");
  const live = document.createElement("span");
  live.className = "live";
  answer.append(body, typing, live);
  let said = "";
  const controller = new AbortController();
  const started = performance.now();
  let firstAt = 0;
  let deltas = 0;
  const messages = [{ role: "user", content: text }];
  if (images.length) {
    messages[0].images = await Promise.all(images.map(async (f) => base64Of(await forChat(f).catch(() => f))));
  }
  if (!conversationId) {
    // A new conversation on the server: the system prompt, and the turns so far.
    const replay = earlier.map((t) => ({ role: t.role, content: t.text }));
    const system = ui.system.value.trim();
    messages.unshift(...(system ? [{ role: "system", content: system }] : []), ...replay);
  }
  const gen = client.chat({
    model: ui.model.value,
    messages,
    conversation: conversationId ?? undefined,
    options: options(),
    signal: controller.signal,
  });
  current = { gen, controller, live };
  setBusy(true);
  try {
    for await (const delta of gen) {
      if (!firstAt) {
        firstAt = performance.now();
        typing.remove();
      }
      deltas += 1;
      // seq 0 again: another node runs the answer again (its node stopped).
      said = delta.seq === 0 ? delta.text : said + delta.text;
      view.update(said);
      const seconds = (performance.now() - firstAt) / 1000;
      if (client.state === "open") live.textContent = seconds > 0.2 ? `${(deltas / seconds).toFixed(1)} tok/s` : "";
      answer.scrollIntoView({ block: "end" });
    }
  } catch (err) {
    const note = document.createElement("span");
    note.className = "stats error";
    note.textContent = `error: ${err.code ?? "connection"}: ${err.message}`;
    answer.append(note);
  } finally {
    view.done(said);
    typing.remove();
    live.remove();
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
    const kept = record;
    kept.model = ui.model.value;
    kept.turns.push(
      { role: "user", text },
      { role: "assistant", text: said, stats: stats.textContent, finish: done.finish_reason },
    );
    await saved.save(kept);
    // The answer is finished once it is stored: its stats and the Regenerate
    // button appear together, after that.
    answer.append(stats);
    if (record === kept) offerRegenerate();
    await showHistory();
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

ui.newChat.addEventListener("click", () => {
  if (!current) newChat();
});

ui.model.addEventListener("change", () => localStorage.setItem("ferrous.model", ui.model.value));

ui.auth.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = ui.token.value.trim();
  if (!token) return;
  localStorage.setItem("ferrous.token", token);
  connect(token);
});

connect(tokenFromFragment());
showHistory();

// -- voice ------------------------------------------------------------------------------

const player = new Player();
/** @type {{ stream: any, mic: Microphone, mode: string } | null} */
let voice = null;

function showVoiceState(text) {
  ui.voiceState.hidden = !text;
  ui.voiceState.textContent = text;
}

async function startVoice(mode) {
  if (!client || voice || current) return;
  const mic = new Microphone((pcm) => voice?.stream.send(pcm));
  let rate;
  try {
    rate = await mic.start();
  } catch (err) {
    showBanner(`The microphone is not available (${err.message}).`);
    return;
  }
  const reply = { model: ui.model.value, voice: ui.voiceModel.value.trim() || "voice" };
  if (conversationId) reply.conversation = conversationId; // the typed conversation goes on
  const system = ui.system.value.trim();
  if (system && !conversationId) reply.instructions = system;
  const opts = options();
  if (opts) reply.options = opts;
  const stream = client.listen({ model: ui.asrModel.value.trim() || "whisper", rate, reply });
  voice = { stream, mic, mode };
  ui.handsFree.setAttribute("aria-pressed", String(mode === "hands-free"));
  ui.talk.classList.toggle("active", mode === "talk");
  showVoiceState(mode === "talk" ? "listening… (let go to send)" : "listening… (hands-free)");
  hear(stream);
}

async function stopVoice() {
  const v = voice;
  if (!v || v.stopping) return;
  v.stopping = true;
  await v.mic.stop();
  v.stream.end(); // the last words are transcribed and answered, then the stream ends
  showVoiceState("answering…");
}

/** The listen stream's events: the user's words as they are heard, answers as they come. */
async function hear(stream) {
  let heard = null; // the bubble of the utterance being heard
  const answers = new Map(); // answer id -> { bubble, body, said, chunks, question }
  let lastQuestion = "";
  try {
    for await (const msg of stream) {
      if (msg.type === "speech" && msg.event === "start") {
        player.stop(); // speaking over an answer: the server stops it, the page stops playing it
        heard = addTurn("user", "…");
        heard.classList.add("heard");
      } else if (msg.type === "transcript") {
        heard ??= addTurn("user", "");
        heard.textContent = msg.text;
        heard.dataset.final = String(Boolean(msg.final));
        if (msg.final) {
          lastQuestion = msg.text;
          heard.classList.remove("heard");
          heard = null;
        }
      } else if (msg.type === "started" && msg.id !== stream.id) {
        const bubble = addTurn("assistant", "");
        const body = document.createElement("div");
        body.className = "text";
        bubble.append(body);
        bubble.dataset.voice = "true";
        answers.set(msg.id, { bubble, body, said: "", chunks: 0, question: lastQuestion });
      } else if (msg.type === "delta") {
        const a = answers.get(msg.id);
        if (a) {
          a.said += msg.text;
          renderAnswer(a.body, a.said);
          a.bubble.scrollIntoView({ block: "end" });
        }
      } else if (msg.type === "audio") {
        const a = answers.get(msg.id);
        if (a) {
          a.chunks += 1;
          a.bubble.dataset.audioChunks = String(a.chunks);
        }
        player.play(msg.data, msg.rate);
      } else if (msg.type === "done" && msg.id !== stream.id) {
        const a = answers.get(msg.id);
        if (!a) continue;
        conversationId = msg.conversation ?? conversationId;
        a.bubble.dataset.finish = msg.finish_reason;
        const stats = document.createElement("span");
        stats.className = "stats";
        stats.textContent = msg.finish_reason === "cancelled"
          ? "interrupted"
          : `${msg.usage.completion_tokens} tokens · spoken`;
        a.bubble.append(stats);
        record ??= { id: crypto.randomUUID(), title: saved.titleOf(a.question), model: ui.model.value, turns: [] };
        record.turns.push(
          { role: "user", text: a.question },
          { role: "assistant", text: a.said, stats: stats.textContent, finish: msg.finish_reason },
        );
        await saved.save(record);
        await showHistory();
      }
    }
  } catch (err) {
    showBanner(`Voice: ${err.code ?? "connection"}: ${err.message}`);
    await voice?.mic.stop();
  } finally {
    voice = null;
    ui.handsFree.setAttribute("aria-pressed", "false");
    ui.talk.classList.remove("active");
    showVoiceState("");
  }
}

ui.talk.addEventListener("pointerdown", () => startVoice("talk"));
for (const ev of ["pointerup", "pointerleave", "pointercancel"]) {
  ui.talk.addEventListener(ev, () => {
    if (voice?.mode === "talk") stopVoice();
  });
}
ui.handsFree.addEventListener("click", () => {
  if (voice?.mode === "hands-free") stopVoice();
  else if (!voice) startVoice("hands-free");
});
document.addEventListener("keydown", (event) => {
  if (event.code === "Space" && !event.repeat && document.activeElement?.tagName !== "TEXTAREA"
      && document.activeElement?.tagName !== "INPUT" && !voice) {
    event.preventDefault();
    startVoice("talk");
  }
});
document.addEventListener("keyup", (event) => {
  if (event.code === "Space" && voice?.mode === "talk") stopVoice();
});

// -- images -------------------------------------------------------------------------------

// Pictures waiting for the next question to a vision chat model.
let attached = [];

function showAttached() {
  ui.attached.replaceChildren(...attached.map((f) => picture(URL.createObjectURL(f), f.name)));
  ui.attached.hidden = attached.length === 0;
}

ui.attach.addEventListener("click", () => ui.imageFile.click());
ui.imageFile.addEventListener("change", async () => {
  const file = ui.imageFile.files?.[0];
  ui.imageFile.value = "";
  if (!file) return;
  if (await readsImages(ui.model.value, bearer)) {
    attached = [...attached, file].slice(-8); // one prompt shows at most eight
    showAttached();
    ui.prompt.focus();
    return;
  }
  const url = URL.createObjectURL(file);
  addTurn("user", "").append(picture(url, file.name));
  const answer = addTurn("assistant", "");
  answer.dataset.kind = "classification";
  const model = ui.imageModel.value.trim() || "open-nsfw";
  try {
    const labels = await classify(file, model, bearer);
    answer.textContent = labels.map((x) => `${x.label} ${(100 * x.score).toFixed(1)} %`).join(" · ");
    answer.dataset.top = labels[0]?.label ?? "";
  } catch (err) {
    answer.textContent = `The image could not be classified: ${err.message}`;
    answer.dataset.error = "true";
  }
});

ui.draw.addEventListener("click", async () => {
  const prompt = ui.prompt.value.trim();
  const model = ui.drawModel.value.trim() || "terrain-diffusion";
  addTurn("user", `🎨 ${prompt || "(no prompt)"}`);
  ui.prompt.value = "";
  const answer = addTurn("assistant", "drawing…");
  answer.dataset.kind = "drawing";
  ui.draw.disabled = true;
  try {
    const made = await draw(prompt, model, bearer);
    answer.textContent = "";
    for (const url of made.urls) answer.append(picture(url, prompt));
    answer.dataset.seed = String(made.seed);
  } catch (err) {
    answer.textContent = `Nothing was drawn: ${err.message}`;
    answer.dataset.error = "true";
  } finally {
    ui.draw.disabled = !client;
  }
});
