//! Simulcast layer allocation: which layer each video subscription gets from a
//! subscriber's bandwidth estimate, and `Sfu::reallocate`, which applies it to a
//! subscriber's forwarders.

use std::time::Instant;

use meridian_protocol::TrackKind;
use str0m::bwe::Bitrate;
use tracing::trace;

use crate::pc::mark_dirty;
use crate::rate::{AUDIO_BPS, available_rates};
use crate::{ParticipantId, PcKind, Sfu};

/// One video subscription's input to the allocator.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Demand {
    /// Highest layer the subscriber asked for.
    pub max_layer: usize,
    /// Measured bitrate of each layer in bit/s; `None` when the layer is not being sent.
    pub rates: [Option<u64>; 3],
}

impl Demand {
    fn lowest(&self) -> Option<usize> {
        (0..3).find(|&l| self.rates[l].is_some())
    }

    fn next_above(&self, layer: usize) -> Option<usize> {
        (layer + 1..=self.max_layer.min(2)).find(|&l| self.rates[l].is_some())
    }

    /// The best layer this subscription may have: the highest being sent up to the
    /// one it asked for, else the lowest being sent.
    fn best(&self) -> Option<usize> {
        (0..=self.max_layer.min(2))
            .rev()
            .find(|&l| self.rates[l].is_some())
            .or_else(|| self.lowest())
    }

    /// Bitrate of the best layer this subscription may have.
    pub(crate) fn desired(&self) -> u64 {
        self.best().and_then(|l| self.rates[l]).unwrap_or(0)
    }
}

/// Chooses a layer for each subscription within `budget` bit/s.
///
/// Every subscription keeps at least its lowest available layer (a frozen tile is
/// worse than a blurry one); the rest of the budget raises layers one step at a time,
/// lowest first, so the budget is shared fairly.
pub(crate) fn allocate(budget: u64, demands: &[Demand]) -> Vec<Option<usize>> {
    let mut chosen: Vec<Option<usize>> = demands.iter().map(Demand::lowest).collect();
    let mut used: u64 = chosen
        .iter()
        .zip(demands)
        .filter_map(|(l, d)| l.and_then(|l| d.rates[l]))
        .sum();
    loop {
        let step = chosen
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let l = (*l)?;
                let up = demands[i].next_above(l)?;
                // A higher layer may measure below a lower one (it started late or
                // its encoder is bandwidth-limited): raising it then costs nothing.
                let extra = demands[i].rates[up]?.saturating_sub(demands[i].rates[l].unwrap_or(0));
                Some((l, i, up, extra))
            })
            .filter(|&(_, _, _, extra)| used + extra <= budget)
            .min_by_key(|&(l, i, _, _)| (l, i));
        let Some((_, i, up, extra)) = step else {
            break;
        };
        chosen[i] = Some(up);
        used += extra;
    }
    chosen
}

impl Sfu {
    /// Chooses layers for a subscriber's video subscriptions from its estimate.
    pub(crate) fn reallocate(&mut self, id: ParticipantId, now: Instant) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let initial = if p.relay.is_some() {
            self.config.relay_initial_estimate_bps
        } else {
            self.config.initial_estimate_bps
        };
        let estimate = p.estimate_bps.unwrap_or(initial);
        let mut ids = Vec::new();
        let mut demands = Vec::new();
        let mut audio = 0;
        for (track, sub) in p.subscriptions.iter() {
            let Some(t) = self.tracks.get(track) else {
                continue;
            };
            if t.kind == TrackKind::Audio {
                audio += AUDIO_BPS;
                continue;
            }
            ids.push(*track);
            demands.push(Demand {
                max_layer: sub.max_layer,
                rates: available_rates(&t.rates, now),
            });
        }
        // Audio subscriptions always forward.
        for (track, sub) in p.subscriptions.iter_mut() {
            if self
                .tracks
                .get(track)
                .is_some_and(|t| t.kind == TrackKind::Audio)
                && sub.forwarder.target().is_none()
            {
                sub.forwarder.set_target(Some(0));
            }
        }
        if ids.is_empty() {
            return;
        }
        // FEC rides on the video it protects: one parity per `group` packets takes
        // 1 / (group + 1) of what video may use (the densest group of this subscriber).
        let video_budget = estimate.saturating_sub(audio);
        let video_budget = match p
            .subscriptions
            .values()
            .filter_map(|s| s.fec.as_ref()?.group())
            .min()
        {
            Some(g) => video_budget * g as u64 / (g as u64 + 1),
            None => video_budget,
        };
        let chosen = allocate(video_budget, &demands);
        let desired: u64 = demands.iter().map(Demand::desired).sum::<u64>() + audio;
        // Let the estimator probe towards what the subscriptions could use. str0m pads
        // up to the minimum whenever media leaves room, so it is sustained only while a
        // subscription is below the best layer it may have: padding then raises the
        // estimate towards the next layer. A subscriber that has its best layers gets
        // no padding (it cost up to 41 % more datagrams at low bitrates, every second,
        // for nothing: docs/benchmarks.md).
        let minimum = if chosen.iter().zip(&demands).all(|(c, d)| *c == d.best()) {
            0
        } else {
            desired.min(estimate).max(100_000)
        };
        p.subscriber
            .rtc
            .bwe()
            .set_bitrate(Bitrate::bps(minimum), Bitrate::bps(desired.max(300_000)));
        let mut keyframes = Vec::new();
        for (track, layer) in ids.into_iter().zip(chosen) {
            let Some(sub) = p.subscriptions.get_mut(&track) else {
                continue;
            };
            let layer = match layer {
                Some(l) => Some(l),
                // Nothing is being sent yet: aim at the lowest layer that may come.
                None => sub.forwarder.target().or(Some(0)),
            };
            if sub.forwarder.target() != layer {
                trace!(participant = %id, track = %track, ?layer, "layer target");
                sub.forwarder.set_target(layer);
                if let Some(l) = layer {
                    keyframes.push((track, l));
                }
            }
        }
        mark_dirty(&mut self.dirty, id, &mut p.subscriber, PcKind::Subscriber);
        for (track, layer) in keyframes {
            self.request_layer_keyframe(track, layer, now, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIM: [Option<u64>; 3] = [Some(150_000), Some(500_000), Some(1_500_000)];

    fn d(max: usize) -> Demand {
        Demand {
            max_layer: max,
            rates: SIM,
        }
    }

    #[test]
    fn ample_budget_gives_every_subscription_its_maximum() {
        assert_eq!(
            allocate(10_000_000, &[d(2), d(1), d(0)]),
            vec![Some(2), Some(1), Some(0)]
        );
    }

    #[test]
    fn scarce_budget_keeps_everyone_on_the_low_layer() {
        assert_eq!(allocate(100_000, &[d(2), d(2)]), vec![Some(0), Some(0)]);
    }

    #[test]
    fn budget_is_shared_one_step_at_a_time() {
        // 150k + 150k, then +350k for the first, +350k for the second = 1M.
        assert_eq!(allocate(1_000_000, &[d(2), d(2)]), vec![Some(1), Some(1)]);
        assert_eq!(allocate(700_000, &[d(2), d(2)]), vec![Some(1), Some(0)]);
    }

    #[test]
    fn a_higher_layer_measuring_below_a_lower_one_does_not_overflow() {
        let demand = Demand {
            max_layer: 2,
            rates: [Some(280_000), Some(110_000), None],
        };
        assert_eq!(allocate(300_000, &[demand]), vec![Some(1)]);
    }

    #[test]
    fn layers_not_being_sent_are_skipped() {
        let demand = Demand {
            max_layer: 2,
            rates: [Some(150_000), None, Some(1_500_000)],
        };
        assert_eq!(allocate(10_000_000, &[demand]), vec![Some(2)]);
        let none = Demand {
            max_layer: 2,
            rates: [None; 3],
        };
        assert_eq!(allocate(10_000_000, &[none]), vec![None]);
        assert_eq!(demand.desired(), 1_500_000);
    }
}
