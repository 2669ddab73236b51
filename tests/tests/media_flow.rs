//! One publisher, three subscribers: everyone receives audio and video through a real node.

use std::time::Duration;

use meridian_client::{Client, ClientConfig};
use meridian_tests::start_node;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_three_subscribers_receive_audio_and_video() {
    let t = start_node(|_| {}).await;
    let publisher = Client::join(ClientConfig::new(&t.url, t.token("alice", "r1", true)))
        .await
        .expect("publisher joins");
    let mut subs = Vec::new();
    for i in 0..3 {
        let c = ClientConfig::subscriber(&t.url, t.token(&format!("sub{i}"), "r1", false));
        subs.push(Client::join(c).await.expect("subscriber joins"));
    }
    for (i, s) in subs.iter().enumerate() {
        let stats = s
            .wait_for(Duration::from_secs(20), |st| {
                st.video_tracks_with(30) == 1 && st.audio_tracks_with(30) == 1
            })
            .await
            .unwrap_or_else(|st| panic!("subscriber {i} did not receive media: {st:#?}"));
        let video = stats
            .tracks
            .values()
            .find(|t| t.video)
            .expect("video track");
        assert!(
            video.keyframes >= 1,
            "the first forwarded video frame is a keyframe"
        );
        let median = {
            let mut l = video.latency_ms.clone();
            l.sort_by(|a, b| a.total_cmp(b));
            l[l.len() / 2]
        };
        assert!(median < 200.0, "loopback latency median {median} ms");
    }
    let p = publisher.stats();
    assert_eq!(
        p.published.len(),
        2,
        "audio and video tracks assigned: {:?}",
        p.published
    );
    assert!(t.metric("meridian_rtp_packets_forwarded_total").await > 0.0);
    assert_eq!(
        t.wait_metric(
            "meridian_outbound_video_tracks",
            3.0,
            Duration::from_secs(3)
        )
        .await,
        3.0
    );
    assert_eq!(
        t.wait_metric("meridian_participants", 4.0, Duration::from_secs(3))
            .await,
        4.0
    );
    assert_eq!(t.metric("meridian_rooms").await, 1.0);
    publisher.leave().await.expect("leave");
    for s in subs {
        s.leave().await.expect("leave");
    }
    assert_eq!(
        t.wait_metric("meridian_participants", 0.0, Duration::from_secs(3))
            .await,
        0.0
    );
    t.node.shutdown().await;
}

/// Two rooms on a node with two media workers: each room lands on its own worker
/// (least loaded), the one media port serves both, and every subscriber of both rooms
/// gets audio and video.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_on_two_media_workers_both_forward() {
    let t = start_node(|c| c.media.workers = 2).await;
    assert_eq!(t.node.media_workers, 2);
    let mut publishers = Vec::new();
    let mut subs = Vec::new();
    for room in ["wa", "wb"] {
        let p = ClientConfig::new(&t.url, t.token(&format!("{room}-pub"), room, true));
        publishers.push(Client::join(p).await.expect("publisher joins"));
        for i in 0..2 {
            let c = ClientConfig::subscriber(&t.url, t.token(&format!("{room}-{i}"), room, false));
            subs.push((room, Client::join(c).await.expect("subscriber joins")));
        }
    }
    for (room, s) in &subs {
        s.wait_for(Duration::from_secs(20), |st| {
            st.video_tracks_with(30) == 1 && st.audio_tracks_with(30) == 1
        })
        .await
        .unwrap_or_else(|st| panic!("a subscriber of {room} did not receive media: {st:#?}"));
    }
    for worker in 0..2 {
        let rooms = format!("meridian_media_worker_rooms{{worker=\"{worker}\"}}");
        let participants = format!("meridian_media_worker_participants{{worker=\"{worker}\"}}");
        assert_eq!(
            t.wait_metric(&rooms, 1.0, Duration::from_secs(3)).await,
            1.0,
            "worker {worker} hosts one room"
        );
        assert_eq!(t.metric(&participants).await, 3.0);
        let forwarded =
            format!("meridian_media_worker_packets_forwarded_total{{worker=\"{worker}\"}}");
        assert!(
            t.metric(&forwarded).await > 0.0,
            "worker {worker} forwarded packets"
        );
    }
    assert_eq!(t.metric("meridian_participants").await, 6.0);
    assert_eq!(t.metric("meridian_rooms").await, 2.0);
    for p in publishers {
        p.leave().await.expect("leave");
    }
    for (_, s) in subs {
        s.leave().await.expect("leave");
    }
    assert_eq!(
        t.wait_metric("meridian_participants", 0.0, Duration::from_secs(3))
            .await,
        0.0
    );
    t.node.shutdown().await;
}

/// Datagrams the kernel dropped on the UDP sockets bound to `port` (receive buffer
/// full), from `/proc/net/udp`'s `drops` column.
fn udp_drops(port: u16) -> u64 {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?.split(':').nth(1)?;
            let drops = fields.last()?.parse::<u64>().ok()?;
            (u16::from_str_radix(local, 16).ok()? == port).then_some(drops)
        })
        .sum()
}

/// A publisher's 50 KB video frames arrive as bursts of ~40 datagrams at a node whose
/// media socket buffer is smaller than a burst: the kernel drops part of some bursts,
/// yet every subscriber (on the second media worker, behind the handoff) gets every
/// frame: the node NACKs the publisher and forwards the retransmissions, and the
/// subscribers' own NACKs are answered. Video only: Opus has no retransmission.
///
/// How many datagrams the kernel drops depends on how fast the node drains the socket,
/// so the buffer shrinks run by run until a run sees drops; that first run (the least
/// loss that still overflows) is checked. The publisher (str0m's defaults) stops
/// answering NACKs once resends pass 15 % of its bytes, as a sender should.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_socket_buffer_is_repaired() {
    for kib in [128, 96, 72, 56, 48, 40, 32, 24] {
        let t = start_node(|c| {
            c.media.workers = 2;
            c.media.socket_buffer_bytes = kib * 1024;
        })
        .await;
        let port = t.node.media_addr.port();
        let mut p = ClientConfig::new(&t.url, t.token("big", "burst", true));
        p.publish_audio = false;
        p.layers = vec![meridian_protocol::Layer::High];
        p.layer_bitrates = [150_000, 500_000, 4_000_000];
        p.fps = 10;
        let publisher = Client::join(p).await.expect("publisher joins");
        let mut subs = Vec::new();
        for i in 0..3 {
            let c = ClientConfig::subscriber(&t.url, t.token(&format!("b{i}"), "burst", false));
            subs.push(Client::join(c).await.expect("subscriber joins"));
        }
        let mut received = Vec::new();
        for (i, s) in subs.iter().enumerate() {
            let stats = s
                .wait_for(Duration::from_secs(30), |st| st.video_tracks_with(50) == 1)
                .await
                .unwrap_or_else(|st| panic!("subscriber {i} did not get 50 frames: {st:#?}"));
            received.push(stats);
        }
        let drops = udp_drops(port);
        publisher.leave().await.expect("leave");
        for s in subs {
            s.leave().await.expect("leave");
        }
        t.node.shutdown().await;
        if drops == 0 {
            continue;
        }
        for (i, stats) in received.iter().enumerate() {
            let video = stats.tracks.values().find(|t| t.video).expect("video");
            assert_eq!(
                video.frames_missing, 0,
                "{kib} KiB buffer: subscriber {i} lost frames; the node dropped {drops} datagrams: {video:#?}"
            );
        }
        eprintln!("{kib} KiB socket buffer: {drops} datagrams dropped by the kernel, all repaired");
        return;
    }
    panic!("no socket buffer size made the bursts overflow");
}
