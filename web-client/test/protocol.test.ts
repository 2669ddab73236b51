import { describe, expect, it } from 'vitest';
import {
  FrameDecoder,
  MAX_MESSAGE_BYTES,
  ProtocolError,
  decodeServerMessage,
  describeError,
  encodeClientMessage,
  frameMessage,
  layerFromRid,
} from '../src/sdk/protocol';

describe('encode', () => {
  it('encodes a join with version and resume', () => {
    const text = encodeClientMessage({ type: 'join', token: 't', resume: 'r', version: 1, auto_subscribe: true });
    expect(JSON.parse(text)).toEqual({ type: 'join', token: 't', resume: 'r', version: 1, auto_subscribe: true });
  });
  it('encodes an offer whose tracks carry previous ids on restore', () => {
    const text = encodeClientMessage({
      type: 'offer',
      sdp: 'v=0',
      tracks: [{ mid: '1', kind: 'video', source: 'camera', layers: ['low', 'medium', 'high'], track_id: 'TR_7' }],
    });
    expect(JSON.parse(text).tracks[0]).toEqual({ mid: '1', kind: 'video', source: 'camera', layers: ['low', 'medium', 'high'], track_id: 'TR_7' });
  });
  it('refuses messages over the bound and offers with too many tracks', () => {
    expect(() => encodeClientMessage({ type: 'answer', sdp: 'x'.repeat(MAX_MESSAGE_BYTES) })).toThrow(ProtocolError);
    const tracks = Array.from({ length: 17 }, (_, i) => ({ mid: String(i), kind: 'audio' as const, source: 'mic', layers: [] }));
    expect(() => encodeClientMessage({ type: 'offer', sdp: '', tracks })).toThrow(/at most 16/);
  });
});

describe('decode', () => {
  const joined = {
    type: 'joined', participant_id: 'PA_1', room: 'r', resume: 'sec', resume_grace_secs: 10, version: 1,
    participants: [{ participant_id: 'PA_2', identity: 'bob', name: 'Bob', tracks: [
      { track_id: 'TR_1', participant_id: 'PA_2', mid: '0', kind: 'video', source: 'camera', layers: ['low', 'high'], muted: false },
    ] }],
  };
  it('decodes joined; restored defaults to false', () => {
    const m = decodeServerMessage(JSON.stringify(joined));
    expect(m.type).toBe('joined');
    if (m.type !== 'joined') throw new Error();
    expect(m.restored).toBe(false);
    expect(m.participants[0]?.tracks[0]?.layers).toEqual(['low', 'high']);
    const r = decodeServerMessage(JSON.stringify({ ...joined, restored: true }));
    expect(r.type === 'joined' && r.restored).toBe(true);
  });
  it('decodes bytes, migrate, redirect, error, layer_changed', () => {
    expect(decodeServerMessage(new TextEncoder().encode('{"type":"pong","id":3}'))).toEqual({ type: 'pong', id: 3 });
    expect(decodeServerMessage('{"type":"migrate","url":"ws://h:1/signal","reason":"drain"}')).toEqual({ type: 'migrate', url: 'ws://h:1/signal', reason: 'drain' });
    expect(decodeServerMessage('{"type":"migrate","url":null,"reason":"fenced"}')).toEqual({ type: 'migrate', url: null, reason: 'fenced' });
    expect(decodeServerMessage('{"type":"redirect","region":"eu","url":"wss://eu/signal"}')).toEqual({ type: 'redirect', region: 'eu', url: 'wss://eu/signal' });
    expect(decodeServerMessage('{"type":"error","code":"unauthorized","message":"x"}')).toEqual({ type: 'error', code: 'unauthorized', message: 'x' });
    expect(decodeServerMessage('{"type":"layer_changed","track_id":"TR_1","layer":null}')).toEqual({ type: 'layer_changed', track_id: 'TR_1', layer: null });
  });
  it('refuses garbage, unknown types and wrong field types', () => {
    for (const bad of ['', 'nope', '[]', '{"type":"fly"}', '{"type":"joined"}', '{"type":"pong","id":"x"}', '{"type":"offer","sdp":1,"tracks":[]}']) {
      expect(() => decodeServerMessage(bad), bad).toThrow(ProtocolError);
    }
    expect(() => decodeServerMessage(new Uint8Array([0xff, 0xfe]))).toThrow(/UTF-8/);
  });
  it('names the rids of the layers', () => {
    expect(layerFromRid('q')).toBe('low');
    expect(layerFromRid('h')).toBe('medium');
    expect(layerFromRid('f')).toBe('high');
    expect(layerFromRid('x')).toBeUndefined();
  });
  it('describes token errors for people', () => {
    expect(describeError('unauthorized', 'token expired (token_expired)')).toMatch(/expired/);
    expect(describeError('unauthorized', 'bad (token_malformed)')).toMatch(/refused/);
    expect(describeError('unavailable', 'draining')).toMatch(/cannot take the session now/);
  });
});

describe('WebTransport framing', () => {
  it('splits a stream into length-prefixed messages, across chunk boundaries', () => {
    const a = frameMessage('{"type":"pong","id":1}');
    const b = frameMessage('{"type":"pong","id":2}');
    const all = new Uint8Array([...a, ...b]);
    const d = new FrameDecoder();
    const got: string[] = [];
    for (let i = 0; i < all.length; i += 3) for (const m of d.push(all.subarray(i, i + 3))) got.push(new TextDecoder().decode(m));
    expect(got).toEqual(['{"type":"pong","id":1}', '{"type":"pong","id":2}']);
  });
  it('refuses a frame announced over the bound', () => {
    const d = new FrameDecoder(10);
    expect(() => d.push(new Uint8Array([0, 0, 0, 11]))).toThrow(ProtocolError);
  });
});
