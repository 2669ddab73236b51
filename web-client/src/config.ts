// Page settings from the address: `?token=`, `?identity=` (log in and pick a region), `?transport=auto|wt|ws`, `?nodes=url1,url2`,
// `?publish=0`, and for the dev form `?room=`, `?name=`. Pure.
import { type NodeTarget, type TransportMode, targetFromUrl } from './sdk/transport';

/** Largest token accepted from the address or the paste box (the node's bound). */
export const MAX_TOKEN_BYTES = 4096;
/** Most node URLs taken from `?nodes=`. */
export const MAX_NODES = 8;

/** What the page was asked to do. */
export interface PageConfig {
  token?: string;
  /** `?identity=`: an identity token to log in with (region chosen by probing). */
  identity?: string;
  transport: TransportMode;
  nodes: NodeTarget[];
  publish: boolean;
  room: string;
  name: string;
  /** Problems with the parameters, shown to the user. */
  warnings: string[];
}

/** Parses `location.search` against the page's own origin. */
export function parseConfig(search: string, pageOrigin: string): PageConfig {
  const q = new URLSearchParams(search);
  const warnings: string[] = [];
  const t = (q.get('transport') ?? 'auto').toLowerCase();
  let transport: TransportMode = 'auto';
  if (t === 'ws' || t === 'websocket') transport = 'ws';
  else if (t === 'wt' || t === 'webtransport') transport = 'wt';
  else if (t !== 'auto') warnings.push(`unknown transport ${JSON.stringify(t)}; using auto`);
  const nodes: NodeTarget[] = [];
  for (const raw of (q.get('nodes') ?? '').split(',').map((s) => s.trim()).filter(Boolean).slice(0, MAX_NODES)) {
    try {
      nodes.push(targetFromUrl(raw));
    } catch {
      warnings.push(`ignoring node URL ${JSON.stringify(raw)}`);
    }
  }
  if (nodes.length === 0) nodes.push({ httpOrigin: pageOrigin });
  let token = q.get('token')?.trim() || undefined;
  if (token && token.length > MAX_TOKEN_BYTES) {
    warnings.push(`the token is longer than ${MAX_TOKEN_BYTES} bytes`);
    token = undefined;
  }
  let identity = q.get('identity')?.trim() || undefined;
  if (identity && identity.length > MAX_TOKEN_BYTES) {
    warnings.push(`the identity token is longer than ${MAX_TOKEN_BYTES} bytes`);
    identity = undefined;
  }
  return {
    token,
    identity,
    transport,
    nodes,
    publish: q.get('publish') !== '0',
    room: (q.get('room') ?? 'demo').slice(0, 128),
    name: (q.get('name') ?? '').slice(0, 128),
    warnings,
  };
}

/** What the page reads from a token's payload (not verified: display only). */
export interface TokenInfo {
  identity?: string;
  name?: string;
  room?: string;
}

/** Reads identity (`sub`), display name and room from a JWT's payload, for display; `{}` when unreadable. */
export function tokenInfo(token: string): TokenInfo {
  const part = token.split('.')[1];
  if (!part) return {};
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
    const bin = atob(b64);
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    const v = JSON.parse(new TextDecoder().decode(bytes)) as Record<string, unknown>;
    const s = (k: string) => (typeof v[k] === 'string' ? (v[k] as string) : undefined);
    return { identity: s('sub'), name: s('name'), room: s('room') };
  } catch {
    return {};
  }
}
