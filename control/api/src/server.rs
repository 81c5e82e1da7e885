//! Serving the API: Unix socket (default, mode 0600) or TCP, bearer-token check, reflection
//! and health on the same server, and limits so that a flood of requests cannot stall the
//! daemon. Also the client side of the same transport (used by `xlbctl` and tests).
//!
//! Security model: the Unix socket is the default and relies on file permissions (0600: the
//! daemon's user, normally root). TCP on a loopback address is allowed without a token; TCP
//! on any other address is refused unless a bearer token is configured, and every `xlb.v1`
//! and reflection call must then carry `authorization: Bearer <token>`. The health service
//! answers without a token (it reveals nothing and load balancers / orchestrators probe it).
//! TLS is not built in: put a TLS-terminating proxy in front, or use the socket over SSH.

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
use tonic::transport::{Channel, Endpoint, Uri};
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
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: Listen,
    /// Bearer token required of `xlb.v1` and reflection calls (`None`: no check). Required
    /// to listen on a non-loopback TCP address.
    pub token: Option<String>,
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
            max_concurrent_requests: 64,
            max_streams_per_connection: 32,
            max_request_bytes: 1 << 20,
            max_response_bytes: 32 << 20,
            request_timeout: Duration::from_secs(30),
            max_watchers: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to listen on {0} without a bearer token: only loopback addresses may go without one (set a token, or use the Unix socket)")]
    InsecureListen(SocketAddr),
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
        let router = tonic::transport::Server::builder()
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
    if let Some(t) = &options.token {
        MetadataValue::<Ascii>::try_from(format!("Bearer {t}"))
            .map_err(|_| ServeError::BadToken)?;
    }
    let listener = match &options.listen {
        Listen::Tcp(addr) => {
            if !addr.ip().is_loopback() && options.token.is_none() {
                return Err(ServeError::InsecureListen(*addr));
            }
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

/// An `xlb.v1.Xlb` client over `channel`.
pub fn client(channel: Channel, token: BearerToken) -> Client {
    XlbClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20)
}
