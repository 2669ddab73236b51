//! The internal plane: an HTTPS listener that requires mutual TLS, for what only
//! operators, Prometheus and other nodes may call — `/metrics`, `/admin/*`, `/audit/*`
//! and node-to-node routes (`node_routes`).
//!
//! * **Server side**: rustls with a [`WebPkiClientVerifier`] over the configured CA
//!   bundle (`internal.client_ca`): a client without a certificate, or with one that
//!   does not chain to that bundle, fails the handshake. The handler sees the verified
//!   client certificate as a [`PeerCertificate`] request extension.
//! * **Rotation**: [`InternalTls`] keeps the current server and client configurations
//!   and re-reads the certificate, key and CA files every
//!   `internal.reload_interval_secs`; when their bytes change (cert-manager writes new
//!   files, or kubelet swaps the `..data` symlink of a mounted Secret) the next
//!   handshake uses the new ones. A set that does not load (half-written, a key that
//!   does not match) is refused, logged and counted; the previous set stays in use.
//! * **Expiry**: `meridian_certificate_expiry_seconds{cert}` is the Unix time at which
//!   each certificate expires (`internal_server`, `internal_client`,
//!   `internal_client_ca`: the earliest of the bundle; `webtransport` is set by
//!   `webtransport.rs`). Alert on `meridian_certificate_expiry_seconds - time()`.
//! * **Client side**: [`InternalClient`] calls another node's internal listener (or
//!   this one, in tests and tools) with this node's client certificate.
//! * **Development**: without configured files, [`dev_pki`] creates (once) a CA, a
//!   node certificate for the loopback names and a client certificate under
//!   `<data_dir>/internal/`, so the all-in-one node and its tests need no setup; point
//!   `curl --cacert ca.pem --cert client.pem --key client.key` or Prometheus's
//!   `tls_config` at them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::{Semaphore, watch};

use crate::NodeState;
use crate::config::InternalConfig;
use crate::metrics::Metrics;

/// Errors loading, generating or using the internal plane's certificates.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM certificate or key.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the combination (a key that does not match its certificate, a CA
    /// bundle it cannot use).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// Generating development certificates failed.
    #[error("generating development certificates: {0}")]
    Generate(String),
    /// A call to an internal listener failed (connect, handshake, HTTP).
    #[error("internal call to {addr}: {reason}")]
    Call {
        /// The listener called.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
}

/// The files of the internal plane: what the listener serves, which CA it trusts,
/// and what this node presents as a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain served by the internal listener.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM bundle of trusted CA certificates (client certificates must chain to one;
    /// the node's client also trusts it for the servers it calls).
    pub client_ca: PathBuf,
    /// PEM certificate presented when calling other nodes.
    pub client_cert: PathBuf,
    /// PEM private key of `client_cert`.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// The files named by `[internal]`, or the development set under `data_dir`
    /// (created when missing) when none are configured.
    pub fn resolve(config: &InternalConfig, data_dir: &Path) -> Result<TlsFiles, InternalError> {
        match (&config.cert, &config.key, &config.client_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
                client_cert: config.client_cert.clone().unwrap_or_else(|| cert.clone()),
                client_key: config.client_key.clone().unwrap_or_else(|| key.clone()),
            }),
            _ => dev_pki(&data_dir.join(DEV_DIR), config.listen.ip()),
        }
    }

    /// The development client certificate of a directory made by [`dev_pki`] (for
    /// operators' tools and tests; the node itself calls with `client_cert`).
    pub fn operator_client(dir: &Path) -> TlsFiles {
        let mut files = dev_files(dir);
        files.client_cert = dir.join("client.pem");
        files.client_key = dir.join("client.key");
        files
    }
}

/// Folder under the data directory holding the development certificates.
pub const DEV_DIR: &str = "internal";
/// Validity of generated development certificates.
const DEV_VALIDITY_DAYS: i64 = 90;
/// Largest certificate, key or CA file read.
const MAX_PEM_BYTES: u64 = 1024 * 1024;
/// Internal connections served at once (callers are authenticated, but bounded all the same).
const MAX_CONNECTIONS: usize = 256;
/// Internal connections one source address may hold at once (an IPv6 /64 counts as
/// one): a single caller — a peer node, Prometheus, or anyone who reaches the port
/// without a certificate and stalls handshakes — cannot take every slot.
const MAX_CONNECTIONS_PER_IP: usize = 64;
/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body [`InternalClient`] reads.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

fn dev_files(dir: &Path) -> TlsFiles {
    TlsFiles {
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
        client_ca: dir.join("ca.pem"),
        client_cert: dir.join("node.pem"),
        client_key: dir.join("node.key"),
    }
}

/// Loads the development certificates in `dir`, generating them first when the folder
/// does not exist: a CA (`ca.pem`, `ca.key`), a node certificate for `localhost`,
/// `127.0.0.1`, `::1` and `listen_ip` (when it is a specific address) usable as server
/// and client (`node.pem`, `node.key`), and an
/// operator client certificate (`client.pem`, `client.key`), all valid 90 days. The
/// set is written to a temporary folder and renamed into place, so nodes sharing a
/// data directory agree on one CA.
pub fn dev_pki(dir: &Path, listen_ip: std::net::IpAddr) -> Result<TlsFiles, InternalError> {
    if !dir.join("ca.pem").is_file() {
        let parent = dir.parent().unwrap_or(Path::new("."));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| InternalError::Io { path, source }
        };
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let tmp = parent.join(format!(
            ".{}-{}-{}",
            DEV_DIR,
            std::process::id(),
            rand::random::<u32>()
        ));
        let ip = listen_ip.to_string();
        let mut names = vec!["localhost", "127.0.0.1", "::1"];
        if !listen_ip.is_unspecified() && !names.contains(&ip.as_str()) {
            names.push(&ip);
        }
        generate_pki(&tmp, &names, DEV_VALIDITY_DAYS)?;
        // Another node sharing the directory may have won the race: keep its set.
        if std::fs::rename(&tmp, dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        if !dir.join("ca.pem").is_file() {
            return Err(InternalError::Generate(format!(
                "{} was not created",
                dir.display()
            )));
        }
        tracing::info!(dir = %dir.display(), "generated development certificates for the internal plane");
    }
    Ok(dev_files(dir))
}

/// Writes a new CA and the certificates it signs into `dir` (created): `ca.pem`,
/// `ca.key`, `node.pem`/`node.key` (server and client use, for `names`) and
/// `client.pem`/`client.key` (client use), valid `valid_days` days. For development,
/// tests and tools; in a cluster cert-manager issues the certificates.
pub fn generate_pki(dir: &Path, names: &[&str], valid_days: i64) -> Result<(), InternalError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let gen_err = |e: rcgen::Error| InternalError::Generate(e.to_string());
    let now = time::OffsetDateTime::now_utc();
    let validity = |p: &mut CertificateParams| {
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + time::Duration::days(valid_days);
    };
    let name = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    };
    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca.distinguished_name = name(&format!(
        "Meridian development CA {}",
        rand::random::<u32>()
    ));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(gen_err)?;
    let issuer = Issuer::new(ca, &ca_key);
    let leaf = |cn: &str, sans: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>| {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut p = CertificateParams::new(sans).map_err(gen_err)?;
        p.distinguished_name = name(cn);
        p.extended_key_usages = usages;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p);
        let cert = p.signed_by(&key, &issuer).map_err(gen_err)?;
        Ok::<_, InternalError>((cert.pem(), key.serialize_pem()))
    };
    let (node_pem, node_key) = leaf(
        "meridian-node",
        names.iter().map(|n| n.to_string()).collect(),
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    )?;
    let (client_pem, client_key) = leaf(
        "meridian-operator",
        Vec::new(),
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    std::fs::create_dir_all(dir).map_err(|source| InternalError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for (file, text, secret) in [
        ("ca.pem", ca_cert.pem(), false),
        ("ca.key", ca_key.serialize_pem(), true),
        ("node.pem", node_pem, false),
        ("node.key", node_key, true),
        ("client.pem", client_pem, false),
        ("client.key", client_key, true),
    ] {
        write_file(&dir.join(file), text.as_bytes(), secret)?;
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), InternalError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| InternalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, InternalError> {
    let io = |source| InternalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_PEM_BYTES {
        return Err(InternalError::Pem {
            path: path.to_path_buf(),
            reason: format!("{len} bytes is more than {MAX_PEM_BYTES}"),
        });
    }
    std::fs::read(path).map_err(io)
}

fn certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, InternalError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| InternalError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(InternalError::Pem {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, InternalError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| InternalError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The Unix time at which a DER certificate expires.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(path: &Path, cas: &[CertificateDer<'static>]) -> Result<RootCertStore, InternalError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(cas.iter().cloned());
    if added == 0 {
        return Err(InternalError::Pem {
            path: path.to_path_buf(),
            reason: "no usable CA certificate in the bundle".into(),
        });
    }
    Ok(roots)
}

fn client_config(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, InternalError> {
    let tls = |e: rustls::Error| InternalError::Tls(e.to_string());
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(tls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// One loaded set of certificates: what the listener serves, what the node's client
/// presents, and their expiries.
struct Material {
    /// The bytes read, in [`TlsFiles`] order: a change in any of them triggers a reload.
    bytes: Vec<Vec<u8>>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    expiry: [(&'static str, Option<i64>); 3],
}

impl Material {
    fn read(files: &TlsFiles) -> Result<Vec<Vec<u8>>, InternalError> {
        [
            &files.cert,
            &files.key,
            &files.client_ca,
            &files.client_cert,
            &files.client_key,
        ]
        .into_iter()
        .map(|p| read_bounded(p))
        .collect()
    }

    fn load(files: &TlsFiles, bytes: Vec<Vec<u8>>) -> Result<Material, InternalError> {
        let tls = |e: rustls::Error| InternalError::Tls(e.to_string());
        let chain = certs(&files.cert, &bytes[0])?;
        let server_key = key(&files.key, &bytes[1])?;
        let cas = certs(&files.client_ca, &bytes[2])?;
        let client_chain = certs(&files.client_cert, &bytes[3])?;
        let client_key = key(&files.client_key, &bytes[4])?;
        let roots = Arc::new(roots(&files.client_ca, &cas)?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| InternalError::Tls(e.to_string()))?;
        let expiry = [
            ("internal_server", not_after(&chain[0])),
            ("internal_client", not_after(&client_chain[0])),
            (
                "internal_client_ca",
                cas.iter().filter_map(|c| not_after(c)).min(),
            ),
        ];
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, server_key)
            .map_err(tls)?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = client_config((*roots).clone(), client_chain, client_key)?;
        Ok(Material {
            bytes,
            server: Arc::new(server),
            client: Arc::new(client),
            expiry,
        })
    }
}

/// The internal plane's TLS state: the files, the configurations loaded from them,
/// reloaded when the files change.
pub struct InternalTls {
    files: TlsFiles,
    current: RwLock<Arc<Material>>,
    metrics: Metrics,
}

impl InternalTls {
    /// Loads `files` (an error names the file at fault) and sets the expiry metrics.
    pub fn load(files: TlsFiles, metrics: Metrics) -> Result<InternalTls, InternalError> {
        let material = Material::load(&files, Material::read(&files)?)?;
        let tls = InternalTls {
            files,
            current: RwLock::new(Arc::new(material)),
            metrics,
        };
        tls.export_expiry();
        Ok(tls)
    }

    /// The files this state is loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn material(&self) -> Arc<Material> {
        match self.current.read() {
            Ok(m) => m.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }

    fn export_expiry(&self) {
        for (cert, at) in self.material().expiry {
            if let Some(at) = at {
                self.metrics.set_certificate_expiry(cert, at);
            }
        }
    }

    /// Re-reads the files; when any changed, loads them and uses them from the next
    /// handshake on. Returns whether a new set was taken; an error leaves the previous
    /// set in use.
    pub fn reload_if_changed(&self) -> Result<bool, InternalError> {
        let bytes = Material::read(&self.files)?;
        if bytes == self.material().bytes {
            return Ok(false);
        }
        let material = Material::load(&self.files, bytes)?;
        match self.current.write() {
            Ok(mut m) => *m = Arc::new(material),
            Err(e) => *e.into_inner() = Arc::new(material),
        }
        self.export_expiry();
        Ok(true)
    }

    /// A client for other nodes' (or this node's) internal listeners, presenting this
    /// node's client certificate and trusting the configured CA bundle.
    pub fn client(&self) -> InternalClient {
        InternalClient {
            config: self.material().client.clone(),
            timeout: CALL_TIMEOUT,
            max_response: MAX_RESPONSE_BYTES,
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.material().server.clone())
    }
}

/// Checks the certificate files every `interval` until `shutdown`; a changed set is
/// loaded (`meridian_certificate_reloads_total{result="ok"}`), one that does not load
/// is logged and counted (`result="error"`) and the previous set stays.
pub(crate) async fn watch_files(
    tls: Arc<InternalTls>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        }
        let check = tls.clone();
        let result = tokio::task::spawn_blocking(move || check.reload_if_changed())
            .await
            .unwrap_or_else(|e| Err(InternalError::Tls(format!("reload task: {e}"))));
        match result {
            Ok(true) => {
                failing = false;
                tls.metrics.certificate_reloaded("ok");
                tracing::info!(cert = %tls.files.cert.display(), "internal certificates reloaded");
            }
            Ok(false) => failing = false,
            Err(e) => {
                // Counted each time; logged once per failing streak (a half-written
                // rotation fixes itself at the next check).
                tls.metrics.certificate_reloaded("error");
                if !failing {
                    tracing::warn!(
                        "internal certificates not reloaded, keeping the previous ones: {e}"
                    );
                }
                failing = true;
            }
        }
    }
}

/// The verified client certificate of an internal request (the leaf, DER), for
/// handlers that want to know which node or operator calls.
#[derive(Clone, Debug)]
pub struct PeerCertificate(pub Arc<CertificateDer<'static>>);

/// Routes other nodes call (relay control, `/internal/relay/*`): served on the
/// internal listener only, behind mutual TLS, next to `/metrics`, `/admin/*` and
/// `/audit/*`. Handlers may read [`PeerCertificate`].
pub(crate) fn node_routes(state: &NodeState) -> Router {
    crate::relay::routes().with_state(state.clone())
}

/// Serves `app` over TLS with required client certificates on `listener` until
/// `shutdown`: at most [`MAX_CONNECTIONS`] at once and [`MAX_CONNECTIONS_PER_IP`] per
/// source address, handshakes within 10 s, request headers within
/// `http.header_read_timeout_secs`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Arc<InternalTls>,
    header_timeout: Duration,
    shutdown: watch::Receiver<bool>,
) {
    serve_capped(
        listener,
        app,
        tls,
        header_timeout,
        MAX_CONNECTIONS_PER_IP,
        shutdown,
    )
    .await
}

/// [`serve`] with `per_ip` connections per source address; a connection over it is
/// closed before its handshake and counted in
/// `meridian_limit_refusals_total{reason="internal_connections_per_ip"}`.
async fn serve_capped(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Arc<InternalTls>,
    header_timeout: Duration,
    per_ip: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Only the connection cap is used; join allowances do not apply here.
    let per_address = Arc::new(crate::limits::IpLimits::new(per_ip, 0));
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("internal accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // The guard `wait_for` returns is not `Send`: drop it inside.
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let Some(slot) = per_address.connect(peer.ip()) else {
            tls.metrics.limit_refused("internal_connections_per_ip");
            tracing::debug!(%peer, "internal connection refused: too many from this address");
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "internal connection refused: too many");
            continue;
        };
        let acceptor = tls.acceptor();
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = (permit, slot);
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "internal TLS handshake refused: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "internal TLS handshake timed out");
                        return;
                    }
                };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| PeerCertificate(Arc::new(c.clone().into_owned())));
            connection(stream, peer, cert, app, header_timeout, shutdown).await;
        });
    }
}

async fn connection(
    io: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    cert: Option<PeerCertificate>,
    app: Router,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    use tower_service::Service as _;
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        if let Some(c) = &cert {
            req.extensions_mut().insert(c.clone());
        }
        let mut app = app.clone();
        async move { app.call(req).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, "internal HTTP connection: {e}");
            }
        }
        _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

/// An HTTPS client for internal listeners, presenting a client certificate: how a
/// node calls another node's internal routes, and how tools and tests call `/metrics`,
/// `/admin/*` and `/audit/*`. One connection per request (HTTP/1.1).
#[derive(Clone)]
pub struct InternalClient {
    config: Arc<ClientConfig>,
    /// Bound on one whole call (connect, handshake, request, body).
    timeout: Duration,
    /// Largest response body read.
    max_response: usize,
}

/// Default bound on one internal call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A response from an internal listener.
#[derive(Debug)]
pub struct InternalResponse {
    /// The status code.
    pub status: u16,
    /// The body, as text (lossy).
    pub body: String,
}

impl InternalClient {
    /// A client presenting `cert`/`key` (PEM files) and trusting the CAs in `ca`.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<InternalClient, InternalError> {
        let cas = certs(ca, &read_bounded(ca)?)?;
        let chain = certs(cert, &read_bounded(cert)?)?;
        let key = self::key(key, &read_bounded(key)?)?;
        Ok(InternalClient {
            config: Arc::new(client_config(roots(ca, &cas)?, chain, key)?),
            timeout: CALL_TIMEOUT,
            max_response: MAX_RESPONSE_BYTES,
        })
    }

    /// A client trusting `ca` that presents no certificate (what an outsider can do;
    /// for tests showing it is refused).
    pub fn without_certificate(ca: &Path) -> Result<InternalClient, InternalError> {
        let cas = certs(ca, &read_bounded(ca)?)?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| InternalError::Tls(e.to_string()))?
            .with_root_certificates(roots(ca, &cas)?)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(InternalClient {
            config: Arc::new(config),
            timeout: CALL_TIMEOUT,
            max_response: MAX_RESPONSE_BYTES,
        })
    }

    /// The same client with calls bounded by `timeout` (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> InternalClient {
        self.timeout = timeout;
        self
    }

    /// The same client reading response bodies of at most `bytes` (default 64 MiB;
    /// a larger one fails the call).
    pub fn with_max_response(mut self, bytes: usize) -> InternalClient {
        self.max_response = bytes;
        self
    }

    /// Sends one request to the listener at `host_port` (a `host:port` as published in
    /// a lease: the host is resolved, and is the TLS server name the listener's
    /// certificate must carry). Resolution counts against the client's timeout.
    pub async fn request_to(
        &self,
        host_port: &str,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> Result<InternalResponse, InternalError> {
        let unresolved = |reason: String| InternalError::Call {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: format!("{host_port}: {reason}"),
        };
        let (host, port) = crate::config::split_host_port(host_port)
            .ok_or_else(|| unresolved("not host:port".into()))?;
        let started = tokio::time::Instant::now();
        let addr = tokio::time::timeout(self.timeout, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| unresolved(format!("not resolved within {:?}", self.timeout)))?
            .map_err(|e| unresolved(e.to_string()))?
            .next()
            .ok_or_else(|| unresolved("no address".into()))?;
        let left = self.timeout.saturating_sub(started.elapsed());
        self.clone()
            .with_timeout(left)
            .request(addr, host, method, path, bearer, body)
            .await
    }

    /// Sends one request to `addr` (TLS server name `server_name`, which the server's
    /// certificate must carry: an IP address or a DNS name) with an optional bearer
    /// token; reads a response of at most 64 MiB (see
    /// [`InternalClient::with_max_response`]). Bounded by the client's timeout as a
    /// whole.
    pub async fn request(
        &self,
        addr: SocketAddr,
        server_name: &str,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
    ) -> Result<InternalResponse, InternalError> {
        let timeout = self.timeout;
        let fail = |reason: String| InternalError::Call { addr, reason };
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| fail(format!("server name {server_name:?}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let call = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| fail(format!("connect: {e}")))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| fail(format!("TLS: {e}")))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| fail(format!("HTTP handshake: {e}")))?;
            let driver = tokio::spawn(conn);
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, server_name);
            if let Some(t) = bearer {
                req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let req = req
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| fail(format!("request: {e}")))?;
            let res = sender
                .send_request(req)
                .await
                .map_err(|e| fail(format!("request: {e}")))?;
            let status = res.status().as_u16();
            let bytes = Limited::new(res.into_body(), self.max_response)
                .collect()
                .await
                .map_err(|e| fail(format!("body: {e}")))?
                .to_bytes();
            driver.abort();
            Ok(InternalResponse {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            })
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| fail(format!("no answer within {timeout:?}")))?
    }

    /// `GET path` on a listener whose certificate carries `addr`'s IP address (the
    /// development certificates do for loopback).
    pub async fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<InternalResponse, InternalError> {
        let name = addr.ip().to_string();
        self.request(addr, &name, "GET", path, bearer, Vec::new())
            .await
    }

    /// `POST path` (empty body), like [`InternalClient::get`].
    pub async fn post(
        &self,
        addr: SocketAddr,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<InternalResponse, InternalError> {
        let name = addr.ip().to_string();
        self.request(addr, &name, "POST", path, bearer, Vec::new())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "meridian-internal-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ))
    }

    #[test]
    fn development_certificates_load_and_are_made_once() {
        let dir = tmp("dev");
        let lo = std::net::IpAddr::from([127, 0, 0, 1]);
        let files = dev_pki(&dir, lo).unwrap();
        let ca = std::fs::read(&files.client_ca).unwrap();
        let again = dev_pki(&dir, lo).unwrap();
        assert_eq!(files, again);
        assert_eq!(
            std::fs::read(&again.client_ca).unwrap(),
            ca,
            "kept, not regenerated"
        );
        let tls = InternalTls::load(files, Metrics::default()).unwrap();
        assert!(!tls.reload_if_changed().unwrap(), "nothing changed");
        let expiry = tls.material().expiry;
        let now = i64::try_from(meridian_auth::unix_now()).unwrap();
        for (cert, at) in expiry {
            let at = at.unwrap_or_else(|| panic!("{cert} has an expiry"));
            assert!(
                at > now + 80 * 86400 && at < now + 91 * 86400,
                "{cert}: {at}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_broken_rotation_keeps_the_previous_certificates() {
        let dir = tmp("broken");
        let files = dev_pki(&dir, std::net::IpAddr::from([127, 0, 0, 1])).unwrap();
        let tls = InternalTls::load(files.clone(), Metrics::default()).unwrap();
        // A key from another set: the certificate and the key no longer match.
        let other = tmp("other");
        generate_pki(&other, &["localhost"], 1).unwrap();
        std::fs::copy(other.join("node.key"), &files.key).unwrap();
        let err = tls.reload_if_changed().unwrap_err();
        assert!(matches!(err, InternalError::Tls(_)), "{err}");
        // A truncated certificate file names the file.
        std::fs::write(&files.cert, b"-----BEGIN CERTIFICATE-----\nAAAA").unwrap();
        let err = tls.reload_if_changed().unwrap_err().to_string();
        assert!(err.contains("node.pem"), "{err}");
        for d in [dir, other] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    /// A TCP connection to `to` from the loopback address `from`.
    async fn connect_from(from: [u8; 4], to: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from((std::net::Ipv4Addr::from(from), 0)))
            .unwrap();
        socket.connect(to).await.unwrap()
    }

    /// Waits until the node closes `stream` (end of stream or reset).
    async fn closed(stream: &mut tokio::net::TcpStream) {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 64];
        // Well under the 10 s handshake timeout, which would close held connections too.
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "the connection over the cap is closed at once: {read:?}"
        );
    }

    #[tokio::test]
    async fn connections_per_source_address_are_capped() {
        let dir = tmp("per-ip");
        let files = dev_pki(&dir, std::net::IpAddr::from([127, 0, 0, 1])).unwrap();
        let metrics = Metrics::default();
        let tls = Arc::new(InternalTls::load(files, metrics.clone()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve_capped(
            listener,
            Router::new(),
            tls,
            Duration::from_secs(10),
            2,
            shutdown,
        ));
        let refused = || {
            metrics
                .limit_refusals
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: "internal_connections_per_ip",
                })
                .get()
        };
        // Two connections that never start their handshake hold 127.0.0.1's slots.
        let _held = [
            connect_from([127, 0, 0, 1], addr).await,
            connect_from([127, 0, 0, 1], addr).await,
        ];
        let mut third = connect_from([127, 0, 0, 1], addr).await;
        closed(&mut third).await;
        assert_eq!(refused(), 1);
        // Another address has slots of its own. The accept loop takes connections in
        // order, so once the next refusal from 127.0.0.1 is seen, 127.0.0.2's was
        // handled before it without a refusal.
        let _other = connect_from([127, 0, 0, 2], addr).await;
        let mut fourth = connect_from([127, 0, 0, 1], addr).await;
        closed(&mut fourth).await;
        assert_eq!(refused(), 2, "127.0.0.2 was not refused");
        let _ = stop.send(true);
        let _ = server.await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn incomplete_configuration_is_refused() {
        let mut c = crate::Config::default();
        c.internal.cert = Some("a.pem".into());
        assert!(c.validate().is_err());
        c.internal.key = Some("a.key".into());
        c.internal.client_ca = Some("ca.pem".into());
        c.validate().unwrap();
        c.internal.client_cert = Some("c.pem".into());
        assert!(c.validate().is_err());
        c.internal.client_key = Some("c.key".into());
        c.validate().unwrap();
        c.internal.metrics_listen = Some("0.0.0.0:9100".parse().unwrap());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("internal.metrics_listen"), "{err}");
        c.internal.metrics_listen = Some("127.0.0.1:9100".parse().unwrap());
        c.validate().unwrap();
    }
}
