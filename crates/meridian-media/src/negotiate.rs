//! Negotiation: the publisher's offer, the subscriber's answer, and the node's
//! re-offers on the subscriber connection as subscriptions come and go.

use std::time::{Duration, Instant};

use meridian_protocol::{SubscribedTrack, TrackAnnouncement, TrackInfo, TrackKind};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind, Mid, Rids};

use crate::pc::mark_dirty;
use crate::{MediaError, ParticipantId, PcKind, Sfu, SfuEvent};

/// Packets kept per outgoing stream to answer NACKs.
pub(crate) const RTX_CACHE_PACKETS: usize = 512;
/// How old a packet may be and still be resent.
pub(crate) const RTX_CACHE_AGE: Duration = Duration::from_secs(1);

impl Sfu {
    /// Accepts the client's offer on its publisher connection and returns the SDP
    /// answer with the tracks the offer created.
    pub fn handle_publisher_offer(
        &mut self,
        now: Instant,
        id: ParticipantId,
        sdp: &str,
        announced: Vec<TrackAnnouncement>,
    ) -> Result<(String, Vec<TrackInfo>), MediaError> {
        self.last_now = now;
        let p = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?;
        let offer =
            SdpOffer::from_sdp_string(sdp).map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        for a in announced {
            p.announced.insert(a.mid.clone(), a);
        }
        let answer = p
            .publisher
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        mark_dirty(&mut self.dirty, id, &mut p.publisher, PcKind::Publisher);
        // Every receiving media section of the offer is a track of this participant.
        let mids: Vec<Mid> = sdp
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a=mid:"))
            .map(Mid::from)
            .collect();
        let mut infos = Vec::new();
        for mid in mids {
            let p = self
                .participants
                .get(&id)
                .ok_or(MediaError::UnknownParticipant(id))?;
            let Some(media) = p.publisher.rtc.media(mid) else {
                continue;
            };
            if !media.direction().is_receiving() {
                continue;
            }
            let rids: Vec<String> = match media.rids_rx() {
                Rids::Specific(rids) => rids.iter().map(|r| r.to_string()).collect(),
                _ => Vec::new(),
            };
            let kind = media.kind();
            if let Some(track) = self.add_track(id, mid, kind, &rids) {
                infos.extend(self.tracks.get(&track).map(|t| t.info(track)));
            }
        }
        self.process(now);
        Ok((answer.to_sdp_string(), infos))
    }

    /// Applies the client's answer to the node's last subscriber offer.
    pub fn handle_subscriber_answer(
        &mut self,
        now: Instant,
        id: ParticipantId,
        sdp: &str,
    ) -> Result<(), MediaError> {
        self.last_now = now;
        let p = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?;
        let answer =
            SdpAnswer::from_sdp_string(sdp).map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        let pending = p.pending_offer.take().ok_or(MediaError::NoPendingOffer)?;
        p.subscriber
            .rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        mark_dirty(&mut self.dirty, id, &mut p.subscriber, PcKind::Subscriber);
        // Bind each negotiated media section to its outgoing stream.
        let mut wanted = Vec::new();
        for (track, sub) in p.subscriptions.iter_mut() {
            if let (Some(mid), None) = (sub.mid, sub.out_ssrc)
                && let Some(tx) = p.subscriber.rtc.direct_api().stream_tx_by_mid(mid, None)
            {
                // 1 s of history answers NACKs on any usable path and keeps a
                // subscriber's memory small (str0m's default keeps 3 s).
                tx.set_rtx_cache(RTX_CACHE_PACKETS, RTX_CACHE_AGE, Some(0.15));
                // The publisher already paced these packets; a second pacer here only
                // adds latency. Layer choice keeps the rate within the estimate.
                tx.set_unpaced(true);
                sub.out_ssrc = Some(tx.ssrc());
                sub.active = true;
                wanted.push(*track);
            }
        }
        self.negotiate(id);
        for track in wanted {
            self.reallocate(id, now);
            self.request_keyframe_for(track, now, true);
        }
        self.process(now);
        Ok(())
    }

    /// Sends a subscriber offer if there are changes and none is outstanding.
    pub(crate) fn negotiate(&mut self, id: ParticipantId) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if p.pending_offer.is_some() || (p.to_add.is_empty() && p.to_stop.is_empty()) {
            return;
        }
        let mut api = p.subscriber.rtc.sdp_api();
        for mid in p.to_stop.drain(..) {
            api.stop_media(mid);
        }
        for track in p.to_add.drain(..) {
            let (Some(t), Some(sub)) = (self.tracks.get(&track), p.subscriptions.get_mut(&track))
            else {
                continue;
            };
            let kind = match t.kind {
                TrackKind::Audio => MediaKind::Audio,
                TrackKind::Video => MediaKind::Video,
            };
            let mid = api.add_media(
                kind,
                Direction::SendOnly,
                Some(t.owner.to_string()),
                Some(track.to_string()),
                None,
            );
            sub.mid = Some(mid);
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        p.pending_offer = Some(pending);
        mark_dirty(&mut self.dirty, id, &mut p.subscriber, PcKind::Subscriber);
        let mut tracks: Vec<SubscribedTrack> = p
            .subscriptions
            .iter()
            .filter_map(|(track, sub)| {
                let t = self.tracks.get(track)?;
                Some(SubscribedTrack {
                    mid: sub.mid?.to_string(),
                    track_id: track.to_string(),
                    participant_id: t.owner.to_string(),
                })
            })
            .collect();
        tracks.sort_by(|a, b| a.mid.cmp(&b.mid));
        self.events.push_back(SfuEvent::SubscriberOffer {
            participant: id,
            sdp: offer.to_sdp_string(),
            tracks,
        });
    }
}
