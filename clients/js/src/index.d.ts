// Types of ferrous-client (src/index.js). Message types come from protocol.d.ts,
// generated from protocol/schema.json.

import type {
  AdapterChoice,
  ChatMessage,
  Delta,
  Done,
  ErrorCode,
  ErrorMessage,
  Options,
  Queued,
  Ready,
  Started,
} from "./protocol.js";

export type {
  Ack,
  AdapterChoice,
  Cancel,
  Chat,
  ChatMessage,
  ClientMessage,
  ClientMessageMap,
  ClientMessageType,
  Credit,
  Delta,
  Done,
  ErrorCode,
  ErrorMessage,
  Forget,
  Generate,
  Heartbeat,
  Hello,
  Limits,
  Options,
  Queued,
  Ready,
  ServerHeartbeat,
  ServerMessage,
  ServerMessageMap,
  ServerMessageType,
  Started,
  Timings,
  Usage,
} from "./protocol.js";

export declare const VERSION: string;
export declare const PROTOCOL_VERSION: 1;
export declare const SUBPROTOCOL_JSON: "ferrous.v1.json";
export declare const TOKEN_SUBPROTOCOL_PREFIX: "ferrous.token.";

/** "connecting" | "open" | "reconnecting" | "closed" */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

export interface ReconnectPolicy {
  /** Handshakes tried before giving up (default 5). */
  attempts: number;
  /** First wait, doubled per attempt (default 200). */
  minDelayMs: number;
  /** Longest wait (default 5000). Each wait is drawn from [w/2, w]. */
  maxDelayMs: number;
}

/** A credential, or a function returning one (called for every connection). */
export type TokenSource = string | (() => string | null | undefined | Promise<string | null | undefined>);

/** The subset of the WebSocket constructor this client uses. */
export interface WebSocketConstructor {
  new (url: string, protocols?: string | string[]): WebSocket;
}

export interface ConnectOptions {
  /**
   * The WebSocket endpoint: `ws://HOST:PORT/v1/ws` (http(s) URLs are turned
   * into ws(s), relative ones resolved against the page). Default: the page's
   * own server in a browser, `ws://127.0.0.1:11480/v1/ws` elsewhere.
   */
  url?: string | URL;
  /**
   * A JWT or API key. Without `ticketUrl` it is offered as the subprotocol
   * `ferrous.token.<token>`; with `ticketUrl` it is sent as
   * `Authorization: Bearer` to obtain a ticket.
   */
  token?: TokenSource;
  /**
   * POST here for a single-use ticket before every connection (usually the
   * server's `/v1/tickets`); it goes in the URL as `?ticket=`. Relative URLs
   * resolve against the page, or against the server outside a browser.
   */
  ticketUrl?: string | URL;
  /** Turn flow control on with a window of this many bytes of delta text. */
  credits?: number;
  /** A WebSocket constructor (default `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructor;
  /** A fetch function (default `globalThis.fetch`), for tickets and the handshake probe. */
  fetch?: typeof fetch;
  /** Only "ferrous.v1.json" is supported. */
  subprotocol?: "ferrous.v1.json";
  /** Reconnection after a dropped connection (and retries of the first one); false turns it off. */
  reconnect?: Partial<ReconnectPolicy> | boolean;
  /**
   * Resume the session after a dropped connection when the server offers it
   * (`ready.resume_token`), within its `ready.resume_window`: generations in
   * flight go on as if nothing happened. Tried even with `reconnect: false`
   * (the window bounds it). Default true.
   */
  resume?: boolean;
  /**
   * Interval of protocol heartbeats sent while the connection is idle; with no
   * message for two intervals the connection counts as dead. Default: the
   * server's `limits.heartbeat_interval`; 0 turns it off.
   */
  heartbeatMs?: number;
  /** How long one handshake (WebSocket open + hello/ready) may take (default 10000). */
  openTimeoutMs?: number;
  /** The `client` field of hello. */
  clientName?: string;
  onstatechange?: ((state: ConnectionState, error: FerrousError | null) => void) | null;
  onerror?: ((error: FerrousError) => void) | null;
}

interface RequestBase {
  /** A name from `ready.models`, or one the server resolves on first use. */
  model: string;
  options?: Options | null;
  /** Aborting cancels the generation (see Generation.cancel). */
  signal?: AbortSignal;
  /** The generation id (default: g1, g2, …); 1–64 characters of A-Z a-z 0-9 . _ : - */
  id?: string;
  /** Ask for `token_ids` on every delta. */
  tokenIds?: boolean;
  /** Scheduling class, -100..100 (default 0), capped by the credential's class. */
  priority?: number;
  /**
   * LoRA adapters for this generation instead of the model's own: models made with
   * ADAPTER over the same base, by name (scale 1) or `{ name, scale }`; `[]`: none.
   */
  adapters?: (string | AdapterChoice)[] | null;
}

/**
 * A message as `chat` takes it: `images` may also be data: URLs or bytes (sent as
 * base64), for a vision language model.
 */
export interface ChatInput extends Omit<ChatMessage, "images"> {
  images?: (string | Uint8Array | ArrayBuffer)[] | null;
}

export interface ChatParams extends RequestBase {
  /** Messages appended to the conversation; a string is one user message. */
  messages: string | ChatInput[];
  /** The conversation to continue; absent: a new one (its id is in `generation.conversation`). */
  conversation?: string | null;
}

export interface GenerateParams extends RequestBase {
  prompt: string;
}

export declare class StateChangeEvent extends Event {
  readonly state: ConnectionState;
  readonly error: FerrousError | null;
  /** True when "open" continues the session that was open before (it was resumed). */
  readonly resumed: boolean;
  constructor(state: ConnectionState, error: FerrousError | null, resumed?: boolean);
}

export declare class FerrousErrorEvent extends Event {
  readonly error: FerrousError;
  constructor(error: FerrousError);
}

export interface FerrousClientEventMap {
  statechange: StateChangeEvent;
  error: FerrousErrorEvent;
}

export declare class FerrousClient extends EventTarget {
  /** Open a session; resolves once the server answered hello with ready. */
  static connect(options?: ConnectOptions): Promise<FerrousClient>;
  /** Use FerrousClient.connect(). */
  private constructor(options?: ConnectOptions);
  /** The WebSocket URL in use. */
  readonly url: string;
  /**
   * The Ready message of the current (or last) session: session, user, models,
   * limits, flow_control, resume_token, resume_window; `resumed` is true after
   * a reconnection that resumed the session.
   */
  readonly ready: Ready;
  readonly state: ConnectionState;
  /** Bytes of delta text received and not yet read, over all generations. */
  readonly bufferedBytes: number;
  onstatechange: ((state: ConnectionState, error: FerrousError | null) => void) | null;
  /** Server errors that belong to no generation of this client. */
  onerror: ((error: FerrousError) => void) | null;
  chat(params: ChatParams): Generation;
  generate(params: GenerateParams): Generation;
  /** Delete a conversation the server keeps; rejects with NotFoundError when there is none. */
  forget(conversation: string): Promise<void>;
  /** Open a listen stream: send 16-bit mono PCM, iterate speech edges, transcripts and spoken answers. */
  listen(params: ListenParams): VoiceStream;
  /** Speak `text` with a speech-synthesis model: iterate its audio chunks. */
  speak(params: SpeakParams): VoiceStream;
  /** Close with 1000; running generations reject with a non-retryable ConnectionError. */
  close(): Promise<void>;
  addEventListener<K extends keyof FerrousClientEventMap>(
    type: K,
    listener: (event: FerrousClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof FerrousClientEventMap>(
    type: K,
    listener: (event: FerrousClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

/**
 * One generation: `for await (const delta of gen)` yields its deltas in order.
 * Leaving the loop early cancels it. Errors for it are thrown from the loop
 * after the text that came before them.
 */
export declare class Generation implements AsyncIterable<Delta> {
  private constructor();
  readonly id: string;
  readonly kind: "chat" | "generate";
  readonly model: string;
  /** The conversation id (chat): the one requested, then the server's from started/done. */
  readonly conversation: string | null;
  /** The Started message, once it arrived. */
  readonly started: Started | null;
  /** Its place while it waits for room on the model; null once started. */
  readonly queued: Queued | null;
  /** The Done message once finished: finish_reason, usage, timings. */
  readonly done: Done | null;
  /** The error that ended this generation, if any. */
  readonly error: FerrousError | null;
  /** Bytes of delta text received but not yet handed to the application. */
  readonly bufferedBytes: number;
  /** True once nothing more will come from the server. */
  readonly finished: boolean;
  readonly finishReason: string | null;
  /** Ask the server to stop; the iteration ends after its done ("cancelled"). */
  cancel(): void;
  /** Read to the end and return the whole text. */
  text(): Promise<string>;
  [Symbol.asyncIterator](): AsyncGenerator<Delta, void, undefined>;
}

export interface FerrousErrorInit {
  code?: ErrorCode | "connection";
  id?: string | null;
  retryable?: boolean;
  status?: number | null;
  cause?: unknown;
}

export declare class FerrousError extends Error {
  static defaultCode: ErrorCode | "connection";
  static defaultRetryable: boolean;
  constructor(message: string, init?: FerrousErrorInit);
  /** The protocol error code; "connection" for transport failures. */
  code: ErrorCode | "connection";
  /** The generation this error belongs to, when there is one. */
  id: string | null;
  /** Whether the same request may succeed later. */
  retryable: boolean;
  /** The HTTP status, when an HTTP response carried the error. */
  status: number | null;
}
export declare class BadRequestError extends FerrousError {}
export declare class UnauthorizedError extends FerrousError {}
export declare class ForbiddenError extends FerrousError {}
export declare class NotFoundError extends FerrousError {}
export declare class ModelNotFoundError extends FerrousError {}
export declare class ConflictError extends FerrousError {}
export declare class TooLargeError extends FerrousError {}
export declare class RateLimitedError extends FerrousError {}
export declare class OverloadedError extends FerrousError {}
export declare class CancelledError extends FerrousError {}
export declare class StalledError extends FerrousError {}
export declare class EngineError extends FerrousError {}
export declare class InternalError extends FerrousError {}
/**
 * The session could not be resumed after a dropped connection: the generations
 * in flight are lost (retryable: the client goes on with a new session).
 */
export declare class ResumeExpiredError extends FerrousError {}
/** The transport failed: unreachable server, dropped connection, timeout, closed client. */
export declare class ConnectionError extends FerrousError {
  code: "connection";
}

/** The typed error for a server error message; unknown codes become InternalError. */
export declare function errorFromMessage(
  msg: Pick<ErrorMessage, "code" | "message"> & Partial<Pick<ErrorMessage, "id" | "retryable">> | { code: string; message?: string; id?: string | null; retryable?: boolean },
  status?: number | null,
): FerrousError;

/** POST to a ticket endpoint and return the single-use ticket. */
export declare function fetchTicket(
  ticketUrl: string | URL,
  options?: { token?: string | null; fetch?: typeof fetch },
): Promise<string>;

/** UTF-8 length of a string (what flow control counts). */
export declare function utf8Length(s: string): number;

/** The wait before reconnection attempt `n` (0-based). */
export declare function backoffDelay(n: number, policy: ReconnectPolicy): number;

/** The server's HTTP base URL for a WebSocket URL. */
export declare function httpBaseUrl(wsUrl: string): string;

export interface ListenParams {
  model: string;
  /** Samples a second of the PCM sent (8000-48000). */
  rate?: number;
  /** Answer each utterance: chat model, voice, and the rest of the protocol's Reply. */
  reply?: { model: string; voice: string; conversation?: string; instructions?: string; speed?: number; format?: string; barge_in?: boolean; options?: Options };
  vad?: { threshold?: number; silence_ms?: number; min_speech_ms?: number; pad_ms?: number };
  language?: string;
  partials?: boolean;
  id?: string;
}

export interface SpeakParams {
  model: string;
  text: string;
  speed?: number;
  format?: string;
  seed?: number;
  id?: string;
}

/** A message of a voice stream; `data` of an audio message is decoded to bytes. */
export type VoiceMessage = { type: string; id: string; data?: Uint8Array; [key: string]: unknown };

export declare class VoiceStream implements AsyncIterable<VoiceMessage> {
  readonly id: string;
  readonly kind: "listen" | "speak";
  /** Final transcripts, one per utterance. */
  readonly transcripts: string[];
  /** The answer being spoken (its generation id), if any. */
  readonly answering: string | null;
  /** The stream's own done, once it came. */
  readonly done: Done | null;
  send(pcm: ArrayBuffer | ArrayBufferView): void;
  end(): void;
  cancel(): void;
  interrupt(): void;
  audio(): Promise<Uint8Array>;
  [Symbol.asyncIterator](): AsyncIterator<VoiceMessage>;
}
