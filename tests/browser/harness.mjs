// Shared set-up of the browser tests: the real `meridian serve` on ephemeral ports with a
// fresh data directory, tokens minted by the binary with that directory's key, and
// Debian's Chromium launched headless with the flags WebRTC on loopback needs.
// The node serves the built web client from ../../web-client/dist (scripts/test.sh builds it).
// Env: MERIDIAN_BIN (default ../../target/debug/meridian), CHROMIUM (default /usr/bin/chromium),
// MERIDIAN_WEB_ROOT (default ../../web-client/dist)
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, readFileSync } from 'node:fs';
import https from 'node:https';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const BIN = path.resolve(HERE, process.env.MERIDIAN_BIN || '../../target/debug/meridian');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const WEB_ROOT = path.resolve(HERE, process.env.MERIDIAN_WEB_ROOT || '../../web-client/dist');

/** Fails with a clear message when the binary or the browser is missing. */
export function checkPrerequisites() {
  if (!existsSync(BIN)) throw new Error(`meridian binary not found at ${BIN} (cargo build -p meridian, or set MERIDIAN_BIN)`);
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: run scripts/install-test-deps.sh`);
}

/** Fails with a clear message when the web client is not built. */
export function checkWebClient() {
  if (!existsSync(path.join(WEB_ROOT, 'index.html'))) {
    throw new Error(`web client not built at ${WEB_ROOT} (cd web-client && npm ci && npm run build)`);
  }
}

/**
 * Starts `meridian serve` and resolves once it printed its listening line.
 * Returns `{ listening, stderr(), token(room, identity, ...flags), stop() }`.
 * `extraArgs` add flags (e.g. `--dev`, `--resume-grace-secs 20`).
 */
export async function startMeridian(prefix, extraArgs = [], { dataDir: sharedDir, ports = {} } = {}) {
  // Nodes of one region share a data directory (their token keys); it is not removed.
  // `ports` ({http, media, wt}) fixes ports, e.g. to restart a node where it was.
  const dataDir = sharedDir ?? mkdtempSync(path.join(tmpdir(), `${prefix}-`));
  const addr = (p) => `127.0.0.1:${p ?? 0}`;
  const server = spawn(BIN, ['serve', '--data-dir', dataDir, '--http-addr', addr(ports.http),
    '--media-addr', addr(ports.media), '--wt-addr', addr(ports.wt), '--internal-listen', addr(ports.internal),
    '--web-root', WEB_ROOT, ...extraArgs], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, NO_COLOR: '1', RUST_LOG: process.env.RUST_LOG || 'info' },
  });
  let stderr = '';
  server.stderr.setEncoding('utf8');
  server.stderr.on('data', (d) => { stderr += d; });
  const lines = createInterface({ input: server.stdout });
  const listening = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('server did not print its listening line in 15 s')), 15_000);
    server.once('error', (e) => { clearTimeout(timer); reject(e); });
    server.once('exit', (code) => { clearTimeout(timer); reject(new Error(`server exited early with ${code}`)); });
    lines.on('line', (line) => {
      try {
        const msg = JSON.parse(line);
        if (msg.event === 'listening') { clearTimeout(timer); resolve(msg); }
      } catch { /* not JSON: ignore */ }
    });
  });
  return {
    listening,
    stderr: () => stderr,
    token: (room, identity, ...flags) => execFileSync(BIN, ['token', 'create', '--data-dir', dataDir,
      '--room', room, '--identity', identity, ...flags], { encoding: 'utf8', timeout: 10_000 }).trim(),
    /**
     * A request to the node's internal listener (mutual TLS, with the development
     * operator certificate under the data directory): resolves `{ status, body }`.
     */
    internal: (method, urlPath, bearer) => internalRequest(listening.internal, dataDir, method, urlPath, bearer),
    /** Sends `signal` (e.g. 'SIGKILL') to the node process. */
    kill(signal) { server.kill(signal); },
    async stop() {
      if (server.exitCode === null) {
        server.kill('SIGTERM');
        await new Promise((r) => {
          const t = setTimeout(() => { server.kill('SIGKILL'); r(); }, 5_000);
          server.once('exit', () => { clearTimeout(t); r(); });
        });
      }
      if (!sharedDir) rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** HTTPS request with a client certificate from `<dataDir>/internal/`. */
function internalRequest(hostPort, dataDir, method, urlPath, bearer) {
  const [host, port] = [hostPort.slice(0, hostPort.lastIndexOf(':')), Number(hostPort.slice(hostPort.lastIndexOf(':') + 1))];
  const dir = path.join(dataDir, 'internal');
  return new Promise((resolve, reject) => {
    const req = https.request({
      host, port, method, path: urlPath,
      ca: readFileSync(path.join(dir, 'ca.pem')),
      cert: readFileSync(path.join(dir, 'client.pem')),
      key: readFileSync(path.join(dir, 'client.key')),
      headers: bearer ? { authorization: `Bearer ${bearer}` } : {},
      timeout: 10_000,
    }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode, body }));
    });
    req.on('timeout', () => req.destroy(new Error('internal request timed out')));
    req.on('error', reject);
    req.end();
  });
}

/** Chromium flags for pages that publish: fake camera and microphone, no permission
 * prompt, WebRTC on loopback. */
export const FAKE_MEDIA = [
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
  '--allow-loopback-in-peer-connection',
];

/** Launches headless Chromium; `extraArgs` add to the flags every test needs. */
export function launchChromium(extraArgs = []) {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    timeout: 30_000,
    args: [
      ...extraArgs,
      '--no-sandbox',
      '--disable-gpu',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/** A TCP port free right now on 127.0.0.1 (UDP ports are usually free too). */
export async function freePort() {
  const net = await import('node:net');
  return await new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

/** Opens `url` in a new context of `browser` with camera and microphone granted;
 * uncaught page errors are pushed to `errors`, tagged with `name`. */
export async function openPage(browser, name, url, errors) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.grantPermissions(['camera', 'microphone']);
  const page = await context.newPage();
  page.on('pageerror', (e) => errors.push(`[${name}] pageerror: ${e.message}`));
  await page.goto(url, { waitUntil: 'load' });
  return page;
}

/** Video frames the meeting page's SDK has decoded so far. */
export const framesDecoded = async (page) =>
  (await page.evaluate(() => window.meridian.stats()))?.framesDecoded ?? 0;

/** Waits until `page` decoded more than `above` frames; returns the count. */
export async function framesAbove(page, above, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  let n = 0;
  while (Date.now() < deadline) {
    n = await framesDecoded(page);
    if (n > above) return n;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`no new frames within ${timeoutMs} ms (still ${n})`);
}

/**
 * Opens Alice's and Bob's pages, both publishing in `room` on `node` (the web client at
 * `?transport=ws` plus `query`, e.g. `&nodes=…`), and waits until both are connected and
 * each decoded more than `frames` video frames. Resolves `[alice, bob]`; on failure logs
 * each page's status history, closes both pages and rejects. Uncaught page errors go to
 * `errors`.
 */
export async function openPair(browser, node, room, errors,
  { query = '', frames = 10, connectMs = 30_000, framesMs = 30_000 } = {}) {
  const names = ['alice', 'bob'];
  const url = (who) => `http://${node.listening.http}/?transport=ws${query}` +
    `&token=${encodeURIComponent(node.token(room, who, '--name', who, '--publish'))}`;
  const pages = [];
  try {
    for (const who of names) pages.push(await openPage(browser, who, url(who), errors));
    for (const p of pages) {
      await p.waitForFunction(() => window.meridian?.state() === 'connected', null, { timeout: connectMs });
      await framesAbove(p, frames, framesMs);
    }
    return pages;
  } catch (e) {
    for (const [i, p] of pages.entries()) {
      const history = await p.evaluate(() => window.meridian?.statusHistory).catch((err) => String(err));
      console.log(`[openPair] ${names[i]} status history: ${JSON.stringify(history)}`);
      await p.context().close().catch(() => {});
    }
    throw e;
  }
}

/**
 * Chromium's WebRTC UMA histograms whose names start with `prefix`, read from
 * chrome://histograms in a new context of `browser` (renderer histograms included):
 * `{ name: { samples, mean } }`. libwebrtc records some only when a stream ends, e.g.
 * the ULPFEC receiver's `WebRTC.Video.ReceivedFecPacketsInPercent` and
 * `WebRTC.Video.RecoveredMediaPacketsInPercentOfFec` (after at least 10 s of FEC),
 * which getStats() does not report (its video `fecPacketsReceived` is FlexFEC's only).
 */
export async function webrtcHistograms(browser, prefix = 'WebRTC.Video') {
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    await page.goto(`chrome://histograms/${prefix}`);
    // "Include histograms from subprocesses" (the renderer's WebRTC), then reload.
    for (const box of await page.$$('input[type=checkbox]')) if (!(await box.isChecked())) await box.check();
    await page.reload();
    // Subprocess histograms arrive asynchronously: read until the list settles.
    let text = '';
    for (let i = 0; i < 10; i += 1) {
      await new Promise((r) => setTimeout(r, 500));
      const t = await page.evaluate(() => document.body.innerText);
      if (t === text && t.includes('Histogram:')) break;
      text = t;
    }
    const out = {};
    for (const m of text.matchAll(/Histogram: (\S+) recorded (\d+) samples, mean = ([\d.]+)/g)) {
      out[m[1]] = { samples: Number(m[2]), mean: Number(m[3]) };
    }
    return out;
  } finally {
    await context.close().catch(() => {});
  }
}
