// A participant in a room: signaling through the reconnecting connection, a publisher
// peer connection (camera + microphone with three simulcast layers, and a screen share)
// and a subscriber peer connection (everyone else). Uses WebRTC but not the document:
// the application listens to typed events.
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
import { ActiveSpeakerDetector, audioEnergies } from './speaker';
import { type StatsSummary, entriesOf, summarize } from './stats';
import { Emitter } from './events';
import { DEFAULT_ICE_RESTART_POLICY, type IceRestartPolicy, IceRestartWatch } from './restart';
import {
  type NodeTarget,
  type TransportFactory,
  type TransportKind,
  type TransportMode,
  browserTransportFactory,
  connectWithFallback,
  originOfSignalUrl,
  targetFromUrl,
  transportOrder,
} from './transport';

/** Events a {@link Room} emits; listen with {@link Room.on}. */
export interface RoomEvents {
  /** The connection state changed (`connecting`, `connected`, `reconnecting`, `disconnected`, `left`). */
  state: { state: ConnectionState; detail: StateDetail };
  /** The set of other participants (or their tracks or mute state) changed. */
  participants: ParticipantInfo[];
  /** A remote media track arrived. `source` is `camera`, `microphone` or `screen`. */
  trackSubscribed: RemoteTrack;
  /** A remote track is gone. */
  trackUnsubscribed: { trackId: string };
  /** The local camera/microphone stream changed (null when stopped). */
  localStream: MediaStream | null;
  /** The local screen share started (a stream) or stopped (null). */
  localScreen: MediaStream | null;
  /** A track was muted or unmuted; `local` for the own tracks. */
  muted: { trackId: string; muted: boolean; participantId: string; local: boolean };
  /** The loudest participant changed (`null`: nobody speaks). The own id when it is us. */
  activeSpeaker: { participantId: string | null };
  /** The node ended the session (`reason` is the node's, e.g. `replaced`). */
  ended: { reason: string; message: string };
  /** A non-fatal problem worth showing. */
  notice: string;
}

/** A remote track as delivered by {@link RoomEvents.trackSubscribed}. */
export interface RemoteTrack {
  /** The publisher. */
  participantId: string;
  /** The room-unique track id. */
  trackId: string;
  /** `camera`, `microphone`, `screen`, … as the publisher announced it. */
  source: string;
  /** The media, ready for a `<video>` or `<audio>` element. */
  track: MediaStreamTrack;
}

/** How the room gets WebRTC objects and local media; tests inject fakes. */
export interface RtcEnvironment {
  /** Creates a peer connection (default: `new RTCPeerConnection(config)`). */
  createPeerConnection(config: RTCConfiguration): RTCPeerConnection;
  /** Local camera and microphone (default: `navigator.mediaDevices.getUserMedia`). */
  getUserMedia(constraints: MediaStreamConstraints): Promise<MediaStream>;
  /** A screen to share (default: `navigator.mediaDevices.getDisplayMedia`). */
  getDisplayMedia(constraints: DisplayMediaStreamOptions): Promise<MediaStream>;
  /** Whether the browser has WebTransport. */
  webTransport: boolean;
}

/** The browser's WebRTC and media devices. */
export function browserRtc(): RtcEnvironment {
  return {
    createPeerConnection: (config) => new RTCPeerConnection(config),
    getUserMedia: (c) => navigator.mediaDevices.getUserMedia(c),
    getDisplayMedia: (c) => navigator.mediaDevices.getDisplayMedia(c),
    webTransport: typeof WebTransport !== 'undefined',
  };
}

/** Room settings. */
export interface RoomOptions {
  /** Access token (JWT) naming room, identity and grants. */
  token: string;
  /**
   * Fetches a fresh token: before a reconnect, and before the current token expires
   * (sent as `refresh`, so the node keeps the session; without it the node ends the
   * session when the token expires).
   */
  refreshToken?: () => Promise<string>;
  /** Nodes to try in turn (default: the page's own origin). */
  nodes?: NodeTarget[];
  /** `auto` (WebTransport, WebSocket fallback), `wt` or `ws` (default `auto`). */
  transport?: TransportMode;
  /** Publish camera and microphone (default true). */
  publish?: boolean;
  /**
   * The local media to publish: a stream (e.g. from a pre-join preview), or
   * constraints for getUserMedia (default: any camera and microphone, 720p).
   */
  media?: MediaStream | MediaStreamConstraints;
  /** Backoff and bounds of reconnects. */
  policy?: ReconnectPolicy;
  /**
   * After giving up on an unreachable node, probe its `/healthz` this often (ms) and
   * rejoin when it answers; 0 turns probing off (default 5000).
   */
  probeIntervalMs?: number;
  /** Signaling transports (tests inject fakes). */
  transportFactory?: TransportFactory;
  /** WebRTC and media devices (tests inject fakes). */
  rtc?: RtcEnvironment;
  /** Probe used while disconnected (default: `fetch(origin + '/healthz')`). */
  probe?: (target: NodeTarget) => Promise<boolean>;
  /** How often (ms) audio levels are sampled for the active speaker (default 500; 0: off). */
  speakerIntervalMs?: number;
  /**
   * When a peer connection whose media path died while signaling stayed up gets an ICE
   * restart (same participant, no rejoin); see {@link IceRestartPolicy}.
   */
  iceRestart?: Partial<IceRestartPolicy>;
}

/** The simulcast encodings: rids q/h/f at quarter, half and full resolution. */
export const SIMULCAST_ENCODINGS: RTCRtpEncodingParameters[] = [
  { rid: LAYER_RIDS.low, scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: LAYER_RIDS.medium, scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: LAYER_RIDS.high, scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

const PING_INTERVAL_MS = 5000;
/** How often (ms) the media paths are checked for an ICE restart while signaling is up. */
const ICE_CHECK_MS = 500;
/** Refresh this long before the token expires (a short-lived token: at half its remaining life). */
const REFRESH_LEAD_MS = 60_000;
/** Fewest ms between two refreshes (a token that is about to expire is not retried in a loop). */
const MIN_REFRESH_MS = 5_000;

/** Seconds until the JWT `token` expires, from its `exp` claim (undefined when absent or unreadable). */
export function tokenExpiresInSecs(token: string, nowMs: number = Date.now()): number | undefined {
  const part = token.split('.')[1];
  if (!part) return undefined;
  try {
    const json = atob(part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '='));
    const exp = (JSON.parse(json) as { exp?: unknown }).exp;
    return typeof exp === 'number' ? exp - nowMs / 1000 : undefined;
  } catch {
    return undefined;
  }
}

/** When to refresh a token that expires in `expiresInSecs`: ms from now. */
export function refreshDelayMs(expiresInSecs: number): number {
  const left = expiresInSecs * 1000;
  return Math.max(MIN_REFRESH_MS, left - REFRESH_LEAD_MS, left / 2);
}

/** Human sentences for the reasons a node ends a session (`left.reason`). */
export function describeLeftReason(reason: string): string {
  switch (reason) {
    case 'replaced':
      return 'You joined this room with the same identity from another page or device; this page left the room.';
    case 'removed':
    case 'kicked':
      return 'You were removed from the room.';
    case 'shutdown':
      return 'The node is shutting down.';
    default:
      return `The node ended the session (${reason || 'no reason given'}).`;
  }
}

async function defaultProbe(target: NodeTarget): Promise<boolean> {
  const origin = target.httpOrigin ?? (target.signalUrl ? originOfSignalUrl(target.signalUrl) : undefined);
  if (!origin) return false;
  try {
    const res = await fetch(`${origin}/healthz`, { cache: 'no-store' });
    return res.ok;
  } catch {
    return false;
  }
}

/**
 * One participant in a room: connects (WebTransport, falling back to WebSocket), joins,
 * publishes, subscribes to everyone, reconnects by itself, and emits {@link RoomEvents}.
 *
 * ```ts
 * const room = new Room({ token });
 * room.on('trackSubscribed', ({ participantId, track }) => show(participantId, track));
 * room.on('state', ({ state, detail }) => status(state, detail.message));
 * await room.connect();
 * ```
 */
export class Room {
  /** The reconnecting connection's state machine. */
  readonly reconnector: Reconnector;
  /** Transport of the current signaling connection. */
  transportKind: TransportKind | null = null;
  /** URL of the current signaling connection. */
  transportUrl = '';
  /** This participant's id in the room (from `joined`). */
  participantId = '';
  /** The room's name (from `joined`). */
  room = '';
  /** Signaling RTT from ping/pong, ms. */
  signalingRttMs: number | undefined;
  /** The publisher peer connection (own camera, microphone, screen). */
  pub: RTCPeerConnection | null = null;
  /** The subscriber peer connection (everyone else's tracks). */
  sub: RTCPeerConnection | null = null;
  /** Errors seen, for tests and diagnostics. */
  readonly errors: string[] = [];
  /** How many times the session was restored from the event log (another node). */
  restoredCount = 0;
  /** How many times the session was resumed with its resume token. */
  resumedCount = 0;
  /** ICE restarts made (a media path died while signaling stayed up), both connections counted. */
  iceRestarts = 0;

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
  private readonly emitter = new Emitter<RoomEvents>();
  private readonly rtc: RtcEnvironment;
  private readonly nodes: NodeTarget[];
  private readonly publishMedia: boolean;
  /** The screen share's track, when sharing. */
  private screen: MediaStream | null = null;
  private probeTimer: ReturnType<typeof setTimeout> | null = null;
  private speakerTimer: ReturnType<typeof setInterval> | null = null;
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private iceTimer: ReturnType<typeof setInterval> | null = null;
  private readonly iceWatches = new Map<RTCPeerConnection, IceRestartWatch>();
  private readonly speaker = new ActiveSpeakerDetector();

  constructor(private readonly opts: RoomOptions) {
    this.token = opts.token;
    this.rtc = opts.rtc ?? browserRtc();
    this.publishMedia = opts.publish ?? true;
    this.nodes = opts.nodes && opts.nodes.length > 0
      ? opts.nodes
      : [{ httpOrigin: typeof location !== 'undefined' ? location.origin : 'http://127.0.0.1:7880' }];
    if (opts.media instanceof Object && 'getTracks' in opts.media) {
      this.local = opts.media as MediaStream;
      this.localAsked = true;
    }
    this.reconnector = new Reconnector({
      nodes: this.nodes,
      policy: opts.policy,
      attempt: (target, resume) => this.attempt(target, resume),
      sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
      random: Math.random,
      onstate: (s, d) => this.onState(s, d),
      onjoined: (j, target, resumed) => this.onJoined(j, target, resumed),
    });
  }

  /**
   * Listens to an event; returns a function that stops listening.
   * @typeParam K - the event name, a key of {@link RoomEvents}
   */
  on<K extends keyof RoomEvents>(event: K, listener: (value: RoomEvents[K]) => void): () => void {
    return this.emitter.on(event, listener);
  }

  /** Connects and joins; never rejects (failures end in state `disconnected`). */
  async connect(): Promise<void> {
    await this.reconnector.start();
  }

  /** Same as {@link Room.connect}. */
  start(): Promise<void> {
    return this.connect();
  }

  /** Whether this room publishes camera and microphone. */
  get publishes(): boolean {
    return this.publishMedia;
  }

  /** Current connection state. */
  get state(): ConnectionState {
    return this.reconnector.state;
  }

  /** After `disconnected`: try again now (the page's "Try again"). */
  reconnect(): Promise<void> {
    this.stopProbe();
    return this.reconnector.restart('trying again');
  }

  private onState(state: ConnectionState, detail: StateDetail): void {
    this.emitter.emit('state', { state, detail });
    if (state === 'disconnected' && !detail.fatal && !this.leaving) this.scheduleProbe();
    if (state === 'connected') this.startSpeaker();
    if (state === 'disconnected' || state === 'left') this.stopSpeaker();
  }

  // Slow probing after giving up: the node may come back (restart, network back).
  private scheduleProbe(): void {
    const every = this.opts.probeIntervalMs ?? 5000;
    if (every <= 0) return;
    this.stopProbe();
    this.probeTimer = setTimeout(() => {
      this.probeTimer = null;
      void this.probeOnce();
    }, every);
  }

  private async probeOnce(): Promise<void> {
    if (this.state !== 'disconnected' || this.leaving) return;
    const probe = this.opts.probe ?? defaultProbe;
    let up = false;
    for (const n of this.nodes) {
      if (await probe(n)) {
        up = true;
        break;
      }
    }
    if (this.state !== 'disconnected' || this.leaving) return;
    if (up) {
      this.emitter.emit('notice', 'the node answers again; rejoining');
      await this.reconnector.restart('the node is back');
    } else {
      this.scheduleProbe();
    }
  }

  private stopProbe(): void {
    if (this.probeTimer) clearTimeout(this.probeTimer);
    this.probeTimer = null;
  }

  /** Whether the room is probing the node after giving up. */
  get probing(): boolean {
    return this.probeTimer !== null;
  }

  // ---- connecting ----

  private async attempt(target: NodeTarget, resume: string | undefined): Promise<AttemptResult> {
    this.dropSignaling();
    if (this.opts.refreshToken && (this.reconnector.state === 'reconnecting' || this.reconnector.attempts > 1)) {
      try {
        this.token = await this.opts.refreshToken();
      } catch {
        /* keep the old token; the node will say if it expired */
      }
    }
    const order = transportOrder(this.opts.transport ?? 'auto', this.rtc.webTransport);
    let sig: SignalingClient;
    try {
      const { transport, failures } = await connectWithFallback(order, target, this.opts.transportFactory ?? browserTransportFactory);
      for (const f of failures) this.emitter.emit('notice', `${f.kind} failed (${f.error}); fell back to ${transport.kind}`);
      sig = new SignalingClient(transport);
    } catch (e) {
      return { kind: 'failed', message: `cannot reach the node at ${target.signalUrl ?? target.httpOrigin}: ${e instanceof Error ? e.message : String(e)}` };
    }
    try {
      // A node from a login carries its region's token.
      if (target.token) this.token = target.token;
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
    sig.onprotocolerror = (e) => this.emitter.emit('notice', `ignored a message: ${e.message}`);
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
    this.iceTimer = setInterval(() => this.checkIce(), ICE_CHECK_MS);
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
    if (this.iceTimer) clearInterval(this.iceTimer);
    this.iceTimer = null;
    this.stopRefresh();
  }

  /** Sends `refresh` with a fresh token before the current one expires in `expiresInSecs`. */
  private scheduleRefresh(expiresInSecs: number | undefined): void {
    this.stopRefresh();
    const fetchToken = this.opts.refreshToken;
    if (!fetchToken || expiresInSecs === undefined) return;
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      const sig = this.sig;
      if (!sig) return;
      fetchToken().then(
        (token) => {
          if (this.sig !== sig) return;
          this.token = token;
          sig.send({ type: 'refresh', token });
        },
        (e: unknown) => {
          this.emitter.emit('notice', `could not refresh the access token: ${e instanceof Error ? e.message : String(e)}`);
        },
      );
    }, refreshDelayMs(expiresInSecs));
  }

  private stopRefresh(): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
  }

  private onJoined(joined: JoinedMessage, _target: NodeTarget, resumed: boolean): void {
    this.others = new Map(joined.participants.map((p) => [p.participant_id, p]));
    this.emitParticipants();
    this.startPing();
    this.scheduleRefresh(tokenExpiresInSecs(this.token));
    const ok = (p: Promise<void>) =>
      p.catch((e: unknown) => {
        this.errors.push(String(e));
        this.emitter.emit('notice', `media set-up failed: ${e instanceof Error ? e.message : String(e)}`);
      });
    if (joined.restored) {
      // A new node rebuilt us from the event log: new peer connections (reset in
      // `attempt`), the tracks re-announced with their previous ids.
      this.restoredCount++;
      if (this.publishMedia) void ok(this.publish(true));
    } else if (resumed) {
      // Resumed on the same node: the media connections carry on (one whose path died
      // meanwhile gets an ICE restart; a publisher connection that never came up is
      // offered again).
      this.resumedCount++;
      if (this.publishMedia && (!this.pub || this.pub.connectionState === 'closed')) {
        this.pub?.close();
        this.pub = null;
        void ok(this.publish(false));
      }
    } else {
      // A fresh participant (first join, or the resume token had expired).
      this.own.clear();
      if (this.publishMedia) void ok(this.publish(false));
    }
  }

  private resetMedia(): void {
    for (const id of this.subTracks.values()) this.emitter.emit('trackUnsubscribed', { trackId: id.track_id });
    this.subTracks.clear();
    this.pub?.close();
    this.sub?.close();
    this.pub = null;
    this.sub = null;
    this.iceWatches.clear();
    this.subQueue = Promise.resolve();
  }

  // ---- publishing ----

  private async localMedia(): Promise<MediaStream | null> {
    if (this.local || this.localAsked) return this.local;
    this.localAsked = true;
    const media = this.opts.media as MediaStreamConstraints | undefined;
    try {
      this.local = await this.rtc.getUserMedia(media ?? {
        audio: true,
        video: { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
      });
    } catch (e) {
      this.emitter.emit('notice', `camera/microphone unavailable (${e instanceof Error ? e.message : String(e)}); watching only`);
      this.local = null;
    }
    this.emitter.emit('localStream', this.local);
    return this.local;
  }

  /** The local camera/microphone stream, once asked for. */
  get localStream(): MediaStream | null {
    return this.local;
  }

  /** The local screen share, when sharing. */
  get screenStream(): MediaStream | null {
    return this.screen;
  }

  private publish(restore: boolean): Promise<void> {
    const run = async () => {
      const stream = await this.localMedia();
      const sig = this.sig;
      if (!sig || (!stream && !this.screen)) return;
      const pc = this.rtc.createPeerConnection({ bundlePolicy: 'max-bundle' });
      this.pub = pc;
      this.watchIce(pc, 'publisher');
      const announced: { t: RTCRtpTransceiver; kind: 'audio' | 'video'; source: string }[] = [];
      for (const track of stream?.getTracks() ?? []) {
        const kind = track.kind === 'video' ? 'video' : 'audio';
        const init: RTCRtpTransceiverInit = { direction: 'sendonly', streams: stream ? [stream] : [] };
        if (kind === 'video') init.sendEncodings = SIMULCAST_ENCODINGS.map((e) => ({ ...e }));
        announced.push({ t: pc.addTransceiver(track, init), kind, source: kind === 'video' ? 'camera' : 'microphone' });
      }
      const screenTrack = this.screen?.getVideoTracks()[0];
      if (screenTrack && this.screen) {
        announced.push({ t: pc.addTransceiver(screenTrack, { direction: 'sendonly', streams: [this.screen] }), kind: 'video', source: 'screen' });
      }
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      const tracks: TrackAnnouncement[] = announced.map(({ t, kind, source }) => {
        const a: TrackAnnouncement = {
          mid: t.mid ?? '',
          kind,
          source,
          layers: source === 'camera' ? ['low', 'medium', 'high'] : [],
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
      this.screenTransceiver = announced.find((a) => a.source === 'screen')?.t ?? null;
      // Re-apply mutes the user chose before a restore.
      for (const [source, muted] of this.ownMuted) {
        const info = this.own.get(source);
        if (info && muted) sig.send({ type: 'mute', track_id: info.track_id, muted: true });
        if (info) this.emitter.emit('muted', { trackId: info.track_id, muted, participantId: this.participantId, local: true });
      }
    };
    const p = (this.publishing ?? Promise.resolve()).then(run, run);
    this.publishing = p.catch(() => {});
    return p;
  }

  private screenTransceiver: RTCRtpTransceiver | null = null;

  /**
   * Shares a screen as a `screen` video track: `stream` when given (its first video
   * track), otherwise one the user picks (getDisplayMedia). Renegotiates the publisher
   * connection; other participants receive it as a second video. Rejects when the user
   * cancels the picker or the node refuses the track.
   */
  async startScreenShare(stream?: MediaStream): Promise<void> {
    if (this.screen) return;
    const s = stream ?? (await this.rtc.getDisplayMedia({ video: { frameRate: { ideal: 15 } }, audio: false }));
    const track = s.getVideoTracks()[0];
    if (!track) throw new Error('the shared stream has no video track');
    this.screen = s;
    track.addEventListener('ended', () => { void this.stopScreenShare(); });
    this.emitter.emit('localScreen', s);
    const sig = this.sig;
    const pc = this.pub;
    if (!sig || !pc) return; // published with the next publisher offer
    const run = async () => {
      if (this.pub !== pc || this.screen !== s) return;
      const t = pc.addTransceiver(track, { direction: 'sendonly', streams: [s] });
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      const answer = await sig.offer(pc.localDescription?.sdp ?? '', [{ mid: t.mid ?? '', kind: 'video', source: 'screen', layers: [] }]);
      if (this.pub !== pc) return;
      await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp });
      for (const info of answer.tracks) this.own.set(info.source || info.kind, info);
      this.screenTransceiver = t;
    };
    const p = (this.publishing ?? Promise.resolve()).then(run, run);
    this.publishing = p.catch(() => {});
    await p;
  }

  /** Stops the screen share: its track is unpublished and the capture stopped. */
  async stopScreenShare(): Promise<void> {
    const s = this.screen;
    if (!s) return;
    this.screen = null;
    for (const t of s.getTracks()) t.stop();
    const info = this.own.get('screen');
    if (info) {
      this.own.delete('screen');
      this.sig?.send({ type: 'unpublish', track_id: info.track_id });
    }
    const tr = this.screenTransceiver;
    this.screenTransceiver = null;
    if (tr) {
      try {
        await tr.sender.replaceTrack(null);
      } catch {
        /* the connection is gone */
      }
    }
    this.emitter.emit('localScreen', null);
  }

  /** Whether the screen is being shared. */
  get sharingScreen(): boolean {
    return this.screen !== null;
  }

  /** Mutes or unmutes the own camera (`video`) or microphone (`audio`). */
  setMuted(kind: 'audio' | 'video', muted: boolean): void {
    const source = kind === 'video' ? 'camera' : 'microphone';
    this.ownMuted.set(source, muted);
    for (const t of this.local?.getTracks() ?? []) if (t.kind === kind) t.enabled = !muted;
    const info = this.own.get(source);
    if (info) {
      this.sig?.send({ type: 'mute', track_id: info.track_id, muted });
      this.emitter.emit('muted', { trackId: info.track_id, muted, participantId: this.participantId, local: true });
    }
  }

  /** Whether the own microphone (`audio`) or camera (`video`) is muted. */
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
          this.emitter.emit('notice', `subscriber negotiation failed: ${e instanceof Error ? e.message : String(e)}`);
        });
        break;
      case 'participant_joined':
        this.others.set(m.participant.participant_id, m.participant);
        this.emitParticipants();
        break;
      case 'participant_left':
        this.others.delete(m.participant_id);
        this.emitParticipants();
        break;
      case 'track_published': {
        const p = this.others.get(m.track.participant_id);
        if (p) {
          p.tracks = p.tracks.filter((t) => t.track_id !== m.track.track_id).concat(m.track);
          this.emitParticipants();
        }
        const waiting = this.pendingRemote.get(m.track.track_id);
        if (waiting) this.emitRemote(waiting.info, waiting.track);
        break;
      }
      case 'track_unpublished':
        for (const p of this.others.values()) p.tracks = p.tracks.filter((t) => t.track_id !== m.track_id);
        this.pendingRemote.delete(m.track_id);
        this.emitter.emit('trackUnsubscribed', { trackId: m.track_id });
        this.emitParticipants();
        break;
      case 'track_muted':
        for (const p of this.others.values()) for (const t of p.tracks) if (t.track_id === m.track_id) t.muted = m.muted;
        this.emitter.emit('muted', { trackId: m.track_id, muted: m.muted, participantId: this.participantOfTrack(m.track_id) ?? this.ownerOf(m.track_id) ?? '', local: false });
        break;
      case 'layer_changed':
        this.layers.set(m.track_id, m.layer);
        break;
      case 'refreshed':
        this.scheduleRefresh(m.expires_in_secs);
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
          const message = describeLeftReason(m.reason);
          this.errors.push(`left: ${m.reason}`);
          this.dropSignaling();
          this.resetMedia();
          this.emitter.emit('ended', { reason: m.reason, message });
          // Not retried: a replaced session coming back would replace the newer one.
          this.reconnector.end(message, true);
        }
        break;
      case 'error':
        this.errors.push(m.code);
        this.emitter.emit('notice', describeError(m.code, m.message));
        break;
      default:
        break;
    }
  }

  private async onSubscriberOffer(sig: SignalingClient, sdp: string, tracks: SubscribedTrack[]): Promise<void> {
    if (!this.sub) {
      const pc = this.rtc.createPeerConnection({ bundlePolicy: 'max-bundle' });
      this.sub = pc;
      this.watchIce(pc, 'subscriber');
      pc.ontrack = (ev) => {
        const mid = ev.transceiver.mid ?? '';
        const info = this.subTracks.get(mid);
        if (info) this.emitRemote(info, ev.track);
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
        this.emitter.emit('trackUnsubscribed', { trackId: t.track_id });
      }
    }
    // A track for a mid seen before may be re-used for a new track id.
    for (const tr of pc.getTransceivers()) {
      const info = tr.mid ? this.subTracks.get(tr.mid) : undefined;
      const old = tr.mid ? before.get(tr.mid) : undefined;
      if (info && old && old.track_id !== info.track_id && tr.receiver.track) {
        this.emitter.emit('trackUnsubscribed', { trackId: old.track_id });
        this.emitRemote(info, tr.receiver.track);
      }
    }
  }

  private watchIce(pc: RTCPeerConnection, which: string): void {
    const watch = new IceRestartWatch({ ...DEFAULT_ICE_RESTART_POLICY, ...this.opts.iceRestart });
    this.iceWatches.set(pc, watch);
    pc.addEventListener('iceconnectionstatechange', () => {
      watch.onState(pc.iceConnectionState, Date.now());
      this.checkIce();
    });
    pc.addEventListener('connectionstatechange', () => {
      if (pc.connectionState !== 'failed' || this.leaving) return;
      if (pc !== this.pub && pc !== this.sub) return;
      // A dead ICE path gets ICE restarts (`checkIce`); a connection that never came
      // up, or whose DTLS failed over a working path, joins afresh.
      if (watch.connectedOnce && pc.iceConnectionState !== 'connected' && pc.iceConnectionState !== 'completed') return;
      this.rejoinAfresh(which);
    });
  }

  /**
   * Repairs dead media paths while signaling is up: an ICE restart on the same
   * participant (publisher: `restartIce()` and a new offer; subscriber: `ice_restart`,
   * answered by the node's offer with new credentials). When restarts do not help, the
   * participant leaves and joins afresh.
   */
  private checkIce(): void {
    if (this.leaving) return;
    const now = Date.now();
    const up = this.sig !== null && this.state === 'connected';
    for (const [which, pc] of [['publisher', this.pub], ['subscriber', this.sub]] as const) {
      const watch = pc ? this.iceWatches.get(pc) : undefined;
      if (!pc || !watch) continue;
      const action = watch.decide(now, up);
      if (action === 'restart') {
        watch.restarted(now);
        this.iceRestarts++;
        this.emitter.emit('notice', `${which} media path lost; restarting ICE`);
        this.restartIce(which, pc).catch((e: unknown) => {
          this.errors.push(String(e));
          this.emitter.emit('notice', `ICE restart failed: ${e instanceof Error ? e.message : String(e)}`);
        });
      } else if (action === 'rejoin') {
        this.rejoinAfresh(which);
        return;
      }
    }
  }

  private restartIce(which: 'publisher' | 'subscriber', pc: RTCPeerConnection): Promise<void> {
    const sig = this.sig;
    if (!sig) return Promise.resolve();
    if (which === 'subscriber') {
      sig.send({ type: 'ice_restart' });
      return Promise.resolve();
    }
    const run = async () => {
      if (this.pub !== pc || this.sig !== sig) return;
      pc.restartIce();
      await pc.setLocalDescription(await pc.createOffer({ iceRestart: true }));
      // An ICE restart creates no tracks: the answer names none, the own ones stay.
      const answer = await sig.offer(pc.localDescription?.sdp ?? '', []);
      if (this.pub !== pc) return;
      await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp });
    };
    const p = (this.publishing ?? Promise.resolve()).then(run, run);
    this.publishing = p.catch(() => {});
    return p;
  }

  /** Restarts did not bring the media path back: leave, and join as a new participant. */
  private rejoinAfresh(which: string): void {
    this.emitter.emit('notice', `${which} media connection failed; rejoining`);
    const s = this.sig;
    if (s) s.send({ type: 'leave' });
    this.reconnector.resumeToken = undefined;
    this.dropSignaling();
    this.resetMedia();
    if (this.reconnector.state === 'connected') void this.reconnector.lost(`${which} media connection failed`);
  }

  private emitParticipants(): void {
    this.emitter.emit('participants', [...this.others.values()]);
  }

  private emitRemote(info: SubscribedTrack, track: MediaStreamTrack): void {
    const ti = this.others.get(info.participant_id)?.tracks.find((t) => t.track_id === info.track_id);
    if (!ti) {
      // Media before its `track_published`: wait for it to learn the source (a screen
      // share must not land in the camera's place). Bounded: unknown tracks go out
      // as they are after a second.
      this.pendingRemote.set(info.track_id, { info, track });
      setTimeout(() => {
        const p = this.pendingRemote.get(info.track_id);
        if (p && p.track === track) {
          this.pendingRemote.delete(info.track_id);
          this.emitter.emit('trackSubscribed', { participantId: info.participant_id, trackId: info.track_id, source: track.kind === 'video' ? 'camera' : 'microphone', track });
        }
      }, 1000);
      return;
    }
    this.pendingRemote.delete(info.track_id);
    const source = ti.source || (track.kind === 'video' ? 'camera' : 'microphone');
    this.emitter.emit('trackSubscribed', { participantId: info.participant_id, trackId: info.track_id, source, track });
  }

  private readonly pendingRemote = new Map<string, { info: SubscribedTrack; track: MediaStreamTrack }>();

  private ownerOf(trackId: string): string | undefined {
    for (const p of this.others.values()) if (p.tracks.some((t) => t.track_id === trackId)) return p.participant_id;
    return undefined;
  }

  /** The other participants, as last announced. */
  participants(): ParticipantInfo[] {
    return [...this.others.values()];
  }

  /** A remote track's info (source, kind, mute), if known. */
  trackInfo(trackId: string): TrackInfo | undefined {
    for (const p of this.others.values()) {
      const t = p.tracks.find((x) => x.track_id === trackId);
      if (t) return t;
    }
    return undefined;
  }

  /** The active speaker (a participant id, the own one included), or null. */
  get activeSpeaker(): string | null {
    return this.speaker.current;
  }

  private startSpeaker(): void {
    const every = this.opts.speakerIntervalMs ?? 500;
    if (every <= 0 || this.speakerTimer) return;
    this.speakerTimer = setInterval(() => { void this.sampleSpeaker(); }, every);
  }

  private stopSpeaker(): void {
    if (this.speakerTimer) clearInterval(this.speakerTimer);
    this.speakerTimer = null;
  }

  private async sampleSpeaker(): Promise<void> {
    const [p, s] = await Promise.all([
      this.pub ? this.pub.getStats().catch(() => undefined) : Promise.resolve(undefined),
      this.sub ? this.sub.getStats().catch(() => undefined) : Promise.resolve(undefined),
    ]);
    const owners = new Map([...this.subTracks].map(([mid, t]) => [mid, t.participant_id]));
    const before = this.speaker.current;
    const muted = this.isMuted('audio');
    const samples = audioEnergies(muted ? [] : entriesOf(p), entriesOf(s), owners, this.participantId);
    const now = this.speaker.update(samples);
    if (now !== before) this.emitter.emit('activeSpeaker', { participantId: now });
  }

  // ---- leaving and stats ----

  /** Leaves the room for good (a new {@link Room} joins again). */
  leave(): void {
    this.leaving = true;
    this.stopProbe();
    this.stopSpeaker();
    for (const t of this.screen?.getTracks() ?? []) t.stop();
    this.screen = null;
    const s = this.sig;
    if (s) s.send({ type: 'leave' });
    this.sig = null;
    this.stopPing();
    setTimeout(() => s?.close(), 200);
    this.resetMedia();
    for (const t of this.local?.getTracks() ?? []) t.stop();
    this.local = null;
    this.emitter.emit('localStream', null);
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
    const sum = summarize(entriesOf(p), entriesOf(s), typeof performance !== 'undefined' ? performance.now() : Date.now(), this.lastStats, tracks, this.layers);
    this.lastStats = sum;
    return { ...sum, transport: this.transportKind, signalingRttMs: this.signalingRttMs, state: this.state };
  }

  /** Participant id of a subscribed track. */
  participantOfTrack(trackId: string): string | undefined {
    for (const t of this.subTracks.values()) if (t.track_id === trackId) return t.participant_id;
    return undefined;
  }
}
