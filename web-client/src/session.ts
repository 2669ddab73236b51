// A participant in a room: signaling through the reconnecting connection, a publisher
// peer connection (camera + microphone, three simulcast layers) and a subscriber peer
// connection (everyone else). Uses WebRTC but not the document: the view gets callbacks.
import {
  type JoinedMessage,
  type Layer,
  type ParticipantInfo,
  type ServerMessage,
  type SubscribedTrack,
  type TrackAnnouncement,
  type TrackInfo,
  FATAL_CODES,
  LAYER_RIDS,
  describeError,
} from './protocol';
import { type AttemptResult, type ConnectionState, type ReconnectPolicy, type StateDetail, Reconnector } from './reconnect';
import { SignalingClient, SignalingError } from './signaling';
import { type StatsSummary, entriesOf, summarize } from './stats';
import {
  type NodeTarget,
  type TransportFactory,
  type TransportKind,
  type TransportMode,
  browserTransportFactory,
  connectWithFallback,
  targetFromUrl,
  transportOrder,
} from './transport';

/** What the view is told. */
export interface SessionView {
  state(state: ConnectionState, detail: StateDetail): void;
  /** The set of other participants changed. */
  participants(list: ParticipantInfo[]): void;
  /** A remote media track arrived for a participant. */
  remoteTrack(participantId: string, trackId: string, track: MediaStreamTrack): void;
  /** A remote track is gone. */
  remoteTrackGone(trackId: string): void;
  /** The local camera/microphone stream (for the self view). */
  localStream(stream: MediaStream | null): void;
  /** Mute state of any track changed. */
  muted(trackId: string, muted: boolean): void;
  /** A non-fatal problem worth showing. */
  notice(text: string): void;
}

/** Session settings. */
export interface SessionOptions {
  token: string;
  /** Fetches a fresh token before a reconnect (dev mode); the current one otherwise. */
  refreshToken?: () => Promise<string>;
  nodes: NodeTarget[];
  transport: TransportMode;
  publish: boolean;
  policy?: ReconnectPolicy;
  transportFactory?: TransportFactory;
}

/** The simulcast encodings: rids q/h/f at quarter, half and full resolution. */
export const SIMULCAST_ENCODINGS: RTCRtpEncodingParameters[] = [
  { rid: LAYER_RIDS.low, scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: LAYER_RIDS.medium, scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: LAYER_RIDS.high, scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

const PING_INTERVAL_MS = 5000;

/** One participant's session. */
export class Session {
  readonly reconnector: Reconnector;
  /** Transport of the current signaling connection. */
  transportKind: TransportKind | null = null;
  transportUrl = '';
  participantId = '';
  room = '';
  /** Signaling RTT from ping/pong, ms. */
  signalingRttMs: number | undefined;
  pub: RTCPeerConnection | null = null;
  sub: RTCPeerConnection | null = null;
  /** Errors seen, for tests and diagnostics. */
  readonly errors: string[] = [];
  /** How many times a session was restored on another node / resumed. */
  restoredCount = 0;
  resumedCount = 0;

  private sig: SignalingClient | null = null;
  private token: string;
  private local: MediaStream | null = null;
  private localAsked = false;
  /** Own published tracks: source → info. */
  private own = new Map<string, TrackInfo>();
  private ownMuted = new Map<string, boolean>();
  private others = new Map<string, ParticipantInfo>();
  /** Subscriber mid → track. */
  private subTracks = new Map<string, SubscribedTrack>();
  private layers = new Map<string, Layer | null>();
  private subQueue: Promise<void> = Promise.resolve();
  private pingTimer: ReturnType<typeof setInterval> | null = null;
  private lastStats: StatsSummary | undefined;
  private leaving = false;
  private publishing: Promise<void> | null = null;

  constructor(
    private readonly opts: SessionOptions,
    private readonly view: SessionView,
  ) {
    this.token = opts.token;
    this.reconnector = new Reconnector({
      nodes: opts.nodes,
      policy: opts.policy,
      attempt: (target, resume) => this.attempt(target, resume),
      sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
      random: Math.random,
      onstate: (s, d) => this.view.state(s, d),
      onjoined: (j, target, resumed) => this.onJoined(j, target, resumed),
    });
  }

  /** Connects and joins; never rejects (failures end in state `disconnected`). */
  async start(): Promise<void> {
    await this.reconnector.start();
  }

  get state(): ConnectionState {
    return this.reconnector.state;
  }

  // ---- connecting ----

  private async attempt(target: NodeTarget, resume: string | undefined): Promise<AttemptResult> {
    this.dropSignaling();
    if (this.opts.refreshToken && this.reconnector.state === 'reconnecting') {
      try {
        this.token = await this.opts.refreshToken();
      } catch {
        /* keep the old token; the node will say if it expired */
      }
    }
    const order = transportOrder(this.opts.transport, typeof WebTransport !== 'undefined');
    let sig: SignalingClient;
    try {
      const { transport, failures } = await connectWithFallback(order, target, this.opts.transportFactory ?? browserTransportFactory);
      for (const f of failures) this.view.notice(`${f.kind} failed (${f.error}); fell back to ${transport.kind}`);
      sig = new SignalingClient(transport);
    } catch (e) {
      return { kind: 'failed', message: `cannot reach the node at ${target.signalUrl ?? target.httpOrigin}: ${e instanceof Error ? e.message : String(e)}` };
    }
    try {
      const outcome = await sig.joinRoom(this.token, resume);
      if (outcome.kind === 'redirect') {
        sig.close();
        return { kind: 'redirect', url: outcome.url };
      }
      const j = outcome.joined;
      const sameParticipant = resume !== undefined && j.participant_id === this.participantId;
      // New peer connections for a restored or a new participant, before the node's
      // first subscriber offer (queued in `sig`) is handled.
      if (j.restored || !sameParticipant) this.resetMedia();
      this.participantId = j.participant_id;
      this.room = j.room;
      this.attach(sig);
      return { kind: 'joined', joined: j };
    } catch (e) {
      sig.close();
      if (e instanceof SignalingError) {
        this.errors.push(e.code);
        if (FATAL_CODES.has(e.code)) return { kind: 'fatal', message: describeError(e.code, e.message) };
        if (e.code === 'resume_failed') return { kind: 'resume_failed', message: describeError(e.code, e.message) };
        return { kind: 'failed', message: e.message };
      }
      return { kind: 'failed', message: String(e) };
    }
  }

  private attach(sig: SignalingClient): void {
    this.sig = sig;
    this.transportKind = sig.transport.kind;
    this.transportUrl = sig.transport.url;
    sig.onevent = (m) => this.onEvent(sig, m);
    sig.onprotocolerror = (e) => this.view.notice(`ignored a message: ${e.message}`);
    sig.onclose = (reason) => {
      if (this.sig !== sig) return;
      this.sig = null;
      this.stopPing();
      if (this.leaving) return;
      void this.reconnector.lost(reason);
    };
  }

  /** Closes the current signaling on purpose (no reconnect from its close). */
  private dropSignaling(): void {
    const s = this.sig;
    this.sig = null;
    this.stopPing();
    if (s) s.close();
  }

  private startPing(): void {
    this.stopPing();
    this.pingTimer = setInterval(() => {
      const s = this.sig;
      if (!s) return;
      s.ping().then(
        (rtt) => { this.signalingRttMs = rtt; },
        () => { /* a lost pong shows as the connection closing */ },
      );
    }, PING_INTERVAL_MS);
  }

  private stopPing(): void {
    if (this.pingTimer) clearInterval(this.pingTimer);
    this.pingTimer = null;
  }

  private onJoined(joined: JoinedMessage, _target: NodeTarget, resumed: boolean): void {
    this.others = new Map(joined.participants.map((p) => [p.participant_id, p]));
    this.view.participants([...this.others.values()]);
    this.startPing();
    const ok = (p: Promise<void>) =>
      p.catch((e: unknown) => {
        this.errors.push(String(e));
        this.view.notice(`media set-up failed: ${e instanceof Error ? e.message : String(e)}`);
      });
    if (joined.restored) {
      // A new node rebuilt us from the event log: new peer connections (reset in
      // `attempt`), the tracks re-announced with their previous ids.
      this.restoredCount++;
      if (this.opts.publish) void ok(this.publish(true));
    } else if (resumed) {
      // Resumed on the same node: the media connections carry on (a publisher
      // connection that never came up or failed is offered again).
      this.resumedCount++;
      if (this.opts.publish && (!this.pub || ['failed', 'closed'].includes(this.pub.connectionState))) {
        this.pub?.close();
        this.pub = null;
        void ok(this.publish(false));
      }
    } else {
      // A fresh participant (first join, or the resume token had expired).
      this.own.clear();
      if (this.opts.publish) void ok(this.publish(false));
    }
  }

  private resetMedia(): void {
    for (const id of this.subTracks.values()) this.view.remoteTrackGone(id.track_id);
    this.subTracks.clear();
    this.pub?.close();
    this.sub?.close();
    this.pub = null;
    this.sub = null;
    this.subQueue = Promise.resolve();
  }

  // ---- publishing ----

  private async localMedia(): Promise<MediaStream | null> {
    if (this.local || this.localAsked) return this.local;
    this.localAsked = true;
    try {
      this.local = await navigator.mediaDevices.getUserMedia({
        audio: true,
        video: { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
      });
    } catch (e) {
      this.view.notice(`camera/microphone unavailable (${e instanceof Error ? e.message : String(e)}); watching only`);
      this.local = null;
    }
    this.view.localStream(this.local);
    return this.local;
  }

  private publish(restore: boolean): Promise<void> {
    const run = async () => {
      const stream = await this.localMedia();
      const sig = this.sig;
      if (!stream || !sig) return;
      const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
      this.pub = pc;
      this.watchIce(pc, 'publisher');
      const announced: { t: RTCRtpTransceiver; kind: 'audio' | 'video' }[] = [];
      for (const track of stream.getTracks()) {
        const kind = track.kind === 'video' ? 'video' : 'audio';
        const init: RTCRtpTransceiverInit = { direction: 'sendonly', streams: [stream] };
        if (kind === 'video') init.sendEncodings = SIMULCAST_ENCODINGS.map((e) => ({ ...e }));
        announced.push({ t: pc.addTransceiver(track, init), kind });
      }
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      const tracks: TrackAnnouncement[] = announced.map(({ t, kind }) => {
        const source = kind === 'video' ? 'camera' : 'microphone';
        const a: TrackAnnouncement = {
          mid: t.mid ?? '',
          kind,
          source,
          layers: kind === 'video' ? ['low', 'medium', 'high'] : [],
        };
        const prev = this.own.get(source);
        if (restore && prev) a.track_id = prev.track_id;
        return a;
      });
      const answer = await sig.offer(pc.localDescription?.sdp ?? '', tracks);
      if (this.pub !== pc) return; // replaced meanwhile
      await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp });
      this.own.clear();
      for (const info of answer.tracks) this.own.set(info.source || info.kind, info);
      // Re-apply mutes the user chose before a restore.
      for (const [source, muted] of this.ownMuted) {
        const info = this.own.get(source);
        if (info && muted) sig.send({ type: 'mute', track_id: info.track_id, muted: true });
        if (info) this.view.muted(info.track_id, muted);
      }
    };
    const p = (this.publishing ?? Promise.resolve()).then(run, run);
    this.publishing = p.catch(() => {});
    return p;
  }

  /** Mutes or unmutes the own camera (`video`) or microphone (`audio`). */
  setMuted(kind: 'audio' | 'video', muted: boolean): void {
    const source = kind === 'video' ? 'camera' : 'microphone';
    this.ownMuted.set(source, muted);
    for (const t of this.local?.getTracks() ?? []) if (t.kind === kind) t.enabled = !muted;
    const info = this.own.get(source);
    if (info) {
      this.sig?.send({ type: 'mute', track_id: info.track_id, muted });
      this.view.muted(info.track_id, muted);
    }
  }

  isMuted(kind: 'audio' | 'video'): boolean {
    return this.ownMuted.get(kind === 'video' ? 'camera' : 'microphone') === true;
  }

  /** Own published tracks by source. */
  ownTracks(): TrackInfo[] {
    return [...this.own.values()];
  }

  // ---- subscribing and room events ----

  private onEvent(sig: SignalingClient, m: ServerMessage): void {
    switch (m.type) {
      case 'offer':
        this.subQueue = this.subQueue.then(() => this.onSubscriberOffer(sig, m.sdp, m.tracks)).catch((e: unknown) => {
          this.errors.push(String(e));
          this.view.notice(`subscriber negotiation failed: ${e instanceof Error ? e.message : String(e)}`);
        });
        break;
      case 'participant_joined':
        this.others.set(m.participant.participant_id, m.participant);
        this.view.participants([...this.others.values()]);
        break;
      case 'participant_left':
        this.others.delete(m.participant_id);
        this.view.participants([...this.others.values()]);
        break;
      case 'track_published': {
        const p = this.others.get(m.track.participant_id);
        if (p) {
          p.tracks = p.tracks.filter((t) => t.track_id !== m.track.track_id).concat(m.track);
          this.view.participants([...this.others.values()]);
        }
        break;
      }
      case 'track_unpublished':
        for (const p of this.others.values()) p.tracks = p.tracks.filter((t) => t.track_id !== m.track_id);
        this.view.remoteTrackGone(m.track_id);
        break;
      case 'track_muted':
        for (const p of this.others.values()) for (const t of p.tracks) if (t.track_id === m.track_id) t.muted = m.muted;
        this.view.muted(m.track_id, m.muted);
        break;
      case 'layer_changed':
        this.layers.set(m.track_id, m.layer);
        break;
      case 'migrate': {
        let target: NodeTarget | undefined;
        try {
          target = m.url ? targetFromUrl(m.url) : undefined;
        } catch {
          target = undefined;
        }
        this.dropSignaling();
        void this.reconnector.migrate(target, m.reason);
        break;
      }
      case 'left':
        if (!this.leaving) {
          this.dropSignaling();
          this.resetMedia();
          this.reconnector.leave();
          this.view.state('disconnected', { message: `The node ended the session (${m.reason}).` });
        }
        break;
      case 'error':
        this.errors.push(m.code);
        this.view.notice(describeError(m.code, m.message));
        break;
      default:
        break;
    }
  }

  private async onSubscriberOffer(sig: SignalingClient, sdp: string, tracks: SubscribedTrack[]): Promise<void> {
    if (!this.sub) {
      const pc = new RTCPeerConnection({ bundlePolicy: 'max-bundle' });
      this.sub = pc;
      this.watchIce(pc, 'subscriber');
      pc.ontrack = (ev) => {
        const mid = ev.transceiver.mid ?? '';
        const info = this.subTracks.get(mid);
        if (info) this.view.remoteTrack(info.participant_id, info.track_id, ev.track);
      };
    }
    const pc = this.sub;
    const before = new Map(this.subTracks);
    for (const t of tracks) this.subTracks.set(t.mid, t);
    await pc.setRemoteDescription({ type: 'offer', sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    sig.send({ type: 'answer', sdp: pc.localDescription?.sdp ?? '' });
    // Sections the node stopped using: their tracks are gone.
    const now = new Set(tracks.map((t) => t.mid));
    for (const [mid, t] of before) {
      if (!now.has(mid) && tracks.length > 0) {
        this.subTracks.delete(mid);
        this.view.remoteTrackGone(t.track_id);
      }
    }
    // A track for a mid seen before may be re-used for a new track id.
    for (const tr of pc.getTransceivers()) {
      const info = tr.mid ? this.subTracks.get(tr.mid) : undefined;
      const old = tr.mid ? before.get(tr.mid) : undefined;
      if (info && old && old.track_id !== info.track_id && tr.receiver.track) {
        this.view.remoteTrackGone(old.track_id);
        this.view.remoteTrack(info.participant_id, info.track_id, tr.receiver.track);
      }
    }
  }

  private watchIce(pc: RTCPeerConnection, which: string): void {
    pc.addEventListener('connectionstatechange', () => {
      if (pc.connectionState !== 'failed' || this.leaving) return;
      if (pc !== this.pub && pc !== this.sub) return;
      // The media path is gone: a resume cannot revive DTLS, so join afresh.
      this.view.notice(`${which} media connection failed; rejoining`);
      const s = this.sig;
      if (s) s.send({ type: 'leave' });
      this.reconnector.resumeToken = undefined;
      this.dropSignaling();
      this.resetMedia();
      if (this.reconnector.state === 'connected') void this.reconnector.lost(`${which} media connection failed`);
    });
  }

  // ---- leaving and stats ----

  /** Leaves the room for good. */
  leave(): void {
    this.leaving = true;
    const s = this.sig;
    if (s) s.send({ type: 'leave' });
    this.sig = null;
    this.stopPing();
    setTimeout(() => s?.close(), 200);
    this.resetMedia();
    for (const t of this.local?.getTracks() ?? []) t.stop();
    this.local = null;
    this.view.localStream(null);
    this.reconnector.leave();
  }

  /** Test/diagnostic hook: closes the signaling transport as if the network dropped it. */
  dropTransportForTest(): void {
    this.sig?.transport.close();
  }

  /** One stats sample of both connections. */
  async stats(): Promise<StatsSummary & { transport: TransportKind | null; signalingRttMs?: number; state: ConnectionState }> {
    const [p, s] = await Promise.all([
      this.pub ? this.pub.getStats().catch(() => undefined) : Promise.resolve(undefined),
      this.sub ? this.sub.getStats().catch(() => undefined) : Promise.resolve(undefined),
    ]);
    const tracks = new Map([...this.subTracks].map(([mid, t]) => [mid, t.track_id]));
    const sum = summarize(entriesOf(p), entriesOf(s), performance.now(), this.lastStats, tracks, this.layers);
    this.lastStats = sum;
    return { ...sum, transport: this.transportKind, signalingRttMs: this.signalingRttMs, state: this.state };
  }

  /** Participant id of a subscribed track. */
  participantOfTrack(trackId: string): string | undefined {
    for (const t of this.subTracks.values()) if (t.track_id === trackId) return t.participant_id;
    return undefined;
  }
}
