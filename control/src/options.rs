//! What `xlbd` is told on its command line, checked, and the configuration file it names.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use xlb_afxdp::ModeRequest;
use xlb_api::Listen;
use xlb_engine::{admission::AdmissionLimits, config::ConfigError, Config};

/// Exit codes: 2 for what the operator must fix in the command or the file, 1 for the rest.
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_FAILURE: u8 = 1;

/// Everything `xlbd` is told on its command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub interfaces: Vec<String>,
    /// Interfaces facing the pool members; `None`: those the routes to members go through.
    pub backend_side: Option<Vec<String>>,
    pub workers: usize,
    pub queues: Option<u32>,
    pub busy_poll: bool,
    pub lab_time_scale: Option<u32>,
    pub flow_capacity: u32,
    /// Budgets of unconfirmed flows (shares of each worker's table).
    pub admission: AdmissionLimits,
    /// RSTs per second per worker for the `reset` unknown-flow policy.
    pub reset_rate: u32,
    pub xdp_mode: ModeRequest,
    /// `--fast-path`: whether the XDP program may forward established flows itself (on
    /// natively attached interfaces); off: every packet goes through a worker.
    pub fast_path: bool,
    /// `--huge-pages auto`: back the engines' tables and the UMEMs with huge pages where the
    /// kernel gives them (`crate::huge_pages`); off: normal pages, nothing asked.
    pub huge_pages: bool,
    pub quiet: bool,
    pub status_interval: Duration,
    pub stats_file: Option<PathBuf>,
    pub cores: Vec<usize>,
    /// Stop by itself after this long (tests and labs: nothing outlives a killed harness).
    pub max_runtime: Option<Duration>,
    /// Where the gRPC API listens; `None`: no API.
    pub api: Option<Listen>,
    /// Bearer token the API requires (a TCP listener needs it or client certificates).
    pub api_token: Option<String>,
    /// TLS of a TCP API listener (mandatory off loopback), with optional client certificates.
    pub api_tls: Option<xlb_api::server::ServerTls>,
    /// Serve the API on TCP without authentication, or off loopback without TLS.
    pub api_insecure: bool,
    /// Where the Prometheus endpoint listens; `None`: none.
    pub metrics: Option<SocketAddr>,
    /// Sources of the data-path self-probe (`crate::selfprobe`); empty: off.
    pub self_probe_sources: Vec<IpAddr>,
    /// Interval of the self-probe, before the lab time scale.
    pub self_probe_interval: Duration,
    /// `--vlan IFACE:ID[,ID...]`: VLANs whose tagged frames are accepted on an interface.
    pub vlans: Vec<(String, Vec<u16>)>,
    /// Run as a node of a cluster (`--cluster-node`): cluster pickup, announcement tied to
    /// fitness, heartbeats (docs/cluster.md).
    pub cluster: Option<crate::cluster::ClusterOptions>,
    /// NAT event logging over IPFIX (`crate::ipfix`); `None`: off.
    pub ipfix: Option<crate::ipfix::IpfixOptions>,
    /// `--state-dir`: a directory on a bpffs where the flows and the XDP attachment outlive
    /// xlbd (`crate::persist`); `None`: nothing outlives it.
    pub state_dir: Option<PathBuf>,
    /// `--takeover PID`: stop that running xlbd and take over from it (a planned upgrade).
    pub takeover: Option<u32>,
}

impl Options {
    /// `busy` or `wakeup`, as the ready line and the API say it.
    pub fn poll_name(&self) -> &'static str {
        if self.busy_poll {
            "busy"
        } else {
            "wakeup"
        }
    }
}

/// A failure with the exit code it deserves.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
    pub fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }
}

/// Parses `--api`: `none`, `unix:PATH` (or an absolute path), `tcp:HOST:PORT` (or
/// `HOST:PORT`).
pub fn parse_api(v: &str) -> Result<Option<Listen>, String> {
    let bad = || {
        format!(
            "--api {v:?}: expected none, unix:PATH (e.g. unix:/run/xlb/xlbd.sock) or \
             tcp:HOST:PORT (e.g. tcp:127.0.0.1:50051)"
        )
    };
    if v == "none" {
        return Ok(None);
    }
    if let Some(path) = v.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad());
        }
        return Ok(Some(Listen::Unix(PathBuf::from(path))));
    }
    if v.starts_with('/') {
        return Ok(Some(Listen::Unix(PathBuf::from(v))));
    }
    let addr = v.strip_prefix("tcp:").unwrap_or(v);
    addr.parse::<SocketAddr>()
        .map(|a| Some(Listen::Tcp(a)))
        .map_err(|_| bad())
}

/// `unix:PATH` or `tcp:ADDR`, as `--api` takes it.
pub fn describe_listen(l: &Listen) -> String {
    match l {
        Listen::Unix(p) => format!("unix:{}", p.display()),
        Listen::Tcp(a) => format!("tcp:{a}"),
    }
}

/// Reads, overrides and validates the configuration; errors are the engine's own text.
pub fn load_config(opts: &Options) -> Result<Config, Failure> {
    let text = std::fs::read_to_string(&opts.config).map_err(|e| {
        Failure::usage(format!(
            "cannot read the configuration {}: {e}",
            opts.config.display()
        ))
    })?;
    let mut config = match Config::from_toml_str(&text) {
        Ok(c) => c,
        Err(ConfigError::Invalid(errs)) => {
            return Err(Failure::usage(format!("{}: {errs}", opts.config.display())))
        }
        Err(e) => return Err(Failure::usage(format!("{}: {e}", opts.config.display()))),
    };
    if let Some(scale) = opts.lab_time_scale {
        config.settings.lab_time_scale = scale;
        config
            .validate()
            .map_err(|errs| Failure::usage(format!("--lab-time-scale {scale}: {errs}")))?;
    }
    Ok(config)
}
