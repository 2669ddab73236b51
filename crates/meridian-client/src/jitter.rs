//! A receiver's jitter buffer with a playout deadline, like a browser's.
//!
//! RTP packets of one received stream go in (any order, duplicates and retransmissions
//! included); whole frames come out in sequence order as soon as they are complete. A
//! frame that is still incomplete `deadline` after the buffer first held a packet at
//! or after it (that is, after the loss became visible) is **skipped**: the buffer
//! moves on to the next frame start, later frames are not held behind it, and — for
//! video, whose later frames reference the lost one — it asks for a keyframe
//! ([`Played::Skipped::keyframe_wanted`]) and marks the frames played before the next
//! keyframe as played with a missing reference.
//!
//! Sans-IO: [`JitterBuffer::insert`] and [`JitterBuffer::poll`] take the time, and
//! [`JitterBuffer::poll_timeout`] says when the next deadline falls.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Most packets held per stream; beyond it the oldest frame is skipped.
const MAX_PACKETS: usize = 2_048;
/// Packets this far behind the playout point are dropped as stale.
const MAX_BEHIND: u64 = 1 << 15;
/// Least time between two keyframe requests of one stream.
const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(300);

/// One received RTP packet, reduced to what frame assembly needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Extended sequence number (no wrap).
    pub seq: u64,
    /// RTP timestamp (all packets of a frame share it).
    pub timestamp: u64,
    /// The RTP marker bit: the frame's last packet (video).
    pub marker: bool,
    /// The packet starts a frame (VP8: S bit with partition 0; audio: always).
    pub frame_start: bool,
    /// The frame is a keyframe (read from its first packet).
    pub keyframe: bool,
    /// Codec payload without the payload descriptor.
    pub payload: Vec<u8>,
}

/// What the buffer plays out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Played {
    /// A complete frame, in sequence order.
    Frame {
        /// The frame's payload (the packets' payloads concatenated).
        data: Vec<u8>,
        /// Whether it is a keyframe.
        keyframe: bool,
        /// A frame it depends on was skipped and no keyframe has come since (video).
        missing_reference: bool,
        /// When the frame's first packet to arrive was inserted.
        first_arrival: Instant,
        /// When its last packet to arrive was inserted (the frame was complete then).
        last_arrival: Instant,
    },
    /// Frames that missed their deadline were given up.
    Skipped {
        /// Packets dropped with them.
        packets: usize,
        /// The caller should ask the sender for a keyframe now.
        keyframe_wanted: bool,
    },
}

/// A jitter buffer for one stream ([module docs](self)).
#[derive(Debug)]
pub struct JitterBuffer {
    video: bool,
    deadline: Duration,
    packets: BTreeMap<u64, (Packet, Instant)>,
    /// First sequence number not yet played or skipped (`None` before the first frame
    /// start).
    next: Option<u64>,
    /// Packets below this were played or given up.
    floor: u64,
    /// A frame has been played (before that, playout waits for a keyframe).
    started: bool,
    /// A frame was skipped and no keyframe has been played since.
    broken: bool,
    last_keyframe_request: Option<Instant>,
    /// Sequence numbers that carry no media (FEC packets), skipped by playout.
    padding: std::collections::BTreeSet<u64>,
}

impl JitterBuffer {
    /// A buffer for a video (frames of several packets, keyframes) or audio stream
    /// that gives an incomplete frame `deadline` before skipping it.
    pub fn new(video: bool, deadline: Duration) -> JitterBuffer {
        JitterBuffer {
            video,
            deadline,
            packets: BTreeMap::new(),
            next: None,
            floor: 0,
            started: false,
            broken: false,
            last_keyframe_request: None,
            padding: Default::default(),
        }
    }

    /// Marks a sequence number that carries no media (a FEC packet between frames):
    /// playout steps over it instead of waiting for it.
    pub fn insert_padding(&mut self, seq: u64) {
        if seq < self.floor || self.padding.len() >= MAX_PACKETS {
            return;
        }
        self.padding.insert(seq);
    }

    /// Takes a received packet; returns false for a late, duplicate or stale one,
    /// which is ignored.
    pub fn insert(&mut self, now: Instant, mut packet: Packet) -> bool {
        if !self.video {
            packet.frame_start = true;
            packet.marker = true;
        }
        if packet.seq < self.floor || self.packets.contains_key(&packet.seq) {
            return false;
        }
        if self.started && packet.seq - self.floor > MAX_BEHIND {
            // A jump far ahead (a new source or a long outage): start over there.
            self.packets.clear();
            self.next = None;
            self.floor = packet.seq;
        }
        if self.packets.len() >= MAX_PACKETS {
            // Bounded: give up the oldest frame as if its deadline had passed.
            if let Some((&first, _)) = self.packets.iter().next() {
                self.next = Some(first);
            }
            self.skip_head();
        }
        self.packets.insert(packet.seq, (packet, now));
        true
    }

    /// When [`JitterBuffer::poll`] next has something to do without new packets:
    /// the head frame's deadline, if it is waiting.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.waiting_since().map(|t| t + self.deadline)
    }

    /// The next frame or skip due at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Played> {
        if self.next.is_none() {
            // Wait for a frame start (for video, a keyframe) to begin with.
            let start = self
                .packets
                .values()
                .find(|(p, _)| p.frame_start && (p.keyframe || !self.video || self.started))
                .map(|(p, _)| p.seq)?;
            self.packets = self.packets.split_off(&start);
            self.next = Some(start);
            self.floor = start;
        }
        let next = self.next?;
        if let Some(frame) = self.complete_frame(next) {
            return Some(frame);
        }
        let since = self.waiting_since()?;
        if now < since + self.deadline {
            return None;
        }
        let packets = self.skip_head();
        let keyframe_wanted = self.video
            && self
                .last_keyframe_request
                .is_none_or(|t| now >= t + KEYFRAME_REQUEST_INTERVAL);
        if keyframe_wanted {
            self.last_keyframe_request = Some(now);
        }
        Some(Played::Skipped {
            packets,
            keyframe_wanted,
        })
    }

    /// Plays the frame starting at `next` if all its packets are here.
    fn complete_frame(&mut self, mut next: u64) -> Option<Played> {
        while self.padding.remove(&next) {
            next += 1;
            self.next = Some(next);
            self.floor = next;
        }
        self.padding = self.padding.split_off(&next);
        let (first, first_at) = self.packets.get(&next)?;
        if !first.frame_start {
            return None;
        }
        let (mut first_arrival, mut last_arrival) = (*first_at, *first_at);
        let mut end = next;
        loop {
            let (p, at) = self.packets.get(&end)?;
            first_arrival = first_arrival.min(*at);
            last_arrival = last_arrival.max(*at);
            if p.timestamp != first.timestamp {
                // A new frame began without the marker: the last packet is missing.
                return None;
            }
            if p.marker {
                break;
            }
            end += 1;
        }
        let keyframe = first.keyframe;
        let mut data = Vec::new();
        for seq in next..=end {
            if let Some((p, _)) = self.packets.remove(&seq) {
                data.extend_from_slice(&p.payload);
            }
        }
        self.next = Some(end + 1);
        self.floor = end + 1;
        self.started = true;
        if keyframe {
            self.broken = false;
        }
        Some(Played::Frame {
            data,
            keyframe,
            missing_reference: self.video && self.broken,
            first_arrival,
            last_arrival,
        })
    }

    /// When the head frame started waiting: the earliest arrival of a packet at or
    /// after the playout point (`None` when nothing is held).
    fn waiting_since(&self) -> Option<Instant> {
        let next = self.next?;
        self.packets.range(next..).map(|(_, (_, at))| *at).min()
    }

    /// Drops the head frame (and everything up to the next frame start after it).
    /// Returns how many packets were dropped.
    fn skip_head(&mut self) -> usize {
        let Some(next) = self.next else {
            return 0;
        };
        // The next frame start after the head frame's own start.
        let restart = self
            .packets
            .range(next + 1..)
            .find(|(_, (p, _))| p.frame_start)
            .map(|(seq, _)| *seq);
        let keep = match restart {
            Some(seq) => self.packets.split_off(&seq),
            None => BTreeMap::new(),
        };
        let dropped = self.packets.len();
        let past = self.packets.keys().next_back().map_or(next, |s| s + 1);
        self.packets = keep;
        // With no later frame start yet, later packets decide where playout resumes.
        self.next = restart;
        self.floor = restart.unwrap_or(past).max(self.floor);
        if self.video {
            self.broken = true;
        }
        dropped
    }
}

/// Reads a VP8 RTP payload descriptor (RFC 7741): whether the packet starts a frame
/// (S bit with partition 0), whether that frame is a keyframe, and where the VP8
/// payload begins. `None` for a payload too short to hold its descriptor.
pub fn vp8_descriptor(payload: &[u8]) -> Option<(bool, bool, usize)> {
    let b0 = *payload.first()?;
    let start = b0 & 0x10 != 0 && b0 & 0x07 == 0;
    let mut at = 1;
    if b0 & 0x80 != 0 {
        let x = *payload.get(at)?;
        at += 1;
        if x & 0x80 != 0 {
            let m = *payload.get(at)?;
            at += if m & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            at += 1;
        }
        if x & 0x30 != 0 {
            at += 1;
        }
    }
    let first = *payload.get(at)?;
    // Frame tag bit 0 (P): 0 on keyframes.
    let keyframe = start && first & 0x01 == 0;
    Some((start, keyframe, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_millis(100);

    fn pkt(seq: u64, ts: u64, start: bool, marker: bool, keyframe: bool) -> Packet {
        Packet {
            seq,
            timestamp: ts,
            marker,
            frame_start: start,
            keyframe,
            payload: vec![seq as u8],
        }
    }

    /// Frame `f` of three packets (seq 3f..3f+2), frame 0 a keyframe.
    fn frame(f: u64) -> [Packet; 3] {
        let s = f * 3;
        [
            pkt(s, f, true, false, f == 0),
            pkt(s + 1, f, false, false, false),
            pkt(s + 2, f, false, true, false),
        ]
    }

    fn drain(b: &mut JitterBuffer, now: Instant) -> Vec<Played> {
        std::iter::from_fn(|| b.poll(now)).collect()
    }

    #[test]
    fn padding_between_frames_is_stepped_over_without_waiting() {
        let t0 = Instant::now();
        let mut b = JitterBuffer::new(true, DEADLINE);
        // Frame 0 at 0..=2, a FEC packet at 3, frame 1 at 4..=6 (frame 1 shifted by one).
        for p in frame(0) {
            b.insert(t0, p);
        }
        for (i, p) in frame(1).into_iter().enumerate() {
            b.insert(
                t0,
                Packet {
                    seq: 4 + i as u64,
                    ..p
                },
            );
        }
        assert_eq!(drain(&mut b, t0).len(), 1, "frame 1 waits behind seq 3");
        b.insert_padding(3);
        let out = drain(&mut b, t0);
        assert!(
            matches!(
                out.as_slice(),
                [Played::Frame {
                    missing_reference: false,
                    ..
                }]
            ),
            "frame 1 plays at once: {out:?}"
        );
        b.insert_padding(2); // already played: ignored
        assert!(b.padding.is_empty());
    }

    #[test]
    fn a_played_frame_says_when_its_first_and_last_packets_arrived() {
        let t0 = Instant::now();
        let mut b = JitterBuffer::new(true, DEADLINE);
        let [a, c, d] = frame(0);
        // Out of order: the frame's last packet arrives first, its middle one last.
        b.insert(t0, d);
        b.insert(t0 + Duration::from_millis(2), a);
        b.insert(t0 + Duration::from_millis(5), c);
        let out = drain(&mut b, t0 + Duration::from_millis(5));
        assert!(
            matches!(
                out.as_slice(),
                [Played::Frame { first_arrival, last_arrival, .. }]
                    if *first_arrival == t0 && *last_arrival == t0 + Duration::from_millis(5)
            ),
            "{out:?}"
        );
    }

    #[test]
    fn complete_frames_play_at_once_in_order_even_when_reordered() {
        let t0 = Instant::now();
        let mut b = JitterBuffer::new(true, DEADLINE);
        let [a, c, d] = frame(0);
        b.insert(t0, d);
        b.insert(t0, a);
        assert!(drain(&mut b, t0).is_empty(), "frame 0 lacks a packet");
        b.insert(t0, c.clone());
        b.insert(t0, c); // duplicate
        let out = drain(&mut b, t0);
        assert_eq!(
            out,
            [Played::Frame {
                data: vec![0, 1, 2],
                keyframe: true,
                missing_reference: false,
                first_arrival: t0,
                last_arrival: t0,
            }]
        );
        for p in frame(1) {
            b.insert(t0, p);
        }
        assert_eq!(drain(&mut b, t0).len(), 1);
        assert_eq!(b.poll_timeout(), None, "nothing waits");
    }

    #[test]
    fn a_frame_not_complete_by_its_deadline_is_skipped_and_later_frames_are_not_held() {
        let t0 = Instant::now();
        let mut b = JitterBuffer::new(true, DEADLINE);
        for p in frame(0) {
            b.insert(t0, p);
        }
        assert_eq!(drain(&mut b, t0).len(), 1);
        // Frame 1 loses its middle packet; frames 2 and 3 arrive complete.
        let t1 = t0 + Duration::from_millis(33);
        let [a, _, c] = frame(1);
        b.insert(t1, a);
        b.insert(t1, c);
        for p in frame(2).into_iter().chain(frame(3)) {
            b.insert(t1 + Duration::from_millis(33), p);
        }
        assert!(drain(&mut b, t1 + Duration::from_millis(99)).is_empty());
        assert_eq!(b.poll_timeout(), Some(t1 + DEADLINE));
        let out = drain(&mut b, t1 + DEADLINE);
        assert_eq!(
            out[0],
            Played::Skipped {
                packets: 2,
                keyframe_wanted: true
            }
        );
        assert_eq!(out.len(), 3, "frames 2 and 3 follow at once: {out:?}");
        for f in &out[1..] {
            assert!(matches!(
                f,
                Played::Frame {
                    missing_reference: true,
                    ..
                }
            ));
        }
        // The retransmission arrives late: ignored.
        b.insert(t1 + DEADLINE, frame(1)[1].clone());
        assert!(drain(&mut b, t1 + DEADLINE).is_empty());
        // A keyframe heals the stream.
        let mut key = frame(4);
        key[0].keyframe = true;
        for p in key {
            b.insert(t1 + DEADLINE, p);
        }
        assert_eq!(
            drain(&mut b, t1 + DEADLINE),
            [Played::Frame {
                data: vec![12, 13, 14],
                keyframe: true,
                missing_reference: false,
                first_arrival: t1 + DEADLINE,
                last_arrival: t1 + DEADLINE,
            }]
        );
    }

    #[test]
    fn a_repair_before_the_deadline_plays_the_frame_late_but_whole() {
        let t0 = Instant::now();
        let mut b = JitterBuffer::new(true, DEADLINE);
        for p in frame(0) {
            b.insert(t0, p);
        }
        drain(&mut b, t0);
        let [a, lost, c] = frame(1);
        b.insert(t0, a);
        b.insert(t0, c);
        for p in frame(2) {
            b.insert(t0, p);
        }
        assert!(drain(&mut b, t0 + Duration::from_millis(60)).is_empty());
        b.insert(t0 + Duration::from_millis(60), lost);
        let out = drain(&mut b, t0 + Duration::from_millis(60));
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|f| matches!(
            f,
            Played::Frame {
                missing_reference: false,
                ..
            }
        )));
    }

    #[test]
    fn a_whole_lost_frame_and_a_lost_tail_are_skipped_too() {
        let t0 = Instant::now();
        let mut b = JitterBuffer::new(true, DEADLINE);
        for p in frame(0) {
            b.insert(t0, p);
        }
        drain(&mut b, t0);
        // Frame 1 entirely lost, frame 2 arrives: the gap is waited for, then skipped.
        for p in frame(2) {
            b.insert(t0, p);
        }
        assert!(drain(&mut b, t0).is_empty());
        let out = drain(&mut b, t0 + DEADLINE);
        assert_eq!(out.len(), 2, "{out:?}");
        // Frame 3 loses its last packet and nothing follows: skipped at its deadline,
        // and the keyframe request is rate-limited.
        let [a, c, _] = frame(3);
        b.insert(t0 + DEADLINE, a);
        b.insert(t0 + DEADLINE, c);
        let out = drain(&mut b, t0 + DEADLINE * 2);
        assert_eq!(
            out,
            [Played::Skipped {
                packets: 2,
                keyframe_wanted: false
            }]
        );
        for p in frame(4) {
            b.insert(t0 + DEADLINE * 2, p);
        }
        assert_eq!(drain(&mut b, t0 + DEADLINE * 2).len(), 1);
    }

    #[test]
    fn audio_frames_are_single_packets_and_a_gap_costs_only_its_deadline() {
        let t0 = Instant::now();
        let mut b = JitterBuffer::new(false, Duration::from_millis(40));
        b.insert(t0, pkt(1, 0, false, false, false));
        b.insert(t0, pkt(3, 960, false, false, false));
        assert_eq!(drain(&mut b, t0).len(), 1);
        let out = drain(&mut b, t0 + Duration::from_millis(40));
        assert_eq!(out.len(), 2);
        assert!(matches!(
            out[0],
            Played::Skipped {
                keyframe_wanted: false,
                ..
            }
        ));
        assert!(matches!(
            out[1],
            Played::Frame {
                missing_reference: false,
                ..
            }
        ));
    }

    #[test]
    fn the_buffer_is_bounded() {
        let t0 = Instant::now();
        let mut b = JitterBuffer::new(true, Duration::from_secs(100));
        for p in frame(0) {
            b.insert(t0, p);
        }
        drain(&mut b, t0);
        // A hole at seq 3 and a flood behind it.
        for s in 4..10_000u64 {
            b.insert(t0, pkt(s, s, true, false, false));
        }
        assert!(b.packets.len() <= MAX_PACKETS);
    }

    #[test]
    fn vp8_descriptors_are_read() {
        // X=1, S=1, PID=0; I=1 with a 15-bit picture id; then a keyframe tag.
        let p = [0x90, 0x80, 0x81, 0x23, 0x10, 0x00];
        assert_eq!(vp8_descriptor(&p), Some((true, true, 4)));
        // Continuation packet (S=0).
        assert_eq!(vp8_descriptor(&[0x00, 0xab]), Some((false, false, 1)));
        assert_eq!(vp8_descriptor(&[0x90]), None);
        assert_eq!(vp8_descriptor(&[]), None);
    }
}
