// Request/response over one signaling transport: join, publisher offer → answer,
// ping → pong; every other node message is handed to `onevent`. No DOM.
import {
  type ClientMessage,
  type JoinedMessage,
  type ServerMessage,
  type TrackAnnouncement,
  type TrackInfo,
  PROTOCOL_VERSION,
  ProtocolError,
  decodeServerMessage,
  encodeClientMessage,
} from './protocol';
import type { Transport } from './transport';

/** A node `error` answering a request, or the transport ending under it. */
export class SignalingError extends Error {
  constructor(
    /** The protocol error code, or `closed` / `timeout` / `redirect`. */
    readonly code: string,
    message: string,
    /** For `redirect`: where to go. */
    readonly url?: string,
  ) {
    super(message);
    this.name = 'SignalingError';
  }
}

/** What answers a join: `joined`, or a redirect to another region. */
export type JoinOutcome = { kind: 'joined'; joined: JoinedMessage } | { kind: 'redirect'; url: string; region: string };

interface Pending<T> {
  resolve: (v: T) => void;
  reject: (e: SignalingError) => void;
  timer: ReturnType<typeof setTimeout>;
}

/** Events kept while no handler is attached. */
const MAX_QUEUED_EVENTS = 256;

/** Error codes that answer a pending publisher offer. */
const OFFER_ERRORS = new Set(['invalid_sdp', 'forbidden', 'capacity_exceeded', 'message_too_large', 'not_found']);

/** One signaling session over one transport. */
export class SignalingClient {
  /**
   * Unsolicited node messages (room events, subscriber offers, migrate, left, errors).
   * Until a handler is set they are queued (bounded), so nothing sent right after
   * `joined` — often in the same WebTransport read — is lost.
   */
  get onevent(): ((msg: ServerMessage) => void) | undefined {
    return this.handler;
  }
  set onevent(h: ((msg: ServerMessage) => void) | undefined) {
    this.handler = h;
    if (!h) return;
    const queued = this.queue;
    this.queue = [];
    for (const m of queued) h(m);
  }
  /** The transport ended (once). */
  onclose: (reason: string) => void = () => {};
  /** Messages that could not be decoded (ignored after reporting). */
  onprotocolerror: (e: ProtocolError) => void = () => {};

  private handler: ((msg: ServerMessage) => void) | undefined;
  private queue: ServerMessage[] = [];
  private join?: Pending<JoinOutcome>;
  private offers: Pending<{ sdp: string; tracks: TrackInfo[] }>[] = [];
  private pings = new Map<number, Pending<number> & { sent: number }>();
  private nextPing = 1;
  private closed = false;

  constructor(
    readonly transport: Transport,
    private readonly now: () => number = () => performance.now(),
    private readonly timeoutMs = 10_000,
  ) {
    transport.onmessage = (data) => this.receive(data);
    transport.onclose = (reason) => this.ended(reason);
  }

  /** Sends a message that expects no answer. */
  send(msg: ClientMessage): void {
    if (this.closed) return;
    this.transport.send(encodeClientMessage(msg));
  }

  /** Joins (or resumes with `resume`); resolves on `joined` or `redirect`, rejects on `error`. */
  joinRoom(token: string, resume?: string, client = 'meridian-web'): Promise<JoinOutcome> {
    return new Promise<JoinOutcome>((resolve, reject) => {
      if (this.closed) { reject(new SignalingError('closed', 'signaling is closed')); return; }
      const timer = setTimeout(() => {
        this.join = undefined;
        reject(new SignalingError('timeout', 'no answer to join'));
      }, this.timeoutMs);
      this.join = { resolve, reject, timer };
      const msg: ClientMessage = { type: 'join', token, version: PROTOCOL_VERSION, auto_subscribe: true, client };
      if (resume) msg.resume = resume;
      this.send(msg);
    });
  }

  /** Sends the publisher offer; resolves with the node's answer. */
  offer(sdp: string, tracks: TrackAnnouncement[]): Promise<{ sdp: string; tracks: TrackInfo[] }> {
    return new Promise((resolve, reject) => {
      if (this.closed) { reject(new SignalingError('closed', 'signaling is closed')); return; }
      const p: Pending<{ sdp: string; tracks: TrackInfo[] }> = {
        resolve,
        reject,
        timer: setTimeout(() => {
          this.offers = this.offers.filter((o) => o !== p);
          reject(new SignalingError('timeout', 'no answer to the publisher offer'));
        }, this.timeoutMs),
      };
      this.offers.push(p);
      try {
        this.send({ type: 'offer', sdp, tracks });
      } catch (e) {
        clearTimeout(p.timer);
        this.offers = this.offers.filter((o) => o !== p);
        reject(new SignalingError('message_too_large', e instanceof Error ? e.message : String(e)));
      }
    });
  }

  /** Sends `ping`; resolves with the round-trip time in ms. */
  ping(): Promise<number> {
    return new Promise((resolve, reject) => {
      if (this.closed) { reject(new SignalingError('closed', 'signaling is closed')); return; }
      const id = this.nextPing++;
      const timer = setTimeout(() => {
        this.pings.delete(id);
        reject(new SignalingError('timeout', `no pong for ping ${id}`));
      }, this.timeoutMs);
      this.pings.set(id, { resolve, reject, timer, sent: this.now() });
      this.send({ type: 'ping', id });
    });
  }

  /** Closes the transport (no `leave`: the session may still be resumed). */
  close(): void {
    this.transport.close();
    this.ended('closed by client');
  }

  /** Whether the transport has ended. */
  get isClosed(): boolean {
    return this.closed;
  }

  private receive(data: string | Uint8Array): void {
    let msg: ServerMessage;
    try {
      msg = decodeServerMessage(data);
    } catch (e) {
      this.onprotocolerror(e instanceof ProtocolError ? e : new ProtocolError(String(e)));
      return;
    }
    switch (msg.type) {
      case 'joined':
        if (this.join) {
          const j = this.join;
          this.join = undefined;
          clearTimeout(j.timer);
          j.resolve({ kind: 'joined', joined: msg });
          return;
        }
        break;
      case 'redirect':
        if (this.join) {
          const j = this.join;
          this.join = undefined;
          clearTimeout(j.timer);
          j.resolve({ kind: 'redirect', url: msg.url, region: msg.region });
          return;
        }
        break;
      case 'answer': {
        const p = this.offers.shift();
        if (p) {
          clearTimeout(p.timer);
          p.resolve({ sdp: msg.sdp, tracks: msg.tracks });
          return;
        }
        break;
      }
      case 'pong': {
        const p = this.pings.get(msg.id);
        if (p) {
          this.pings.delete(msg.id);
          clearTimeout(p.timer);
          p.resolve(this.now() - p.sent);
        }
        return;
      }
      case 'error':
        if (this.join) {
          const j = this.join;
          this.join = undefined;
          clearTimeout(j.timer);
          j.reject(new SignalingError(msg.code, msg.message));
          return;
        }
        if (OFFER_ERRORS.has(msg.code) && this.offers.length > 0) {
          const p = this.offers.shift();
          if (p) {
            clearTimeout(p.timer);
            p.reject(new SignalingError(msg.code, msg.message));
          }
          return;
        }
        break;
      default:
        break;
    }
    if (this.handler) this.handler(msg);
    else if (this.queue.length < MAX_QUEUED_EVENTS) this.queue.push(msg);
  }

  private ended(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    const err = new SignalingError('closed', `signaling closed: ${reason}`);
    if (this.join) { clearTimeout(this.join.timer); this.join.reject(err); this.join = undefined; }
    for (const p of this.offers) { clearTimeout(p.timer); p.reject(err); }
    this.offers = [];
    for (const p of this.pings.values()) { clearTimeout(p.timer); p.reject(err); }
    this.pings.clear();
    this.onclose(reason);
  }
}
