// ICE restart seen from the browser (issue 15): two pages publish and watch each other
// on `meridian serve --dev`. The node cuts Bob's media path for 12 s (`POST
// /dev/cut-media`: every datagram from and to his two connections dropped, signaling
// left up). Bob's page sees ICE go `disconnected`, restarts ICE on the same
// participant (publisher: restartIce + offer; subscriber: `ice_restart` + the node's
// new offer), and once the cut ends both pages decode each other's video again, with
// the same participant ids, no rejoin and no page reload.
//
// Run: scripts/test.sh, or after building: cd tests/browser && node --test icerestart.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { checkPrerequisites, checkWebClient, startMeridian, launchChromium, FAKE_MEDIA, openPair, framesDecoded, framesAbove } from './harness.mjs';

let node;
let browser;
const log = (...args) => console.log('[ice-restart-e2e]', ...args);
// Long enough that Chromium reports ICE `disconnected` (some seconds in) and the SDK
// restarts (2 s later) well before the path comes back by itself.
const CUT_MS = 12_000;

before(async () => {
  checkPrerequisites();
  checkWebClient();
  node = await startMeridian('meridian-ice-restart', ['--dev']);
  browser = await launchChromium(FAKE_MEDIA);
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (node) await node.stop();
});

/** `POST /dev/cut-media`: the node drops one participant's media for `ms`. */
async function cutMedia(participantId, ms) {
  const res = await fetch(`http://${node.listening.http}/dev/cut-media`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ participant_id: participantId, ms }),
  });
  assert.equal(res.status, 204, `cut-media answered ${res.status}: ${await res.text()}`);
}

test('a page whose media path dies comes back by ICE restart on the same participant', { timeout: 120_000 }, async () => {
  const errors = [];
  let a;
  let b;
  try {
    [a, b] = await openPair(browser, node, 'room-ice-restart', errors);
    const session = (p) => p.evaluate(() => ({
      id: window.meridian.session.participantId,
      restarts: window.meridian.session.iceRestarts,
      resumed: window.meridian.session.resumedCount,
      restored: window.meridian.session.restoredCount,
    }));
    const [alice0, bob0] = await Promise.all([a, b].map(session));
    assert.equal(bob0.restarts, 0, 'no ICE restart before the cut');

    await cutMedia(bob0.id, CUT_MS);
    const cutAt = Date.now();
    // Bob restarts ICE while the path is still cut (and again after the retry interval).
    await b.waitForFunction(() => window.meridian.session.iceRestarts >= 1, null, { timeout: CUT_MS + 20_000 });
    const restartedAfter = Date.now() - cutAt;
    await new Promise((r) => setTimeout(r, Math.max(0, CUT_MS - (Date.now() - cutAt))));
    const [aliceAtEnd, bobAtEnd] = await Promise.all([a, b].map(framesDecoded));
    const [aliceAfter, bobAfter] = await Promise.all([framesAbove(a, aliceAtEnd + 30), framesAbove(b, bobAtEnd + 30)]);
    log(`first restart ${restartedAfter} ms into the cut; both pages decode again ${Date.now() - cutAt} ms after it began`,
      JSON.stringify({ aliceAtEnd, aliceAfter, bobAtEnd, bobAfter }));

    const [alice1, bob1] = await Promise.all([a, b].map(session));
    assert.equal(bob1.id, bob0.id, 'Bob is the same participant');
    assert.equal(alice1.id, alice0.id, 'Alice is the same participant');
    assert.ok(bob1.restarts >= 1, `Bob restarted ICE (${bob1.restarts})`);
    assert.equal(bob1.resumed, bob0.resumed, 'signaling stayed up: no resume');
    assert.equal(bob1.restored, bob0.restored, 'no restore');
    assert.equal(await a.locator('.tile').count(), 2, 'Alice still sees Bob');
    assert.deepEqual(errors, []);
  } catch (e) {
    console.log('---- node stderr ----\n' + node.stderr().slice(-8000));
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
