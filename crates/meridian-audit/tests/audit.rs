//! The audit commands and the HTTP API, against SQLite and Postgres.

#[path = "../../meridian-store/tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use clap::Parser;
use common::{Harness, join, leave, publish};
use http_body_util::BodyExt;
use meridian_audit::{
    AuditArgs, AuditCommand, AuditError, AuditOutcome, ExportFormat, StaticAdminToken, router, run,
};
use meridian_events::RecordedEvent;
use meridian_store::ExpectedVersion;
use tower::ServiceExt;

both_stores!(
    cli_queries,
    cli_verify_names_the_tampered_position,
    cli_checkpoints_export_and_verify,
    csv_export_neutralises_formulas,
    http_api
);

/// `checkpoints --export` then `verify --public-key … --checkpoints …`: a history
/// rewritten together with its heads passes the chains but not the exported checkpoint.
async fn cli_checkpoints_export_and_verify(h: &Harness) {
    seed(h).await;
    let dir = tempfile::tempdir().expect("dir");
    let key = meridian_store::load_or_create_signing_key(dir.path()).expect("key");
    h.store.checkpoint(&key).await.expect("checkpoint");
    let file = dir.path().join("checkpoints.jsonl");
    let (o, v) = out(
        h,
        AuditCommand::Checkpoints {
            export: Some(file.clone()),
        },
    )
    .await;
    assert_eq!(o, AuditOutcome::Ok);
    assert!(v.contains("exported 1 checkpoints"), "{v}");
    let pub_file = dir
        .path()
        .join("keys")
        .join(format!("{}.pub", meridian_store::KEY_FILE));
    let verify = || AuditCommand::Verify {
        public_key: vec![pub_file.display().to_string()],
        checkpoints: Some(file.clone()),
    };
    let (o, v) = out(h, verify()).await;
    assert_eq!(o, AuditOutcome::Ok, "{v}");
    assert!(v.contains("1 signed checkpoints verified"), "{v}");

    // Cut room:lobby's last event and move its head back: chains still agree.
    h.tamper(
        "DELETE FROM events WHERE stream = 'room:lobby' AND sequence = 4; \
         DELETE FROM stream_heads WHERE stream = 'room:lobby'; \
         INSERT INTO stream_heads (stream, sequence, position, hash) \
         SELECT stream, sequence, position, hash FROM events \
         WHERE stream = 'room:lobby' AND sequence = 3",
    )
    .await;
    let (o, _) = out(
        h,
        AuditCommand::Verify {
            public_key: vec![],
            checkpoints: None,
        },
    )
    .await;
    assert_eq!(o, AuditOutcome::Ok, "chains alone cannot see it");
    let (o, v) = out(h, verify()).await;
    assert_ne!(o.exit_code(), 0, "{v}");
    assert!(v.contains("signed checkpoint"), "{v}");
    assert!(v.contains("room:lobby#4"), "{v}");
    // A wrong key is refused outright.
    let other = tempfile::tempdir().expect("dir");
    let other_key = meridian_store::load_or_create_signing_key(other.path()).expect("key");
    let (o, v) = out(
        h,
        AuditCommand::Verify {
            public_key: vec![meridian_store::public_key_hex(&other_key)],
            checkpoints: Some(file.clone()),
        },
    )
    .await;
    assert_ne!(o.exit_code(), 0);
    assert!(v.contains("signature"), "{v}");
}

/// Issue 17 item 10: cells a spreadsheet would evaluate are exported inert.
async fn csv_export_neutralises_formulas(h: &Harness) {
    h.store
        .append(
            "room:x",
            ExpectedVersion::NoStream,
            vec![
                meridian_store::NewEvent::new(
                    "=HYPERLINK(\"http://evil\")",
                    meridian_events::Event::RoomOpened,
                ),
                meridian_store::NewEvent::new("+1", meridian_events::Event::RoomClosed),
                meridian_store::NewEvent::new("-1", meridian_events::Event::RoomOpened),
                meridian_store::NewEvent::new("@SUM(A1)", meridian_events::Event::RoomClosed),
            ],
        )
        .await
        .expect("append");
    let (_, csv) = out(
        h,
        AuditCommand::Export {
            format: ExportFormat::Csv,
            room: None,
        },
    )
    .await;
    let actors: Vec<String> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(4).expect("actor column").to_owned())
        .collect();
    assert_eq!(
        actors,
        vec![
            "\"'=HYPERLINK(\"\"http://evil\"\")\"",
            "'+1",
            "'-1",
            "'@SUM(A1)"
        ]
    );
}

async fn seed(h: &Harness) {
    let s = &h.store;
    s.append(
        "room:lobby",
        ExpectedVersion::NoStream,
        vec![
            join("p1", "alice"),
            join("p2", "bob"),
            publish("alice", "p1", "cam"),
        ],
    )
    .await
    .expect("seed");
    s.append(
        "room:side, \"quoted\"",
        ExpectedVersion::NoStream,
        vec![join("p1", "carol")],
    )
    .await
    .expect("seed");
    s.append(
        "room:lobby",
        ExpectedVersion::Exact(3),
        vec![leave("alice", "p1")],
    )
    .await
    .expect("seed");
}

async fn out(h: &Harness, cmd: AuditCommand) -> (AuditOutcome, String) {
    let mut buf = Vec::new();
    let outcome = run(&cmd, &h.store, &mut buf).await.expect("run");
    (outcome, String::from_utf8(buf).expect("utf8"))
}

async fn cli_queries(h: &Harness) {
    seed(h).await;
    let (o, rooms) = out(h, AuditCommand::Rooms).await;
    assert_eq!(o, AuditOutcome::Ok);
    assert!(rooms.contains("lobby") && rooms.contains("side"), "{rooms}");

    let (_, history) = out(
        h,
        AuditCommand::History {
            room: "lobby".into(),
        },
    )
    .await;
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 4, "{history}");
    assert!(lines[0].contains("ParticipantJoined") && lines[0].contains("alice"));
    assert!(lines[3].contains("ParticipantLeft"));

    let (_, alice) = out(
        h,
        AuditCommand::Participant {
            identity: "alice".into(),
        },
    )
    .await;
    assert_eq!(alice.lines().count(), 3, "join, publish, leave: {alice}");
    assert!(!alice.contains("carol"));

    let now = chrono::Utc::now();
    let (_, all) = out(
        h,
        AuditCommand::Range {
            from: now - chrono::Duration::hours(1),
            to: now + chrono::Duration::hours(1),
        },
    )
    .await;
    assert_eq!(all.lines().count(), 5);
    let (_, none) = out(
        h,
        AuditCommand::Range {
            from: now + chrono::Duration::hours(1),
            to: now + chrono::Duration::hours(2),
        },
    )
    .await;
    assert!(none.is_empty());
    let bad = run(
        &AuditCommand::Range {
            from: now,
            to: now - chrono::Duration::hours(1),
        },
        &h.store,
        &mut Vec::new(),
    )
    .await;
    assert!(matches!(bad, Err(AuditError::InvalidInput(_))));

    let (_, jsonl) = out(
        h,
        AuditCommand::Export {
            format: ExportFormat::Jsonl,
            room: None,
        },
    )
    .await;
    let exported: Vec<RecordedEvent> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl line"))
        .collect();
    assert_eq!(exported, h.store.read_all(1, 100).await.expect("read"));

    let (_, csv) = out(
        h,
        AuditCommand::Export {
            format: ExportFormat::Csv,
            room: Some("side, \"quoted\"".into()),
        },
    )
    .await;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[0].starts_with("position,stream,sequence"));
    assert!(
        lines[1].starts_with("4,\"room:side, \"\"quoted\"\"\",1,"),
        "quoted: {}",
        lines[1]
    );

    let (o, v) = out(
        h,
        AuditCommand::Verify {
            public_key: vec![],
            checkpoints: None,
        },
    )
    .await;
    assert_eq!((o, o.exit_code()), (AuditOutcome::Ok, 0));
    assert!(v.starts_with("chain OK: 5 events"), "{v}");
}

async fn cli_verify_names_the_tampered_position(h: &Harness) {
    seed(h).await;
    h.tamper("UPDATE events SET actor = 'mallory' WHERE position = 2")
        .await;
    let (o, v) = out(
        h,
        AuditCommand::Verify {
            public_key: vec![],
            checkpoints: None,
        },
    )
    .await;
    assert_eq!(o, AuditOutcome::ChainBroken { position: 2 });
    assert_ne!(o.exit_code(), 0);
    assert!(v.contains("BROKEN at position 2"), "{v}");
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    audit: AuditArgs,
}

#[test]
fn command_line_parses() {
    let cli = Cli::try_parse_from([
        "audit",
        "--database-url",
        "sqlite://x.db",
        "range",
        "--from",
        "2026-11-25T10:00:00Z",
        "--to",
        "2026-11-25T12:00:00+01:00",
    ])
    .expect("parses");
    assert_eq!(cli.audit.database_url.as_deref(), Some("sqlite://x.db"));
    let AuditCommand::Range { from, to } = cli.audit.command else {
        panic!("range");
    };
    assert_eq!((to - from).num_hours(), 1);
    assert!(Cli::try_parse_from(["audit", "range", "--from", "yesterday", "--to", "now"]).is_err());
    let cli = Cli::try_parse_from(["audit", "export", "--format", "csv"]).expect("parses");
    assert!(matches!(
        cli.audit.command,
        AuditCommand::Export {
            format: ExportFormat::Csv,
            room: None
        }
    ));
    assert!(Cli::try_parse_from(["audit", "export", "--format", "xml"]).is_err());
    assert!(Cli::try_parse_from(["audit", "verify"]).is_ok());
}

async fn get(
    app: &axum::Router,
    uri: &str,
    token: Option<&str>,
) -> (StatusCode, String, Option<String>) {
    let mut req = Request::builder().uri(uri);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = resp.status();
    let next = resp
        .headers()
        .get("x-next-after")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        String::from_utf8(body.to_vec()).expect("utf8"),
        next,
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).expect("json body")
}

async fn http_api(h: &Harness) {
    seed(h).await;
    let app = router(h.store.clone(), Arc::new(StaticAdminToken("s3cret".into())));
    let (status, _, _) = get(&app, "/audit/rooms", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = get(&app, "/audit/rooms", Some("wrong")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, body, _) = get(&app, "/audit/rooms", Some("s3cret")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body).as_array().expect("list").len(), 2);

    let (status, body, _) = get(&app, "/audit/rooms/lobby/history?limit=2", Some("s3cret")).await;
    assert_eq!(status, StatusCode::OK);
    let page1 = json(&body);
    assert_eq!(page1["events"].as_array().expect("events").len(), 2);
    let next = page1["next_after"].as_u64().expect("cursor");
    let (_, body, _) = get(
        &app,
        &format!("/audit/rooms/lobby/history?limit=2&after={next}"),
        Some("s3cret"),
    )
    .await;
    let page2 = json(&body);
    assert_eq!(page2["events"].as_array().expect("events").len(), 2);
    assert_eq!(page2["events"][1]["event"]["type"], "ParticipantLeft");

    let (_, body, _) = get(&app, "/audit/participants/carol", Some("s3cret")).await;
    let carol = json(&body);
    assert_eq!(carol["events"].as_array().expect("events").len(), 1);
    assert!(carol["next_after"].is_null());

    let (status, body, _) = get(
        &app,
        "/audit/range?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z&limit=3",
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["next_after"], 3);
    let (status, _, _) = get(&app, "/audit/range?from=yesterday&to=now", Some("s3cret")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body, next) = get(&app, "/audit/export?format=csv&limit=2", Some("s3cret")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.lines().count(), 3);
    assert_eq!(next.as_deref(), Some("2"));
    let (_, body, next) = get(&app, "/audit/export?after=2", Some("s3cret")).await;
    assert_eq!(body.lines().count(), 3);
    assert_eq!(next, None);

    let (status, _, _) = get(
        &app,
        "/audit/rooms/lobby/history?limit=20000",
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, body, _) = get(&app, "/audit/verify", Some("s3cret")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["ok"], true);
    h.tamper("DELETE FROM events WHERE position = 3").await;
    let (_, body, _) = get(&app, "/audit/verify", Some("s3cret")).await;
    let v = json(&body);
    assert_eq!(v["ok"], false);
    assert_eq!(v["first_break"]["stream"], "room:lobby");
    assert_eq!(v["first_break"]["sequence"], 3);
    assert_eq!(v["first_break"]["kind"], "Missing");
}
