// Failover seen from the browser: two `meridian serve` nodes form a region on one
// Postgres schema; two pages publish and watch each other through node A with both
// nodes in `?nodes=`. Node A is SIGKILLed: both pages reconnect to node B by
// themselves, are restored as the same participants (new peer connections, same track
// ids) and decode each other's video again, with no page reload.
//
// Needs the local Postgres (scripts/start-postgres.sh) and psql.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { checkPrerequisites, checkWebClient, startMeridian, launchChromium, FAKE_MEDIA, openPair, framesDecoded, framesAbove } from './harness.mjs';

const SCHEMA = `browser_failover_${process.pid}_${Date.now()}`;
const PSQL = ['-h', '127.0.0.1', '-U', 'postgres', '-d', 'test', '-v', 'ON_ERROR_STOP=1', '-c'];
const PSQL_ENV = { ...process.env, PGOPTIONS: '--client-min-messages=warning' };
const DB_URL = `postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3D${SCHEMA}`;

let dataDir;
let nodeA;
let nodeB;
let browser;
const log = (...args) => console.log('[failover-e2e]', ...args);

before(async () => {
  checkPrerequisites();
  checkWebClient();
  execFileSync('psql', [...PSQL, `CREATE SCHEMA "${SCHEMA}"`], { timeout: 10_000, env: PSQL_ENV });
  dataDir = mkdtempSync(path.join(tmpdir(), 'meridian-failover-e2e-'));
  const region = (id) => ['--database-url', DB_URL, '--node-id', id, '--resume-grace-secs', '30'];
  nodeA = await startMeridian('failover-a', region('node-a'), { dataDir });
  nodeB = await startMeridian('failover-b', region('node-b'), { dataDir });
  browser = await launchChromium(FAKE_MEDIA);
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (nodeA) await nodeA.stop();
  if (nodeB) await nodeB.stop();
  try {
    execFileSync('psql', [...PSQL, `DROP SCHEMA IF EXISTS "${SCHEMA}" CASCADE`], { timeout: 10_000, env: PSQL_ENV });
  } catch (e) { console.log('dropping the schema failed:', e.message); }
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

test('pages reconnect to the surviving node after SIGKILL and see each other again', { timeout: 120_000 }, async () => {
  const errors = [];
  const nodes = `http://${nodeA.listening.http},http://${nodeB.listening.http}`;
  let a;
  let b;
  try {
    [a, b] = await openPair(browser, nodeA, 'room-failover', errors,
      { query: `&nodes=${encodeURIComponent(nodes)}`, frames: 0 });
    const ids = await Promise.all([a, b].map((p) => p.evaluate(() => window.meridian.session.participantId)));
    const before = await Promise.all([a, b].map(framesDecoded));
    const killedAt = Date.now();
    nodeA.kill('SIGKILL');
    for (const p of [a, b]) {
      await p.waitForFunction(() => window.meridian.session.restoredCount >= 1
        && window.meridian.state() === 'connected', null, { timeout: 30_000 });
    }
    const after = await Promise.all([a, b].map((p, i) => framesAbove(p, before[i] + 10)));
    log(`both pages decode again ${Date.now() - killedAt} ms after SIGKILL`, JSON.stringify({ before, after }));
    const idsAfter = await Promise.all([a, b].map((p) => p.evaluate(() => window.meridian.session.participantId)));
    assert.deepEqual(idsAfter, ids, 'the same participants, restored from the log on node B');
    assert.equal(await a.locator('.tile').count(), 2, 'Alice still sees Bob');
    assert.deepEqual(errors, []);
  } catch (e) {
    console.log('---- node B stderr ----\n' + nodeB.stderr().slice(-8000));
    for (const [n, p] of [['alice', a], ['bob', b]]) {
      const d = await p?.evaluate(() => ({ history: window.meridian?.statusHistory, errors: window.meridian?.session?.errors }))
        .catch((err) => String(err));
      console.log(n, JSON.stringify(d));
    }
    throw e;
  } finally {
    for (const p of [a, b]) await p?.context().close().catch(() => {});
  }
});
