//! What a client measured.

use std::collections::HashMap;
use std::time::Instant;

use meridian_protocol::{Layer, ServerMessage, TrackInfo};
use str0m::media::MediaData;

use crate::media::{FrameHeader, now_micros};

/// Most latency and jitter samples kept per track.
const MAX_SAMPLES: usize = 20_000;

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
    /// One-way frame latency samples, ms.
    pub latency_ms: Vec<f64>,
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
    /// Layer the node says it forwards, per track.
    pub layers: HashMap<String, Option<Layer>>,
    /// Error codes the node sent.
    pub errors: Vec<String>,
    /// Keyframe requests received from the node.
    pub keyframe_requests: u64,
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

    /// What was measured after `earlier` (a snapshot of the same client): counters
    /// become differences and sample lists keep only the newer samples.
    pub fn since(&self, earlier: &ClientStats) -> ClientStats {
        let mut out = self.clone();
        for (id, t) in out.tracks.iter_mut() {
            let Some(e) = earlier.tracks.get(id) else {
                continue;
            };
            t.frames -= e.frames.min(t.frames);
            t.keyframes -= e.keyframes.min(t.keyframes);
            t.frames_missing -= e.frames_missing.min(t.frames_missing);
            t.freezes -= e.freezes.min(t.freezes);
            t.packets -= e.packets.min(t.packets);
            t.bytes -= e.bytes.min(t.bytes);
            t.latency_ms
                .drain(..e.latency_ms.len().min(t.latency_ms.len()));
            t.jitter_ms
                .drain(..e.jitter_ms.len().min(t.jitter_ms.len()));
        }
        out
    }

    pub(crate) fn on_frame(
        &mut self,
        track: &str,
        data: &MediaData,
        now: Instant,
        since_start_ms: f64,
    ) {
        let video = data.params.spec().codec.is_video();
        if video && self.first_frame_ms.is_none() {
            self.first_frame_ms = Some(since_start_ms);
        }
        let t = self.tracks.entry(track.to_string()).or_default();
        t.video = video;
        t.frames += 1;
        t.bytes += data.data.len() as u64;
        let Some(h) = FrameHeader::parse(&data.data) else {
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

    pub(crate) fn on_message(&mut self, msg: &ServerMessage) {
        match msg {
            ServerMessage::TrackPublished { track } => {
                self.room_tracks.push(track.track_id.clone())
            }
            ServerMessage::ParticipantJoined { participant } => self
                .participants_joined
                .push(participant.participant_id.clone()),
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
