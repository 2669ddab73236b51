//! Negotiation: the publisher's offer, the subscriber's answer, and the node's
//! re-offers on the subscriber connection as subscriptions come and go.

use std::time::Instant;

use meridian_protocol::{SubscribedTrack, TrackAnnouncement, TrackInfo, TrackKind};
use str0m::change::{SdpAnswer, SdpOffer};
use str0m::media::{Direction, MediaKind, Mid, Rids};

use crate::pc::{self, Pc, mark_dirty};
use crate::room::IdleSection;
use crate::rtx;
use crate::{MediaError, ParticipantId, PcKind, Sfu, SfuEvent};

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
        let offer =
            SdpOffer::from_sdp_string(sdp).map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        let p = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?;
        let mids: Vec<Mid> = sdp
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a=mid:"))
            .map(Mid::from)
            .collect();
        // Announcements are kept only for this offer's sections without a track yet, so
        // they cannot pile up across offers.
        let in_offer = |mid: &str| mids.iter().any(|m| m.to_string() == mid);
        p.announced.retain(|mid, _| in_offer(mid));
        for a in announced {
            if in_offer(&a.mid) {
                p.announced.insert(a.mid.clone(), a);
            }
        }
        // Made at the first offer: a participant that only watches never has one.
        let publisher = p.publisher.get_or_insert_with(|| {
            let mut pc = Pc::new(&self.config, now, PcKind::Publisher);
            mark_dirty(&mut self.dirty, id, &mut pc, PcKind::Publisher);
            self.by_ufrag
                .insert(pc.ufrag.clone(), (id, PcKind::Publisher));
            Box::new(pc)
        });
        let answer = publisher
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        let mut answer_sdp = answer.to_sdp_string();
        // New ICE credentials in the offer were an ICE restart: the answer has new ones,
        // which must keep this worker's ufrag prefix.
        let local = publisher.rtc.direct_api().local_ice_credentials();
        if local.ufrag != publisher.ufrag {
            let (creds, sdp) = crate::pc::prefix_restart_creds(&self.config, &local, &answer_sdp);
            publisher.rtc.direct_api().set_local_ice_credentials(creds);
            answer_sdp = sdp;
        }
        mark_dirty(&mut self.dirty, id, publisher, PcKind::Publisher);
        self.sync_ufrag(id, PcKind::Publisher);
        // Every receiving media section of the offer is a track of this participant.
        let mut infos = Vec::new();
        for mid in mids {
            let publisher = self
                .participants
                .get(&id)
                .and_then(|p| p.publisher.as_deref())
                .ok_or(MediaError::UnknownParticipant(id))?;
            let Some(media) = publisher.rtc.media(mid) else {
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
            let codec = pc::primary_codec(&publisher.rtc, media.remote_pts());
            if let Some(track) = self.add_track(id, mid, kind, &rids, codec) {
                infos.extend(self.tracks.get(&track).map(|t| t.info(track)));
            }
        }
        if let Some(p) = self.participants.get_mut(&id) {
            let tracks = &self.tracks;
            let published = &p.published;
            p.announced.retain(|mid, _| {
                !published
                    .iter()
                    .any(|t| tracks.get(t).is_some_and(|t| t.mid.to_string() == *mid))
            });
        }
        self.process(now);
        Ok((answer_sdp, infos))
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
        let standard_fec = crate::fec::answer_is_standard(sdp);
        let answer = SdpAnswer::from_sdp_string(&crate::fec::sdp_from_wire(sdp))
            .map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        let pending = p.pending_offer.take().ok_or(MediaError::NoPendingOffer)?;
        p.subscriber
            .rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .map_err(|e| MediaError::InvalidSdp(e.to_string()))?;
        if let Some(creds) = p.subscriber.restart_creds.take() {
            p.subscriber
                .rtc
                .direct_api()
                .set_local_ice_credentials(creds);
        }
        mark_dirty(&mut self.dirty, id, &mut p.subscriber, PcKind::Subscriber);
        self.sync_ufrag(id, PcKind::Subscriber);
        let Some(p) = self.participants.get_mut(&id) else {
            return Err(MediaError::UnknownParticipant(id));
        };
        // Bind each negotiated media section to its outgoing stream.
        let mut wanted = Vec::new();
        for (track, sub) in p.subscriptions.iter_mut() {
            sub.fec_ext.clear();
            if let (Some(mid), None) = (sub.mid, sub.out_ssrc)
                && let Some(tx) = p.subscriber.rtc.direct_api().stream_tx_by_mid(mid, None)
            {
                // 1 s of history answers NACKs on any usable path (str0m's default
                // keeps 3 s) until the stream's RTT is known; then `rtx` sizes it.
                tx.set_rtx_cache(rtx::MAX_PACKETS, rtx::INITIAL_AGE, Some(0.15));
                sub.rtx_age = rtx::INITIAL_AGE;
                // The publisher already paced these packets; a second pacer here only
                // adds latency. Layer choice keeps the rate within the estimate.
                tx.set_unpaced(true);
                sub.out_ssrc = Some(tx.ssrc());
                sub.out_rtx = tx.rtx();
                sub.active = true;
                let fec =
                    p.subscriber.rtc.media(mid).is_some_and(|m| {
                        m.kind().is_video() && crate::fec::negotiated(m.remote_pts())
                    });
                sub.fec = fec.then(|| {
                    let mut e = crate::fec::FecEncoder::new(standard_fec);
                    e.set_group(crate::fec::group_for_loss(self.config.fec_loss_floor));
                    e
                });
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

    /// Restarts ICE on a participant's subscriber connection, on the client's request
    /// (its media path died while signaling stayed up; it restarts its publisher
    /// connection itself, with an offer carrying new credentials). The next subscriber
    /// offer, at once or after the outstanding one is answered, carries new ICE
    /// credentials; tracks, subscriptions and ids stay as they are. A connection that
    /// was never negotiated has nothing to restart: nothing happens.
    pub fn restart_ice(&mut self, now: Instant, id: ParticipantId) -> Result<(), MediaError> {
        self.last_now = now;
        let p = self
            .participants
            .get_mut(&id)
            .ok_or(MediaError::UnknownParticipant(id))?;
        if p.relay.is_some() {
            return Err(MediaError::NotAllowed(
                "relay links are rebuilt, not restarted",
            ));
        }
        if !p.subscriber.negotiated {
            return Ok(());
        }
        p.subscriber.restart_wanted = true;
        self.negotiate(id);
        self.process(now);
        Ok(())
    }

    /// Sends a subscriber offer if there are changes and none is outstanding.
    pub(crate) fn negotiate(&mut self, id: ParticipantId) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if p.pending_offer.is_some()
            || (p.to_add.is_empty() && p.to_stop.is_empty() && !p.subscriber.restart_wanted)
        {
            return;
        }
        let restart = std::mem::take(&mut p.subscriber.restart_wanted);
        let mut restart_random = None;
        // Ended subscriptions' sections go inactive rather than stopped: a stopped
        // section stays in every later offer, so churn would grow the session without
        // bound. Inactive ones are handed to new subscriptions of the same kind.
        let released: Vec<IdleSection> = p
            .to_stop
            .drain(..)
            .filter_map(|(mid, forwarder)| {
                let kind = p.subscriber.rtc.media(mid)?.kind();
                Some(IdleSection {
                    mid,
                    kind,
                    forwarder,
                })
            })
            .collect();
        let mut api = p.subscriber.rtc.sdp_api();
        if restart {
            // The host candidate stays: only the credentials (and the path) change.
            restart_random = Some(api.ice_restart(true));
        }
        for section in released {
            api.set_direction(section.mid, Direction::Inactive);
            p.idle.push(section);
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
            if let Some(i) = p.idle.iter().position(|s| s.kind == kind) {
                let section = p.idle.swap_remove(i);
                api.set_direction(section.mid, Direction::SendOnly);
                sub.forwarder.continue_after(&section.forwarder);
                sub.mid = Some(section.mid);
                continue;
            }
            // A relayed track's stream is its publisher's (on its node), as clients know it.
            let mid = api.add_media(
                kind,
                Direction::SendOnly,
                Some(t.origin.unwrap_or(t.owner).to_string()),
                Some(track.to_string()),
                None,
            );
            sub.mid = Some(mid);
        }
        let Some((offer, pending)) = api.apply() else {
            return;
        };
        p.pending_offer = Some(pending);
        // Relay links carry no FEC (their peer connections lack the codec).
        let mut offer_sdp = crate::fec::offer_to_wire(&offer.to_sdp_string());
        if let Some(random) = restart_random {
            let (creds, sdp) = crate::pc::prefix_restart_creds(&self.config, &random, &offer_sdp);
            p.subscriber.restart_creds = Some(creds);
            offer_sdp = sdp;
        }
        mark_dirty(&mut self.dirty, id, &mut p.subscriber, PcKind::Subscriber);
        let mut tracks: Vec<SubscribedTrack> = p
            .subscriptions
            .iter()
            .filter_map(|(track, sub)| {
                let t = self.tracks.get(track)?;
                Some(SubscribedTrack {
                    mid: sub.mid?.to_string(),
                    track_id: track.to_string(),
                    participant_id: t.origin.unwrap_or(t.owner).to_string(),
                })
            })
            .collect();
        tracks.sort_by(|a, b| a.mid.cmp(&b.mid));
        if let Some(r) = &p.relay {
            let tracks = crate::relay::offer_tracks(&self.tracks, &p.subscriptions);
            self.events.push_back(SfuEvent::RelayOffer {
                peer: r.peer.clone(),
                sdp: offer_sdp,
                tracks,
            });
            return;
        }
        self.events.push_back(SfuEvent::SubscriberOffer {
            participant: id,
            sdp: offer_sdp,
            tracks,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use meridian_protocol::TrackAnnouncement;
    use str0m::Rtc;
    use str0m::change::SdpAnswer;

    use super::*;
    use crate::SfuConfig;

    fn announcement(mid: &str) -> TrackAnnouncement {
        TrackAnnouncement {
            mid: mid.to_string(),
            kind: TrackKind::Audio,
            source: "microphone".into(),
            layers: vec![],
            track_id: None,
        }
    }

    /// Issue 17 item 6: announcements sent with publisher offers used to be kept
    /// forever (one per published section, plus any for sections the offer did not
    /// have). Through 50 publish/unpublish cycles, with a bogus announcement in every
    /// offer, none is left behind.
    #[test]
    fn announcements_do_not_pile_up_through_publish_churn() {
        let addr: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let now = Instant::now();
        let mut sfu = Sfu::new(SfuConfig::new(addr), now);
        let id = sfu.add_participant(now, "room", "alice", false);
        let mut client = Rtc::builder()
            .clear_codecs()
            .enable_opus(true, false)
            .build(now);
        for cycle in 0..50 {
            let mut api = client.sdp_api();
            let mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
            let (offer, pending) = api.apply().expect("a new section is a change");
            let (answer, infos) = sfu
                .handle_publisher_offer(
                    now,
                    id,
                    &offer.to_sdp_string(),
                    vec![
                        announcement(&mid.to_string()),
                        announcement(&format!("bogus{cycle}")),
                    ],
                )
                .expect("the node accepts the offer");
            client
                .sdp_api()
                .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
                .expect("the node's answer is acceptable");
            assert_eq!(infos.len(), 1, "cycle {cycle}: one track published");
            let track = infos[0].track_id.parse().expect("a track id");
            sfu.unpublish(now, id, track).expect("the track is alice's");
            let mut api = client.sdp_api();
            api.stop_media(mid);
            let (offer, pending) = api.apply().expect("stopping a section is a change");
            let (answer, _) = sfu
                .handle_publisher_offer(now, id, &offer.to_sdp_string(), vec![])
                .expect("the node accepts the offer");
            client
                .sdp_api()
                .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
                .expect("the node's answer is acceptable");
            let kept = sfu.participants[&id].announced.len();
            assert_eq!(kept, 0, "cycle {cycle}: {kept} announcements kept");
        }
    }
}
