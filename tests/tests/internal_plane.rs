//! The internal plane (issue 17 item 7): `/metrics`, `/admin/*` and `/audit/*` are
//! served only on the internal listener, which requires a client certificate from the
//! configured CA, and picks up rotated certificate files without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meridian_server::internal::{InternalClient, TlsFiles, generate_pki};
use meridian_tests::start_node;

fn tmp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "meridian-internal-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn operator(dir: &Path) -> InternalClient {
    let f = TlsFiles::operator_client(dir);
    InternalClient::from_files(&f.client_cert, &f.client_key, &f.client_ca).expect("client")
}

/// A series' value in a metrics text, `None` when absent.
fn series(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_a_certificate_from_the_configured_ca_are_served() {
    let t = start_node(|_| {}).await;
    let addr = t.node.internal_addr;
    let dev = t.data_dir.join(meridian_server::internal::DEV_DIR);
    // The operator's certificate from the node's CA: served.
    let ok = operator(&dev)
        .get(addr, "/metrics", None)
        .await
        .expect("served");
    assert_eq!(ok.status, 200, "{}", ok.body);
    let now = meridian_auth::unix_now() as f64;
    for cert in [
        "internal_server",
        "internal_client",
        "internal_client_ca",
        "webtransport",
    ] {
        let at = series(
            &ok.body,
            &format!("meridian_certificate_expiry_seconds{{cert=\"{cert}\"}}"),
        )
        .unwrap_or_else(|| panic!("no expiry for {cert}:\n{}", ok.body));
        assert!(at > now + 86400.0, "{cert} expires at {at}");
    }
    // No client certificate: the handshake is refused, no HTTP answer.
    let bare = InternalClient::without_certificate(&dev.join("ca.pem")).unwrap();
    let err = bare.get(addr, "/metrics", None).await.expect_err("refused");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    // A certificate from another CA (trusting the node's CA for the server side):
    // refused as well.
    let foreign = tmp("foreign");
    generate_pki(&foreign, &["127.0.0.1"], 30).unwrap();
    let impostor = InternalClient::from_files(
        &foreign.join("client.pem"),
        &foreign.join("client.key"),
        &dev.join("ca.pem"),
    )
    .unwrap();
    let err = impostor
        .get(addr, "/admin/participants/p/remove", None)
        .await
        .expect_err("a foreign CA's certificate is refused");
    assert!(!err.to_string().is_empty());
    // The public listener has none of the internal routes.
    for path in ["/metrics", "/audit/rooms", "/admin/participants/p/remove"] {
        let body = meridian_tests::http_get(&format!("http://{}{path}", t.node.http_addr)).await;
        assert!(!body.contains("meridian_build_info"), "{path}: {body}");
    }
    t.node.shutdown().await;
    let _ = std::fs::remove_dir_all(foreign);
}

/// Lays out `pki` the way kubelet mounts a Secret: `..data` is a symlink to a
/// versioned folder, and each file a symlink through it; `swap` replaces `..data`
/// atomically, as a cert-manager rotation does.
fn mount(secret: &Path, version: &str, pki: &Path) {
    let dir = secret.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to) in [
        ("node.pem", "tls.crt"),
        ("node.key", "tls.key"),
        ("ca.pem", "ca.crt"),
    ] {
        std::fs::copy(pki.join(from), dir.join(to)).unwrap();
    }
    let tmp_link = secret.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(version, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, secret.join("..data")).unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        let link = secret.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &link).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_served_without_a_restart() {
    let root = tmp("rotate");
    let (v1, v2, secret) = (root.join("pki-1"), root.join("pki-2"), root.join("secret"));
    generate_pki(&v1, &["127.0.0.1"], 30).unwrap();
    generate_pki(&v2, &["127.0.0.1"], 60).unwrap();
    mount(&secret, "..v1", &v1);
    let s = secret.clone();
    let t = start_node(move |c| {
        c.internal.cert = Some(s.join("tls.crt"));
        c.internal.key = Some(s.join("tls.key"));
        c.internal.client_ca = Some(s.join("ca.crt"));
        c.internal.reload_interval_secs = 1;
    })
    .await;
    let addr = t.node.internal_addr;
    let expiry = "meridian_certificate_expiry_seconds{cert=\"internal_server\"}";
    let (old, new) = (operator(&v1), operator(&v2));
    let before = old.get(addr, "/metrics", None).await.expect("v1 served");
    let at_v1 = series(&before.body, expiry).expect("expiry");
    assert!(
        new.get(addr, "/metrics", None).await.is_err(),
        "v2's client does not trust v1's server and is not trusted by v1's CA"
    );

    mount(&secret, "..v2", &v2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        if let Ok(r) = new.get(addr, "/metrics", None).await {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated certificates were not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(after.status, 200);
    let at_v2 = series(&after.body, expiry).expect("expiry");
    assert!(
        at_v2 > at_v1 + 29.0 * 86400.0,
        "the expiry metric follows the new certificate: {at_v1} → {at_v2}"
    );
    assert!(
        series(
            &after.body,
            "meridian_certificate_reloads_total{result=\"ok\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{}",
        after.body
    );
    assert!(
        old.get(addr, "/metrics", None).await.is_err(),
        "the old CA's clients are refused after the rotation"
    );
    // A half-written rotation (a key that does not match) keeps the working set.
    std::fs::write(secret.join("..v2/tls.key"), b"not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let still = new.get(addr, "/metrics", None).await.expect("still served");
    assert!(
        series(
            &still.body,
            "meridian_certificate_reloads_total{result=\"error\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{}",
        still.body
    );
    t.node.shutdown().await;
    let _ = std::fs::remove_dir_all(root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_metrics_listener_is_opt_in_and_serves_only_metrics() {
    let t = start_node(|c| c.internal.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let plain = t.node.metrics_addr.expect("configured");
    let body = meridian_tests::http_get(&format!("http://{plain}/metrics")).await;
    assert!(body.contains("meridian_build_info"), "{body}");
    let other = meridian_tests::http_get(&format!("http://{plain}/audit/rooms")).await;
    assert!(!other.contains("rooms"), "{other}");
    t.node.shutdown().await;
    let t = start_node(|_| {}).await;
    assert_eq!(t.node.metrics_addr, None, "off unless configured");
    t.node.shutdown().await;
}

/// The WebTransport certificate (`webtransport.tls_cert`/`tls_key`, from cert-manager
/// in a cluster) is re-read too: a renewed pair serves new sessions without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_webtransport_certificate_is_served_without_a_restart() {
    let root = tmp("wt-rotate");
    let (v1, v2) = (root.join("pki-1"), root.join("pki-2"));
    // Under 14 days: what certificate hashes (as browsers use them) accept.
    generate_pki(&v1, &["127.0.0.1", "localhost"], 10).unwrap();
    generate_pki(&v2, &["127.0.0.1", "localhost"], 12).unwrap();
    let (cert, key) = (root.join("wt.crt"), root.join("wt.key"));
    std::fs::copy(v1.join("node.pem"), &cert).unwrap();
    std::fs::copy(v1.join("node.key"), &key).unwrap();
    let (c, k) = (cert.clone(), key.clone());
    let t = start_node(move |cfg| {
        cfg.webtransport.tls_cert = Some(c);
        cfg.webtransport.tls_key = Some(k);
        cfg.internal.reload_interval_secs = 1;
    })
    .await;
    let hash = |dir: &Path| {
        let dir = dir.to_path_buf();
        async move {
            let id =
                wtransport::Identity::load_pemfiles(dir.join("node.pem"), dir.join("node.key"))
                    .await
                    .unwrap();
            id.certificate_chain().as_slice()[0].hash()
        }
    };
    let (h1, h2) = (hash(&v1).await, hash(&v2).await);
    let url = format!("https://127.0.0.1:{}/signal", t.node.wt_addr.port());
    let connects = |h: wtransport::tls::Sha256Digest| {
        let url = url.clone();
        async move {
            let config = wtransport::ClientConfig::builder()
                .with_bind_address("127.0.0.1:0".parse().unwrap())
                .with_server_certificate_hashes([h])
                .build();
            let endpoint = wtransport::Endpoint::client(config).unwrap();
            matches!(
                tokio::time::timeout(Duration::from_secs(5), endpoint.connect(&url)).await,
                Ok(Ok(_))
            )
        }
    };
    let expiry = "meridian_certificate_expiry_seconds{cert=\"webtransport\"}";
    assert!(
        connects(h1.clone()).await,
        "the first certificate is served"
    );
    let at_v1 = series(&t.metrics_text().await, expiry).expect("expiry");
    std::fs::copy(v2.join("node.pem"), &cert).unwrap();
    std::fs::copy(v2.join("node.key"), &key).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !connects(h2.clone()).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !connects(h1).await,
        "the old certificate is no longer served"
    );
    let at_v2 = series(&t.metrics_text().await, expiry).expect("expiry");
    assert!(at_v2 > at_v1 + 86400.0, "expiry follows: {at_v1} → {at_v2}");
    t.node.shutdown().await;
    let _ = std::fs::remove_dir_all(root);
}
