// Turns getStats() reports of the two peer connections into the figures the stats
// panel shows. Pure: takes plain report objects and the previous sample.
import type { Layer } from './protocol';

/** One stats report entry (the fields used here). */
export interface StatsEntry {
  type: string;
  id?: string;
  timestamp?: number;
  kind?: string;
  mid?: string;
  rid?: string;
  bytesReceived?: number;
  bytesSent?: number;
  packetsReceived?: number;
  packetsLost?: number;
  framesDecoded?: number;
  framesSent?: number;
  framesPerSecond?: number;
  frameWidth?: number;
  frameHeight?: number;
  freezeCount?: number;
  totalFreezesDuration?: number;
  currentRoundTripTime?: number;
  nominated?: boolean;
  state?: string;
  selectedCandidatePairId?: string;
  qualityLimitationReason?: string;
  audioLevel?: number;
  totalAudioEnergy?: number;
  totalSamplesDuration?: number;
  trackIdentifier?: string;
}

/** What one remote video tile receives. */
export interface TileStats {
  mid: string;
  trackId?: string;
  /** Layer the node says it forwards (`layer_changed`), if known. */
  layer?: Layer | null;
  width?: number;
  height?: number;
  fps?: number;
  framesDecoded: number;
  freezeCount: number;
  packetsLost: number;
  packetsReceived: number;
  /** Lost / (lost + received) since the track started, percent. */
  lossPct: number;
  /** Connection quality of this tile from its loss and the connection's RTT. */
  quality: ConnectionQuality;
  kbps: number;
}

/** A three-step connection quality, as meeting apps show it. */
export type ConnectionQuality = 'good' | 'fair' | 'poor';

/** Quality from packet loss (percent) and round-trip time (ms): good under 2 % and 200 ms, poor from 8 % or 500 ms. */
export function connectionQuality(lossPct: number, rttMs: number | undefined): ConnectionQuality {
  const rtt = rttMs ?? 0;
  if (lossPct >= 8 || rtt >= 500) return 'poor';
  if (lossPct >= 2 || rtt >= 200) return 'fair';
  return 'good';
}

/** One sample of the panel. */
export interface StatsSummary {
  at: number;
  /** ICE round-trip time of the subscriber (or publisher) connection, ms. */
  rttMs?: number;
  /** Received bits per second over all inbound streams, kbit/s. */
  kbpsIn: number;
  /** Sent, kbit/s. */
  kbpsOut: number;
  packetsReceived: number;
  packetsLost: number;
  /** Lost / (lost + received), percent. */
  lossPct: number;
  framesDecoded: number;
  framesSent: number;
  freezeCount: number;
  /** Inbound video, by subscriber mid. */
  tiles: TileStats[];
  /** Outbound simulcast layers with frames sent. */
  layersSent: { rid: string; width?: number; height?: number; fps?: number; kbps: number; limitation?: string }[];
  /** Raw byte counters for the next delta. */
  bytes: Record<string, number>;
}

const rate = (bytes: number, prevBytes: number | undefined, dtMs: number): number =>
  prevBytes === undefined || dtMs <= 0 || bytes < prevBytes ? 0 : Math.round(((bytes - prevBytes) * 8) / dtMs);

function rttOf(entries: StatsEntry[]): number | undefined {
  const byId = new Map(entries.filter((e) => e.id).map((e) => [e.id as string, e]));
  for (const t of entries) {
    if (t.type === 'transport' && t.selectedCandidatePairId) {
      const pair = byId.get(t.selectedCandidatePairId);
      if (pair?.currentRoundTripTime !== undefined) return pair.currentRoundTripTime * 1000;
    }
  }
  const pair = entries.find((e) => e.type === 'candidate-pair' && e.nominated && e.currentRoundTripTime !== undefined);
  return pair?.currentRoundTripTime !== undefined ? pair.currentRoundTripTime * 1000 : undefined;
}

/**
 * Summarises the publisher (`pub`) and subscriber (`sub`) reports. `prev` gives
 * the previous sample for bitrates; `tracks` maps subscriber mids to track ids and
 * `layers` track ids to the forwarded layer.
 */
export function summarize(
  pub: StatsEntry[],
  sub: StatsEntry[],
  now: number,
  prev?: StatsSummary,
  tracks: ReadonlyMap<string, string> = new Map(),
  layers: ReadonlyMap<string, Layer | null> = new Map(),
): StatsSummary {
  const dt = prev ? now - prev.at : 0;
  const bytes: Record<string, number> = {};
  const out: StatsSummary = {
    at: now,
    rttMs: rttOf(sub) ?? rttOf(pub),
    kbpsIn: 0,
    kbpsOut: 0,
    packetsReceived: 0,
    packetsLost: 0,
    lossPct: 0,
    framesDecoded: 0,
    framesSent: 0,
    freezeCount: 0,
    tiles: [],
    layersSent: [],
    bytes,
  };
  for (const r of sub) {
    if (r.type !== 'inbound-rtp') continue;
    const key = `in:${r.id ?? r.mid ?? ''}`;
    const b = r.bytesReceived ?? 0;
    bytes[key] = b;
    const kbps = rate(b, prev?.bytes[key], dt);
    out.kbpsIn += kbps;
    out.packetsReceived += r.packetsReceived ?? 0;
    out.packetsLost += Math.max(0, r.packetsLost ?? 0);
    if (r.kind === 'video') {
      out.framesDecoded += r.framesDecoded ?? 0;
      out.freezeCount += r.freezeCount ?? 0;
      const mid = r.mid ?? '';
      const trackId = tracks.get(mid);
      out.tiles.push({
        mid,
        trackId,
        layer: trackId !== undefined ? layers.get(trackId) : undefined,
        width: r.frameWidth,
        height: r.frameHeight,
        fps: r.framesPerSecond,
        framesDecoded: r.framesDecoded ?? 0,
        freezeCount: r.freezeCount ?? 0,
        packetsLost: Math.max(0, r.packetsLost ?? 0),
        packetsReceived: r.packetsReceived ?? 0,
        lossPct: 0,
        quality: 'good',
        kbps,
      });
    }
  }
  for (const r of pub) {
    if (r.type !== 'outbound-rtp') continue;
    const key = `out:${r.id ?? `${r.mid}:${r.rid}`}`;
    const b = r.bytesSent ?? 0;
    bytes[key] = b;
    const kbps = rate(b, prev?.bytes[key], dt);
    out.kbpsOut += kbps;
    if (r.kind === 'video') {
      out.framesSent += r.framesSent ?? 0;
      if ((r.framesSent ?? 0) > 0) {
        out.layersSent.push({
          rid: r.rid ?? '',
          width: r.frameWidth,
          height: r.frameHeight,
          fps: r.framesPerSecond,
          kbps,
          limitation: r.qualityLimitationReason,
        });
      }
    }
  }
  out.layersSent.sort((a, b) => a.rid.localeCompare(b.rid));
  const total = out.packetsLost + out.packetsReceived;
  out.lossPct = total > 0 ? (100 * out.packetsLost) / total : 0;
  for (const t of out.tiles) {
    const n = t.packetsLost + t.packetsReceived;
    t.lossPct = n > 0 ? (100 * t.packetsLost) / n : 0;
    t.quality = connectionQuality(t.lossPct, out.rttMs);
  }
  return out;
}

/** Collects a report into plain entries. */
export function entriesOf(report: { forEach(cb: (v: unknown) => void): void } | undefined): StatsEntry[] {
  const out: StatsEntry[] = [];
  report?.forEach((v) => out.push(v as StatsEntry));
  return out;
}
