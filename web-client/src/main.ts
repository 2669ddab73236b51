// The meeting page: a pre-join screen (camera and microphone choice with a preview),
// the call (tiles with names, active speaker, connection quality; a participant list;
// mute, screen share, leave, stats) and the "Join again" screen. Everything about the
// connection goes through the SDK's public API (`./sdk`).
import './style.css';
import { MAX_TOKEN_BYTES, parseConfig, tokenInfo } from './config';
import {
  type ConnectionState,
  type ParticipantInfo,
  Room,
  type StateDetail,
  type StatsSummary,
  type TransportKind,
  type RegionLogin,
  explainLogin,
  loginToRegion,
} from './sdk';

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
const whoami = $('whoami');
const people = $('participant-list');

/** Everything a test or a curious developer can read: `window.meridian`. */
interface Hook {
  session: Room | null;
  statusHistory: string[];
  errors: string[];
  stats: () => Promise<unknown>;
  state: () => ConnectionState | 'idle';
  /** Display name of the active speaker (the own name included), or null. */
  activeSpeaker: () => string | null;
}
const hook: Hook = {
  session: null,
  statusHistory: [],
  errors: [],
  stats: async () => (hook.session ? hook.session.stats() : null),
  state: () => hook.session?.state ?? 'idle',
  activeSpeaker: () => {
    const id = hook.session?.activeSpeaker ?? null;
    if (id === null) return null;
    return id === hook.session?.participantId ? selfName : (names.get(id) ?? id);
  },
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

// ---- screens ----

type Screen = 'join' | 'call' | 'ended';
function showScreen(s: Screen): void {
  $('join').hidden = s !== 'join';
  $('call').hidden = s !== 'call';
  $('ended').hidden = s !== 'ended';
}

function setWhoami(name: string): void {
  selfName = name;
  whoami.hidden = !name;
  whoami.textContent = name ? `Signed in as ${name}` : '';
}

// ---- tiles ----

const names = new Map<string, string>();
let selfName = '';
let speaking: string | null = null;

/** The tile of a participant's camera (`camera`) or screen share (`screen`); `self` is us. */
function tileFor(participantId: string, source = 'camera'): HTMLElement {
  const sel = `.tile[data-participant="${CSS.escape(participantId)}"][data-source="${source}"]`;
  let tile = tiles.querySelector<HTMLElement>(sel);
  if (!tile) {
    tile = document.createElement('div');
    tile.className = source === 'screen' ? 'tile screen' : 'tile';
    tile.dataset.participant = participantId;
    tile.dataset.source = source;
    const video = document.createElement('video');
    video.autoplay = true;
    video.playsInline = true;
    video.muted = true;
    const none = document.createElement('div');
    none.className = 'novideo';
    none.textContent = source === 'screen' ? 'no screen' : 'no video';
    const name = document.createElement('div');
    name.className = 'name';
    const badges = document.createElement('div');
    badges.className = 'badges';
    tile.append(video, none, name, badges);
    // Screen shares first: they are what people look at.
    if (source === 'screen') tiles.prepend(tile);
    else tiles.append(tile);
  }
  const who = participantId === 'self' ? `You${selfName ? ` (${selfName})` : ''}` : (names.get(participantId) ?? participantId);
  const label = tile.querySelector('.name');
  if (label) label.textContent = source === 'screen' ? `${who} — screen` : who;
  tile.querySelector('video')?.setAttribute('aria-label', source === 'screen' ? `${who}'s screen` : `${who}'s camera`);
  return tile;
}

function setBadge(tile: HTMLElement, key: string, text: string | null, title?: string, cls?: string): void {
  const badges = tile.querySelector('.badges');
  if (!badges) return;
  let b = badges.querySelector<HTMLElement>(`[data-badge="${key}"]`);
  if (!text) { b?.remove(); return; }
  if (!b) { b = document.createElement('span'); b.dataset.badge = key; badges.append(b); }
  b.textContent = text;
  if (title) { b.title = title; b.setAttribute('aria-label', title); }
  if (cls) b.className = cls;
}

function tileKeyOf(participantId: string): string {
  return participantId === room?.participantId ? 'self' : participantId;
}

function setSpeaking(id: string | null): void {
  speaking = id;
  const key = id === null ? null : tileKeyOf(id);
  for (const t of tiles.querySelectorAll<HTMLElement>('.tile')) {
    t.classList.toggle('speaking', key !== null && t.dataset.participant === key && t.dataset.source === 'camera');
  }
  renderPeople();
}

function renderPeople(): void {
  if (!room) return;
  const r = room;
  const rows: { id: string; name: string; you: boolean; mic: boolean; cam: boolean; screen: boolean }[] = [];
  const ownMicMuted = r.isMuted('audio');
  const ownCamMuted = r.isMuted('video');
  rows.push({ id: r.participantId, name: selfName || 'You', you: true, mic: !ownMicMuted && r.publishes, cam: !ownCamMuted && r.publishes, screen: r.sharingScreen });
  for (const p of r.participants()) {
    const mic = p.tracks.find((t) => t.source === 'microphone' || (t.kind === 'audio' && t.source !== 'screen'));
    const cam = p.tracks.find((t) => t.source === 'camera' || (t.kind === 'video' && t.source === ''));
    rows.push({
      id: p.participant_id,
      name: p.name || p.identity,
      you: false,
      mic: !!mic && !mic.muted,
      cam: !!cam && !cam.muted,
      screen: p.tracks.some((t) => t.source === 'screen'),
    });
  }
  people.textContent = '';
  for (const row of rows) {
    const li = document.createElement('li');
    li.dataset.participant = row.you ? 'self' : row.id;
    if (speaking !== null && speaking === row.id) li.classList.add('speaking');
    const n = document.createElement('span');
    n.className = 'who';
    n.textContent = row.you ? `${row.name} (you)` : row.name;
    const state = document.createElement('span');
    state.className = 'state';
    state.dataset.mic = row.mic ? 'on' : 'muted';
    const bits = [row.mic ? 'mic on' : 'mic muted', row.cam ? 'camera on' : 'camera off'];
    if (row.screen) bits.push('sharing screen');
    if (speaking !== null && speaking === row.id) bits.push('speaking');
    state.textContent = bits.join(' · ');
    li.append(n, state);
    people.append(li);
  }
}

function attachVideo(tile: HTMLElement, stream: MediaStream | null, trackId?: string): void {
  const video = tile.querySelector('video');
  if (video) {
    video.srcObject = stream;
    if (trackId) video.dataset.track = trackId;
    else delete video.dataset.track;
    if (stream) video.play().catch(() => {});
  }
  if (stream?.getVideoTracks().length) tile.querySelector('.novideo')?.setAttribute('hidden', '');
  else tile.querySelector('.novideo')?.removeAttribute('hidden');
}

// ---- the room ----

let room: Room | null = null;
let statsTimer: ReturnType<typeof setInterval> | null = null;
/** How to join again after leaving: back to the pre-join form, or the same token. */
let rejoin: (() => void) | null = null;

function wire(r: Room): void {
  r.on('state', ({ state, detail }) => onState(r, state, detail));
  r.on('participants', (list: ParticipantInfo[]) => {
    if (room !== r) return;
    const ids = new Set(list.map((p) => p.participant_id));
    for (const p of list) {
      names.set(p.participant_id, p.name || p.identity);
      const tile = tileFor(p.participant_id);
      const mic = p.tracks.find((t) => t.kind === 'audio');
      const cam = p.tracks.find((t) => t.kind === 'video' && t.source !== 'screen');
      setBadge(tile, 'mic', mic?.muted ? 'mic muted' : null);
      setBadge(tile, 'cam', cam?.muted ? 'camera off' : null);
      if (!p.tracks.some((t) => t.source === 'screen')) tiles.querySelector(`.tile[data-participant="${CSS.escape(p.participant_id)}"][data-source="screen"]`)?.remove();
    }
    for (const tile of tiles.querySelectorAll<HTMLElement>('.tile')) {
      const id = tile.dataset.participant ?? '';
      if (id !== 'self' && !ids.has(id)) tile.remove();
    }
    renderPeople();
  });
  r.on('trackSubscribed', ({ participantId, trackId, source, track }) => {
    if (room !== r) return;
    if (track.kind === 'video') {
      attachVideo(tileFor(participantId, source === 'screen' ? 'screen' : 'camera'), new MediaStream([track]), trackId);
    } else {
      const tile = tileFor(participantId);
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
  });
  r.on('trackUnsubscribed', ({ trackId }) => {
    for (const el of tiles.querySelectorAll<HTMLMediaElement>(`[data-track="${CSS.escape(trackId)}"]`)) {
      el.srcObject = null;
      const tile = el.closest<HTMLElement>('.tile');
      if (el.tagName === 'AUDIO') el.remove();
      else if (tile?.dataset.source === 'screen') tile.remove();
      else { delete el.dataset.track; tile?.querySelector('.novideo')?.removeAttribute('hidden'); }
    }
  });
  r.on('localStream', (stream) => { if (room === r) attachVideo(tileFor('self'), stream); });
  r.on('localScreen', (stream) => {
    if (room !== r) return;
    const btn = $<HTMLButtonElement>('share-screen');
    btn.textContent = stream ? 'Stop sharing' : 'Share screen';
    btn.setAttribute('aria-pressed', String(!!stream));
    btn.classList.toggle('on', !!stream);
    if (stream) attachVideo(tileFor('self', 'screen'), stream);
    else tiles.querySelector('.tile[data-participant="self"][data-source="screen"]')?.remove();
    renderPeople();
  });
  r.on('muted', ({ trackId, muted, participantId, local }) => {
    if (room !== r) return;
    const info = local ? r.ownTracks().find((t) => t.track_id === trackId) : r.trackInfo(trackId);
    const tile = tileFor(local ? 'self' : participantId);
    if (info?.kind === 'audio') setBadge(tile, 'mic', muted ? 'mic muted' : null);
    else if (info?.source !== 'screen') setBadge(tile, 'cam', muted ? 'camera off' : null);
    renderPeople();
  });
  r.on('activeSpeaker', ({ participantId }) => { if (room === r) setSpeaking(participantId); });
  r.on('ended', ({ message }) => { if (room === r) showEnded(message); });
  r.on('notice', notice);
}

function onState(r: Room, state: ConnectionState, detail: StateDetail): void {
  if (room !== r) return;
  const cls = `state-${state}`;
  if (state === 'connected') {
    showStatus(`Connected — room ${r.room}${selfName ? ` as ${selfName}` : ''}`, cls);
    badge.hidden = false;
    badge.textContent = `via ${r.transportKind === 'webtransport' ? 'WebTransport' : 'WebSocket'}`;
    badge.title = r.transportUrl;
    document.getElementById('fatal')?.remove();
    renderPeople();
  } else if (state === 'disconnected') {
    badge.hidden = true;
    const probing = !detail.fatal;
    showStatus(probing ? `${detail.message} Still checking every few seconds; the page rejoins when the node is back.` : detail.message, cls);
    if (!$('ended').hidden) return; // the node ended the session: the ended screen says why
    showRejoin(detail.message, r, probing);
  } else if (state === 'left') {
    badge.hidden = true;
    showStatus(detail.message, cls);
  } else {
    badge.hidden = true;
    showStatus(detail.message, cls);
  }
}

function showRejoin(message: string, r: Room, probing: boolean): void {
  let el = document.getElementById('fatal');
  if (!el) {
    el = document.createElement('div');
    el.id = 'fatal';
    el.setAttribute('role', 'alert');
    $('call').before(el);
  }
  el.textContent = '';
  const p = document.createElement('p');
  p.textContent = probing ? `${message} The page keeps checking and rejoins by itself.` : message;
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = 'Try again';
  b.onclick = () => {
    el?.remove();
    // A bad or expired token needs a new one: back to the form (fields kept); an
    // unreachable node is simply tried again.
    if (probing) void r.reconnect();
    else { stopRoom(); rejoin?.(); }
  };
  el.append(p, b);
}

function stopRoom(): void {
  if (statsTimer) clearInterval(statsTimer);
  statsTimer = null;
  if (room) room.leave();
  room = null;
  hook.session = null;
  speaking = null;
  tiles.textContent = '';
  people.textContent = '';
  statsEl.hidden = true;
  document.getElementById('fatal')?.remove();
}

function showEnded(message: string): void {
  if (statsTimer) clearInterval(statsTimer);
  statsTimer = null;
  tiles.textContent = '';
  people.textContent = '';
  document.getElementById('fatal')?.remove();
  $('ended-message').textContent = message;
  showScreen('ended');
  showStatus(message, 'state-disconnected');
  $('join-again').focus();
}

$('join-again').onclick = () => {
  const r = room;
  room = null;
  hook.session = null;
  if (r && r.state !== 'left') r.leave();
  rejoin?.();
};

/** The region login of this page (`?identity=`), shown in the stats panel. */
let regionLogin: RegionLogin | null = null;

function join(token: string, publish: boolean, media?: MediaStream, refreshToken?: () => Promise<string>): void {
  const info = tokenInfo(token);
  if (!selfName) setWhoami(info.name || info.identity || '');
  showScreen('call');
  document.getElementById('fatal')?.remove();
  const nodes = regionLogin ? regionLogin.nodes : config.nodes;
  const r = new Room({ token, refreshToken, nodes, transport: config.transport, publish, media });
  room = r;
  hook.session = r;
  wire(r);
  const self = tileFor('self');
  if (media) attachVideo(self, media);
  const muteA = $<HTMLButtonElement>('mute-audio');
  const muteV = $<HTMLButtonElement>('mute-video');
  const share = $<HTMLButtonElement>('share-screen');
  muteA.hidden = muteV.hidden = !publish;
  share.hidden = !publish || !navigator.mediaDevices?.getDisplayMedia;
  const paint = (b: HTMLButtonElement, on: boolean, onText: string, offText: string) => {
    b.textContent = on ? onText : offText;
    b.classList.toggle('on', on);
    b.setAttribute('aria-pressed', String(on));
  };
  paint(muteA, false, 'Unmute microphone', 'Mute microphone');
  paint(muteV, false, 'Start camera', 'Stop camera');
  paint(share, false, 'Stop sharing', 'Share screen');
  muteA.onclick = () => {
    const m = !r.isMuted('audio');
    r.setMuted('audio', m);
    paint(muteA, m, 'Unmute microphone', 'Mute microphone');
    renderPeople();
  };
  muteV.onclick = () => {
    const m = !r.isMuted('video');
    r.setMuted('video', m);
    paint(muteV, m, 'Start camera', 'Stop camera');
    renderPeople();
  };
  share.onclick = () => {
    if (r.sharingScreen) void r.stopScreenShare();
    else r.startScreenShare().catch((e: unknown) => notice(`screen share: ${e instanceof Error ? e.message : String(e)}`));
  };
  $('leave').onclick = () => {
    stopRoom();
    showStatus('You left the room.', 'state-left');
    $('ended-message').textContent = 'You left the room.';
    showScreen('ended');
    $('join-again').focus();
  };
  const toggle = $<HTMLButtonElement>('toggle-stats');
  toggle.onclick = () => {
    statsEl.hidden = !statsEl.hidden;
    toggle.setAttribute('aria-expanded', String(!statsEl.hidden));
  };
  statsTimer = setInterval(() => {
    r.stats().then(renderStats, () => {});
  }, 1000);
  void r.connect();
}

// ---- stats: the panel and each tile's connection quality ----

const fmt = (v: number | undefined, digits = 0) => (v === undefined ? '–' : v.toFixed(digits));

function renderStats(s: StatsSummary & { transport: TransportKind | null; signalingRttMs?: number }): void {
  const r = room;
  if (!r) return;
  for (const t of s.tiles) {
    if (!t.trackId) continue;
    const owner = r.participantOfTrack(t.trackId);
    if (!owner) continue;
    const source = r.trackInfo(t.trackId)?.source === 'screen' ? 'screen' : 'camera';
    const tile = tiles.querySelector<HTMLElement>(`.tile[data-participant="${CSS.escape(owner)}"][data-source="${source}"]`);
    if (!tile) continue;
    const layer = t.layer ?? (t.layer === null ? 'paused' : '–');
    const title = `Connection ${t.quality}: loss ${t.lossPct.toFixed(1)} %, round trip ${fmt(s.rttMs)} ms, layer ${layer}`;
    setBadge(tile, 'quality', `${t.quality} · ${t.lossPct.toFixed(1)} % · ${fmt(s.rttMs)} ms · ${layer}`, title, `quality q-${t.quality}`);
  }
  const rows = s.tiles.map((t) => {
    const who = t.trackId ? (names.get(r.participantOfTrack(t.trackId) ?? '') ?? t.trackId) : t.mid;
    return `<tr><td>${escapeHtml(who)}</td><td>${t.layer ?? '–'}</td><td>${t.width ?? '–'}×${t.height ?? '–'}</td><td>${fmt(t.fps)}</td><td>${t.kbps}</td><td>${t.framesDecoded}</td><td>${t.packetsLost}</td><td>${t.freezeCount}</td></tr>`;
  }).join('');
  const sent = s.layersSent.map((l) => `${l.rid}: ${l.width ?? '?'}×${l.height ?? '?'} ${fmt(l.fps)} fps ${l.kbps} kbit/s${l.limitation && l.limitation !== 'none' ? ` (${l.limitation})` : ''}`).join(' · ');
  statsEl.innerHTML = `
    <div>transport <b data-stat="transport">${s.transport ?? '–'}</b> · ICE RTT <b data-stat="rtt">${fmt(s.rttMs)}</b> ms · signaling RTT ${fmt(s.signalingRttMs)} ms
    · in <b data-stat="kbps-in">${s.kbpsIn}</b> kbit/s · out <b data-stat="kbps-out">${s.kbpsOut}</b> kbit/s
    · loss <b data-stat="loss">${fmt(s.lossPct, 2)}</b> % · frames decoded <b data-stat="frames-decoded">${s.framesDecoded}</b>
    · freezes <b data-stat="freezes">${s.freezeCount}</b></div>
    <div>sending ${sent || '–'}</div>${regionPanel()}
    <table><thead><tr><th scope="col">tile</th><th scope="col">layer</th><th scope="col">size</th><th scope="col">fps</th><th scope="col">kbit/s</th><th scope="col">frames</th><th scope="col">lost</th><th scope="col">freezes</th></tr></thead><tbody>${rows}</tbody></table>`;
}

/** Which region serves this page and why (only after a login with `?identity=`). */
function regionPanel(): string {
  if (!regionLogin) return '';
  const { response } = regionLogin;
  const now = room?.reconnector.region ?? response.region;
  const lines = explainLogin(regionLogin).map((l) => `<li>${escapeHtml(l)}</li>`).join('');
  return `<div data-stat="region">region <b data-stat="region-now">${escapeHtml(now)}</b>${now === response.region ? '' : ` (re-homed from ${escapeHtml(response.region)})`} — ${escapeHtml(response.reason)}<ul>${lines}</ul></div>`;
}

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c] ?? c);
}

// ---- pre-join: devices and preview ----

let preview: MediaStream | null = null;

function stopPreview(): void {
  for (const t of preview?.getTracks() ?? []) t.stop();
  preview = null;
  const v = $<HTMLVideoElement>('preview');
  v.srcObject = null;
  $('preview-none').hidden = false;
}

async function startPreview(form: HTMLFormElement): Promise<void> {
  const publish = (form.elements.namedItem('publish') as HTMLInputElement).checked;
  stopPreview();
  if (!publish || !navigator.mediaDevices?.getUserMedia) return;
  const cam = (form.elements.namedItem('camera') as HTMLSelectElement).value;
  const mic = (form.elements.namedItem('microphone') as HTMLSelectElement).value;
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { ...(cam ? { deviceId: { exact: cam } } : {}), width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
      audio: mic ? { deviceId: { exact: mic } } : true,
    });
    stopPreview();
    preview = stream;
    const v = $<HTMLVideoElement>('preview');
    v.srcObject = stream;
    v.play().catch(() => {});
    $('preview-none').hidden = stream.getVideoTracks().length > 0;
    await fillDevices(form);
  } catch (e) {
    notice(`camera/microphone unavailable (${e instanceof Error ? e.message : String(e)}); you can still join to watch`);
  }
}

async function fillDevices(form: HTMLFormElement): Promise<void> {
  const devices = await navigator.mediaDevices.enumerateDevices();
  const fill = (name: string, kind: MediaDeviceKind, fallback: string) => {
    const sel = form.elements.namedItem(name) as HTMLSelectElement;
    const current = sel.value || preview?.getTracks().find((t) => t.kind === (kind === 'videoinput' ? 'video' : 'audio'))?.getSettings().deviceId || '';
    sel.textContent = '';
    const list = devices.filter((d) => d.kind === kind);
    if (list.length === 0) sel.append(new Option(fallback, ''));
    list.forEach((d, i) => sel.append(new Option(d.label || `${fallback} ${i + 1}`, d.deviceId)));
    if (list.some((d) => d.deviceId === current)) sel.value = current;
  };
  fill('camera', 'videoinput', 'Camera');
  fill('microphone', 'audioinput', 'Microphone');
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

function showPreJoin(form: HTMLFormElement): void {
  showScreen('join');
  form.hidden = false;
  showStatus('Choose a room, your identity and name, check your camera, then join.', 'state-idle');
  void startPreview(form);
  (form.elements.namedItem('identity') as HTMLInputElement).focus();
}

async function init(): Promise<void> {
  if (config.identity) {
    const identity = config.identity;
    showStatus('Measuring the round trip to each region…', 'state-connecting');
    try {
      regionLogin = await loginToRegion(config.nodes[0]?.httpOrigin ?? location.origin, identity);
    } catch (e) {
      showStatus(`Could not log in: ${e instanceof Error ? e.message : String(e)}`, 'error');
      return;
    }
    const token = regionLogin.response.routes[0]?.token ?? '';
    notice(`region ${regionLogin.response.region}: ${regionLogin.response.reason}`);
    rejoin = () => join(token, config.publish);
    join(token, config.publish);
    return;
  }
  if (config.token) {
    const token = config.token;
    rejoin = () => join(token, config.publish);
    join(token, config.publish);
    return;
  }
  showScreen('join');
  if (await devMode()) {
    const form = $<HTMLFormElement>('dev-form');
    const room = form.elements.namedItem('room') as HTMLInputElement;
    const identity = form.elements.namedItem('identity') as HTMLInputElement;
    const name = form.elements.namedItem('name') as HTMLInputElement;
    const publish = form.elements.namedItem('publish') as HTMLInputElement;
    room.value = config.room;
    name.value = config.name;
    publish.checked = config.publish;
    for (const n of ['camera', 'microphone', 'publish']) {
      (form.elements.namedItem(n) as HTMLElement).addEventListener('change', () => { void startPreview(form); });
    }
    rejoin = () => showPreJoin(form);
    showPreJoin(form);
    form.onsubmit = (ev) => {
      ev.preventDefault();
      const f: DevForm = { room: room.value.trim(), identity: identity.value.trim(), name: name.value.trim(), publish: publish.checked };
      setWhoami(f.name || f.identity);
      names.set('self', selfName);
      const media = f.publish ? (preview ?? undefined) : undefined;
      if (!f.publish) stopPreview();
      mintDevToken(f).then(
        (token) => {
          // The room owns the preview stream now (it stops it on leave).
          preview = null;
          $<HTMLVideoElement>('preview').srcObject = null;
          join(token, f.publish, media, () => mintDevToken(f));
        },
        (e: unknown) => showStatus(`Could not get a token: ${e instanceof Error ? e.message : String(e)}`, 'error'),
      );
    };
  } else {
    const form = $<HTMLFormElement>('token-form');
    form.hidden = false;
    showStatus('No token: paste one below or open this page with ?token=…', 'state-idle');
    rejoin = () => { showScreen('join'); form.hidden = false; };
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
