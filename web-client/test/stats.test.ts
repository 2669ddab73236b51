import { describe, expect, it } from 'vitest';
import { summarize } from '../src/sdk/stats';

describe('stats summary', () => {
  it('sums inbound/outbound, computes bitrate from the previous sample, loss and per-tile layer', () => {
    const sub = (bytes: number, frames: number) => [
      { type: 'transport', id: 'T', selectedCandidatePairId: 'CP' },
      { type: 'candidate-pair', id: 'CP', currentRoundTripTime: 0.012 },
      { type: 'inbound-rtp', id: 'v', kind: 'video', mid: '0', bytesReceived: bytes, packetsReceived: 990, packetsLost: 10, framesDecoded: frames, frameWidth: 640, frameHeight: 360, freezeCount: 1 },
      { type: 'inbound-rtp', id: 'a', kind: 'audio', mid: '1', bytesReceived: 1000, packetsReceived: 100, packetsLost: 0 },
    ];
    const pub = [
      { type: 'outbound-rtp', id: 'o1', kind: 'video', rid: 'h', bytesSent: 5000, framesSent: 30, frameWidth: 640, frameHeight: 360 },
      { type: 'outbound-rtp', id: 'o0', kind: 'video', rid: 'q', bytesSent: 1000, framesSent: 30 },
      { type: 'outbound-rtp', id: 'o2', kind: 'video', rid: 'f', bytesSent: 0, framesSent: 0 },
    ];
    const tracks = new Map([['0', 'TR_1']]);
    const layers = new Map([['TR_1', 'medium' as const]]);
    const first = summarize(pub, sub(10_000, 10), 1000, undefined, tracks, layers);
    expect(first.kbpsIn).toBe(0);
    expect(first.rttMs).toBe(12);
    const second = summarize(pub, sub(135_000, 40), 2000, first, tracks, layers);
    expect(second.kbpsIn).toBe(1000); // 125 kB in 1 s
    expect(second.framesDecoded).toBe(40);
    expect(second.freezeCount).toBe(1);
    expect(second.lossPct).toBeCloseTo((100 * 10) / 1100, 5);
    expect(second.tiles).toEqual([expect.objectContaining({ mid: '0', trackId: 'TR_1', layer: 'medium', width: 640, framesDecoded: 40 })]);
    expect(second.layersSent.map((l) => l.rid)).toEqual(['h', 'q']);
    expect(second.framesSent).toBe(60);
  });
  it('is empty without connections', () => {
    const s = summarize([], [], 0);
    expect(s).toMatchObject({ kbpsIn: 0, kbpsOut: 0, lossPct: 0, framesDecoded: 0, tiles: [] });
    expect(s.rttMs).toBeUndefined();
  });
});
