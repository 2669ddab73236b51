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

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::{ParticipantId, PcKind, Sfu};

/// How long a verified check keeps its source address held by its connection.
/// Clients check at least every few seconds (str0m every ~3 s, browsers every ~5 s
/// for consent freshness, RFC 7675), so a live connection renews it well within this.
pub(crate) const ADDRESS_HELD_FOR: Duration = Duration::from_secs(15);

impl Sfu {
    /// Finds the connection a datagram belongs to. STUN names it by the USERNAME's ufrag
    /// (and reports `true`: the address may move once str0m verifies the check); any
    /// other datagram by its source address.
    pub(crate) fn route(
        &self,
        source: SocketAddr,
        contents: &[u8],
    ) -> Option<(ParticipantId, PcKind, bool)> {
        if contents.first().is_some_and(|b| *b < 2) {
            let msg = str0m::ice::StunMessage::parse(contents).ok()?;
            let (local, _remote) = msg.split_username()?;
            let (id, kind) = *self.by_ufrag.get(local)?;
            return Some((id, kind, true));
        }
        self.by_addr
            .get(&source)
            .map(|(id, kind)| (*id, *kind, false))
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
        self.participants.get(&holder).is_some_and(|p| {
            let pc = p.pc(holder_kind);
            pc.remote == Some(source)
                && pc
                    .last_check
                    .is_some_and(|t| now.saturating_duration_since(t) < ADDRESS_HELD_FOR)
        })
    }

    /// Points `source` at a connection whose ICE check from there str0m answered, and
    /// renews the hold. The caller has checked that no other connection holds it.
    pub(crate) fn bind_address(
        &mut self,
        now: Instant,
        id: ParticipantId,
        kind: PcKind,
        source: SocketAddr,
    ) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let pc = p.pc_mut(kind);
        pc.last_check = Some(now);
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
            && let Some(prev) = self.participants.get_mut(&prev)
        {
            let prev_pc = prev.pc_mut(prev_kind);
            if prev_pc.remote == Some(source) {
                prev_pc.remote = None;
            }
        }
    }
}
