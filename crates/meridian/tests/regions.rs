//! Regions with real node processes: two regions on loopback (`eu`, `us`), each with
//! two `meridian serve` nodes and its own Postgres schema (its own log), one
//! `[[regions]]` directory, and an identity provider's key for `POST /login`.
//! Login picks the region by the reported RTTs and names the fallback order; a forged
//! or expired identity token gets a typed error; a token for one region is redirected
//! by the other; and when both nodes of a region are SIGKILLed its clients re-home to
//! the next region of their fallback order and receive media again.

mod region;

use std::time::Duration;

use meridian_auth::{Claims, Grants, KeySet};
use meridian_client::region::{login, login_with};
use meridian_client::{Client, ClientConfig, ClientError, ProbeConfig};
use meridian_protocol::region::RegionRtt;
use region::{Region, light};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

struct World {
    tmp: std::path::PathBuf,
    eu: Region,
    us: Region,
    /// The identity provider: signs identity tokens the nodes' `[login]` trusts.
    idp: KeySet,
}

impl World {
    async fn start() -> World {
        let tmp = std::env::temp_dir().join(format!(
            "meridian-regions-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&tmp).unwrap();
        let idp_dir = tmp.join("idp");
        let idp = KeySet::load_or_create(&idp_dir).expect("identity key");
        let config = tmp.join("regions.toml");
        let eu_ports = [free_port(), free_port()];
        let us_ports = [free_port(), free_port()];
        // Each node's internal listener: the first node's is its region's `relay_addr`.
        let eu_internal = [free_port(), free_port()];
        let us_internal = [free_port(), free_port()];
        let cfg = config.to_str().unwrap().to_string();
        let eu = Region::start("eu", 0, &["--config", &cfg, "--region", "eu"]).await;
        let us = Region::start("us", 0, &["--config", &cfg, "--region", "us"]).await;
        // One token key for both regions: a login at any node mints tokens every
        // region accepts.
        let key = std::fs::read_dir(eu.data_dir.join("keys"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "pem"))
            .expect("eu's key");
        std::fs::copy(
            &key,
            us.data_dir.join("keys").join(key.file_name().unwrap()),
        )
        .unwrap();
        // One internal CA for both regions (their nodes call each other over mutual
        // TLS): eu's development set, copied to us before any node starts.
        let ca = eu.data_dir.join(meridian_server::internal::DEV_DIR);
        meridian_server::internal::dev_pki(&ca, [127, 0, 0, 1].into()).expect("internal CA");
        let us_ca = us.data_dir.join(meridian_server::internal::DEV_DIR);
        std::fs::create_dir_all(&us_ca).unwrap();
        for f in std::fs::read_dir(&ca).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, us_ca.join(f.file_name().unwrap())).unwrap();
        }
        let entry = |id: &str, ports: &[u16; 2], internal: u16, log: String| {
            format!(
                "[[regions]]\nid = \"{id}\"\nsignal_urls = [\"ws://127.0.0.1:{a}/signal\", \"ws://127.0.0.1:{b}/signal\"]\n\
                 probe_url = \"http://127.0.0.1:{a}/probe\"\nrelay_addr = \"127.0.0.1:{internal}\"\nlog = \"{log}\"\n",
                a = ports[0],
                b = ports[1]
            )
        };
        std::fs::write(
            &config,
            format!(
                "[login]\nidentity_keys_dir = \"{}\"\n\n{}\n{}",
                idp_dir.display(),
                entry("eu", &eu_ports, eu_internal[0], eu.database_url()),
                entry("us", &us_ports, us_internal[0], us.database_url()),
            ),
        )
        .unwrap();
        let mut world = World { tmp, eu, us, idp };
        for (name, r, ports, internal) in [
            ("eu", &mut world.eu, eu_ports, eu_internal),
            ("us", &mut world.us, us_ports, us_internal),
        ] {
            for (i, (port, int)) in ports.iter().zip(internal).enumerate() {
                // Node ids are unique across regions (links are keyed by node).
                let node = r.spawn_with(
                    &format!("{name}-{i}"),
                    &format!("127.0.0.1:{port}"),
                    &format!("127.0.0.1:{int}"),
                );
                r.nodes.push(node);
            }
        }
        world
    }

    fn identity(&self, who: &str, room: &str, publish: bool) -> String {
        let claims = Claims::new(
            who,
            room,
            meridian_auth::unix_now(),
            Duration::from_secs(600),
        )
        .with_grants(if publish {
            Grants::publisher()
        } else {
            Grants::subscriber()
        })
        .with_audience("meridian-login");
        self.idp.sign(&claims).expect("identity token")
    }

    fn login_node(&self) -> String {
        format!("http://{}", self.eu.nodes[0].http)
    }

    async fn cleanup(self) {
        self.eu.cleanup().await;
        self.us.cleanup().await;
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// A raw `POST /login`: the status and the body.
async fn post_login(http: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
    let req = format!(
        "POST /login HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn rtts(eu: f64, us: f64) -> Vec<RegionRtt> {
    vec![
        RegionRtt {
            region: "eu".into(),
            samples_ms: vec![eu, eu + 1.0, eu + 500.0],
        },
        RegionRtt {
            region: "us".into(),
            samples_ms: vec![us, us + 1.0, us + 2.0],
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_chooses_by_rtt_refuses_bad_identities_and_other_regions_redirect() {
    let w = World::start().await;
    let node = w.login_node();
    let t = Duration::from_secs(5);

    // Lowest median RTT wins; the other region is the fallback.
    let answer = login_with(&node, &w.identity("alice", "r1", true), rtts(90.0, 12.0), t)
        .await
        .expect("login");
    assert_eq!(
        (answer.region.as_str(), answer.fallback.clone()),
        ("us", vec!["eu".to_string()])
    );
    assert_eq!(answer.routes.len(), 2);
    assert!(
        answer.reason.starts_with("us: lowest median RTT, 13 ms"),
        "{}",
        answer.reason
    );
    let claims =
        w.eu.keys
            .verify(&answer.routes[0].token, meridian_auth::unix_now())
            .unwrap();
    assert_eq!(claims.region.as_deref(), Some("us"));
    assert_eq!(claims.fallback, ["eu"]);
    assert_eq!((claims.sub.as_str(), claims.room.as_str()), ("alice", "r1"));
    assert!(claims.grants.publish);
    let eu_claims =
        w.eu.keys
            .verify(&answer.routes[1].token, meridian_auth::unix_now())
            .unwrap();
    assert_eq!(
        (eu_claims.region.as_deref(), eu_claims.fallback.clone()),
        (Some("eu"), vec!["us".to_string()])
    );

    // A real measurement: both regions answer their probes, five samples each.
    let measured = login(
        &node,
        &w.identity("bob", "r1", false),
        &ProbeConfig::default(),
    )
    .await
    .expect("login with probes");
    for r in &measured.rtts {
        assert_eq!(r.samples_ms.len(), 5, "{r:?}");
        assert!(r.samples_ms.iter().all(|s| *s < 1000.0), "{r:?}");
    }

    // Forged (another key with the same kid), expired, the wrong audience, garbage:
    // typed codes.
    let forger = KeySet::new(
        Some(
            meridian_auth::SigningKey::generate(meridian_auth::Algorithm::Es256, "dev-1").unwrap(),
        ),
        vec![],
    );
    let forged = forger
        .sign(
            &Claims::new(
                "mallory",
                "r1",
                meridian_auth::unix_now(),
                Duration::from_secs(60),
            )
            .with_audience("meridian-login"),
        )
        .unwrap();
    let expired = w
        .idp
        .sign(
            &Claims::new(
                "alice",
                "r1",
                meridian_auth::unix_now() - 3600,
                Duration::from_secs(60),
            )
            .with_audience("meridian-login"),
        )
        .unwrap();
    // Signed by the identity provider but for the access audience: not a login token.
    let access = w
        .idp
        .sign(&Claims::new(
            "alice",
            "r1",
            meridian_auth::unix_now(),
            Duration::from_secs(60),
        ))
        .unwrap();
    for (token, code) in [
        (forged, "token_bad_signature"),
        (expired, "token_expired"),
        (access, "token_wrong_audience"),
        ("not a token".to_string(), "token_malformed"),
    ] {
        match login_with(&node, &token, vec![], t).await {
            Err(ClientError::Login { code: got, .. }) => assert_eq!(got, code),
            other => panic!("expected {code}, got {other:?}"),
        }
    }

    // Hostile bodies: typed refusals, bounded sizes.
    let http = &w.eu.nodes[0].http;
    let (status, body) = post_login(http, "{not json").await;
    assert_eq!(status, 400);
    assert!(body.contains("\"code\":\"bad_request\""), "{body}");
    let (status, body) = post_login(http, r#"{"identity_token":"x","sneaky":1}"#).await;
    assert!(
        status == 400 && body.contains("bad_request"),
        "{status} {body}"
    );
    let many: Vec<String> = (0..33)
        .map(|i| format!(r#"{{"region":"r{i}","samples_ms":[1]}}"#))
        .collect();
    let (status, body) = post_login(
        http,
        &format!(r#"{{"identity_token":"x","rtts":[{}]}}"#, many.join(",")),
    )
    .await;
    assert!(
        status == 400 && body.contains("at most 32 regions"),
        "{status} {body}"
    );
    let huge = format!(r#"{{"identity_token":"{}"}}"#, "a".repeat(20_000));
    assert_eq!(post_login(http, &huge).await.0, 413);

    // A token for us presented in eu is redirected to us's first node.
    let at_eu = ClientConfig::subscriber(&w.eu.nodes[1].url, answer.routes[0].token.clone())
        .without_reconnect();
    match Client::join(at_eu).await {
        Err(ClientError::Redirected { region, url }) => {
            assert_eq!(region, "us");
            assert_eq!(url, w.us.nodes[0].url);
        }
        Err(e) => panic!("expected a redirect, got {e}"),
        Ok(_) => panic!("expected a redirect, got joined"),
    }
    w.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_dead_region_re_home_to_their_fallback_region() {
    let w = World::start().await;
    let node = w.login_node();
    let t = Duration::from_secs(5);
    let join = |identity: String, publish: bool, first: usize| {
        let node = node.clone();
        async move {
            let answer = login_with(&node, &identity, rtts(80.0, 10.0), t)
                .await
                .expect("login");
            assert_eq!(answer.region, "us");
            let base = if publish {
                ClientConfig::new("", "")
            } else {
                ClientConfig::subscriber("", "")
            };
            Client::join(light(base).with_login(&answer, first))
                .await
                .expect("joins us")
        }
    };
    let publisher = join(w.identity("pub", "room-x", true), true, 0).await;
    let subs = [
        join(w.identity("sub-0", "room-x", false), false, 0).await,
        join(w.identity("sub-1", "room-x", false), false, 1).await,
    ];
    for s in &subs {
        s.wait_for(Duration::from_secs(20), |st| st.video_tracks_with(10) == 1)
            .await
            .unwrap_or_else(|st| panic!("no media in us: {st:#?}"));
        assert_eq!(s.stats().region.as_deref(), Some("us"));
    }
    // Every node of us dies.
    for n in &w.us.nodes {
        n.signal("KILL");
    }
    for (i, s) in subs.iter().enumerate() {
        let frames = s.stats().video_frames();
        let st = s
            .wait_for(Duration::from_secs(20), |st| {
                st.rehomes == 1 && st.video_frames() > frames + 10
            })
            .await
            .unwrap_or_else(|st| panic!("subscriber {i} did not re-home with media: {st:#?}"));
        assert_eq!(st.region.as_deref(), Some("eu"));
        let rec = st.reconnect_history.last().expect("a reconnection record");
        assert_eq!(rec.rehomed_to.as_deref(), Some("eu"));
        let media_ms = rec.media_ms.expect("media after re-homing");
        assert!(media_ms < 15_000.0, "re-homed in {media_ms} ms");
        assert!(w.eu.urls().contains(&st.url), "{} is an eu node", st.url);
    }
    assert_eq!(publisher.stats().rehomes, 1);
    // The re-homed room is in eu's log, not written to us's.
    let history = w.eu.history("room-x").await;
    assert!(
        history
            .iter()
            .filter(|e| e.event.event_type() == "ParticipantJoined")
            .count()
            >= 3,
        "eu's log records the re-homed participants"
    );
    drop(publisher);
    drop(subs);
    w.cleanup().await;
}

/// The value of one series (`name{labels}` exactly as exported), 0 when absent.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Events of every node stream of `region`'s log.
async fn node_events(region: &Region) -> Vec<meridian_events::Event> {
    let mut out = Vec::new();
    for n in &region.nodes {
        let stream = format!("node:{}", n.id);
        let events = region
            .store
            .read_stream(&stream, 1, 10_000)
            .await
            .expect("a node stream");
        out.extend(events.into_iter().map(|e| e.event));
    }
    out
}

/// A relay-control request to `node`'s internal listener with the operator's
/// development client certificate (`with_cert`) or none, and `token`: `POST
/// /internal/region/parts` (answered to any node of a directory region) or, with
/// `load`, `GET /internal/relay/load` (a node of another region must be one its
/// region names live).
async fn internal_call(
    region: &Region,
    node: &region::NodeProc,
    token: &str,
    with_cert: bool,
    load: bool,
) -> Result<(u16, String), String> {
    let dir = region.data_dir.join(meridian_server::internal::DEV_DIR);
    let f = meridian_server::internal::TlsFiles::operator_client(&dir);
    let client = if with_cert {
        meridian_server::internal::InternalClient::from_files(
            &f.client_cert,
            &f.client_key,
            &f.client_ca,
        )
    } else {
        meridian_server::internal::InternalClient::without_certificate(&f.client_ca)
    }
    .expect("client");
    client
        .request_to(
            &node.internal,
            if load { "GET" } else { "POST" },
            if load {
                "/internal/relay/load"
            } else {
                "/internal/region/parts"
            },
            Some(token),
            if load {
                Vec::new()
            } else {
                br#"{"rooms":["cross"]}"#.to_vec()
            },
        )
        .await
        .map(|r| (r.status, r.body))
        .map_err(|e| e.to_string())
}

fn node_token(keys: &KeySet, node: &str, region: &str) -> String {
    let claims = Claims::new(
        format!("node:{node}"),
        meridian_auth::ANY_ROOM,
        meridian_auth::unix_now(),
        Duration::from_secs(60),
    )
    .with_grants(Grants::admin())
    .with_region(region)
    .with_audience("meridian-node");
    keys.sign(&claims).expect("node token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spans_two_regions_each_log_keeps_its_part_and_both_record_the_link() {
    let w = World::start().await;
    let node = w.login_node();
    let t = Duration::from_secs(5);
    // The publisher is nearest eu, the subscriber nearest us: one room, two regions.
    let publisher_login = login_with(
        &node,
        &w.identity("pub", "cross", true),
        rtts(10.0, 80.0),
        t,
    )
    .await
    .expect("login");
    assert_eq!(publisher_login.region, "eu");
    let publisher = Client::join(light(ClientConfig::new("", "")).with_login(&publisher_login, 0))
        .await
        .expect("the publisher joins eu");
    let sub_login = login_with(
        &node,
        &w.identity("sub", "cross", false),
        rtts(80.0, 10.0),
        t,
    )
    .await
    .expect("login");
    assert_eq!(sub_login.region, "us");
    let subscriber =
        Client::join(light(ClientConfig::subscriber("", "")).with_login(&sub_login, 0))
            .await
            .expect("the subscriber joins us");
    subscriber
        .wait_for(Duration::from_secs(20), |s| {
            s.video_tracks_with(10) >= 1 && s.audio_tracks_with(10) >= 1
        })
        .await
        .unwrap_or_else(|s| panic!("the us subscriber gets no eu media: {s:#?}"));
    assert_eq!(subscriber.stats().region.as_deref(), Some("us"));
    // The us client is told who publishes: the eu publisher, by id and identity.
    let publisher_id = publisher.stats().participant_id;
    let names = subscriber.stats().participant_names;
    assert_eq!(
        names
            .get(&publisher_id)
            .map(|(identity, _)| identity.as_str()),
        Some("pub"),
        "the us subscriber is told of the eu publisher: {names:?}"
    );
    // And the eu publisher is told of the us subscriber, who publishes nothing: from
    // the roster of its part.
    let sub_id = subscriber.stats().participant_id;
    publisher
        .wait_for(Duration::from_secs(10), |s| {
            s.participant_names
                .get(&sub_id)
                .is_some_and(|(identity, _)| identity == "sub")
        })
        .await
        .unwrap_or_else(|s| panic!("the eu publisher is told of the us subscriber: {s:#?}"));

    // Each region's log holds its own part only.
    let eu_room = w.eu.room("cross").await;
    let us_room = w.us.room("cross").await;
    let identities = |r: &meridian_events::RoomState| {
        let mut v: Vec<String> = r
            .participants
            .values()
            .map(|p| p.identity.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(identities(&eu_room), ["pub"], "{eu_room:#?}");
    assert_eq!(identities(&us_room), ["sub"], "{us_room:#?}");

    // Both logs record the link eu → us (who linked what).
    let linked = |events: &[meridian_events::Event]| {
        events.iter().any(|e| {
            matches!(e, meridian_events::Event::RegionRelayLinked { link }
                if link.room == "cross" && link.from_region == "eu" && link.to_region == "us")
        })
    };
    assert!(
        linked(&node_events(&w.eu).await),
        "eu's log records the link"
    );
    assert!(
        linked(&node_events(&w.us).await),
        "us's log records the link"
    );

    // The eu node hosting the publisher counts the bytes crossing to us, one copy
    // per track.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let host = eu_room.node.clone().expect("eu's part is placed");
    let eu_node = &w.eu.nodes[w.eu.index_of(&host)];
    let m = eu_node.metrics().await;
    let crossed = series(
        &m,
        r#"meridian_media_bytes_total{path="cross_region",peer_region="us"}"#,
    );
    assert!(crossed > 10_000.0, "bytes crossed to us: {crossed}");
    assert_eq!(
        series(
            &m,
            r#"meridian_region_boundary_copies_max{peer_region="us"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        series(&m, r#"meridian_region_boundary_tracks{peer_region="us"}"#),
        2.0
    );

    // Callers that are not nodes of a region of the directory are refused; a live
    // node of us is served (region/parts answers eu's part of the room).
    let cases = [
        ("mars-0", "mars", false, 403, "not_a_node"),
        ("us-9", "us", true, 403, "no_lease"),
        ("us-0", "us", true, 200, "participants"),
        ("us-0", "us", false, 200, r#""part":"cross""#),
    ];
    for (node, region, load, status, needle) in cases {
        let token = node_token(&w.eu.keys, node, region);
        let (got, body) = internal_call(&w.eu, eu_node, &token, true, load)
            .await
            .expect("an answer");
        assert_eq!(got, status, "{node} of {region}: {body}");
        assert!(body.contains(needle), "{node} of {region}: {body}");
    }
    let real = node_token(&w.eu.keys, "us-0", "us");
    assert!(
        internal_call(&w.eu, eu_node, &real, false, false)
            .await
            .is_err(),
        "no client certificate: no TLS session at all"
    );
    let m = eu_node.metrics().await;
    assert!(series(&m, r#"meridian_relay_refused_total{reason="not_a_node"}"#) >= 1.0);
    assert!(series(&m, r#"meridian_relay_refused_total{reason="no_lease"}"#) >= 1.0);
    // The publisher leaves eu: it leaves the us client's room too.
    publisher.leave().await.expect("the publisher leaves");
    subscriber
        .wait_for(Duration::from_secs(10), |s| {
            s.participants_left.contains(&publisher_id)
        })
        .await
        .unwrap_or_else(|s| panic!("the us subscriber is told the publisher left: {s:#?}"));
    drop(subscriber);
    w.cleanup().await;
}
