import type { Transport, TransportKind } from '../src/sdk/transport';

/** An in-memory transport: records what the client sends, lets the test answer. */
export class FakeTransport implements Transport {
  sent: unknown[] = [];
  closed = false;
  onmessage: (data: string | Uint8Array) => void = () => {};
  onclose: (reason: string) => void = () => {};
  constructor(readonly kind: TransportKind = 'websocket', readonly url = 'ws://fake/signal') {}
  /** Called with each message the client sends (a scripted node answers here). */
  respond: (msg: Record<string, unknown>) => void = () => {};
  send(text: string): void {
    const msg = JSON.parse(text) as Record<string, unknown>;
    this.sent.push(msg);
    queueMicrotask(() => this.respond(msg));
  }
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.onclose('closed');
  }
  /** The node sends a message. */
  deliver(msg: unknown): void {
    this.onmessage(JSON.stringify(msg));
  }
  /** The network drops the connection. */
  drop(): void {
    this.close();
  }
}

// ---- WebRTC fakes for the SDK's Room (node has no WebRTC) ----

/** A media track stand-in. */
export class FakeTrack {
  enabled = true;
  stopped = false;
  private listeners: Record<string, (() => void)[]> = {};
  constructor(readonly kind: 'audio' | 'video', readonly id = `${kind}-${Math.random().toString(36).slice(2, 8)}`) {}
  stop(): void { this.stopped = true; }
  addEventListener(type: string, fn: () => void): void { (this.listeners[type] ??= []).push(fn); }
  /** The user ended it (e.g. the browser's "Stop sharing"). */
  end(): void { for (const f of this.listeners.ended ?? []) f(); }
}

/** A media stream stand-in. */
export class FakeStream {
  constructor(readonly tracks: FakeTrack[]) {}
  getTracks(): FakeTrack[] { return this.tracks; }
  getVideoTracks(): FakeTrack[] { return this.tracks.filter((t) => t.kind === 'video'); }
  getAudioTracks(): FakeTrack[] { return this.tracks.filter((t) => t.kind === 'audio'); }
}

interface FakeTransceiver {
  mid: string | null;
  direction: string;
  sender: { track: FakeTrack | null; replaceTrack(t: FakeTrack | null): Promise<void> };
  receiver: { track: FakeTrack };
  init?: unknown;
}

/** A peer connection stand-in: mids in order, SDP as `a=mid:` lines, `ontrack` on remote offers. */
export class FakePeerConnection {
  static all: FakePeerConnection[] = [];
  connectionState = 'new';
  iceConnectionState = 'new';
  /** `restartIce()` calls. */
  iceRestarts = 0;
  localDescription: { type: string; sdp: string } | null = null;
  remoteDescription: { type: string; sdp: string } | null = null;
  ontrack: ((ev: { transceiver: FakeTransceiver; track: FakeTrack }) => void) | null = null;
  readonly transceivers: FakeTransceiver[] = [];
  private listeners: Record<string, (() => void)[]> = {};
  constructor(readonly config: unknown) { FakePeerConnection.all.push(this); }
  addTransceiver(track: FakeTrack, init?: unknown): FakeTransceiver {
    const t: FakeTransceiver = {
      mid: null,
      direction: 'sendonly',
      sender: { track, replaceTrack: async (n) => { t.sender.track = n; } },
      receiver: { track: new FakeTrack(track.kind) },
      init,
    };
    this.transceivers.push(t);
    return t;
  }
  async createOffer(): Promise<{ type: string; sdp: string }> {
    this.transceivers.forEach((t, i) => { t.mid ??= String(i); });
    return { type: 'offer', sdp: `v=0\r\n${this.transceivers.map((t) => `a=mid:${t.mid}`).join('\r\n')}` };
  }
  async createAnswer(): Promise<{ type: string; sdp: string }> { return { type: 'answer', sdp: 'v=0\r\nanswer' }; }
  async setLocalDescription(d: { type: string; sdp: string }): Promise<void> { this.localDescription = d; }
  async setRemoteDescription(d: { type: string; sdp: string }): Promise<void> {
    this.remoteDescription = d;
    if (d.type !== 'offer') return;
    for (const line of d.sdp.split(/\r?\n/)) {
      const m = /^a=mid:(.+)$/.exec(line.trim());
      if (!m || this.transceivers.some((t) => t.mid === m[1])) continue;
      const kind = /^a=mid:.*a/.test(line) ? 'audio' : 'video';
      const t: FakeTransceiver = {
        mid: m[1] ?? null,
        direction: 'recvonly',
        sender: { track: null, replaceTrack: async () => {} },
        receiver: { track: new FakeTrack(kind) },
      };
      this.transceivers.push(t);
      this.ontrack?.({ transceiver: t, track: t.receiver.track });
    }
  }
  getTransceivers(): FakeTransceiver[] { return this.transceivers; }
  async getStats(): Promise<Map<string, unknown>> { return new Map(); }
  addEventListener(type: string, fn: () => void): void { (this.listeners[type] ??= []).push(fn); }
  close(): void { this.connectionState = 'closed'; }
  restartIce(): void { this.iceRestarts++; }
  /** ICE moves to `state` (`connected`, `disconnected`, `failed`, …). */
  setIce(state: string): void {
    this.iceConnectionState = state;
    for (const f of this.listeners.iceconnectionstatechange ?? []) f();
  }
  /** The media path failed (ICE/DTLS). */
  fail(): void { this.connectionState = 'failed'; for (const f of this.listeners.connectionstatechange ?? []) f(); }
}
