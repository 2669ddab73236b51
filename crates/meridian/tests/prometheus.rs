//! Debian's Prometheus against a local three-node region: the chart's recording and
//! alert rules load (`promtool check rules` passes), and under a load generator run the
//! HPA's metric query (prometheus-adapter's rule, `deploy/prometheus-adapter/values.yaml`)
//! returns each node's outbound video tracks and the KEDA trigger's query (the chart's
//! `autoscaling.keda.joinRateQuery`) returns the join rate the run created.
//!
//! Needs the local Postgres (`scripts/start-postgres.sh`); installs Prometheus with
//! `scripts/install-deploy-tools.sh` when it is missing. Everything it starts (nodes,
//! loadgen, Prometheus) is stopped when it ends, also on failure.

mod region;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use region::Region;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ensure_prometheus() {
    let have = |t: &str| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !(have("prometheus") && have("promtool")) {
        let ok = Command::new("bash")
            .arg(repo().join("scripts/install-deploy-tools.sh"))
            .status()
            .expect("bash runs")
            .success();
        assert!(
            ok,
            "scripts/install-deploy-tools.sh failed to install prometheus"
        );
    }
    assert!(have("prometheus"), "prometheus is not installed");
    assert!(have("promtool"), "promtool is not installed");
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET over HTTP/1.0 on loopback: (status, body).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((status, body.to_string()))
}

/// Runs an instant query; returns (labels, value) per series.
fn query(prom: &str, q: &str) -> Vec<(serde_json::Value, f64)> {
    let (status, body) =
        http_get(prom, &format!("/api/v1/query?query={}", encode(q))).expect("query Prometheus");
    assert_eq!(status, 200, "query {q}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
    v["data"]["result"]
        .as_array()
        .expect("vector result")
        .iter()
        .map(|r| {
            let value: f64 = r["value"][1]
                .as_str()
                .expect("sample value")
                .parse()
                .expect("number");
            (r["metric"].clone(), value)
        })
        .collect()
}

/// The value of `key: '…'` on its line of a YAML file (the chart's query strings).
fn yaml_string(file: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(file).expect("read YAML");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{} has no {key}", file.display()));
    let v = line.split_once(':').expect("key: value").1.trim();
    v.trim_matches('\'').to_string()
}

/// A node's own reading of a metric (the truth the query must match), from its
/// internal listener.
async fn scrape(node: &region::NodeProc, metric: &str) -> f64 {
    let body = node.metrics().await;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{metric} ")))
        .unwrap_or_else(|| panic!("{} exports no {metric}", node.id))
        .trim()
        .parse()
        .expect("number")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpa_and_keda_queries_return_what_the_load_created() {
    ensure_prometheus();
    let rules = repo().join("deploy/helm/meridian/files/rules.yaml");
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("promtool runs");
    assert!(
        check.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    let region = Region::start("prom", 3, &["--lease-period-ms", "100"]).await;
    for n in &region.nodes {
        assert_eq!(http_get(&n.http, "/healthz").expect("healthz").0, 200);
        // Ready: the node holds its lease. Bounded: the first renewal is 100 ms away.
        let deadline = Instant::now() + Duration::from_secs(5);
        while http_get(&n.http, "/readyz").expect("readyz").0 != 200 {
            assert!(Instant::now() < deadline, "{} never became ready", n.id);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // Prometheus scrapes the three nodes' internal listeners every second with a client
    // certificate (as the chart's ServiceMonitor does), labelled like pods in Kubernetes.
    let dir = region.data_dir.join("prometheus");
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    let mut targets = String::new();
    for n in &region.nodes {
        targets.push_str(&format!(
            "      - targets: ['{}']\n        labels: {{pod: '{}', region: local}}\n",
            n.internal, n.id
        ));
    }
    let pki = region.data_dir.join(meridian_server::internal::DEV_DIR);
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - '{0}'\n\
         scrape_configs:\n  - job_name: meridian\n    scheme: https\n    tls_config:\n      \
         ca_file: '{1}'\n      cert_file: '{2}'\n      key_file: '{3}'\n    static_configs:\n{targets}",
        rules.canonicalize().expect("rules path").display(),
        pki.join("ca.pem").display(),
        pki.join("client.pem").display(),
        pki.join("client.key").display(),
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
    let prom = format!("127.0.0.1:{}", free_port());
    let _prometheus = Guard(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http_get(&prom, "/-/ready").is_ok_and(|(s, _)| s == 200) {
        assert!(Instant::now() < deadline, "Prometheus not ready in 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every node reports its build.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let builds = query(&prom, "meridian_build_info");
        let versions: Vec<&str> = builds
            .iter()
            .filter(|(_, v)| *v == 1.0)
            .filter_map(|(m, _)| m["version"].as_str())
            .collect();
        if versions == [env!("CARGO_PKG_VERSION"); 3] {
            break;
        }
        assert!(Instant::now() < deadline, "meridian_build_info: {builds:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every rule of the chart loaded and evaluates.
    let (_, body) = http_get(&prom, "/api/v1/rules").expect("rules");
    let v: serde_json::Value = serde_json::from_str(&body).expect("rules JSON");
    let groups = v["data"]["groups"].as_array().expect("groups");
    let loaded: usize = groups
        .iter()
        .map(|g| g["rules"].as_array().map_or(0, Vec::len))
        .sum();
    let in_file = std::fs::read_to_string(repo().join("deploy/helm/meridian/files/rules.yaml"))
        .expect("rules file")
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("- alert:") || l.starts_with("- record:")
        })
        .count();
    assert_eq!(groups.len(), 2, "{body}");
    assert!(in_file >= 17, "the rules file has its rules: {in_file}");
    assert_eq!(loaded, in_file, "recording and alert rules loaded: {body}");

    // Every node scraped (its counters seen at their value before the load) first.
    let deadline = Instant::now() + Duration::from_secs(20);
    while query(&prom, "sum(up{job=\"meridian\"})")
        .first()
        .map_or(0.0, |s| s.1)
        != 3.0
    {
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the 3 nodes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500));

    // Load: 4 publishers and 5 subscribers in 2 rooms, first joins round robin over the
    // three nodes. Room 0 is placed on node-a (pub-0 joins it first), room 1 on node-b
    // (pub-1); clients of a room joining through another node are redirected. Publishers
    // do not subscribe, so room 0 forwards 2 publishers × 3 subscribers = 6 video
    // tracks on node-a, room 1 2 × 2 = 4 on node-b, and node-c forwards none.
    let nodes = region.urls().join(",");
    let mut loadgen = Guard(
        Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["loadgen", "--nodes", &nodes, "--publishers", "4"])
            .args(["--subscribers", "5", "--rooms", "2", "--warmup", "2s"])
            .args(["--duration", "40s", "--layer-kbps", "40,80,160"])
            .arg("--data-dir")
            .arg(&region.data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("loadgen starts"),
    );
    let expected = [("node-a", 6.0), ("node-b", 4.0), ("node-c", 0.0)];

    // The HPA's metric: prometheus-adapter's metricsQuery for the pods of the release,
    // with the adapter's template filled in as it does for a Pods metric.
    let adapter = repo().join("deploy/prometheus-adapter/values.yaml");
    let hpa_query = yaml_string(&adapter, "metricsQuery")
        .replace("<<.Series>>", "meridian_outbound_video_tracks")
        .replace(
            "<<.LabelMatchers>>",
            "job=\"meridian\",pod=~\"node-a|node-b|node-c\"",
        )
        .replace("<<.GroupBy>>", "pod");
    let per_pod = |q: &str| {
        let mut got: Vec<(String, f64)> = query(&prom, q)
            .into_iter()
            .map(|(m, v)| (m["pod"].as_str().unwrap_or("?").to_string(), v))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        got
    };
    let want: Vec<(String, f64)> = expected.iter().map(|(p, v)| (p.to_string(), *v)).collect();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut got = Vec::new();
    while Instant::now() < deadline {
        got = per_pod(&hpa_query);
        if got == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("HPA query {hpa_query}\n  → {got:?}");
    assert_eq!(got, want, "the HPA query per pod while the load runs");
    // The same figures the nodes report themselves.
    for n in &region.nodes {
        let own = scrape(n, "meridian_outbound_video_tracks").await;
        let want = expected.iter().find(|e| e.0 == n.id).expect("node").1;
        assert_eq!(own, want, "{} reports {own} outbound video tracks", n.id);
    }
    // KEDA's steady-state trigger (the chart's outboundTracksQuery; no namespace label
    // outside Kubernetes) and the recording rule the dashboard uses (evaluated every
    // second: bounded wait) both see the region's 10 tracks.
    let values = repo().join("deploy/helm/meridian/values.yaml");
    let keda_tracks =
        yaml_string(&values, "outboundTracksQuery").replace("{{ .Release.Namespace }}", "");
    for q in [keda_tracks.as_str(), "meridian:outbound_video_tracks:sum"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sum = query(&prom, q);
            if sum.len() == 1 && sum[0].1 == 10.0 {
                println!("{q}\n  → 10");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{q}: {sum:?}, want the region's 10 outbound video tracks"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    // KEDA's burst trigger: the chart's joinRateQuery (its namespace matcher empty, as
    // no namespace label exists outside Kubernetes) over the recording rule.
    let keda_query = yaml_string(&values, "joinRateQuery").replace("{{ .Release.Namespace }}", "");
    let mut joins = 0.0;
    for n in &region.nodes {
        joins += scrape(n, "meridian_joins_total").await;
    }
    assert_eq!(joins, 9.0, "every client joined once");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rate = 0.0;
    while Instant::now() < deadline {
        rate = query(&prom, &keda_query).first().map_or(0.0, |s| s.1);
        if rate > 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("KEDA query {keda_query}\n  → {rate} joins/s ({joins} joins)");
    // Nine joins within the last minute: at most 9/60 per second (with Prometheus'
    // extrapolation to the edges of a window only seconds old, up to twice that), and
    // more than none.
    assert!(
        rate > 0.0 && rate <= joins / 60.0 * 2.0,
        "join rate {rate} for {joins} joins in the last minute; raw: {:?}; recorded: {:?}",
        query(&prom, "meridian_joins_total"),
        query(&prom, "meridian:joins:rate1m"),
    );
    let direct = query(
        &prom,
        "sum(increase(meridian_joins_total{job=\"meridian\"}[5m]))",
    );
    assert!(
        (direct[0].1 - joins).abs() <= joins * 0.5,
        "increase over 5 min {} vs {joins} joins",
        direct[0].1
    );

    // When the load ends, the tracks go: the HPA query follows them down to zero.
    let deadline = Instant::now() + Duration::from_secs(90);
    let exit = loop {
        if let Some(s) = loadgen.0.try_wait().expect("wait loadgen") {
            break s;
        }
        assert!(Instant::now() < deadline, "loadgen did not finish");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(exit.success(), "loadgen failed: {exit}");
    let zero: Vec<(String, f64)> = expected.iter().map(|(p, _)| (p.to_string(), 0.0)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while per_pod(&hpa_query) != zero {
        assert!(
            Instant::now() < deadline,
            "tracks still counted after the load: {:?}",
            per_pod(&hpa_query)
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // An alert rule on real data: node-c killed, MeridianNodeDown goes pending.
    let c = region.index_of("node-c");
    region.nodes[c].signal("KILL");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http_get(&prom, "/api/v1/alerts").expect("alerts");
        let v: serde_json::Value = serde_json::from_str(&body).expect("alerts JSON");
        let down = v["data"]["alerts"].as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x["labels"]["alertname"] == "MeridianNodeDown" && x["labels"]["pod"] == "node-c"
            })
        });
        if down {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "MeridianNodeDown never fired: {body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(loadgen);
    drop(_prometheus);
    region.cleanup().await;
}
