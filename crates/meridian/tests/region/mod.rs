//! A region on loopback for failover tests: several `meridian serve` processes sharing
//! one Postgres schema (a fresh one per test), with one key directory so every node
//! accepts the same tokens.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meridian_auth::{Claims, Grants, KeySet};
use meridian_client::{Client, ClientConfig};
use meridian_events::{RecordedEvent, RoomState, room_stream};
use meridian_store::Store;

/// The machine's Postgres (started by `scripts/start-postgres.sh`).
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// One node process.
pub struct NodeProc {
    pub id: String,
    pub child: Child,
    pub http: String,
    /// Its internal listener (mutual TLS: metrics, admin, audit).
    pub internal: String,
    /// Its WebSocket signaling URL.
    pub url: String,
    /// The region's shared data directory (development certificates under `internal/`).
    data_dir: PathBuf,
}

impl NodeProc {
    /// Sends a signal by name (`KILL`, `STOP`, `CONT`, `TERM`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} {}", self.child.id());
    }

    /// The node's `/metrics`, scraped from its internal listener with the operator's
    /// development client certificate.
    pub async fn metrics(&self) -> String {
        let dir = self.data_dir.join(meridian_server::internal::DEV_DIR);
        let f = meridian_server::internal::TlsFiles::operator_client(&dir);
        let client = meridian_server::internal::InternalClient::from_files(
            &f.client_cert,
            &f.client_key,
            &f.client_ca,
        )
        .expect("operator client certificate");
        let r = client
            .get(self.internal.parse().expect("address"), "/metrics", None)
            .await
            .expect("metrics from the internal listener");
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    }

    /// Waits (bounded) for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nodes of one region and their log.
pub struct Region {
    pub schema: String,
    pub store: Store,
    pub data_dir: PathBuf,
    pub keys: KeySet,
    pub nodes: Vec<NodeProc>,
    extra_args: Vec<String>,
}

impl Region {
    /// A fresh schema and `n` nodes (`node-a`, `node-b`, …) with `extra` flags.
    pub async fn start(name: &str, n: usize, extra: &[&str]) -> Region {
        // Tests of one binary run as threads of one process, possibly in the same
        // millisecond: a counter keeps their schemas apart.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let schema = format!(
            "{name}_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_millis()
        );
        let store = Store::connect_with_schema(PG_URL, &schema)
            .await
            .expect("Postgres is running (scripts/start-postgres.sh)");
        let data_dir = std::env::temp_dir().join(format!("meridian-{schema}"));
        let _ = std::fs::remove_dir_all(&data_dir);
        let keys = KeySet::load_or_create(&data_dir.join("keys")).expect("keys");
        let mut region = Region {
            schema,
            store,
            data_dir,
            keys,
            nodes: Vec::new(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..n {
            let id = format!("node-{}", (b'a' + i as u8) as char);
            let node = region.spawn(&id);
            region.nodes.push(node);
        }
        region
    }

    /// The database URL the nodes use: the schema as search path and as
    /// `application_name`, so a test can find (and kill) the nodes' connections.
    pub fn database_url(&self) -> String {
        format!(
            "{PG_URL}?options=-csearch_path%3D{0}&application_name={0}",
            self.schema
        )
    }

    /// Starts one node process and waits for its listening line.
    pub fn spawn(&self, id: &str) -> NodeProc {
        self.spawn_at(id, "127.0.0.1:0")
    }

    /// Replaces node `i` (killed before) by a new process with the same id and HTTP
    /// address, so clients' node lists stay valid.
    pub fn restart(&mut self, i: usize) {
        let (id, http) = (self.nodes[i].id.clone(), self.nodes[i].http.clone());
        let _ = self.nodes[i].child.kill();
        let _ = self.nodes[i].child.wait();
        self.nodes[i] = self.spawn_at(&id, &http);
    }

    /// Node `id`'s index.
    pub fn index_of(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Starts one node process on the HTTP address `http` (`127.0.0.1:0`: any port).
    pub fn spawn_at(&self, id: &str, http: &str) -> NodeProc {
        self.spawn_with(id, http, "127.0.0.1:0")
    }

    /// Starts one node process on the HTTP address `http` with its internal listener
    /// on `internal` (a fixed one when another region's directory names it).
    pub fn spawn_with(&self, id: &str, http: &str, internal: &str) -> NodeProc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["serve", "--http-addr", http, "--media-addr"])
            .args(["127.0.0.1:0", "--wt-addr", "127.0.0.1:0", "--node-id", id])
            .args(["--internal-listen", internal])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--database-url")
            .arg(self.database_url())
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("MERIDIAN_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("meridian serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("listening line");
        let listening: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("listening line {line:?}: {e}"));
        let http = listening["http"].as_str().expect("http addr").to_string();
        let internal = listening["internal"]
            .as_str()
            .expect("internal addr")
            .to_string();
        NodeProc {
            id: id.to_string(),
            child,
            url: format!("ws://{http}/signal"),
            http,
            internal,
            data_dir: self.data_dir.clone(),
        }
    }

    /// Every node's signaling URL, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// A token for `identity` in `room`.
    pub fn token(&self, identity: &str, room: &str, publish: bool) -> String {
        let grants = if publish {
            Grants::publisher()
        } else {
            Grants::subscriber()
        };
        let claims = Claims::new(
            identity,
            room,
            meridian_auth::unix_now(),
            Duration::from_secs(600),
        )
        .with_grants(grants);
        self.keys.sign(&claims).expect("token")
    }

    /// A room's whole stream.
    pub async fn history(&self, room: &str) -> Vec<RecordedEvent> {
        self.store
            .read_stream(&room_stream(room), 1, 10_000)
            .await
            .expect("read the room's stream")
    }

    /// A room's state folded from the log.
    pub async fn room(&self, room: &str) -> RoomState {
        self.store
            .replay_room(&room_stream(room))
            .await
            .expect("replay")
    }

    /// Drops the schema.
    pub async fn cleanup(self) {
        let schema = self.schema.clone();
        self.store.close().await;
        drop(self.nodes);
        let _ = std::fs::remove_dir_all(&self.data_dir);
        sqlx_drop(&schema).await;
    }
}

/// Drops the test's schema. The killed nodes' Postgres backends may still hold a
/// transaction's locks until the server notices their sockets closed (the DROP then
/// deadlocks with them: seen once in CI), so a failed DROP is tried again, 10 times
/// at most.
async fn sqlx_drop(schema: &str) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(PG_URL)
        .await
        .expect("Postgres is running");
    let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    let mut tries = 0;
    while let Err(e) = sqlx::query(&drop).execute(&mut c).await {
        tries += 1;
        assert!(tries < 10, "drop the test's schema: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a room's state says, without where it is hosted: the part a failover must keep.
pub fn membership(state: &RoomState) -> RoomState {
    RoomState {
        version: 0,
        node: None,
        epoch: 0,
        ..state.clone()
    }
}

/// A participant of a test room.
pub struct Member {
    /// Its room.
    pub room: String,
    /// Its identity.
    pub identity: String,
    /// The client.
    pub client: Client,
}

/// Light media so two cores carry 24 debug-build clients and three nodes.
pub fn light(config: ClientConfig) -> ClientConfig {
    ClientConfig {
        layer_bitrates: [40_000, 80_000, 160_000],
        fps: 15,
        keyframe_interval: 45,
        ..config
    }
}

/// `rooms` rooms of `publishers` + `subscribers`, all joining through `first`, with
/// every node of the region to fail over to.
pub async fn populate(
    region: &Region,
    first: usize,
    rooms: usize,
    publishers: usize,
    subscribers: usize,
) -> Vec<Member> {
    let urls = region.urls();
    let mut members = Vec::new();
    for r in 0..rooms {
        let room = format!("room-{r}");
        for i in 0..publishers + subscribers {
            let publish = i < publishers;
            let identity = format!("{}-{r}-{i}", if publish { "pub" } else { "sub" });
            let token = region.token(&identity, &room, publish);
            let config = if publish {
                ClientConfig::new(&urls[first], token)
            } else {
                ClientConfig::subscriber(&urls[first], token)
            };
            let config = light(config).with_fallback_urls(urls.clone());
            let client = Client::join(config).await.expect("joins");
            members.push(Member {
                room: room.clone(),
                identity,
                client,
            });
        }
    }
    members
}

/// Video tracks each member should receive: every publisher but itself.
pub fn expected_tracks(m: &Member, publishers: usize) -> usize {
    if m.identity.starts_with("pub") {
        publishers - 1
    } else {
        publishers
    }
}
