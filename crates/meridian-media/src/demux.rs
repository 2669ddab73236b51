//! Demultiplexing: which connection a datagram belongs to (STUN by its USERNAME's
//! ufrag, everything else by source address), and binding addresses to connections.
//!
//! An address is bound to a connection when str0m answers an ICE check from it (the
//! check's MESSAGE-INTEGRITY matched that connection's password), and re-bound on
//! every such answer, so a client whose NAT mapping changes is followed. A check is
//! only proof that its sender knows the password, not that it owns the source
//! address: while another connection holds the address (it proved it within
//! [`ADDRESS_HELD_FOR`]), checks from there for any other connection are dropped
//! before str0m sees them. Otherwise a participant could replay its own valid check
//! from a victim's IP:port and take the victim's media.
//!
//! A check is also refused when the same transaction was verified from another
//! address (one of the connection's last [`RECENT_CHECKS`]): a client retransmits a
//! check from where it sent it, so such a copy is a replay, which would otherwise
//! move the connection, and make str0m nominate the replayer's address.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::ice::TransId;

use crate::{ParticipantId, PcKind, Sfu};

/// How long a verified check keeps its source address held by its connection.
/// Clients check at least every few seconds (str0m every ~3 s, browsers every ~5 s
/// for consent freshness, RFC 7675), so a live connection renews it well within this.
pub(crate) const ADDRESS_HELD_FOR: Duration = Duration::from_secs(15);
/// Verified checks remembered per connection, to refuse their replays from elsewhere
/// (clients check every 1–3 s once connected, so this covers a minute or more).
pub(crate) const RECENT_CHECKS: usize = 64;

/// The first characters of every local ICE ufrag of the core on media worker
/// `worker` (two hex digits).
pub fn worker_ufrag_prefix(worker: u8) -> String {
    format!("{worker:02x}")
}

/// For a STUN message, the media worker its USERNAME's local ufrag names (see
/// [`worker_ufrag_prefix`]); `Some(0)` for a STUN message without a worker prefix;
/// `None` for anything that is not STUN (route it by source address).
pub fn stun_worker(datagram: &[u8]) -> Option<u8> {
    if datagram.first().is_none_or(|b| *b >= 2) {
        return None;
    }
    let worker = str0m::ice::StunMessage::parse(datagram)
        .ok()
        .and_then(|m| {
            let (local, _) = m.split_username()?;
            u8::from_str_radix(local.get(..2)?, 16).ok()
        })
        .unwrap_or(0);
    Some(worker)
}

/// Whether `datagram` is a STUN answer to transaction `trans_id`.
pub(crate) fn answers(datagram: &[u8], trans_id: TransId) -> bool {
    datagram.first().is_some_and(|b| *b < 2)
        && str0m::ice::StunMessage::parse(datagram)
            .is_ok_and(|m| !m.is_binding_request() && m.trans_id() == trans_id)
}

impl Sfu {
    /// Finds the connection a datagram belongs to. STUN names it by the USERNAME's ufrag
    /// (and reports its transaction: the address may move once str0m verifies the
    /// check); any other datagram by its source address.
    pub(crate) fn route(
        &self,
        source: SocketAddr,
        contents: &[u8],
    ) -> Option<(ParticipantId, PcKind, Option<TransId>)> {
        if contents.first().is_some_and(|b| *b < 2) {
            let msg = str0m::ice::StunMessage::parse(contents).ok()?;
            let (local, _remote) = msg.split_username()?;
            let (id, kind) = *self.by_ufrag.get(local)?;
            return Some((id, kind, Some(msg.trans_id())));
        }
        self.by_addr
            .get(&source)
            .map(|(id, kind)| (*id, *kind, None))
    }

    /// Whether a check for (`id`, `kind`) from `source` must not reach str0m: the
    /// address is held by another connection, or the transaction is a replay.
    pub(crate) fn refuses_check(
        &self,
        now: Instant,
        id: ParticipantId,
        kind: PcKind,
        trans_id: TransId,
        source: SocketAddr,
    ) -> bool {
        let replayed = self
            .participants
            .get(&id)
            .and_then(|p| p.pc(kind))
            .is_some_and(|pc| {
                pc.recent_checks
                    .iter()
                    .any(|(t, from)| *t == trans_id && *from != source)
            });
        replayed || self.held_by_other(now, id, kind, source)
    }

    /// Whether `source` is held by a connection other than (`id`, `kind`): bound to it,
    /// with a verified check from there less than [`ADDRESS_HELD_FOR`] ago.
    pub(crate) fn held_by_other(
        &self,
        now: Instant,
        id: ParticipantId,
        kind: PcKind,
        source: SocketAddr,
    ) -> bool {
        let Some(&(holder, holder_kind)) = self.by_addr.get(&source) else {
            return false;
        };
        if (holder, holder_kind) == (id, kind) {
            return false;
        }
        self.participants
            .get(&holder)
            .and_then(|p| p.pc(holder_kind))
            .is_some_and(|pc| {
                pc.remote == Some(source)
                    && pc
                        .last_check
                        .is_some_and(|t| now.saturating_duration_since(t) < ADDRESS_HELD_FOR)
            })
    }

    /// Points `source` at a connection whose ICE check from there str0m answered,
    /// renews the hold and remembers the transaction. The caller has checked that the
    /// check is not refused.
    pub(crate) fn bind_address(
        &mut self,
        now: Instant,
        id: ParticipantId,
        kind: PcKind,
        trans_id: TransId,
        source: SocketAddr,
    ) {
        let Some(pc) = self.participants.get_mut(&id).and_then(|p| p.pc_mut(kind)) else {
            return;
        };
        pc.last_check = Some(now);
        if pc.recent_checks.len() >= RECENT_CHECKS {
            pc.recent_checks.pop_front();
        }
        pc.recent_checks.push_back((trans_id, source));
        if pc.remote == Some(source) && self.by_addr.get(&source) == Some(&(id, kind)) {
            return;
        }
        if let Some(old) = pc.remote.replace(source)
            && self.by_addr.get(&old) == Some(&(id, kind))
        {
            self.by_addr.remove(&old);
        }
        // A connection whose hold lapsed loses the address.
        if let Some((prev, prev_kind)) = self.by_addr.insert(source, (id, kind))
            && (prev, prev_kind) != (id, kind)
            && let Some(prev_pc) = self
                .participants
                .get_mut(&prev)
                .and_then(|p| p.pc_mut(prev_kind))
            && prev_pc.remote == Some(source)
        {
            prev_pc.remote = None;
        }
    }
}
