// The meeting page (web-client/, on the SDK) in Debian's headless Chromium against the
// real `meridian serve --dev`, with fake camera and microphone:
//   (1) the pre-join screen previews the camera and lists the devices; axe finds no
//       accessibility violation; joining works with the keyboard alone; screenshot
//       docs/screenshots/prejoin.png
//   (2) three people join through the form; the header shows the name; Alice shares her
//       screen (the button; getDisplayMedia is a canvas here) and Bob and Carol receive
//       it as a second video; participant list, per-tile quality; axe on the call;
//       screenshot docs/screenshots/three-person-room.png
//   (3) the active speaker (from audio levels) moves when the speaking page's fake
//       microphone is muted
//   (4) Bob leaves: the controls go away; "Join again" returns to the pre-join screen
//       with room and name kept and joins again without a reload; media keeps flowing
//       for the others
//   (5) a second page with Carol's identity replaces the first, which says why
//   (6) the node is stopped for 60 s and started again where it was: both pages show
//       the reconnecting state (docs/screenshots/reconnecting.png), give up, keep probing,
//       and rejoin by themselves, seeing each other's video again
// Run: scripts/test.sh, or after building: cd tests/browser && node --test meeting.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { checkPrerequisites, checkWebClient, startMeridian, launchChromium, FAKE_MEDIA, freePort } from './harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SHOTS = path.resolve(HERE, '../../docs/screenshots');
const AXE = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');

let node;
let browser;
const consoleLog = [];
let pageErrors = [];
const log = (...a) => console.log('[meeting]', ...a);

before(async () => {
  checkPrerequisites();
  checkWebClient();
  mkdirSync(SHOTS, { recursive: true });
  node = await startMeridian('meridian-meeting', ['--dev']);
  browser = await launchChromium([
    ...FAKE_MEDIA,
    '--autoplay-policy=no-user-gesture-required',
  ]);
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (node) await node.stop();
});

const EXPECTED_CONSOLE = /Failed to load resource|ERR_CONNECTION_REFUSED|WebSocket connection to .* failed|WebTransport|net::ERR_/i;

// getDisplayMedia has no fake in headless Chromium: a moving canvas stands in.
function fakeDisplayMedia() {
  navigator.mediaDevices.getDisplayMedia = async () => {
    const c = document.createElement('canvas');
    c.width = 1280;
    c.height = 720;
    const g = c.getContext('2d');
    let n = 0;
    setInterval(() => {
      g.fillStyle = '#1d3f73';
      g.fillRect(0, 0, c.width, c.height);
      g.fillStyle = '#ffffff';
      g.font = '64px sans-serif';
      g.fillText(`Shared screen — slide ${1 + (Math.floor(n++ / 30) % 9)}`, 80, 360);
      g.fillRect(80 + ((n * 8) % 1000), 420, 120, 12);
    }, 66);
    return c.captureStream(15);
  };
}

async function openPage(name, url) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.grantPermissions(['camera', 'microphone']);
  await context.addInitScript(fakeDisplayMedia);
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  page.on('console', (m) => {
    consoleLog.push(`[${name}] console.${m.type()}: ${m.text()}`);
    if (m.type() === 'error' && !EXPECTED_CONSOLE.test(m.text())) pageErrors.push(`[${name}] console.error: ${m.text()}`);
  });
  page.on('pageerror', (e) => pageErrors.push(`[${name}] pageerror: ${e.message}`));
  await page.goto(url, { waitUntil: 'load' });
  return page;
}

const base = (n = node) => `http://${n.listening.http}`;
const connected = (p, timeout = 20_000) => p.waitForFunction(() => window.meridian?.state() === 'connected', null, { timeout });
const frames = async (p) => (await p.evaluate(() => window.meridian.stats()))?.framesDecoded ?? 0;

async function framesGrow(p, what, ms = 20_000) {
  const start = await frames(p);
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    await p.waitForTimeout(500);
    if ((await frames(p)) > start) return;
  }
  throw new Error(`${what}: no new decoded frames in ${ms} ms (stuck at ${start})`);
}

/** Fills the pre-join form and joins; resolves once connected. */
async function joinForm(page, room, identity, name) {
  await page.locator('#dev-form').waitFor({ state: 'visible' });
  await page.fill('#dev-form input[name=room]', room);
  await page.fill('#dev-form input[name=identity]', identity);
  await page.fill('#dev-form input[name=name]', name);
  await page.click('#dev-join');
  await connected(page);
}

/** Runs axe-core in the page; fails on any violation. */
async function axeCheck(page, what) {
  if (!(await page.evaluate(() => typeof window.axe !== 'undefined'))) await page.addScriptTag({ content: AXE });
  const res = await page.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ['violations'] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.slice(0, 3).map((n) => n.target.join(' ')) }));
  });
  assert.deepEqual(res, [], `${what}: axe violations:\n${JSON.stringify(res, null, 2)}`);
  log(`axe: no violations (${what})`);
}

async function diagnostics(pages) {
  console.log('---- diagnostics ----');
  for (const [name, p] of Object.entries(pages)) {
    if (!p || p.isClosed()) continue;
    try {
      const d = await p.evaluate(async () => ({
        status: document.getElementById('status')?.textContent,
        history: window.meridian?.statusHistory?.slice(-15),
        errors: window.meridian?.session?.errors,
        notices: [...document.querySelectorAll('#notices li')].map((l) => l.textContent),
        frames: (await window.meridian?.stats())?.framesDecoded,
        // Active speaker inputs: the detector's smoothed powers and the audio receive stats.
        speaker: window.meridian?.session?.speaker?.current ?? null,
        powers: Object.fromEntries(window.meridian?.session?.speaker?.powers?.() ?? []),
        audioIn: await (async () => {
          const s = window.meridian?.session;
          const owners = Object.fromEntries([...(s?.subTracks ?? [])].map(([mid, t]) => [mid, t.participant_id]));
          const stats = s?.sub ? [...(await s.sub.getStats()).values()] : [];
          return stats.filter((r) => r.type === 'inbound-rtp' && r.kind === 'audio').map((r) => ({
            mid: r.mid, owner: owners[r.mid], packets: r.packetsReceived, energy: r.totalAudioEnergy,
            duration: r.totalSamplesDuration, level: r.audioLevel, concealed: r.concealedSamples,
          }));
        })(),
      }));
      console.log(`${name}:`, JSON.stringify(d, null, 2));
    } catch (e) {
      console.log(`${name}: cannot read (${e})`);
    }
  }
  console.log('---- browser console (last 80) ----\n' + consoleLog.slice(-80).join('\n'));
  console.log('---- server stderr (last 8000 chars) ----\n' + node.stderr().slice(-8_000));
}

function assertNoPageErrors() { assert.deepEqual(pageErrors, [], `page errors: ${pageErrors.join('\n')}`); }

test('pre-join preview, three people with a screen share, active speaker, Leave and Join again, identity replaced', { timeout: 240_000 }, async () => {
  pageErrors = [];
  const pages = {};
  try {
    // (1) pre-join
    const a = (pages.alice = await openPage('alice', `${base()}/?room=standup`));
    await a.locator('#dev-form').waitFor({ state: 'visible' });
    await a.waitForFunction(() => {
      const v = document.getElementById('preview');
      return v && v.videoWidth > 0 && v.readyState >= 2 && !v.paused;
    }, null, { timeout: 15_000 });
    const cams = await a.locator('#camera-select option').count();
    const mics = await a.locator('#mic-select option').count();
    assert.ok(cams >= 1 && mics >= 1, `devices listed: ${cams} cameras, ${mics} microphones`);
    assert.equal(await a.inputValue('#dev-form input[name=room]'), 'standup', '?room= prefills the room');
    await a.fill('#dev-form input[name=identity]', 'alice');
    await a.fill('#dev-form input[name=name]', 'Alice');
    await axeCheck(a, 'pre-join');
    await a.waitForTimeout(500);
    await a.screenshot({ path: path.join(SHOTS, 'prejoin.png') });
    log('pre-join preview plays; screenshot docs/screenshots/prejoin.png');

    // (2) three people, screen share. Alice joins with the keyboard only (Enter submits).
    await a.locator('#dev-form input[name=name]').press('Enter');
    await connected(a);
    const b = (pages.bob = await openPage('bob', `${base()}/`));
    await joinForm(b, 'standup', 'bob', 'Bob');
    const c = (pages.carol = await openPage('carol', `${base()}/`));
    await joinForm(c, 'standup', 'carol', 'Carol');
    assert.match(await a.locator('#whoami').textContent(), /Alice/);
    assert.match(await b.locator('#whoami').textContent(), /Bob/);
    for (const p of [a, b, c]) await p.waitForFunction(() => document.querySelectorAll('#participant-list li').length === 3);
    await framesGrow(c, 'carol receives video');
    await a.click('#share-screen');
    await a.waitForFunction(() => window.meridian.session.sharingScreen && document.querySelector('#share-screen')?.getAttribute('aria-pressed') === 'true');
    for (const p of [b, c]) {
      await p.waitForFunction(() => {
        const v = document.querySelector('.tile.screen video');
        return v && v.videoWidth > 0 && v.readyState >= 2;
      }, null, { timeout: 20_000 });
      // Alice's camera and her screen: two playing videos from her.
      const alice = await p.evaluate(() => {
        const id = [...document.querySelectorAll('#participant-list li')].find((li) => /Alice/.test(li.textContent))?.dataset.participant;
        return [...document.querySelectorAll(`.tile[data-participant="${id}"] video`)].filter((v) => v.videoWidth > 0).length;
      });
      assert.equal(alice, 2, 'Alice\'s camera and screen are two videos');
      await p.locator('#participant-list li', { hasText: 'sharing screen' }).waitFor();
    }
    // Per-tile connection quality: loss, RTT and layer on every remote camera tile.
    await c.waitForFunction(() => document.querySelectorAll('.tile [data-badge="quality"]').length >= 2, null, { timeout: 15_000 });
    const q = await c.locator('.tile [data-badge="quality"]').first().getAttribute('title');
    assert.match(q, /^Connection (good|fair|poor): loss \d+\.\d %, round trip \d+ ms, layer (low|medium|high|paused|–)$/, q);
    await axeCheck(c, 'call with screen share');
    await c.waitForTimeout(1500);
    await c.screenshot({ path: path.join(SHOTS, 'three-person-room.png') });
    log('screen share reaches Bob and Carol as a second video; screenshot docs/screenshots/three-person-room.png');

    // (3) active speaker: only Alice's microphone on → Alice; then only Bob's → Bob.
    await b.click('#mute-audio');
    await c.click('#mute-audio');
    await c.waitForFunction(() => window.meridian.activeSpeaker() === 'Alice', null, { timeout: 40_000 });
    await c.locator('.tile.speaking .name', { hasText: 'Alice' }).waitFor();
    await b.click('#mute-audio'); // Bob unmutes
    await a.click('#mute-audio'); // Alice mutes
    await c.waitForFunction(() => window.meridian.activeSpeaker() === 'Bob', null, { timeout: 40_000 });
    await c.locator('#participant-list li.speaking', { hasText: 'Bob' }).waitFor();
    await c.locator('#participant-list li', { hasText: /Alice.*mic muted/ }).waitFor();
    log('active speaker follows the unmuted microphone: Alice, then Bob');

    // (4) Leave, then Join again without a reload, by keyboard: focus moves to "Join again".
    await b.focus('#leave');
    await b.keyboard.press('Enter');
    await b.locator('#ended').waitFor({ state: 'visible' });
    assert.equal(await b.evaluate(() => document.activeElement?.id), 'join-again', 'focus on "Join again"');
    assert.equal(await b.locator('#controls').isVisible(), false, 'the controls go away after Leave');
    await a.waitForFunction(() => document.querySelectorAll('#participant-list li').length === 2);
    // The remaining participants keep receiving each other's media after Bob's sections go.
    await framesGrow(a, 'alice after Bob left');
    await framesGrow(c, 'carol after Bob left');
    await b.keyboard.press('Enter');
    await b.locator('#dev-form').waitFor({ state: 'visible' });
    assert.equal(await b.inputValue('#dev-form input[name=room]'), 'standup');
    assert.equal(await b.inputValue('#dev-form input[name=name]'), 'Bob');
    assert.equal(await b.inputValue('#dev-form input[name=identity]'), 'bob');
    await b.waitForFunction(() => document.getElementById('preview')?.videoWidth > 0);
    await b.click('#dev-join');
    await connected(b);
    for (const p of [a, b, c]) await p.waitForFunction(() => document.querySelectorAll('#participant-list li').length === 3);
    await framesGrow(b, 'bob after joining again');
    await framesGrow(a, 'alice after Bob came back');
    log('Leave → Join again works without a reload; media keeps flowing');

    // (5) Carol's identity from a second page replaces the first, which says why.
    const c2 = (pages.carol2 = await openPage('carol-2', `${base()}/`));
    await joinForm(c2, 'standup', 'carol', 'Carol (laptop)');
    await c.locator('#ended').waitFor({ state: 'visible', timeout: 10_000 });
    assert.match(await c.locator('#ended-message').textContent(), /same identity from another page or device/);
    assert.match(await c.locator('#status').textContent(), /same identity/);
    await a.waitForFunction(() => document.querySelectorAll('#participant-list li').length === 3);
    assert.equal(await a.locator('#participant-list li', { hasText: 'Carol' }).count(), 1, 'one Carol, not two');
    await a.locator('#participant-list li', { hasText: 'Carol (laptop)' }).waitFor();
    log('the older Carol page shows it was replaced');
    assertNoPageErrors();
  } catch (e) {
    await diagnostics(pages);
    throw e;
  } finally {
    for (const p of Object.values(pages)) await p.context().close().catch(() => {});
  }
});

test('a node stopped for 60 s and started again brings both pages back by themselves', { timeout: 240_000 }, async () => {
  pageErrors = [];
  const pages = {};
  const ports = { http: await freePort(), media: await freePort(), wt: await freePort() };
  const { mkdtempSync, rmSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const dataDir = mkdtempSync(path.join(tmpdir(), 'meridian-restart-'));
  let n = await startMeridian('meridian-restart', ['--dev'], { dataDir, ports });
  try {
    const url = `http://127.0.0.1:${ports.http}/`;
    const a = (pages.dana = await openPage('dana', url));
    await joinForm(a, 'restart', 'dana', 'Dana');
    const b = (pages.eve = await openPage('eve', url));
    await joinForm(b, 'restart', 'eve', 'Eve');
    await framesGrow(a, 'dana before the stop');
    await framesGrow(b, 'eve before the stop');
    n.kill('SIGKILL');
    const stoppedAt = Date.now();
    await a.waitForFunction(() => window.meridian.state() === 'reconnecting', null, { timeout: 20_000 });
    await a.waitForTimeout(1500);
    await a.screenshot({ path: path.join(SHOTS, 'reconnecting.png') });
    log('reconnecting; screenshot docs/screenshots/reconnecting.png');
    // They give up after the bounded attempts and keep probing slowly.
    for (const p of [a, b]) {
      await p.waitForFunction(() => window.meridian.state() === 'disconnected', null, { timeout: 60_000 });
      assert.match(await p.locator('#status').textContent(), /rejoins when the node is back/);
    }
    const wait = 60_000 - (Date.now() - stoppedAt);
    if (wait > 0) await a.waitForTimeout(wait);
    log(`node down for ${((Date.now() - stoppedAt) / 1000).toFixed(0)} s; starting it again on the same ports`);
    n = await startMeridian('meridian-restart', ['--dev'], { dataDir, ports });
    const restartedAt = Date.now();
    for (const p of [a, b]) await connected(p, 30_000);
    log(`both pages rejoined ${((Date.now() - restartedAt) / 1000).toFixed(1)} s after the restart`);
    for (const p of [a, b]) await p.waitForFunction(() => document.querySelectorAll('#participant-list li').length === 2, null, { timeout: 15_000 });
    await framesGrow(a, 'dana after the restart');
    await framesGrow(b, 'eve after the restart');
    assertNoPageErrors();
  } catch (e) {
    await diagnostics(pages);
    throw e;
  } finally {
    for (const p of Object.values(pages)) await p.context().close().catch(() => {});
    await n.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
});
