//! Serving the API: Unix socket (default, mode 0600) or TCP (with TLS, client certificates and
//! a bearer token), reflection and health on the same server, and limits so that a flood of
//! requests cannot stall the daemon. Also the client side of the same transports (used by
//! `xlbctl` and tests).
//!
//! Security model (`docs/control-api.md` has the threat model):
//! - the Unix socket relies on file permissions (0600: the daemon's user, normally root); a
//!   token may be required there too;
//! - a TCP listener must authenticate its clients: a bearer token (every `xlb.v1` and
//!   reflection call carries `authorization: Bearer <token>`) and/or client certificates
//!   signed by a configured CA (mutual TLS). Without either, [`bind`] refuses it;
//! - a TCP listener on a non-loopback address must use TLS, or the token and every change
//!   would cross the network in clear; [`bind`] refuses it without;
//! - [`ServeOptions::insecure`] lifts both refusals, for those who accept the risk;
//! - the health service answers without a token (it reveals nothing, and load balancers /
//!   orchestrators probe it), but behind TLS and client certificates like everything else.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig, Uri,
};
use tonic::{Request, Status};
use xlb_proto::v1::xlb_client::XlbClient;
use xlb_proto::v1::xlb_server::XlbServer;

use crate::authority::FixAuthority;
use crate::service::XlbService;
use crate::state::ControlState;
use crate::telemetry::Telemetry;

/// Where the daemon's API socket lives unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/xlb/xlbd.sock";

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Default for Listen {
    fn default() -> Listen {
        Listen::Unix(PathBuf::from(DEFAULT_SOCKET))
    }
}

/// Server options. The defaults suit a daemon on a small host.
#[derive(Clone)]
pub struct ServeOptions {
    pub listen: Listen,
    /// Bearer token required of `xlb.v1` and reflection calls (`None`: no check). A TCP
    /// listener needs it unless `tls` requires client certificates.
    pub token: Option<String>,
    /// TLS of a TCP listener (required on a non-loopback address).
    pub tls: Option<ServerTls>,
    /// Serve TCP without authentication or, off loopback, without TLS (refused otherwise).
    pub insecure: bool,
    /// Requests in progress across all connections; more are refused at once with
    /// `RESOURCE_EXHAUSTED` rather than queued.
    pub max_concurrent_requests: usize,
    /// HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Largest request message (requests are small; a large one is a mistake or an attack).
    pub max_request_bytes: usize,
    /// Largest answer (a configuration with thousands of rules, a page of 1000 flows).
    pub max_response_bytes: usize,
    /// Time limit of one request (not of `WatchEvents` streams once they started).
    pub request_timeout: Duration,
    /// Concurrent `WatchEvents` streams.
    pub max_watchers: usize,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            listen: Listen::default(),
            token: None,
            tls: None,
            insecure: false,
            max_concurrent_requests: 64,
            max_streams_per_connection: 32,
            max_request_bytes: 1 << 20,
            max_response_bytes: 32 << 20,
            request_timeout: Duration::from_secs(30),
            max_watchers: 64,
        }
    }
}

/// TLS of a TCP listener: the server's certificate chain and private key, and optionally the CA
/// whose certificates clients must present (mutual TLS), all PEM.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// Clients must present a certificate this CA signed (`None`: no client certificates).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ServerTls")
            .field("client_certificates", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the PEM files (checked when the listener is bound).
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerTls, ServeError> {
        Ok(ServerTls {
            cert_pem: read_file(cert)?,
            key_pem: read_file(key)?,
            client_ca_pem: client_ca.map(read_file).transpose()?,
        })
    }

    fn config(&self) -> ServerTlsConfig {
        let mut c = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            // A client that connects and never finishes the handshake holds nothing for long.
            .timeout(Duration::from_secs(10));
        if let Some(ca) = &self.client_ca_pem {
            c = c.client_ca_root(Certificate::from_pem(ca));
        }
        c
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|e| ServeError::File {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("ServeOptions")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("tls", &self.tls)
            .field("insecure", &self.insecure)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field(
                "max_streams_per_connection",
                &self.max_streams_per_connection,
            )
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("max_watchers", &self.max_watchers)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to serve the API on tcp:{0} without authentication: whoever can connect could change the configuration. Require a bearer token and/or client certificates (xlbd: --api-token-file, --api-tls-client-ca), use the Unix socket, or accept the risk explicitly (--api-insecure)")]
    Unauthenticated(SocketAddr),
    #[error("refusing to serve the API on tcp:{0} without TLS: off loopback, the bearer token and every change would cross the network in clear. Configure TLS (xlbd: --api-tls-cert and --api-tls-key), or accept the risk explicitly (--api-insecure)")]
    Cleartext(SocketAddr),
    #[error("TLS applies to TCP listeners; the Unix socket is protected by its file mode (0600)")]
    TlsOnUnix,
    #[error("TLS certificate or key: {0}")]
    Tls(String),
    #[error("{}: {what}", path.display())]
    File { path: PathBuf, what: String },
    #[error("{path}: {what}")]
    Socket { path: PathBuf, what: String },
    #[error("cannot listen on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bearer token is not a valid header value")]
    BadToken,
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl ServeOptions {
    /// The security refusals of [`bind`] (see the module docs), without binding anything.
    pub fn check(&self) -> Result<(), ServeError> {
        if let Some(t) = &self.token {
            MetadataValue::<Ascii>::try_from(format!("Bearer {t}"))
                .map_err(|_| ServeError::BadToken)?;
        }
        if let Some(tls) = &self.tls {
            if matches!(self.listen, Listen::Unix(_)) {
                return Err(ServeError::TlsOnUnix);
            }
            // Builds rustls' configuration: a bad certificate or key fails here, at start.
            tonic::transport::Server::builder()
                .tls_config(tls.config())
                .map_err(|e| ServeError::Tls(error_chain(&e)))?;
        }
        let Listen::Tcp(addr) = self.listen else {
            return Ok(());
        };
        if self.insecure {
            return Ok(());
        }
        let client_certs = self.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some());
        if self.token.is_none() && !client_certs {
            return Err(ServeError::Unauthenticated(addr));
        }
        if self.tls.is_none() && !addr.ip().is_loopback() {
            return Err(ServeError::Cleartext(addr));
        }
        Ok(())
    }
}

/// An error with its sources (tonic's TLS and transport errors say little at the top).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

/// Checks `authorization: Bearer <token>` on every call of a guarded service.
#[derive(Clone)]
pub struct RequireToken {
    expected: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("RequireToken")
            .field("enabled", &self.expected.is_some())
            .finish()
    }
}

impl RequireToken {
    pub fn new(token: Option<&str>) -> RequireToken {
        RequireToken {
            expected: token.map(|t| Arc::from(format!("Bearer {t}").into_bytes())),
        }
    }
}

/// Equal-time comparison, so the time of a refusal does not tell how much of a guess matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        match req.metadata().get("authorization") {
            Some(v) if same(v.as_bytes(), expected) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated(
                "missing \"authorization: Bearer <token>\" metadata",
            )),
        }
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A bound, not yet serving, server. Binding first lets a caller learn the TCP port (when
/// asked for port 0) and know the socket exists before clients start.
pub struct Bound {
    listener: Listener,
    options: ServeOptions,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("listen", &self.local())
            .finish_non_exhaustive()
    }
}

impl Bound {
    /// Where it listens (the real port for TCP port 0).
    pub fn local(&self) -> Listen {
        match &self.listener {
            Listener::Unix(_, p) => Listen::Unix(p.clone()),
            Listener::Tcp(l) => {
                Listen::Tcp(
                    l.local_addr()
                        .unwrap_or_else(|_| match &self.options.listen {
                            Listen::Tcp(a) => *a,
                            Listen::Unix(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
                        }),
                )
            }
        }
    }

    /// Serves until `shutdown` completes, then removes the socket file.
    pub async fn run(
        self,
        state: Arc<ControlState>,
        telemetry: Arc<dyn Telemetry>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let o = &self.options;
        let auth = RequireToken::new(o.token.as_deref());
        let (close_tx, close_rx) = tokio::sync::watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            let _ = close_tx.send(true);
        };
        let service = XlbService::new(state, telemetry, o.max_watchers).with_closing(close_rx);
        let xlb = XlbServer::new(service)
            .max_decoding_message_size(o.max_request_bytes)
            .max_encoding_message_size(o.max_response_bytes);
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<XlbServer<XlbService>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(xlb_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        // grpcurl and older tools still ask v1alpha.
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(xlb_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let limits = tower::ServiceBuilder::new().load_shed().layer(
            tower::limit::GlobalConcurrencyLimitLayer::new(o.max_concurrent_requests.max(1)),
        );
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &o.tls {
            server = server
                .tls_config(tls.config())
                .map_err(|e| ServeError::Tls(error_chain(&e)))?;
        }
        let router = server
            .concurrency_limit_per_connection(o.max_streams_per_connection as usize)
            .load_shed(true)
            .max_concurrent_streams(o.max_streams_per_connection)
            .timeout(o.request_timeout)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(limits)
            .add_service(health_service)
            .add_service(InterceptedService::new(reflection, auth.clone()))
            .add_service(InterceptedService::new(reflection_alpha, auth.clone()))
            .add_service(InterceptedService::new(xlb, auth));
        match self.listener {
            Listener::Unix(l, path) => {
                // Stock C-core clients send the socket path as :authority (see authority.rs).
                let incoming = UnixListenerStream::new(l).map(|c| c.map(FixAuthority::new));
                let r = router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await;
                let _ = std::fs::remove_file(&path);
                r?;
            }
            Listener::Tcp(l) => {
                router
                    .serve_with_incoming_shutdown(TcpListenerStream::new(l), shutdown)
                    .await?
            }
        }
        Ok(())
    }
}

/// Binds the listener described by `options` (see the module docs for what is refused).
pub async fn bind(options: ServeOptions) -> Result<Bound, ServeError> {
    options.check()?;
    let listener = match &options.listen {
        Listen::Tcp(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Io {
                    what: addr.to_string(),
                    source,
                })?;
            Listener::Tcp(l)
        }
        Listen::Unix(path) => Listener::Unix(bind_unix(path).await?, path.clone()),
    };
    Ok(Bound { listener, options })
}

/// Binds, then serves until `shutdown` completes.
pub async fn serve(
    state: Arc<ControlState>,
    telemetry: Arc<dyn Telemetry>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    bind(options).await?.run(state, telemetry, shutdown).await
}

/// Binds a Unix socket that is never reachable with looser permissions than 0600: it is
/// created inside a fresh 0700 directory, set to 0600 there, and only then renamed into
/// place (a rename also replaces a stale socket atomically).
async fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |what: String| ServeError::Socket {
        path: path.to_path_buf(),
        what,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(
                "exists and is not a socket; refusing to replace it".into()
            ));
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(err("another server is listening on it".into()));
        }
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create its directory: {e}")))?;
    let private = dir.join(format!(".xlbd-sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| err(format!("cannot create {}: {e}", private.display())))?;
    let tmp = private.join("sock");
    let result = (|| {
        let l = UnixListener::bind(&tmp).map_err(|e| err(format!("bind: {e}")))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err(format!("chmod 0600: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| err(format!("rename into place: {e}")))?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

// ---------------------------------------------------------------------------------------
// Client side.

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BearerToken")
            .field(&self.0.is_some())
            .finish()
    }
}

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<BearerToken, Status> {
        token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| Status::invalid_argument("the token is not a valid header value"))
            })
            .transpose()
            .map(BearerToken)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The `xlb.v1.Xlb` client with its token.
pub type Client = XlbClient<InterceptedService<Channel, BearerToken>>;

/// A channel to the server at `target`.
pub async fn channel(target: &Listen) -> Result<Channel, tonic::transport::Error> {
    match target {
        Listen::Tcp(addr) => {
            Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await
        }
        Listen::Unix(path) => {
            let path = path.clone();
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
        }
    }
}

/// TLS of a client: the CA that signed the server's certificate (`None`: the system's roots),
/// the client's own certificate and key for mutual TLS, and the name to verify the server's
/// certificate against (`None`: the host of the URI). All PEM.
#[derive(Clone, Default)]
pub struct ClientTls {
    pub ca_pem: Option<Vec<u8>>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// A TLS channel to `uri` (`https://HOST:PORT`).
pub async fn channel_tls(uri: &str, tls: &ClientTls) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(uri.to_string())?;
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca_pem {
        Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
        None => config.with_native_roots(),
    };
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    // The URI's host keeps an IPv6 literal's brackets; a certificate names the bare address.
    let host = endpoint.uri().host().unwrap_or_default();
    let name = tls.server_name.clone().unwrap_or_else(|| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    });
    endpoint
        .tls_config(config.domain_name(name))?
        .connect()
        .await
}

/// An `xlb.v1.Xlb` client over `channel`.
pub fn client(channel: Channel, token: BearerToken) -> Client {
    XlbClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20)
}
