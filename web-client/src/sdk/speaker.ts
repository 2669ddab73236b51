// Active-speaker detection from audio energy. Pure: it takes getStats() entries and
// the time, so tests drive it.
import type { StatsEntry } from './stats';

/** Tuning of {@link ActiveSpeakerDetector}. */
export interface SpeakerPolicy {
  /** Mean audio power (audioLevel², 0..1) below which nobody is speaking. */
  threshold: number;
  /** A new speaker must be this many times louder than the current one to take over. */
  switchRatio: number;
  /** Smoothing of each participant's power per sample (0: none, towards 1: slow). */
  smoothing: number;
}

/** Defaults: a quiet room at −40 dBov, a new speaker 1.5× louder, light smoothing. */
export const DEFAULT_SPEAKER_POLICY: SpeakerPolicy = { threshold: 1e-4, switchRatio: 1.5, smoothing: 0.5 };

/** One audio source's energy counters (from `inbound-rtp` or `media-source` stats). */
export interface AudioEnergy {
  /** Who: a participant id. */
  participantId: string;
  /**
   * Which counters: the stats entry's id. One participant can have several at once (a
   * receiver keeps the entry of an SSRC it no longer receives next to the new one),
   * and counters are only comparable within one entry.
   */
  source: string;
  /** `totalAudioEnergy` (sum of audioLevel² × duration). */
  totalAudioEnergy: number;
  /** `totalSamplesDuration`, seconds. */
  totalSamplesDuration: number;
}

/**
 * Audio energy counters of the remote audio tracks (`sub`, their mids mapped to
 * participants by `owners`) and of the own microphone (`pub`'s `media-source`, as `self`).
 */
export function audioEnergies(
  pub: StatsEntry[],
  sub: StatsEntry[],
  owners: ReadonlyMap<string, string>,
  self: string,
): AudioEnergy[] {
  const out: AudioEnergy[] = [];
  for (const r of sub) {
    if (r.type !== 'inbound-rtp' || r.kind !== 'audio') continue;
    const who = owners.get(r.mid ?? '');
    if (who === undefined || r.totalAudioEnergy === undefined || r.totalSamplesDuration === undefined) continue;
    out.push({ participantId: who, source: r.id ?? `in:${r.mid}`, totalAudioEnergy: r.totalAudioEnergy, totalSamplesDuration: r.totalSamplesDuration });
  }
  for (const r of pub) {
    if (r.type !== 'media-source' || r.kind !== 'audio') continue;
    if (r.totalAudioEnergy === undefined || r.totalSamplesDuration === undefined) continue;
    out.push({ participantId: self, source: r.id ?? 'self', totalAudioEnergy: r.totalAudioEnergy, totalSamplesDuration: r.totalSamplesDuration });
  }
  return out;
}

/**
 * Picks the active speaker: the participant with the highest mean audio power over the
 * last interval (from energy counter deltas, so short beeps and pauses average out),
 * above a threshold, with hysteresis so the highlight does not flicker.
 */
export class ActiveSpeakerDetector {
  /** The current active speaker, or null when nobody speaks. */
  current: string | null = null;
  private readonly last = new Map<string, { e: number; d: number }>();
  private readonly power = new Map<string, number>();

  constructor(private readonly policy: SpeakerPolicy = DEFAULT_SPEAKER_POLICY) {}

  /** Smoothed mean power per participant after the last {@link update}. */
  powers(): ReadonlyMap<string, number> {
    return this.power;
  }

  /** Feeds one sample of counters; returns the active speaker (null: nobody). */
  update(samples: AudioEnergy[]): string | null {
    // Mean power per participant over the interval: the sum over its entries (an entry
    // that stopped counting adds nothing).
    const now = new Map<string, number>();
    const sources = new Set<string>();
    for (const s of samples) {
      sources.add(s.source);
      const prev = this.last.get(s.source);
      this.last.set(s.source, { e: s.totalAudioEnergy, d: s.totalSamplesDuration });
      if (!prev) continue;
      const dd = s.totalSamplesDuration - prev.d;
      const de = s.totalAudioEnergy - prev.e;
      const p = dd > 0 && de >= 0 ? de / dd : 0;
      now.set(s.participantId, (now.get(s.participantId) ?? 0) + p);
    }
    for (const id of [...this.last.keys()]) if (!sources.has(id)) this.last.delete(id);
    for (const id of [...this.power.keys()]) if (!now.has(id)) this.power.delete(id);
    for (const [id, p] of now) {
      const old = this.power.get(id) ?? p;
      this.power.set(id, old * this.policy.smoothing + p * (1 - this.policy.smoothing));
    }
    let best: string | null = null;
    let bestP = this.policy.threshold;
    for (const [id, p] of this.power) {
      if (p > bestP) {
        best = id;
        bestP = p;
      }
    }
    const cur = this.current !== null ? (this.power.get(this.current) ?? 0) : 0;
    if (best === null) this.current = null;
    else if (this.current === null || cur < this.policy.threshold || bestP > cur * this.policy.switchRatio) this.current = best;
    return this.current;
  }
}
