// Meridian signaling protocol, version 1 (docs/protocol.md). The message types are
// generated from the Rust crate `crates/meridian-protocol` by ts-rs into ./generated/
// (`cargo test -p meridian-protocol --features ts`; scripts/check-ts-types.sh fails on
// drift); this module adds the bounds, decoding with checks, and the WebTransport framing.
// Pure: no DOM, no I/O.
import type { ClientMessage } from './generated/ClientMessage';
import type { ErrorCode } from './generated/ErrorCode';
import type { Layer } from './generated/Layer';
import type { ParticipantInfo } from './generated/ParticipantInfo';
import type { ServerMessage } from './generated/ServerMessage';
import type { SubscribedTrack } from './generated/SubscribedTrack';
import type { TrackAnnouncement } from './generated/TrackAnnouncement';
import type { TrackInfo } from './generated/TrackInfo';
import type { TrackKind } from './generated/TrackKind';

export type {
  ClientMessage,
  ErrorCode,
  Layer,
  ParticipantInfo,
  ServerMessage,
  SubscribedTrack,
  TrackAnnouncement,
  TrackInfo,
  TrackKind,
};

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 1;
/** Largest message the node accepts from a client, in bytes. */
export const MAX_MESSAGE_BYTES = 64 * 1024;
/** Largest message this client accepts from a node (a subscriber offer for a big room). */
export const MAX_INCOMING_BYTES = 1024 * 1024;
/** Largest number of tracks one `offer` may announce. */
export const MAX_TRACKS_PER_MESSAGE = 16;

/** Browser RTP stream ids of the layers: `q`, `h`, `f`. */
export const LAYER_RIDS: Record<Layer, string> = { low: 'q', medium: 'h', high: 'f' };
/** All layers, lowest first. */
export const LAYERS: readonly Layer[] = ['low', 'medium', 'high'];

/** The layer a rid names, if any. */
export function layerFromRid(rid: string): Layer | undefined {
  return LAYERS.find((l) => LAYER_RIDS[l] === rid);
}

/** `joined`: the join (or resume) succeeded. */
export type JoinedMessage = Extract<ServerMessage, { type: 'joined' }>;

/** A message that could not be decoded or is over a bound. */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

const te = new TextEncoder();
const td = new TextDecoder('utf-8', { fatal: true });

/** Encodes a client message as JSON, refusing one over {@link MAX_MESSAGE_BYTES}. */
export function encodeClientMessage(msg: ClientMessage): string {
  if (msg.type === 'offer' && msg.tracks.length > MAX_TRACKS_PER_MESSAGE) {
    throw new ProtocolError(`an offer announces at most ${MAX_TRACKS_PER_MESSAGE} tracks`);
  }
  const text = JSON.stringify(msg);
  if (te.encode(text).length > MAX_MESSAGE_BYTES) {
    throw new ProtocolError(`message of type ${msg.type} exceeds ${MAX_MESSAGE_BYTES} bytes`);
  }
  return text;
}

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);
const str = (o: Obj, k: string): string => {
  const v = o[k];
  if (typeof v !== 'string') throw new ProtocolError(`${String(o.type)}.${k} must be a string`);
  return v;
};
const num = (o: Obj, k: string): number => {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new ProtocolError(`${String(o.type)}.${k} must be a number`);
  return v;
};
const arr = (o: Obj, k: string): unknown[] => {
  const v = o[k];
  if (!Array.isArray(v)) throw new ProtocolError(`${String(o.type)}.${k} must be an array`);
  return v;
};
const isLayer = (v: unknown): v is Layer => v === 'low' || v === 'medium' || v === 'high';
const isKind = (v: unknown): v is TrackKind => v === 'audio' || v === 'video';

function trackInfo(v: unknown): TrackInfo {
  if (!isObj(v)) throw new ProtocolError('track must be an object');
  const kind = v.kind;
  if (!isKind(kind)) throw new ProtocolError('track.kind must be audio or video');
  const layers = Array.isArray(v.layers) ? v.layers.filter(isLayer) : [];
  return {
    track_id: str(v, 'track_id'),
    participant_id: str(v, 'participant_id'),
    mid: str(v, 'mid'),
    kind,
    source: typeof v.source === 'string' ? v.source : '',
    layers,
    muted: v.muted === true,
  };
}

function participantInfo(v: unknown): ParticipantInfo {
  if (!isObj(v)) throw new ProtocolError('participant must be an object');
  return {
    participant_id: str(v, 'participant_id'),
    identity: str(v, 'identity'),
    name: typeof v.name === 'string' ? v.name : null,
    tracks: Array.isArray(v.tracks) ? v.tracks.map(trackInfo) : [],
  };
}

/**
 * Decodes and checks one node message (text or bytes). Unknown message types are
 * refused with {@link ProtocolError}, so a caller can log and ignore them.
 */
export function decodeServerMessage(data: string | Uint8Array): ServerMessage {
  let text: string;
  if (typeof data === 'string') {
    text = data;
    if (text.length > MAX_INCOMING_BYTES) throw new ProtocolError('message too large');
  } else {
    if (data.length > MAX_INCOMING_BYTES) throw new ProtocolError('message too large');
    try {
      text = td.decode(data);
    } catch {
      throw new ProtocolError('message is not UTF-8');
    }
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw new ProtocolError('message is not JSON');
  }
  if (!isObj(v)) throw new ProtocolError('message is not a JSON object');
  switch (v.type) {
    case 'joined':
      return {
        type: 'joined',
        participant_id: str(v, 'participant_id'),
        room: str(v, 'room'),
        participants: arr(v, 'participants').map(participantInfo),
        resume: str(v, 'resume'),
        resume_grace_secs: num(v, 'resume_grace_secs'),
        version: num(v, 'version'),
        restored: v.restored === true,
      };
    case 'answer':
      return { type: 'answer', sdp: str(v, 'sdp'), tracks: Array.isArray(v.tracks) ? v.tracks.map(trackInfo) : [] };
    case 'offer':
      return {
        type: 'offer',
        sdp: str(v, 'sdp'),
        tracks: arr(v, 'tracks').map((t) => {
          if (!isObj(t)) throw new ProtocolError('offer track must be an object');
          return { mid: str(t, 'mid'), track_id: str(t, 'track_id'), participant_id: str(t, 'participant_id') };
        }),
      };
    case 'participant_joined':
      return { type: 'participant_joined', participant: participantInfo(v.participant) };
    case 'participant_left':
      return { type: 'participant_left', participant_id: str(v, 'participant_id') };
    case 'track_published':
      return { type: 'track_published', track: trackInfo(v.track) };
    case 'track_unpublished':
      return { type: 'track_unpublished', track_id: str(v, 'track_id') };
    case 'track_muted':
      return { type: 'track_muted', track_id: str(v, 'track_id'), muted: v.muted === true };
    case 'layer_changed':
      return { type: 'layer_changed', track_id: str(v, 'track_id'), layer: isLayer(v.layer) ? v.layer : null };
    case 'pong':
      return { type: 'pong', id: num(v, 'id') };
    case 'refreshed':
      return { type: 'refreshed', expires_in_secs: num(v, 'expires_in_secs') };
    case 'redirect':
      return { type: 'redirect', region: str(v, 'region'), url: str(v, 'url') };
    case 'migrate':
      return {
        type: 'migrate',
        url: typeof v.url === 'string' && v.url !== '' ? v.url : null,
        reason: typeof v.reason === 'string' ? v.reason : '',
      };
    case 'error':
      // A code this client does not know yet is passed on as is (describeError copes).
      return { type: 'error', code: str(v, 'code') as ErrorCode, message: typeof v.message === 'string' ? v.message : '' };
    case 'left':
      return { type: 'left', reason: typeof v.reason === 'string' ? v.reason : '' };
    default:
      throw new ProtocolError(`unknown message type ${JSON.stringify(v.type)}`);
  }
}

/** Error codes after which the node closes the connection and a retry cannot help. */
export const FATAL_CODES: ReadonlySet<string> = new Set([
  'unauthorized',
  'forbidden',
  'unsupported_version',
]);

/** A human sentence for an error code, for the page. */
export function describeError(code: string, message: string): string {
  const token = /token_expired/.test(message)
    ? 'The token has expired. Ask for a new one.'
    : /token_/.test(message) || code === 'unauthorized'
      ? 'The token was refused (unauthorized). Check that it is complete and was minted for this node.'
      : '';
  switch (code) {
    case 'unauthorized':
      return `${token} [unauthorized: ${message}]`;
    case 'forbidden':
      return `The token does not allow this (forbidden: ${message}).`;
    case 'unsupported_version':
      return `This page speaks protocol ${PROTOCOL_VERSION}; the node does not (${message}).`;
    case 'resume_failed':
      return `The session could not be resumed (${message}).`;
    case 'throttled':
      return `Too many changes too quickly; try again in a moment (${message}).`;
    case 'unavailable':
      return `The node cannot take the session now (it is draining, overloaded or cannot reach its log); another node is tried (${message}).`;
    default:
      return `${code}: ${message}`;
  }
}

// ---- WebTransport framing: 4-byte big-endian length, then JSON ----

/** Frames one message for a WebTransport stream. */
export function frameMessage(text: string): Uint8Array {
  const body = te.encode(text);
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setUint32(0, body.length);
  out.set(body, 4);
  return out;
}

/** Splits a WebTransport byte stream into messages; bounded by `max` bytes per message. */
export class FrameDecoder {
  private buf = new Uint8Array(0);
  constructor(private readonly max = MAX_INCOMING_BYTES) {}

  /** Adds bytes and returns every complete message body now available. */
  push(chunk: Uint8Array): Uint8Array[] {
    const next = new Uint8Array(this.buf.length + chunk.length);
    next.set(this.buf);
    next.set(chunk, this.buf.length);
    this.buf = next;
    const out: Uint8Array[] = [];
    for (;;) {
      if (this.buf.length < 4) break;
      const len = new DataView(this.buf.buffer, this.buf.byteOffset, 4).getUint32(0);
      if (len > this.max) throw new ProtocolError(`frame of ${len} bytes exceeds ${this.max}`);
      if (this.buf.length < 4 + len) break;
      out.push(this.buf.slice(4, 4 + len));
      this.buf = this.buf.slice(4 + len);
    }
    return out;
  }
}
