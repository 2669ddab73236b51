//! The running node writes every room change to the event log before acknowledging
//! it: joins, publications, subscriptions, layer preferences and leaves, on SQLite and
//! on the local Postgres.

use std::time::Duration;

use meridian_client::{Client, ClientConfig};
use meridian_events::Event;
use meridian_protocol::Layer;
use meridian_store::Store;
use meridian_tests::{TestNode, start_node};

const PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A Postgres schema of the test's own, its store, and the node URL that uses it
/// (with the schema as `application_name`, so the test can find the node's connections).
async fn pg_schema(prefix: &str) -> (String, Store, String) {
    let schema = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    );
    let store = Store::connect_with_schema(PG, &schema)
        .await
        .expect("Postgres at 127.0.0.1:5432 (scripts/start-postgres.sh starts it)");
    let url = format!("{PG}?options=-csearch_path%3D{schema}&application_name={schema}");
    (schema, store, url)
}

async fn drop_schema(schema: &str, store: Store) {
    use sqlx::Connection;
    store.close().await;
    let mut c = sqlx::PgConnection::connect(PG).await.expect("connect");
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&mut c)
        .await
        .expect("drop the test's schema");
}

async fn a_call(t: &TestNode, room: &str) {
    let publisher = Client::join(ClientConfig::new(&t.url, t.token("alice", room, true)))
        .await
        .expect("publisher joins");
    let mut subs = Vec::new();
    for who in ["bob", "carol"] {
        let c = ClientConfig::subscriber(&t.url, t.token(who, room, false));
        subs.push(Client::join(c).await.expect("subscriber joins"));
    }
    for s in &subs {
        s.wait_for(Duration::from_secs(20), |st| st.video_tracks_with(5) == 1)
            .await
            .expect("media flows");
    }
    let video = subs[0]
        .stats()
        .tracks
        .iter()
        .find(|(_, t)| t.video)
        .map(|(id, _)| id.clone())
        .unwrap();
    subs[0].set_max_layer(&video, Layer::Low).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for s in subs {
        s.leave().await.expect("leave");
    }
    publisher.leave().await.expect("leave");
}

async fn check_history(store: &Store, room: &str) {
    let events: Vec<(String, Event)> = store
        .read_stream(&meridian_events::room_stream(room), 1, 1000)
        .await
        .expect("read the room's stream")
        .into_iter()
        .map(|e| (e.actor, e.event))
        .collect();
    let count = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|(_, e)| f(e)).count();
    // The first join places the room on the node (epoch 1), then opens it.
    assert!(
        matches!(events.first(), Some((actor, Event::RoomPlaced { node, epoch: 1 })) if actor == node),
        "{events:#?}"
    );
    assert!(
        matches!(events.get(1), Some((_, Event::RoomOpened))),
        "{events:#?}"
    );
    assert!(
        matches!(events.last(), Some((_, Event::RoomClosed))),
        "{events:#?}"
    );
    for who in ["alice", "bob", "carol"] {
        assert_eq!(
            count(&|e| matches!(e, Event::ParticipantJoined { identity, .. } if identity == who)),
            1,
            "{who} joined once: {events:#?}"
        );
    }
    assert_eq!(count(&|e| matches!(e, Event::TrackPublished { .. })), 2);
    // Real codec names, as the vocabulary says (not the track's kind).
    for codec in ["opus", "VP8"] {
        assert_eq!(
            count(&|e| matches!(e, Event::TrackPublished { codec: c, .. } if c == codec)),
            1,
            "{codec}: {events:#?}"
        );
    }
    assert_eq!(count(&|e| matches!(e, Event::Subscribed { .. })), 4);
    assert_eq!(
        // Layers are recorded as rids (`q` is the low layer).
        count(&|e| matches!(e, Event::PreferredLayerSet { layer, .. } if layer == "q")),
        1
    );
    assert_eq!(count(&|e| matches!(e, Event::TrackUnpublished { .. })), 2);
    assert_eq!(count(&|e| matches!(e, Event::ParticipantLeft { .. })), 3);
    // A participant's publication comes after its join, its leave after both.
    let pos = |f: &dyn Fn(&(String, Event)) -> bool| events.iter().position(f).unwrap();
    let joined = pos(&|(a, e)| a == "alice" && matches!(e, Event::ParticipantJoined { .. }));
    let published = pos(&|(a, e)| a == "alice" && matches!(e, Event::TrackPublished { .. }));
    let left = pos(&|(a, e)| a == "alice" && matches!(e, Event::ParticipantLeft { .. }));
    assert!(joined < published && published < left, "{events:#?}");
    let report = store.verify_chain().await.expect("verify");
    assert!(report.first_break.is_none(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_log_holds_every_change_of_a_call() {
    let t = start_node(|_| {}).await;
    let dir = t.data_dir.clone();
    a_call(&t, "logged").await;
    // Everything acknowledged is stored: read it back through a second handle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let store = Store::open_embedded(&dir)
        .await
        .expect("open the node's log");
    check_history(&store, "logged").await;
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_log_holds_every_change_of_a_call() {
    let (schema, store, url) = pg_schema("meridian_node").await;
    let t = start_node(|c| c.node.database_url = Some(url.clone())).await;
    a_call(&t, "logged-pg").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    check_history(&store, "logged-pg").await;
    t.node.shutdown().await;
    drop_schema(&schema, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_api_answers_admin_tokens_only() {
    let t = start_node(|_| {}).await;
    a_call(&t, "audited").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let get = |path: &'static str, token: Option<String>| {
        let t = &t;
        async move { t.internal("GET", path, token.as_deref()).await }
    };
    assert_eq!(get("/audit/rooms", None).await.0, 401);
    let viewer = t.token("viewer", "audited", false);
    assert_eq!(get("/audit/rooms", Some(viewer)).await.0, 403);
    let admin = t
        .keys
        .sign(
            &meridian_auth::Claims::new(
                "auditor",
                "*",
                meridian_auth::unix_now(),
                Duration::from_secs(60),
            )
            .with_grants(meridian_auth::Grants::admin()),
        )
        .unwrap();
    let (status, body) = get("/audit/rooms/audited/history", Some(admin.clone())).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("ParticipantJoined") && body.contains("alice"),
        "{body}"
    );
    let (status, body) = get("/audit/verify", Some(admin)).await;
    assert_eq!(status, 200, "{body}");
    t.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_rides_out_a_postgres_connection_drop() {
    let (schema, store, url) = pg_schema("meridian_drop").await;
    let t = start_node(|c| c.node.database_url = Some(url.clone())).await;
    let first = Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("before", "drop", false),
    ))
    .await
    .expect("join before the drop");
    // Kill every connection the node holds to the log.
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(PG).await.expect("connect");
    let killed: i64 = sqlx::query_scalar(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = '{schema}'"
    ))
    .fetch_one(&mut admin)
    .await
    .expect("terminate the node's connections");
    assert!(killed >= 1, "the node holds connections to the log");
    // Joins after the drop are acknowledged only once stored, and all are stored.
    let mut ids = vec![first.stats().participant_id];
    for i in 0..3 {
        let c = Client::join(ClientConfig::subscriber(
            &t.url,
            t.token(&format!("after{i}"), "drop", false),
        ))
        .await
        .expect("join after the drop");
        ids.push(c.stats().participant_id);
    }
    let joined: Vec<String> = store
        .read_stream(&meridian_events::room_stream("drop"), 1, 1000)
        .await
        .expect("read")
        .into_iter()
        .filter_map(|e| match e.event {
            Event::ParticipantJoined { participant_id, .. } => Some(participant_id),
            _ => None,
        })
        .collect();
    for id in &ids {
        assert!(
            joined.contains(id),
            "acknowledged join {id} is stored: {joined:?}"
        );
    }
    assert!(store.verify_chain().await.unwrap().first_break.is_none());
    t.node.shutdown().await;
    drop_schema(&schema, store).await;
}
