//! Prometheus metrics of a node.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use meridian_media::SfuStats;

/// Bucket bounds of `meridian_forward_latency_seconds`, 10 µs … 50 ms: finest around the
/// 2 ms goal for the latency a node adds (the alert in deploy/helm's rules is p99 > 2 ms),
/// so a p99 on either side of it can be read off the buckets.
const FORWARD_LATENCY_BUCKETS: [f64; 14] = [
    0.000_01, 0.000_02, 0.000_05, 0.000_1, 0.000_2, 0.000_5, 0.001, 0.001_5, 0.002, 0.003, 0.005,
    0.01, 0.02, 0.05,
];

/// Label for dropped datagrams.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why it was dropped.
    pub reason: &'static str,
}

/// Label for signaling errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The wire error code.
    pub code: &'static str,
}

/// Label of the build-info metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    /// The crate version the binary was built from.
    pub version: &'static str,
}

/// Label naming a certificate (`internal_server`, `internal_client`,
/// `internal_client_ca`, `webtransport`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    /// Which certificate.
    pub cert: &'static str,
}

/// Label of an outcome (`ok`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The outcome.
    pub result: &'static str,
}

/// Label of a media worker (`--media-workers`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// The worker's index, from 0.
    pub worker: String,
}

/// Per-worker media metrics (`meridian_media_worker_*{worker}`).
#[derive(Clone, Default)]
pub struct WorkerMetrics {
    /// RTP packets written to subscribers, by worker.
    pub packets_forwarded: Family<WorkerLabel, Counter>,
    /// Participants, by worker.
    pub participants: Family<WorkerLabel, Gauge>,
    /// Rooms, by worker.
    pub rooms: Family<WorkerLabel, Gauge>,
    /// Seconds the worker spent handling wake-ups (not waiting), by worker.
    pub busy_seconds: Family<WorkerLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Datagrams the receiving worker could not hand to their worker (its queue was
    /// full in datagrams or bytes), by the worker they were for.
    pub handoff_dropped: Family<WorkerLabel, Counter>,
    /// The worker's recent busy share, 0..=1 (`crate::overload`), by worker.
    pub load: Family<WorkerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 while the worker is overloaded and refuses fresh joins, by worker.
    pub overloaded: Family<WorkerLabel, Gauge>,
    /// Fresh joins refused because their worker was overloaded, by worker.
    pub joins_refused: Family<WorkerLabel, Counter>,
}

impl WorkerMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "media_worker_packets_forwarded",
            "RTP packets forwarded to subscribers, by media worker",
            self.packets_forwarded.clone(),
        );
        r.register(
            "media_worker_participants",
            "Participants, by media worker",
            self.participants.clone(),
        );
        r.register(
            "media_worker_rooms",
            "Rooms, by media worker",
            self.rooms.clone(),
        );
        r.register(
            "media_worker_busy_seconds",
            "Seconds a media worker spent handling wake-ups, not waiting",
            self.busy_seconds.clone(),
        );
        r.register(
            "media_worker_handoff_dropped",
            "Datagrams dropped because their media worker's queue was full",
            self.handoff_dropped.clone(),
        );
        r.register(
            "media_worker_load",
            "A media worker's busy share over about the last second (0 to 1)",
            self.load.clone(),
        );
        r.register(
            "media_worker_overloaded",
            "1 while a media worker is past [media] overload_busy_share and refuses fresh joins",
            self.overloaded.clone(),
        );
        r.register(
            "media_worker_joins_refused",
            "Fresh joins refused because their media worker was overloaded",
            self.joins_refused.clone(),
        );
    }
}

/// What each media worker reported last (its counters and gauges), so the node-wide
/// metrics are sums over workers.
#[derive(Default)]
struct Observed {
    stats: Vec<SfuStats>,
    /// (participants, rooms, outbound video tracks) per worker.
    gauges: Vec<(usize, usize, usize)>,
}

/// Every metric the node exports; cheap to clone (atomics behind `Arc`s).
#[derive(Clone)]
pub struct Metrics {
    /// RTP packets written to subscribers.
    pub rtp_packets_forwarded: Counter,
    /// RTP packets received from publishers.
    pub rtp_packets_received: Counter,
    /// RTP payload bytes written to subscribers.
    pub rtp_bytes_forwarded: Counter,
    /// Datagrams dropped, by reason.
    pub datagrams_dropped: Family<ReasonLabel, Counter>,
    /// Keyframe requests sent to publishers.
    pub keyframe_requests: Counter,
    /// Simulcast layer switches.
    pub layer_switches: Counter,
    /// ULPFEC payload bytes sent with subscribers' video (`meridian_media::fec`).
    pub fec_bytes: Counter,
    /// Retransmissions sent a second time to lossy subscribers (`meridian_media`'s
    /// `retx`).
    pub rtx_copies: Counter,
    /// Video tracks being forwarded to subscribers (the HPA metric).
    pub outbound_video_tracks: Gauge,
    /// Participants on the node.
    pub participants: Gauge,
    /// Rooms on the node.
    pub rooms: Gauge,
    /// Signaling connections opened (its rate drives KEDA).
    pub signaling_connections: Counter,
    /// Signaling connections open now.
    pub signaling_connections_open: Gauge,
    /// Errors sent to clients, by code.
    pub signaling_errors: Family<CodeLabel, Counter>,
    /// Participants joined.
    pub joins: Counter,
    /// Time from a datagram's arrival to its forwarded copies being sent.
    pub forward_latency: Histogram,
    /// Room events stored in the event log.
    pub events_appended: Counter,
    /// Failed appends to the event log (each is retried).
    pub event_log_errors: Counter,
    /// Appends the log refused because another node took the room over (fencing).
    pub events_fenced: Counter,
    /// Rooms this node took over from a dead node or adopted after a handover.
    pub rooms_taken_over: Counter,
    /// Rooms this node lost (fenced) or handed over (drain).
    pub rooms_released: Counter,
    /// Joins redirected to the node hosting the room.
    pub redirects: Counter,
    /// Participants rebuilt from the log that came back (resume on a new node).
    pub participants_restored: Counter,
    /// Whether this node is draining (1) or serving (0).
    pub draining: Gauge,
    /// Items (room events, client messages) queued in the outbox and not yet handled.
    pub outbox_queue: Gauge,
    /// Sessions closed because their message queue was full (the client did not read).
    pub sessions_too_slow: Counter,
    /// Older sessions replaced by a new join of the same identity in the same room.
    pub sessions_replaced: Counter,
    /// Connections and joins refused by a per-address limit, by `reason`
    /// (`connections_per_ip`, `joins_per_ip`, `internal_connections_per_ip`, and
    /// `node_join_share` / `node_connection_share`: over the address's share of a node
    /// budget).
    pub limit_refusals: Family<ReasonLabel, Counter>,
    /// HTTP connections closed because headers were not sent in time or the
    /// connection stayed idle.
    pub http_timeouts: Counter,
    /// Requests refused for a `Host` or `Origin` that is not one of the node's names.
    pub host_refusals: Counter,
    /// Always 1, labelled with the build's version (`meridian_build_info{version}`).
    pub build_info: Family<VersionLabel, Gauge>,
    /// Locality and egress cost (`crate::locality`).
    pub regions: crate::locality::RegionMetrics,
    /// Logins refused, by token error code.
    pub login_refusals: Family<CodeLabel, Counter>,
    /// Logins answered, by the region chosen.
    pub logins: Family<crate::locality::RegionLabel, Counter>,
    /// Unix time at which each certificate the node uses expires, by `cert`.
    pub certificate_expiry: Family<CertLabel, Gauge>,
    /// Checks of the internal plane's certificate files that loaded a new set (`ok`)
    /// or found one that does not load (`error`, the previous set stays).
    pub certificate_reloads: Family<ResultLabel, Counter>,
    /// Panics in the media loop contained to one participant (which was removed).
    pub media_panics: Counter,
    /// Relay links between nodes (see [`RelayMetrics`]).
    pub relay: RelayMetrics,
    /// Per-worker media metrics.
    pub workers: WorkerMetrics,
    last: std::sync::Arc<std::sync::Mutex<Observed>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            rtp_packets_forwarded: Counter::default(),
            rtp_packets_received: Counter::default(),
            rtp_bytes_forwarded: Counter::default(),
            datagrams_dropped: Family::default(),
            keyframe_requests: Counter::default(),
            layer_switches: Counter::default(),
            fec_bytes: Counter::default(),
            rtx_copies: Counter::default(),
            outbound_video_tracks: Gauge::default(),
            participants: Gauge::default(),
            rooms: Gauge::default(),
            signaling_connections: Counter::default(),
            signaling_connections_open: Gauge::default(),
            signaling_errors: Family::default(),
            joins: Counter::default(),
            forward_latency: Histogram::new(FORWARD_LATENCY_BUCKETS.iter().copied()),
            events_appended: Counter::default(),
            event_log_errors: Counter::default(),
            events_fenced: Counter::default(),
            rooms_taken_over: Counter::default(),
            rooms_released: Counter::default(),
            redirects: Counter::default(),
            participants_restored: Counter::default(),
            draining: Gauge::default(),
            outbox_queue: Gauge::default(),
            sessions_too_slow: Counter::default(),
            sessions_replaced: Counter::default(),
            limit_refusals: Family::default(),
            http_timeouts: Counter::default(),
            host_refusals: Counter::default(),
            build_info: {
                let f: Family<VersionLabel, Gauge> = Family::default();
                f.get_or_create(&VersionLabel {
                    version: env!("CARGO_PKG_VERSION"),
                })
                .set(1);
                f
            },
            regions: Default::default(),
            login_refusals: Family::default(),
            logins: Family::default(),
            certificate_expiry: Family::default(),
            certificate_reloads: Family::default(),
            media_panics: Counter::default(),
            relay: RelayMetrics::default(),
            workers: WorkerMetrics::default(),
            last: Default::default(),
        }
    }
}

impl Metrics {
    /// Counts a connection or join refused by the per-address limit `reason`.
    pub fn limit_refused(&self, reason: &'static str) {
        self.limit_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a login refused with the token error `code`.
    pub(crate) fn login_refused(&self, code: &'static str) {
        self.login_refusals.get_or_create(&CodeLabel { code }).inc();
    }

    /// Counts a login that chose `region`.
    pub(crate) fn login_chosen(&self, region: &str) {
        self.logins
            .get_or_create(&crate::locality::RegionLabel {
                region: region.to_string(),
            })
            .inc();
    }

    /// Sets when certificate `cert` expires (Unix seconds).
    pub fn set_certificate_expiry(&self, cert: &'static str, unix_secs: i64) {
        self.certificate_expiry
            .get_or_create(&CertLabel { cert })
            .set(unix_secs);
    }

    /// Counts a certificate reload check with outcome `result`.
    pub fn certificate_reloaded(&self, result: &'static str) {
        self.certificate_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// A registry holding all of these metrics.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("meridian");
        r.register(
            "rtp_packets_forwarded",
            "RTP packets forwarded to subscribers",
            self.rtp_packets_forwarded.clone(),
        );
        r.register(
            "rtp_packets_received",
            "RTP packets received from publishers",
            self.rtp_packets_received.clone(),
        );
        r.register(
            "rtp_bytes_forwarded",
            "RTP payload bytes forwarded to subscribers",
            self.rtp_bytes_forwarded.clone(),
        );
        r.register(
            "datagrams_dropped",
            "Datagrams dropped, by reason",
            self.datagrams_dropped.clone(),
        );
        r.register(
            "keyframe_requests",
            "Keyframe requests sent to publishers",
            self.keyframe_requests.clone(),
        );
        r.register(
            "layer_switches",
            "Simulcast layer switches",
            self.layer_switches.clone(),
        );
        r.register(
            "fec_bytes",
            "ULPFEC payload bytes sent with subscribers' video",
            self.fec_bytes.clone(),
        );
        r.register(
            "rtx_copies",
            "Retransmissions sent a second time to subscribers on lossy paths",
            self.rtx_copies.clone(),
        );
        r.register(
            "outbound_video_tracks",
            "Video tracks being forwarded to subscribers",
            self.outbound_video_tracks.clone(),
        );
        r.register(
            "participants",
            "Participants on this node",
            self.participants.clone(),
        );
        r.register("rooms", "Rooms on this node", self.rooms.clone());
        r.register(
            "events_fenced",
            "Appends refused because another node took the room over",
            self.events_fenced.clone(),
        );
        r.register(
            "rooms_taken_over",
            "Rooms taken over from a dead node or adopted after a handover",
            self.rooms_taken_over.clone(),
        );
        r.register(
            "rooms_released",
            "Rooms lost to another node or handed over",
            self.rooms_released.clone(),
        );
        r.register(
            "redirects",
            "Joins redirected to the node hosting the room",
            self.redirects.clone(),
        );
        r.register(
            "participants_restored",
            "Participants rebuilt from the log that resumed on this node",
            self.participants_restored.clone(),
        );
        r.register("draining", "1 while the node drains", self.draining.clone());
        r.register(
            "outbox_queue",
            "Room events and client messages queued in the outbox",
            self.outbox_queue.clone(),
        );
        r.register(
            "limit_refusals",
            "Connections and joins refused by a per-address limit",
            self.limit_refusals.clone(),
        );
        r.register(
            "http_timeouts",
            "HTTP connections closed for a header-read or idle timeout",
            self.http_timeouts.clone(),
        );
        r.register(
            "host_refusals",
            "Requests refused for a Host or Origin not among the node's names",
            self.host_refusals.clone(),
        );
        r.register(
            "sessions_too_slow",
            "Sessions closed because they did not read their messages",
            self.sessions_too_slow.clone(),
        );
        r.register(
            "sessions_replaced",
            "Sessions replaced by a newer join of the same identity",
            self.sessions_replaced.clone(),
        );
        r.register(
            "certificate_expiry_seconds",
            "Unix time at which each certificate the node uses expires",
            self.certificate_expiry.clone(),
        );
        r.register(
            "certificate_reloads",
            "Reloads of the internal plane's certificate files, by result",
            self.certificate_reloads.clone(),
        );
        r.register(
            "media_panics",
            "Panics in the media loop contained to one participant",
            self.media_panics.clone(),
        );
        r.register(
            "build_info",
            "Always 1; the version label names the build",
            self.build_info.clone(),
        );
        self.relay.register(&mut r);
        r.register(
            "signaling_connections",
            "Signaling connections opened",
            self.signaling_connections.clone(),
        );
        r.register(
            "signaling_connections_open",
            "Signaling connections open now",
            self.signaling_connections_open.clone(),
        );
        r.register(
            "signaling_errors",
            "Errors sent to clients, by code",
            self.signaling_errors.clone(),
        );
        r.register("joins", "Participants joined", self.joins.clone());
        self.regions.register(&mut r);
        r.register(
            "login_refusals",
            "Logins refused, by token error code",
            self.login_refusals.clone(),
        );
        r.register(
            "logins",
            "Logins answered, by the region chosen",
            self.logins.clone(),
        );
        r.register(
            "events_appended",
            "Room events stored in the event log",
            self.events_appended.clone(),
        );
        r.register(
            "event_log_errors",
            "Failed appends to the event log (each is retried)",
            self.event_log_errors.clone(),
        );
        r.register(
            "forward_latency_seconds",
            "Time from a datagram's arrival to its forwarded copies being sent",
            self.forward_latency.clone(),
        );
        self.workers.register(&mut r);
        r
    }

    /// Adds the growth of media worker `worker`'s core counters since its last call;
    /// the node-wide gauges are the sums of every worker's latest figures.
    pub(crate) fn observe(
        &self,
        worker: usize,
        s: &SfuStats,
        participants: usize,
        rooms: usize,
        video: usize,
    ) {
        let mut observed = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if observed.stats.len() <= worker {
            observed.stats.resize_with(worker + 1, SfuStats::default);
            observed.gauges.resize(worker + 1, (0, 0, 0));
        }
        let last = &observed.stats[worker];
        let label = WorkerLabel {
            worker: worker.to_string(),
        };
        let forwarded = s.rtp_packets_forwarded - last.rtp_packets_forwarded;
        self.rtp_packets_forwarded.inc_by(forwarded);
        self.workers
            .packets_forwarded
            .get_or_create(&label)
            .inc_by(forwarded);
        self.rtp_packets_received
            .inc_by(s.rtp_packets_in - last.rtp_packets_in);
        self.rtp_bytes_forwarded
            .inc_by(s.rtp_bytes_forwarded - last.rtp_bytes_forwarded);
        // Relay links' bytes are counted by the relay driver, by the region they go to.
        self.regions.client_egress(
            (s.rtp_bytes_forwarded - last.rtp_bytes_forwarded)
                .saturating_sub(s.rtp_bytes_relayed - last.rtp_bytes_relayed),
        );
        for (reason, now, before) in [
            ("unrouted", s.datagrams_unrouted, last.datagrams_unrouted),
            ("malformed", s.datagrams_malformed, last.datagrams_malformed),
            ("rejected", s.datagrams_rejected, last.datagrams_rejected),
            ("red_malformed", s.red_malformed, last.red_malformed),
        ] {
            self.datagrams_dropped
                .get_or_create(&ReasonLabel { reason })
                .inc_by(now - before);
        }
        self.keyframe_requests
            .inc_by(s.keyframe_requests - last.keyframe_requests);
        self.layer_switches
            .inc_by(s.layer_switches - last.layer_switches);
        self.fec_bytes.inc_by(s.fec_bytes - last.fec_bytes);
        self.rtx_copies.inc_by(s.rtx_copies - last.rtx_copies);
        observed.stats[worker] = s.clone();
        observed.gauges[worker] = (participants, rooms, video);
        self.workers
            .participants
            .get_or_create(&label)
            .set(participants as i64);
        self.workers.rooms.get_or_create(&label).set(rooms as i64);
        let sum = observed
            .gauges
            .iter()
            .fold((0, 0, 0), |a, g| (a.0 + g.0, a.1 + g.1, a.2 + g.2));
        self.participants.set(sum.0 as i64);
        self.rooms.set(sum.1 as i64);
        self.outbound_video_tracks.set(sum.2 as i64);
    }

    /// Renders the Prometheus text format.
    pub fn render(&self, registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Labels of one side of a relay link.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabel {
    /// `out` (this node sends) or `in` (this node receives).
    pub direction: &'static str,
    /// The other node.
    pub peer: String,
}

/// Labels of the packets one outbound relay link sent per simulcast layer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabel {
    /// The node receiving.
    pub peer: String,
    /// `low`, `medium` or `high` (audio and single-stream video count as `low`).
    pub layer: &'static str,
}

/// Label of a room part.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartLabel {
    /// The room part (`room` or `room~node`).
    pub part: String,
}

/// Metrics of the relay links between nodes and of the room parts on this node.
#[derive(Clone, Default)]
pub struct RelayMetrics {
    /// RTP packets sent (`out`) or received (`in`) over relay links, per peer node:
    /// one copy of each relayed track's packets per link.
    pub packets: Family<LinkLabel, Counter>,
    /// Tracks each relay link carries now.
    pub tracks: Family<LinkLabel, Gauge>,
    /// RTP packets sent over outbound relay links per simulcast layer.
    pub layer_packets: Family<LayerLabel, Counter>,
    /// Relay control requests refused, by `reason` (the error code answered).
    pub refused: Family<ReasonLabel, Counter>,
    /// Relay control requests to other nodes that failed.
    pub peer_errors: Counter,
    /// Participants in each room part hosted here.
    pub part_participants: Family<PartLabel, Gauge>,
    last: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<LinkLabel, [u64; 4]>>>,
    parts: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl RelayMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "relay_packets",
            "RTP packets over relay links, by direction and peer node",
            self.packets.clone(),
        );
        r.register(
            "relay_tracks",
            "Tracks a relay link carries, by direction and peer node",
            self.tracks.clone(),
        );
        r.register(
            "relay_layer_packets",
            "RTP packets sent over relay links, by peer node and simulcast layer",
            self.layer_packets.clone(),
        );
        r.register(
            "relay_refused",
            "Relay control requests refused, by reason",
            self.refused.clone(),
        );
        r.register(
            "relay_peer_errors",
            "Relay control requests to other nodes that failed",
            self.peer_errors.clone(),
        );
        r.register(
            "room_part_participants",
            "Participants in each room part hosted by this node",
            self.part_participants.clone(),
        );
    }

    /// Takes the media core's relay counters (cumulative per link; a link that was
    /// rebuilt starts again from zero) and the participants per room part.
    pub(crate) fn observe(&self, links: &[meridian_media::RelayStats], parts: &[(String, usize)]) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = Vec::new();
        for l in links {
            let label = LinkLabel {
                direction: if l.inbound { "in" } else { "out" },
                peer: l.peer.clone(),
            };
            let now = [
                l.packets,
                l.packets_by_layer[0],
                l.packets_by_layer[1],
                l.packets_by_layer[2],
            ];
            let before = last.get(&label).copied().unwrap_or_default();
            // A rebuilt link counts from zero again.
            let rebuilt = now.iter().zip(&before).any(|(n, b)| n < b);
            let delta = |i: usize| if rebuilt { now[i] } else { now[i] - before[i] };
            self.packets.get_or_create(&label).inc_by(delta(0));
            if !l.inbound {
                for (i, layer) in ["low", "medium", "high"].into_iter().enumerate() {
                    self.layer_packets
                        .get_or_create(&LayerLabel {
                            peer: l.peer.clone(),
                            layer,
                        })
                        .inc_by(delta(i + 1));
                }
            }
            self.tracks.get_or_create(&label).set(l.tracks as i64);
            last.insert(label.clone(), now);
            seen.push(label);
        }
        last.retain(|label, _| {
            let keep = seen.contains(label);
            if !keep {
                self.tracks.get_or_create(label).set(0);
            }
            keep
        });
        let mut known = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        for old in known.iter() {
            if !parts.iter().any(|(p, _)| p == old) {
                self.part_participants
                    .remove(&PartLabel { part: old.clone() });
            }
        }
        *known = parts.iter().map(|(p, _)| p.clone()).collect();
        for (part, n) in parts {
            self.part_participants
                .get_or_create(&PartLabel { part: part.clone() })
                .set(*n as i64);
        }
    }
}
