//! Demultiplexing: which connection a datagram belongs to (STUN by its USERNAME's
//! ufrag, everything else by source address), and binding addresses to connections.

use std::net::SocketAddr;

use crate::{ParticipantId, PcKind, Sfu};

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

    /// Points `source` at a connection whose ICE check from there str0m accepted.
    pub(crate) fn bind_address(&mut self, id: ParticipantId, kind: PcKind, source: SocketAddr) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let pc = p.pc_mut(kind);
        if pc.remote != Some(source) {
            if let Some(old) = pc.remote.replace(source) {
                self.by_addr.remove(&old);
            }
            self.by_addr.insert(source, (id, kind));
        }
    }
}
