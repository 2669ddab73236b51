//! Choosing a region: fetch the directory, time each region's probe, log in.
//!
//! [`login`] is the whole flow: `GET {node}/regions` (ids and probe URLs), then
//! [`measure`] — a few `GET /probe` round trips per region on one kept-alive
//! connection (the first warms the connection up and is not counted), all regions at
//! once, each within a time bound — then `POST {node}/login` with the identity token
//! and the samples. The node ranks the regions
//! ([`meridian_protocol::region::rank_regions`]) and answers one token per region;
//! [`ClientConfig::with_login`](crate::ClientConfig::with_login) turns the answer into
//! a client that joins the chosen region and, when every node of it is gone, re-homes
//! to the next (see [`crate::Reconnector`]).
//!
//! Plain `http://` URLs only (the probe and login of this client are for tests, the
//! load generator and namespaces on one machine).

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use meridian_protocol::region::{
    LoginError, LoginRequest, LoginResponse, MAX_REGIONS, MAX_RTT_SAMPLES, RegionList, RegionRtt,
};
use tokio::net::TcpStream;

use crate::ClientError;

/// Largest HTTP answer body read, in bytes.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// How RTTs are measured.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    /// Samples per region (after one warm-up request); at most
    /// [`MAX_RTT_SAMPLES`].
    pub samples: usize,
    /// Longest time spent on one region (connect, warm-up and samples); a region that
    /// does not answer in time reports the samples it got (none: unreachable).
    pub region_timeout: Duration,
    /// Longest time for the directory and the login request each.
    pub request_timeout: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            samples: 5,
            region_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// What [`login`] measured and got.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionLogin {
    /// The node's answer: chosen region, fallback order, a token per region.
    pub response: LoginResponse,
    /// The samples sent, per region.
    pub rtts: Vec<RegionRtt>,
}

/// `host:port` and path of a plain `http://` URL.
fn split_http(url: &str) -> Result<(String, String), ClientError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        ClientError::Signaling(format!(
            "{}: only http:// URLs are supported",
            meridian_protocol::clip(url, 128)
        ))
    })?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return Err(ClientError::Signaling(format!("{url}: no host")));
    }
    Ok((host.to_string(), path.to_string()))
}

/// The scheme and authority of a URL (`http://host:port`), for node-relative paths.
/// A `ws://` signaling URL stands for its node's HTTP address.
fn base_of(url: &str) -> Result<String, ClientError> {
    let http = match url.strip_prefix("ws://") {
        Some(rest) => format!("http://{rest}"),
        None => url.to_string(),
    };
    let (host, _) = split_http(&http)?;
    Ok(format!("http://{host}"))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(host: &str) -> Result<Sender, ClientError> {
    let stream = TcpStream::connect(host).await?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Signaling(format!("http {host}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn send(
    sender: &mut Sender,
    host: &str,
    method: hyper::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Bytes), ClientError> {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Signaling(e.to_string()))?;
    sender
        .ready()
        .await
        .map_err(|e| ClientError::Signaling(format!("http {host}: {e}")))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Signaling(format!("http {host}: {e}")))?;
    let status = res.status().as_u16();
    let body = Limited::new(res.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| ClientError::Signaling(format!("http {host}: {e}")))?
        .to_bytes();
    Ok((status, body))
}

async fn request(
    url: &str,
    method: hyper::Method,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(u16, Bytes), ClientError> {
    let (host, path) = split_http(url)?;
    tokio::time::timeout(timeout, async {
        let mut sender = connect(&host).await?;
        send(&mut sender, &host, method, &path, body).await
    })
    .await
    .map_err(|_| ClientError::Timeout("HTTP request"))?
}

/// `GET {node}/regions`: the directory's region ids and probe URLs.
pub async fn directory(node: &str, timeout: Duration) -> Result<RegionList, ClientError> {
    let url = format!("{}/regions", base_of(node)?);
    let (status, body) = request(&url, hyper::Method::GET, None, timeout).await?;
    if status != 200 {
        return Err(ClientError::Signaling(format!(
            "GET {url}: HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )));
    }
    let mut list: RegionList = serde_json::from_slice(&body)
        .map_err(|e| ClientError::Signaling(format!("GET {url}: {e}")))?;
    list.regions.truncate(MAX_REGIONS);
    Ok(list)
}

/// Times `probe_url`: one warm-up request, then up to `samples` round trips on the
/// same connection, all within `timeout`. Returns what it measured (milliseconds),
/// possibly fewer than asked or none.
pub async fn probe(probe_url: &str, samples: usize, timeout: Duration) -> Vec<f64> {
    let samples = samples.min(MAX_RTT_SAMPLES);
    let mut out = Vec::with_capacity(samples);
    let Ok((host, path)) = split_http(probe_url) else {
        return out;
    };
    let _ = tokio::time::timeout(timeout, async {
        let mut sender = connect(&host).await?;
        send(&mut sender, &host, hyper::Method::GET, &path, None).await?;
        for _ in 0..samples {
            let t = Instant::now();
            let (status, _) = send(&mut sender, &host, hyper::Method::GET, &path, None).await?;
            if status != 200 {
                break;
            }
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok::<_, ClientError>(())
    })
    .await;
    out
}

/// Probes every region of `list` at once, each within `config.region_timeout`.
pub async fn measure(list: &RegionList, config: &ProbeConfig) -> Vec<RegionRtt> {
    let probes = list.regions.iter().take(MAX_REGIONS).map(|r| async move {
        RegionRtt {
            region: r.region.clone(),
            samples_ms: probe(&r.probe_url, config.samples, config.region_timeout).await,
        }
    });
    futures_util::future::join_all(probes).await
}

/// `POST {node}/login` with `identity_token` and the measured `rtts`. A refusal
/// becomes [`ClientError::Login`] with the node's code (`token_expired`,
/// `token_bad_signature`, `login_disabled`, …).
pub async fn login_with(
    node: &str,
    identity_token: &str,
    rtts: Vec<RegionRtt>,
    timeout: Duration,
) -> Result<LoginResponse, ClientError> {
    let url = format!("{}/login", base_of(node)?);
    let body = serde_json::to_vec(&LoginRequest {
        identity_token: identity_token.to_string(),
        rtts,
    })
    .map_err(|e| ClientError::Signaling(e.to_string()))?;
    let (status, body) = request(&url, hyper::Method::POST, Some(body), timeout).await?;
    if status != 200 {
        return Err(match serde_json::from_slice::<LoginError>(&body) {
            Ok(e) => ClientError::Login {
                code: e.code,
                message: e.message,
            },
            Err(_) => ClientError::Login {
                code: format!("http_{status}"),
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            },
        });
    }
    let response: LoginResponse = serde_json::from_slice(&body)
        .map_err(|e| ClientError::Signaling(format!("POST {url}: {e}")))?;
    if response.routes.is_empty() {
        return Err(ClientError::Signaling(format!(
            "POST {url}: no region in the answer"
        )));
    }
    Ok(response)
}

/// The whole flow: directory from `node`, probes, login.
pub async fn login(
    node: &str,
    identity_token: &str,
    config: &ProbeConfig,
) -> Result<RegionLogin, ClientError> {
    let list = directory(node, config.request_timeout).await?;
    let rtts = measure(&list, config).await;
    let response = login_with(node, identity_token, rtts.clone(), config.request_timeout).await?;
    Ok(RegionLogin { response, rtts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_are_split() {
        assert_eq!(
            split_http("http://10.0.0.1:7880/probe").unwrap(),
            ("10.0.0.1:7880".to_string(), "/probe".to_string())
        );
        assert_eq!(
            split_http("http://h:1").unwrap(),
            ("h:1".to_string(), "/".to_string())
        );
        assert!(split_http("https://h/probe").is_err());
        assert!(split_http("http:///probe").is_err());
        assert_eq!(base_of("http://h:1/x/y").unwrap(), "http://h:1");
        assert_eq!(base_of("ws://h:1/signal").unwrap(), "http://h:1");
    }
}
