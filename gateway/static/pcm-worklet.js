// The chat page's microphone reader: the first input channel, as 16-bit PCM
// frames of about 20 ms, posted to the page (which sends them to the server).
class PcmFrames extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frame = new Int16Array(Math.round(sampleRate / 50));
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        this.frame[this.filled++] = s < 0 ? s * 32768 : s * 32767;
        if (this.filled === this.frame.length) {
          this.port.postMessage(this.frame.slice());
          this.filled = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("pcm-frames", PcmFrames);
