// The softphone's audio, off the main thread. Both processors resample linearly between the
// AudioContext's rate (the device's, often 48 kHz) and the call's PCM16 rate (the session's).

const FRAME_SECONDS = 0.02;

// Microphone → 20 ms PCM16 little-endian frames at `rate`, posted with their RMS level.
class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.rate = options.processorOptions.rate;
    this.step = sampleRate / this.rate; // input samples per output sample
    this.t = 0; // next output instant, in input samples from the current block's start
    this.prev = 0; // last input sample of the previous block (index -1)
    this.muted = false;
    this.size = Math.round(this.rate * FRAME_SECONDS);
    this.frame = new Int16Array(this.size);
    this.filled = 0;
    this.energy = 0;
    this.port.onmessage = (event) => { this.muted = Boolean(event.data.muted); };
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    const n = input.length;
    while (this.t < n - 1) {
      const i = Math.floor(this.t);
      const f = this.t - i;
      const a = i < 0 ? this.prev : input[i];
      const b = input[i + 1];
      let s = this.muted ? 0 : a + (b - a) * f;
      s = Math.max(-1, Math.min(1, s));
      this.energy += s * s;
      this.frame[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      if (this.filled === this.size) {
        const level = Math.sqrt(this.energy / this.size);
        this.port.postMessage({ pcm: this.frame.buffer, level }, [this.frame.buffer]);
        this.frame = new Int16Array(this.size);
        this.filled = 0;
        this.energy = 0;
      }
      this.t += this.step;
    }
    this.t -= n;
    this.prev = input[n - 1];
    return true;
  }
}

// PCM16 frames at `rate` (posted by the page as they arrive) → the speaker. A short jitter
// buffer: playback waits for `prebuffer` seconds of audio, and skips ahead when more than
// `maxBuffer` piles up, so the delay stays bounded.
class Playback extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { rate, prebuffer = 0.04, maxBuffer = 0.2 } = options.processorOptions;
    this.step = rate / sampleRate; // source samples per output sample
    this.ring = new Float32Array(rate * 2);
    this.written = 0; // source samples received
    this.read = 0; // source position played (fractional)
    this.playing = false;
    this.prebuffer = prebuffer * rate;
    this.maxBuffer = maxBuffer * rate;
    this.port.onmessage = (event) => this.push(new Int16Array(event.data));
  }

  push(pcm) {
    const ring = this.ring;
    for (let k = 0; k < pcm.length; k++) {
      ring[(this.written + k) % ring.length] = pcm[k] / 0x8000;
    }
    this.written += pcm.length;
    if (this.written - this.read > this.maxBuffer) {
      this.read = this.written - this.prebuffer; // fell behind: drop the backlog
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    const ring = this.ring;
    for (let k = 0; k < out.length; k++) {
      const available = this.written - this.read;
      if (!this.playing && available >= this.prebuffer) this.playing = true;
      if (!this.playing || available < 2) {
        this.playing = false;
        out[k] = 0;
        continue;
      }
      const i = Math.floor(this.read);
      const f = this.read - i;
      const a = ring[i % ring.length];
      const b = ring[(i + 1) % ring.length];
      out[k] = a + (b - a) * f;
      this.read += this.step;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    return true;
  }
}

registerProcessor("callbot-capture", Capture);
registerProcessor("callbot-playback", Playback);
