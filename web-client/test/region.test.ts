import { describe, expect, it } from 'vitest';
import { LoginRefused, explainLogin, loginToRegion, median, nodesFromLogin, probeRegion } from '../src/sdk/region';
import type { LoginResponse } from '../src/sdk/region';

const answer: LoginResponse = {
  region: 'us',
  fallback: ['eu', 'ap'],
  routes: [
    { region: 'us', token: 'T-us', signal_urls: ['ws://10.0.2.2:7880/signal', 'ws://10.0.2.3:7880/signal'], webtransport_urls: [], rtt_ms: 12.4 },
    { region: 'eu', token: 'T-eu', signal_urls: ['ws://10.0.1.2:7880/signal', 'not a url'], webtransport_urls: [], rtt_ms: 81 },
    { region: 'ap', token: 'T-ap', signal_urls: ['ws://10.0.3.2:7880/signal'], webtransport_urls: [], rtt_ms: null },
  ],
  expires_in_secs: 3600,
  reason: 'us: lowest median RTT, 12 ms over 3 probes; then eu 81 ms, ap unreachable',
};

describe('region choice helpers', () => {
  it('takes the median of the usable samples', () => {
    expect(median([10, 500, 12])).toBe(12);
    expect(median([10, 20])).toBe(15);
    expect(median([Number.NaN, -1])).toBeUndefined();
  });

  it('lists the chosen region nodes first, each with its region token, skipping bad URLs', () => {
    const nodes = nodesFromLogin(answer);
    expect(nodes.map((n) => [n.region, n.token, n.signalUrl])).toEqual([
      ['us', 'T-us', 'ws://10.0.2.2:7880/signal'],
      ['us', 'T-us', 'ws://10.0.2.3:7880/signal'],
      ['eu', 'T-eu', 'ws://10.0.1.2:7880/signal'],
      ['ap', 'T-ap', 'ws://10.0.3.2:7880/signal'],
    ]);
  });

  it('explains the choice per region for the stats panel', () => {
    const lines = explainLogin({ response: answer, rtts: [{ region: 'us', samples_ms: [12, 13, 11] }, { region: 'ap', samples_ms: [] }] });
    expect(lines[0]).toBe('us: 12 ms median over 3 probes (chosen)');
    expect(lines[2]).toBe('ap: no answer over 0 probes (fallback 2)');
  });
});

/** A scripted fetch: probe URLs answer after a virtual delay per host; /regions and /login answer as given. */
function world(login: { status: number; body: unknown }) {
  let clock = 0;
  const delays: Record<string, number> = { 'http://eu/probe': 40, 'http://us/probe': 10 };
  const requests: { url: string; body?: string }[] = [];
  const f = (async (input: RequestInfo | URL, init?: RequestInit) => {
    const url = String(input);
    requests.push({ url, body: init?.body as string | undefined });
    if (url.endsWith('/regions')) {
      return new Response(JSON.stringify({ this_region: 'eu', regions: [
        { region: 'eu', probe_url: 'http://eu/probe' },
        { region: 'us', probe_url: 'http://us/probe' },
        { region: 'ap', probe_url: 'http://ap/probe' },
      ] }));
    }
    if (url.endsWith('/login')) return new Response(JSON.stringify(login.body), { status: login.status });
    const d = delays[url];
    if (d === undefined) throw new TypeError('network error');
    clock += d;
    return new Response('{}');
  }) as typeof fetch;
  return { f, now: () => clock, requests };
}

describe('loginToRegion', () => {
  it('probes every region, sends the samples and returns the node list', async () => {
    const w = world({ status: 200, body: answer });
    const login = await loginToRegion('http://eu:7880/', 'ID', { fetch: w.f, now: w.now, samples: 3 });
    const sent = JSON.parse(w.requests.find((r) => r.url === 'http://eu:7880/login')?.body ?? '{}');
    expect(sent.identity_token).toBe('ID');
    const byRegion = Object.fromEntries(sent.rtts.map((r: { region: string; samples_ms: number[] }) => [r.region, r.samples_ms]));
    // The probes run at once on one virtual clock: each sample also counts the other
    // region's request in between, but eu stays slower than us, and ap never answers.
    expect(byRegion.eu).toHaveLength(3);
    expect(byRegion.us).toHaveLength(3);
    expect(Math.min(...byRegion.eu)).toBeGreaterThanOrEqual(40);
    expect(Math.max(...byRegion.us)).toBeLessThanOrEqual(Math.min(...byRegion.eu));
    expect(byRegion.us.reduce((a: number, b: number) => a + b, 0)).toBeLessThan(byRegion.eu.reduce((a: number, b: number) => a + b, 0));
    expect(byRegion.ap).toEqual([]);
    expect(login.nodes[0]?.token).toBe('T-us');
  });

  it('turns a refusal into a typed error with the node code', async () => {
    const w = world({ status: 401, body: { code: 'token_expired', message: 'token expired' } });
    const err = await loginToRegion('http://eu:7880', 'OLD', { fetch: w.f, now: w.now }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(LoginRefused);
    expect((err as LoginRefused).code).toBe('token_expired');
  });

  it('keeps what a slow region measured within its time bound', async () => {
    let clock = 0;
    const f = (async () => {
      clock += 400;
      return new Response('{}');
    }) as unknown as typeof fetch;
    const samples = await probeRegion('http://slow/probe', { fetch: f, now: () => clock, samples: 10, regionTimeoutMs: 1000 });
    // Warm-up at 400, samples end at 800 and 1200: the second starts before the bound.
    expect(samples).toEqual([400, 400]);
  });
});
