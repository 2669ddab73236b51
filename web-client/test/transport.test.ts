import { describe, expect, it } from 'vitest';
import { connectWithFallback, originOfSignalUrl, targetFromUrl, transportOrder, webSocketUrl } from '../src/sdk/transport';
import type { Transport, TransportKind } from '../src/sdk/transport';
import { parseConfig } from '../src/config';
import { FakeTransport } from './fakes';

describe('transport choice', () => {
  it('prefers WebTransport and falls back to WebSocket in auto mode', () => {
    expect(transportOrder('auto', true)).toEqual(['webtransport', 'websocket']);
    expect(transportOrder('auto', false)).toEqual(['websocket']);
  });
  it('honours forced modes', () => {
    expect(transportOrder('ws', true)).toEqual(['websocket']);
    expect(transportOrder('wt', true)).toEqual(['webtransport']);
    expect(transportOrder('wt', false)).toEqual([]);
  });
  it('falls back to WebSocket when WebTransport fails, recording why', async () => {
    const tried: TransportKind[] = [];
    const r = await connectWithFallback(['webtransport', 'websocket'], { httpOrigin: 'http://n:1' }, async (kind) => {
      tried.push(kind);
      if (kind === 'webtransport') throw new Error('QUIC handshake failed');
      return new FakeTransport(kind) as Transport;
    });
    expect(tried).toEqual(['webtransport', 'websocket']);
    expect(r.transport.kind).toBe('websocket');
    expect(r.failures).toEqual([{ kind: 'webtransport', error: 'QUIC handshake failed' }]);
  });
  it('uses WebTransport when it works, without trying WebSocket', async () => {
    const tried: TransportKind[] = [];
    const r = await connectWithFallback(['webtransport', 'websocket'], { httpOrigin: 'http://n:1' }, async (kind) => {
      tried.push(kind);
      return new FakeTransport(kind);
    });
    expect(tried).toEqual(['webtransport']);
    expect(r.transport.kind).toBe('webtransport');
  });
  it('rejects with every failure when nothing opens', async () => {
    await expect(connectWithFallback(['webtransport', 'websocket'], { httpOrigin: 'http://n:1' }, async (k) => {
      throw new Error(`${k} down`);
    })).rejects.toThrow(/webtransport: webtransport down; websocket: websocket down/);
    await expect(connectWithFallback([], { httpOrigin: 'http://n:1' }, async () => new FakeTransport())).rejects.toThrow(/no signaling transport/);
  });
  it('maps node URLs to targets', () => {
    expect(targetFromUrl('ws://h:7880/signal')).toEqual({ httpOrigin: 'http://h:7880', signalUrl: 'ws://h:7880/signal' });
    expect(targetFromUrl('wss://h/signal')).toEqual({ httpOrigin: 'https://h', signalUrl: 'wss://h/signal' });
    expect(targetFromUrl('https://h:7881/signal')).toEqual({ httpOrigin: 'https://h:7881', signalUrl: 'https://h:7881/signal' });
    expect(targetFromUrl('http://h:7880')).toEqual({ httpOrigin: 'http://h:7880' });
    expect(() => targetFromUrl('ftp://h')).toThrow();
    expect(webSocketUrl({ httpOrigin: 'http://h:1' })).toBe('ws://h:1/signal');
    expect(webSocketUrl({ httpOrigin: 'https://h' })).toBe('wss://h/signal');
    expect(originOfSignalUrl('wss://h:2/signal')).toBe('https://h:2');
  });
});

describe('page config', () => {
  it('reads token, transport, nodes and publish', () => {
    const c = parseConfig('?token=abc&transport=ws&nodes=ws://a:1/signal,http://b:2,bogus&publish=0', 'http://page:9');
    expect(c.token).toBe('abc');
    expect(c.transport).toBe('ws');
    expect(c.nodes).toEqual([{ httpOrigin: 'http://a:1', signalUrl: 'ws://a:1/signal' }, { httpOrigin: 'http://b:2' }]);
    expect(c.publish).toBe(false);
    expect(c.warnings).toHaveLength(1);
  });
  it('defaults to auto transport and the page origin', () => {
    const c = parseConfig('', 'http://page:9');
    expect(c).toMatchObject({ transport: 'auto', nodes: [{ httpOrigin: 'http://page:9' }], publish: true, token: undefined });
    expect(parseConfig('?transport=wt', 'http://p').transport).toBe('wt');
    expect(parseConfig('?transport=carrier-pigeon', 'http://p').warnings[0]).toMatch(/unknown transport/);
    expect(parseConfig(`?token=${'x'.repeat(5000)}`, 'http://p').token).toBeUndefined();
  });
});
