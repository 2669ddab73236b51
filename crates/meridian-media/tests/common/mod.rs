//! In-memory harness for the media core: one [`Sfu`] and str0m peers acting as
//! clients, connected by datagrams shuttled in memory under virtual time.
//!
//! Nothing touches a socket or the clock: the harness owns an `Instant` it advances
//! in small steps, drives every `Rtc`'s and the `Sfu`'s timeouts, and moves datagrams
//! between `Sfu::poll_transmit` / the peers' `Output::Transmit` and
//! `Sfu::handle_datagram` / the peers' `handle_input`, optionally through a seeded
//! `str0m-netem` per link and direction. Addresses (10.0.0.1:5000 for the node,
//! 10.0.1.N:10000/20000 for the peers) are only labels in memory.
//!
//! Peers run str0m in frame mode: a publisher sends Opus and VP8 with three simulcast
//! rids (q/h/f); every frame carries a header (magic, frame counter, layer,
//! keyframe flag) so a subscriber can tell which layer a frame came from.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use meridian_media::{ParticipantId, Sfu, SfuConfig, SfuEvent, TrackId};
use meridian_protocol::{Layer, TrackAnnouncement, TrackKind};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use str0m_netem::{Netem, NetemConfig};

/// The node's (virtual) media address.
pub const SFU_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 5000);

/// Marks a synthetic frame's header.
const MAGIC: &[u8; 4] = b"MRDN";

/// The header every synthetic frame carries after its codec prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame counter of the source (the same across simulcast layers).
    pub seq: u64,
    /// Layer index the frame was sent on (0 for audio).
    pub layer: u8,
    /// Whether the frame is a keyframe.
    pub keyframe: bool,
    /// Virtual send time, microseconds since the harness started.
    pub sent_us: u64,
}

impl FrameHeader {
    /// Finds and reads the header in a received frame.
    pub fn parse(frame: &[u8]) -> Option<FrameHeader> {
        let at = frame.windows(4).take(16).position(|w| w == MAGIC)?;
        let b = frame.get(at + 4..at + 22)?;
        Some(FrameHeader {
            seq: u64::from_be_bytes(b[0..8].try_into().ok()?),
            layer: b[8],
            keyframe: b[9] == 1,
            sent_us: u64::from_be_bytes(b[10..18].try_into().ok()?),
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.push(self.layer);
        out.push(self.keyframe as u8);
        out.extend_from_slice(&self.sent_us.to_be_bytes());
    }
}

/// A VP8 frame: a valid frame tag (keyframe bit, start code and dimensions on
/// keyframes) followed by the synthetic header and padding.
pub fn vp8_frame(h: FrameHeader, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size.max(32));
    // Frame tag: bit 0 = !keyframe, version 0, show_frame 1.
    out.extend_from_slice(&[if h.keyframe { 0x10 } else { 0x11 }, 0x00, 0x00]);
    if h.keyframe {
        out.extend_from_slice(&[0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01]);
    }
    h.write(&mut out);
    out.resize(size.max(out.len()), 0xab);
    out
}

/// What a publisher sends.
#[derive(Clone, Debug)]
pub struct MediaConfig {
    /// Send Opus (20 ms frames).
    pub audio: bool,
    /// Send VP8.
    pub video: bool,
    /// Simulcast layers (empty: one stream without rid).
    pub layers: Vec<Layer>,
    /// Bitrate of each layer, lowest first.
    pub layer_bitrates: [u64; 3],
    /// Video frames per second.
    pub fps: u32,
    /// Frames between periodic keyframes (keyframe requests force one sooner).
    pub keyframe_interval: u64,
    /// Write audio frames (false: the audio section exists, the test writes its RTP
    /// itself with [`Harness::write_audio_rtp`]).
    pub audio_frames: bool,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            audio: true,
            video: true,
            layers: Layer::ALL.to_vec(),
            // Small enough that the default 1 Mbit/s initial estimate fits the top layer.
            layer_bitrates: [100_000, 200_000, 400_000],
            fps: 30,
            keyframe_interval: 1_000_000,
            audio_frames: true,
        }
    }
}

/// A frame a subscriber peer received.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Virtual time of arrival.
    pub at: Instant,
    /// Media section on the subscriber connection.
    pub mid: Mid,
    /// The track the node said this section carries.
    pub track: Option<TrackId>,
    /// Video (VP8) or audio.
    pub video: bool,
    /// The synthetic header.
    pub header: FrameHeader,
    /// str0m's `contiguous` flag (false after an unrecovered gap).
    pub contiguous: bool,
    /// Virtual time from the publisher's write to this frame's arrival (the node's
    /// pacing and any impairment; no network delay otherwise).
    pub latency: Duration,
}

/// One peer connection of a client.
pub struct PeerPc {
    /// The str0m peer (frame mode).
    pub rtc: Rtc,
    /// Its virtual address.
    pub addr: SocketAddr,
    next_timeout: Instant,
    /// ICE+DTLS done.
    pub connected: bool,
    /// Impairment of datagrams from the node to this peer.
    pub down: Option<Netem<Vec<u8>>>,
    /// Impairment of datagrams from this peer to the node.
    pub up: Option<Netem<Vec<u8>>>,
    /// The address the node sees, when a NAT maps `addr` elsewhere.
    pub nat: Option<SocketAddr>,
    /// When set, the path is cut: every datagram between the node and this peer is lost.
    pub cut: bool,
    /// str0m's raw packet log is on ([`Harness::raw_rtcp`]).
    pub rtc_raw: bool,
}

impl PeerPc {
    fn new(now: Instant, addr: SocketAddr, red: bool, fec: bool, raw: bool) -> PeerPc {
        let mut builder = Rtc::builder()
            .clear_codecs()
            .enable_opus(true, red)
            .enable_vp8(true)
            .set_rtp_mode(fec)
            .enable_raw_packets(raw)
            .set_stats_interval(None);
        if fec {
            meridian_media::fec::add_codec(builder.codec_config());
        }
        let mut rtc = builder.build(now);
        rtc.add_local_candidate(Candidate::host(addr, "udp").expect("valid host candidate"));
        PeerPc {
            rtc,
            addr,
            next_timeout: now,
            connected: false,
            down: None,
            up: None,
            nat: None,
            cut: false,
            rtc_raw: raw,
        }
    }

    /// The address the node sees this peer's datagrams come from.
    pub fn public_addr(&self) -> SocketAddr {
        self.nat.unwrap_or(self.addr)
    }
}

struct Source {
    audio_mid: Option<Mid>,
    video_mid: Option<Mid>,
    config: MediaConfig,
    started: Instant,
    next_video: Instant,
    next_audio: Instant,
    video_seq: u64,
    audio_seq: u64,
    force_keyframe: [bool; 3],
}

/// A client: a participant of the node with its two peer connections.
pub struct Client {
    /// Its participant id on the node.
    pub id: ParticipantId,
    /// Publisher connection (used only when publishing).
    pub publisher: PeerPc,
    /// Subscriber connection (negotiated when the node offers).
    pub subscriber: PeerPc,
    source: Option<Source>,
    /// Frames received on the subscriber connection.
    pub frames: Vec<Frame>,
    /// Track carried by each media section of the subscriber connection.
    pub sub_tracks: HashMap<Mid, TrackId>,
    /// Subscriber offers received from the node.
    pub offers: Vec<Vec<TrackId>>,
    /// Keyframe requests the publisher connection received.
    pub keyframe_requests: u64,
    /// Frames sent per layer (video) — index 3 is audio.
    pub sent: [u64; 4],
    /// Tracks published (from the node's answer).
    pub published: Vec<(TrackId, TrackKind)>,
    /// False once the harness stops driving this client (it vanished).
    pub alive: bool,
    /// The latest subscriber offer left unanswered (`auto_answer` off).
    pub unanswered: Option<SfuEvent>,
    /// Video FEC decoder of a client added with [`Harness::fec`] on.
    pub fec: Option<meridian_media::fec::FecDecoder>,
    /// Video packets a FEC client got: arrival, sequence number, and whether FEC
    /// rebuilt it (rather than it arriving).
    pub video_packets: Vec<(Instant, u16, bool)>,
    /// Sequence numbers of the FEC (parity) packets that arrived.
    pub parity_packets: Vec<u16>,
    /// With [`Harness::capture_video`]: every datagram the node sent to this client's
    /// subscriber connection, as sent (SRTP: headers in clear, payload encrypted).
    pub sent_to_subscriber: Vec<Vec<u8>>,
    /// With [`Harness::capture_video`]: the decrypted payload of each RED video packet
    /// that arrived, by sequence number.
    pub red_payloads: HashMap<u16, Vec<u8>>,
    /// With [`Harness::raw_rtcp`]: NACKs the subscriber connection sent (time, media
    /// SSRC, sequence numbers named).
    pub nacks_sent: Vec<(Instant, u32, Vec<u16>)>,
    /// With [`Harness::raw_rtcp`]: NACKs the publisher connection received.
    pub nacks_received: Vec<(Instant, u32, Vec<u16>)>,
    /// With [`Harness::raw_rtcp`]: RTP packets the subscriber connection accepted
    /// (decrypted, duplicates dropped): time, SSRC, payload type, sequence number, and
    /// the first two payload bytes (a retransmission's original sequence number).
    pub rtp_received: Vec<(Instant, u32, u8, u16, Option<u16>)>,
    /// With [`Harness::raw_rtcp`]: RTP datagrams of the publisher connection as they
    /// reached the node (time, SSRC, sequence number).
    pub rtp_at_node: Vec<(Instant, u32, u16)>,
}

impl Client {
    /// Video frames received.
    pub fn video_frames(&self) -> impl Iterator<Item = &Frame> {
        self.frames.iter().filter(|f| f.video)
    }

    /// Audio frames received.
    pub fn audio_frames(&self) -> impl Iterator<Item = &Frame> {
        self.frames.iter().filter(|f| !f.video)
    }

    /// The published track of a kind.
    pub fn track(&self, kind: TrackKind) -> Option<TrackId> {
        self.published
            .iter()
            .find(|(_, k)| *k == kind)
            .map(|(t, _)| *t)
    }
}

/// Time spent inside `Sfu` calls (the benchmark's measure).
#[derive(Default, Debug)]
pub struct Profile {
    /// Wall time inside `Sfu` calls including draining their output.
    pub sfu_time: Duration,
    /// Thread CPU time inside the same calls (when `cpu` is set).
    pub sfu_cpu: Duration,
    /// Also measure thread CPU time (two extra syscalls per call).
    pub cpu: bool,
    /// Number of timed `Sfu` calls.
    pub calls: u64,
    /// Datagrams the core sent to the peers (media, padding, retransmissions, RTCP).
    pub datagrams_out: u64,
    /// Per RTP datagram: from `handle_datagram` to the end of draining its output.
    pub rtp_latencies: Vec<Duration>,
}

/// The in-memory world.
pub struct Harness {
    /// The core under test.
    pub sfu: Sfu,
    /// Virtual now.
    pub now: Instant,
    /// Virtual start.
    pub start: Instant,
    /// Step of [`Harness::step`].
    pub tick: Duration,
    /// Every client ever added, by index.
    pub clients: Vec<Client>,
    /// Events the core emitted, with their time.
    pub events: Vec<(Instant, SfuEvent)>,
    /// Answer subscriber offers automatically (default true).
    pub auto_answer: bool,
    /// When set, `Sfu` calls are timed.
    pub profile: Option<Profile>,
    /// When false, events are not kept in `events` (benchmarks).
    pub keep_events: bool,
    /// When set, every STUN datagram a peer sends to the node is copied into
    /// `captured_stun` with its source (to replay it from elsewhere).
    pub capture_stun: bool,
    /// STUN datagrams peers sent to the node while `capture_stun` was set.
    pub captured_stun: Vec<(SocketAddr, Vec<u8>)>,
    /// The node's media address as its clients see it (default [`SFU_ADDR`]).
    pub node_addr: SocketAddr,
    /// Datagrams the node sent to an address that is none of the harness's clients
    /// (another node, in relay tests).
    pub foreign: VecDeque<meridian_media::Transmit>,
    /// Datagrams the node sent from its relay socket.
    pub relay_out: VecDeque<meridian_media::Transmit>,
    by_addr: HashMap<SocketAddr, (usize, bool)>,
    by_id: HashMap<ParticipantId, usize>,
    to_sfu: VecDeque<(SocketAddr, Vec<u8>)>,
    to_peer: VecDeque<meridian_media::Transmit>,
    new_events: VecDeque<SfuEvent>,
    next_host: u32,
    /// Clients added from now on negotiate audio RED (`red/48000/2`; str0m sends and
    /// decodes it in frame mode). Default false.
    pub red: bool,
    /// Clients added from now on negotiate video in RED with ULPFEC (their subscriber
    /// connection in RTP mode, video packets kept in `video_packets`, not `frames`).
    pub fec: bool,
    /// FEC clients answer the node's offer as Chromium does (`red/90000` and
    /// `ulpfec/90000`), so the node makes its FEC for a libwebrtc receiver.
    pub fec_browser: bool,
    /// Keep `sent_to_subscriber` and `red_payloads` of every client.
    pub capture_video: bool,
    /// Clients added from now on log the RTP and RTCP their connections handle (str0m's
    /// raw packets), kept in `nacks_sent`, `nacks_received`, `rtp_received` and
    /// `rtp_at_node`.
    pub raw_rtcp: bool,
    /// When set, datagrams the peers send to the node are held here instead of handed
    /// in (for a test to hand them in itself, e.g. all at one instant).
    pub held: Option<Vec<(SocketAddr, Vec<u8>)>>,
}

/// Most rounds one `pump` may take before giving up (guards against livelock).
const PUMP_BOUND: usize = 100_000;

impl Harness {
    /// A harness with the default core configuration.
    pub fn new() -> Harness {
        Harness::with_config(|c| c)
    }

    /// A harness whose core configuration is adjusted by `f`.
    pub fn with_config(f: impl FnOnce(SfuConfig) -> SfuConfig) -> Harness {
        let now = Instant::now();
        let config = f(SfuConfig::new(SFU_ADDR));
        Harness {
            sfu: Sfu::new(config, now),
            now,
            start: now,
            tick: Duration::from_millis(1),
            clients: Vec::new(),
            events: Vec::new(),
            auto_answer: true,
            profile: None,
            keep_events: true,
            capture_stun: false,
            captured_stun: Vec::new(),
            node_addr: SFU_ADDR,
            foreign: VecDeque::new(),
            relay_out: VecDeque::new(),
            by_addr: HashMap::new(),
            by_id: HashMap::new(),
            to_sfu: VecDeque::new(),
            to_peer: VecDeque::new(),
            new_events: VecDeque::new(),
            next_host: 1,
            red: false,
            fec: false,
            fec_browser: false,
            capture_video: false,
            raw_rtcp: false,
            held: None,
        }
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Runs `f` on the core and drains its transmits and events, timing both when
    /// profiling. Returns the time spent.
    fn drive<R>(&mut self, f: impl FnOnce(&mut Sfu, Instant) -> R) -> (R, Duration) {
        let cpu0 = self
            .profile
            .as_ref()
            .filter(|p| p.cpu)
            .map(|_| cpu_time::ThreadTime::now());
        let t0 = Instant::now();
        let r = f(&mut self.sfu, self.now);
        while let Some(t) = self.sfu.poll_transmit() {
            if let Some(p) = &mut self.profile {
                p.datagrams_out += 1;
            }
            self.to_peer.push_back(t);
        }
        while let Some(t) = self.sfu.poll_relay_transmit() {
            self.relay_out.push_back(t);
        }
        while let Some(e) = self.sfu.poll_event() {
            self.new_events.push_back(e);
        }
        let spent = t0.elapsed();
        if let Some(p) = &mut self.profile {
            p.sfu_time += spent;
            p.calls += 1;
            if let Some(c) = cpu0 {
                p.sfu_cpu += c.elapsed();
            }
        }
        (r, spent)
    }

    fn new_client(&mut self, id: ParticipantId) -> usize {
        let n = self.next_host;
        self.next_host += 1;
        let ip = IpAddr::V4(Ipv4Addr::new(
            10,
            0,
            (1 + n / 250) as u8,
            (n % 250) as u8 + 1,
        ));
        let pub_addr = SocketAddr::new(ip, 10_000);
        let sub_addr = SocketAddr::new(ip, 20_000);
        let idx = self.clients.len();
        self.clients.push(Client {
            id,
            publisher: PeerPc::new(self.now, pub_addr, self.red, false, self.raw_rtcp),
            subscriber: PeerPc::new(self.now, sub_addr, self.red, self.fec, self.raw_rtcp),
            source: None,
            frames: Vec::new(),
            sub_tracks: HashMap::new(),
            offers: Vec::new(),
            keyframe_requests: 0,
            sent: [0; 4],
            published: Vec::new(),
            alive: true,
            unanswered: None,
            fec: self.fec.then(Default::default),
            video_packets: Vec::new(),
            parity_packets: Vec::new(),
            sent_to_subscriber: Vec::new(),
            red_payloads: HashMap::new(),
            nacks_sent: Vec::new(),
            nacks_received: Vec::new(),
            rtp_received: Vec::new(),
            rtp_at_node: Vec::new(),
        });
        self.by_addr.insert(pub_addr, (idx, true));
        self.by_addr.insert(sub_addr, (idx, false));
        self.by_id.insert(id, idx);
        idx
    }

    /// Adds a client that publishes `media` into `room` (not auto-subscribing).
    pub fn add_publisher(&mut self, room: &str, name: &str, media: MediaConfig) -> usize {
        let (id, _) = self.drive(|s, now| s.add_participant(now, room, name, false));
        let idx = self.new_client(id);
        let now = self.now;
        let c = &mut self.clients[idx];
        let mut api = c.publisher.rtc.sdp_api();
        let mut announced = Vec::new();
        let audio_mid = media.audio.then(|| {
            let mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
            announced.push(TrackAnnouncement {
                mid: mid.to_string(),
                kind: TrackKind::Audio,
                source: "microphone".into(),
                layers: vec![],
                track_id: None,
            });
            mid
        });
        let video_mid = media.video.then(|| {
            let simulcast = (!media.layers.is_empty()).then(|| {
                let mut s = Simulcast::new();
                for l in &media.layers {
                    s.add_send_layer(SimulcastLayer::new(l.rid()));
                }
                s
            });
            let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, simulcast);
            announced.push(TrackAnnouncement {
                mid: mid.to_string(),
                kind: TrackKind::Video,
                source: "camera".into(),
                layers: media.layers.clone(),
                track_id: None,
            });
            mid
        });
        let (offer, pending): (SdpOffer, SdpPendingOffer) =
            api.apply().expect("a publisher offers something");
        let sdp = offer.to_sdp_string();
        let (answer, infos) = self
            .drive(|s, now| s.handle_publisher_offer(now, id, &sdp, announced))
            .0
            .expect("the node accepts the publisher offer");
        let c = &mut self.clients[idx];
        c.publisher
            .rtc
            .sdp_api()
            .accept_answer(
                pending,
                SdpAnswer::from_sdp_string(&answer).expect("the node's answer parses"),
            )
            .expect("the node's answer is acceptable");
        c.published = infos
            .iter()
            .map(|i| (i.track_id.parse().expect("track id"), i.kind))
            .collect();
        c.source = Some(Source {
            audio_mid,
            video_mid,
            config: media,
            started: now,
            next_video: now,
            next_audio: now,
            video_seq: 0,
            audio_seq: 0,
            force_keyframe: [true; 3],
        });
        self.poll_peer(idx, true);
        self.pump();
        idx
    }

    /// Writes one RTP packet on publisher `idx`'s audio section (RTP written directly,
    /// e.g. a hand-made RED payload); the synthetic audio header is the caller's.
    pub fn write_audio_rtp(&mut self, idx: usize, pt: u8, seq: u64, ts: u32, payload: Vec<u8>) {
        let now = self.now;
        let c = &mut self.clients[idx];
        let mid = c
            .source
            .as_ref()
            .and_then(|s| s.audio_mid)
            .expect("the publisher has an audio section");
        let mut api = c.publisher.rtc.direct_api();
        let tx = api
            .stream_tx_by_mid(mid, None)
            .expect("the audio section has a send stream");
        tx.write_rtp(str0m::rtp::RtpWrite::new(
            pt.into(),
            seq.into(),
            ts,
            now,
            payload,
        ));
        self.poll_peer(idx, true);
    }

    /// The synthetic audio frame (Opus TOC byte + header) `write_media` sends.
    pub fn audio_frame(&self, seq: u64) -> Vec<u8> {
        let sent_us = self.now.saturating_duration_since(self.start).as_micros() as u64;
        let mut frame = vec![0xfc];
        FrameHeader {
            seq,
            layer: 0,
            keyframe: true,
            sent_us,
        }
        .write(&mut frame);
        frame.resize(80, 0);
        frame
    }

    /// Adds a client that only receives (auto-subscribing to the room's tracks).
    pub fn add_subscriber(&mut self, room: &str, name: &str) -> usize {
        let (id, _) = self.drive(|s, now| s.add_participant(now, room, name, true));
        let idx = self.new_client(id);
        self.pump();
        idx
    }

    /// Removes a client from the node; the harness stops driving its peers.
    pub fn remove(&mut self, idx: usize) {
        let id = self.clients[idx].id;
        self.drive(|s, now| s.remove_participant(now, id));
        self.clients[idx].alive = false;
        self.pump();
    }

    /// Impairs the datagrams between the node and one peer connection.
    pub fn impair(
        &mut self,
        idx: usize,
        publisher: bool,
        down: Option<NetemConfig>,
        up: Option<NetemConfig>,
    ) {
        let c = &mut self.clients[idx];
        let pc = if publisher {
            &mut c.publisher
        } else {
            &mut c.subscriber
        };
        pc.down = down.map(Netem::new);
        pc.up = up.map(Netem::new);
    }

    /// Hands a raw datagram to the node as if it came from `source`.
    pub fn inject(&mut self, source: SocketAddr, data: &[u8]) {
        self.drive(|s, now| s.handle_datagram(now, source, data));
        self.pump();
    }

    /// Hands a datagram to the node's relay socket as if it came from `source`.
    pub fn inject_relay(&mut self, source: SocketAddr, data: &[u8]) {
        self.drive(|s, now| s.handle_relay_datagram(now, source, data));
        self.pump();
    }

    /// Runs `f` on the core (a command at the harness's now) and moves its output.
    pub fn call<R>(&mut self, f: impl FnOnce(&mut Sfu, Instant) -> R) -> R {
        let (r, _) = self.drive(f);
        self.pump();
        r
    }

    /// Puts one of a client's peer connections behind a NAT mapping that just changed
    /// to `addr`: from now on the node sees its datagrams come from there, and the
    /// node's datagrams to there reach it (its own local address stays the same).
    pub fn move_peer(&mut self, idx: usize, publisher: bool, addr: SocketAddr) {
        let pc = pc_of(&mut self.clients[idx], publisher);
        self.by_addr.remove(&pc.public_addr());
        pc.nat = Some(addr);
        self.by_addr.insert(addr, (idx, publisher));
    }

    /// Cuts (`true`) or restores one of a client's paths to the node.
    pub fn cut(&mut self, idx: usize, publisher: bool, cut: bool) {
        pc_of(&mut self.clients[idx], publisher).cut = cut;
    }

    /// Restarts ICE on a client's publisher connection as a client does: a new offer
    /// with new ICE credentials, answered by the node.
    pub fn restart_publisher_ice(&mut self, idx: usize) {
        let id = self.clients[idx].id;
        let mut api = self.clients[idx].publisher.rtc.sdp_api();
        api.ice_restart(true);
        let (offer, pending) = api.apply().expect("an ICE restart is a change");
        let sdp = offer.to_sdp_string();
        let (answer, _) = self
            .drive(|s, now| s.handle_publisher_offer(now, id, &sdp, Vec::new()))
            .0
            .expect("the node accepts the restart offer");
        self.clients[idx]
            .publisher
            .rtc
            .sdp_api()
            .accept_answer(
                pending,
                SdpAnswer::from_sdp_string(&answer).expect("the node's answer parses"),
            )
            .expect("the node's answer is acceptable");
        self.poll_peer(idx, true);
        self.pump();
    }

    /// Asks the node to restart ICE on a client's subscriber connection (its offer is
    /// answered like any other when `auto_answer` is set).
    pub fn restart_subscriber_ice(&mut self, idx: usize) {
        let id = self.clients[idx].id;
        self.drive(|s, now| s.restart_ice(now, id))
            .0
            .expect("the node restarts the subscriber connection");
        self.pump();
    }

    /// Answers the latest subscriber offer a client left unanswered (with
    /// `auto_answer` set again), as if it had just arrived.
    pub fn answer_last_offer(&mut self, idx: usize) {
        let e = self.clients[idx]
            .unanswered
            .take()
            .expect("an offer was left unanswered");
        if let SfuEvent::SubscriberOffer { .. } = &e {
            self.clients[idx].offers.pop();
        }
        self.handle_event(e);
        self.pump();
    }

    /// Every connection of every live client is connected.
    pub fn all_connected(&self) -> bool {
        self.clients.iter().filter(|c| c.alive).all(|c| {
            (c.source.is_none() || c.publisher.connected)
                && (c.sub_tracks.is_empty() || c.subscriber.connected)
        })
    }

    /// Advances virtual time by one tick and lets everything run.
    pub fn step(&mut self) {
        self.now += self.tick;
        let now = self.now;
        for idx in 0..self.clients.len() {
            if !self.clients[idx].alive {
                continue;
            }
            if self.clients[idx].source.is_some() {
                self.write_media(idx);
            }
            for publisher in [true, false] {
                let pc = pc_of(&mut self.clients[idx], publisher);
                if pc.next_timeout <= now {
                    let _ = pc.rtc.handle_input(Input::Timeout(now));
                    self.poll_peer(idx, publisher);
                }
            }
        }
        if self.sfu.poll_timeout() <= now {
            self.drive(|s, now| s.handle_timeout(now));
        }
        self.pump();
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// Runs until `cond` holds or `max` of virtual time passed; returns whether it held.
    pub fn run_until(&mut self, max: Duration, mut cond: impl FnMut(&Harness) -> bool) -> bool {
        let end = self.now + max;
        while self.now < end {
            if cond(self) {
                return true;
            }
            self.step();
        }
        cond(self)
    }

    /// Moves datagrams and events until nothing is left to move at this instant.
    pub fn pump(&mut self) {
        let now = self.now;
        for _ in 0..PUMP_BOUND {
            let mut moved = false;
            // Impaired links release what is due.
            for idx in 0..self.clients.len() {
                if !self.clients[idx].alive {
                    continue;
                }
                for publisher in [true, false] {
                    let pc = pc_of(&mut self.clients[idx], publisher);
                    let from = pc.public_addr();
                    if let Some(net) = &mut pc.up {
                        net.handle_input(str0m_netem::Input::Timeout(now));
                        while let Some(out) = net.poll_output() {
                            if let str0m_netem::Output::Packet(d) = out {
                                self.to_sfu.push_back((from, d));
                            }
                        }
                    }
                    let mut arrived = Vec::new();
                    if let Some(net) = &mut pc.down {
                        net.handle_input(str0m_netem::Input::Timeout(now));
                        while let Some(out) = net.poll_output() {
                            if let str0m_netem::Output::Packet(d) = out {
                                arrived.push(d);
                            }
                        }
                    }
                    for d in arrived {
                        moved = true;
                        self.deliver_to_peer(idx, publisher, &d);
                    }
                }
            }
            while let Some((source, data)) = self.to_sfu.pop_front() {
                moved = true;
                if let Some(held) = &mut self.held {
                    held.push((source, data));
                    continue;
                }
                if self.capture_stun && data.first().is_some_and(|b| *b < 2) {
                    self.captured_stun.push((source, data.clone()));
                }
                let rtp = is_rtp(&data);
                if rtp
                    && data.len() >= 12
                    && let Some(&(idx, true)) = self.by_addr.get(&source)
                    && self.clients[idx].publisher.rtc_raw
                {
                    let ssrc = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
                    let seq = u16::from_be_bytes([data[2], data[3]]);
                    self.clients[idx].rtp_at_node.push((now, ssrc, seq));
                }
                let (_, spent) = self.drive(|s, now| s.handle_datagram(now, source, &data));
                if rtp && let Some(p) = &mut self.profile {
                    p.rtp_latencies.push(spent);
                }
            }
            while let Some(t) = self.to_peer.pop_front() {
                moved = true;
                let Some(&(idx, publisher)) = self.by_addr.get(&t.destination) else {
                    self.foreign.push_back(t);
                    continue;
                };
                if !self.clients[idx].alive {
                    continue;
                }
                if self.capture_video && !publisher {
                    self.clients[idx]
                        .sent_to_subscriber
                        .push(t.contents.to_vec());
                }
                let pc = pc_of(&mut self.clients[idx], publisher);
                if pc.cut {
                    continue;
                }
                match &mut pc.down {
                    Some(net) => net.handle_input(str0m_netem::Input::Packet(now, t.contents)),
                    None => self.deliver_to_peer(idx, publisher, &t.contents),
                }
            }
            while let Some(e) = self.new_events.pop_front() {
                moved = true;
                self.handle_event(e);
            }
            if !moved {
                return;
            }
        }
        panic!("pump did not settle within {PUMP_BOUND} rounds");
    }

    fn handle_event(&mut self, e: SfuEvent) {
        if let SfuEvent::SubscriberOffer {
            participant,
            sdp,
            tracks,
        } = &e
            && let Some(&idx) = self.by_id.get(participant)
        {
            let c = &mut self.clients[idx];
            c.offers.push(
                tracks
                    .iter()
                    .filter_map(|t| t.track_id.parse().ok())
                    .collect(),
            );
            if !self.auto_answer {
                c.unanswered = Some(e.clone());
            }
            if self.auto_answer && c.alive {
                for t in tracks {
                    if let Ok(track) = t.track_id.parse() {
                        c.sub_tracks.insert(Mid::from(t.mid.as_str()), track);
                    }
                }
                let sdp = meridian_media::fec::sdp_from_wire(sdp);
                let offer = SdpOffer::from_sdp_string(&sdp).expect("the node's offer parses");
                let answer = c
                    .subscriber
                    .rtc
                    .sdp_api()
                    .accept_offer(offer)
                    .expect("the node's offer is acceptable")
                    .to_sdp_string();
                let answer = if self.fec_browser {
                    meridian_media::fec::offer_to_wire(&answer)
                } else {
                    meridian_media::fec::sdp_to_wire(&answer)
                };
                let id = *participant;
                self.poll_peer(idx, false);
                self.drive(|s, now| s.handle_subscriber_answer(now, id, &answer))
                    .0
                    .expect("the node accepts the answer");
            }
        }
        if self.keep_events {
            self.events.push((self.now, e));
        }
    }

    fn deliver_to_peer(&mut self, idx: usize, publisher: bool, data: &[u8]) {
        let now = self.now;
        let pc = pc_of(&mut self.clients[idx], publisher);
        let Ok(receive) = Receive::new(Protocol::Udp, self.node_addr, pc.addr, data) else {
            return;
        };
        let _ = pc.rtc.handle_input(Input::Receive(now, receive));
        self.poll_peer(idx, publisher);
    }

    fn poll_peer(&mut self, idx: usize, publisher: bool) {
        let now = self.now;
        let start = self.start;
        for _ in 0..PUMP_BOUND {
            let c = &mut self.clients[idx];
            let pc = pc_of(c, publisher);
            let out = match pc.rtc.poll_output() {
                Ok(o) => o,
                Err(_) => {
                    pc.next_timeout = now + Duration::from_secs(3600);
                    return;
                }
            };
            match out {
                Output::Timeout(t) => {
                    pc.next_timeout = t;
                    return;
                }
                Output::Transmit(t) => {
                    if pc.cut {
                        continue;
                    }
                    let data: Vec<u8> = t.contents.into();
                    let from = pc.public_addr();
                    match &mut pc.up {
                        Some(net) => net.handle_input(str0m_netem::Input::Packet(now, data)),
                        None => self.to_sfu.push_back((from, data)),
                    }
                }
                Output::Event(e) => match e {
                    Event::Connected => pc.connected = true,
                    Event::KeyframeRequest(req) if publisher => {
                        c.keyframe_requests += 1;
                        if let Some(s) = &mut c.source {
                            let layer = req
                                .rid
                                .and_then(|r| Layer::from_rid(&r.to_string()))
                                .map(Layer::index);
                            for (i, f) in s.force_keyframe.iter_mut().enumerate() {
                                if layer.is_none_or(|l| l == i) {
                                    *f = true;
                                }
                            }
                        }
                    }
                    Event::RtpPacket(p) if !publisher => {
                        use meridian_media::fec::{self, MediaPacket};
                        let (Some(dec), fec::RED_PT) = (c.fec.as_mut(), *p.header.payload_type)
                        else {
                            continue;
                        };
                        if self.capture_video {
                            c.red_payloads
                                .insert(p.header.sequence_number, p.payload.to_vec());
                        }
                        let Ok((block_pt, body)) = fec::red_unwrap(&p.payload) else {
                            continue;
                        };
                        let rebuilt = if block_pt == fec::ULPFEC_PT {
                            c.parity_packets.push(p.header.sequence_number);
                            dec.on_fec(body).unwrap_or_default()
                        } else {
                            let seq = p.header.sequence_number;
                            c.video_packets.push((now, seq, false));
                            dec.on_media(MediaPacket {
                                seq,
                                ts: p.header.timestamp,
                                pt: block_pt,
                                marker: p.header.marker,
                                ext: std::sync::Arc::from(Vec::new()),
                                payload: body.to_vec(),
                            })
                        };
                        c.video_packets
                            .extend(rebuilt.iter().map(|m| (now, m.seq, true)));
                    }
                    Event::RawPacket(raw) => {
                        use str0m::rtp::RawPacket;
                        use str0m::rtp::rtcp::Rtcp;
                        match *raw {
                            RawPacket::RtcpTx(Rtcp::Nack(n)) if !publisher => {
                                c.nacks_sent.push((now, *n.ssrc, nack_seqs(&n)));
                            }
                            RawPacket::RtcpRx(Rtcp::Nack(n)) if publisher => {
                                c.nacks_received.push((now, *n.ssrc, nack_seqs(&n)));
                            }
                            RawPacket::RtpRx(h, data) if !publisher => {
                                let osn = (data.len() >= 2)
                                    .then(|| u16::from_be_bytes([data[0], data[1]]));
                                c.rtp_received.push((
                                    now,
                                    *h.ssrc,
                                    *h.payload_type,
                                    h.sequence_number,
                                    osn,
                                ));
                            }
                            _ => {}
                        }
                    }
                    Event::MediaData(d) if !publisher => {
                        if let Some(header) = FrameHeader::parse(&d.data) {
                            let video = d.params.spec().codec == Codec::Vp8;
                            c.frames.push(Frame {
                                at: now,
                                mid: d.mid,
                                track: c.sub_tracks.get(&d.mid).copied(),
                                video,
                                header,
                                contiguous: d.contiguous,
                                latency: now.saturating_duration_since(
                                    start + Duration::from_micros(header.sent_us),
                                ),
                            });
                        }
                    }
                    _ => {}
                },
            }
        }
    }

    fn write_media(&mut self, idx: usize) {
        let now = self.now;
        let sent_us = now.saturating_duration_since(self.start).as_micros() as u64;
        let c = &mut self.clients[idx];
        let Some(s) = &mut c.source else {
            return;
        };
        if !c.publisher.connected {
            return;
        }
        let rtc = &mut c.publisher.rtc;
        if let Some(mid) = s.audio_mid
            && now >= s.next_audio
            && s.config.audio_frames
        {
            while s.next_audio <= now {
                s.next_audio += Duration::from_millis(20);
            }
            let pt = rtc
                .codec_config()
                .find(|p| p.spec().codec == Codec::Opus)
                .map(|p| p.pt());
            let elapsed = now.saturating_duration_since(s.started);
            let rtp = MediaTime::new(
                elapsed.as_micros() as u64 * 48 / 1000,
                Frequency::FORTY_EIGHT_KHZ,
            );
            let mut frame = vec![0xfc];
            FrameHeader {
                seq: s.audio_seq,
                layer: 0,
                keyframe: true,
                sent_us,
            }
            .write(&mut frame);
            frame.resize(80, 0);
            if let (Some(pt), Some(w)) = (pt, rtc.writer(mid))
                && w.write(pt, now, rtp, frame).is_ok()
            {
                c.sent[3] += 1;
            }
            s.audio_seq += 1;
        }
        if let Some(mid) = s.video_mid
            && now >= s.next_video
        {
            let interval = Duration::from_secs(1) / s.config.fps.max(1);
            while s.next_video <= now {
                s.next_video += interval;
            }
            let pt = rtc
                .codec_config()
                .find(|p| p.spec().codec == Codec::Vp8)
                .map(|p| p.pt());
            let elapsed = now.saturating_duration_since(s.started);
            let rtp = MediaTime::from_90khz(elapsed.as_micros() as u64 * 9 / 100);
            let layers: Vec<Option<Layer>> = if s.config.layers.is_empty() {
                vec![None]
            } else {
                s.config.layers.iter().copied().map(Some).collect()
            };
            for layer in layers {
                let li = layer.map_or(2, Layer::index);
                let keyframe =
                    s.video_seq % s.config.keyframe_interval.max(1) == 0 || s.force_keyframe[li];
                let mut size =
                    (s.config.layer_bitrates[li] / 8 / u64::from(s.config.fps.max(1))) as usize;
                if keyframe {
                    size *= 3;
                }
                let frame = vp8_frame(
                    FrameHeader {
                        seq: s.video_seq,
                        layer: li as u8,
                        keyframe,
                        sent_us,
                    },
                    size.clamp(64, 60_000),
                );
                let (Some(pt), Some(w)) = (pt, rtc.writer(mid)) else {
                    continue;
                };
                let w = match layer {
                    Some(l) => w.rid(l.rid().into()),
                    None => w,
                };
                if w.write(pt, now, rtp, frame).is_ok() {
                    c.sent[li] += 1;
                    if keyframe {
                        s.force_keyframe[li] = false;
                    }
                }
            }
            s.video_seq += 1;
        }
        self.poll_peer(idx, true);
    }

    /// Runs until every live client is connected (panics after `max`).
    pub fn connect(&mut self, max: Duration) {
        assert!(
            self.run_until(max, Harness::all_connected),
            "not all peers connected within {max:?}"
        );
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

fn pc_of(c: &mut Client, publisher: bool) -> &mut PeerPc {
    if publisher {
        &mut c.publisher
    } else {
        &mut c.subscriber
    }
}

/// Whether a datagram is RTP (not RTCP), by the RFC 7983 / RFC 5761 rules.
pub fn is_rtp(data: &[u8]) -> bool {
    data.len() > 2 && (128..192).contains(&data[0]) && {
        let pt = data[1] & 0x7f;
        !(64..96).contains(&pt)
    }
}

/// The sequence numbers a NACK names (RFC 4585 §6.2.1: PID and the bitmask after it).
pub fn nack_seqs(n: &str0m::rtp::rtcp::Nack) -> Vec<u16> {
    let mut out = Vec::new();
    for e in n.reports.iter() {
        out.push(e.pid);
        for i in 0..16u16 {
            if e.blp & (1 << i) != 0 {
                out.push(e.pid.wrapping_add(i + 1));
            }
        }
    }
    out
}

/// A seeded link with `loss` (0..1) random loss and `latency`.
pub fn lossy(loss: f32, latency: Duration, seed: u64) -> NetemConfig {
    NetemConfig::new()
        .latency(latency)
        .loss(str0m_netem::RandomLoss::new(str0m_netem::Probability::new(
            loss,
        )))
        .seed(seed)
}
