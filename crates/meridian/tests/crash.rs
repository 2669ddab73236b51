//! A node killed with SIGKILL during a burst of joins leaves a log in which every
//! acknowledged join is present and whose hash chain verifies.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use meridian_auth::{Claims, Grants, KeySet};
use meridian_events::Event;
use meridian_protocol::{ClientMessage, ServerMessage};
use meridian_store::Store;
use tokio_tungstenite::tungstenite::Message;

const JOINS: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_joins_survive_sigkill() {
    let dir = std::env::temp_dir().join(format!("meridian-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The node's log, shown if the assertions below fail.
    let log_path = dir.with_extension("log");
    let log_file = std::fs::File::create(&log_path).expect("a log file in the temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--media-addr",
            "127.0.0.1:0",
        ])
        .args([
            "--wt-addr",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("meridian serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let listening: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    let url = format!(
        "ws://{}/signal",
        listening["http"].as_str().expect("http addr")
    );
    let keys = KeySet::load(&dir.join("keys")).expect("the node's keys");

    // A burst of joins; each task reports the participant id once `joined` arrived.
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..JOINS {
        let claims = Claims::new(
            format!("p{i}"),
            "burst",
            meridian_auth::unix_now(),
            Duration::from_secs(60),
        )
        .with_grants(Grants::subscriber());
        let token = keys.sign(&claims).expect("token");
        let url = url.clone();
        let acked = acked_tx.clone();
        tokio::spawn(async move {
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
                return;
            };
            let join = ClientMessage::Join {
                token,
                resume: None,
                version: meridian_protocol::PROTOCOL_VERSION,
                auto_subscribe: false,
                client: None,
            };
            if ws.send(Message::text(join.encode())).await.is_err() {
                return;
            }
            while let Ok(Some(Ok(Message::Text(t)))) =
                tokio::time::timeout(Duration::from_secs(10), ws.next()).await
            {
                if let Ok(ServerMessage::Joined { participant_id, .. }) =
                    ServerMessage::decode(t.as_bytes())
                {
                    let _ = acked.send(participant_id);
                    // Keep the connection open until the node dies.
                    let _ = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
                    return;
                }
            }
        });
    }
    drop(acked_tx);
    // Kill the node in the middle of the burst.
    let mut acked = Vec::new();
    while acked.len() < JOINS / 3 {
        match tokio::time::timeout(Duration::from_secs(10), acked_rx.recv()).await {
            Ok(Some(id)) => acked.push(id),
            _ => break,
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    // Acknowledgements already on their way were sent before the kill: count them too.
    while let Ok(Some(id)) = tokio::time::timeout(Duration::from_millis(200), acked_rx.recv()).await
    {
        acked.push(id);
    }
    assert!(
        acked.len() >= JOINS / 3,
        "only {} joins acknowledged",
        acked.len()
    );

    let store = Store::open_embedded(&dir)
        .await
        .expect("the log opens after the crash");
    let joined: Vec<String> = store
        .read_stream(&meridian_events::room_stream("burst"), 1, 10_000)
        .await
        .expect("read")
        .into_iter()
        .filter_map(|e| match e.event {
            Event::ParticipantJoined { participant_id, .. } => Some(participant_id),
            _ => None,
        })
        .collect();
    for id in &acked {
        if !joined.contains(id) {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!(
                "acknowledged join {id} missing from the log ({} of {} acknowledged joins \
                 in it); the node's log:\n{log}",
                acked.iter().filter(|a| joined.contains(a)).count(),
                acked.len()
            );
        }
    }
    let report = store.verify_chain().await.expect("verify");
    assert!(report.first_break.is_none(), "{report:?}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&log_path);
}
