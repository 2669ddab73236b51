import { describe, expect, it } from 'vitest';
import type { JoinedMessage } from '../src/sdk/protocol';
import { type AttemptResult, type ConnectionState, DEFAULT_POLICY, type ReconnectPolicy, Reconnector, backoffDelay } from '../src/sdk/reconnect';
import type { NodeTarget } from '../src/sdk/transport';

const joined = (resume: string, extra: Partial<Omit<JoinedMessage, 'type'>> = {}): JoinedMessage => ({
  type: 'joined', participant_id: 'PA_1', room: 'r', participants: [], resume, resume_grace_secs: 10, version: 1, restored: false, ...extra,
});

/** A scripted world: each attempt takes the next result; sleeps are recorded, not waited. */
function harness(results: AttemptResult[], opts: { nodes?: NodeTarget[]; policy?: Partial<ReconnectPolicy>; random?: () => number } = {}) {
  const calls: { target: NodeTarget; resume: string | undefined }[] = [];
  const sleeps: number[] = [];
  const states: { state: ConnectionState; message: string }[] = [];
  const joins: { resumed: boolean; restored: boolean }[] = [];
  const r = new Reconnector({
    nodes: opts.nodes ?? [{ httpOrigin: 'http://a:1' }],
    policy: { ...DEFAULT_POLICY, ...opts.policy },
    attempt: async (target, resume) => {
      calls.push({ target, resume });
      return results.shift() ?? { kind: 'failed', message: 'node down' };
    },
    sleep: async (ms) => { sleeps.push(ms); },
    random: opts.random ?? (() => 0.5),
    onstate: (state, d) => states.push({ state, message: d.message }),
    onjoined: (j, _t, resumed) => joins.push({ resumed, restored: j.restored === true }),
  });
  return { r, calls, sleeps, states, joins };
}

describe('backoff', () => {
  it('doubles from the base up to the cap, jitter within [d(1-j), d]', () => {
    const p = DEFAULT_POLICY;
    expect(backoffDelay(1, p, () => 0)).toBe(250);
    expect(backoffDelay(1, p, () => 0.999999)).toBe(500);
    expect(backoffDelay(2, p, () => 1)).toBe(1000);
    expect(backoffDelay(5, p, () => 1)).toBe(8000);
    expect(backoffDelay(30, p, () => 1)).toBe(8000);
    for (let attempt = 1; attempt < 12; attempt++) {
      for (let i = 0; i < 50; i++) {
        const d = backoffDelay(attempt, p, Math.random);
        const cap = Math.min(p.maxMs, p.baseMs * 2 ** (attempt - 1));
        expect(d).toBeGreaterThanOrEqual(cap * (1 - p.jitter));
        expect(d).toBeLessThanOrEqual(cap);
      }
    }
  });
  it('clamps a random source that misbehaves', () => {
    expect(backoffDelay(1, DEFAULT_POLICY, () => 7)).toBe(500);
    expect(backoffDelay(1, DEFAULT_POLICY, () => -1)).toBe(250);
  });
});

describe('Reconnector', () => {
  it('connects first time without waiting', async () => {
    const h = harness([{ kind: 'joined', joined: joined('R1') }]);
    await h.r.start();
    expect(h.r.state).toBe('connected');
    expect(h.sleeps).toEqual([]);
    expect(h.calls[0]?.resume).toBeUndefined();
    expect(h.r.resumeToken).toBe('R1');
    expect(h.states.map((s) => s.state)).toEqual(['connecting', 'connected']);
  });

  it('reconnects after a drop with the resume token, backing off between failures', async () => {
    const h = harness([
      { kind: 'joined', joined: joined('R1') },
      { kind: 'failed', message: 'refused' },
      { kind: 'failed', message: 'refused' },
      { kind: 'joined', joined: joined('R2') },
    ]);
    await h.r.start();
    await h.r.lost('websocket closed');
    expect(h.r.state).toBe('connected');
    expect(h.calls.slice(1).map((c) => c.resume)).toEqual(['R1', 'R1', 'R1']);
    expect(h.r.resumeToken).toBe('R2');
    expect(h.sleeps).toEqual([375, 750, 1500]); // random 0.5: 3/4 of 500, 1000, 2000
    expect(h.states.some((s) => s.state === 'reconnecting' && /Reconnecting/.test(s.message))).toBe(true);
    expect(h.joins).toEqual([{ resumed: false, restored: false }, { resumed: true, restored: false }]);
  });

  it('gives up after maxAttempts with a clear disconnected message', async () => {
    const h = harness([{ kind: 'joined', joined: joined('R1') }], { policy: { maxAttempts: 4 } });
    await h.r.start();
    await h.r.lost('ice failed');
    expect(h.r.state).toBe('disconnected');
    expect(h.calls).toHaveLength(1 + 4);
    expect(h.sleeps).toHaveLength(4);
    expect(h.states.at(-1)?.message).toMatch(/gave up after 4 attempts \(node down\)/);
  });

  it('fails fast on a first connection to a node that is down', async () => {
    const h = harness([], { policy: { initialAttempts: 2 } });
    await h.r.start();
    expect(h.r.state).toBe('disconnected');
    expect(h.calls).toHaveLength(2);
    expect(h.states.at(-1)?.message).toMatch(/Disconnected.*node down/);
  });

  it('stops at once on a fatal error (bad or expired token)', async () => {
    const h = harness([{ kind: 'fatal', message: 'The token has expired.' }]);
    await h.r.start();
    expect(h.r.state).toBe('disconnected');
    expect(h.calls).toHaveLength(1);
    expect(h.states.at(-1)?.message).toBe('The token has expired.');
  });

  it('joins afresh when the resume token was refused', async () => {
    const h = harness([
      { kind: 'joined', joined: joined('R1') },
      { kind: 'resume_failed', message: 'grace over' },
      { kind: 'joined', joined: joined('R9', { participant_id: 'PA_9' }) },
    ]);
    await h.r.start();
    await h.r.lost('closed');
    expect(h.calls.map((c) => c.resume)).toEqual([undefined, 'R1', undefined]);
    expect(h.r.resumeToken).toBe('R9');
    expect(h.joins.at(-1)).toEqual({ resumed: false, restored: false });
  });

  it('tries the configured nodes in turn', async () => {
    const nodes = [{ httpOrigin: 'http://a:1' }, { httpOrigin: 'http://b:2' }, { httpOrigin: 'http://c:3' }];
    const h = harness([
      { kind: 'failed', message: 'a down' },
      { kind: 'failed', message: 'b down' },
      { kind: 'joined', joined: joined('R1') },
    ], { nodes });
    await h.r.start();
    expect(h.calls.map((c) => c.target.httpOrigin)).toEqual(['http://a:1', 'http://b:2', 'http://c:3']);
    expect(h.r.currentTarget.httpOrigin).toBe('http://c:3');
  });

  it('follows migrate to the given URL at once, with the resume token, and reports restored', async () => {
    const h = harness([
      { kind: 'joined', joined: joined('R1') },
      { kind: 'joined', joined: joined('R2', { restored: true }) },
    ]);
    await h.r.start();
    await h.r.migrate({ httpOrigin: 'http://other:7', signalUrl: 'ws://other:7/signal' }, 'drain');
    expect(h.calls[1]).toEqual({ target: { httpOrigin: 'http://other:7', signalUrl: 'ws://other:7/signal' }, resume: 'R1' });
    expect(h.sleeps).toEqual([]);
    expect(h.joins.at(-1)).toEqual({ resumed: true, restored: true });
  });

  it('migrate without a URL goes back to the node list', async () => {
    const h = harness([{ kind: 'joined', joined: joined('R1') }, { kind: 'joined', joined: joined('R2') }]);
    await h.r.start();
    await h.r.migrate(undefined, 'fenced');
    expect(h.calls[1]?.target).toEqual({ httpOrigin: 'http://a:1' });
    expect(h.calls[1]?.resume).toBe('R1');
  });

  it('follows a redirect without counting it as a failure, and bounds redirect loops', async () => {
    const h = harness([
      { kind: 'redirect', url: 'wss://eu.example/signal' },
      { kind: 'joined', joined: joined('R1') },
    ]);
    await h.r.start();
    expect(h.calls[1]?.target).toEqual({ httpOrigin: 'https://eu.example', signalUrl: 'wss://eu.example/signal' });
    expect(h.r.state).toBe('connected');
    const loop = harness(Array.from({ length: 20 }, () => ({ kind: 'redirect' as const, url: 'ws://x:1/signal' })));
    await loop.r.start();
    expect(loop.r.state).toBe('disconnected');
    expect(loop.states.at(-1)?.message).toMatch(/too many redirects/);
  });

  it('ignores a drop while not connected and stops after leave', async () => {
    const h = harness([{ kind: 'joined', joined: joined('R1') }]);
    await h.r.lost('x');
    expect(h.calls).toHaveLength(0);
    await h.r.start();
    h.r.leave();
    await h.r.lost('closed after leave');
    expect(h.r.state).toBe('left');
    expect(h.calls).toHaveLength(1);
  });

  it('a leave during a backoff wait ends the loop', async () => {
    let release: () => void = () => {};
    const calls: number[] = [];
    const r = new Reconnector({
      nodes: [{ httpOrigin: 'http://a:1' }],
      attempt: async () => { calls.push(1); return calls.length === 1 ? { kind: 'joined', joined: joined('R1') } : { kind: 'failed', message: 'x' }; },
      sleep: () => new Promise<void>((res) => { release = res; }),
      random: () => 0,
      onstate: () => {},
      onjoined: () => {},
    });
    await r.start();
    const p = r.lost('drop');
    r.leave();
    release();
    await p;
    expect(r.state).toBe('left');
    expect(calls).toHaveLength(1);
  });
});

describe('regions', () => {
  it('walks on to the next region when every node of one fails, joining there without the old resume token', async () => {
    const nodes: NodeTarget[] = [
      { httpOrigin: 'http://eu1:1', region: 'eu', token: 'T-eu' },
      { httpOrigin: 'http://eu2:1', region: 'eu', token: 'T-eu' },
      { httpOrigin: 'http://us1:1', region: 'us', token: 'T-us' },
    ];
    const h = harness([{ kind: 'joined', joined: joined('R1') }], { nodes });
    await h.r.start();
    expect(h.r.region).toBe('eu');
    h.calls.length = 0;
    const results: AttemptResult[] = [
      { kind: 'failed', message: 'eu1 down' },
      { kind: 'failed', message: 'eu2 down' },
      { kind: 'joined', joined: joined('R2') },
    ];
    // The harness reads the shared queue: refill it for the loss.
    const h2 = harness(results, { nodes });
    h2.r.state = 'connected';
    h2.r.resumeToken = 'R1';
    h2.r.region = 'eu';
    await h2.r.lost('signaling closed');
    expect(h2.calls.map((c) => [c.target.httpOrigin, c.resume])).toEqual([
      ['http://eu1:1', 'R1'],
      ['http://eu2:1', 'R1'],
      ['http://us1:1', undefined],
    ]);
    expect(h2.r.region).toBe('us');
    expect(h2.r.state).toBe('connected');
  });
});

