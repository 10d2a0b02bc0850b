// FerrousForge client for browsers and Node >= 20: streams generations from a
// FerrousForge server over its WebSocket protocol (v1, subprotocol
// "ferrous.v1.json"). One self-contained ES module without dependencies.
//
//   const client = await FerrousClient.connect({ url: "ws://127.0.0.1:11480/v1/ws", token });
//   const gen = client.chat({ model: "smollm2", messages: [{ role: "user", content: "Hi" }] });
//   for await (const delta of gen) out.textContent += delta.text;
//   console.log(gen.done.finish_reason, gen.done.usage);
//
// See README.md for the API, errors, flow control and reconnection.

/** @typedef {import("./protocol.js").AdapterChoice} AdapterChoice */
/** @typedef {import("./protocol.js").ChatMessage} ChatMessage */
/** @typedef {import("./protocol.js").Delta} Delta */
/** @typedef {import("./protocol.js").Done} Done */
/** @typedef {import("./protocol.js").ErrorCode} ErrorCode */
/** @typedef {import("./protocol.js").ErrorMessage} ErrorMessage */
/** @typedef {import("./protocol.js").Options} Options */
/** @typedef {import("./protocol.js").Ready} Ready */
/** @typedef {import("./protocol.js").Started} Started */
/** @typedef {import("./protocol.js").Restarted} Restarted */
/** @typedef {import("./protocol.js").Queued} Queued */
/** @typedef {import("./protocol.js").Chat} ChatRequest */
/** @typedef {import("./protocol.js").Generate} GenerateRequest */
/** @typedef {import("./protocol.js").Hello} Hello */

/** @typedef {"connecting" | "open" | "reconnecting" | "closed"} ConnectionState */
/** @typedef {{ attempts: number, minDelayMs: number, maxDelayMs: number }} ReconnectPolicy */
/** @typedef {string | (() => string | null | undefined | Promise<string | null | undefined>)} TokenSource */

export const VERSION = "0.1.0";
export const PROTOCOL_VERSION = 1;
export const SUBPROTOCOL_JSON = "ferrous.v1.json";
export const TOKEN_SUBPROTOCOL_PREFIX = "ferrous.token.";

const CLIENT_NAME = `ferrous-client-js/${VERSION}`;
const DEFAULT_PORT = 11480;
/** @type {ReconnectPolicy} */
const DEFAULT_RECONNECT = Object.freeze({ attempts: 5, minDelayMs: 200, maxDelayMs: 5000 });
// Waits between resume attempts when reconnection is off: the server's resume
// window bounds the attempts, not their number.
/** @type {ReconnectPolicy} */
const RESUME_BACKOFF = Object.freeze({ attempts: Infinity, minDelayMs: 100, maxDelayMs: 1000 });
// Close codes after which the session may still be resumed: the connection was
// lost without a close frame (1006), or the server's side went away (1001).
// Any other close the server sent is deliberate: 1008 (an expired or revoked
// credential), 4000 (another connection resumed the session), ...
const RESUMABLE_CLOSE = new Set([1001, 1006]);
const ACK_EVERY = 64; // numbered messages between acks (one also follows every end)
const ACK_AUDIO_BYTES = 64 * 1024; // ... and bytes of audio (chunks fill the server's replay budget fast)
const ID_RE = /^[A-Za-z0-9._:-]{1,64}$/;
const CONVERSATION_RE = /^[A-Za-z0-9._:-]{1,128}$/;
const ROLES = new Set(["system", "user", "assistant", "tool"]);
const RECENT = 256; // ended generations remembered to absorb their late messages
const HEARTBEAT_FRAME = '{"type":"heartbeat"}';
const NOOP = () => {};

// -- errors -----------------------------------------------------------------------------

/**
 * Root of every error this client raises on purpose. `code` is the protocol
 * error code ("connection" for transport failures), `id` the generation it
 * belongs to, `retryable` whether the same request may succeed later, and
 * `status` the HTTP status when an HTTP response said so.
 */
export class FerrousError extends Error {
  /** @type {ErrorCode | "connection"} */
  static defaultCode = "internal";
  static defaultRetryable = false;

  /**
   * @param {string} message
   * @param {{ code?: ErrorCode | "connection", id?: string | null, retryable?: boolean, status?: number | null, cause?: unknown }} [init]
   */
  constructor(message, init = {}) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    const cls = /** @type {typeof FerrousError} */ (new.target);
    this.name = cls.name;
    /** @type {ErrorCode | "connection"} */
    this.code = init.code ?? cls.defaultCode;
    /** @type {string | null} */
    this.id = init.id ?? null;
    /** @type {boolean} */
    this.retryable = init.retryable ?? cls.defaultRetryable;
    /** @type {number | null} */
    this.status = init.status ?? null;
  }
}

export class BadRequestError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "bad_request";
}
export class UnauthorizedError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "unauthorized";
}
export class ForbiddenError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "forbidden";
}
export class NotFoundError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "not_found";
}
export class ModelNotFoundError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "model_not_found";
}
export class ConflictError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "conflict";
}
export class TooLargeError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "too_large";
}
export class RateLimitedError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "rate_limited";
  static defaultRetryable = true;
}
export class OverloadedError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "overloaded";
  static defaultRetryable = true;
}
export class CancelledError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "cancelled";
}
export class StalledError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "stalled";
}
export class EngineError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "engine_error";
  static defaultRetryable = true;
}
export class InternalError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "internal";
}
/**
 * The session could not be resumed after a dropped connection (its window
 * passed, the messages missed are no longer kept, or the token is another
 * user's): the generations in flight are lost. The client goes on with a new
 * session, so the same request may be sent again.
 */
export class ResumeExpiredError extends FerrousError {
  /** @type {ErrorCode} */ static defaultCode = "resume_expired";
}
/** The transport failed: unreachable server, dropped connection, timeout, closed client. */
export class ConnectionError extends FerrousError {
  /** @type {"connection"} */ static defaultCode = "connection";
  static defaultRetryable = true;
}

/** @type {Record<ErrorCode, typeof FerrousError>} */
const ERROR_CLASSES = {
  bad_request: BadRequestError,
  unauthorized: UnauthorizedError,
  forbidden: ForbiddenError,
  not_found: NotFoundError,
  model_not_found: ModelNotFoundError,
  conflict: ConflictError,
  too_large: TooLargeError,
  rate_limited: RateLimitedError,
  overloaded: OverloadedError,
  cancelled: CancelledError,
  stalled: StalledError,
  engine_error: EngineError,
  internal: InternalError,
  resume_expired: ResumeExpiredError,
};

/**
 * The typed error for a server `error` message. Unknown codes become InternalError.
 * @param {{ code: string, message?: string, id?: string | null, retryable?: boolean }} msg
 * @param {number | null} [status]
 * @returns {FerrousError}
 */
export function errorFromMessage(msg, status = null) {
  const known = Object.prototype.hasOwnProperty.call(ERROR_CLASSES, msg.code);
  const code = /** @type {ErrorCode} */ (known ? msg.code : "internal");
  const Cls = ERROR_CLASSES[code];
  const text = known ? msg.message ?? "" : `${msg.message ?? ""} (code ${msg.code})`;
  return new Cls(text, { code, id: msg.id ?? null, retryable: msg.retryable ?? false, status });
}

/**
 * @param {number} status
 * @param {any} body
 * @param {string} what
 */
function errorFromHttp(status, body, what) {
  const e = body && typeof body === "object" ? body.error : null;
  // A 503 means "not now": worth another try even though the body says otherwise.
  const retryable = status === 503 || status === 502 || status === 504 || status === 429;
  if (e && typeof e.code === "string") {
    const err = errorFromMessage({ code: e.code, message: String(e.message ?? ""), retryable: e.retryable }, status);
    err.retryable = err.retryable || retryable;
    return err;
  }
  const message = `${what}: HTTP ${status}`;
  if (status === 401) return new UnauthorizedError(message, { status });
  if (status === 403) return new ForbiddenError(message, { status });
  if (status === 404) return new NotFoundError(message, { status });
  if (status === 429) return new RateLimitedError(message, { status });
  if (status === 503) return new OverloadedError(message, { status });
  return new InternalError(message, { status, retryable });
}

/** @param {unknown} err */
function shouldRetry(err) {
  if (err instanceof UnauthorizedError || err instanceof ForbiddenError || err instanceof BadRequestError) {
    return false;
  }
  return err instanceof FerrousError ? err.retryable : false;
}

// -- small helpers ----------------------------------------------------------------------

/**
 * UTF-8 length of a string without encoding it (what flow control counts).
 * @param {string} s
 */
export function utf8Length(s) {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      n += 4;
      i++;
    } else n += 3;
  }
  return n;
}

/**
 * The wait before reconnection attempt `n` (0-based): exponential, capped, with jitter.
 * @param {number} n
 * @param {ReconnectPolicy} policy
 */
export function backoffDelay(n, policy) {
  const base = Math.min(policy.maxDelayMs, policy.minDelayMs * 2 ** n);
  return base * (1 - 0.5 * Math.random());
}

/** @param {Partial<ReconnectPolicy> | boolean | undefined} value @returns {ReconnectPolicy | null} */
function reconnectPolicy(value) {
  if (value === false) return null;
  if (value === undefined || value === true) return { ...DEFAULT_RECONNECT };
  const p = { ...DEFAULT_RECONNECT, ...value };
  if (!(p.attempts >= 1) || !(p.minDelayMs >= 0) || !(p.maxDelayMs >= p.minDelayMs)) {
    throw new TypeError("reconnect needs attempts >= 1 and 0 <= minDelayMs <= maxDelayMs");
  }
  return p;
}

function pageUrl() {
  const loc = /** @type {any} */ (globalThis).location;
  return loc && typeof loc.href === "string" && /^https?:/.test(loc.href) ? loc.href : null;
}

/**
 * The WebSocket URL: ws/wss as given, http(s) turned into ws(s), relative URLs
 * resolved against the page; without one, the page's own server (browsers) or
 * ws://127.0.0.1:11480/v1/ws.
 * @param {string | URL | undefined} url
 */
function wsUrl(url) {
  const page = pageUrl();
  if (url === undefined || url === null || url === "") {
    if (page) {
      const p = new URL(page);
      return `${p.protocol === "https:" ? "wss:" : "ws:"}//${p.host}/v1/ws`;
    }
    return `ws://127.0.0.1:${DEFAULT_PORT}/v1/ws`;
  }
  const u = new URL(String(url), page ?? undefined);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  else if (u.protocol !== "ws:" && u.protocol !== "wss:") {
    throw new TypeError(`not a WebSocket URL: ${String(url)}`);
  }
  u.hash = "";
  return u.toString();
}

/**
 * The server's HTTP base for a WebSocket URL: scheme swapped, `/v1/ws` and the query removed.
 * @param {string} ws
 */
export function httpBaseUrl(ws) {
  const u = new URL(ws);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  u.pathname = u.pathname.replace(/\/?v1\/ws\/?$/, "").replace(/\/+$/, "");
  u.search = "";
  u.hash = "";
  return u.toString().replace(/\/+$/, "");
}

/** @param {string} url @param {string} key @param {string} value */
function withQuery(url, key, value) {
  const u = new URL(url);
  u.searchParams.set(key, value);
  return u.toString();
}

/** @param {number} ms */
function timeoutSignal(ms) {
  return typeof AbortSignal !== "undefined" && typeof AbortSignal.timeout === "function"
    ? AbortSignal.timeout(ms)
    : undefined;
}

/** @param {unknown} e */
function rethrowLater(e) {
  queueMicrotask(() => {
    throw e;
  });
}

/** @param {TokenSource | null | undefined} token */
async function resolveToken(token) {
  if (typeof token === "function") return (await token()) ?? null;
  return token ?? null;
}

/**
 * POST to a ticket endpoint (usually the server's `/v1/tickets`) and return the
 * single-use ticket. With a `token` it is sent as `Authorization: Bearer`;
 * without, the request carries only what the browser adds (cookies of the same
 * origin), for an application backend that issues tickets itself.
 * @param {string | URL} ticketUrl
 * @param {{ token?: string | null, fetch?: typeof fetch }} [options]
 * @returns {Promise<string>}
 */
export async function fetchTicket(ticketUrl, options = {}) {
  const f = options.fetch ?? globalThis.fetch?.bind(globalThis);
  if (!f) throw new TypeError("fetchTicket needs fetch (pass the fetch option)");
  /** @type {Record<string, string>} */
  const headers = {};
  if (options.token) headers.Authorization = `Bearer ${options.token}`;
  let res;
  try {
    res = await f(String(ticketUrl), { method: "POST", headers, cache: "no-store" });
  } catch (cause) {
    throw new ConnectionError(`server unreachable: no answer from ${String(ticketUrl)}`, { cause });
  }
  /** @type {any} */
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) throw errorFromHttp(res.status, body, "the ticket request was refused");
  if (!body || typeof body.ticket !== "string") {
    throw new InternalError("the ticket endpoint answered without a ticket", { status: res.status });
  }
  return body.ticket;
}

/**
 * @param {string} id
 * @param {any} options
 */
function cleanOptions(id, options) {
  if (options === undefined || options === null) return undefined;
  if (typeof options !== "object" || Array.isArray(options)) {
    throw new BadRequestError("options must be an object", { id });
  }
  /** @type {Record<string, unknown>} */
  const out = {};
  for (const [k, v] of Object.entries(options)) if (v !== undefined) out[k] = v;
  return out;
}

/**
 * @param {string} id
 * @param {string | ChatMessage[] | undefined} messages
 * @returns {ChatMessage[]}
 */
function cleanMessages(id, messages) {
  if (typeof messages === "string") return [{ role: "user", content: messages }];
  if (!Array.isArray(messages) || messages.length === 0) {
    throw new BadRequestError("messages must be a non-empty array of {role, content}", { id });
  }
  return messages.map((m, i) => {
    if (!m || !ROLES.has(m.role) || typeof m.content !== "string") {
      throw new BadRequestError(`messages[${i}] needs a role (system, user, assistant, tool) and a string content`, { id });
    }
    /** @type {ChatMessage} */
    const out = { role: m.role, content: m.content };
    if (m.tool_calls) out.tool_calls = m.tool_calls;
    if (m.tool_call_id) out.tool_call_id = m.tool_call_id;
    if (m.images != null) {
      if (!Array.isArray(m.images)) throw new BadRequestError(`messages[${i}].images must be an array`, { id });
      out.images = m.images.map((x, k) => imageText(id, x, `messages[${i}].images[${k}]`));
    }
    return out;
  });
}

/**
 * An image for a vision model as the JSON protocol carries it: base64 text. Takes
 * base64 text, a data: URL, a Uint8Array or an ArrayBuffer.
 * @param {string} id @param {unknown} x @param {string} where @returns {string}
 */
function imageText(id, x, where) {
  if (typeof x === "string") return x.startsWith("data:") ? x.slice(x.indexOf(",") + 1) : x;
  const bytes = x instanceof ArrayBuffer ? new Uint8Array(x) : x instanceof Uint8Array ? x : null;
  if (!bytes) throw new BadRequestError(`${where} must be base64 text, a data: URL or bytes`, { id });
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

/** @param {string} id @param {unknown} model */
function checkModel(id, model) {
  if (typeof model !== "string" || model.length === 0 || model.length > 256) {
    throw new BadRequestError("model must be a string of 1 to 256 characters", { id });
  }
  return model;
}

/**
 * LoRA adapters for one generation: model names (scale 1) or `{ name, scale }`.
 * @param {string} id @param {unknown} adapters @returns {AdapterChoice[]}
 */
function cleanAdapters(id, adapters) {
  if (!Array.isArray(adapters) || adapters.length > 4) {
    throw new BadRequestError("adapters must be a list of at most 4", { id });
  }
  return adapters.map((a, i) => {
    const item = typeof a === "string" ? { name: a } : a;
    if (!item || typeof item !== "object" || typeof item.name !== "string" || !item.name) {
      throw new BadRequestError(`adapters[${i}] needs a model name`, { id });
    }
    /** @type {AdapterChoice} */
    const out = { name: item.name };
    if (item.scale !== undefined && item.scale !== 1) {
      if (typeof item.scale !== "number" || !(item.scale >= -4 && item.scale <= 4)) {
        throw new BadRequestError(`adapters[${i}].scale must be a number from -4 to 4`, { id });
      }
      out.scale = item.scale;
    }
    return out;
  });
}

/** @param {string} id @param {unknown} priority */
function checkPriority(id, priority) {
  if (typeof priority !== "number" || !Number.isInteger(priority) || priority < -100 || priority > 100) {
    throw new BadRequestError("priority must be an integer from -100 to 100", { id });
  }
  return priority;
}

/** @param {Generation} gen */
function cancelledDone(gen) {
  /** @type {Done} */
  const done = {
    type: "done",
    id: gen.id,
    finish_reason: "cancelled",
    usage: { prompt_tokens: 0, completion_tokens: 0 },
    timings: { load_ms: 0, queue_ms: 0, ttft_ms: 0, total_ms: 0, decode_tok_s: 0 },
  };
  if (gen.conversation) done.conversation = gen.conversation;
  return done;
}

// -- generations ------------------------------------------------------------------------

/**
 * @typedef {{ kind: "delta", delta: Delta, n: number, session: Session }
 *   | { kind: "end" }
 *   | { kind: "error", error: FerrousError }} Item
 */

/**
 * One generation: an async iterable of its deltas, in order. After the
 * iteration ends, `done` holds the server's Done message (finish_reason,
 * usage, timings) and `conversation` the conversation id to continue with.
 * Leaving the iteration early (break, throw) cancels the generation.
 * @implements {AsyncIterable<Delta>}
 */
export class Generation {
  /**
   * @param {FerrousClient} client
   * @param {string} id
   * @param {"chat" | "generate"} kind
   * @param {string} model
   * @param {string | null} conversation
   */
  constructor(client, id, kind, model, conversation) {
    /** @readonly */ this.id = id;
    /** @readonly */ this.kind = kind;
    /** @readonly */ this.model = model;
    /** @type {string | null} */
    this.conversation = conversation;
    /** @type {Started | null} */
    this.started = null;
    /** Its place while it waits for room on the model (null once started). @type {Queued | null} */
    this.queued = null;
    /** @type {Done | null} */
    this.done = null;
    /** @type {FerrousError | null} */
    this.error = null;
    /**
     * Set when another node runs the generation again (its node stopped): the
     * text before it is void, and deltas count from seq 0 again.
     * @type {Restarted | null}
     */
    this.restarted = null;
    this._client = client;
    /** @type {Session | null} */ this._session = null;
    /** @type {Item[]} */ this._queue = [];
    /** @type {(() => void) | null} */ this._wake = null;
    this._buffered = 0;
    this._ended = false;
    this._cancelRequested = false;
    // The server is known to have read the request (a message about it, or the
    // heartbeat sent after it, came back).
    this._reached = false;
    this._abandoned = false;
    this._iterating = false;
    this._exhausted = false;
    /** @type {FerrousError | null} */ this._endError = null;
    /** @type {(() => void) | null} */ this._unwatch = null;
  }

  /** Bytes of delta text received but not yet handed to the application. */
  get bufferedBytes() {
    return this._buffered;
  }

  /** True once nothing more will come from the server (done, error or a lost connection). */
  get finished() {
    return this._ended;
  }

  /** The finish reason once `done` arrived, else null. */
  get finishReason() {
    return this.done ? this.done.finish_reason : null;
  }

  /**
   * Ask the server to stop. Text already on its way is still yielded; then the
   * iteration ends with `done.finish_reason` "cancelled". No-op once finished.
   */
  cancel() {
    this._client._cancel(this);
  }

  /**
   * Read the generation to its end and return the whole text. After a
   * `restarted` (the node running it stopped and another runs it again),
   * deltas count from seq 0 again and the text starts over.
   */
  async text() {
    let s = "";
    for await (const d of this) s = d.seq === 0 ? d.text : s + d.text;
    return s;
  }

  /** @returns {AsyncGenerator<Delta, void, undefined>} */
  async *[Symbol.asyncIterator]() {
    if (this._iterating) throw new TypeError(`generation ${this.id} is already being iterated`);
    if (this._exhausted) {
      if (this._endError) throw this._endError;
      return;
    }
    this._iterating = true;
    let complete = false;
    try {
      for (;;) {
        while (this._queue.length === 0) {
          await new Promise((resolve) => {
            this._wake = () => resolve(undefined);
            if (this._session) this._session._starved();
          });
        }
        const item = /** @type {Item} */ (this._queue.shift());
        if (item.kind === "delta") {
          this._buffered -= item.n;
          item.session._consumed(item.n);
          yield item.delta;
          continue;
        }
        complete = true;
        this._exhausted = true;
        if (item.kind === "error") {
          this._endError = item.error;
          throw item.error;
        }
        return;
      }
    } finally {
      this._iterating = false;
      if (!complete) this._abandon();
    }
  }

  // -- used by the client ------------------------------------------------------------

  /** Wake the iteration if it waits for an item. */
  _notify() {
    const wake = this._wake;
    this._wake = null;
    if (wake) wake();
  }

  /** @param {AbortSignal} signal */
  _watch(signal) {
    if (this._ended) return;
    if (signal.aborted) {
      this.cancel();
      return;
    }
    const onAbort = () => this.cancel();
    signal.addEventListener("abort", onAbort, { once: true });
    this._unwatch = () => signal.removeEventListener("abort", onAbort);
  }

  /** @param {Started} msg */
  _onStarted(msg) {
    this.queued = null;
    this.started = msg;
    if (msg.conversation) this.conversation = msg.conversation;
  }

  /** @param {Delta} delta @param {number} n @param {Session} session */
  _push(delta, n, session) {
    if (this._abandoned || this._ended) {
      session._consumed(n);
      return;
    }
    this._buffered += n;
    this._queue.push({ kind: "delta", delta, n, session });
    this._notify();
  }

  /** @param {Done} done */
  _onDone(done) {
    if (this._ended) {
      this._lateDone(done);
      return;
    }
    this.done = done;
    if (done.conversation) this.conversation = done.conversation;
    if (done.finish_reason === "error") {
      this._end(new EngineError("the generation failed in the engine", { id: this.id }));
    } else if (done.finish_reason === "stalled") {
      this._end(
        new StalledError("the server ended the generation: its text was not read in time", { id: this.id }),
      );
    } else {
      this._end(null);
    }
  }

  /** A done after the generation already failed only adds usage and timings. @param {Done} done */
  _lateDone(done) {
    if (!this.done) this.done = done;
    if (done.conversation && !this.conversation) this.conversation = done.conversation;
  }

  /** @param {FerrousError} error */
  _fail(error) {
    if (this._ended) return;
    if (error.id === null) error.id = this.id;
    this._end(error);
  }

  /** @param {FerrousError | null} error */
  _end(error) {
    this._ended = true;
    if (error) this.error = error;
    if (this._unwatch) this._unwatch();
    this._unwatch = null;
    this._client._forgetActive(this);
    if (!this._abandoned) this._queue.push(error ? { kind: "error", error } : { kind: "end" });
    this._notify();
  }

  /** The application stopped reading: cancel if running, and drop (and credit) what comes. */
  _abandon() {
    if (this._abandoned) return;
    this._abandoned = true;
    this._exhausted = true;
    for (const item of this._queue) {
      if (item.kind === "delta") {
        this._buffered -= item.n;
        item.session._consumed(item.n);
      }
    }
    this._queue = [];
    if (!this._ended) this.cancel();
  }
}

// -- one WebSocket session --------------------------------------------------------------

/**
 * @typedef {{ gen?: Generation | null, forget?: { resolve: () => void, reject: (e: FerrousError) => void } | null }} Fence
 */
/**
 * Events of a socket between its ready and the session taking it over. Some
 * WebSocket implementations (Node's) dispatch every frame of a network read
 * at once, so what follows ready (a resume's replay) can arrive before the
 * code awaiting the handshake runs.
 * @typedef {Event[]} Backlog
 */

/**
 * A session the server opened: its socket, its Ready, and the per-session
 * state (generations by id, credit window, heartbeat fences, the highest
 * message number received). A resumed session keeps this object and carries
 * on over a new socket (see `suspend` and `resumed`).
 */
class Session {
  /**
   * @param {FerrousClient} client
   * @param {WebSocket} ws
   * @param {Ready} ready
   * @param {number | null} credits
   */
  constructor(client, ws, ready, credits) {
    this.client = client;
    this.ws = ws;
    this.ready = ready;
    /** @type {Map<string, Generation>} */
    this.gens = new Map();
    /** @type {Map<string, Generation>} */
    this.recent = new Map();
    // Every heartbeat we send is answered in order, after everything sent
    // before it was read: an error without id that arrives while a fence is at
    // the head concerns the message sent just before that fence.
    /** @type {Fence[]} */
    this.fences = [];
    this.flow =
      ready.flow_control && credits
        ? { window: credits, batch: Math.max(1, Math.floor(credits / 2)), remaining: credits, buffered: 0, ungranted: 0, advance: 0 }
        : null;
    this.closed = false;
    /** @type {FerrousError | null} */
    this.fatal = null;
    this.lastRx = Date.now();
    /** @type {ReturnType<typeof setInterval> | null} */
    this.timer = null;
    // Resume: the highest `n` received (offered as `last`), numbered messages
    // since the last ack, and the requests of the generations in flight (sent
    // again when a resume shows that the server never read them).
    this.last = 0;
    this.unacked = 0;
    this.unackedBytes = 0;
    /** @type {Map<string, string>} */
    this.starts = new Map();
  }

  /**
   * Take the socket's events over, starting with those that came after ready.
   * @param {number} heartbeatMs @param {Backlog} backlog
   */
  attach(heartbeatMs, backlog) {
    const ws = this.ws;
    ws.onmessage = (ev) => this.onMessage(ev);
    ws.onclose = (ev) => this.onClose(ev);
    // An error fails the connection (a close event usually follows, not always).
    ws.onerror = () => this.lose(new ConnectionError("the connection failed"), 1000, "");
    if (heartbeatMs > 0) {
      this.timer = setInterval(() => this.tick(heartbeatMs), heartbeatMs);
      /** @type {any} */ (this.timer).unref?.();
    }
    for (const ev of backlog) {
      if (ev.type === "close") this.onClose(/** @type {CloseEvent} */ (ev));
      else this.onMessage(/** @type {MessageEvent} */ (ev));
    }
  }

  /** @param {string} text */
  sendRaw(text) {
    if (this.closed) return false;
    try {
      this.ws.send(text);
      return true;
    } catch {
      return false;
    }
  }

  /** @param {object} msg */
  send(msg) {
    return this.sendRaw(JSON.stringify(msg));
  }

  /** @param {Fence} fence */
  fence(fence) {
    this.fences.push(fence);
    this.sendRaw(HEARTBEAT_FRAME);
  }

  /** @param {Generation} gen @param {object} msg */
  start(gen, msg) {
    const text = JSON.stringify(msg);
    const size = utf8Length(text);
    const max = this.ready.limits.max_frame_bytes;
    if (size > max) {
      gen._fail(new TooLargeError(`the request is ${size} bytes; the server accepts at most ${max}`, { id: gen.id }));
      return;
    }
    gen._session = this;
    this.gens.set(gen.id, gen);
    this.starts.set(gen.id, text);
    this.sendRaw(text);
    this.fence({ gen });
  }

  /** @param {Generation} gen */
  remember(gen) {
    this.gens.delete(gen.id);
    this.starts.delete(gen.id);
    this.recent.delete(gen.id);
    this.recent.set(gen.id, gen);
    if (this.recent.size > RECENT) {
      const oldest = this.recent.keys().next().value;
      if (oldest !== undefined) this.recent.delete(oldest);
    }
  }

  /** The application consumed (or the client dropped) `n` bytes of delta text. @param {number} n */
  _consumed(n) {
    const f = this.flow;
    if (!f || n <= 0) return;
    f.buffered -= n;
    const repaid = Math.min(f.advance, n);
    f.advance -= repaid;
    f.ungranted += n - repaid;
    if (this.closed || f.ungranted < f.batch) return;
    const grant = f.ungranted;
    f.ungranted = 0;
    f.remaining += grant;
    this.send({ type: "credit", bytes: grant });
  }

  /**
   * A consumer waits with nothing to read while the server may be paused: the
   * window is held by text other generations have not had read yet. Grant one
   * window in advance so this one can go on (paid back as that text is read).
   */
  _starved() {
    const f = this.flow;
    if (!f || this.closed || f.remaining > 0) return;
    const grant = f.window - f.remaining;
    f.advance += grant - f.ungranted;
    f.ungranted = 0;
    f.remaining += grant;
    this.send({ type: "credit", bytes: grant });
  }

  /** Whether a generation of this session is being read and has nothing to hand over. */
  someoneWaits() {
    for (const gen of this.gens.values()) if (gen._wake) return true;
    return false;
  }

  /** @param {number} ms */
  tick(ms) {
    if (this.closed) return;
    const idle = Date.now() - this.lastRx;
    if (idle >= 2 * ms - 50) {
      this.lose(new ConnectionError(`no message from the server for ${Math.round(idle / 1000)} s`), 4000, "heartbeat timeout");
    } else if (idle >= ms / 2) {
      this.fence({});
    }
  }

  /** @param {MessageEvent} ev */
  onMessage(ev) {
    if (this.closed) return;
    this.lastRx = Date.now();
    if (typeof ev.data !== "string") return; // binary frames are not part of ferrous.v1.json
    /** @type {any} */
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      this.client._emitError(new InternalError("the server sent a message that is not JSON"));
      return;
    }
    if (!msg || typeof msg !== "object") return;
    // Messages about a generation are numbered when the server keeps them for
    // a resume. A resume sends only those after `last`; one at or below it
    // would be a duplicate, and is dropped all the same.
    const numbered = typeof msg.n === "number";
    if (numbered) {
      if (msg.n <= this.last) return;
      this.last = msg.n;
      this.unacked += 1;
      if (msg.type === "audio" && typeof msg.data === "string") this.unackedBytes += (msg.data.length * 3) >> 2;
      const gen = typeof msg.id === "string" ? this.gens.get(msg.id) : undefined;
      if (gen) gen._reached = true;
    }
    this.dispatch(msg);
    // An ack lets the server free its replay buffer: after every end of a
    // generation, and every ACK_EVERY messages of long ones.
    const due = this.unacked >= ACK_EVERY || this.unackedBytes >= ACK_AUDIO_BYTES;
    if (numbered && (msg.type === "done" || msg.type === "error" || due)) {
      this.unacked = 0;
      this.unackedBytes = 0;
      this.send({ type: "ack", n: this.last });
    }
  }

  /** @param {any} msg */
  dispatch(msg) {
    if (this.client._voice.size && typeof msg.id === "string") {
      for (const stream of this.client._voice.values()) {
        if (!stream.owns(msg.id)) continue;
        let n = 0;
        if (msg.type === "delta") n = utf8Length(typeof msg.text === "string" ? msg.text : "");
        if (msg.type === "audio") {
          msg.data = decodeBase64(msg.data);
          n = msg.data.length;
        }
        if (this.flow && n) {
          this.flow.remaining -= n;
          this.flow.buffered += n;
        }
        stream._push(msg, n, this);
        return;
      }
    }
    switch (msg.type) {
      case "queued": {
        const gen = this.gens.get(msg.id);
        if (gen) gen.queued = msg;
        break;
      }
      case "started": {
        const gen = this.gens.get(msg.id);
        if (gen) gen._onStarted(msg);
        break;
      }
      case "restarted": {
        const gen = this.gens.get(msg.id);
        if (gen) gen.restarted = msg;
        break;
      }
      case "delta": {
        const n = utf8Length(typeof msg.text === "string" ? msg.text : "");
        if (this.flow) {
          this.flow.remaining -= n;
          this.flow.buffered += n;
        }
        const gen = this.gens.get(msg.id);
        if (gen) gen._push(msg, n, this);
        else this._consumed(n);
        if (this.flow && this.flow.remaining <= 0 && this.someoneWaits()) this._starved();
        break;
      }
      case "done": {
        const gen = this.gens.get(msg.id);
        if (gen) {
          this.remember(gen);
          gen._onDone(msg);
        } else {
          const old = this.recent.get(msg.id);
          if (old) old._lateDone(msg);
        }
        break;
      }
      case "error":
        this.onError(msg);
        break;
      case "heartbeat": {
        const fence = this.fences.shift();
        if (fence && fence.gen) fence.gen._reached = true;
        if (fence && fence.forget) fence.forget.resolve();
        break;
      }
      default:
        break; // ready again, or a message type of a later revision
    }
  }

  /** @param {ErrorMessage} msg */
  onError(msg) {
    const err = errorFromMessage(msg);
    if (msg.id) {
      const gen = this.gens.get(msg.id);
      // not_found answers a cancel that crossed the done; conflict a request
      // that reused the id of a running generation (the running one goes on).
      if (msg.code === "not_found") return;
      if (msg.code === "conflict" && (!gen || gen.started)) return;
      if (gen) {
        this.remember(gen);
        gen._fail(err);
        return;
      }
      if (!this.recent.has(msg.id)) this.client._emitError(err);
      return;
    }
    const head = this.fences[0];
    if (head && head.gen && (msg.code === "bad_request" || msg.code === "too_large")) {
      const gen = head.gen;
      head.gen = null;
      if (this.gens.get(gen.id) === gen) this.remember(gen);
      err.id = gen.id;
      gen._fail(err);
      return;
    }
    if (head && head.forget && (msg.code === "not_found" || msg.code === "bad_request" || msg.code === "too_large")) {
      const forget = head.forget;
      head.forget = null;
      forget.reject(err);
      return;
    }
    if (msg.code === "unauthorized") this.fatal = err; // the credential expired; a close follows
    this.client._emitError(err);
  }

  /** @param {CloseEvent} ev */
  onClose(ev) {
    if (this.closed) return;
    const why = `the connection closed (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`;
    this.shutdown();
    const resumable = !this.fatal && RESUMABLE_CLOSE.has(ev.code);
    this.client._sessionLost(this, this.fatal ?? new ConnectionError(why), resumable);
  }

  /**
   * The connection failed, or fell silent: give it up.
   * @param {FerrousError} error @param {number} code @param {string} reason
   */
  lose(error, code, reason) {
    if (this.closed) return;
    this.shutdown();
    // While the session resumes, this socket is left as it is: a close frame
    // from the client ends the session on the server (only a drop keeps it),
    // and the server closes the old connection itself when a resume takes over.
    if (!this.client._sessionLost(this, this.fatal ?? error, !this.fatal)) this.closeSocket(code, reason);
  }

  /** @param {number} code @param {string} reason */
  closeSocket(code, reason) {
    try {
      this.ws.close(code, reason);
    } catch {
      // already closing
    }
  }

  shutdown() {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.ws.onmessage = null;
    this.ws.onclose = null;
    this.ws.onerror = NOOP;
  }

  /**
   * The connection dropped and the session is to be resumed: its generations
   * wait. Heartbeats in flight are never answered now; a `forget` among them
   * may or may not have happened, and fails.
   * @param {FerrousError} error
   */
  suspend(error) {
    for (const fence of this.fences) if (fence.forget) fence.forget.reject(error);
    this.fences = [];
  }

  /**
   * The session resumed over `ws`: the server sends what it sent after `last`
   * again, then the live stream.
   * @param {WebSocket} ws @param {Ready} ready
   */
  resumed(ws, ready) {
    this.ws = ws;
    this.ready = ready;
    this.closed = false;
    this.fatal = null;
    this.lastRx = Date.now();
    const f = this.flow;
    if (f) {
      // The server counts a whole window again from this hello. The text still
      // unread here was sent under the old one: reading it grants nothing (it
      // is paid in advance). Text it sends again counts against the new window
      // as it arrives, which errs on the safe side: the server never has less
      // credit than this client believes, so neither side waits for the other.
      f.remaining = f.window;
      f.advance = f.buffered;
      f.ungranted = 0;
    }
  }

  /** After a resume (and what came with its ready): requests the server never read go again. */
  resend() {
    const ready = this.ready;
    // Which requests the server has (running, or with messages to send again).
    // One it does not list never reached it: it is sent again, once. Without
    // the list (an older server), a request that may not have reached it
    // fails, because it can neither be waited for nor safely sent twice.
    const list = /** @type {{ generations?: unknown }} */ (ready).generations;
    const known = Array.isArray(list) ? new Set(list) : null;
    for (const gen of [...this.gens.values()]) {
      if (known ? known.has(gen.id) : gen._reached) {
        if (gen._cancelRequested) this.send({ type: "cancel", id: gen.id });
        continue;
      }
      const text = this.starts.get(gen.id);
      if (!known) {
        this.remember(gen);
        gen._fail(new ConnectionError("the connection dropped before the server confirmed the request", { id: gen.id }));
      } else if (gen._reached) {
        // It reached the server, which no longer lists it: never run it twice.
        this.remember(gen);
        gen._fail(new ResumeExpiredError("the resumed session no longer knows this generation", { id: gen.id, retryable: true }));
      } else if (gen._cancelRequested || text === undefined) {
        this.remember(gen);
        gen._onDone(cancelledDone(gen)); // never ran: it ends here
      } else {
        this.sendRaw(text);
        this.fence({ gen });
      }
    }
  }

  /** @param {FerrousError} error */
  failAll(error) {
    for (const stream of [...this.client._voice.values()]) stream._fail(cloneError(error, stream.id));
    for (const gen of [...this.gens.values()]) {
      this.remember(gen);
      gen._fail(cloneError(error, gen.id));
    }
    for (const fence of this.fences) if (fence.forget) fence.forget.reject(error);
    this.fences = [];
  }
}

/** @param {FerrousError} error @param {string} id */
function cloneError(error, id) {
  const Cls = /** @type {typeof FerrousError} */ (error.constructor);
  return new Cls(error.message, { code: error.code, id, retryable: error.retryable, status: error.status, cause: error.cause });
}

// -- voice ------------------------------------------------------------------------------

/** @param {unknown} b64 @returns {Uint8Array} */
function decodeBase64(b64) {
  if (typeof b64 !== "string") return new Uint8Array(0);
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** @param {Uint8Array} bytes @returns {string} */
function encodeBase64(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

/**
 * A listen or speak stream (see FerrousClient.listen and speak). Iterate it
 * with `for await`: speech, transcript, started, delta, audio and done
 * messages (audio `data` decoded to a Uint8Array), ending with the stream's
 * own done. Audio counts against the flow-control window like text and is
 * granted back as it is read, so a slow player pauses the server's speech.
 */
export class VoiceStream {
  /** @param {FerrousClient} client @param {string} id @param {"listen" | "speak"} kind */
  constructor(client, id, kind) {
    this.id = id;
    this.kind = kind;
    /** @type {string[]} final transcripts, one per utterance */
    this.transcripts = [];
    /** @type {string | null} the answer being spoken (its generation id) */
    this.answering = null;
    /** @type {any} */
    this.done = null;
    this._client = client;
    /** @type {{ msg: any, n: number, session: Session }[]} */
    this._queue = [];
    /** @type {FerrousError | null} */
    this._error = null;
    this._ended = false;
    /** @type {(() => void) | null} */
    this._wake = null;
  }

  /** @param {string} id */
  owns(id) {
    return id === this.id || id.startsWith(`${this.id}.`);
  }

  /**
   * Samples for a listen stream: 16-bit little-endian mono PCM at its rate.
   * Sent as a binary frame when this is the client's only listen stream, else
   * as an audio message.
   * @param {ArrayBuffer | ArrayBufferView} pcm
   */
  send(pcm) {
    const session = this._session();
    const bytes = pcm instanceof ArrayBuffer ? new Uint8Array(pcm) : new Uint8Array(pcm.buffer, pcm.byteOffset, pcm.byteLength);
    const listens = [...this._client._voice.values()].filter((s) => s.kind === "listen");
    if (listens.length === 1 && listens[0] === this) session.ws.send(bytes.slice());
    else session.send(/** @type {any} */ ({ type: "audio", id: this.id, data: encodeBase64(bytes) }));
  }

  /** No more audio: speech in progress is finished and transcribed, then done. */
  end() {
    this._session().send(/** @type {any} */ ({ type: "audio", id: this.id, end: true }));
  }

  /** Close the stream now (its answer too). */
  cancel() {
    if (!this._ended) this._session().send({ type: "cancel", id: this.id });
  }

  /** Stop the answer being spoken, as speech over it would (barge-in). */
  interrupt() {
    if (this.answering) this._session().send({ type: "cancel", id: this.answering });
  }

  _session() {
    const session = this._client._session;
    if (!session) throw new ConnectionError("not connected", { id: this.id });
    return session;
  }

  /** @param {any} msg @param {number} n @param {Session} session */
  _push(msg, n, session) {
    if (msg.type === "error") {
      this._queue.push({ msg, n: 0, session });
      if (msg.id === this.id) this._ended = true;
    } else {
      if (msg.type === "transcript" && msg.final) this.transcripts.push(msg.text);
      if (msg.type === "started" && msg.id !== this.id) this.answering = msg.id;
      if (msg.type === "done" && msg.id === this.answering) this.answering = null;
      if (msg.type === "done" && msg.id === this.id) {
        this.done = msg;
        this._ended = true;
      }
      this._queue.push({ msg, n, session });
    }
    if (this._ended) this._client._voice.delete(this.id);
    this._notify();
  }

  /** @param {FerrousError} error */
  _fail(error) {
    if (this._ended) return;
    this._error = error;
    this._ended = true;
    this._client._voice.delete(this.id);
    this._notify();
  }

  _notify() {
    const wake = this._wake;
    this._wake = null;
    if (wake) wake();
  }

  /** @returns {AsyncIterator<any>} */
  [Symbol.asyncIterator]() {
    return {
      next: async () => {
        for (;;) {
          const item = this._queue.shift();
          if (item) {
            item.session._consumed(item.n);
            if (item.msg.type === "error") throw errorFromMessage(item.msg);
            if (item.msg.type === "done" && item.msg.id === this.id) this._queue.length = 0;
            return { done: false, value: item.msg };
          }
          if (this._error) throw this._error;
          if (this._ended) return { done: true, value: undefined };
          await new Promise((resolve) => {
            this._wake = () => resolve(undefined);
          });
        }
      },
    };
  }

  /** Read to the end: every audio chunk's bytes, joined. */
  async audio() {
    /** @type {Uint8Array[]} */
    const parts = [];
    for await (const msg of this) if (msg.type === "audio") parts.push(msg.data);
    const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }
}

// -- the client -------------------------------------------------------------------------

/**
 * The `statechange` event: `state` is the new state, `error` why, when it was
 * a failure; `resumed` is true when "open" continues the session that was
 * open before (its generations went on), false when it is a new one.
 */
export class StateChangeEvent extends Event {
  /** @param {ConnectionState} state @param {FerrousError | null} error @param {boolean} [resumed] */
  constructor(state, error, resumed = false) {
    super("statechange");
    this.state = state;
    this.error = error;
    this.resumed = resumed;
  }
}

/** The `error` event: a server error that belongs to no generation of this client. */
export class FerrousErrorEvent extends Event {
  /** @param {FerrousError} error */
  constructor(error) {
    super("error");
    this.error = error;
  }
}

/**
 * @typedef {object} ConnectOptions
 * @property {string | URL} [url] ws(s):// or http(s):// URL of `/v1/ws`
 * @property {TokenSource} [token] JWT or API key (or a function returning one, called per connection)
 * @property {string | URL} [ticketUrl] POST here (with the token as Bearer) for a single-use ticket
 * @property {number} [credits] flow control window in bytes
 * @property {any} [WebSocket] WebSocket constructor (default: globalThis.WebSocket)
 * @property {typeof fetch} [fetch] fetch (default: globalThis.fetch)
 * @property {string} [subprotocol] only "ferrous.v1.json"
 * @property {Partial<ReconnectPolicy> | boolean} [reconnect]
 * @property {boolean} [resume] resume the session after a dropped connection when the server offers it (default true)
 * @property {number} [heartbeatMs]
 * @property {number} [openTimeoutMs]
 * @property {string} [clientName]
 * @property {((state: ConnectionState, error: FerrousError | null) => void) | null} [onstatechange]
 * @property {((error: FerrousError) => void) | null} [onerror]
 */

/**
 * A session with a FerrousForge server over one WebSocket, carrying any number
 * of concurrent generations. Create it with `await FerrousClient.connect(...)`.
 */
export class FerrousClient extends EventTarget {
  /**
   * Open a session: resolves once the server answered `hello` with `ready`.
   * @param {ConnectOptions} [options]
   */
  static async connect(options = {}) {
    const client = new FerrousClient(options);
    await client._connectLoop(true);
    return client;
  }

  /** @param {ConnectOptions} [options] */
  constructor(options = {}) {
    super();
    const WS = options.WebSocket ?? /** @type {any} */ (globalThis).WebSocket;
    if (typeof WS !== "function") {
      throw new TypeError(
        "no WebSocket available: on Node 20 run node with --experimental-websocket, or pass the WebSocket option",
      );
    }
    const subprotocol = options.subprotocol ?? SUBPROTOCOL_JSON;
    if (subprotocol !== SUBPROTOCOL_JSON) {
      throw new TypeError(`unsupported subprotocol ${subprotocol}: this client speaks ${SUBPROTOCOL_JSON}`);
    }
    if (options.credits !== undefined && options.credits !== null) {
      if (!Number.isInteger(options.credits) || options.credits < 1 || options.credits > 2 ** 31) {
        throw new TypeError("credits must be an integer from 1 to 2^31");
      }
    }
    /** The WebSocket URL in use. */
    this.url = wsUrl(options.url);
    /** @type {Ready | null} The server's Ready message of the current (or last) session. */
    this.ready = null;
    /** @type {((state: ConnectionState, error: FerrousError | null) => void) | null} */
    this.onstatechange = options.onstatechange ?? null;
    /** @type {((error: FerrousError) => void) | null} */
    this.onerror = options.onerror ?? null;
    this._WebSocket = WS;
    this._fetch = options.fetch ?? (globalThis.fetch ? globalThis.fetch.bind(globalThis) : null);
    this._token = options.token ?? null;
    this._ticketUrl = options.ticketUrl ? String(options.ticketUrl) : null;
    this._credits = options.credits ?? null;
    this._subprotocol = subprotocol;
    this._reconnect = reconnectPolicy(options.reconnect);
    this._resume = options.resume ?? true;
    /** @type {Session | null} The session whose connection dropped, while it is being resumed. */
    this._resuming = null;
    this._heartbeatMs = options.heartbeatMs ?? null;
    this._openTimeoutMs = options.openTimeoutMs ?? 10000;
    this._clientName = options.clientName ?? CLIENT_NAME;
    /** @type {ConnectionState} */ this._state = "connecting";
    /** @type {Session | null} */ this._session = null;
    /** @type {{ gen: Generation, msg: object }[]} */ this._pending = [];
    /** @type {Map<string, Generation>} */ this._active = new Map();
    /** @type {Map<string, VoiceStream>} */ this._voice = new Map();
    this._closed = false;
    this._nextId = 0;
    /** @type {{ timer: ReturnType<typeof setTimeout>, resolve: () => void } | null} */ this._sleeping = null;
    /** @type {WebSocket | null} */ this._opening = null;
  }

  /** "connecting" | "open" | "reconnecting" | "closed" */
  get state() {
    return this._state;
  }

  /** Bytes of delta text received and not yet read, over all generations. */
  get bufferedBytes() {
    let n = 0;
    for (const gen of this._active.values()) n += gen.bufferedBytes;
    return n;
  }

  /**
   * Continue (or start) a conversation the server keeps.
   * @param {{ model: string, messages: string | ChatMessage[], conversation?: string | null, options?: Options | null, signal?: AbortSignal, id?: string, tokenIds?: boolean, priority?: number, adapters?: (string | AdapterChoice)[] | null }} params
   */
  chat(params) {
    const p = params ?? /** @type {any} */ ({});
    return this._submit("chat", p, (id) => {
      /** @type {ChatRequest} */
      const msg = { type: "chat", id, model: checkModel(id, p.model), messages: cleanMessages(id, p.messages) };
      if (p.conversation !== undefined && p.conversation !== null) {
        if (typeof p.conversation !== "string" || !CONVERSATION_RE.test(p.conversation)) {
          throw new BadRequestError("conversation must be 1-128 characters of A-Z a-z 0-9 . _ : -", { id });
        }
        msg.conversation = p.conversation;
      }
      const options = cleanOptions(id, p.options);
      if (options) msg.options = options;
      if (p.tokenIds) msg.token_ids = true;
      if (p.priority !== undefined && p.priority !== 0) msg.priority = checkPriority(id, p.priority);
      if (p.adapters !== undefined && p.adapters !== null) msg.adapters = cleanAdapters(id, p.adapters);
      return msg;
    });
  }

  /**
   * Open a listen stream on speech-recognition `model` for 16-bit mono PCM at
   * `rate`: send audio with `stream.send()`, iterate the stream (`for await`)
   * for speech edges, transcripts and, with `reply`, each spoken answer's
   * started / delta / audio / done. It ends with the stream's own done.
   * @param {{ model: string, rate?: number, reply?: Record<string, unknown>, vad?: Record<string, unknown>, language?: string, partials?: boolean, id?: string }} params
   */
  listen(params) {
    const p = params ?? /** @type {any} */ ({});
    /** @type {Record<string, unknown>} */
    const msg = { type: "listen", id: this._voiceId(p.id), model: p.model, rate: p.rate ?? 16000 };
    if (p.reply) msg.reply = p.reply;
    if (p.vad) msg.vad = p.vad;
    if (p.language) msg.language = p.language;
    if (p.partials === false) msg.partials = false;
    return this._startVoice(msg, "listen");
  }

  /**
   * `text` spoken by speech-synthesis `model`: iterate its audio messages
   * (`data` is a Uint8Array of 16-bit PCM at `rate` with format pcm16).
   * @param {{ model: string, text: string, speed?: number, format?: string, seed?: number, id?: string }} params
   */
  speak(params) {
    const p = params ?? /** @type {any} */ ({});
    /** @type {Record<string, unknown>} */
    const msg = { type: "speak", id: this._voiceId(p.id), model: p.model, text: p.text };
    if (p.speed !== undefined) msg.speed = p.speed;
    if (p.format !== undefined) msg.format = p.format;
    if (p.seed !== undefined) msg.seed = p.seed;
    return this._startVoice(msg, "speak");
  }

  /** @param {unknown} id */
  _voiceId(id) {
    if (typeof id === "string") return id;
    let next;
    do next = `v${++this._nextId}`;
    while (this._active.has(next) || this._voice.has(next));
    return next;
  }

  /** @param {Record<string, unknown>} msg @param {"listen" | "speak"} kind */
  _startVoice(msg, kind) {
    const id = String(msg.id);
    const stream = new VoiceStream(this, id, kind);
    const session = this._session;
    if (!session || this._closed) {
      stream._fail(new ConnectionError("not connected", { id, retryable: !this._closed }));
    } else if (this._voice.has(id) || this._active.has(id)) {
      stream._fail(new ConflictError(`generation ${id} is still running`, { id }));
    } else {
      this._voice.set(id, stream);
      session.send(/** @type {any} */ (msg));
    }
    return stream;
  }

  /**
   * Complete a raw prompt (no chat template, nothing remembered).
   * @param {{ model: string, prompt: string, options?: Options | null, signal?: AbortSignal, id?: string, tokenIds?: boolean, priority?: number, adapters?: (string | AdapterChoice)[] | null }} params
   */
  generate(params) {
    const p = params ?? /** @type {any} */ ({});
    return this._submit("generate", p, (id) => {
      if (typeof p.prompt !== "string") throw new BadRequestError("prompt must be a string", { id });
      /** @type {GenerateRequest} */
      const msg = { type: "generate", id, model: checkModel(id, p.model), prompt: p.prompt };
      const options = cleanOptions(id, p.options);
      if (options) msg.options = options;
      if (p.tokenIds) msg.token_ids = true;
      if (p.priority !== undefined && p.priority !== 0) msg.priority = checkPriority(id, p.priority);
      if (p.adapters !== undefined && p.adapters !== null) msg.adapters = cleanAdapters(id, p.adapters);
      return msg;
    });
  }

  /**
   * Delete a conversation the server keeps. Rejects with NotFoundError when
   * this user has no such conversation.
   * @param {string} conversation
   * @returns {Promise<void>}
   */
  forget(conversation) {
    if (typeof conversation !== "string" || !CONVERSATION_RE.test(conversation)) {
      return Promise.reject(new BadRequestError("conversation must be 1-128 characters of A-Z a-z 0-9 . _ : -"));
    }
    const session = this._session;
    if (!session) return Promise.reject(new ConnectionError("not connected", { retryable: !this._closed }));
    return new Promise((resolve, reject) => {
      session.send({ type: "forget", conversation });
      session.fence({ forget: { resolve, reject } });
    });
  }

  /**
   * Close the session (code 1000). Running generations end on the server; their
   * iterators reject with a non-retryable ConnectionError. Resolves once the
   * socket closed (or after a short wait).
   * @returns {Promise<void>}
   */
  async close() {
    if (this._closed && !this._session && !this._opening) {
      this._setState("closed", null);
      return;
    }
    this._closed = true;
    const error = new ConnectionError("the client was closed", { retryable: false });
    if (this._sleeping) {
      clearTimeout(this._sleeping.timer);
      this._sleeping.resolve();
      this._sleeping = null;
    }
    if (this._opening) {
      try {
        this._opening.close(1000);
      } catch {
        // not open yet
      }
    }
    this._failPending(error);
    const suspended = this._resuming;
    this._resuming = null;
    if (suspended) {
      // Its old socket was left open for the resume: a close frame (1000) now
      // tells the server, if it still hears it, to end the session.
      suspended.failAll(error);
      suspended.closeSocket(1000, "");
    }
    const session = this._session;
    this._session = null;
    if (session) {
      session.shutdown();
      session.failAll(error);
      const ws = session.ws;
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, 2000);
        ws.onclose = () => {
          clearTimeout(timer);
          resolve(undefined);
        };
        try {
          ws.close(1000);
        } catch {
          clearTimeout(timer);
          resolve(undefined);
        }
      });
      ws.onclose = null;
    }
    this._setState("closed", null);
  }

  // -- internals ----------------------------------------------------------------------

  /**
   * @param {"chat" | "generate"} kind
   * @param {any} p
   * @param {(id: string) => object} build
   */
  _submit(kind, p, build) {
    let id = p.id;
    if (id === undefined || id === null) {
      do id = `g${++this._nextId}`;
      while (this._active.has(id));
    }
    const conversation = kind === "chat" && typeof p.conversation === "string" ? p.conversation : null;
    const gen = new Generation(this, String(id), kind, typeof p.model === "string" ? p.model : "", conversation);
    if (typeof id !== "string" || !ID_RE.test(id)) {
      gen._fail(new BadRequestError("id must be 1-64 characters of A-Z a-z 0-9 . _ : -", { id: String(id) }));
      return gen;
    }
    if (this._active.has(id)) {
      gen._fail(new ConflictError(`generation ${id} is still running`, { id }));
      return gen;
    }
    let msg;
    try {
      msg = build(id);
    } catch (e) {
      gen._fail(e instanceof FerrousError ? e : new BadRequestError(String(e), { id }));
      return gen;
    }
    if (this._closed) {
      gen._fail(new ConnectionError("the client is closed", { id, retryable: false }));
      return gen;
    }
    this._active.set(id, gen);
    if (this._session) this._session.start(gen, msg);
    else this._pending.push({ gen, msg });
    if (p.signal) gen._watch(p.signal);
    return gen;
  }

  /** @param {Generation} gen */
  _forgetActive(gen) {
    if (this._active.get(gen.id) === gen) this._active.delete(gen.id);
  }

  /** @param {Generation} gen */
  _cancel(gen) {
    if (gen.finished || gen._cancelRequested) return;
    gen._cancelRequested = true;
    const i = this._pending.findIndex((p) => p.gen === gen);
    if (i >= 0) {
      this._pending.splice(i, 1);
      gen._onDone(cancelledDone(gen)); // never sent: it ends here
      return;
    }
    const session = gen._session;
    if (session && !session.closed) session.send({ type: "cancel", id: gen.id });
  }

  /** @param {ConnectionState} state @param {FerrousError | null} error @param {boolean} [resumed] */
  _setState(state, error, resumed = false) {
    if (this._state === state) return;
    this._state = state;
    if (this.onstatechange) {
      try {
        this.onstatechange(state, error);
      } catch (e) {
        rethrowLater(e);
      }
    }
    this.dispatchEvent(new StateChangeEvent(state, error, resumed));
  }

  /** @param {FerrousError} error */
  _emitError(error) {
    if (this.onerror) {
      try {
        this.onerror(error);
      } catch (e) {
        rethrowLater(e);
      }
    }
    this.dispatchEvent(new FerrousErrorEvent(error));
  }

  /** @param {FerrousError} error */
  _failPending(error) {
    const pending = this._pending;
    this._pending = [];
    for (const { gen } of pending) gen._fail(cloneError(error, gen.id));
  }

  /** @param {number} ms */
  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this._sleeping = null;
        resolve(undefined);
      }, ms);
      this._sleeping = { timer, resolve: () => resolve(undefined) };
    });
  }

  /**
   * Open a session, retrying transport failures and retryable refusals with
   * backoff. The first connection tries at once; reconnections wait first.
   * @param {boolean} initial
   */
  async _connectLoop(initial) {
    const policy = this._reconnect ?? { attempts: 1, minDelayMs: 0, maxDelayMs: 0 };
    /** @type {unknown} */
    let last = null;
    for (let attempt = 0; attempt < policy.attempts; attempt++) {
      if (!initial || attempt > 0) await this._sleep(backoffDelay(initial ? attempt - 1 : attempt, policy));
      if (this._closed) break;
      try {
        const { ws, ready, backlog } = await this._handshake(null);
        const session = new Session(this, ws, ready, this._credits);
        if (this._closed) {
          session.closeSocket(1000, "");
          break;
        }
        this._install(session, false, backlog);
        return;
      } catch (e) {
        last = e;
        if (this._closed || !shouldRetry(e)) break;
      }
    }
    const error = this._closed
      ? new ConnectionError("the client was closed", { retryable: false })
      : last instanceof FerrousError
        ? last
        : new ConnectionError(String(last), { cause: last });
    this._closed = true;
    this._failPending(error);
    this._setState("closed", error);
    throw error;
  }

  /** @param {Session} session @param {boolean} resumed @param {Backlog} backlog */
  _install(session, resumed, backlog) {
    this._session = session;
    this.ready = session.ready;
    const hb = this._heartbeatMs ?? Math.round((session.ready.limits?.heartbeat_interval ?? 20) * 1000);
    session.attach(hb, backlog);
    if (this._session !== session) return; // it closed right after ready
    if (resumed) session.resend();
    this._setState("open", null, resumed);
    const pending = this._pending;
    this._pending = [];
    for (const { gen, msg } of pending) {
      if (!gen.finished) session.start(gen, msg);
    }
  }

  /**
   * The connection of `session` is gone. Resume the session when the server
   * keeps it (`resumable`: lost without a deliberate close); else fail its
   * generations and reconnect (or close) by the reconnect policy.
   * @param {Session} session @param {FerrousError} error @param {boolean} resumable
   * @returns {boolean} whether a resume began (its socket is then left to it)
   */
  _sessionLost(session, error, resumable) {
    if (session !== this._session) return false;
    this._session = null;
    const ready = session.ready;
    if (!this._closed && resumable && this._resume && ready.resume_token && (ready.resume_window ?? 0) > 0) {
      session.suspend(error);
      this._resuming = session;
      this._setState("reconnecting", error);
      this._resumeLoop(session, error).catch(NOOP);
      return true;
    }
    session.failAll(error);
    if (this._closed) {
      this._setState("closed", error);
      return false;
    }
    if (!this._reconnect) {
      this._closed = true;
      this._failPending(error);
      this._setState("closed", error);
      return false;
    }
    this._setState("reconnecting", error);
    this._connectLoop(false).catch(NOOP);
    return false;
  }

  /**
   * Reconnect and resume `session` within the server's resume window. The
   * first attempt goes at once (most drops are brief), the next after the
   * reconnect policy's waits, or short ones when reconnection is off: resuming
   * continues the same session rather than opening another, and the window,
   * not a number of attempts, bounds it. An attempt started within the window
   * runs to its end; the server decides whether it came in time.
   * @param {Session} session @param {FerrousError} error
   */
  async _resumeLoop(session, error) {
    const windowMs = (session.ready.resume_window ?? 0) * 1000;
    const deadline = Date.now() + windowMs;
    const policy = this._reconnect ?? RESUME_BACKOFF;
    const token = /** @type {string} */ (session.ready.resume_token);
    /** @type {unknown} */
    let last = error;
    for (let attempt = 0; ; attempt++) {
      if (attempt > 0) {
        const left = deadline - Date.now();
        if (left <= 0) break;
        await this._sleep(Math.min(backoffDelay(attempt - 1, policy), left));
      }
      if (this._resuming !== session || Date.now() >= deadline) break;
      let opened;
      try {
        opened = await this._handshake({ token, last: session.last });
      } catch (e) {
        last = e;
        if (this._resuming !== session || !shouldRetry(e)) break;
        continue;
      }
      if (this._resuming !== session) {
        // Closed meanwhile: a close frame ends the session on the server.
        try {
          opened.ws.close(1000);
        } catch {
          // not open
        }
        return;
      }
      this._resuming = null;
      session.closeSocket(1000, ""); // the old connection: the server has let go of it
      if (opened.ready.resumed) {
        session.resumed(opened.ws, opened.ready);
        this._install(session, true, opened.backlog);
        return;
      }
      // Refused (resume_expired, or forbidden), and a new session opened on
      // the same connection: what was in flight is lost, and fails once.
      const why = opened.refusal?.message || "the server did not resume the session";
      session.failAll(new ResumeExpiredError(why, { retryable: true, cause: opened.refusal ?? undefined }));
      this._install(new Session(this, opened.ws, opened.ready, this._credits), false, opened.backlog);
      return;
    }
    if (this._resuming !== session) return; // closed: close() failed what was in flight
    this._resuming = null;
    session.closeSocket(1000, "");
    const lost =
      last instanceof FerrousError && !shouldRetry(last)
        ? last
        : new ConnectionError(`the connection was lost and could not be resumed within ${windowMs / 1000} s`, {
            cause: last,
          });
    session.failAll(lost);
    if (!this._reconnect || !shouldRetry(lost)) {
      this._closed = true;
      this._failPending(lost);
      this._setState("closed", lost);
      return;
    }
    this._connectLoop(false).catch(NOOP); // a new session, by the reconnect policy
  }

  /**
   * One WebSocket handshake followed by hello/ready. With `resume`, the hello
   * asks to resume that session; a refusal (an error, then a new session's
   * ready) comes back as `refusal`.
   * @param {{ token: string, last: number } | null} resume
   * @param {boolean} [confirm] on a refusal while the server answers HTTP, try once more
   *   before calling it a credential problem (see `refused` below)
   * @returns {Promise<{ ws: WebSocket, ready: Ready, refusal: FerrousError | null, backlog: Backlog }>}
   */
  async _handshake(resume, confirm = true) {
    const token = await resolveToken(this._token);
    let url = this.url;
    const protocols = [this._subprotocol];
    if (this._ticketUrl) {
      const base = pageUrl() ?? httpBaseUrl(this.url) + "/";
      const ticketUrl = new URL(this._ticketUrl, base).toString();
      const ticket = await fetchTicket(ticketUrl, { token, fetch: this._fetch ?? undefined });
      url = withQuery(url, "ticket", ticket);
    } else if (token) {
      protocols.push(TOKEN_SUBPROTOCOL_PREFIX + token);
    }
    if (this._closed) throw new ConnectionError("the client was closed", { retryable: false });
    /** @type {WebSocket} */
    let ws;
    try {
      ws = new this._WebSocket(url, protocols);
    } catch (cause) {
      throw new ConnectionError(`cannot open a WebSocket to ${this.url}: ${String(cause)}`, {
        retryable: false,
        cause,
      });
    }
    ws.binaryType = "arraybuffer";
    this._opening = ws;
    try {
      return await new Promise((resolve, reject) => {
        let opened = false;
        let settled = false;
        /** @type {FerrousError | null} */
        let refusal = null;
        /** @param {FerrousError} err */
        const fail = (err) => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          ws.onopen = null;
          ws.onmessage = null;
          ws.onclose = null;
          try {
            ws.close(1000);
          } catch {
            // not open
          }
          reject(err);
        };
        const timer = setTimeout(
          () => fail(new ConnectionError(`no session within ${this._openTimeoutMs} ms`)),
          this._openTimeoutMs,
        );
        // Refused before the upgrade. Browsers do not expose the HTTP status:
        // if the server answers over HTTP, the refusal was about the
        // credential (401); otherwise it cannot be reached. A server that was
        // starting up answers the probe but was not listening for the
        // handshake a moment before: one more handshake tells the two apart.
        const refused = () => {
          settled = true;
          clearTimeout(timer);
          ws.onopen = null;
          ws.onmessage = null;
          ws.onclose = null;
          ws.onerror = NOOP;
          this._probe().then((up) => {
            if (up && confirm) {
              this._handshake(resume, false).then(resolve, reject);
              return;
            }
            reject(
              up
                ? new UnauthorizedError(
                    "the server refused the WebSocket handshake (missing, invalid or expired credential)",
                  )
                : new ConnectionError(`server unreachable: ${this.url}`),
            );
          });
        };
        // An error fails the connection; some implementations send no close event after it.
        ws.onerror = () => {
          if (settled) return;
          if (opened) fail(new ConnectionError("the connection failed during the handshake"));
          else refused();
        };
        ws.onopen = () => {
          opened = true;
          /** @type {Hello} */
          const hello = { type: "hello", protocol: PROTOCOL_VERSION, client: this._clientName };
          if (this._credits) hello.credits = this._credits;
          if (resume) {
            hello.resume = resume.token;
            hello.last = resume.last;
          }
          try {
            ws.send(JSON.stringify(hello));
          } catch (cause) {
            fail(new ConnectionError("could not send hello", { cause }));
          }
        };
        ws.onmessage = (ev) => {
          if (typeof ev.data !== "string") return;
          /** @type {any} */
          let msg;
          try {
            msg = JSON.parse(ev.data);
          } catch {
            fail(new InternalError("the server sent a message that is not JSON"));
            return;
          }
          if (msg && msg.type === "ready") {
            settled = true;
            clearTimeout(timer);
            ws.onopen = null;
            /** @type {Backlog} */
            const backlog = [];
            ws.onmessage = (e) => backlog.push(e);
            ws.onclose = (e) => backlog.push(e);
            resolve({ ws, ready: msg, refusal, backlog });
          } else if (msg && msg.type === "error") {
            if (resume && !msg.id && (msg.code === "resume_expired" || msg.code === "forbidden")) {
              refusal = errorFromMessage(msg); // a new session's ready follows
              return;
            }
            fail(errorFromMessage(msg));
          }
        };
        ws.onclose = (ev) => {
          if (settled) return;
          if (opened) {
            fail(new ConnectionError(`the connection closed during the handshake (code ${ev.code})`));
            return;
          }
          refused();
        };
      });
    } finally {
      if (this._opening === ws) this._opening = null;
    }
  }

  /** Whether the server answers `GET /healthz`. */
  async _probe() {
    const f = this._fetch;
    if (!f) return false;
    try {
      const res = await f(`${httpBaseUrl(this.url)}/healthz`, {
        mode: "no-cors",
        cache: "no-store",
        signal: timeoutSignal(5000),
      });
      return res.type === "opaque" || res.ok;
    } catch {
      return false;
    }
  }
}
