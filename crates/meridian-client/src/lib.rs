//! A Rust client for Meridian, built on `str0m`.
//!
//! [`Client::join`] connects to a node's signaling endpoint, joins the room named by
//! its token, publishes synthetic Opus audio and VP8 video (three simulcast layers by
//! default) and receives every track the node offers. Synthetic frames carry a
//! sequence number and their send time, so the receiver measures frame loss, freezes,
//! latency and jitter ([`ClientStats`]). Keyframe bits are valid, so the node's
//! keyframe logic is exercised.
//!
//! Each client runs as one tokio task with two UDP sockets (publisher and subscriber
//! connections). An optional seeded network emulator ([`str0m_netem`]) impairs the
//! client's own traffic in both directions.
#![deny(missing_docs)]

mod media;
mod signal;
mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meridian_protocol::{
    ClientMessage, ErrorCode, Layer, ServerMessage, TrackAnnouncement, TrackKind,
};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{Direction, KeyframeRequest, MediaKind, Mid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use str0m_netem::{Netem, NetemConfig};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

pub use media::{FrameHeader, now_micros};
pub use signal::{WebTransportEndpoint, webtransport_endpoint};
pub use stats::{ClientStats, TrackStats};

use signal::Signal;

/// How a client reaches the node's signaling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket text frames; [`ClientConfig::url`] is `ws://HOST:PORT/signal`.
    #[default]
    WebSocket,
    /// One WebTransport bidirectional stream of length-prefixed messages;
    /// [`ClientConfig::url`] is `https://HOST:PORT/signal`.
    WebTransport,
}

/// Errors of a client session.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The signaling connection failed.
    #[error("signaling: {0}")]
    Signaling(String),
    /// The node refused a request.
    #[error("node error {code:?}: {message}")]
    Refused {
        /// Wire code.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
    /// The node redirected the client to another region.
    #[error("redirected to region {region} at {url}")]
    Redirected {
        /// Region.
        region: String,
        /// Its signaling URL.
        url: String,
    },
    /// Local sockets failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// WebRTC negotiation failed.
    #[error("webrtc: {0}")]
    Rtc(String),
    /// No `joined` within the join timeout.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// What a client publishes and how it behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Signaling URL, e.g. `ws://127.0.0.1:7880/signal` (WebSocket) or
    /// `https://127.0.0.1:7881/signal` (WebTransport).
    pub url: String,
    /// The signaling transport.
    pub transport: Transport,
    /// WebTransport only: SHA-256 digests of the node's self-signed certificate
    /// (empty: verify it against the system's roots).
    pub server_certificate_hashes: Vec<[u8; 32]>,
    /// Access token.
    pub token: String,
    /// Publish a synthetic Opus track.
    pub publish_audio: bool,
    /// Publish a synthetic VP8 track.
    pub publish_video: bool,
    /// Simulcast layers of the video track (empty: a single stream).
    pub layers: Vec<Layer>,
    /// Bitrate of each layer, lowest first, in bit/s.
    pub layer_bitrates: [u64; 3],
    /// Video frames per second.
    pub fps: u32,
    /// Frames between periodic keyframes.
    pub keyframe_interval: u32,
    /// Subscribe to every track automatically.
    pub auto_subscribe: bool,
    /// Local IP to bind the media sockets to.
    pub bind_ip: std::net::IpAddr,
    /// Impairment applied to the client's traffic in both directions.
    pub impairment: Option<NetemConfig>,
    /// How long to wait for `joined`.
    pub join_timeout: Duration,
}

impl ClientConfig {
    /// A client that publishes audio and three-layer simulcast video.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            transport: Transport::WebSocket,
            server_certificate_hashes: Vec::new(),
            token: token.into(),
            publish_audio: true,
            publish_video: true,
            layers: Layer::ALL.to_vec(),
            layer_bitrates: [150_000, 500_000, 1_500_000],
            fps: 30,
            keyframe_interval: 300,
            auto_subscribe: true,
            bind_ip: "127.0.0.1".parse().expect("valid literal"),
            impairment: None,
            join_timeout: Duration::from_secs(10),
        }
    }

    /// The same client over WebTransport to `endpoint`.
    pub fn over_webtransport(self, endpoint: WebTransportEndpoint) -> Self {
        ClientConfig {
            url: endpoint.url,
            transport: Transport::WebTransport,
            server_certificate_hashes: endpoint.certificate_hashes,
            ..self
        }
    }

    /// A client that only receives.
    pub fn subscriber(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            publish_audio: false,
            publish_video: false,
            ..ClientConfig::new(url, token)
        }
    }
}

enum Command {
    Send(ClientMessage),
    Impair(Option<NetemConfig>),
    Leave,
    Drop,
}

/// A running client; dropping it disconnects abruptly.
pub struct Client {
    stats: Arc<Mutex<ClientStats>>,
    commands: mpsc::Sender<Command>,
    messages: watch::Receiver<u64>,
    task: JoinHandle<Result<(), ClientError>>,
}

impl Client {
    /// Connects, joins, starts publishing and subscribing; returns once `joined` arrived.
    pub async fn join(config: ClientConfig) -> Result<Client, ClientError> {
        let started = Instant::now();
        let mut signal = tokio::time::timeout(config.join_timeout, Signal::connect(&config))
            .await
            .map_err(|_| ClientError::Timeout("signaling connection"))??;
        let join = ClientMessage::Join {
            token: config.token.clone(),
            resume: None,
            version: meridian_protocol::PROTOCOL_VERSION,
            auto_subscribe: config.auto_subscribe,
            client: Some("meridian-client".into()),
        };
        signal.send(&join).await?;
        let deadline = tokio::time::Instant::now() + config.join_timeout;
        let joined = loop {
            let msg = tokio::time::timeout_at(deadline, signal.recv())
                .await
                .map_err(|_| ClientError::Timeout("joined"))??;
            let Some(msg) = msg else {
                return Err(ClientError::Signaling("closed before joined".into()));
            };
            match msg {
                j @ ServerMessage::Joined { .. } => break j,
                ServerMessage::Error { code, message } => {
                    return Err(ClientError::Refused { code, message });
                }
                ServerMessage::Redirect { region, url } => {
                    return Err(ClientError::Redirected { region, url });
                }
                _ => continue,
            }
        };
        let ServerMessage::Joined { participant_id, .. } = joined else {
            unreachable!("loop breaks only on joined");
        };
        let stats = Arc::new(Mutex::new(ClientStats {
            participant_id: participant_id.clone(),
            join_ms: started.elapsed().as_secs_f64() * 1000.0,
            ..Default::default()
        }));
        let pub_socket = UdpSocket::bind(SocketAddr::new(config.bind_ip, 0)).await?;
        let sub_socket = UdpSocket::bind(SocketAddr::new(config.bind_ip, 0)).await?;
        let (commands, command_rx) = mpsc::channel(64);
        let (msg_tx, messages) = watch::channel(0);
        let session = Session::new(
            config,
            started,
            pub_socket,
            sub_socket,
            stats.clone(),
            msg_tx,
        )?;
        let task = tokio::spawn(session.run(signal, command_rx));
        Ok(Client {
            stats,
            commands,
            messages,
            task,
        })
    }

    /// A copy of the current statistics.
    pub fn stats(&self) -> ClientStats {
        self.stats
            .lock()
            .expect("stats lock never poisoned")
            .clone()
    }

    /// Sends a protocol message (subscribe, set_layer, mute, …).
    pub async fn send(&self, msg: ClientMessage) {
        let _ = self.commands.send(Command::Send(msg)).await;
    }

    /// Caps the layer received for a track.
    pub async fn set_max_layer(&self, track_id: &str, layer: Layer) {
        self.send(ClientMessage::SetLayer {
            track_id: track_id.to_string(),
            max_layer: layer,
        })
        .await;
    }

    /// Changes the impairment of the client's traffic.
    pub async fn impair(&self, config: Option<NetemConfig>) {
        let _ = self.commands.send(Command::Impair(config)).await;
    }

    /// Waits until `check` holds for the statistics, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&ClientStats) -> bool,
    ) -> Result<ClientStats, ClientStats> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut messages = self.messages.clone();
        loop {
            let s = self.stats();
            if check(&s) {
                return Ok(s);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(s);
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), messages.changed()).await;
        }
    }

    /// Leaves the room politely and waits for the session to end.
    pub async fn leave(self) -> Result<(), ClientError> {
        let _ = self.commands.send(Command::Leave).await;
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(ClientError::Signaling(e.to_string())),
            Err(_) => Err(ClientError::Timeout("leave")),
        }
    }

    /// Drops the signaling connection and media sockets without leaving.
    pub async fn disconnect(self) {
        let _ = self.commands.send(Command::Drop).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// A datagram in flight through the emulator.
#[derive(Clone)]
struct Datagram {
    publisher: bool,
    peer: SocketAddr,
    data: Vec<u8>,
}

impl str0m_netem::WithLen for Datagram {
    fn len(&self) -> usize {
        self.data.len()
    }
}

struct Pc {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    next_timeout: Instant,
}

struct Session {
    config: ClientConfig,
    started: Instant,
    publisher: Pc,
    subscriber: Pc,
    pending_pub: Option<SdpPendingOffer>,
    video: Option<media::VideoSource>,
    audio: Option<media::AudioSource>,
    sub_tracks: HashMap<Mid, String>,
    stats: Arc<Mutex<ClientStats>>,
    notify: watch::Sender<u64>,
    net_in: Option<Netem<Datagram>>,
    net_out: Option<Netem<Datagram>>,
    out_queue: Vec<ClientMessage>,
}

/// A client connection. The publisher side sends unpaced, as a synthetic source with
/// fixed layer rates has nothing to adapt (str0m's pacer would only add latency).
fn new_rtc(now: Instant, local: SocketAddr) -> Rtc {
    let mut rtc = Rtc::builder()
        .clear_codecs()
        .enable_opus(true, false)
        .enable_vp8(true)
        .set_stats_interval(Some(Duration::from_secs(1)))
        .build(now);
    rtc.add_local_candidate(Candidate::host(local, "udp").expect("valid host candidate"));
    rtc
}

impl Session {
    fn new(
        config: ClientConfig,
        started: Instant,
        pub_socket: UdpSocket,
        sub_socket: UdpSocket,
        stats: Arc<Mutex<ClientStats>>,
        notify: watch::Sender<u64>,
    ) -> Result<Session, ClientError> {
        let now = Instant::now();
        let pub_local = pub_socket.local_addr()?;
        let sub_local = sub_socket.local_addr()?;
        Ok(Session {
            net_in: config.impairment.map(Netem::new),
            net_out: config.impairment.map(Netem::new),
            publisher: Pc {
                rtc: new_rtc(now, pub_local),
                socket: pub_socket,
                local: pub_local,
                next_timeout: now,
            },
            subscriber: Pc {
                rtc: new_rtc(now, sub_local),
                socket: sub_socket,
                local: sub_local,
                next_timeout: now,
            },
            config,
            started,
            pending_pub: None,
            video: None,
            audio: None,
            sub_tracks: HashMap::new(),
            stats,
            notify,
            out_queue: Vec::new(),
        })
    }

    async fn run(
        mut self,
        mut signal: Signal,
        mut commands: mpsc::Receiver<Command>,
    ) -> Result<(), ClientError> {
        if self.config.publish_audio || self.config.publish_video {
            self.offer_publications()?;
        }
        let mut buf_pub = vec![0u8; 2048];
        let mut buf_sub = vec![0u8; 2048];
        let mut ping = tokio::time::interval(Duration::from_secs(5));
        let mut ping_id = 0;
        loop {
            for msg in std::mem::take(&mut self.out_queue) {
                signal.send(&msg).await?;
            }
            self.drain(Instant::now());
            let deadline = tokio::time::Instant::from_std(self.next_deadline());
            tokio::select! {
                msg = signal.recv() => {
                    match msg? {
                        Some(ServerMessage::Left { .. }) => {
                            signal.close().await;
                            return Ok(());
                        }
                        Some(msg) => self.handle_server(msg)?,
                        None => return Err(ClientError::Signaling("signaling closed".into())),
                    }
                }
                r = self.publisher.socket.recv_from(&mut buf_pub) => {
                    let (n, from) = r?;
                    self.incoming(true, from, buf_pub[..n].to_vec());
                }
                r = self.subscriber.socket.recv_from(&mut buf_sub) => {
                    let (n, from) = r?;
                    self.incoming(false, from, buf_sub[..n].to_vec());
                }
                cmd = commands.recv() => match cmd {
                    Some(Command::Send(m)) => self.out_queue.push(m),
                    Some(Command::Impair(c)) => {
                        self.net_in = c.map(Netem::new);
                        self.net_out = c.map(Netem::new);
                    }
                    Some(Command::Leave) => {
                        let _ = signal.send(&ClientMessage::Leave).await;
                        // Wait briefly for `left`.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Ok(Some(m)) = signal.recv().await {
                                if matches!(m, ServerMessage::Left { .. }) {
                                    break;
                                }
                            }
                        }).await;
                        signal.close().await;
                        return Ok(());
                    }
                    Some(Command::Drop) | None => return Ok(()),
                },
                _ = ping.tick() => {
                    ping_id += 1;
                    self.out_queue.push(ClientMessage::Ping { id: ping_id });
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.tick(Instant::now()).await;
                }
            }
        }
    }

    fn pc(&mut self, publisher: bool) -> &mut Pc {
        if publisher {
            &mut self.publisher
        } else {
            &mut self.subscriber
        }
    }

    fn incoming(&mut self, publisher: bool, from: SocketAddr, data: Vec<u8>) {
        let now = Instant::now();
        match &mut self.net_in {
            Some(net) => net.handle_input(str0m_netem::Input::Packet(
                now,
                Datagram {
                    publisher,
                    peer: from,
                    data,
                },
            )),
            None => self.deliver(now, publisher, from, &data),
        }
    }

    fn deliver(&mut self, now: Instant, publisher: bool, from: SocketAddr, data: &[u8]) {
        let pc = self.pc(publisher);
        let Ok(receive) = Receive::new(Protocol::Udp, from, pc.local, data) else {
            return;
        };
        if let Err(e) = pc.rtc.handle_input(Input::Receive(now, receive)) {
            debug!("client input: {e}");
        }
        self.poll(now, publisher);
    }

    fn next_deadline(&self) -> Instant {
        let mut t = self
            .publisher
            .next_timeout
            .min(self.subscriber.next_timeout);
        if let Some(v) = &self.video {
            t = t.min(v.next_frame);
        }
        if let Some(a) = &self.audio {
            t = t.min(a.next_frame);
        }
        if let Some(n) = &self.net_in {
            t = t.min(n.poll_timeout());
        }
        if let Some(n) = &self.net_out {
            t = t.min(n.poll_timeout());
        }
        t.max(Instant::now() + Duration::from_micros(500))
            .min(Instant::now() + Duration::from_millis(100))
    }

    async fn tick(&mut self, now: Instant) {
        for publisher in [true, false] {
            let pc = self.pc(publisher);
            if pc.next_timeout <= now {
                let _ = pc.rtc.handle_input(Input::Timeout(now));
                self.poll(now, publisher);
            }
        }
        self.write_media(now);
        self.drain(now);
    }

    /// Moves datagrams through the emulators and out of the sockets.
    fn drain(&mut self, now: Instant) {
        if let Some(mut net) = self.net_in.take() {
            net.handle_input(str0m_netem::Input::Timeout(now));
            while let Some(out) = net.poll_output() {
                if let str0m_netem::Output::Packet(d) = out {
                    self.deliver(now, d.publisher, d.peer, &d.data);
                }
            }
            self.net_in = Some(net);
        }
        if let Some(net) = &mut self.net_out {
            net.handle_input(str0m_netem::Input::Timeout(now));
            while let Some(out) = net.poll_output() {
                if let str0m_netem::Output::Packet(d) = out {
                    let socket = if d.publisher {
                        &self.publisher.socket
                    } else {
                        &self.subscriber.socket
                    };
                    let _ = socket.try_send_to(&d.data, d.peer);
                }
            }
        }
    }

    fn poll(&mut self, now: Instant, publisher: bool) {
        loop {
            let out = self.pc(publisher).rtc.poll_output();
            match out {
                Ok(Output::Timeout(t)) => {
                    self.pc(publisher).next_timeout = t;
                    return;
                }
                Ok(Output::Transmit(t)) => {
                    let data: Vec<u8> = t.contents.into();
                    match &mut self.net_out {
                        Some(net) => net.handle_input(str0m_netem::Input::Packet(
                            now,
                            Datagram {
                                publisher,
                                peer: t.destination,
                                data,
                            },
                        )),
                        None => {
                            let _ = self.pc(publisher).socket.try_send_to(&data, t.destination);
                        }
                    }
                }
                Ok(Output::Event(e)) => self.handle_event(now, publisher, e),
                Err(e) => {
                    warn!("client connection failed: {e}");
                    self.pc(publisher).next_timeout = now + Duration::from_secs(3600);
                    return;
                }
            }
        }
    }

    fn handle_event(&mut self, now: Instant, publisher: bool, e: Event) {
        match e {
            Event::Connected => {
                let mut s = self.stats.lock().expect("stats lock never poisoned");
                if publisher {
                    s.publisher_connected = true;
                } else {
                    s.subscriber_connected = true;
                }
            }
            Event::KeyframeRequest(KeyframeRequest { rid, .. }) => {
                if let Some(v) = &mut self.video {
                    v.request_keyframe(rid.and_then(|r| Layer::from_rid(&r.to_string())));
                }
                self.stats.lock().expect("stats lock").keyframe_requests += 1;
            }
            Event::MediaData(data) if !publisher => {
                let track = self.sub_tracks.get(&data.mid).cloned().unwrap_or_default();
                let mut s = self.stats.lock().expect("stats lock never poisoned");
                let first_frame_ms = self.started.elapsed().as_secs_f64() * 1000.0;
                s.on_frame(&track, &data, now, first_frame_ms);
                drop(s);
                self.notify.send_modify(|n| *n += 1);
            }
            Event::MediaIngressStats(st) if !publisher => {
                let track = self.sub_tracks.get(&st.mid).cloned().unwrap_or_default();
                let mut s = self.stats.lock().expect("stats lock never poisoned");
                let t = s.tracks.entry(track).or_default();
                t.packets = st.packets;
                t.loss = st.loss.map(f64::from);
            }
            _ => {}
        }
    }

    fn write_media(&mut self, now: Instant) {
        if let Some(v) = &mut self.video {
            v.write_due(now, &mut self.publisher.rtc);
        }
        if let Some(a) = &mut self.audio {
            a.write_due(now, &mut self.publisher.rtc);
        }
        self.poll(now, true);
    }

    fn offer_publications(&mut self) -> Result<(), ClientError> {
        let mut api = self.publisher.rtc.sdp_api();
        let mut tracks = Vec::new();
        let mut video_mid = None;
        let mut audio_mid = None;
        if self.config.publish_audio {
            let mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
            audio_mid = Some(mid);
            tracks.push(TrackAnnouncement {
                mid: mid.to_string(),
                kind: TrackKind::Audio,
                source: "microphone".into(),
                layers: vec![],
            });
        }
        if self.config.publish_video {
            let simulcast = (!self.config.layers.is_empty()).then(|| {
                let mut s = Simulcast::new();
                for l in &self.config.layers {
                    s.add_send_layer(SimulcastLayer::new(l.rid()));
                }
                s
            });
            let mid = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, simulcast);
            video_mid = Some(mid);
            tracks.push(TrackAnnouncement {
                mid: mid.to_string(),
                kind: TrackKind::Video,
                source: "camera".into(),
                layers: self.config.layers.clone(),
            });
        }
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| ClientError::Rtc("nothing to offer".into()))?;
        self.pending_pub = Some(pending);
        let now = Instant::now();
        if let Some(mid) = video_mid {
            self.video = Some(media::VideoSource::new(
                mid,
                self.config.layers.clone(),
                self.config.layer_bitrates,
                self.config.fps,
                self.config.keyframe_interval,
                now,
            ));
        }
        if let Some(mid) = audio_mid {
            self.audio = Some(media::AudioSource::new(mid, now));
        }
        self.out_queue.push(ClientMessage::Offer {
            sdp: offer.to_sdp_string(),
            tracks,
        });
        self.poll(now, true);
        Ok(())
    }

    fn handle_server(&mut self, msg: ServerMessage) -> Result<(), ClientError> {
        let now = Instant::now();
        match msg {
            ServerMessage::Answer { sdp, tracks } => {
                let answer = SdpAnswer::from_sdp_string(&sdp)
                    .map_err(|e| ClientError::Rtc(e.to_string()))?;
                let pending = self
                    .pending_pub
                    .take()
                    .ok_or_else(|| ClientError::Rtc("answer without offer".into()))?;
                self.publisher
                    .rtc
                    .sdp_api()
                    .accept_answer(pending, answer)
                    .map_err(|e| ClientError::Rtc(e.to_string()))?;
                self.stats.lock().expect("stats lock").published = tracks;
                self.poll(now, true);
            }
            ServerMessage::Offer { sdp, tracks } => {
                let offer =
                    SdpOffer::from_sdp_string(&sdp).map_err(|e| ClientError::Rtc(e.to_string()))?;
                for t in &tracks {
                    self.sub_tracks
                        .insert(Mid::from(t.mid.as_str()), t.track_id.clone());
                }
                let answer = self
                    .subscriber
                    .rtc
                    .sdp_api()
                    .accept_offer(offer)
                    .map_err(|e| ClientError::Rtc(e.to_string()))?;
                self.out_queue.push(ClientMessage::Answer {
                    sdp: answer.to_sdp_string(),
                });
                self.poll(now, false);
            }
            other => {
                let mut s = self.stats.lock().expect("stats lock");
                s.on_message(&other);
            }
        }
        self.notify.send_modify(|n| *n += 1);
        Ok(())
    }
}
