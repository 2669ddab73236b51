// Signaling transports: WebTransport (length-prefixed JSON on one bidirectional stream)
// and WebSocket (one text frame per message), behind one small interface; and the pure
// choice of which to try first.
import { FrameDecoder, frameMessage } from './protocol';

/** Which transport a page asks for: `auto` tries WebTransport, then WebSocket. */
export type TransportMode = 'auto' | 'wt' | 'ws';
/** A transport kind. */
export type TransportKind = 'webtransport' | 'websocket';

/** One open signaling connection carrying text messages. */
export interface Transport {
  readonly kind: TransportKind;
  /** Where it is connected. */
  readonly url: string;
  send(text: string): void;
  /** Called with each message (text or the bytes of one frame). */
  onmessage: (data: string | Uint8Array) => void;
  /** Called once when the connection ends, for whatever reason. */
  onclose: (reason: string) => void;
  close(): void;
}

/** Where to connect: a node's HTTP origin and, when known, its WebTransport endpoint. */
export interface NodeTarget {
  /** `http(s)://host:port` of the node (its `/signal` WebSocket and `/webtransport/…`). */
  httpOrigin: string;
  /** An explicit signaling URL (`ws://…/signal` or `https://…/signal`), from redirect/migrate. */
  signalUrl?: string;
  /** The region the node belongs to (from a login, `loginToRegion`). */
  region?: string;
  /** The access token pinned to that region; joins at this node use it instead of the Room's. */
  token?: string;
}

/**
 * Which transports to try, in order. Pure. `auto` prefers WebTransport (one QUIC
 * handshake) and falls back to WebSocket; `wt`/`ws` force one.
 */
export function transportOrder(mode: TransportMode, webTransportAvailable: boolean): TransportKind[] {
  switch (mode) {
    case 'ws':
      return ['websocket'];
    case 'wt':
      return webTransportAvailable ? ['webtransport'] : [];
    default:
      return webTransportAvailable ? ['webtransport', 'websocket'] : ['websocket'];
  }
}

/**
 * A node target for a URL from a node list, `redirect` or `migrate`:
 * `ws(s)://host:port/signal` (WebSocket signaling), `https://host:port/signal`
 * (WebTransport signaling) or `http(s)://host:port` (the node's HTTP origin).
 * Throws on anything else.
 */
export function targetFromUrl(raw: string): NodeTarget {
  const u = new URL(raw.trim());
  switch (u.protocol) {
    case 'ws:':
    case 'wss:':
      return { httpOrigin: originOfSignalUrl(u.href), signalUrl: u.href };
    case 'http:':
    case 'https:':
      if (u.pathname.replace(/\/+$/, '') === '/signal' && u.protocol === 'https:') {
        return { httpOrigin: u.origin, signalUrl: u.href };
      }
      return { httpOrigin: u.origin };
    default:
      throw new Error(`unsupported node URL ${raw}`);
  }
}

/** Opens a transport of the given kind to a target; rejects when it cannot. */
export type TransportFactory = (kind: TransportKind, target: NodeTarget) => Promise<Transport>;

/** The outcome of {@link connectWithFallback}: the transport and each failure on the way. */
export interface FallbackResult {
  transport: Transport;
  failures: { kind: TransportKind; error: string }[];
}

/**
 * Tries each transport in `order` until one opens. Rejects with every failure when
 * none does. Pure apart from what the factory does.
 */
export async function connectWithFallback(
  order: TransportKind[],
  target: NodeTarget,
  open: TransportFactory,
): Promise<FallbackResult> {
  const failures: { kind: TransportKind; error: string }[] = [];
  if (order.length === 0) throw new Error('no signaling transport is available in this browser for this mode');
  for (const kind of order) {
    try {
      const transport = await open(kind, target);
      return { transport, failures };
    } catch (e) {
      failures.push({ kind, error: e instanceof Error ? e.message : String(e) });
    }
  }
  throw new Error(failures.map((f) => `${f.kind}: ${f.error}`).join('; '));
}

/** `ws://host/signal` for an HTTP origin. */
export function webSocketUrl(target: NodeTarget): string {
  if (target.signalUrl && /^wss?:/i.test(target.signalUrl)) return target.signalUrl;
  const u = new URL(target.httpOrigin);
  return `${u.protocol === 'https:' ? 'wss' : 'ws'}://${u.host}/signal`;
}

/** The node's HTTP origin for a signaling URL (`ws://h:p/signal` → `http://h:p`). */
export function originOfSignalUrl(url: string): string {
  const u = new URL(url);
  const scheme = u.protocol === 'wss:' || u.protocol === 'https:' ? 'https:' : 'http:';
  return `${scheme}//${u.host}`;
}

const withTimeout = <T>(p: Promise<T>, ms: number, what: string): Promise<T> =>
  new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
    p.then(
      (v) => { clearTimeout(t); resolve(v); },
      (e) => { clearTimeout(t); reject(e); },
    );
  });

/** Opens a WebSocket to the node. */
export function openWebSocket(target: NodeTarget, timeoutMs = 5000): Promise<Transport> {
  const url = webSocketUrl(target);
  return new Promise<Transport>((resolve, reject) => {
    let ws: WebSocket;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      reject(e instanceof Error ? e : new Error(String(e)));
      return;
    }
    let opened = false;
    const timer = setTimeout(() => {
      if (!opened) { ws.close(); reject(new Error(`WebSocket to ${url} timed out`)); }
    }, timeoutMs);
    const t: Transport = {
      kind: 'websocket',
      url,
      send: (text) => { if (ws.readyState === WebSocket.OPEN) ws.send(text); },
      onmessage: () => {},
      onclose: () => {},
      close: () => ws.close(1000),
    };
    let closed = false;
    ws.onopen = () => { opened = true; clearTimeout(timer); resolve(t); };
    ws.onmessage = (ev) => { if (typeof ev.data === 'string') t.onmessage(ev.data); };
    ws.onerror = () => { if (!opened) { clearTimeout(timer); reject(new Error(`cannot connect to ${url}`)); } };
    ws.onclose = (ev) => {
      if (!opened) { clearTimeout(timer); reject(new Error(`cannot connect to ${url}`)); return; }
      if (!closed) { closed = true; t.onclose(`websocket closed (${ev.code})`); }
    };
  });
}

/** The node's WebTransport endpoint and certificate hashes (`GET /webtransport/certificate-hashes`). */
export interface CertificateHashes {
  url: string;
  hashes: { algorithm: string; value: string }[];
}

function base64Bytes(b64: string): Uint8Array<ArrayBuffer> {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** Opens a WebTransport session (trusting the node's published certificate hash) and one stream. */
export async function openWebTransport(target: NodeTarget, timeoutMs = 5000): Promise<Transport> {
  if (typeof WebTransport === 'undefined') throw new Error('WebTransport is not available in this browser');
  const explicit = target.signalUrl && /^https:/i.test(target.signalUrl) ? target.signalUrl : undefined;
  let doc: CertificateHashes | undefined;
  try {
    const res = await withTimeout(fetch(`${target.httpOrigin}/webtransport/certificate-hashes`, { cache: 'no-store' }), timeoutMs, 'certificate hashes');
    if (!res.ok) throw new Error(`certificate hashes: HTTP ${res.status}`);
    doc = (await res.json()) as CertificateHashes;
  } catch (e) {
    // A WebTransport URL with a real certificate needs no hashes.
    if (!explicit) throw e;
  }
  const url = explicit ?? (doc as CertificateHashes).url;
  if (typeof url !== 'string' || !/^https:/i.test(url)) throw new Error('the node published no WebTransport URL');
  const hashes = Array.isArray(doc?.hashes) ? doc.hashes : [];
  const serverCertificateHashes = hashes.map((h) => ({ algorithm: h.algorithm, value: base64Bytes(h.value) }));
  const wt = new WebTransport(url, serverCertificateHashes.length ? { serverCertificateHashes } : {});
  wt.closed.catch(() => {}); // observed below; never an unhandled rejection
  try {
    await withTimeout(wt.ready, timeoutMs, 'WebTransport');
  } catch (e) {
    try { wt.close(); } catch { /* already closed */ }
    throw e instanceof Error ? e : new Error(String(e));
  }
  const stream = await wt.createBidirectionalStream();
  const writer = stream.writable.getWriter();
  writer.closed.catch(() => {});
  const reader = stream.readable.getReader();
  const decoder = new FrameDecoder();
  let closed = false;
  const t: Transport = {
    kind: 'webtransport',
    url,
    send: (text) => { if (!closed) writer.write(frameMessage(text)).catch(() => {}); },
    onmessage: () => {},
    onclose: () => {},
    close: () => { if (!closed) { try { wt.close(); } catch { /* closed */ } } },
  };
  const end = (why: string) => {
    if (closed) return;
    closed = true;
    try { wt.close(); } catch { /* closed */ }
    t.onclose(why);
  };
  void (async () => {
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const body of decoder.push(value)) t.onmessage(body);
      }
      end('webtransport stream ended');
    } catch (e) {
      end(`webtransport closed (${e instanceof Error ? e.message : String(e)})`);
    }
  })();
  wt.closed.then(() => end('webtransport closed'), (e: unknown) => end(`webtransport closed (${String(e)})`));
  return t;
}

/** The factory used by the page: real WebTransport and WebSocket. */
export const browserTransportFactory: TransportFactory = (kind, target) =>
  kind === 'webtransport' ? openWebTransport(target) : openWebSocket(target);
