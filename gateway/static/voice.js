// Voice on the chat page: the microphone as a listen stream, answers spoken aloud.
//
// Push to talk: hold the button (or Space outside the composer) while speaking;
// letting go ends the stream, so the last words are transcribed and answered.
// Hands-free: the stream stays open; the server tells where each utterance ends
// and answers it; speaking over an answer stops it (the server cancels it, and
// the page drops the audio it still had queued).
//
// The microphone is read by an AudioWorklet (./pcm-worklet.js) at the audio
// context's own rate and sent as 16-bit PCM in binary frames; answers' audio
// (16-bit PCM at the voice's rate) is scheduled back to back with Web Audio.

/** Plays 16-bit PCM chunks one after the other; stop() silences what is queued. */
export class Player {
  constructor() {
    this.ctx = null;
    this.next = 0;
    /** @type {Set<AudioBufferSourceNode>} */
    this.playing = new Set();
    this.chunks = 0;
  }

  /** @param {Uint8Array} bytes @param {number} rate */
  play(bytes, rate) {
    this.ctx ??= new AudioContext();
    const samples = new Int16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >> 1);
    if (!samples.length) return;
    const buffer = this.ctx.createBuffer(1, samples.length, rate);
    const out = buffer.getChannelData(0);
    for (let i = 0; i < samples.length; i++) out[i] = samples[i] / 32768;
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.ctx.destination);
    const at = Math.max(this.ctx.currentTime + 0.02, this.next);
    source.start(at);
    this.next = at + buffer.duration;
    this.playing.add(source);
    source.onended = () => this.playing.delete(source);
    this.chunks += 1;
  }

  stop() {
    for (const source of this.playing) {
      try {
        source.stop();
      } catch {
        // not started yet, or already ended
      }
    }
    this.playing.clear();
    this.next = 0;
  }
}

/** The microphone, read as 16-bit PCM frames at the context's rate. */
export class Microphone {
  /** @param {(pcm: Int16Array) => void} onFrame */
  constructor(onFrame) {
    this.onFrame = onFrame;
    this.ctx = null;
    this.media = null;
    this.node = null;
  }

  async start() {
    this.media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
    });
    this.ctx = new AudioContext();
    await this.ctx.audioWorklet.addModule(new URL("./pcm-worklet.js", import.meta.url));
    const source = this.ctx.createMediaStreamSource(this.media);
    this.node = new AudioWorkletNode(this.ctx, "pcm-frames");
    this.node.port.onmessage = (event) => this.onFrame(event.data);
    source.connect(this.node);
    return this.ctx.sampleRate;
  }

  async stop() {
    this.node?.disconnect();
    for (const track of this.media?.getTracks() ?? []) track.stop();
    await this.ctx?.close();
    this.ctx = this.media = this.node = null;
  }
}
