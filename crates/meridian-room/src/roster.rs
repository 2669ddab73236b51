//! The participants of a room's other parts (on other nodes, in other regions, or in
//! another part on this node), as this part's clients see them.
//!
//! Two sources make a far participant known here: the tracks of it relayed in (each
//! names its publisher), and the rosters the other parts' nodes list
//! ([`Controller::roster`] there, [`Controller::handle_remote_roster`] here), which
//! also carry participants who publish nothing. A far participant is shown while
//! either source has it; each change is told to this part's clients
//! (`participant_joined`, again with the new name for a rename; `participant_left`)
//! and nothing of it is recorded in this part's log (it is in its own part's).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use meridian_media::{MAX_RELAY_IDENTITY_BYTES, MAX_RELAY_NAME_BYTES, ParticipantId};
use meridian_protocol::{ParticipantInfo, ServerMessage, TrackInfo};
use serde::{Deserialize, Serialize};

use crate::Controller;

/// Most participants one roster may list (one part's participants; a part is bounded
/// by the node's participant cap, so only a hostile or broken node lists more).
pub const MAX_ROSTER: usize = 4096;
/// Most other parts whose rosters one part keeps at once.
pub const MAX_ROSTER_SOURCES: usize = 256;
/// How long a far part's roster stands without being listed again: a part whose node
/// stops answering (it died, or the link to it broke) takes its people with it then.
pub const ROSTER_GRACE: Duration = Duration::from_secs(10);
/// Longest participant id a roster may carry.
const MAX_PARTICIPANT_ID_BYTES: usize = 64;

/// One participant of a room part, as its node lists it for the room's other parts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// Its participant id (unique within the room across parts).
    pub participant_id: String,
    /// Its identity (the token's subject; at most 128 bytes).
    pub identity: String,
    /// Its display name, if its token gave one (at most 256 bytes).
    #[serde(default)]
    pub name: Option<String>,
    /// How long ago it became a participant of its part, in milliseconds: of two
    /// participants of one identity in different parts, the newer is shown.
    #[serde(default)]
    pub joined_ago_ms: u64,
}

/// Why a roster from another part was refused (nothing of it is applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RosterError {
    /// More participants than [`MAX_ROSTER`].
    #[error("roster lists {0} participants, more than {max}", max = MAX_ROSTER)]
    TooLarge(usize),
    /// The part already keeps [`MAX_ROSTER_SOURCES`] other parts' rosters.
    #[error("part {0} already keeps the rosters of {max} other parts", max = MAX_ROSTER_SOURCES)]
    TooManySources(String),
    /// An entry is malformed: an empty or over-long field, or a repeated id.
    #[error("bad roster entry: {0}")]
    BadEntry(&'static str),
}

/// What one other part listed, as last received.
pub(crate) struct FarRoster {
    refreshed: Instant,
    people: BTreeMap<String, Listed>,
}

struct Listed {
    identity: String,
    name: Option<String>,
    /// When it joined, in milliseconds on this controller's clock (may be negative).
    joined: i64,
}

/// A participant of another part, known from the tracks relayed in.
pub(crate) struct RemoteParticipant {
    identity: String,
    name: Option<String>,
    /// Its tracks relayed in.
    tracks: BTreeSet<String>,
}

/// What this part's clients were told of a far participant: identity and name.
pub(crate) type Shown = BTreeMap<String, (String, Option<String>)>;

/// The rosters of other parts, by local part and then by the other part's source name.
pub(crate) type Rosters = HashMap<String, BTreeMap<String, FarRoster>>;

fn check(roster: &[RosterEntry]) -> Result<(), RosterError> {
    if roster.len() > MAX_ROSTER {
        return Err(RosterError::TooLarge(roster.len()));
    }
    let mut ids = BTreeSet::new();
    for e in roster {
        if e.participant_id.is_empty() || e.participant_id.len() > MAX_PARTICIPANT_ID_BYTES {
            return Err(RosterError::BadEntry("participant id empty or too long"));
        }
        if e.identity.is_empty() || e.identity.len() > MAX_RELAY_IDENTITY_BYTES {
            return Err(RosterError::BadEntry("identity empty or too long"));
        }
        if e.name
            .as_ref()
            .is_some_and(|n| n.len() > MAX_RELAY_NAME_BYTES)
        {
            return Err(RosterError::BadEntry("name too long"));
        }
        if !ids.insert(e.participant_id.as_str()) {
            return Err(RosterError::BadEntry("participant listed twice"));
        }
    }
    Ok(())
}

impl<S: Clone> Controller<S> {
    /// The participants of `part` hosted here (attached, detached within their grace,
    /// or restored and not back yet), for the room's other parts; sorted by id, at most
    /// [`MAX_ROSTER`]. Only this node's own participants: a far part's are never
    /// passed on.
    pub fn roster(&self, now: Instant, part: &str) -> Vec<RosterEntry> {
        let mut out: Vec<RosterEntry> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.room == part)
            .map(|(id, s)| RosterEntry {
                participant_id: id.to_string(),
                identity: s.identity.clone(),
                name: s.name.clone(),
                joined_ago_ms: s.since.map_or(0, |t| {
                    now.saturating_duration_since(t)
                        .as_millis()
                        .try_into()
                        .unwrap_or(u64::MAX)
                }),
            })
            .collect();
        out.sort_by(|a, b| a.participant_id.cmp(&b.participant_id));
        out.truncate(MAX_ROSTER);
        out
    }

    /// The roster of another part of `part`'s room, named `source` (its node and part:
    /// unique within the room), as its node lists it now. It replaces what `source`
    /// listed before; this part's clients are told who came, went or changed name.
    /// A source not listed again within [`ROSTER_GRACE`] is dropped with its people.
    pub fn handle_remote_roster(
        &mut self,
        now: Instant,
        part: &str,
        source: &str,
        roster: Vec<RosterEntry>,
    ) -> Result<(), RosterError> {
        check(&roster)?;
        let sources = self.rosters.entry(part.to_string()).or_default();
        if !sources.contains_key(source) && sources.len() >= MAX_ROSTER_SOURCES {
            return Err(RosterError::TooManySources(part.to_string()));
        }
        let here = i64::try_from(now.saturating_duration_since(self.origin).as_millis())
            .unwrap_or(i64::MAX);
        let people = roster
            .into_iter()
            .map(|e| {
                let ago = i64::try_from(e.joined_ago_ms).unwrap_or(i64::MAX);
                let listed = Listed {
                    identity: e.identity,
                    name: e.name,
                    joined: here.saturating_sub(ago),
                };
                (e.participant_id, listed)
            })
            .collect();
        sources.insert(
            source.to_string(),
            FarRoster {
                refreshed: now,
                people,
            },
        );
        self.update_roster_expiry();
        self.refresh_remote(part);
        Ok(())
    }

    /// Lets the parts of one room among `parts` (parts hosted here) see each other's
    /// participants, as rosters named `local:<part>`.
    pub fn share_local_rosters(&mut self, now: Instant, parts: &[String]) {
        let mut rooms: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for p in parts {
            rooms
                .entry(meridian_events::room_of_part(p))
                .or_default()
                .insert(p);
        }
        for group in rooms.values().filter(|g| g.len() > 1) {
            for theirs in group {
                let roster = self.roster(now, theirs);
                let source = format!("local:{theirs}");
                for ours in group.iter().filter(|o| *o != theirs) {
                    if let Err(e) = self.handle_remote_roster(now, ours, &source, roster.clone()) {
                        tracing::debug!(part = %ours, %source, "local roster not shared: {e}");
                    }
                }
            }
        }
    }

    /// When the next far roster runs out of its grace.
    pub(crate) fn update_roster_expiry(&mut self) {
        self.roster_expiry = self
            .rosters
            .values()
            .flat_map(|s| s.values())
            .map(|r| r.refreshed + ROSTER_GRACE)
            .min();
    }

    /// Drops the far rosters not listed again within [`ROSTER_GRACE`] before `now`.
    pub(crate) fn expire_rosters(&mut self, now: Instant) {
        if self.roster_expiry.is_none_or(|at| at > now) {
            return;
        }
        let mut touched = Vec::new();
        self.rosters.retain(|part, sources| {
            let before = sources.len();
            sources.retain(|source, r| {
                let keep = r.refreshed + ROSTER_GRACE > now;
                if !keep {
                    tracing::info!(%part, %source, "another part's roster not renewed; its people leave");
                }
                keep
            });
            if sources.len() != before {
                touched.push(part.clone());
            }
            !sources.is_empty()
        });
        self.update_roster_expiry();
        for part in touched {
            self.refresh_remote(&part);
        }
    }

    /// Forgets everything known of the other parts of `part` (no longer hosted here).
    pub(crate) fn forget_remote(&mut self, part: &str) {
        self.rosters.remove(part);
        self.remote.remove(part);
        self.shown.remove(part);
        self.update_roster_expiry();
    }

    /// Whether `pid` is a participant of `part` on this node.
    fn in_part(&self, pid: &str, part: &str) -> bool {
        pid.parse::<ParticipantId>()
            .ok()
            .and_then(|p| self.sessions.get(&p))
            .is_some_and(|s| s.room == part)
    }

    /// Whether `pid` names a participant of this node (not another node's).
    fn is_local(&self, pid: &str) -> bool {
        pid.parse::<ParticipantId>()
            .is_ok_and(|p| self.sessions.contains_key(&p))
    }

    /// The far participants shown to `room`'s clients, with their tracks here.
    pub(crate) fn remote_infos(&self, room: &str) -> Vec<ParticipantInfo> {
        let Some(shown) = self.shown.get(room) else {
            return Vec::new();
        };
        let tracks = self.sfu.room_tracks(room);
        shown
            .iter()
            .map(|(pid, (identity, name))| info(pid, identity, name, &tracks))
            .collect()
    }

    /// A track of another part's participant arrived: the participant is known here
    /// (announced with the first, unless a roster listed it already).
    pub(crate) fn remote_track_published(
        &mut self,
        room: &str,
        track: &TrackInfo,
        identity: String,
        name: Option<String>,
    ) {
        let pid = track.participant_id.clone();
        if self.is_local(&pid) {
            return;
        }
        self.remote
            .entry(room.to_string())
            .or_default()
            .entry(pid)
            .or_insert(RemoteParticipant {
                identity,
                name,
                tracks: BTreeSet::new(),
            })
            .tracks
            .insert(track.track_id.clone());
        self.refresh_remote(room);
    }

    /// A track of another part's participant is gone from here: with its last one,
    /// the participant leaves unless a roster still lists it.
    pub(crate) fn remote_track_unpublished(&mut self, room: &str, track_id: &str) {
        let Some(members) = self.remote.get_mut(room) else {
            return;
        };
        members.retain(|_, r| !(r.tracks.remove(track_id) && r.tracks.is_empty()));
        if members.is_empty() {
            self.remote.remove(room);
        }
        self.refresh_remote(room);
    }

    /// Brings what `part`'s clients were told of far participants in line with the
    /// rosters and relayed tracks: `participant_left` for those gone, then
    /// `participant_joined` for those new or renamed.
    ///
    /// Of several far participants with one identity (a client that joined again in
    /// another part while its older session waits out its grace), only the newest is
    /// shown, unless an older one has tracks here.
    fn refresh_remote(&mut self, part: &str) {
        // pid → (identity, name, joined, has tracks here)
        let mut want: BTreeMap<String, (String, Option<String>, i64, bool)> = BTreeMap::new();
        for r in self.rosters.get(part).into_iter().flat_map(|s| s.values()) {
            for (pid, l) in &r.people {
                want.entry(pid.clone())
                    .or_insert_with(|| (l.identity.clone(), l.name.clone(), l.joined, false));
            }
        }
        for (pid, m) in self.remote.get(part).into_iter().flatten() {
            want.entry(pid.clone())
                .or_insert_with(|| (m.identity.clone(), m.name.clone(), i64::MIN, true))
                .3 = true;
        }
        want.retain(|pid, _| !self.in_part(pid, part));
        let mut newest: HashMap<&str, (i64, &str)> = HashMap::new();
        for (pid, (identity, _, joined, _)) in &want {
            let key = (*joined, pid.as_str());
            let e = newest.entry(identity.as_str()).or_insert(key);
            if key > *e {
                *e = key;
            }
        }
        let mut hidden = Vec::new();
        for (pid, (identity, _, _, tracks)) in &want {
            let newer = newest
                .get(identity.as_str())
                .is_some_and(|(_, p)| *p != pid.as_str());
            if !*tracks && newer {
                hidden.push(pid.clone());
            }
        }
        for pid in hidden {
            want.remove(&pid);
        }
        let before = self.shown.remove(part).unwrap_or_default();
        let mut now_shown = Shown::new();
        for (pid, (identity, name, _, _)) in want {
            now_shown.insert(pid, (identity, name));
        }
        let gone: Vec<String> = before
            .keys()
            .filter(|pid| !now_shown.contains_key(*pid) && !self.in_part(pid, part))
            .cloned()
            .collect();
        let changed: Vec<String> = now_shown
            .iter()
            .filter(|(pid, v)| before.get(*pid) != Some(*v))
            .map(|(pid, _)| pid.clone())
            .collect();
        let tracks = if changed.is_empty() {
            Vec::new()
        } else {
            self.sfu.room_tracks(part)
        };
        let joined: Vec<ParticipantInfo> = changed
            .iter()
            .map(|pid| {
                let (identity, name) = &now_shown[pid];
                info(pid, identity, name, &tracks)
            })
            .collect();
        if !now_shown.is_empty() {
            self.shown.insert(part.to_string(), now_shown);
        }
        for participant_id in gone {
            self.broadcast(
                part,
                None,
                ServerMessage::ParticipantLeft { participant_id },
            );
        }
        for participant in joined {
            self.broadcast(part, None, ServerMessage::ParticipantJoined { participant });
        }
    }
}

fn info(pid: &str, identity: &str, name: &Option<String>, tracks: &[TrackInfo]) -> ParticipantInfo {
    ParticipantInfo {
        participant_id: pid.to_string(),
        identity: identity.to_string(),
        name: name.clone(),
        tracks: tracks
            .iter()
            .filter(|t| t.participant_id == pid)
            .cloned()
            .collect(),
    }
}
