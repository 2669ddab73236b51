//! The peer wrapper: one `str0m::Rtc` per connection, and how the core drains it
//! (transmits, timeouts, events) after every input.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::ice::{IceCreds, TransId};
use str0m::media::Pt;
use str0m::{Candidate, Event, IceConnectionState, Output, Rtc};
use tracing::warn;

use crate::{ParticipantId, Sfu, SfuConfig, SfuEvent, TrackId, Transmit};

/// Which of a participant's two peer connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PcKind {
    /// Carries media from the client to the node; the client offers.
    Publisher,
    /// Carries media from the node to the client; the node offers.
    Subscriber,
}

pub(crate) struct Pc {
    pub(crate) rtc: Rtc,
    pub(crate) ufrag: String,
    pub(crate) next_timeout: Instant,
    /// The time of this connection's live entry in the core's timer heap.
    pub(crate) scheduled: Option<Instant>,
    /// The address media is taken from (bound by a verified ICE check).
    pub(crate) remote: Option<SocketAddr>,
    /// When the last verified ICE check from `remote` arrived.
    pub(crate) last_check: Option<Instant>,
    /// The latest verified checks: transaction and source.
    pub(crate) recent_checks: VecDeque<(TransId, SocketAddr)>,
    pub(crate) connected: bool,
    pub(crate) dirty: bool,
}

impl Pc {
    pub(crate) fn new(config: &SfuConfig, now: Instant, kind: PcKind) -> Pc {
        let mut builder = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            // Opus with RED (`red/48000/2`) and in-band FEC (`useinbandfec=1`).
            .enable_opus(true, true)
            .enable_vp8(true)
            .enable_h264(true)
            .set_stats_interval(None);
        if kind == PcKind::Subscriber {
            builder = builder.enable_bwe(Some(Bitrate::bps(config.initial_estimate_bps)));
        }
        Pc::from_builder(
            builder.set_local_ice_credentials(worker_creds(config)),
            now,
            config.candidate_addr,
        )
    }

    /// The sending side of a relay link: like a subscriber connection (ICE-lite, the
    /// node offers), starting from the relay estimate.
    pub(crate) fn new_relay_out(config: &SfuConfig, now: Instant) -> Pc {
        let builder = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .enable_h264(true)
            .set_stats_interval(None)
            .enable_bwe(Some(Bitrate::bps(config.relay_initial_estimate_bps)))
            .set_local_ice_credentials(worker_creds(config));
        Pc::from_builder(builder, now, config.candidate_addr)
    }

    /// The receiving side of a relay link: a full ICE agent (the controlling side,
    /// checking the upstream's ICE-lite candidate) on the node's relay socket.
    pub(crate) fn new_relay_in(now: Instant, relay_addr: SocketAddr) -> Pc {
        let builder = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .enable_h264(true)
            .set_stats_interval(None);
        Pc::from_builder(builder, now, relay_addr)
    }

    fn from_builder(builder: str0m::RtcConfig, now: Instant, local: SocketAddr) -> Pc {
        let mut rtc = builder.build(now);
        let candidate = Candidate::host(local, "udp")
            .expect("a host candidate from a socket address is always valid");
        rtc.add_local_candidate(candidate);
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        Pc {
            rtc,
            ufrag,
            next_timeout: now,
            scheduled: None,
            remote: None,
            last_check: None,
            recent_checks: VecDeque::new(),
            connected: false,
            dirty: false,
        }
    }
}

/// Random ICE credentials whose ufrag starts with the core's worker prefix.
fn worker_creds(config: &SfuConfig) -> IceCreds {
    let creds = IceCreds::new();
    IceCreds {
        ufrag: format!(
            "{}{}",
            crate::worker_ufrag_prefix(config.worker),
            creds.ufrag
        ),
        pass: creds.pass,
    }
}

impl Sfu {
    /// Drains every touched connection until nothing is left to do.
    pub(crate) fn process(&mut self, now: Instant) {
        let mut events = Vec::new();
        let mut disconnected = false;
        // Each round may touch other connections (forwarding, keyframe requests);
        // the bound guards against a feedback loop between them.
        let bound = 8 * (2 * self.participants.len() + 8);
        for _ in 0..bound {
            let Some((id, kind)) = self.dirty.pop() else {
                return;
            };
            let Some(p) = self.participants.get_mut(&id) else {
                continue;
            };
            // The inbound side of a relay link sends from the relay socket.
            let relay_in = kind == PcKind::Publisher && p.relay.as_ref().is_some_and(|r| r.inbound);
            let queue = if relay_in {
                &mut self.relay_transmits
            } else {
                &mut self.transmits
            };
            let pc = p.pc_mut(kind);
            pc.dirty = false;
            loop {
                match pc.rtc.poll_output() {
                    Ok(Output::Timeout(t)) => {
                        pc.next_timeout = t;
                        self.timers.update((id, kind), t, &mut pc.scheduled);
                        break;
                    }
                    Ok(Output::Transmit(t)) => queue.push_back(Transmit {
                        destination: t.destination,
                        contents: t.contents.into(),
                    }),
                    Ok(Output::Event(e)) => events.push(e),
                    Err(e) => {
                        warn!(participant = %id, ?kind, "connection failed: {e}");
                        pc.next_timeout = now + Duration::from_secs(3600);
                        self.timers
                            .update((id, kind), pc.next_timeout, &mut pc.scheduled);
                        if pc.connected {
                            pc.connected = false;
                            disconnected = true;
                        }
                        break;
                    }
                }
            }
            if std::mem::take(&mut disconnected) {
                let e = self.disconnected_event(id, kind);
                self.events.push_back(e);
            }
            for e in events.drain(..) {
                self.handle_rtc_event(now, id, kind, e);
            }
        }
        if !self.dirty.is_empty() {
            warn!(left = self.dirty.len(), "processing bound reached");
        }
    }

    pub(crate) fn handle_rtc_event(
        &mut self,
        now: Instant,
        id: ParticipantId,
        kind: PcKind,
        e: Event,
    ) {
        match e {
            Event::RtpPacket(pkt) => self.forward(now, id, pkt),
            Event::MediaAdded(m) if kind == PcKind::Publisher && m.direction.is_receiving() => {
                let rids: Vec<String> = m
                    .simulcast
                    .iter()
                    .flat_map(|s| s.recv.iter().map(|l| l.rid.to_string()))
                    .collect();
                let codec = self.participants.get(&id).map_or_else(
                    || "unknown".to_string(),
                    |p| {
                        let pts = p
                            .publisher
                            .rtc
                            .media(m.mid)
                            .map(|md| md.remote_pts().to_vec());
                        primary_codec(&p.publisher.rtc, pts.as_deref().unwrap_or(&[]))
                    },
                );
                self.add_track(id, m.mid, m.kind, &rids, codec);
            }
            Event::KeyframeRequest(req) if kind == PcKind::Subscriber => {
                let track = self.participants.get(&id).and_then(|p| {
                    p.subscriptions
                        .iter()
                        .find(|(_, s)| s.mid == Some(req.mid))
                        .map(|(t, _)| *t)
                });
                if let Some(track) = track {
                    self.request_keyframe_for(track, now, false);
                }
            }
            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. })
            | Event::EgressBitrateEstimate(BweKind::Remb { estimate, .. }) => {
                if let Some(p) = self.participants.get_mut(&id) {
                    p.estimate_bps = Some(estimate.as_u64());
                }
                self.reallocate(id, now);
            }
            Event::Connected => {
                if let Some(p) = self.participants.get_mut(&id) {
                    p.pc_mut(kind).connected = true;
                }
                if self
                    .participants
                    .get(&id)
                    .is_some_and(|p| p.relay.is_none())
                {
                    self.events.push_back(SfuEvent::Connected {
                        participant: id,
                        pc: kind,
                    });
                }
                if kind == PcKind::Subscriber {
                    let tracks: Vec<TrackId> = self
                        .participants
                        .get(&id)
                        .map(|p| p.subscriptions.keys().copied().collect())
                        .unwrap_or_default();
                    for t in tracks {
                        self.request_keyframe_for(t, now, true);
                    }
                }
            }
            Event::IceConnectionStateChange(state) => {
                let Some(p) = self.participants.get_mut(&id) else {
                    return;
                };
                let pc = p.pc_mut(kind);
                if state == IceConnectionState::Disconnected && pc.connected {
                    pc.connected = false;
                    let e = self.disconnected_event(id, kind);
                    self.events.push_back(e);
                }
            }
            Event::Closed => {
                if let Some(p) = self.participants.get_mut(&id) {
                    let pc = p.pc_mut(kind);
                    if pc.connected {
                        pc.connected = false;
                        let e = self.disconnected_event(id, kind);
                        self.events.push_back(e);
                    }
                }
            }
            _ => {}
        }
    }
}

pub(crate) fn mark_dirty(
    dirty: &mut Vec<(ParticipantId, PcKind)>,
    id: ParticipantId,
    pc: &mut Pc,
    kind: PcKind,
) {
    if !pc.dirty {
        pc.dirty = true;
        dirty.push((id, kind));
    }
}

/// The media codec the remote side prefers among the negotiated payload types of a
/// media section (repair and redundancy formats skipped).
pub(crate) fn primary_codec(rtc: &Rtc, remote_pts: &[Pt]) -> String {
    remote_pts
        .iter()
        .filter_map(|pt| rtc.codec_config().iter().find(|p| p.pt() == *pt))
        .map(|p| p.spec().codec)
        .find(|c| {
            !matches!(
                c,
                str0m::format::Codec::Rtx
                    | str0m::format::Codec::Red
                    | str0m::format::Codec::Null
                    | str0m::format::Codec::Unknown
            )
        })
        .map_or_else(|| "unknown".to_string(), |c| c.to_string())
}
