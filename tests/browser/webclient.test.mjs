// End-to-end tests of the web client (web-client/, built into web-client/dist and served
// by the real `meridian serve`), in Debian's headless Chromium with fake camera/mic:
//   (a) two pages join over WebTransport and each decodes the other's video
//   (b) the same with ?transport=ws
//   (c) a page whose signaling the node closes reconnects by itself (resume token) and
//       keeps receiving video; the other page has no WebTransport and falls back to WS
//   (d) a screenshot of a two-person room in artifacts/
//   (e) a bad token, an expired token and a node that is down each show a clear message
// Every page fails its test on a `pageerror` (uncaught exception / unhandled rejection).
//
// Run: scripts/test.sh (builds everything), or after building: cd tests/browser && npm test
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkPrerequisites, checkWebClient, startMeridian, launchChromium, FAKE_MEDIA } from './harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.join(HERE, 'artifacts');
const FRAMES_TIMEOUT_MS = 30_000;

let node; // --dev
let plain; // without --dev
let browser;
const consoleLog = [];
let pageErrors = [];

function log(...args) { console.log('[web-e2e]', ...args); }

before(async () => {
  checkPrerequisites();
  checkWebClient();
  mkdirSync(ARTIFACTS, { recursive: true });
  node = await startMeridian('meridian-web-e2e', ['--dev', '--resume-grace-secs', '30']);
  log('dev node listening', JSON.stringify(node.listening));
  browser = await launchChromium(FAKE_MEDIA);
  log('chromium', browser.version());
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (node) await node.stop();
  if (plain) await plain.stop();
});

// Network failures the browser itself logs as console errors (a refused connection is
// what the "node is down" test provokes); anything else at error level fails a test.
const EXPECTED_CONSOLE = /Failed to load resource|ERR_CONNECTION_REFUSED|WebSocket connection to .* failed|WebTransport|net::ERR_/i;

async function openPage(name, url, { noWebTransport = false } = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.grantPermissions(['camera', 'microphone']);
  if (noWebTransport) await context.addInitScript(() => { delete window.WebTransport; });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  page.on('console', (m) => {
    consoleLog.push(`[${name}] console.${m.type()}: ${m.text()}`);
    if (m.type() === 'error' && !EXPECTED_CONSOLE.test(m.text())) pageErrors.push(`[${name}] console.error: ${m.text()}`);
  });
  page.on('pageerror', (e) => {
    consoleLog.push(`[${name}] pageerror: ${e.message}`);
    pageErrors.push(`[${name}] pageerror: ${e.message}`);
  });
  await page.goto(url, { waitUntil: 'load' });
  return page;
}

const base = (n = node) => `http://${n.listening.http}`;
const statusText = (page) => page.locator('#status').textContent({ timeout: 5_000 });
const stats = (page) => page.evaluate(() => window.meridian.stats());

async function waitConnected(page, timeout = 20_000) {
  await page.waitForFunction(() => window.meridian?.state() === 'connected', null, { timeout });
}

/** Polls until the page decoded video frames from someone else; returns its stats. */
async function waitFrames(page, min = 1) {
  const deadline = Date.now() + FRAMES_TIMEOUT_MS;
  let s = null;
  while (Date.now() < deadline) {
    s = await stats(page);
    if (s && s.framesDecoded >= min) return s;
    await new Promise((r) => setTimeout(r, 500));
  }
  throw new Error(`no decoded frames within ${FRAMES_TIMEOUT_MS} ms: ${JSON.stringify(s)}`);
}

async function diagnostics(pages) {
  console.log('---- diagnostics ----');
  for (const [name, p] of Object.entries(pages)) {
    if (!p) continue;
    try {
      const d = await p.evaluate(async () => ({
        status: document.getElementById('status')?.textContent,
        history: window.meridian?.statusHistory,
        errors: window.meridian?.session?.errors,
        notices: [...document.querySelectorAll('#notices li')].map((l) => l.textContent),
        stats: await window.meridian?.stats(),
        pub: window.meridian?.session?.pub?.connectionState,
        sub: window.meridian?.session?.sub?.connectionState,
      }));
      console.log(`${name}:`, JSON.stringify(d, null, 2));
    } catch (e) {
      console.log(`${name}: cannot read (${e})`);
    }
  }
  console.log('---- browser console ----\n' + consoleLog.join('\n'));
  console.log('---- server stderr (last 15000 chars) ----\n' + node.stderr().slice(-15_000));
}

function resetErrors() { pageErrors = []; consoleLog.length = 0; }
function assertNoPageErrors() { assert.deepEqual(pageErrors, [], `page errors: ${pageErrors.join('\n')}`); }

/** Joins `page` through the dev-mode form. */
async function joinWithDevForm(page, room, identity, name) {
  await page.locator('#dev-form').waitFor({ state: 'visible' });
  await page.fill('#dev-form input[name=room]', room);
  await page.fill('#dev-form input[name=identity]', identity);
  await page.fill('#dev-form input[name=name]', name);
  await page.click('#dev-join');
}

async function twoPersonRoom(transport, room) {
  const q = transport ? `&transport=${transport}` : '';
  // Alice joins with the dev-mode form, Bob with a token minted by the CLI.
  const a = await openPage('alice', `${base()}/?${q.slice(1)}`);
  await joinWithDevForm(a, room, 'alice', 'Alice');
  const b = await openPage('bob', `${base()}/?token=${encodeURIComponent(node.token(room, 'bob', '--name', 'Bob', '--publish'))}${q}`);
  await waitConnected(a);
  await waitConnected(b);
  return { a, b };
}

test('(a)+(d) two pages join over WebTransport and each decodes the other\'s video', { timeout: 120_000 }, async () => {
  resetErrors();
  let a, b;
  try {
    ({ a, b } = await twoPersonRoom('', 'room-wt'));
    const [sa, sb] = [await waitFrames(a), await waitFrames(b)];
    log('alice', JSON.stringify({ transport: sa.transport, framesDecoded: sa.framesDecoded, layersSent: sa.layersSent.map((l) => l.rid) }));
    log('bob', JSON.stringify({ transport: sb.transport, framesDecoded: sb.framesDecoded }));
    assert.equal(sa.transport, 'webtransport');
    assert.equal(sb.transport, 'webtransport');
    assert.ok(sa.framesDecoded > 0 && sb.framesDecoded > 0);
    // Names on the tiles; the stats panel shows the transport.
    await a.locator('.tile .name', { hasText: 'Bob' }).waitFor();
    await b.locator('.tile .name', { hasText: 'Alice' }).waitFor();
    await a.waitForFunction(() => document.querySelector('[data-stat="transport"]')?.textContent === 'webtransport');
    // Simulcast: the publisher sends more than one layer (q/h/f; the encoder may drop
    // some under CPU limits, so at least two) once its bandwidth estimate has ramped up
    // past the lowest layer (on a loaded machine that can take longer than first frames).
    let layers = [];
    for (let i = 0; i < 40 && layers.length < 2; i++) {
      if (i > 0) await a.waitForTimeout(500);
      layers = (await stats(a)).layersSent.map((l) => l.rid);
    }
    assert.ok(layers.length >= 2 && layers.every((r) => ['q', 'h', 'f'].includes(r)), `layers sent: ${layers}`);
    await a.waitForTimeout(1500); // a few painted frames for the screenshot
    await a.screenshot({ path: path.join(ARTIFACTS, 'two-person-room.png'), fullPage: true });
    log('screenshot', path.join(ARTIFACTS, 'two-person-room.png'));
    // Mute shows on the other side.
    await a.click('#mute-audio');
    await b.locator('.tile [data-badge="mic"]', { hasText: 'mic muted' }).waitFor();
    assertNoPageErrors();
  } catch (e) {
    await diagnostics({ a, b });
    throw e;
  } finally {
    if (a) await a.context().close().catch(() => {});
    if (b) await b.context().close().catch(() => {});
  }
});

test('(b) two pages join with ?transport=ws and each decodes the other\'s video', { timeout: 120_000 }, async () => {
  resetErrors();
  let a, b;
  try {
    ({ a, b } = await twoPersonRoom('ws', 'room-ws'));
    const [sa, sb] = [await waitFrames(a), await waitFrames(b)];
    assert.equal(sa.transport, 'websocket');
    assert.equal(sb.transport, 'websocket');
    assert.ok(sa.framesDecoded > 0 && sb.framesDecoded > 0);
    // Leaving removes the tile on the other side.
    await b.click('#leave');
    await a.waitForFunction(() => document.querySelectorAll('.tile').length === 1);
    assert.match(await statusText(b), /left/i);
    assertNoPageErrors();
  } catch (e) {
    await diagnostics({ a, b });
    throw e;
  } finally {
    if (a) await a.context().close().catch(() => {});
    if (b) await b.context().close().catch(() => {});
  }
});

test('(c) a page reconnects by itself when the node closes its signaling and keeps receiving video', { timeout: 120_000 }, async () => {
  resetErrors();
  let a, b;
  try {
    const room = 'room-resume';
    a = await openPage('alice', `${base()}/?token=${encodeURIComponent(node.token(room, 'alice', '--publish'))}`);
    // Bob's browser has no WebTransport: auto mode falls back to WebSocket.
    b = await openPage('bob', `${base()}/?token=${encodeURIComponent(node.token(room, 'bob', '--publish'))}`, { noWebTransport: true });
    await waitConnected(a);
    await waitConnected(b);
    const before = await waitFrames(b);
    assert.equal(before.transport, 'websocket', 'without WebTransport the page falls back to WebSocket');
    const pid = await b.evaluate(() => window.meridian.session.participantId);
    const admin = node.token('*', 'operator', '--admin');
    // The admin hook is on the internal listener (mutual TLS), not the public one.
    const hook = `/admin/participants/${pid}/close-signaling`;
    const pub = await fetch(`${base()}${hook}`, { method: 'POST', headers: { authorization: `Bearer ${admin}` } });
    assert.equal(pub.status, 404, 'not on the public listener');
    const res = await node.internal('POST', hook, admin);
    assert.equal(res.status, 204, res.body);
    // The hook refuses a token without the admin grant.
    const denied = await node.internal('POST', hook, node.token(room, 'mallory'));
    assert.equal(denied.status, 401);
    await b.waitForFunction(() => window.meridian.statusHistory.some((s) => /Reconnecting/.test(s)), null, { timeout: 10_000 });
    await waitConnected(b);
    const after1 = await b.evaluate(() => ({
      pid: window.meridian.session.participantId, resumed: window.meridian.session.resumedCount,
    }));
    assert.equal(after1.pid, pid, 'the same participant resumed');
    assert.ok(after1.resumed >= 1);
    const s1 = await stats(b);
    await b.waitForTimeout(3000);
    const s2 = await stats(b);
    log('frames decoded across the reconnect', before.framesDecoded, s1.framesDecoded, s2.framesDecoded);
    assert.ok(s2.framesDecoded > s1.framesDecoded, `video keeps flowing: ${s1.framesDecoded} → ${s2.framesDecoded}`);
    // Alice still sees Bob (the grace kept him: no participant_left).
    assert.equal(await a.locator('.tile').count(), 2);
    assertNoPageErrors();
  } catch (e) {
    await diagnostics({ a, b });
    throw e;
  } finally {
    if (a) await a.context().close().catch(() => {});
    if (b) await b.context().close().catch(() => {});
  }
});

async function freePort() {
  return await new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

test('(e) a bad token, an expired token and a node that is down each show a clear message', { timeout: 90_000 }, async () => {
  resetErrors();
  const pages = {};
  try {
    // Minted first: it needs a few seconds to be past its expiry (and the 5 s leeway).
    const expired = node.token('room-bad', 'late', '--ttl', '1s');
    const expiredAt = Date.now() + 7_000;

    pages.bad = await openPage('bad-token', `${base()}/?token=not-a-valid-jwt`);
    await pages.bad.waitForFunction(() => window.meridian?.state() === 'disconnected', null, { timeout: 15_000 });
    const badText = await statusText(pages.bad);
    assert.match(badText, /token was refused \(unauthorized\)/i, badText);
    assert.equal(await pages.bad.locator('#fatal button', { hasText: 'Try again' }).count(), 1);

    const port = await freePort(); // nothing listens there
    pages.down = await openPage('node-down', `${base()}/?token=${encodeURIComponent(node.token('room-bad', 'x', '--publish'))}&nodes=http://127.0.0.1:${port}`);
    await pages.down.waitForFunction(() => window.meridian?.state() === 'disconnected', null, { timeout: 30_000 });
    const downText = await statusText(pages.down);
    assert.match(downText, /Disconnected: gave up after 3 attempts \(cannot reach the node at http:\/\/127\.0\.0\.1:\d+/, downText);

    await new Promise((r) => setTimeout(r, Math.max(0, expiredAt - Date.now())));
    pages.expired = await openPage('expired-token', `${base()}/?token=${encodeURIComponent(expired)}`);
    await pages.expired.waitForFunction(() => window.meridian?.state() === 'disconnected', null, { timeout: 15_000 });
    const expiredText = await statusText(pages.expired);
    assert.match(expiredText, /token has expired/i, expiredText);

    for (const p of Object.values(pages)) {
      assert.ok((await p.locator('body').innerText()).trim().length > 50, 'not a blank page');
    }
    await pages.expired.screenshot({ path: path.join(ARTIFACTS, 'expired-token.png') });
    assertNoPageErrors();
  } catch (e) {
    await diagnostics(pages);
    throw e;
  } finally {
    for (const p of Object.values(pages)) await p.context().close().catch(() => {});
  }
});

test('without --dev there is no /dev/token and the page asks for a token', { timeout: 60_000 }, async () => {
  resetErrors();
  let p;
  try {
    plain = await startMeridian('meridian-web-plain');
    const url = `http://${plain.listening.http}`;
    assert.equal((await fetch(`${url}/dev/token`)).status, 404);
    assert.equal((await fetch(`${url}/dev/token`, { method: 'POST', body: '{}' })).status, 404);
    assert.equal((await fetch(`${base()}/dev/token`)).status, 200, 'the dev node has it');
    const bad = await fetch(`${base()}/dev/token`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ room: 'r', identity: 'x'.repeat(500) }) });
    assert.equal(bad.status, 400);
    // Static files cannot escape the web root.
    assert.equal((await fetch(`${url}/..%2f..%2fCargo.toml`)).status, 404);
    p = await openPage('plain', `${url}/`);
    await p.locator('#token-form').waitFor({ state: 'visible' });
    assert.match(await statusText(p), /No token/);
    assert.equal(await p.locator('#dev-form').isVisible(), false);
    // The paste box joins.
    await p.fill('#token-form textarea[name=token]', plain.token('room-paste', 'paster', '--publish'));
    await p.click('#token-join');
    await waitConnected(p);
    assertNoPageErrors();
  } catch (e) {
    await diagnostics({ p });
    throw e;
  } finally {
    if (p) await p.context().close().catch(() => {});
  }
});
