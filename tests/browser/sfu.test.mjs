// End-to-end test: a real (headless) Chromium publishes fake camera video through
// `meridian serve`, a second page subscribes and must decode frames.
//
// Run: scripts/install-test-deps.sh && cd tests/browser && npm test
// Env: MERIDIAN_BIN (default ../../target/debug/meridian), CHROMIUM (default /usr/bin/chromium)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkPrerequisites, startMeridian, launchChromium } from './harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ARTIFACTS = path.join(HERE, 'artifacts');
const FRAMES_TIMEOUT_MS = 30_000;

let node;
let httpAddr;
let browser;
const consoleLog = [];

function log(...args) { console.log('[e2e]', ...args); }

function mintToken(identity, publish) {
  return publish ? node.token('e2e', identity, '--publish', '--subscribe') : node.token('e2e', identity);
}

async function openPage(name, query) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.grantPermissions(['camera', 'microphone']);
  // Record every #status text so a failure can show what the page went through.
  await context.addInitScript(() => {
    window.__statusHistory = [];
    document.addEventListener('DOMContentLoaded', () => {
      const el = document.getElementById('status');
      if (!el) return;
      window.__statusHistory.push(el.textContent);
      new MutationObserver(() => window.__statusHistory.push(el.textContent))
        .observe(el, { childList: true, characterData: true, subtree: true });
    });
  });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  page.on('response', (r) => { if (r.status() >= 400) consoleLog.push(`[${name}] HTTP ${r.status()} ${r.url()}`); });
  page.on('console', (m) => consoleLog.push(`[${name}] console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => consoleLog.push(`[${name}] pageerror: ${e.message}`));
  await page.goto(`http://${httpAddr}/?${query}`, { waitUntil: 'load' });
  return page;
}

const status = (page) => page.locator('#status').textContent({ timeout: 5_000 });
const stats = (page) => page.evaluate(() => (window.meridian ? window.meridian.stats() : null));

// Everything useful for diagnosing "no frames": connection states and raw stats reports.
async function dump(page) {
  try {
    return await page.evaluate(async () => {
      const m = window.meridian;
      if (!m) return { status: document.getElementById('status')?.textContent, statusHistory: window.__statusHistory, meridian: null };
      const pc = async (p) => {
        if (!p) return null;
        const reports = [];
        (await p.getStats()).forEach((r) => {
          if (['inbound-rtp', 'outbound-rtp', 'transport', 'remote-inbound-rtp'].includes(r.type)
            || (r.type === 'candidate-pair' && r.nominated)) reports.push(r);
        });
        return {
          connectionState: p.connectionState, iceConnectionState: p.iceConnectionState,
          signalingState: p.signalingState,
          transceivers: p.getTransceivers().map((t) => ({ mid: t.mid, direction: t.direction,
            currentDirection: t.currentDirection, kind: t.receiver.track?.kind })),
          reports,
        };
      };
      return {
        status: document.getElementById('status')?.textContent,
        statusHistory: window.__statusHistory,
        errors: m.errors,
        videos: document.querySelectorAll('video').length,
        stats: await m.stats(),
        pub: await pc(m.pub),
        sub: await pc(m.sub),
      };
    });
  } catch (e) {
    return { dumpError: String(e) };
  }
}

let serverErrMark = 0; // where the current test's server stderr starts

function printDiagnostics(extra) {
  console.log('---- diagnostics ----');
  for (const [k, v] of Object.entries(extra || {})) console.log(`${k}:`, JSON.stringify(v, null, 2));
  console.log('---- browser console ----\n' + consoleLog.join('\n'));
  const err = node.stderr().slice(serverErrMark);
  console.log('---- server stderr during this test (last 20000 chars) ----\n' + err.slice(-20_000));
  consoleLog.length = 0;
}

before(async () => {
  checkPrerequisites();
  mkdirSync(ARTIFACTS, { recursive: true });
  node = await startMeridian('meridian-e2e');
  httpAddr = node.listening.http;
  log('server listening', JSON.stringify(node.listening));
  browser = await launchChromium([
    '--use-fake-device-for-media-stream',
    '--use-fake-ui-for-media-stream',
    '--allow-loopback-in-peer-connection',
  ]);
  log('chromium', browser.version());
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (node) await node.stop();
});

test('a subscriber decodes video published by another browser', { timeout: 90_000 }, async () => {
  let a;
  let b;
  serverErrMark = node.stderr().length;
  try {
    const pubToken = mintToken('alice', true);
    const subToken = mintToken('bob', false);
    a = await openPage('A', `token=${encodeURIComponent(pubToken)}`);
    await a.waitForFunction(() => /joined/.test(document.getElementById('status')?.textContent || ''), null, { timeout: 15_000 });
    b = await openPage('B', `token=${encodeURIComponent(subToken)}&publish=0`);
    await b.waitForFunction(() => /joined/.test(document.getElementById('status')?.textContent || ''), null, { timeout: 15_000 });

    const deadline = Date.now() + FRAMES_TIMEOUT_MS;
    let sb = null;
    while (Date.now() < deadline) {
      sb = await stats(b);
      if (sb && sb.framesDecoded > 0) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    const sa = await stats(a);
    log('publisher stats', JSON.stringify(sa));
    log('subscriber stats', JSON.stringify(sb));
    await b.waitForTimeout(1000); // let a frame or two paint for the screenshot
    await b.screenshot({ path: path.join(ARTIFACTS, 'subscriber.png'), fullPage: true });
    await a.screenshot({ path: path.join(ARTIFACTS, 'publisher.png'), fullPage: true });

    assert.ok(sa && sa.framesSent > 0, `publisher sent no frames: ${JSON.stringify(sa)}`);
    assert.ok(sb && sb.framesDecoded > 0,
      `subscriber decoded no frames within ${FRAMES_TIMEOUT_MS} ms: ${JSON.stringify(sb)}`);
  } catch (e) {
    printDiagnostics({
      publisher: a ? await dump(a) : 'not opened',
      subscriber: b ? await dump(b) : 'not opened',
    });
    if (b) await b.screenshot({ path: path.join(ARTIFACTS, 'subscriber-failure.png') }).catch(() => {});
    throw e;
  } finally {
    if (a) await a.context().close().catch(() => {});
    if (b) await b.context().close().catch(() => {});
  }
});

test('an invalid token shows an unauthorized error, not a blank page', { timeout: 30_000 }, async () => {
  let p;
  serverErrMark = node.stderr().length;
  try {
    p = await openPage('C', 'token=not-a-valid-jwt');
    // Wait until the server has answered (error recorded or socket closed), then let any
    // follow-up status update (e.g. on socket close) land before reading what the user sees.
    await p.waitForFunction(() => {
      const t = document.getElementById('status')?.textContent || '';
      return /unauthorized|closed|error/i.test(t) || (window.meridian && window.meridian.errors.length > 0);
    }, null, { timeout: 10_000 });
    await p.waitForTimeout(1000);
    const text = await status(p);
    const history = await p.evaluate(() => window.__statusHistory);
    assert.match(text, /unauthorized/i,
      `#status should show the unauthorized error; it shows ${JSON.stringify(text)} (history: ${JSON.stringify(history)})`);
    assert.equal(await p.locator('#status').getAttribute('class'), 'error');
    await p.screenshot({ path: path.join(ARTIFACTS, 'invalid-token.png') });
  } catch (e) {
    printDiagnostics({ page: p ? await dump(p) : 'not opened' });
    throw e;
  } finally {
    if (p) await p.context().close().catch(() => {});
  }
});
