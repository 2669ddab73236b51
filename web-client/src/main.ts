// The page: join form (dev mode) or token box, the tile grid, controls and the stats
// panel. All protocol and connection logic lives in the DOM-free modules.
import './style.css';
import { parseConfig, MAX_TOKEN_BYTES } from './config';
import type { ParticipantInfo } from './protocol';
import type { ConnectionState, StateDetail } from './reconnect';
import { Session, type SessionView } from './session';
import type { StatsSummary } from './stats';

const $ = <T extends HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing #${id}`);
  return el as T;
};

const config = parseConfig(location.search, location.origin);
const statusEl = $('status');
const notices = $('notices');
const tiles = $('tiles');
const statsEl = $('stats');
const badge = $('transport-badge');

/** Everything a test or a curious developer can read: `window.meridian`. */
interface Hook {
  session: Session | null;
  statusHistory: string[];
  errors: string[];
  stats: () => Promise<unknown>;
  state: () => ConnectionState | 'idle';
}
const hook: Hook = {
  session: null,
  statusHistory: [],
  errors: [],
  stats: async () => (hook.session ? hook.session.stats() : null),
  state: () => hook.session?.state ?? 'idle',
};
(window as unknown as { meridian: Hook }).meridian = hook;

function showStatus(text: string, cls: string): void {
  statusEl.textContent = text;
  statusEl.className = cls;
  hook.statusHistory.push(text);
  if (hook.statusHistory.length > 200) hook.statusHistory.shift();
}

function notice(text: string): void {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  notices.prepend(li);
  while (notices.children.length > 20) notices.lastElementChild?.remove();
}

// Nothing may fail silently: show unexpected errors on the page.
window.addEventListener('unhandledrejection', (ev) => {
  const msg = ev.reason instanceof Error ? ev.reason.message : String(ev.reason);
  hook.errors.push(msg);
  notice(`unexpected error: ${msg}`);
  ev.preventDefault();
});

for (const w of config.warnings) notice(w);

// ---- tiles ----

const names = new Map<string, string>();

function tileFor(participantId: string): HTMLElement {
  let tile = tiles.querySelector<HTMLElement>(`.tile[data-participant="${CSS.escape(participantId)}"]`);
  if (!tile) {
    tile = document.createElement('div');
    tile.className = 'tile';
    tile.dataset.participant = participantId;
    const video = document.createElement('video');
    video.autoplay = true;
    video.playsInline = true;
    video.muted = true;
    const none = document.createElement('div');
    none.className = 'novideo';
    none.textContent = 'no video';
    const name = document.createElement('div');
    name.className = 'name';
    const badges = document.createElement('div');
    badges.className = 'badges';
    tile.append(video, none, name, badges);
    tiles.append(tile);
  }
  const label = tile.querySelector('.name');
  if (label) label.textContent = participantId === 'self' ? `You${names.get('self') ? ` (${names.get('self')})` : ''}` : (names.get(participantId) ?? participantId);
  return tile;
}

function setBadge(tile: HTMLElement, key: string, text: string | null): void {
  const badges = tile.querySelector('.badges');
  if (!badges) return;
  let b = badges.querySelector<HTMLElement>(`[data-badge="${key}"]`);
  if (!text) { b?.remove(); return; }
  if (!b) { b = document.createElement('span'); b.dataset.badge = key; badges.append(b); }
  b.textContent = text;
}

const trackOwner = new Map<string, { participant: string; kind: string }>();

const view: SessionView = {
  state(state: ConnectionState, detail: StateDetail) {
    const cls = `state-${state}`;
    const text = state === 'connected'
      ? `Connected — room ${hook.session?.room ?? ''} as ${hook.session?.participantId ?? ''}`
      : detail.message;
    showStatus(text, cls);
    if (state === 'connected' && hook.session) {
      badge.hidden = false;
      badge.textContent = `via ${hook.session.transportKind === 'webtransport' ? 'WebTransport' : 'WebSocket'} ${hook.session.transportUrl}`;
    }
    if (state === 'disconnected' || state === 'left') {
      badge.hidden = true;
      if (state === 'disconnected') showRejoin(detail.message);
    }
  },
  participants(list: ParticipantInfo[]) {
    const ids = new Set(list.map((p) => p.participant_id));
    for (const p of list) {
      names.set(p.participant_id, p.name || p.identity);
      const tile = tileFor(p.participant_id);
      const mic = p.tracks.find((t) => t.kind === 'audio');
      const cam = p.tracks.find((t) => t.kind === 'video');
      for (const t of p.tracks) trackOwner.set(t.track_id, { participant: p.participant_id, kind: t.kind });
      setBadge(tile, 'mic', mic?.muted ? 'mic muted' : null);
      setBadge(tile, 'cam', cam?.muted ? 'camera off' : null);
    }
    for (const tile of tiles.querySelectorAll<HTMLElement>('.tile')) {
      const id = tile.dataset.participant ?? '';
      if (id !== 'self' && !ids.has(id)) tile.remove();
    }
  },
  remoteTrack(participantId: string, trackId: string, track: MediaStreamTrack) {
    trackOwner.set(trackId, { participant: participantId, kind: track.kind });
    const tile = tileFor(participantId);
    if (track.kind === 'video') {
      const video = tile.querySelector('video');
      if (video) {
        video.srcObject = new MediaStream([track]);
        video.dataset.track = trackId;
        video.play().catch(() => {});
      }
      tile.querySelector('.novideo')?.setAttribute('hidden', '');
    } else {
      let audio = tile.querySelector<HTMLAudioElement>(`audio[data-track="${CSS.escape(trackId)}"]`);
      if (!audio) {
        audio = document.createElement('audio');
        audio.autoplay = true;
        audio.dataset.track = trackId;
        tile.append(audio);
      }
      audio.srcObject = new MediaStream([track]);
      audio.play().catch(() => {});
    }
  },
  remoteTrackGone(trackId: string) {
    for (const el of tiles.querySelectorAll<HTMLMediaElement>(`[data-track="${CSS.escape(trackId)}"]`)) {
      el.srcObject = null;
      if (el.tagName === 'AUDIO') el.remove();
      else { delete el.dataset.track; el.parentElement?.querySelector('.novideo')?.removeAttribute('hidden'); }
    }
  },
  localStream(stream: MediaStream | null) {
    const tile = tileFor('self');
    const video = tile.querySelector('video');
    if (video) { video.srcObject = stream; video.play().catch(() => {}); }
    if (stream?.getVideoTracks().length) tile.querySelector('.novideo')?.setAttribute('hidden', '');
    else tile.querySelector('.novideo')?.removeAttribute('hidden');
  },
  muted(trackId: string, muted: boolean) {
    const own = hook.session?.ownTracks().find((t) => t.track_id === trackId);
    const owner = own ? { participant: 'self', kind: own.kind } : trackOwner.get(trackId);
    if (!owner) return;
    const tile = tileFor(owner.participant);
    if (owner.kind === 'audio') setBadge(tile, 'mic', muted ? 'mic muted' : null);
    else setBadge(tile, 'cam', muted ? 'camera off' : null);
  },
  notice,
};

// ---- stats panel ----

const fmt = (v: number | undefined, digits = 0) => (v === undefined ? '–' : v.toFixed(digits));

function renderStats(s: StatsSummary & { transport: string | null; signalingRttMs?: number }): void {
  const rows = s.tiles.map((t) => {
    const who = t.trackId ? (names.get(trackOwner.get(t.trackId)?.participant ?? '') ?? t.trackId) : t.mid;
    return `<tr><td>${escapeHtml(who)}</td><td>${t.layer ?? '–'}</td><td>${t.width ?? '–'}×${t.height ?? '–'}</td><td>${fmt(t.fps)}</td><td>${t.kbps}</td><td>${t.framesDecoded}</td><td>${t.packetsLost}</td><td>${t.freezeCount}</td></tr>`;
  }).join('');
  const sent = s.layersSent.map((l) => `${l.rid}: ${l.width ?? '?'}×${l.height ?? '?'} ${fmt(l.fps)} fps ${l.kbps} kbit/s${l.limitation && l.limitation !== 'none' ? ` (${l.limitation})` : ''}`).join(' · ');
  statsEl.innerHTML = `
    <div>transport <b data-stat="transport">${s.transport ?? '–'}</b> · ICE RTT <b data-stat="rtt">${fmt(s.rttMs)}</b> ms · signaling RTT ${fmt(s.signalingRttMs)} ms
    · in <b data-stat="kbps-in">${s.kbpsIn}</b> kbit/s · out <b data-stat="kbps-out">${s.kbpsOut}</b> kbit/s
    · loss <b data-stat="loss">${fmt(s.lossPct, 2)}</b> % · frames decoded <b data-stat="frames-decoded">${s.framesDecoded}</b>
    · freezes <b data-stat="freezes">${s.freezeCount}</b></div>
    <div>sending ${sent || '–'}</div>
    <table><thead><tr><th>tile</th><th>layer</th><th>size</th><th>fps</th><th>kbit/s</th><th>frames</th><th>lost</th><th>freezes</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c] ?? c);
}

let statsTimer: ReturnType<typeof setInterval> | null = null;

// ---- joining ----

function showRejoin(message: string): void {
  let el = document.getElementById('fatal');
  if (!el) {
    el = document.createElement('div');
    el.id = 'fatal';
    $('call').after(el);
  }
  el.textContent = '';
  const p = document.createElement('p');
  p.textContent = message;
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = 'Try again';
  b.onclick = () => location.reload();
  el.append(p, b);
  showStatus(message, 'state-disconnected');
}

function join(token: string, publish: boolean, refreshToken?: () => Promise<string>): void {
  $('join').hidden = true;
  $('call').hidden = false;
  document.getElementById('fatal')?.remove();
  const session = new Session({ token, refreshToken, nodes: config.nodes, transport: config.transport, publish }, view);
  hook.session = session;
  tileFor('self');
  const muteA = $<HTMLButtonElement>('mute-audio');
  const muteV = $<HTMLButtonElement>('mute-video');
  muteA.hidden = muteV.hidden = !publish;
  muteA.onclick = () => {
    const m = !session.isMuted('audio');
    session.setMuted('audio', m);
    muteA.textContent = m ? 'Unmute microphone' : 'Mute microphone';
    muteA.classList.toggle('on', m);
  };
  muteV.onclick = () => {
    const m = !session.isMuted('video');
    session.setMuted('video', m);
    muteV.textContent = m ? 'Start camera' : 'Stop camera';
    muteV.classList.toggle('on', m);
  };
  $('leave').onclick = () => {
    session.leave();
    if (statsTimer) clearInterval(statsTimer);
    for (const t of tiles.querySelectorAll('.tile')) t.remove();
  };
  $('toggle-stats').onclick = () => { statsEl.hidden = !statsEl.hidden; };
  statsTimer = setInterval(() => {
    session.stats().then(renderStats, () => {});
  }, 1000);
  session.start().catch((e: unknown) => showRejoin(`Could not join: ${e instanceof Error ? e.message : String(e)}`));
}

interface DevForm { room: string; identity: string; name: string; publish: boolean }

async function mintDevToken(f: DevForm): Promise<string> {
  const origin = config.nodes[0]?.httpOrigin ?? location.origin;
  const res = await fetch(`${origin}/dev/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ room: f.room, identity: f.identity, name: f.name || undefined, publish: f.publish, subscribe: true }),
  });
  if (!res.ok) throw new Error(`the node refused to mint a token: HTTP ${res.status} ${(await res.text()).slice(0, 200)}`);
  const body = (await res.json()) as { token?: unknown };
  if (typeof body.token !== 'string') throw new Error('the node answered without a token');
  return body.token;
}

async function devMode(): Promise<boolean> {
  try {
    const res = await fetch(`${location.origin}/dev/token`, { cache: 'no-store' });
    return res.ok;
  } catch {
    return false;
  }
}

async function init(): Promise<void> {
  if (config.token) {
    join(config.token, config.publish);
    return;
  }
  $('join').hidden = false;
  if (await devMode()) {
    const form = $<HTMLFormElement>('dev-form');
    form.hidden = false;
    const room = form.elements.namedItem('room') as HTMLInputElement;
    const identity = form.elements.namedItem('identity') as HTMLInputElement;
    const name = form.elements.namedItem('name') as HTMLInputElement;
    const publish = form.elements.namedItem('publish') as HTMLInputElement;
    room.value = config.room;
    name.value = config.name;
    publish.checked = config.publish;
    showStatus('Choose a room and a name, then join.', 'state-idle');
    form.onsubmit = (ev) => {
      ev.preventDefault();
      const f: DevForm = { room: room.value.trim(), identity: identity.value.trim(), name: name.value.trim(), publish: publish.checked };
      names.set('self', f.name || f.identity);
      mintDevToken(f).then(
        (token) => join(token, f.publish, () => mintDevToken(f)),
        (e: unknown) => showStatus(`Could not get a token: ${e instanceof Error ? e.message : String(e)}`, 'error'),
      );
    };
  } else {
    const form = $<HTMLFormElement>('token-form');
    form.hidden = false;
    showStatus('No token: paste one below or open this page with ?token=…', 'state-idle');
    form.onsubmit = (ev) => {
      ev.preventDefault();
      const token = (form.elements.namedItem('token') as HTMLTextAreaElement).value.trim();
      const publish = (form.elements.namedItem('publish') as HTMLInputElement).checked;
      if (!token || token.length > MAX_TOKEN_BYTES) {
        showStatus(`A token is 1 to ${MAX_TOKEN_BYTES} characters.`, 'error');
        return;
      }
      join(token, publish);
    };
  }
}

init().catch((e: unknown) => showStatus(`The page failed to start: ${e instanceof Error ? e.message : String(e)}`, 'error'));
