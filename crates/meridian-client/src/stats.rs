//! What a client measured.

use std::collections::HashMap;
use std::time::Instant;

use meridian_protocol::{Layer, ServerMessage, TrackInfo};

use crate::media::{FrameHeader, now_micros};

/// Most latency and jitter samples kept per track.
const MAX_SAMPLES: usize = 20_000;

/// Most reconnection records kept (the counters go on counting).
pub const MAX_RECONNECT_RECORDS: usize = 1_000;

/// Why the client considered its node lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// The signaling connection closed without `left`.
    Closed,
    /// The signaling connection failed (read or write error, or a write that hung).
    Failed,
    /// The node sent `migrate` (or `redirect` while connected).
    Migrate,
    /// Nothing from the node for the policy's `ping_timeout`.
    PingTimeout,
}

/// How the client got back into the room after a loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejoinKind {
    /// `joined{restored: false}`: the node still had the participant; the peer
    /// connections were kept.
    Resumed,
    /// `joined{restored: true}`: a node rebuilt the participant from the event log;
    /// new peer connections, publications re-announced with their earlier track ids.
    Restored,
    /// The resume token was refused (`resume_failed`): joined again as a new
    /// participant with new peer connections.
    Fresh,
}

/// One loss of the node and what followed.
#[derive(Clone, Debug, PartialEq)]
pub struct ReconnectRecord {
    /// Why the node counted as lost.
    pub reason: LossReason,
    /// When the loss was detected.
    pub lost_at: Instant,
    /// Signaling URL that was lost.
    pub from_url: String,
    /// Signaling URL the client joined again at (`None` until it did).
    pub to_url: Option<String>,
    /// How the client got back (`None` until `joined`).
    pub kind: Option<RejoinKind>,
    /// Connection attempts made (1 when the first attempt succeeded).
    pub attempts: u32,
    /// Time from detecting the loss to `joined`, ms.
    pub joined_ms: Option<f64>,
    /// Time from detecting the loss to the first media frame received after that
    /// `joined` (any track), ms; stays `None` for a client that receives nothing.
    pub media_ms: Option<f64>,
    /// The region joined again, when the client re-homed to another region.
    pub rehomed_to: Option<String>,
}

/// Per received track.
#[derive(Clone, Debug, Default)]
pub struct TrackStats {
    /// Frames received.
    pub frames: u64,
    /// Keyframes received.
    pub keyframes: u64,
    /// Frames missing between received ones (by frame counter).
    pub frames_missing: u64,
    /// Video frame gaps long enough to count as a freeze.
    pub freezes: u64,
    /// Times the jitter buffer gave up a frame at its deadline
    /// (`ClientConfig::playout_deadline`).
    pub skips: u64,
    /// Keyframes the jitter buffer asked for after a skip.
    pub keyframes_requested: u64,
    /// Video frames played after a skipped frame and before the next keyframe: a real
    /// decoder could not decode them (they reference the lost frame).
    pub frames_missing_reference: u64,
    /// Audio packets the jitter buffer recovered from RED before they were missed.
    pub red_recovered: u64,
    /// Video packets rebuilt from the node's ULPFEC (RTP mode with `fec`).
    pub fec_recovered: u64,
    /// RTP packets received (from str0m's ingress stats).
    pub packets: u64,
    /// Loss fraction reported by str0m, if known.
    pub loss: Option<f64>,
    /// Payload bytes received.
    pub bytes: u64,
    /// Whether the track is video.
    pub video: bool,
    /// Simulcast layer of the last frame.
    pub last_layer: Option<u8>,
    /// Layers seen, in order of change.
    pub layer_history: Vec<u8>,
    /// One-way frame latency samples, ms: the publisher's frame time to playout.
    pub latency_ms: Vec<f64>,
    /// Per played frame (jitter-buffer playout only), the one-way latency of the
    /// frame's first packet to arrive, ms (same clock as `latency_ms`): with
    /// `last_packet_ms` and `latency_ms` it splits a frame's latency into path,
    /// frame spread and playout.
    pub first_packet_ms: Vec<f64>,
    /// Per played frame (jitter-buffer playout only), the one-way latency of the
    /// frame's last packet to arrive (the frame was complete then), ms.
    pub last_packet_ms: Vec<f64>,
    /// Interarrival jitter samples (RFC 3550 estimator), ms.
    pub jitter_ms: Vec<f64>,
    last_seq: Option<u64>,
    last_arrival: Option<Instant>,
    last_sent: Option<u64>,
    jitter: f64,
}

/// Everything a client measured.
#[derive(Clone, Debug, Default)]
pub struct ClientStats {
    /// Participant id from `joined`.
    pub participant_id: String,
    /// Time from opening signaling to `joined`, ms.
    pub join_ms: f64,
    /// Time from opening signaling to the first video frame received, ms.
    pub first_frame_ms: Option<f64>,
    /// Publisher connection completed ICE and DTLS.
    pub publisher_connected: bool,
    /// Subscriber connection completed ICE and DTLS.
    pub subscriber_connected: bool,
    /// Tracks the node assigned to this client's publications.
    pub published: Vec<TrackInfo>,
    /// Received tracks by track id.
    pub tracks: HashMap<String, TrackStats>,
    /// Tracks announced in the room (by anyone else).
    pub room_tracks: Vec<String>,
    /// Participants seen joining after this client.
    pub participants_joined: Vec<String>,
    /// Participants seen leaving.
    pub participants_left: Vec<String>,
    /// Identity and display name of each participant seen joining, by participant id
    /// (the latest announcement of each).
    pub participant_names: HashMap<String, (String, Option<String>)>,
    /// Layer the node says it forwards, per track.
    pub layers: HashMap<String, Option<Layer>>,
    /// Error codes the node sent.
    pub errors: Vec<String>,
    /// Keyframe requests received from the node.
    pub keyframe_requests: u64,
    /// Publisher: per video frame and layer, the time from the frame's write to
    /// handing its last packet (RTP marker) to the socket, ms: what the publisher's
    /// own connection and task add to a frame's latency.
    pub frame_sent_ms: Vec<f64>,
    /// Signaling URL the client is connected (or last connected) to.
    pub url: String,
    /// Losses of the node detected (closed, failed, `migrate`, ping timeout).
    pub losses: u64,
    /// Successful reconnections of every kind (`joined` again after a loss):
    /// `reconnects = resumed + restored_resumes + fresh_rejoins`.
    pub reconnects: u64,
    /// Reconnections the node answered with `joined{restored: true}`.
    pub restored_resumes: u64,
    /// Reconnections that fell back to a fresh join after `resume_failed`.
    pub fresh_rejoins: u64,
    /// Connection attempts made while reconnecting (successful or not).
    pub reconnect_attempts: u64,
    /// `redirect`s followed (first join and reconnections).
    pub redirects: u64,
    /// One record per loss, oldest first; the first [`MAX_RECONNECT_RECORDS`] only.
    pub reconnect_history: Vec<ReconnectRecord>,
    /// When the last media frame (any track) was received.
    pub last_frame_at: Option<Instant>,
    /// Packets counted without decrypting (`ClientConfig::count_only`).
    pub counted: crate::CountStats,
    /// The region serving the client (with [`ClientConfig::regions`](crate::ClientConfig::regions)).
    pub region: Option<String>,
    /// Reconnections that re-homed the client to another region.
    pub rehomes: u64,
    /// ICE restarts the client started (a media path died while signaling stayed up;
    /// see [`IceRestartPolicy`](crate::IceRestartPolicy)), both connections counted.
    pub ice_restarts: u64,
}

impl ClientStats {
    /// Video tracks that delivered at least `frames` frames.
    pub fn video_tracks_with(&self, frames: u64) -> usize {
        self.tracks
            .values()
            .filter(|t| t.video && t.frames >= frames)
            .count()
    }

    /// Video frames received over all tracks.
    pub fn video_frames(&self) -> u64 {
        self.tracks
            .values()
            .filter(|t| t.video)
            .map(|t| t.frames)
            .sum()
    }

    /// Audio tracks that delivered at least `frames` frames.
    pub fn audio_tracks_with(&self, frames: u64) -> usize {
        self.tracks
            .values()
            .filter(|t| !t.video && t.frames >= frames)
            .count()
    }

    /// Whether a media frame (any track) arrived after `t`.
    pub fn received_media_after(&self, t: Instant) -> bool {
        self.last_frame_at.is_some_and(|l| l > t)
    }

    /// Loss → `joined` times of the finished reconnections, ms.
    pub fn loss_to_joined_ms(&self) -> Vec<f64> {
        self.reconnect_history
            .iter()
            .filter_map(|r| r.joined_ms)
            .collect()
    }

    /// Loss → first media frame times of the reconnections after which media arrived, ms.
    pub fn loss_to_media_ms(&self) -> Vec<f64> {
        self.reconnect_history
            .iter()
            .filter_map(|r| r.media_ms)
            .collect()
    }

    /// The client is currently between a loss and the next `joined`.
    pub fn reconnecting(&self) -> bool {
        self.losses > self.reconnects
    }

    /// What was measured after `earlier` (a snapshot of the same client): counters
    /// become differences and sample lists keep only the newer samples (reconnection
    /// records: those that started after `earlier`, or were unfinished in it).
    pub fn since(&self, earlier: &ClientStats) -> ClientStats {
        let mut out = self.clone();
        out.counted = self.counted.since(&earlier.counted);
        out.frame_sent_ms
            .drain(..earlier.frame_sent_ms.len().min(out.frame_sent_ms.len()));
        out.losses -= earlier.losses.min(out.losses);
        out.reconnects -= earlier.reconnects.min(out.reconnects);
        out.restored_resumes -= earlier.restored_resumes.min(out.restored_resumes);
        out.fresh_rejoins -= earlier.fresh_rejoins.min(out.fresh_rejoins);
        out.reconnect_attempts -= earlier.reconnect_attempts.min(out.reconnect_attempts);
        out.redirects -= earlier.redirects.min(out.redirects);
        out.ice_restarts -= earlier.ice_restarts.min(out.ice_restarts);
        let unfinished = earlier
            .reconnect_history
            .last()
            .is_some_and(|r| r.joined_ms.is_none());
        let skip = earlier.reconnect_history.len() - usize::from(unfinished);
        out.reconnect_history
            .drain(..skip.min(out.reconnect_history.len()));
        for (id, t) in out.tracks.iter_mut() {
            let Some(e) = earlier.tracks.get(id) else {
                continue;
            };
            t.frames -= e.frames.min(t.frames);
            t.keyframes -= e.keyframes.min(t.keyframes);
            t.frames_missing -= e.frames_missing.min(t.frames_missing);
            t.freezes -= e.freezes.min(t.freezes);
            t.skips -= e.skips.min(t.skips);
            t.red_recovered -= e.red_recovered.min(t.red_recovered);
            t.fec_recovered -= e.fec_recovered.min(t.fec_recovered);
            t.keyframes_requested -= e.keyframes_requested.min(t.keyframes_requested);
            t.frames_missing_reference -=
                e.frames_missing_reference.min(t.frames_missing_reference);
            t.packets -= e.packets.min(t.packets);
            t.bytes -= e.bytes.min(t.bytes);
            t.latency_ms
                .drain(..e.latency_ms.len().min(t.latency_ms.len()));
            t.first_packet_ms
                .drain(..e.first_packet_ms.len().min(t.first_packet_ms.len()));
            t.last_packet_ms
                .drain(..e.last_packet_ms.len().min(t.last_packet_ms.len()));
            t.jitter_ms
                .drain(..e.jitter_ms.len().min(t.jitter_ms.len()));
        }
        out
    }

    pub(crate) fn on_frame(
        &mut self,
        track: &str,
        video: bool,
        data: &[u8],
        now: Instant,
        since_start_ms: f64,
        arrivals: Option<(Instant, Instant)>,
    ) {
        self.last_frame_at = Some(now);
        if let Some(r) = self.reconnect_history.last_mut()
            && r.joined_ms.is_some()
            && r.media_ms.is_none()
        {
            r.media_ms = Some(now.saturating_duration_since(r.lost_at).as_secs_f64() * 1000.0);
        }
        if video && self.first_frame_ms.is_none() {
            self.first_frame_ms = Some(since_start_ms);
        }
        let t = self.tracks.entry(track.to_string()).or_default();
        t.video = video;
        t.frames += 1;
        t.bytes += data.len() as u64;
        let Some(h) = FrameHeader::parse(data) else {
            return;
        };
        if h.keyframe && video {
            t.keyframes += 1;
        }
        if t.last_layer != Some(h.layer) {
            t.layer_history.push(h.layer);
            t.last_layer = Some(h.layer);
        }
        if let Some(last) = t.last_seq
            && h.seq > last + 1
        {
            t.frames_missing += h.seq - last - 1;
        }
        if t.last_seq.is_none_or(|l| h.seq > l) {
            t.last_seq = Some(h.seq);
        }
        let latency = now_micros().saturating_sub(h.sent_micros) as f64 / 1000.0;
        if t.latency_ms.len() < MAX_SAMPLES {
            t.latency_ms.push(latency);
            if let Some((first, last)) = arrivals {
                let before = |at: Instant| now.saturating_duration_since(at).as_secs_f64() * 1000.0;
                t.first_packet_ms.push(latency - before(first));
                t.last_packet_ms.push(latency - before(last));
            }
        }
        if let (Some(prev_arrival), Some(prev_sent)) = (t.last_arrival, t.last_sent) {
            let arrival_ms = now.saturating_duration_since(prev_arrival).as_secs_f64() * 1000.0;
            let sent_ms = (h.sent_micros as f64 - prev_sent as f64) / 1000.0;
            let d = (arrival_ms - sent_ms).abs();
            t.jitter += (d - t.jitter) / 16.0;
            if t.jitter_ms.len() < MAX_SAMPLES {
                t.jitter_ms.push(t.jitter);
            }
            // A freeze: a video gap over max(3 × 33 ms, 33 ms + 150 ms).
            if video && arrival_ms > 183.0 {
                t.freezes += 1;
            }
        }
        t.last_arrival = Some(now);
        t.last_sent = Some(h.sent_micros);
    }

    /// Publisher: a video frame's last packet left `ms` after the frame was written.
    pub(crate) fn on_frame_sent(&mut self, ms: f64) {
        if self.frame_sent_ms.len() < MAX_SAMPLES {
            self.frame_sent_ms.push(ms);
        }
    }

    pub(crate) fn on_message(&mut self, msg: &ServerMessage) {
        match msg {
            ServerMessage::TrackPublished { track } => {
                self.room_tracks.push(track.track_id.clone())
            }
            ServerMessage::ParticipantJoined { participant } => {
                self.participants_joined
                    .push(participant.participant_id.clone());
                // Bounded like the other records: the first names seen are kept.
                if self.participant_names.len() < MAX_SAMPLES
                    || self
                        .participant_names
                        .contains_key(&participant.participant_id)
                {
                    self.participant_names.insert(
                        participant.participant_id.clone(),
                        (participant.identity.clone(), participant.name.clone()),
                    );
                }
            }
            ServerMessage::ParticipantLeft { participant_id } => {
                self.participants_left.push(participant_id.clone())
            }
            ServerMessage::LayerChanged { track_id, layer } => {
                self.layers.insert(track_id.clone(), *layer);
            }
            ServerMessage::Error { code, .. } => self.errors.push(code.as_str().to_string()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(lost_at: Instant, joined: Option<f64>, media: Option<f64>) -> ReconnectRecord {
        ReconnectRecord {
            reason: LossReason::Closed,
            lost_at,
            from_url: "a".into(),
            to_url: None,
            kind: None,
            attempts: 1,
            joined_ms: joined,
            media_ms: media,
            rehomed_to: None,
        }
    }

    #[test]
    fn reconnection_figures_and_since() {
        let t0 = Instant::now();
        let mut earlier = ClientStats {
            losses: 2,
            reconnects: 1,
            reconnect_attempts: 3,
            reconnect_history: vec![record(t0, Some(10.0), Some(20.0)), record(t0, None, None)],
            ..Default::default()
        };
        assert!(earlier.reconnecting());
        let mut now = earlier.clone();
        now.reconnects = 3;
        now.losses = 3;
        now.reconnect_history[1].joined_ms = Some(30.0);
        now.reconnect_history.push(record(t0, Some(5.0), Some(7.0)));
        assert!(!now.reconnecting());
        assert_eq!(now.loss_to_joined_ms(), [10.0, 30.0, 5.0]);
        assert_eq!(now.loss_to_media_ms(), [20.0, 7.0]);
        let d = now.since(&earlier);
        assert_eq!((d.losses, d.reconnects, d.reconnect_attempts), (1, 2, 0));
        assert_eq!(
            d.loss_to_joined_ms(),
            [30.0, 5.0],
            "the unfinished one stays"
        );
        earlier.reconnect_history.clear();
        assert_eq!(now.since(&earlier).reconnect_history.len(), 3);
        assert!(!now.received_media_after(t0));
        now.last_frame_at = Some(t0 + Duration::from_millis(1));
        assert!(now.received_media_after(t0));
        assert!(!now.received_media_after(t0 + Duration::from_secs(1)));
    }
}
