//! One participant's signaling session as the controller keeps it.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use crate::Grants;

/// What the room's log says a participant had before it came back to this node.
#[derive(Default)]
pub(crate) struct Logged {
    /// Its tracks recorded as published (it may re-publish them under these ids).
    pub tracks: HashSet<String>,
    /// Its recorded subscriptions with preferred layers, restored as tracks reappear.
    pub subscriptions: BTreeMap<String, Option<String>>,
}

pub(crate) struct Session<S> {
    pub room: String,
    pub identity: String,
    pub name: Option<String>,
    pub grants: Grants,
    /// The resume token (empty for a restored session until it resumes).
    pub resume: String,
    /// SHA-256 (hex) of the resume token, as recorded in the log.
    pub resume_hash: String,
    /// The attached signaling connection.
    pub session: Option<S>,
    pub generation: u64,
    /// Since when neither signaling nor media is attached (the grace runs).
    pub detached_at: Option<Instant>,
    /// Restored from the log and not resumed yet: no media connections exist.
    pub dormant: bool,
    /// Resumed as restored, but no media connection came up since: a client that
    /// resumes again (it never saw `joined`) is told `restored` again.
    pub restored_pending: bool,
    /// State taken from the log: re-creating it records nothing new.
    pub logged: Logged,
    /// Token bucket of layer/mute changes: tokens left and when it was last filled
    /// (`None` until the first change: a full bucket).
    pub changes: Option<(f64, Instant)>,
    /// When the session's token expires (the session ends then unless refreshed).
    pub token_expires: Option<Instant>,
    /// Since when it is a participant of its part here (a join, or a restore from the
    /// log): the age the room's other parts compare identities by.
    pub since: Option<Instant>,
}

impl<S> Session<S> {
    /// A session known from the log only, waiting for its client.
    pub fn dormant(room: &str, identity: &str, name: &str, resume_hash: String) -> Session<S> {
        Session {
            room: room.to_string(),
            identity: identity.to_string(),
            name: (!name.is_empty()).then(|| name.to_string()),
            grants: Grants {
                publish: false,
                subscribe: false,
            },
            resume: String::new(),
            resume_hash,
            session: None,
            generation: 0,
            detached_at: None,
            dormant: true,
            restored_pending: false,
            logged: Logged::default(),
            changes: None,
            token_expires: None,
            since: None,
        }
    }
}
