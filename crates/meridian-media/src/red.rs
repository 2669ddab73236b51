//! Audio redundancy at the node: RFC 2198 RED (`red/48000/2`, which Chromium
//! negotiates) around Opus.
//!
//! The node negotiates RED with everyone (and Opus in-band FEC, `useinbandfec=1`, which
//! str0m's Opus parameters carry). A publisher's RED packet is checked
//! ([`RedPayload::parse`]: well-formed, primary block of the stream's Opus payload type)
//! — a malformed one is dropped and counted, never forwarded — then passed through to
//! subscribers that negotiated RED (with its blocks relabelled to the subscriber's
//! Opus payload type when the two differ) or reduced to its primary block for those
//! that did not. A publisher that sends plain Opus gets RED added per subscriber
//! ([`RedAdder`]): each packet carries the previous one as a redundant block, so one lost
//! packet in two is recovered by the receiver without a retransmission.

use str0m::rtp::{RedDecoder, RedEncoder, RedundantBlock};

/// Most redundant blocks accepted in a publisher's RED packet (browsers send one).
const MAX_BLOCKS: usize = 4;
/// Largest Opus payload kept as redundancy (RFC 2198's 10-bit length).
const MAX_BLOCK_BYTES: usize = 1023;

/// Why a RED payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RedError {
    /// Headers or lengths do not fit the payload.
    #[error("malformed RED payload")]
    Malformed,
    /// The primary block is not the stream's Opus payload type.
    #[error("RED primary block of payload type {0}, not the stream's")]
    WrongPrimary(u8),
    /// More redundant blocks than any sender uses.
    #[error("RED payload with too many blocks")]
    TooManyBlocks,
}

/// A checked RED payload.
#[derive(Debug, Clone)]
pub struct RedPayload<'a> {
    /// Redundant blocks of the same payload type, oldest first: (timestamp offset, bytes).
    pub redundant: Vec<(u32, &'a [u8])>,
    /// The primary (current) block.
    pub primary: &'a [u8],
}

impl<'a> RedPayload<'a> {
    /// Parses and checks a RED payload whose blocks must be of payload type `pt`
    /// (blocks of another type are ignored, as RFC 2198 allows them).
    pub fn parse(data: &'a [u8], pt: u8) -> Result<RedPayload<'a>, RedError> {
        let blocks = RedDecoder::decode(data).map_err(|_| RedError::Malformed)?;
        if blocks.len() > MAX_BLOCKS + 1 {
            return Err(RedError::TooManyBlocks);
        }
        let primary = blocks.last().ok_or(RedError::Malformed)?;
        if !primary.is_primary {
            return Err(RedError::Malformed);
        }
        if primary.pt != pt {
            return Err(RedError::WrongPrimary(primary.pt));
        }
        Ok(RedPayload {
            redundant: blocks[..blocks.len() - 1]
                .iter()
                .filter(|b| b.pt == pt && b.timestamp_offset > 0)
                .map(|b| (b.timestamp_offset, b.payload))
                .collect(),
            primary: primary.payload,
        })
    }

    /// The same payload with every block labelled `pt`.
    pub fn encode(&self, pt: u8) -> Vec<u8> {
        let redundant: Vec<RedundantBlock> = self
            .redundant
            .iter()
            .map(|(offset, payload)| RedundantBlock {
                pt,
                timestamp_offset: *offset,
                payload: payload.to_vec(),
            })
            .collect();
        RedEncoder::encode(pt, self.primary, &redundant)
    }
}

/// Adds RED to one subscriber's plain Opus stream: each packet carries the previous
/// one as a redundant block.
#[derive(Debug, Default, Clone)]
pub struct RedAdder {
    /// The previous packet: RTP timestamp and payload.
    previous: Option<(u32, Vec<u8>)>,
}

impl RedAdder {
    /// The RED payload for an Opus packet with RTP timestamp `ts`, labelled `pt`.
    pub fn wrap(&mut self, pt: u8, ts: u32, opus: &[u8]) -> Vec<u8> {
        let redundant: Vec<RedundantBlock> = self
            .previous
            .as_ref()
            .map(|(prev_ts, prev)| RedundantBlock {
                pt,
                timestamp_offset: ts.wrapping_sub(*prev_ts),
                payload: prev.clone(),
            })
            .filter(|b| b.timestamp_offset > 0 && b.fits())
            .into_iter()
            .collect();
        let out = RedEncoder::encode(pt, opus, &redundant);
        self.previous = (opus.len() <= MAX_BLOCK_BYTES).then(|| (ts, opus.to_vec()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_red_carries_the_previous_packet_and_parses_back() {
        let mut adder = RedAdder::default();
        let first = adder.wrap(111, 1000, b"one");
        let p = RedPayload::parse(&first, 111).unwrap();
        assert_eq!((p.primary, p.redundant.len()), (&b"one"[..], 0));
        let second = adder.wrap(111, 1960, b"two");
        let p = RedPayload::parse(&second, 111).unwrap();
        assert_eq!(p.primary, b"two");
        assert_eq!(p.redundant, vec![(960, &b"one"[..])]);
        // Relabelled for a subscriber whose Opus is payload type 109.
        let moved = p.encode(109);
        let q = RedPayload::parse(&moved, 109).unwrap();
        assert_eq!((q.primary, q.redundant), (p.primary, p.redundant));
    }

    #[test]
    fn malformed_red_is_refused_without_panicking() {
        assert_eq!(
            RedPayload::parse(&[], 111).unwrap_err(),
            RedError::Malformed
        );
        // A redundant header whose length runs past the end.
        assert_eq!(
            RedPayload::parse(&[0x80 | 111, 0, 0x0f, 0xff, 111, 1, 2], 111).unwrap_err(),
            RedError::Malformed
        );
        // Primary of another payload type.
        assert_eq!(
            RedPayload::parse(&[96, 1, 2, 3], 111).unwrap_err(),
            RedError::WrongPrimary(96)
        );
        // Many redundant blocks of length 0.
        let mut many = Vec::new();
        for _ in 0..10 {
            many.extend_from_slice(&[0x80 | 111, 0, 4, 0]);
        }
        many.push(111);
        assert_eq!(
            RedPayload::parse(&many, 111).unwrap_err(),
            RedError::TooManyBlocks
        );
        // Every byte string up to 3 bytes: an answer, never a panic.
        for a in 0..=255u8 {
            for b in [0u8, 0x80, 0xff] {
                let _ = RedPayload::parse(&[a, b, a], 111);
            }
        }
    }
}
