// Chromium under node-side chaos (issue 15): `meridian serve --dev --impair …` impairs the
// node's own media socket (egress, seeded str0m-netem: one impaired hop, as the article
// did), two headless Chromium pages join one room on the web client's meeting page, both
// publishing the fake camera + microphone, and after a warm-up the script reads
// `getStats()` of each page's subscriber connection at the start and the end of a
// measured window. It prints one JSON line (logs go to stderr): per page, the window's
// deltas of the inbound video (framesDecoded, framesDropped, freezeCount,
// totalFreezesDuration, jitterBufferDelay per emitted frame, nackCount,
// fecPacketsReceived/Discarded — FlexFEC only in Chromium, absent with ULPFEC —
// packetsLost) and audio (concealedSamples, silent and audible, / totalSamplesReceived,
// concealmentEvents, packetsLost, FEC), what each page negotiated (audio RED, video FEC),
// and Chromium's ULPFEC receiver counters from its UMA histograms (`chromium_ulpfec`).
//
// Not part of `npm test`: a measurement, run by hand from the repository root after
// building the node and the web client (scripts/test.sh builds both), or from
// scripts/bench-chaos.sh with BROWSER="clean red nored":
//   node tests/browser/chaos-stats.mjs                       # 60 s, delay=200ms,jitter=20ms,loss=2%
//   DURATION=30 IMPAIR=off node tests/browser/chaos-stats.mjs
//   DURATION=30 RED=0 node tests/browser/chaos-stats.mjs     # audio without RED
//   DURATION=30 FEC=0 node tests/browser/chaos-stats.mjs     # video without FEC
//   MERIDIAN_BIN=../../target/release/meridian node tests/browser/chaos-stats.mjs
//
// Environment:
//   DURATION  measured seconds (default 60), after WARMUP seconds (default 5) of decoding
//   IMPAIR    the node's --impair spec (default delay=200ms,jitter=20ms,loss=2%), `off` for none
//   SEED      --impair-seed (default 7)
//   RED       1 (default): audio RED (red/48000/2) negotiated both ways, as Chromium and
//             the node do by default; 0: the pages strip RED from every description the
//             node sends them (its answer to the publisher, its offer to the subscriber), so
//             neither side sends it and audio is plain Opus (the node cannot add RED for a
//             page that did not negotiate it)
//   MERIDIAN_BIN, CHROMIUM, MERIDIAN_WEB_ROOT as in harness.mjs
//
//   FEC       1 (default): video FEC negotiated (the node offers `red/90000` + `ulpfec/90000`
//             and makes ULPFEC a browser rebuilds byte for byte, at a rate following the
//             page's loss); 0: the pages strip video `red`/`ulpfec` (and RED's rtx) from the
//             node's subscriber offers, so video is plain VP8 repaired by NACK only
//
// Chromium reports no ULPFEC counter in getStats() (video fecPacketsReceived is FlexFEC's
// only; on audio it counts Opus in-band FEC data): after the window the pages close their
// subscriber connections and the script reads the ULPFEC receiver's UMA histograms from
// chrome://histograms (`chromium_ulpfec`: FEC share of the RED packets received, packets
// rebuilt per 100 FEC packets, RED bitrate).
import { checkPrerequisites, checkWebClient, startMeridian, launchChromium, FAKE_MEDIA, openPage, framesAbove, webrtcHistograms } from './harness.mjs';

const DURATION = Number(process.env.DURATION || 60);
const WARMUP = Number(process.env.WARMUP || 5);
const IMPAIR = process.env.IMPAIR || 'delay=200ms,jitter=20ms,loss=2%';
const SEED = process.env.SEED || '7';
const RED = (process.env.RED ?? '1') !== '0';
const FEC = (process.env.FEC ?? '1') !== '0';
const log = (...args) => console.error('[chaos-stats]', ...args);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Page script (RED=0): removes `red/48000/2` from remote descriptions before use. */
function stripRed() {
  const strip = (sdp) => {
    const red = [...sdp.matchAll(/a=rtpmap:(\d+) red\/48000\/2/gi)].map((m) => m[1]);
    if (!red.length) return sdp;
    const own = (l) => red.some((pt) => [`a=rtpmap:${pt} `, `a=fmtp:${pt} `, `a=rtcp-fb:${pt} `].some((x) => l.startsWith(x)));
    return sdp.split('\r\n').filter((l) => !own(l))
      .map((l) => (l.startsWith('m=audio') ? l.split(' ').filter((t, i) => i < 3 || !red.includes(t)).join(' ') : l))
      .join('\r\n');
  };
  const set = RTCPeerConnection.prototype.setRemoteDescription;
  RTCPeerConnection.prototype.setRemoteDescription = function (desc, ...rest) {
    if (desc && desc.sdp) desc = { type: desc.type, sdp: strip(desc.sdp) };
    return set.call(this, desc, ...rest);
  };
}

/** Page script (FEC=0): removes video `red/90000`, `ulpfec/90000` and RED's rtx from
 * remote descriptions before use. */
function stripVideoFec() {
  const strip = (sdp) => {
    const fec = [...sdp.matchAll(/a=rtpmap:(\d+) (red|ulpfec)\/90000/gi)].map((m) => m[1]);
    if (!fec.length) return sdp;
    const rtx = [...sdp.matchAll(/a=fmtp:(\d+) apt=(\d+)/gi)].filter((m) => fec.includes(m[2])).map((m) => m[1]);
    const gone = [...fec, ...rtx];
    const own = (l) => gone.some((pt) => [`a=rtpmap:${pt} `, `a=fmtp:${pt} `, `a=rtcp-fb:${pt} `].some((x) => l.startsWith(x)));
    return sdp.split('\r\n').filter((l) => !own(l))
      .map((l) => (l.startsWith('m=video') ? l.split(' ').filter((t, i) => i < 3 || !gone.includes(t)).join(' ') : l))
      .join('\r\n');
  };
  const set = RTCPeerConnection.prototype.setRemoteDescription;
  RTCPeerConnection.prototype.setRemoteDescription = function (desc, ...rest) {
    if (desc && desc.sdp) desc = { type: desc.type, sdp: strip(desc.sdp) };
    return set.call(this, desc, ...rest);
  };
}

/** Sums of the subscriber connection's inbound-rtp counters per kind, and codec names. */
function readInbound(page) {
  return page.evaluate(async () => {
    const pc = window.meridian?.session?.sub;
    if (!pc) return null;
    const report = await pc.getStats();
    const fields = ['framesDecoded', 'framesDropped', 'framesReceived', 'freezeCount', 'totalFreezesDuration',
      'jitterBufferDelay', 'jitterBufferEmittedCount', 'nackCount', 'pliCount', 'fecPacketsReceived',
      'fecPacketsDiscarded', 'packetsLost', 'packetsReceived', 'concealedSamples', 'totalSamplesReceived',
      'bytesReceived', 'silentConcealedSamples', 'concealmentEvents'];
    const out = { video: { streams: 0, codecs: [] }, audio: { streams: 0, codecs: [] } };
    report.forEach((s) => {
      if (s.type !== 'inbound-rtp' || !out[s.kind]) return;
      const k = out[s.kind];
      k.streams += 1;
      for (const f of fields) if (typeof s[f] === 'number') k[f] = (k[f] ?? 0) + s[f];
      const codec = s.codecId && report.get(s.codecId);
      if (codec && !k.codecs.includes(codec.mimeType)) k.codecs.push(codec.mimeType);
    });
    // What was negotiated, from the SDP answers (getStats lists only codecs in use, and
    // RED arrives unwrapped as Opus): codec names of the page's answer to the node's
    // subscriber offer, and of the node's answer to the page's publisher offer.
    const names = (sdp) => [...new Set([...(sdp ?? '').matchAll(/a=rtpmap:\d+ ([^\r\n]+)/g)].map((m) => m[1].toLowerCase()))];
    // The codec of the page's outbound audio as Chromium reports it (audio/opus also when
    // RED is negotiated: the stats name the primary codec).
    const pubReport = await window.meridian.session.pub?.getStats();
    out.sendAudio = [];
    pubReport?.forEach((s) => {
      const c = s.type === 'outbound-rtp' && s.kind === 'audio' && s.codecId && pubReport.get(s.codecId);
      if (c && !out.sendAudio.includes(c.mimeType)) out.sendAudio.push(c.mimeType);
    });
    out.negotiated = {
      subscribe: names(pc.currentLocalDescription?.sdp),
      publish: names(window.meridian.session.pub?.currentRemoteDescription?.sdp),
    };
    return out;
  });
}

/** The window's figures from two readings. */
function figures(a, b) {
  const d = (kind, f) => (b[kind][f] ?? 0) - (a[kind][f] ?? 0);
  const round = (x, n = 3) => (Number.isFinite(x) ? Number(x.toFixed(n)) : null);
  const emitted = d('video', 'jitterBufferEmittedCount');
  const aEmitted = d('audio', 'jitterBufferEmittedCount');
  const vReceived = d('video', 'packetsReceived');
  const vLost = d('video', 'packetsLost');
  const aReceived = d('audio', 'packetsReceived');
  const aLost = d('audio', 'packetsLost');
  return {
    video: {
      codecs: b.video.codecs,
      framesDecoded: d('video', 'framesDecoded'),
      framesPerSecond: round(d('video', 'framesDecoded') / DURATION, 1),
      framesDropped: d('video', 'framesDropped'),
      freezeCount: d('video', 'freezeCount'),
      totalFreezesDuration_s: round(d('video', 'totalFreezesDuration')),
      jitterBufferDelay_ms_per_frame: round((d('video', 'jitterBufferDelay') / emitted) * 1000, 1),
      nackCount: d('video', 'nackCount'),
      pliCount: d('video', 'pliCount'),
      fecPacketsReceived: d('video', 'fecPacketsReceived'),
      fecPacketsDiscarded: d('video', 'fecPacketsDiscarded'),
      packetsReceived: vReceived,
      packetsLost: vLost,
      lost_pct: round((100 * vLost) / (vReceived + vLost), 2),
      kbit_s: round((8 * d('video', 'bytesReceived')) / DURATION / 1000, 0),
    },
    audio: {
      codecs: b.audio.codecs,
      concealedSamples: d('audio', 'concealedSamples'),
      totalSamplesReceived: d('audio', 'totalSamplesReceived'),
      silentConcealedSamples: d('audio', 'silentConcealedSamples'),
      concealmentEvents: d('audio', 'concealmentEvents'),
      // Concealment outside silence (the fake microphone is silent between beeps, and
      // Chromium counts the comfort noise it plays there as concealed too).
      audibleConcealedSamples: d('audio', 'concealedSamples') - d('audio', 'silentConcealedSamples'),
      audible_concealed_pct: round((100 * (d('audio', 'concealedSamples') - d('audio', 'silentConcealedSamples')))
        / d('audio', 'totalSamplesReceived'), 2),
      concealed_pct: round((100 * d('audio', 'concealedSamples')) / d('audio', 'totalSamplesReceived'), 2),
      jitterBufferDelay_ms_per_sample: round((d('audio', 'jitterBufferDelay') / aEmitted) * 1000, 1),
      fecPacketsReceived: d('audio', 'fecPacketsReceived'),
      fecPacketsDiscarded: d('audio', 'fecPacketsDiscarded'),
      nackCount: d('audio', 'nackCount'),
      packetsReceived: aReceived,
      packetsLost: aLost,
      lost_pct: round((100 * aLost) / (aReceived + aLost), 2),
    },
    send_audio_codecs: b.sendAudio,
    red_audio: {
      subscribe: b.negotiated.subscribe.includes('red/48000/2'),
      publish: b.negotiated.publish.includes('red/48000/2'),
    },
    // A subscriber connection replaced during the window restarts its counters: the
    // deltas are then meaningless.
    counters_reset: d('video', 'framesDecoded') < 0 || d('audio', 'totalSamplesReceived') < 0,
    video_fec_negotiated: b.negotiated.subscribe.some((c) => c.startsWith('ulpfec') || c.startsWith('flexfec')),
    negotiated: b.negotiated,
  };
}

async function main() {
  checkPrerequisites();
  checkWebClient();
  const nodeArgs = ['--dev'];
  if (IMPAIR !== 'off') nodeArgs.push('--impair', IMPAIR, '--impair-seed', SEED);
  const loadStart = (await import('node:fs')).readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  log(`node ${nodeArgs.join(' ')}; RED ${RED ? 'on' : 'off'}; FEC ${FEC ? 'on' : 'off'}; ${WARMUP} s warm-up, ${DURATION} s measured; load ${loadStart}`);
  const node = await startMeridian('meridian-chaos-stats', nodeArgs);
  const browser = await launchChromium(FAKE_MEDIA);
  const errors = [];
  const pages = [];
  try {
    const room = 'room-chaos-stats';
    const url = (who) => `http://${node.listening.http}/?transport=ws` +
      `&token=${encodeURIComponent(node.token(room, who, '--name', who, '--publish'))}`;
    for (const who of ['alice', 'bob']) {
      const page = await openPage(browser, who, url(who), errors);
      if (!RED || !FEC) {
        // Joined once with RED and FEC; the reload joins again (same identity) with the
        // knobs' codecs stripped.
        if (!RED) await page.context().addInitScript(stripRed);
        if (!FEC) await page.context().addInitScript(stripVideoFec);
        await page.reload({ waitUntil: 'load' });
      }
      pages.push([who, page]);
    }
    for (const [, p] of pages) {
      await p.waitForFunction(() => window.meridian?.state() === 'connected', null, { timeout: 30_000 });
      await framesAbove(p, 10, 60_000);
    }
    await sleep(WARMUP * 1000);
    const start = await Promise.all(pages.map(([, p]) => readInbound(p)));
    await sleep(DURATION * 1000);
    const end = await Promise.all(pages.map(([, p]) => readInbound(p)));
    const result = {
      impair: IMPAIR, impair_seed: IMPAIR === 'off' ? null : Number(SEED), red: RED, video_fec: FEC,
      duration_s: DURATION, load_avg_start: loadStart, node_bin: process.env.MERIDIAN_BIN || '../../target/debug/meridian',
      pages: {},
    };
    pages.forEach(([who], i) => {
      if (!start[i] || !end[i]) throw new Error(`${who}: no subscriber connection`);
      result.pages[who] = figures(start[i], end[i]);
    });
    // Chromium's ULPFEC receiver counters (UMA, recorded when a receive stream ends; means
    // over both pages' video streams): FEC packets among the RED packets received, and
    // packets rebuilt per 100 FEC packets. getStats() has no ULPFEC counter.
    for (const [, p] of pages) await p.evaluate(() => window.meridian.session.sub.close()).catch(() => {});
    await sleep(2_000);
    const h = await webrtcHistograms(browser);
    const pick = (n) => (h[n] ? { samples: h[n].samples, mean: h[n].mean } : null);
    result.chromium_ulpfec = {
      received_fec_packets_pct: pick('WebRTC.Video.ReceivedFecPacketsInPercent'),
      recovered_packets_per_100_fec: pick('WebRTC.Video.RecoveredMediaPacketsInPercentOfFec'),
      red_kbps: pick('WebRTC.Video.FecBitrateReceivedInKbps'),
    };
    if (errors.length) result.page_errors = errors;
    console.log(JSON.stringify(result));
  } catch (e) {
    console.error('---- node stderr ----\n' + node.stderr().slice(-4000));
    throw e;
  } finally {
    for (const [, p] of pages) await p.context().close().catch(() => {});
    await browser.close().catch(() => {});
    await node.stop();
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
