// Video FEC in Chromium (issue 15 item 2): the node offers `red/90000` + `ulpfec/90000`
// for video, Chromium keeps both in its answer, and under the node's own seeded egress
// loss (`meridian serve --dev --impair loss=5%`) the node sends ULPFEC for the page's
// video at a rate following the loss the page reports. Chromium's ULPFEC receiver takes
// the parity and rebuilds lost packets from it: its UMA histograms, recorded when the
// subscriber connection closes, show the share of FEC packets among the RED packets
// received and the packets rebuilt per FEC packet (getStats() has no ULPFEC counter:
// Chromium's video `fecPacketsReceived` is FlexFEC's only). Decoding goes on meanwhile:
// frames keep coming, no page errors, and keyframe requests stay rare — a rebuilt
// packet that were not byte-exact would reach the VP8 decoder as garbage
// (byte-exactness itself is checked in Rust: crates/meridian-media/tests/fec.rs,
// `a_browser_rebuilds_every_packet_of_a_group_byte_for_byte`).
//
// Run: scripts/test.sh, or after building: cd tests/browser && node --test videofec.test.mjs
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { checkPrerequisites, checkWebClient, startMeridian, launchChromium, FAKE_MEDIA, openPair, webrtcHistograms } from './harness.mjs';

let node;
let browser;
const log = (...args) => console.log('[video-fec-e2e]', ...args);
const WINDOW_MS = 15_000;

before(async () => {
  checkPrerequisites();
  checkWebClient();
  node = await startMeridian('meridian-video-fec', ['--dev', '--impair', 'loss=5%', '--impair-seed', '3']);
  browser = await launchChromium(FAKE_MEDIA);
});

after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (node) await node.stop();
});

/** The page's inbound video counters (summed over streams) and its answer's codecs. */
function inboundVideo(page) {
  return page.evaluate(async () => {
    const pc = window.meridian.session.sub;
    const out = { framesDecoded: 0, packetsLost: 0, packetsReceived: 0, pliCount: 0, nackCount: 0, freezeCount: 0 };
    (await pc.getStats()).forEach((s) => {
      if (s.type !== 'inbound-rtp' || s.kind !== 'video') return;
      for (const k of Object.keys(out)) if (typeof s[k] === 'number') out[k] += s[k];
    });
    out.answer = [...(pc.currentLocalDescription?.sdp ?? '').matchAll(/a=rtpmap:\d+ ([^\r\n]+)/g)].map((m) => m[1].toLowerCase());
    return out;
  });
}

test('Chromium negotiates the node\'s video FEC, rebuilds lost packets from it and keeps decoding', { timeout: 180_000 }, async () => {
  const errors = [];
  const [a, b] = await openPair(browser, node, 'room-video-fec', errors, { framesMs: 60_000 });
  try {
    // The node's FEC group follows the NACKed share it measures each second.
    await new Promise((r) => setTimeout(r, 3_000));
    const start = await Promise.all([a, b].map(inboundVideo));
    await new Promise((r) => setTimeout(r, WINDOW_MS));
    const end = await Promise.all([a, b].map(inboundVideo));
    const metrics = await node.internal('GET', '/metrics');
    const fecBytes = Number(metrics.body.match(/^meridian_fec_bytes_total\S* (\S+)/m)?.[1] ?? 0);
    log('node meridian_fec_bytes_total', fecBytes);
    assert.ok(fecBytes > 0, 'the node sent ULPFEC');
    ['alice', 'bob'].forEach((who, i) => {
      const d = Object.fromEntries(Object.keys(start[i]).filter((k) => k !== 'answer').map((k) => [k, end[i][k] - start[i][k]]));
      log(who, JSON.stringify(d));
      assert.ok(end[i].answer.includes('red/90000') && end[i].answer.includes('ulpfec/90000'),
        `${who} answered red + ulpfec for video: ${end[i].answer.join(', ')}`);
      assert.ok(d.packetsLost + d.nackCount > 0, `${who}: the impairment lost packets`);
      // ~30 fps from the fake camera; a loaded machine decodes fewer, never none.
      assert.ok(d.framesDecoded > (WINDOW_MS / 1000) * 5, `${who}: ${d.framesDecoded} frames decoded in the window`);
      // Garbage from a wrong recovery makes the decoder ask for keyframes again and again.
      assert.ok(d.pliCount <= 5, `${who}: ${d.pliCount} keyframe requests in the window`);
    });
    assert.deepEqual(errors, []);
    // Closing the subscriber connections ends the receive streams: libwebrtc records the
    // ULPFEC receiver's counters (more than 10 s of FEC each).
    for (const p of [a, b]) await p.evaluate(() => window.meridian.session.sub.close());
    await new Promise((r) => setTimeout(r, 2_000));
    const h = await webrtcHistograms(browser);
    log('histograms', JSON.stringify(Object.fromEntries(Object.entries(h).filter(([k]) => /Fec|Nack|Freeze|DroppedFrames/.test(k)))));
    const fecShare = h['WebRTC.Video.ReceivedFecPacketsInPercent'];
    const rebuilt = h['WebRTC.Video.RecoveredMediaPacketsInPercentOfFec'];
    assert.ok(fecShare?.samples >= 2 && fecShare.mean > 0, `ULPFEC packets among the RED packets received: ${JSON.stringify(fecShare)}`);
    assert.ok(rebuilt?.samples >= 2 && rebuilt.mean > 0, `packets rebuilt per 100 ULPFEC packets: ${JSON.stringify(rebuilt)}`);
  } finally {
    await a.context().close().catch(() => {});
    await b.context().close().catch(() => {});
  }
});
