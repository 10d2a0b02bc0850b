// Compiled by `npm run typecheck` (never run): the public types as an application uses them.
import {
  ConnectionError,
  FerrousClient,
  FerrousError,
  ModelNotFoundError,
  ResumeExpiredError,
  type Ack,
  type ConnectionState,
  type Delta,
  type Done,
  type Generation,
  type ServerMessage,
} from "../src/index.js";

export async function usage(token: string): Promise<string> {
  const states: ConnectionState[] = [];
  const client = await FerrousClient.connect({
    url: "ws://127.0.0.1:11480/v1/ws",
    token,
    credits: 65536,
    reconnect: { attempts: 3 },
    resume: true,
    onstatechange: (state) => states.push(state),
  });
  client.addEventListener("statechange", (ev) => states.push(ev.resumed ? "open" : ev.state));
  const resumed: boolean = client.ready.resumed ?? false;
  const ack: Ack = { type: "ack", n: 1 };
  client.addEventListener("error", (ev) => console.warn(ev.error.code));
  const models: string[] = client.ready.models;
  const controller = new AbortController();
  const gen: Generation = client.chat({
    model: models[0] ?? "smollm2",
    messages: [{ role: "user", content: "Hi", images: [new Uint8Array([137, 80]), "data:image/png;base64,iVA="] }],
    options: { temperature: 0, max_tokens: 16, stop: ["\n"] },
    signal: controller.signal,
  });
  let text = "";
  try {
    for await (const delta of gen) {
      const d: Delta = delta;
      text += d.text + String(d.seq);
    }
  } catch (e) {
    if (e instanceof ModelNotFoundError) return e.id ?? "";
    if (e instanceof ResumeExpiredError && e.retryable) return "lost in a drop";
    if (e instanceof ConnectionError && e.retryable) return "retry";
    if (e instanceof FerrousError) return `${e.code} ${e.status ?? ""}`;
    throw e;
  }
  const done: Done | null = gen.done;
  const total = done ? done.usage.completion_tokens + done.timings.total_ms : 0;
  const next = client.generate({ model: "smollm2", prompt: "Once", options: { seed: 1 } });
  next.cancel();
  await next.text();
  await client.forget(gen.conversation ?? "c-1");
  const msg: ServerMessage | null = null;
  await client.close();
  return `${text}${total}${gen.bufferedBytes}${client.state}${msg === null}${resumed}${ack.n}`;
}
