import { describe, expect, it, vi } from 'vitest';
import { SignalingClient, SignalingError } from '../src/sdk/signaling';
import { FakeTransport } from './fakes';

const joined = { type: 'joined', participant_id: 'PA_1', room: 'r', participants: [], resume: 'R1', resume_grace_secs: 10, version: 1 };

describe('SignalingClient', () => {
  it('joins with the resume token and resolves on joined', async () => {
    const t = new FakeTransport();
    const c = new SignalingClient(t);
    const p = c.joinRoom('tok', 'R0');
    expect(t.sent[0]).toMatchObject({ type: 'join', token: 'tok', resume: 'R0', version: 1 });
    t.deliver(joined);
    await expect(p).resolves.toMatchObject({ kind: 'joined', joined: { participant_id: 'PA_1', resume: 'R1' } });
  });
  it('omits resume on a first join', () => {
    const t = new FakeTransport();
    void new SignalingClient(t).joinRoom('tok');
    expect(t.sent[0]).not.toHaveProperty('resume');
  });
  it('rejects a join with the error code', async () => {
    const t = new FakeTransport();
    const p = new SignalingClient(t).joinRoom('bad');
    t.deliver({ type: 'error', code: 'unauthorized', message: 'token_malformed' });
    await expect(p).rejects.toMatchObject({ code: 'unauthorized' });
  });
  it('resolves a redirect', async () => {
    const t = new FakeTransport();
    const p = new SignalingClient(t).joinRoom('tok');
    t.deliver({ type: 'redirect', region: 'eu', url: 'wss://eu.example/signal' });
    await expect(p).resolves.toEqual({ kind: 'redirect', region: 'eu', url: 'wss://eu.example/signal' });
  });
  it('matches answers to offers in order and pongs by id', async () => {
    let now = 100;
    const t = new FakeTransport();
    const c = new SignalingClient(t, () => now);
    const a = c.offer('o1', []);
    const b = c.offer('o2', []);
    const ping = c.ping();
    t.deliver({ type: 'answer', sdp: 'a1', tracks: [] });
    t.deliver({ type: 'answer', sdp: 'a2', tracks: [] });
    now = 142;
    t.deliver({ type: 'pong', id: (t.sent[2] as { id: number }).id });
    await expect(a).resolves.toMatchObject({ sdp: 'a1' });
    await expect(b).resolves.toMatchObject({ sdp: 'a2' });
    await expect(ping).resolves.toBe(42);
  });
  it('rejects a pending offer on invalid_sdp and hands other messages to onevent', async () => {
    const t = new FakeTransport();
    const c = new SignalingClient(t);
    const events: string[] = [];
    c.onevent = (m) => events.push(m.type);
    const p = c.offer('bad', []);
    t.deliver({ type: 'error', code: 'invalid_sdp', message: 'nope' });
    await expect(p).rejects.toBeInstanceOf(SignalingError);
    t.deliver({ type: 'participant_left', participant_id: 'PA_2' });
    t.deliver({ type: 'migrate', url: null, reason: 'drain' });
    t.deliver({ type: 'error', code: 'rate_limited', message: 'slow down' });
    expect(events).toEqual(['participant_left', 'migrate', 'error']);
  });
  it('queues events that arrive with joined until a handler is attached', async () => {
    const t = new FakeTransport();
    const c = new SignalingClient(t);
    const p = c.joinRoom('tok');
    t.deliver(joined);
    t.deliver({ type: 'offer', sdp: 'o', tracks: [] });
    await p;
    const events: string[] = [];
    c.onevent = (m) => events.push(m.type);
    t.deliver({ type: 'participant_left', participant_id: 'PA_3' });
    expect(events).toEqual(['offer', 'participant_left']);
  });
  it('reports undecodable messages without throwing', () => {
    const t = new FakeTransport();
    const c = new SignalingClient(t);
    const bad = vi.fn();
    c.onprotocolerror = bad;
    t.onmessage('{"type":"fly"}');
    expect(bad).toHaveBeenCalledOnce();
  });
  it('rejects everything pending when the transport drops, once', async () => {
    const t = new FakeTransport();
    const c = new SignalingClient(t);
    const closes = vi.fn();
    c.onclose = closes;
    const j = c.joinRoom('tok');
    const p = c.ping();
    t.drop();
    await expect(j).rejects.toMatchObject({ code: 'closed' });
    await expect(p).rejects.toMatchObject({ code: 'closed' });
    c.close();
    expect(closes).toHaveBeenCalledOnce();
    await expect(c.ping()).rejects.toMatchObject({ code: 'closed' });
  });
  it('times out a join the node never answers', async () => {
    vi.useFakeTimers();
    try {
      const t = new FakeTransport();
      const p = new SignalingClient(t, () => 0, 1000).joinRoom('tok');
      vi.advanceTimersByTime(1001);
      await expect(p).rejects.toMatchObject({ code: 'timeout' });
    } finally {
      vi.useRealTimers();
    }
  });
});
