//! Issue 15 item 4 with a real node and the Rust client: a media path that dies while
//! signaling stays up is repaired by an ICE restart, on the same participant, without
//! a reconnection.

use std::time::{Duration, Instant};

use meridian_client::{Client, ClientConfig};
use meridian_tests::start_node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_media_path_comes_back_by_ice_restart_on_the_same_participant() {
    let t = start_node(|_| {}).await;
    let publisher = Client::join(ClientConfig::new(&t.url, t.token("alice", "r1", true)))
        .await
        .expect("publisher joins");
    let sub = Client::join(ClientConfig::subscriber(
        &t.url,
        t.token("bob", "r1", false),
    ))
    .await
    .expect("subscriber joins");
    let before = sub
        .wait_for(Duration::from_secs(30), |st| st.video_tracks_with(30) == 1)
        .await
        .unwrap_or_else(|st| panic!("no video before the cut: {st:#?}"));
    let pub_before = publisher.stats();

    // Both clients lose their media path for 6 s; signaling stays up.
    let cut = Duration::from_secs(6);
    publisher.cut_media(cut).await;
    sub.cut_media(cut).await;
    let cut_at = Instant::now();
    tokio::time::sleep(cut).await;
    let at_restore = sub.stats().video_frames();

    let after = sub
        .wait_for(Duration::from_secs(20), |st| {
            st.video_frames() >= at_restore + 60
        })
        .await
        .unwrap_or_else(|st| panic!("video did not come back after the cut: {st:#?}"));
    let back_after = cut_at.elapsed();
    let pub_after = publisher.stats();
    for (who, b, a) in [("alice", &pub_before, &pub_after), ("bob", &before, &after)] {
        assert_eq!(
            a.participant_id, b.participant_id,
            "{who} is the same participant"
        );
        assert_eq!(a.losses, 0, "{who}'s signaling was never lost");
        assert_eq!(a.reconnects, 0, "{who} did not reconnect");
        assert!(a.ice_restarts >= 1, "{who} restarted ICE: {a:#?}");
    }
    assert_eq!(
        pub_after.published, pub_before.published,
        "alice's tracks stay"
    );
    assert_eq!(
        after.tracks.keys().collect::<Vec<_>>(),
        before.tracks.keys().collect::<Vec<_>>(),
        "bob receives the same tracks"
    );
    eprintln!(
        "media back {:?} after a {cut:?} cut; restarts: alice {}, bob {}",
        back_after, pub_after.ice_restarts, after.ice_restarts
    );
    publisher.leave().await.expect("leave");
    sub.leave().await.expect("leave");
    t.node.shutdown().await;
}

/// `POST /dev/cut-media` on `url`'s host with `body`: the status code.
async fn post_cut(url: &str, body: &str) -> u16 {
    meridian_tests::dev_post(url, "/dev/cut-media", body).await
}

/// The cut is a dev-mode tool: absent without `--dev`, bounded and checked with it.
#[tokio::test]
async fn cut_media_exists_only_in_dev_mode_and_checks_its_input() {
    let plain = start_node(|_| {}).await;
    let body = r#"{"participant_id":"PA_1","ms":1000}"#;
    assert_eq!(
        post_cut(&plain.url, body).await,
        404,
        "no such route without --dev"
    );
    plain.node.shutdown().await;

    let dev = start_node(|c| c.http.dev = true).await;
    assert_eq!(post_cut(&dev.url, body).await, 404, "unknown participant");
    let too_long = r#"{"participant_id":"PA_1","ms":600000}"#;
    assert_eq!(post_cut(&dev.url, too_long).await, 400, "more than 60 s");
    assert_eq!(post_cut(&dev.url, "{").await, 400, "malformed body");
    let client = Client::join(ClientConfig::subscriber(
        &dev.url,
        dev.token("bob", "r1", false),
    ))
    .await
    .expect("bob joins");
    let id = client.stats().participant_id;
    let ok = format!(r#"{{"participant_id":"{id}","ms":1000}}"#);
    assert_eq!(post_cut(&dev.url, &ok).await, 204, "bob's media is cut");
    client.leave().await.expect("leave");
    dev.node.shutdown().await;
}
