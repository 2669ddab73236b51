// Choosing a region: fetch the directory, time each region's probe, log in, and turn
// the answer into the node list a Room walks (the chosen region's nodes first, then
// each fallback region's, every node carrying its region's token). The ranking itself
// is the node's (`rank_regions` in meridian-protocol); `median` and `explainLogin`
// here are pure, for display.
import type { LoginError } from './generated/LoginError';
import type { LoginRequest } from './generated/LoginRequest';
import type { LoginResponse } from './generated/LoginResponse';
import type { RegionList } from './generated/RegionList';
import type { RegionProbe } from './generated/RegionProbe';
import type { RegionRoute } from './generated/RegionRoute';
import type { RegionRtt } from './generated/RegionRtt';
import { type NodeTarget, targetFromUrl } from './transport';

export type { LoginError, LoginRequest, LoginResponse, RegionList, RegionProbe, RegionRoute, RegionRtt };

/** Most samples per region (the node's bound). */
export const MAX_RTT_SAMPLES = 16;
/** Most regions probed (the node's bound). */
export const MAX_REGIONS = 32;

/** How regions are probed. */
export interface ProbeOptions {
  /** Samples per region after one warm-up request (default 5). */
  samples?: number;
  /** Longest time spent on one region, ms (default 2000). */
  regionTimeoutMs?: number;
  /** `fetch` to use (tests inject one). */
  fetch?: typeof fetch;
  /** Clock in ms (tests inject one). */
  now?: () => number;
}

/** A login refused by the node: `code` is stable (`token_expired`, `token_bad_signature`, …). */
export class LoginRefused extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(`${code}: ${message}`);
    this.name = 'LoginRefused';
  }
}

/** What {@link loginToRegion} measured and got. */
export interface RegionLogin {
  /** The node's answer: chosen region, fallback order, a token per region, and why. */
  response: LoginResponse;
  /** What was measured, per region. */
  rtts: RegionRtt[];
  /** Every region's nodes in trying order, each with its region's token. */
  nodes: NodeTarget[];
}

/** The median of the finite, non-negative samples; undefined without any. Pure. */
export function median(samples: number[]): number | undefined {
  const v = samples.filter((s) => Number.isFinite(s) && s >= 0).sort((a, b) => a - b);
  if (v.length === 0) return undefined;
  const m = Math.floor(v.length / 2);
  return v.length % 2 === 1 ? (v[m] as number) : ((v[m - 1] as number) + (v[m] as number)) / 2;
}

/** One line per region for a stats panel: region, median RTT, chosen or fallback rank. Pure. */
export function explainLogin(login: Pick<RegionLogin, 'response' | 'rtts'>): string[] {
  const { response } = login;
  return response.routes.map((r, i) => {
    const rtt = r.rtt_ms === null || r.rtt_ms === undefined ? 'no answer' : `${r.rtt_ms.toFixed(0)} ms median`;
    const samples = login.rtts.find((x) => x.region === r.region)?.samples_ms.length ?? 0;
    const role = i === 0 ? 'chosen' : `fallback ${i}`;
    return `${r.region}: ${rtt} over ${samples} probe${samples === 1 ? '' : 's'} (${role})`;
  });
}

/** The node list of a login answer: each region's WebSocket nodes in order, with its token. Pure. */
export function nodesFromLogin(response: LoginResponse): NodeTarget[] {
  const nodes: NodeTarget[] = [];
  for (const route of response.routes) {
    for (const url of route.signal_urls) {
      try {
        nodes.push({ ...targetFromUrl(url), region: route.region, token: route.token });
      } catch {
        /* a URL the browser cannot use is skipped */
      }
    }
  }
  return nodes;
}

async function withTimeout<T>(ms: number, run: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), ms);
  try {
    return await run(ctl.signal);
  } finally {
    clearTimeout(timer);
  }
}

/** Times `probeUrl`: one warm-up, then `samples` round trips, within `regionTimeoutMs`. */
export async function probeRegion(probeUrl: string, opts: ProbeOptions = {}): Promise<number[]> {
  const f = opts.fetch ?? fetch;
  const now = opts.now ?? (() => performance.now());
  const samples = Math.min(opts.samples ?? 5, MAX_RTT_SAMPLES);
  const out: number[] = [];
  const deadline = now() + (opts.regionTimeoutMs ?? 2000);
  try {
    await withTimeout(opts.regionTimeoutMs ?? 2000, async (signal) => {
      await f(probeUrl, { cache: 'no-store', signal });
      for (let i = 0; i < samples && now() < deadline; i++) {
        const t = now();
        const res = await f(probeUrl, { cache: 'no-store', signal });
        await res.text();
        if (!res.ok) break;
        out.push(now() - t);
      }
    });
  } catch {
    /* unreachable or too slow: what was measured stands */
  }
  return out;
}

/**
 * The whole flow at `nodeOrigin` (any node, e.g. the page's own): `GET /regions`, probe
 * every region at once, `POST /login` with `identityToken`. Rejects with
 * {@link LoginRefused} when the node refuses the identity token.
 */
export async function loginToRegion(nodeOrigin: string, identityToken: string, opts: ProbeOptions = {}): Promise<RegionLogin> {
  const f = opts.fetch ?? fetch;
  const base = nodeOrigin.replace(/\/+$/, '');
  const listRes = await f(`${base}/regions`, { cache: 'no-store' });
  if (!listRes.ok) throw new Error(`GET /regions: HTTP ${listRes.status}`);
  const list = (await listRes.json()) as RegionList;
  const regions = list.regions.slice(0, MAX_REGIONS);
  const rtts: RegionRtt[] = await Promise.all(
    regions.map(async (r) => ({ region: r.region, samples_ms: await probeRegion(r.probe_url, opts) })),
  );
  const body: LoginRequest = { identity_token: identityToken, rtts };
  const res = await f(`${base}/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
    cache: 'no-store',
  });
  if (!res.ok) {
    let err: LoginError = { code: `http_${res.status}`, message: res.statusText };
    try {
      err = (await res.json()) as LoginError;
    } catch {
      /* not JSON */
    }
    throw new LoginRefused(err.code, err.message);
  }
  const response = (await res.json()) as LoginResponse;
  return { response, rtts, nodes: nodesFromLogin(response) };
}
