//! The peer wrapper: one `str0m::Rtc` per connection, and how the core drains it
//! (transmits, timeouts, events) after every input.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::ice::{IceCreds, TransId};
use str0m::media::Pt;
use str0m::{Candidate, Event, IceConnectionState, Output, Rtc};
use tracing::{debug, warn};

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
    /// ICE and DTLS completed once (so DTLS is up, and a new ICE path is enough).
    pub(crate) ever_connected: bool,
    pub(crate) dirty: bool,
    /// Whether a remote description was ever applied (an ICE restart needs one).
    pub(crate) negotiated: bool,
    /// The client asked for an ICE restart the next subscriber offer must carry.
    pub(crate) restart_wanted: bool,
    /// The worker-prefixed credentials an outstanding restart offer announced; they
    /// replace str0m's random ones once the answer is applied.
    pub(crate) restart_creds: Option<IceCreds>,
    /// Connectivity was lost or ICE restarted: on the next ICE connection the
    /// connection counts as connected again and its video is refreshed by keyframes.
    pub(crate) resync: bool,
    /// Retransmissions to copy (a subscriber connection on a lossy path, right
    /// after an RTCP datagram that may carry a NACK: `retx`).
    pub(crate) rtx_copy: Option<crate::retx::CopyWindow>,
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
            builder = builder
                .enable_bwe(Some(Bitrate::bps(config.initial_estimate_bps)))
                // Receiver reports' loss and RTT, every second, set each video
                // stream's FEC (`fec`) and RTX cache (`rtx`).
                .set_stats_interval(Some(crate::rtx::STATS_INTERVAL));
            // Video in RED with ULPFEC, for subscribers that decode it (`fec`).
            crate::fec::add_codec(builder.codec_config());
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
        let builder = match shared_dtls_cert() {
            Some(cert) => builder.set_dtls_cert(cert),
            None => builder,
        };
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
            ever_connected: false,
            dirty: false,
            negotiated: false,
            restart_wanted: false,
            restart_creds: None,
            resync: false,
            rtx_copy: None,
        }
    }
}

/// One DTLS certificate for every connection of the process (as mediasoup keeps one
/// per worker). Generating one per connection — two per participant, a key pair and a
/// signature each — was a large share of a join's work on the media loop, so a join
/// flood made everyone's joins queue. The SDP fingerprint binds the certificate as
/// before; DTLS key exchange stays ephemeral per session. `None` (each connection then
/// makes its own) only if the crypto provider cannot make one.
fn shared_dtls_cert() -> Option<str0m::crypto::dtls::DtlsCert> {
    static CERT: std::sync::OnceLock<Option<str0m::crypto::dtls::DtlsCert>> =
        std::sync::OnceLock::new();
    CERT.get_or_init(|| {
        str0m::crypto::from_feature_flags()
            .dtls_provider
            .generate_certificate()
    })
    .clone()
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

/// Puts worker-prefixed credentials in place of the random ones str0m chose for an
/// ICE restart (`random`) in `sdp`, the description that announces them, and returns
/// the new credentials with the rewritten description: the receiving worker steers
/// STUN by the ufrag's prefix, so a restarted connection must keep it.
pub(crate) fn prefix_restart_creds(
    config: &SfuConfig,
    random: &IceCreds,
    sdp: &str,
) -> (IceCreds, String) {
    let creds = worker_creds(config);
    // Candidates name the ufrag too; str0m's random values occur nowhere else.
    let sdp = sdp
        .replace(&random.ufrag, &creds.ufrag)
        .replace(&random.pass, &creds.pass);
    (creds, sdp)
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
            let Some(pc) = p.pc_mut(kind) else {
                continue;
            };
            pc.dirty = false;
            loop {
                match pc.rtc.poll_output() {
                    Ok(Output::Timeout(t)) => {
                        pc.next_timeout = t;
                        self.timers.update((id, kind), t, now, &mut pc.scheduled);
                        break;
                    }
                    Ok(Output::Transmit(t)) => {
                        let t = Transmit {
                            destination: t.destination,
                            contents: t.contents.into(),
                        };
                        if let Some(w) = pc.rtx_copy.as_mut()
                            && w.take(now, &t.contents)
                            && crate::retx::queue_copy(&mut self.pending_copies, now, &t)
                        {
                            self.stats.rtx_copies += 1;
                        }
                        queue.push_back(t);
                    }
                    Ok(Output::Event(e)) => events.push(e),
                    Err(e) => {
                        warn!(participant = %id, ?kind, "connection failed: {e}");
                        pc.next_timeout = now + Duration::from_secs(3600);
                        self.timers
                            .update((id, kind), pc.next_timeout, now, &mut pc.scheduled);
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
                let codec = self
                    .participants
                    .get(&id)
                    .and_then(|p| p.publisher.as_deref())
                    .map_or_else(
                        || "unknown".to_string(),
                        |pc| {
                            let pts = pc.rtc.media(m.mid).map(|md| md.remote_pts().to_vec());
                            primary_codec(&pc.rtc, pts.as_deref().unwrap_or(&[]))
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
            Event::MediaEgressStats(stats) if kind == PcKind::Subscriber => {
                self.egress_loss(id, &stats);
                if let Some(rtt) = stats.rtt {
                    self.resize_rtx_cache(id, stats.mid, rtt);
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
                if let Some(pc) = self.participants.get_mut(&id).and_then(|p| p.pc_mut(kind)) {
                    pc.connected = true;
                    pc.ever_connected = true;
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
                let Some(pc) = self.participants.get_mut(&id).and_then(|p| p.pc_mut(kind)) else {
                    return;
                };
                match state {
                    IceConnectionState::Disconnected => {
                        pc.resync = true;
                        if pc.connected {
                            pc.connected = false;
                            let e = self.disconnected_event(id, kind);
                            self.events.push_back(e);
                        }
                    }
                    IceConnectionState::Connected | IceConnectionState::Completed if pc.resync => {
                        self.ice_reconnected(now, id, kind);
                    }
                    _ => {}
                }
            }
            Event::Closed => {
                if let Some(pc) = self.participants.get_mut(&id).and_then(|p| p.pc_mut(kind))
                    && pc.connected
                {
                    pc.connected = false;
                    let e = self.disconnected_event(id, kind);
                    self.events.push_back(e);
                }
            }
            _ => {}
        }
    }
}

impl Sfu {
    /// A connection whose path was lost or restarted has ICE again (DTLS survived): it
    /// is connected again, and the video it missed is refreshed with keyframes.
    fn ice_reconnected(&mut self, now: Instant, id: ParticipantId, kind: PcKind) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let relay = p.relay.is_some();
        let Some(pc) = p.pc_mut(kind) else {
            return;
        };
        pc.resync = false;
        if !pc.negotiated || !pc.ever_connected {
            return;
        }
        if !pc.connected {
            pc.connected = true;
            if !relay {
                self.events.push_back(SfuEvent::Connected {
                    participant: id,
                    pc: kind,
                });
            }
        }
        let tracks: Vec<TrackId> = match kind {
            PcKind::Subscriber => p.subscriptions.keys().copied().collect(),
            PcKind::Publisher => p.published.clone(),
        };
        for t in tracks {
            self.request_keyframe_for(t, now, true);
        }
    }

    /// Follows a change of a connection's local ICE credentials (an ICE restart was
    /// applied): STUN with the new ufrag is routed to it, the old ufrag no longer is.
    /// The address stays bound until a verified check from elsewhere moves it, under
    /// the usual rules (`demux`).
    pub(crate) fn sync_ufrag(&mut self, id: ParticipantId, kind: PcKind) {
        let Some(pc) = self.participants.get_mut(&id).and_then(|p| p.pc_mut(kind)) else {
            return;
        };
        pc.negotiated = true;
        let ufrag = pc.rtc.direct_api().local_ice_credentials().ufrag;
        if ufrag == pc.ufrag {
            return;
        }
        let old = std::mem::replace(&mut pc.ufrag, ufrag.clone());
        pc.resync = true;
        if self.by_ufrag.get(&old) == Some(&(id, kind)) {
            self.by_ufrag.remove(&old);
        }
        self.by_ufrag.insert(ufrag, (id, kind));
        debug!(participant = %id, ?kind, "ICE restarted");
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
