// Rooms across nodes seen from the browser (issue 13): two `meridian serve` nodes form
// a region on one Postgres schema with `--max-participants 1`. Alice publishes through
// node A; Bob opens his page on node A too, but A is full, so placement sends him to
// node B, which hosts a second part of the room. Bob's page decodes Alice's video, which
// crossed the A→B relay link (node B's relay counters grow, node B hosts the part), and
// his session is told when Alice mutes and unmutes her microphone on node A; his page
// names Alice's tile and badges her microphone mute (node B is told who publishes).
//
// Needs the local Postgres (scripts/start-postgres.sh) and psql.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { checkPrerequisites, checkWebClient, startMeridian, launchChromium, FAKE_MEDIA, openPage, framesDecoded, framesAbove } from './harness.mjs';

const SCHEMA = `browser_relay_${process.pid}_${Date.now()}`;
const PSQL = ['-h', '127.0.0.1', '-U', 'postgres', '-d', 'test', '-v', 'ON_ERROR_STOP=1', '-At', '-c'];
const PSQL_ENV = { ...process.env, PGOPTIONS: '--client-min-messages=warning' };
const DB_URL = `postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3D${SCHEMA}`;

let dataDir;
let nodeA;
let nodeB;
let browser;
const log = (...args) => console.log('[relay-e2e]', ...args);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const psql = (sql) => execFileSync('psql', [...PSQL, sql], { timeout: 10_000, env: PSQL_ENV, encoding: 'utf8' }).trim();

before(async () => {
  checkPrerequisites();
  checkWebClient();
  psql(`CREATE SCHEMA "${SCHEMA}"`);
  // One data directory: the nodes share the token key and the development internal CA
  // (relay control runs over mutual TLS between the nodes).
  dataDir = mkdtempSync(path.join(tmpdir(), 'meridian-relay-e2e-'));
  const region = (id) => ['--database-url', DB_URL, '--node-id', id, '--max-participants', '1'];
  nodeA = await startMeridian('relay-a', region('node-a'), { dataDir });
  nodeB = await startMeridian('relay-b', region('node-b'), { dataDir });
  // Placement sends joins only to nodes it knows are live: wait until both leases are
  // in the log, with their internal addresses, then for a few lease periods (100 ms)
  // so each node's view of the region has caught up.
  const deadline = Date.now() + 20_000;
  while (Date.now() < deadline) {
    const n = Number(psql(`SELECT count(*) FROM "${SCHEMA}".node_leases WHERE internal_addr <> ''`));
    if (n === 2) break;
    await sleep(200);
  }
  await sleep(1_000);
  browser = await launchChromium(FAKE_MEDIA);
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (nodeA) await nodeA.stop();
  if (nodeB) await nodeB.stop();
  try {
    psql(`DROP SCHEMA IF EXISTS "${SCHEMA}" CASCADE`);
  } catch (e) { console.log('dropping the schema failed:', e.message); }
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

/** The value of one exported series (`name{labels}` exactly), 0 when absent. */
function series(text, name) {
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `)) return Number(line.slice(name.length + 1));
  }
  return 0;
}

async function metrics(node) {
  const r = await node.internal('GET', '/metrics');
  assert.equal(r.status, 200, r.body);
  return r.body;
}

test('a page watches, through node B, a camera published on node A', { timeout: 150_000 }, async () => {
  const errors = [];
  const room = 'room-relay';
  const base = `http://${nodeA.listening.http}`;
  const nodes = `${base},http://${nodeB.listening.http}`;
  const alice = await openPage(browser, 'alice', `${base}/?transport=ws&nodes=${encodeURIComponent(nodes)}` +
    `&token=${encodeURIComponent(nodeA.token(room, 'alice', '--name', 'Alice', '--publish'))}`, errors);
  let bob;
  try {
    await alice.waitForFunction(() => window.meridian?.state() === 'connected', null, { timeout: 30_000 });
    // Bob knocks at node A too: it is full, so he is redirected to node B.
    bob = await openPage(browser, 'bob', `${base}/?transport=ws&publish=0&nodes=${encodeURIComponent(nodes)}` +
      `&token=${encodeURIComponent(nodeA.token(room, 'bob', '--name', 'Bob', '--subscribe'))}`, errors);
    await bob.waitForFunction(() => window.meridian?.state() === 'connected', null, { timeout: 30_000 });
    const first = await framesAbove(bob, 0, 45_000);
    const relayIn = `meridian_relay_packets_total{direction="in",peer="node-a"}`;
    const relayOut = `meridian_relay_packets_total{direction="out",peer="node-b"}`;
    const [b0, a0] = [series(await metrics(nodeB), relayIn), series(await metrics(nodeA), relayOut)];
    const later = await framesAbove(bob, first + 30, 45_000);
    const textB = await metrics(nodeB);
    const [b1, a1] = [series(textB, relayIn), series(await metrics(nodeA), relayOut)];
    log(JSON.stringify({ framesDecoded: [first, later], relayInAtB: [b0, b1], relayOutAtA: [a0, a1] }));
    // Bob is on node B, in the room's second part, and his video came over the link.
    assert.equal(series(textB, `meridian_room_part_participants{part="${room}~node-b"}`), 1, 'Bob is in node B\'s part');
    assert.equal(series(textB, `meridian_relay_tracks{direction="in",peer="node-a"}`), 2, 'audio and video cross A→B');
    assert.ok(b1 > b0, `relayed packets keep arriving at node B: ${b0} → ${b1}`);
    assert.ok(a1 > a0, `node A keeps relaying to node B: ${a0} → ${a1}`);
    const placed = psql(`SELECT count(*) FROM "${SCHEMA}".events WHERE stream = 'room:${room}~node-b' AND event_type = 'RoomPartPlaced'`);
    assert.equal(placed, '1', 'the log records the part on node B');
    const playing = await bob.evaluate(() => [...document.querySelectorAll('.tile video')].filter((v) => v.videoWidth > 0).length);
    assert.ok(playing >= 1, 'Bob\'s page shows Alice\'s video');
    // Bob's node is told who publishes it (Alice is in node A's part): her tile is named.
    await bob.waitForFunction(() => [...document.querySelectorAll('.tile .name')].some((n) => n.textContent === 'Alice'),
      null, { timeout: 10_000 });
    const aliceBadges = () => bob.evaluate(() => {
      const tile = [...document.querySelectorAll('.tile')].find((t) => t.querySelector('.name')?.textContent === 'Alice');
      return tile ? [...tile.querySelectorAll('[data-badge="mic"], [data-badge="cam"]')].map((b) => b.textContent) : null;
    });
    // Alice mutes her microphone on node A: Bob's session on node B is told (the
    // track's state crosses the link; node B sends `track_muted`), then the unmute.
    const mic = await alice.evaluate(() => window.meridian.session.ownTracks().find((t) => t.kind === 'audio')?.track_id);
    assert.ok(mic, 'Alice publishes a microphone');
    await bob.evaluate(() => {
      window.mutes = [];
      window.meridian.session.on('muted', (e) => window.mutes.push([e.trackId, e.muted]));
    });
    const told = (muted) => bob.waitForFunction(([id, m]) => window.mutes.some(([t, x]) => t === id && x === m),
      [mic, muted], { timeout: 15_000 });
    await alice.click('#mute-audio');
    await told(true);
    // Her microphone mute badges her tile's microphone (not the camera).
    assert.deepEqual(await aliceBadges(), ['mic muted']);
    await alice.click('#mute-audio');
    await told(false);
    assert.deepEqual(await aliceBadges(), []);
    assert.deepEqual(errors, []);
  } catch (e) {
    console.log('---- node A stderr ----\n' + nodeA.stderr().slice(-6000));
    console.log('---- node B stderr ----\n' + nodeB.stderr().slice(-6000));
    for (const [n, p] of [['alice', alice], ['bob', bob]]) {
      if (!p) continue;
      const d = await p.evaluate(() => ({ history: window.meridian?.statusHistory, errors: window.meridian?.session?.errors }))
        .catch((err) => String(err));
      console.log(n, JSON.stringify(d));
    }
    throw e;
  } finally {
    await alice.context().close().catch(() => {});
    if (bob) await bob.context().close().catch(() => {});
  }
});
