//! `xlbd`: the xlb daemon. See `docs/xlbd.md` and `xlbd --help`.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, ValueEnum};
use xlb_afxdp::ModeRequest;
use xlb_api::server::ServerTls;
use xlb_control::{
    daemon,
    ipfix::{ExportOptions, IpfixOptions},
    options::Options,
};
use xlb_engine::{admission::AdmissionLimits, engine::DEFAULT_RESET_RATE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Poll {
    /// Spin on the rings: lowest latency, a full core per worker.
    Busy,
    /// Sleep in poll() when idle: for tests and small hosts.
    Wakeup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HugePages {
    /// Ask for huge pages; whatever the kernel refuses runs on normal pages.
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum XdpMode {
    Auto,
    Native,
    Generic,
}

/// xlb's L4 load balancer and NAT on AF_XDP.
///
/// Run it in the network namespace of its interfaces, as root. It attaches its XDP program
/// to every --interface, takes the frontends' traffic (and, on backend-side interfaces, every
/// packet not addressed to the host) and processes it in user space. SIGINT or SIGTERM stop
/// it cleanly, detaching XDP; with --state-dir they keep the flows and the XDP attachment for
/// the next xlbd (`xlbd --cleanup --state-dir DIR` removes them). SIGHUP reads --config again
/// and applies the difference as one generation. Under systemd (NOTIFY_SOCKET) it speaks
/// Type=notify, with the watchdog.
#[derive(Debug, Parser)]
#[command(name = "xlbd", version)]
struct Cli {
    /// Configuration file (TOML; see docs/examples/xlb.toml), read again on SIGHUP.
    #[arg(long, value_name = "FILE", required_unless_present = "cleanup")]
    config: Option<PathBuf>,
    /// An interface the dataplane drives; repeat it. The order gives the port numbers.
    #[arg(
        long = "interface",
        short = 'i',
        value_name = "NAME",
        required_unless_present = "cleanup"
    )]
    interfaces: Vec<String>,
    /// Interfaces facing the pool members (repeatable). Default: those the kernel's routes
    /// to the members go through.
    #[arg(long = "backend-side", value_name = "NAME")]
    backend_side: Vec<String>,
    /// Worker threads, 1–64; queue q of every interface goes to worker q % N.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Queues served on every interface, 1–64 (default: the interfaces' receive queue count).
    #[arg(long)]
    queues: Option<u32>,
    /// Cores to pin workers to, comma-separated (default: worker i on core i+1).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    #[arg(long, value_enum, default_value_t = Poll::Wakeup)]
    poll_mode: Poll,
    /// Divide every timer by N (60: 4 minutes last 4 s). Overrides the configuration.
    #[arg(long, value_name = "N")]
    lab_time_scale: Option<u32>,
    /// Flows per worker, 16–8388607 (memory is allocated at start: about 94 bytes each with
    /// the index and timers, and about 150 more in the XDP fast path's table).
    #[arg(long, default_value_t = 1 << 16)]
    flow_capacity: u32,
    /// Percent of a worker's flow table that TCP flows without a confirmed handshake may hold;
    /// beyond it the oldest is evicted for a new one (docs/architecture.md, "Flow admission").
    #[arg(long, value_name = "PCT", default_value_t = AdmissionLimits::default().half_open_percent,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    half_open_share: u8,
    /// Percent of a worker's flow table that UDP flows without a reply may hold.
    #[arg(long, value_name = "PCT", default_value_t = AdmissionLimits::default().unreplied_udp_percent,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    unreplied_udp_share: u8,
    /// Percent of a worker's flow table that one rule's unconfirmed flows may hold: a flood at
    /// one rule recycles its own share and leaves the rest to the other rules.
    #[arg(long, value_name = "PCT", default_value_t = AdmissionLimits::default().rule_percent,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    rule_share: u8,
    /// RSTs per second (and at once) a worker sends for the `reset` unknown-flow policy;
    /// beyond it the segments are dropped and counted (reset_rate_limited).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RESET_RATE,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    reset_rate: u32,
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    xdp_mode: XdpMode,
    /// The XDP fast path: established IPv4 flows (TCP once the handshake is confirmed, UDP
    /// once answered), untagged, are forwarded by the XDP program itself (NAT rewrite,
    /// checksums, TTL, MACs, redirect out of the egress interface); everything else, and
    /// every doubt, goes to the workers, which stay the authority (expiry, reset on idle,
    /// FIN/RST, health). It also opens new TCP flows: a SYN of an IPv4 load-balancing rule
    /// goes to its Maglev member from XDP, and the owning worker installs the flow from a
    /// copy of its headers. Only on interfaces attached natively (--xdp-mode generic: off).
    /// off: every packet goes through a worker. Caveat on veth: a frame redirected into a
    /// veth is dropped unless the veth's peer (the other end, often in another namespace)
    /// has GRO on (`ethtool -K PEER gro on`) or an XDP program of its own.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = OnOff::On)]
    fast_path: OnOff,
    /// Huge pages for the big memory: the engines' tables (flow records and index, timer and
    /// admission links) are advised for transparent huge pages (THP in `madvise` or `always`
    /// mode), the UMEMs are mapped from the hugetlb pool when it has room (vm.nr_hugepages).
    /// Never fails the start: the log line at start and the stats file (huge_pages.*) say
    /// how much memory huge pages back. off: normal pages, nothing asked.
    #[arg(long, value_enum, value_name = "auto|off", default_value_t = HugePages::Auto)]
    huge_pages: HugePages,
    /// No status lines and no event lines (the ready line and final counters remain).
    #[arg(long, short)]
    quiet: bool,
    /// Seconds between status lines (0.01–86400).
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    status_interval: f64,
    /// Write every counter as key=value lines to FILE (replaced atomically, 4 times a second).
    #[arg(long, value_name = "FILE")]
    stats_file: Option<PathBuf>,
    /// Stop by itself after SECS, as if signalled (tests and labs; 0.1 s to a year).
    #[arg(long, value_name = "SECS")]
    max_runtime: Option<f64>,
    /// Where the gRPC API (xlb.v1, reflection, grpc.health.v1) listens: unix:PATH (created
    /// mode 0600), tcp:HOST:PORT, or none. TCP needs a token and/or client certificates, and
    /// TLS off loopback (or --api-insecure).
    #[arg(long, value_name = "WHERE", default_value = "unix:/run/xlb/xlbd.sock")]
    api: String,
    /// File holding the bearer token API clients must send (`authorization: Bearer T`).
    #[arg(long, value_name = "FILE")]
    api_token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM) of a tcp: API listener; with --api-tls-key.
    #[arg(long, value_name = "FILE", requires = "api_tls_key")]
    api_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --api-tls-cert.
    #[arg(long, value_name = "FILE", requires = "api_tls_cert")]
    api_tls_key: Option<PathBuf>,
    /// CA (PEM) whose certificates API clients must present (mutual TLS): a client
    /// certificate then authenticates like a token. Needs --api-tls-cert.
    #[arg(long, value_name = "FILE", requires = "api_tls_cert")]
    api_tls_client_ca: Option<PathBuf>,
    /// Serve a tcp: API without authentication, or off loopback without TLS: whoever reaches
    /// the port can change the configuration (or read the token on the wire).
    #[arg(long)]
    api_insecure: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Run the data-path self-probe from ADDR (one IPv4 and/or one IPv6 address, repeat the
    /// option): an address no host has, that the members route back through the appliance.
    /// Off by default.
    #[arg(long, value_name = "ADDR")]
    self_probe_source: Vec<std::net::IpAddr>,
    /// Seconds between self-probes of each TCP rule, 0.1–3600 (divided by the lab time scale).
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    self_probe_interval: f64,
    /// Accept 802.1Q-tagged frames of these VLANs (1-4094) on interface IFACE (repeatable).
    /// Other tagged frames are dropped (vlan_tag). Replies go back with the client's tag;
    /// toward a neighbour the frame carries the tag of the VLAN interface the kernel knows
    /// it on (none on the interface itself).
    #[arg(long = "vlan", value_name = "IFACE:ID[,ID...]", value_parser = parse_vlan)]
    vlans: Vec<(String, Vec<u16>)>,
    /// Keep the flows and the XDP attachment in DIR (on a bpffs, e.g. /sys/fs/bpf/xlb;
    /// mounted if needed) so that they outlive xlbd: a restart, an upgrade or a crash loses
    /// no flow, and frames for the dataplane are held (dropped, so TCP retransmits) while no
    /// xlbd runs. One directory per xlbd.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A planned upgrade: start, stop the xlbd running with PID (SIGTERM), wait for it to
    /// exit and take over its interfaces, XDP attachment and flows (needs --state-dir, the
    /// same as the running one's).
    #[arg(long, value_name = "PID", requires = "state_dir")]
    takeover: Option<u32>,
    /// Remove everything --state-dir holds (XDP is detached, the flows are freed) and exit:
    /// the host as it was before xlbd. Stop xlbd first.
    #[arg(long, requires = "state_dir")]
    cleanup: bool,
    /// Run as node NAME of a cluster behind the router's ECMP (docs/cluster.md): mid-flow
    /// TCP segments of inbound rules are picked up under the `drop` policy, the frontends are
    /// announced only while the node is fit, and reset on idle is withheld for flows that may
    /// have moved.
    #[arg(long, value_name = "NAME")]
    cluster_node: Option<String>,
    /// Where this node receives its peers' heartbeats (UDP), e.g. 198.18.8.1:7946.
    #[arg(long, value_name = "ADDR:PORT", requires = "cluster_node")]
    cluster_listen: Option<std::net::SocketAddr>,
    /// A peer's heartbeat address (repeatable).
    #[arg(
        long = "cluster-peer",
        value_name = "ADDR:PORT",
        requires = "cluster_listen"
    )]
    cluster_peers: Vec<std::net::SocketAddr>,
    /// Seconds between heartbeats, 0.01–10.
    #[arg(long, value_name = "SECS", default_value_t = 0.1)]
    cluster_heartbeat: f64,
    /// A peer not heard for this long is down, 0.05–60 s.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    cluster_dead_after: f64,
    /// How long the router may take to act on a change of the announcing nodes, 0–60 s:
    /// flows silent until then expire without reset-on-idle RSTs; a stopping node forwards
    /// this long (at most 5 s) after it withdrew.
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    cluster_settle: f64,
    /// How long this node's configuration may differ from the majority of its live peers'
    /// before it withdraws, 0–3600 s.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    cluster_config_grace: f64,
    /// Announce through BIRD 2: xlbd writes its static protocols xlb_vips4 / xlb_vips6 to
    /// FILE, which BIRD's configuration includes, and runs `birdc configure`.
    #[arg(long, value_name = "FILE", requires = "cluster_node")]
    announce_bird: Option<PathBuf>,
    /// One of this node's own SNAT frontends (repeatable): a frontend of an outbound rule
    /// whose address only this node uses and announces, so that answers come back to it.
    #[arg(
        long = "cluster-snat-frontend",
        value_name = "NAME",
        requires = "cluster_node"
    )]
    cluster_snat_frontends: Vec<String>,
    /// Sync flow states with the peers over UDP on this port (on the --cluster-listen
    /// address and on every peer's address): a lost node's flows continue on the others with
    /// their backend, SNAT port and exact reset on idle (docs/cluster.md, "Flow-state sync").
    #[arg(long, value_name = "PORT", requires = "cluster_listen")]
    cluster_sync_port: Option<u16>,
    /// The sync's cap on what it sends, bytes per second (all peers together), 10 000 to
    /// 10 000 000 000.
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 50_000_000,
        requires = "cluster_sync_port"
    )]
    cluster_sync_rate: u64,
    /// How long one refresh pass over a worker's flows takes (each flow with packets since
    /// the previous pass is sent again), 0.05–60 s.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 1.0,
        requires = "cluster_sync_port"
    )]
    cluster_sync_refresh: f64,
    /// A file holding the key every node shares (at least 16 bytes): sync datagrams carry
    /// an HMAC-SHA256 under it and only those that verify are taken. Without it, datagrams
    /// are taken from the configured peers' addresses only.
    #[arg(long, value_name = "FILE", requires = "cluster_sync_port")]
    cluster_sync_key: Option<PathBuf>,
    /// BIRD's control socket.
    #[arg(long, value_name = "PATH", default_value = "/run/bird/bird.ctl")]
    bird_socket: PathBuf,
    /// The birdc program.
    #[arg(long, value_name = "PATH", default_value = "birdc")]
    birdc: PathBuf,
    #[command(flatten)]
    ipfix: IpfixArgs,
}

/// NAT event logging over IPFIX.
#[derive(Args, Debug)]
struct IpfixArgs {
    /// Export NAT events (SNAT port allocations and releases) as IPFIX records over UDP to
    /// this collector (e.g. 198.18.0.5:4739). Off by default.
    #[arg(long, value_name = "HOST:PORT")]
    ipfix_collector: Option<std::net::SocketAddr>,
    /// With --ipfix-collector: also export load-balancing and inbound NAT flows created and
    /// removed.
    #[arg(long)]
    ipfix_lb_flows: bool,
    /// With --ipfix-collector: most records sent per second, 1–10000000 (a backlog waits in a
    /// bounded queue; what it cannot hold is counted lost).
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    ipfix_max_rate: u32,
    /// With --ipfix-collector: the IPFIX observation domain id.
    #[arg(long, value_name = "ID", default_value_t = 1)]
    ipfix_domain: u32,
}

/// `--ipfix-*`, checked.
fn ipfix(a: &IpfixArgs) -> Result<Option<IpfixOptions>, String> {
    xlb_control::limits::count(
        "--ipfix-max-rate",
        a.ipfix_max_rate,
        xlb_control::limits::IPFIX_RATE,
    )?;
    let Some(collector) = a.ipfix_collector else {
        if a.ipfix_lb_flows {
            return Err("--ipfix-lb-flows: needs --ipfix-collector".into());
        }
        return Ok(None);
    };
    Ok(Some(IpfixOptions {
        export: ExportOptions {
            collector,
            max_rate: a.ipfix_max_rate,
            domain: a.ipfix_domain,
        },
        lb_flows: a.ipfix_lb_flows,
    }))
}

fn parse_vlan(v: &str) -> Result<(String, Vec<u16>), String> {
    xlb_control::kernel::parse_vlan_option(v)
}

/// `--cluster-*` and `--announce-bird`, checked.
fn cluster(cli: &Cli) -> Result<Option<xlb_control::cluster::ClusterOptions>, String> {
    use xlb_control::limits::seconds;
    let Some(node) = &cli.cluster_node else {
        return Ok(None);
    };
    if node.is_empty()
        || node.len() > 64
        || !node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "--cluster-node {node:?}: 1 to 64 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(Some(xlb_control::cluster::ClusterOptions {
        node: node.clone(),
        listen: cli.cluster_listen,
        peers: cli.cluster_peers.clone(),
        heartbeat: seconds(
            "--cluster-heartbeat",
            cli.cluster_heartbeat,
            xlb_control::limits::Range {
                min: 0.01,
                max: 10.0,
                unit: "seconds",
            },
        )?,
        dead_after: seconds(
            "--cluster-dead-after",
            cli.cluster_dead_after,
            xlb_control::limits::Range {
                min: 0.05,
                max: 60.0,
                unit: "seconds",
            },
        )?,
        settle: seconds(
            "--cluster-settle",
            cli.cluster_settle,
            xlb_control::limits::Range {
                min: 0.0,
                max: 60.0,
                unit: "seconds",
            },
        )?,
        config_grace: seconds(
            "--cluster-config-grace",
            cli.cluster_config_grace,
            xlb_control::limits::Range {
                min: 0.0,
                max: 3600.0,
                unit: "seconds",
            },
        )?,
        bird: cli
            .announce_bird
            .clone()
            .map(|include| xlb_control::cluster::announce::BirdTarget {
                include,
                socket: cli.bird_socket.clone(),
                birdc: cli.birdc.clone(),
            }),
        snat_frontends: cli.cluster_snat_frontends.clone(),
        sync: cluster_sync(cli)?,
    }))
}

/// `--cluster-sync-*`, checked.
fn cluster_sync(cli: &Cli) -> Result<Option<xlb_control::cluster::sync::SyncOptions>, String> {
    use xlb_control::cluster::{sync::SyncOptions, sync_wire::SyncKey};
    let Some(port) = cli.cluster_sync_port else {
        return Ok(None);
    };
    if port == 0 || cli.cluster_listen.is_some_and(|l| l.port() == port) {
        return Err(format!(
            "--cluster-sync-port {port}: a port of its own (not 0, not the heartbeats')"
        ));
    }
    if !(10_000..=10_000_000_000).contains(&cli.cluster_sync_rate) {
        return Err(format!(
            "--cluster-sync-rate {}: 10000 to 10000000000 bytes a second",
            cli.cluster_sync_rate
        ));
    }
    let key = match &cli.cluster_sync_key {
        Some(path) => {
            let secret = std::fs::read(path)
                .map_err(|e| format!("--cluster-sync-key {}: {e}", path.display()))?;
            if secret.len() < 16 {
                return Err(format!(
                    "--cluster-sync-key {}: at least 16 bytes",
                    path.display()
                ));
            }
            Some(SyncKey::new(&secret))
        }
        None => None,
    };
    Ok(Some(SyncOptions {
        port,
        rate: cli.cluster_sync_rate,
        refresh: xlb_control::limits::seconds(
            "--cluster-sync-refresh",
            cli.cluster_sync_refresh,
            xlb_control::limits::Range {
                min: 0.05,
                max: 60.0,
                unit: "seconds",
            },
        )?,
        key,
    }))
}

/// The numeric options, range-checked (xlb_control::limits).
struct Checked {
    status_interval: Duration,
    max_runtime: Option<Duration>,
    self_probe_interval: Duration,
}

fn check(cli: &Cli) -> Result<Checked, String> {
    use xlb_control::limits::{self, seconds};
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    limits::count("--flow-capacity", cli.flow_capacity, limits::FLOW_CAPACITY)?;
    limits::count("--workers", cli.workers as u64, limits::WORKERS)?;
    if let Some(q) = cli.queues {
        limits::count("--queues", q, limits::QUEUES)?;
    }
    limits::cores(&cli.cores, ncpu)?;
    Ok(Checked {
        status_interval: seconds(
            "--status-interval",
            cli.status_interval,
            limits::STATUS_INTERVAL,
        )?,
        max_runtime: cli
            .max_runtime
            .map(|v| seconds("--max-runtime", v, limits::MAX_RUNTIME))
            .transpose()?,
        self_probe_interval: seconds(
            "--self-probe-interval",
            cli.self_probe_interval,
            limits::SELF_PROBE_INTERVAL,
        )?,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.cleanup {
        let dir = cli.state_dir.unwrap_or_default();
        return match xlb_control::persist::cleanup(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(f) => {
                eprintln!("xlbd: {}", f.message);
                ExitCode::from(f.code)
            }
        };
    }
    let opts = match options(cli) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("xlbd: {e}");
            return ExitCode::from(daemon::EXIT_USAGE);
        }
    };
    match daemon::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("xlbd: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// `--api-token-file`: the token, trimmed; an empty file is refused.
fn api_token(path: Option<&std::path::Path>) -> Result<Option<String>, String> {
    let Some(path) = path else {
        return Ok(None);
    };
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
        Ok(_) => Err(format!(
            "--api-token-file {}: the file is empty",
            path.display()
        )),
        Err(e) => Err(format!("--api-token-file {}: {e}", path.display())),
    }
}

/// The command line, checked, as the daemon's options.
fn options(cli: Cli) -> Result<Options, String> {
    let checked = check(&cli)?;
    let cluster = cluster(&cli)?;
    let api = daemon::parse_api(&cli.api)?;
    let api_token = api_token(cli.api_token_file.as_deref())?;
    let api_tls = match (&cli.api_tls_cert, &cli.api_tls_key) {
        (Some(cert), Some(key)) => Some(
            ServerTls::from_files(cert, key, cli.api_tls_client_ca.as_deref())
                .map_err(|e| format!("--api-tls-*: {e}"))?,
        ),
        _ => None,
    };
    Ok(Options {
        config: cli.config.unwrap_or_default(),
        interfaces: cli.interfaces,
        backend_side: (!cli.backend_side.is_empty()).then_some(cli.backend_side),
        workers: cli.workers,
        queues: cli.queues,
        busy_poll: cli.poll_mode == Poll::Busy,
        lab_time_scale: cli.lab_time_scale,
        flow_capacity: cli.flow_capacity,
        admission: AdmissionLimits {
            half_open_percent: cli.half_open_share,
            unreplied_udp_percent: cli.unreplied_udp_share,
            rule_percent: cli.rule_share,
        },
        reset_rate: cli.reset_rate,
        xdp_mode: match cli.xdp_mode {
            XdpMode::Auto => ModeRequest::Auto,
            XdpMode::Native => ModeRequest::Native,
            XdpMode::Generic => ModeRequest::Generic,
        },
        fast_path: cli.fast_path == OnOff::On,
        huge_pages: cli.huge_pages == HugePages::Auto,
        quiet: cli.quiet,
        status_interval: checked.status_interval,
        stats_file: cli.stats_file,
        cores: cli.cores,
        max_runtime: checked.max_runtime,
        api,
        api_token,
        api_tls,
        api_insecure: cli.api_insecure,
        metrics: cli.metrics,
        self_probe_sources: cli.self_probe_source,
        self_probe_interval: checked.self_probe_interval,
        ipfix: ipfix(&cli.ipfix)?,
        vlans: cli.vlans,
        state_dir: cli.state_dir,
        takeover: cli.takeover,
        cluster,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Options, String> {
        let args = [
            "xlbd", "--config", "xlb.toml", "-i", "eth0", "--api", "none",
        ];
        let cli = Cli::try_parse_from(args.iter().chain(extra)).map_err(|e| e.to_string())?;
        options(cli)
    }

    #[test]
    fn huge_pages_are_asked_for_unless_off() {
        assert!(parse(&[]).unwrap().huge_pages);
        assert!(parse(&["--huge-pages", "auto"]).unwrap().huge_pages);
        assert!(!parse(&["--huge-pages", "off"]).unwrap().huge_pages);
        let err = parse(&["--huge-pages", "on"]).unwrap_err();
        assert!(err.contains("--huge-pages"), "{err}");
        assert!(err.contains("auto") && err.contains("off"), "{err}");
    }
}
