//! Reading payloads written with older schema versions.
//!
//! A stored event keeps the schema version it was written with. On read,
//! [`decode_event`] lifts the JSON step by step (`v0 → v1 → …`) to
//! [`CURRENT_SCHEMA_VERSION`] before deserializing, so the rest of the code only ever
//! sees current events. The stored bytes are never rewritten: the hash chain covers
//! them as written.
//!
//! Adding a version: bump [`CURRENT_SCHEMA_VERSION`], add one `upcast_vN_to_vN1`
//! function below and call it from [`upcast`].

use serde_json::Value;

use crate::event::{CURRENT_SCHEMA_VERSION, Event};

/// Errors decoding a stored event.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The payload is not valid JSON or does not match any event.
    #[error("payload does not decode as an event: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The payload was written by a newer schema than this build understands.
    #[error("schema version {found} is newer than the supported {supported}")]
    FutureVersion {
        /// Version found on the record.
        found: u32,
        /// Newest version this build knows.
        supported: u32,
    },
}

/// Decode a stored payload written with `schema_version` into a current [`Event`].
pub fn decode_event(schema_version: u32, payload: &str) -> Result<Event, EventError> {
    if schema_version == CURRENT_SCHEMA_VERSION {
        return Ok(serde_json::from_str(payload)?);
    }
    if schema_version > CURRENT_SCHEMA_VERSION {
        return Err(EventError::FutureVersion {
            found: schema_version,
            supported: CURRENT_SCHEMA_VERSION,
        });
    }
    let value: Value = serde_json::from_str(payload)?;
    Ok(serde_json::from_value(upcast(schema_version, value))?)
}

/// Lift a JSON payload from `version` to [`CURRENT_SCHEMA_VERSION`].
pub fn upcast(mut version: u32, mut value: Value) -> Value {
    while version < CURRENT_SCHEMA_VERSION {
        value = match version {
            0 => upcast_v0_to_v1(value),
            1 => upcast_v1_to_v2(value),
            _ => value,
        };
        version += 1;
    }
    value
}

/// Version 0 (the prototype) had no display `name` on `ParticipantJoined` and a
/// boolean `simulcast` instead of the `layers` list on `TrackPublished`.
fn upcast_v0_to_v1(mut value: Value) -> Value {
    let Some(obj) = value.as_object_mut() else {
        return value;
    };
    let kind = obj.get("type").and_then(Value::as_str).map(str::to_owned);
    match kind.as_deref() {
        Some("ParticipantJoined") if !obj.contains_key("name") => {
            let identity = obj.get("identity").cloned().unwrap_or(Value::Null);
            obj.insert("name".into(), identity);
        }
        Some("TrackPublished") if !obj.contains_key("layers") => {
            let simulcast = obj
                .remove("simulcast")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let layers: Vec<Value> = if simulcast {
                ["q", "h", "f"].iter().map(|r| Value::from(*r)).collect()
            } else {
                Vec::new()
            };
            obj.insert("layers".into(), Value::Array(layers));
        }
        _ => {}
    }
    value
}

/// Version 1 as the node wrote it recorded `PreferredLayerSet.layer` as a layer name
/// (`low`, `medium`, `high`) where the vocabulary says a rid (`q`, `h`, `f`), and
/// `TrackPublished.codec` as `video` for every video track: the codec was not recorded,
/// so those rows read as `unknown`.
fn upcast_v1_to_v2(mut value: Value) -> Value {
    let Some(obj) = value.as_object_mut() else {
        return value;
    };
    let kind = obj.get("type").and_then(Value::as_str).map(str::to_owned);
    match kind.as_deref() {
        Some("PreferredLayerSet") => {
            let rid = match obj.get("layer").and_then(Value::as_str) {
                Some("low") => Some("q"),
                Some("medium") => Some("h"),
                Some("high") => Some("f"),
                _ => None,
            };
            if let Some(rid) = rid {
                obj.insert("layer".into(), Value::from(rid));
            }
        }
        Some("TrackPublished") if obj.get("codec").and_then(Value::as_str) == Some("video") => {
            obj.insert("codec".into(), Value::from("unknown"));
        }
        _ => {}
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TrackKind;

    #[test]
    fn current_version_round_trips() {
        let e = Event::ParticipantJoined {
            participant_id: "p1".into(),
            identity: "alice".into(),
            name: "Alice".into(),
            resume_hash: None,
        };
        assert_eq!(
            decode_event(CURRENT_SCHEMA_VERSION, &e.to_json()).expect("decodes"),
            e
        );
    }

    #[test]
    fn v1_layer_names_become_rids_and_video_codec_unknown() {
        let layer =
            r#"{"type":"PreferredLayerSet","participant_id":"p","track_id":"t","layer":"low"}"#;
        let Event::PreferredLayerSet { layer, .. } = decode_event(1, layer).expect("upcasts")
        else {
            panic!("wrong event");
        };
        assert_eq!(layer, "q");
        let rid = r#"{"type":"PreferredLayerSet","participant_id":"p","track_id":"t","layer":"f"}"#;
        let Event::PreferredLayerSet { layer, .. } = decode_event(1, rid).expect("upcasts") else {
            panic!("wrong event");
        };
        assert_eq!(layer, "f");
        let published = r#"{"type":"TrackPublished","track_id":"t","participant_id":"p","kind":"video","layers":["q"],"codec":"video"}"#;
        let Event::TrackPublished { codec, .. } = decode_event(1, published).expect("upcasts")
        else {
            panic!("wrong event");
        };
        assert_eq!(codec, "unknown");
        let opus = r#"{"type":"TrackPublished","track_id":"a","participant_id":"p","kind":"audio","layers":[],"codec":"opus"}"#;
        let Event::TrackPublished { codec, .. } = decode_event(1, opus).expect("upcasts") else {
            panic!("wrong event");
        };
        assert_eq!(codec, "opus");
    }

    #[test]
    fn v0_participant_joined_gets_name_from_identity() {
        let v0 = r#"{"type":"ParticipantJoined","participant_id":"p1","identity":"alice"}"#;
        assert_eq!(
            decode_event(0, v0).expect("upcasts"),
            Event::ParticipantJoined {
                participant_id: "p1".into(),
                identity: "alice".into(),
                name: "alice".into(),
                resume_hash: None,
            }
        );
    }

    #[test]
    fn v0_track_published_simulcast_flag_becomes_layers() {
        let v0 = r#"{"type":"TrackPublished","track_id":"t","participant_id":"p","kind":"video","simulcast":true,"codec":"VP8"}"#;
        let Event::TrackPublished { layers, kind, .. } = decode_event(0, v0).expect("upcasts")
        else {
            panic!("wrong event");
        };
        assert_eq!(kind, TrackKind::Video);
        assert_eq!(layers, vec!["q", "h", "f"]);
    }

    #[test]
    fn future_version_is_refused() {
        assert!(matches!(
            decode_event(99, r#"{"type":"RoomOpened"}"#),
            Err(EventError::FutureVersion { found: 99, .. })
        ));
    }
}
