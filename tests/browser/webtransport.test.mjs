// End-to-end test: a real (headless) Chromium joins over WebTransport, trusting the
// node's self-signed development certificate by the hash the node publishes at
// /webtransport/certificate-hashes, and — for comparison — over WebSocket.
//
// Run: scripts/install-test-deps.sh && cd tests/browser && npm test
// Env: MERIDIAN_BIN (default ../../target/debug/meridian), CHROMIUM (default /usr/bin/chromium)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { checkPrerequisites, startMeridian, launchChromium } from './harness.mjs';

let node;
let listening;
let browser;
const consoleLog = [];

function log(...args) { console.log('[wt-e2e]', ...args); }

function mintToken(identity) {
  return node.token('wt-e2e', identity, '--subscribe');
}

before(async () => {
  checkPrerequisites();
  node = await startMeridian('meridian-wt-e2e');
  listening = node.listening;
  log('server listening', JSON.stringify(listening));
  browser = await launchChromium();
  log('chromium', browser.version());
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (node) await node.stop();
});

async function openPage() {
  const page = await browser.newPage();
  page.on('console', (m) => consoleLog.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => consoleLog.push(`pageerror: ${e.message}`));
  // Any page of the node gives the test its origin (http://127.0.0.1 is a secure context).
  await page.goto(`http://${listening.http}/healthz`);
  return page;
}

function diagnostics() {
  console.log('---- browser console ----\n' + consoleLog.join('\n'));
  console.log('---- server stderr (last 10000 chars) ----\n' + node.stderr().slice(-10_000));
}

// Runs in the page: join over WebTransport with length-prefixed JSON on one stream.
async function joinOverWebTransport(token) {
  const doc = await (await fetch('/webtransport/certificate-hashes')).json();
  const serverCertificateHashes = doc.hashes.map((h) => ({
    algorithm: h.algorithm,
    value: Uint8Array.from(atob(h.value), (c) => c.charCodeAt(0)),
  }));
  const started = performance.now();
  const wt = new WebTransport(doc.url, { serverCertificateHashes });
  const timeout = setTimeout(() => wt.close(), 10_000);
  try {
    await wt.ready;
    const stream = await wt.createBidirectionalStream();
    const writer = stream.writable.getWriter();
    const body = new TextEncoder().encode(JSON.stringify({ type: 'join', token, client: 'wt-e2e' }));
    const frame = new Uint8Array(4 + body.length);
    new DataView(frame.buffer).setUint32(0, body.length);
    frame.set(body, 4);
    await writer.write(frame);
    const reader = stream.readable.getReader();
    let buf = new Uint8Array(0);
    for (;;) {
      if (buf.length >= 4) {
        const len = new DataView(buf.buffer, buf.byteOffset).getUint32(0);
        if (buf.length >= 4 + len) {
          const msg = JSON.parse(new TextDecoder().decode(buf.subarray(4, 4 + len)));
          const ms = performance.now() - started;
          if (msg.type === 'joined' || msg.type === 'error') {
            await writer.write(new Uint8Array([0, 0, 0, 16, ...new TextEncoder().encode('{"type":"leave"}')]));
            return { url: doc.url, type: msg.type, msg, ms };
          }
          buf = buf.subarray(4 + len);
          continue;
        }
      }
      const { value, done } = await reader.read();
      if (done) return { url: doc.url, type: 'closed', ms: performance.now() - started };
      const next = new Uint8Array(buf.length + value.length);
      next.set(buf);
      next.set(value, buf.length);
      buf = next;
    }
  } finally {
    clearTimeout(timeout);
    try { wt.close(); } catch { /* already closed */ }
  }
}

// Runs in the page: the same join over WebSocket.
async function joinOverWebSocket(token) {
  const started = performance.now();
  const ws = new WebSocket(`ws://${location.host}/signal`);
  return await new Promise((resolve) => {
    const timer = setTimeout(() => { ws.close(); resolve({ type: 'timeout' }); }, 10_000);
    ws.onopen = () => ws.send(JSON.stringify({ type: 'join', token, client: 'ws-e2e' }));
    ws.onmessage = (e) => {
      const msg = JSON.parse(e.data);
      if (msg.type === 'joined' || msg.type === 'error') {
        clearTimeout(timer);
        const ms = performance.now() - started;
        ws.send('{"type":"leave"}');
        ws.close();
        resolve({ type: msg.type, msg, ms });
      }
    };
    ws.onclose = () => { clearTimeout(timer); resolve({ type: 'closed' }); };
  });
}

function percentile(sorted, p) { return sorted[Math.round((sorted.length - 1) * p)]; }

test('Chromium joins over WebTransport with serverCertificateHashes', { timeout: 60_000 }, async () => {
  let page;
  try {
    page = await openPage();
    const r = await page.evaluate(joinOverWebTransport, mintToken('wt-alice'));
    log('webtransport join', JSON.stringify({ url: r.url, type: r.type, ms: r.ms?.toFixed(1) }));
    assert.equal(r.url, `https://127.0.0.1:${listening.wt.split(':').pop()}/signal`);
    assert.equal(r.type, 'joined', `expected joined, got ${JSON.stringify(r)}`);
    assert.ok(r.msg.participant_id, 'joined carries a participant id');
  } catch (e) {
    diagnostics();
    throw e;
  } finally {
    if (page) await page.close().catch(() => {});
  }
});

test('Chromium joins over WebSocket; time to joined per transport', { timeout: 120_000 }, async () => {
  let page;
  try {
    page = await openPage();
    const times = { webtransport: [], websocket: [] };
    for (let i = 0; i < 20; i++) {
      const wt = await page.evaluate(joinOverWebTransport, mintToken(`wt-${i}`));
      assert.equal(wt.type, 'joined', JSON.stringify(wt));
      times.webtransport.push(wt.ms);
      const ws = await page.evaluate(joinOverWebSocket, mintToken(`ws-${i}`));
      assert.equal(ws.type, 'joined', JSON.stringify(ws));
      times.websocket.push(ws.ms);
    }
    for (const [name, v] of Object.entries(times)) {
      v.sort((a, b) => a - b);
      log(`time to joined over ${name}: p50 ${percentile(v, 0.5).toFixed(1)} ms, p95 ${percentile(v, 0.95).toFixed(1)} ms (${v.length} joins)`);
    }
  } catch (e) {
    diagnostics();
    throw e;
  } finally {
    if (page) await page.close().catch(() => {});
  }
});
