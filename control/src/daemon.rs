//! `xlbd`: start-up, the control loop, and a clean stop.
//!
//! Start: read and validate the configuration → compile it → load the XDP program, mark the
//! frontends as owned and attach to every interface → read links, routes and neighbours over
//! netlink → open and spawn the workers, each running the engine behind an
//! [`EngineHandler`] → loop: follow the kernel's neighbours and routes
//! ([`KernelWatch`]), print a status line, write the stats file → on SIGINT/SIGTERM stop the
//! workers, print the final counters and drop the XDP program (its BPF links detach it).
//!
//! Beside the control loop: the gRPC API (`xlb-api` on a small tokio runtime, one thread),
//! whose changes reach the workers through [`WorkerPublisher`], and the Prometheus endpoint.

use std::{
    collections::HashSet,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{atomic::AtomicBool, atomic::Ordering, Arc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam::channel::{self, Receiver, Sender};
use xlb_afxdp::{
    netlink::Netlink, spawn, sys, ModeRequest, PollMode, Worker, WorkerConfig, WorkerExit,
    WorkerStats, XdpProgram,
};
use xlb_api::{ControlState, Listen, ServeOptions, StateOptions};
use xlb_engine::{
    admission::AdmissionLimits, config::ConfigError, hashkey::HashKey, Addr, Config, Engine,
    EngineConfig, Event, MemberHealth, RuleSet,
};

use crate::{
    addresses::{AddressPlane, SharedRoutes, XdpMaps},
    handler::{ControlLink, EngineHandler, FromWorker, Steering, ToWorker},
    kernel::{self, Port, Resolver},
    kernel_watch::KernelWatch,
    metrics,
    plane::{DaemonTelemetry, Shared, WorkerPlacement, WorkerPublisher},
    probes::Probes,
    selfprobe::SelfProber,
    stats::{write_atomic, Totals},
};

/// 64 random bits from the kernel, for the secret seeds of the engine's hashes.
fn random_seed() -> std::io::Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| std::io::Error::new(e.kind(), format!("reading /dev/urandom: {e}")))?;
    Ok(u64::from_ne_bytes(b))
}

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

/// The AF_XDP sockets' mode and ring size as the kernel granted them: `copy`, `zero-copy` or
/// `mixed(zero-copy=N/M)`, then `/ring=R` (a range when they differ: rings are shrunk to fit
/// RLIMIT_MEMLOCK without CAP_IPC_LOCK).
fn afxdp_mode(sockets: &[xlb_afxdp::worker::SocketInfo]) -> String {
    let zc = sockets.iter().filter(|s| s.zero_copy).count();
    let mode = match zc {
        0 => "copy".to_string(),
        n if n == sockets.len() => "zero-copy".to_string(),
        n => format!("mixed(zero-copy={n}/{})", sockets.len()),
    };
    let lo = sockets.iter().map(|s| s.ring_size).min().unwrap_or(0);
    let hi = sockets.iter().map(|s| s.ring_size).max().unwrap_or(0);
    if lo == hi {
        format!("{mode}/ring={lo}")
    } else {
        format!("{mode}/ring={lo}-{hi}")
    }
}

fn describe_listen(l: &Listen) -> String {
    match l {
        Listen::Unix(p) => format!("unix:{}", p.display()),
        Listen::Tcp(a) => format!("tcp:{a}"),
    }
}

/// A failure with the exit code it deserves.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
    fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_FAILURE,
            message: message.into(),
        }
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

// Capability bits (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// What is missing to load XDP and open AF_XDP sockets, if anything.
fn missing_privileges() -> Option<String> {
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_NET_RAW) {
        missing.push("CAP_NET_RAW");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    (!missing.is_empty()).then(|| {
        format!(
            "{} needed to attach XDP programs and open AF_XDP sockets; run it as root \
             (sudo xlbd ...) or grant them: setcap cap_net_admin,cap_net_raw,cap_bpf,\
             cap_ipc_lock+ep $(command -v xlbd)",
            missing.join(", ")
        )
    })
}

/// Receive queues of `ifname`, from sysfs (right when xlbd was started by `ip netns exec`,
/// which mounts the namespace's sysfs).
fn rx_queues(ifname: &str) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/sys/class/net/{ifname}/queues")).ok()?;
    let n = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    u32::try_from(n).ok().filter(|n| *n > 0)
}

struct WorkerHandle {
    join: JoinHandle<WorkerExit<EngineHandler>>,
    to: Sender<ToWorker>,
    stats: Arc<WorkerStats>,
}

/// The gRPC API's thread and how to stop it.
struct ApiHandle {
    stop: tokio::sync::watch::Sender<bool>,
    join: JoinHandle<Result<(), String>>,
}

impl ApiHandle {
    /// Stops the server (in-flight requests get up to 2 s) and waits for its thread.
    fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(true);
        self.join
            .join()
            .unwrap_or_else(|_| Err("the API thread panicked".into()))
    }
}

/// One line on stdout, flushed (a log file or a pipe sees it at once). Write errors are
/// ignored: a reader that went away must not take the dataplane down with a panic.
pub(crate) fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn say(quiet: bool, line: &str) {
    if !quiet {
        out(line);
    }
}

fn describe_event(e: &Event, rules: &RuleSet) -> String {
    let name = |id| {
        rules
            .rule(id)
            .map(|p| p.name.to_string())
            .unwrap_or_else(|| format!("#{id}"))
    };
    let ep = |(a, p): (Addr, u16)| match a.to_ip() {
        IpAddr::V4(v4) => format!("{v4}:{p}"),
        IpAddr::V6(v6) => format!("[{v6}]:{p}"),
    };
    match *e {
        Event::ResetOnIdle {
            rule,
            client,
            backend,
        } => format!(
            "reset_on_idle rule={} client={} backend={}",
            name(rule),
            ep(client),
            ep(backend)
        ),
        Event::SnatExhausted { rule, member } => {
            format!(
                "snat_exhausted rule={} member={}",
                name(rule),
                member.to_ip()
            )
        }
    }
}

/// The data-path self-probe of the control loop: the prober, and the port (with its MAC)
/// its SYNs pretend to arrive on.
#[derive(Debug)]
struct SelfProbe {
    prober: SelfProber,
    ingress: xlb_afxdp::PortId,
    mac: [u8; 6],
}

/// Checks `--self-probe-source` and builds the prober: at most one address per family, none
/// of them an address of this host (the XDP program would hand the members' answers to the
/// kernel) or a frontend.
fn self_probe_setup(
    opts: &Options,
    config: &Config,
    ports: &[Port],
    routes: &[xlb_engine::Route],
    scale: u32,
) -> Result<Option<SelfProbe>, Failure> {
    let sources = &opts.self_probe_sources;
    if sources.is_empty() {
        return Ok(None);
    }
    for family_v4 in [true, false] {
        if sources.iter().filter(|a| a.is_ipv4() == family_v4).count() > 1 {
            return Err(Failure::usage(
                "--self-probe-source: at most one IPv4 and one IPv6 address",
            ));
        }
    }
    for a in sources {
        if config.frontends.iter().any(|f| f.address == *a) {
            return Err(Failure::usage(format!(
                "--self-probe-source {a} is a frontend address; choose an address no host has"
            )));
        }
        if std::net::UdpSocket::bind(SocketAddr::new(*a, 0)).is_ok() {
            return Err(Failure::usage(format!(
                "--self-probe-source {a} is an address of this host: members' answers to it \
                 would go to the kernel, not through the dataplane; choose an address no host \
                 has, that the members route through the appliance"
            )));
        }
    }
    // The port the SYNs pretend to arrive on: the one the source is routed through (where
    // a client with that address would be), else the first.
    let port = ports
        .iter()
        .find(|p| kernel::routed_via(routes, sources[0], p.id))
        .unwrap_or(&ports[0]);
    let interval = opts.self_probe_interval / scale.max(1);
    Ok(Some(SelfProbe {
        prober: SelfProber::new(sources, interval, Instant::now()),
        ingress: port.id,
        mac: port.mac,
    }))
}

/// Runs the daemon until SIGINT/SIGTERM.
pub fn run(opts: Options) -> Result<(), Failure> {
    let config = load_config(&opts)?;
    let scale = config.settings.lab_time_scale.max(1);
    let rules = Arc::new(
        xlb_engine::compile(&config, None, &MemberHealth::default(), 1)
            .map_err(|errs| Failure::usage(format!("{}: {errs}", opts.config.display())))?,
    );
    opts.admission
        .validate()
        .map_err(|e| Failure::usage(format!("flow admission: {e}")))?;
    if opts.interfaces.is_empty() {
        return Err(Failure::usage(
            "no interface: name each interface the dataplane drives with --interface NAME \
             (repeat it; the order gives the port numbers)",
        ));
    }
    let mut seen = HashSet::new();
    if let Some(dup) = opts.interfaces.iter().find(|i| !seen.insert(*i)) {
        return Err(Failure::usage(format!("--interface {dup} given twice")));
    }
    if opts.workers == 0 {
        return Err(Failure::usage("--workers must be at least 1"));
    }
    if let Some(m) = missing_privileges() {
        return Err(Failure::runtime(m));
    }

    // The API's socket is bound before anything is attached, so that a busy socket, a
    // missing token or a bad certificate fails the start cleanly.
    let api_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(8)
        .thread_name("xlbd-api")
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("starting the API runtime: {e}")))?;
    let api_bound = match &opts.api {
        None => None,
        Some(listen) => {
            let serve = ServeOptions {
                listen: listen.clone(),
                token: opts.api_token.clone(),
                tls: opts.api_tls.clone(),
                insecure: opts.api_insecure,
                ..ServeOptions::default()
            };
            let bound = api_runtime.block_on(xlb_api::bind(serve)).map_err(|e| {
                Failure::usage(format!(
                    "--api {}: {e} (--api none runs without the API)",
                    describe_listen(listen)
                ))
            })?;
            Some(bound)
        }
    };
    let metrics_listener = match opts.metrics {
        None => None,
        Some(addr) => Some(metrics::bind(addr).map_err(|e| {
            Failure::usage(format!(
                "--metrics {addr}: {e} (is another process listening there?)"
            ))
        })?),
    };

    // Netlink: the ports, routes and neighbours the engine starts from.
    let mut nl = Netlink::open().map_err(|e| Failure::runtime(format!("netlink socket: {e}")))?;
    let links = nl
        .links()
        .map_err(|e| Failure::runtime(format!("listing interfaces: {e}")))?;
    let ports = kernel::ports(&links, &opts.interfaces).map_err(Failure::usage)?;
    let port_vlans = kernel::port_vlans(&ports, &opts.vlans).map_err(Failure::usage)?;
    // From here on the kernel's neighbours and routes are followed from its notifications.
    let mut watch = KernelWatch::start(&ports, &port_vlans)
        .map_err(|e| Failure::runtime(format!("reading routes and neighbours: {e}")))?;
    let routes = watch.routes().to_vec();

    let mut self_probe = self_probe_setup(&opts, &config, &ports, &routes, scale)?;

    let queues = match opts.queues {
        Some(q) => q.max(1),
        None => ports
            .iter()
            .filter_map(|p| rx_queues(&p.name))
            .max()
            .unwrap_or(1),
    };
    if opts.workers > queues as usize {
        return Err(Failure::usage(format!(
            "--workers {}: more workers than queues ({queues}); a worker serves at least one \
             queue on every interface",
            opts.workers
        )));
    }

    // Members (and NAT targets) decide which interfaces are "backend side": there the XDP
    // program takes every packet not addressed to the host itself (replies to clients,
    // members' outbound connections), not only packets to frontends.
    let mut members: Vec<IpAddr> = config
        .backend_pools
        .iter()
        .flat_map(|p| p.members.iter().map(|m| m.address))
        .chain(config.inbound_nat_rules.iter().filter_map(|r| r.target))
        .collect();
    members.sort_unstable();
    members.dedup();
    let backend_side: Vec<bool> = match &opts.backend_side {
        Some(names) => {
            for n in names {
                if !opts.interfaces.contains(n) {
                    return Err(Failure::usage(format!(
                        "--backend-side {n} is not one of the --interface names"
                    )));
                }
            }
            ports.iter().map(|p| names.contains(&p.name)).collect()
        }
        None => ports
            .iter()
            .map(|p| {
                members
                    .iter()
                    .any(|m| kernel::routed_via(&routes, *m, p.id))
            })
            .collect(),
    };

    // Resolve members before the first SYN needs them: a miss costs the client a SYN
    // retransmission (1 s).
    let mut resolver = Resolver::new(Duration::from_millis(200));
    for m in &members {
        resolver.probe(Addr::from(*m));
    }

    let mut xdp = XdpProgram::load().map_err(|e| {
        Failure::runtime(format!(
            "loading the XDP program: {e}; xlbd needs root (CAP_BPF) and a kernel with XDP \
             and BTF"
        ))
    })?;
    xdp.add_local_addrs_from_kernel()
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let mut modes = Vec::new();
    for (p, bs) in ports.iter().zip(&backend_side) {
        let mode = xdp.attach(p.ifindex, opts.xdp_mode, *bs).map_err(|e| {
            Failure::runtime(format!(
                "attaching XDP to {}: {e}; is another XDP program attached (ip -d link show \
                 dev {} shows it; if it is another xlbd, stop that one)? On veth, native XDP \
                 also needs the peer's MTU at most 3506 and numrxqueues >= the peer's \
                 numtxqueues",
                p.name, p.name
            ))
        })?;
        modes.push(format!("{mode:?}").to_lowercase());
    }
    // Owned addresses and backend-side marks from here on follow the rule set, generation by
    // generation (crate::addresses). Frontends go in after the host's own addresses: one that
    // is also configured on an interface (so that the kernel answers ARP for it) must still be
    // the dataplane's.
    let routes_shared: SharedRoutes = Arc::new(std::sync::Mutex::new(routes.clone()));
    let xdp_maps = XdpMaps {
        table: xdp
            .addr_table()
            .map_err(|e| Failure::runtime(e.to_string()))?,
        ifindexes: ports.iter().map(|p| p.ifindex).collect(),
    };
    let mut address_plane = AddressPlane::new(
        Box::new(xdp_maps),
        ports.clone(),
        opts.backend_side.as_ref().map(|_| backend_side.clone()),
        Arc::clone(&routes_shared),
    );
    address_plane
        .apply_now(&rules)
        .map_err(|e| Failure::runtime(format!("marking the frontends as owned: {e}")))?;
    let attached: Vec<String> = ports
        .iter()
        .zip(&modes)
        .zip(&address_plane.applied().backend_side)
        .map(|((p, mode), bs)| {
            format!(
                "{}={mode}{}",
                p.name,
                if *bs { "+backend_side" } else { "" }
            )
        })
        .collect();
    let address_plane = Arc::new(std::sync::Mutex::new(address_plane));

    // Give the warm-up probes a moment (their answers arrive as notifications), then take
    // the neighbour table as it is.
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        watch
            .poll()
            .map_err(|e| Failure::runtime(format!("reading neighbours: {e}")))?;
        if members.iter().all(|m| watch.knows(Addr::from(*m))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let signalled =
        sys::stop_flag_on_signals().map_err(|e| Failure::runtime(format!("signals: {e}")))?;
    let (from_tx, from_rx): (Sender<FromWorker>, Receiver<FromWorker>) = channel::bounded(1024);
    let poll = if opts.busy_poll {
        PollMode::Busy
    } else {
        // A sleeping worker only wakes for its own sockets: frames handed to it by another
        // worker wait for the timeout, so keep it short when there are hand-offs.
        PollMode::Wakeup {
            timeout: Duration::from_millis(if opts.workers > 1 { 1 } else { 10 }),
        }
    };
    let steering = Steering::mesh(opts.workers, 4096);
    // One steering key for every worker (they must agree on each flow's owner), and for the
    // self-probe, which picks the worker it injects at.
    let steer_seed = random_seed().map_err(|e| Failure::runtime(format!("{e}")))?;
    if let Some(p) = self_probe.as_mut() {
        p.prober.set_steer_key(HashKey::from_seed(steer_seed));
    }
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (ack_tx, ack_rx) = channel::bounded(256);
    let shared = Shared::new(opts.workers, rules.generation());
    let mut placement = Vec::new();
    let mut sockets = Vec::new();
    let mut workers = Vec::new();
    for (w, steering) in steering.into_iter().enumerate() {
        let cfg = WorkerConfig {
            interfaces: opts.interfaces.clone(),
            queues: (0..queues)
                .filter(|q| *q as usize % opts.workers == w)
                .collect(),
            poll,
            memlock_share: opts.workers as u32,
            ..WorkerConfig::default()
        };
        let worker = Worker::open(&cfg, &xdp).map_err(|e| {
            Failure::runtime(format!(
                "worker {w}: {e} (queues {:?} on {}; set --queues if the interfaces have \
                 fewer)",
                cfg.queues,
                opts.interfaces.join(",")
            ))
        })?;
        sockets.extend(worker.sockets());
        let ecfg = EngineConfig {
            worker: w as u16,
            workers: opts.workers as u16,
            flow_capacity: opts.flow_capacity,
            admission: opts.admission,
            reset_rate: opts.reset_rate,
            hash_seed: random_seed().map_err(|e| Failure::runtime(format!("{e}")))?,
            steer_seed,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(ecfg, Arc::clone(&rules), sys::monotonic_ns());
        let net = engine.next_hops();
        for (p, bs) in ports.iter().zip(&backend_side) {
            net.set_port(p.id, p.mac);
            // Outbound flows are taken only from the members' side (anti-spoofing).
            net.set_backend_side(p.id, *bs);
        }
        for pv in &port_vlans {
            net.allow_vlan(pv.port, pv.vlan);
        }
        let (to_tx, to_rx) = channel::bounded(64);

        let link = ControlLink {
            from_control: to_rx,
            to_control: from_tx.clone(),
            acks: ack_tx.clone(),
        };
        let handler = EngineHandler::new(w, engine, link, 250_000_000, Some(steering))
            .with_probe_sources(
                self_probe
                    .as_ref()
                    .map(|p| p.prober.sources())
                    .unwrap_or_default(),
            )
            .with_kernel(watch.mailbox());
        let stats = worker.stats();
        let core = if opts.cores.is_empty() {
            Some((w + 1) % ncpu)
        } else {
            Some(opts.cores[w % opts.cores.len()])
        };
        placement.push(WorkerPlacement {
            interfaces: opts.interfaces.join(","),
            first_queue: cfg.queues.first().copied().unwrap_or(0),
            core,
        });
        let join = spawn(w, worker, handler, Arc::clone(&stop), core)
            .map_err(|e| Failure::runtime(format!("spawning worker {w}: {e}")))?;
        workers.push(WorkerHandle {
            join,
            to: to_tx,
            stats,
        });
    }
    drop(from_tx);
    drop(ack_tx);

    let senders: Vec<Sender<ToWorker>> = workers.iter().map(|h| h.to.clone()).collect();
    let poll_name = if opts.busy_poll { "busy" } else { "wakeup" };
    let state = Arc::new(ControlState::new(
        config.clone(),
        Arc::clone(&rules),
        MemberHealth::default(),
        Arc::new(
            WorkerPublisher::new(senders.clone(), ack_rx, Arc::clone(&shared))
                .with_addresses(Arc::clone(&address_plane)),
        ),
        StateOptions::default(),
    ));
    // Health probes publish through the same state as the API (docs/xlbd.md, "Health probes
    // and drain").
    let probes = Probes::spawn(Arc::clone(&state), Arc::clone(&shared), opts.quiet)
        .map_err(|e| Failure::runtime(format!("starting the health probes: {e}")))?;
    let telemetry = Arc::new(DaemonTelemetry::new(
        senders,
        Arc::clone(&shared),
        placement,
        poll_name,
    ));
    let mut extras = String::new();
    let api = match api_bound {
        None => None,
        Some(bound) => {
            if let Some(l) = &opts.api {
                extras.push_str(&format!(" api={}", describe_listen(l)));
            }
            let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
            let socket = match &opts.api {
                Some(Listen::Unix(p)) => Some(p.clone()),
                _ => None,
            };
            let state = Arc::clone(&state);
            let telemetry: Arc<dyn xlb_api::Telemetry> = telemetry.clone();
            let join = std::thread::Builder::new()
                .name("xlbd-api".into())
                .spawn(move || {
                    let mut stop_rx2 = stop_rx.clone();
                    let shutdown = async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    };
                    let r = api_runtime.block_on(async move {
                        tokio::select! {
                            r = bound.run(state, telemetry, shutdown) => r.map_err(|e| e.to_string()),
                            // Graceful shutdown gets 2 s; a client that keeps a stream open
                            // does not hold xlbd.
                            _ = async move {
                                let _ = stop_rx2.wait_for(|s| *s).await;
                                tokio::time::sleep(Duration::from_secs(2)).await;
                            } => Ok(()),
                        }
                    });
                    api_runtime.shutdown_timeout(Duration::from_millis(500));
                    // The server removes its socket after a graceful stop; after a cut-short
                    // one, xlbd does (the path is its own: it bound it at start).
                    if let Some(p) = socket {
                        let _ = std::fs::remove_file(p);
                    }
                    r
                })
                .map_err(|e| Failure::runtime(format!("spawning the API thread: {e}")))?;
            Some(ApiHandle {
                stop: stop_tx,
                join,
            })
        }
    };
    let metrics_stop = Arc::new(AtomicBool::new(false));
    let metrics_thread = match metrics_listener {
        None => None,
        Some(listener) => {
            if let Ok(local) = listener.local_addr() {
                extras.push_str(&format!(" metrics=http://{local}/metrics"));
            }
            let sources = metrics::Sources {
                state: Arc::clone(&state),
                shared: Arc::clone(&shared),
                port_stats: workers.iter().map(|h| Arc::clone(&h.stats)).collect(),
                interfaces: opts.interfaces.clone(),
                lab_time_scale: scale,
            };
            // A thread that cannot be spawned leaves xlbd without metrics, not down.
            match metrics::spawn(listener, sources, Arc::clone(&metrics_stop)) {
                Ok(j) => Some(j),
                Err(e) => {
                    say(opts.quiet, &format!("xlbd warning: metrics thread: {e}"));
                    None
                }
            }
        }
    };

    let mut start = format!(
        "xlbd ready interfaces={} workers={} queues={queues} poll={} afxdp={} frontends={} \
         rules={} neighbours={}",
        attached.join(","),
        opts.workers,
        if opts.busy_poll { "busy" } else { "wakeup" },
        afxdp_mode(&sockets),
        config.frontends.len(),
        rules.rules().count(),
        watch.view().neighbours.len(),
    );
    if !opts.vlans.is_empty() {
        let vlans: Vec<String> = opts
            .vlans
            .iter()
            .map(|(i, ids)| {
                let ids: Vec<String> = ids.iter().map(u16::to_string).collect();
                format!("{i}:{}", ids.join("+"))
            })
            .collect();
        start.push_str(&format!(" vlans={}", vlans.join(",")));
    }
    start.push_str(&extras);
    if let Some(p) = &self_probe {
        let sources: Vec<String> = p
            .prober
            .sources()
            .iter()
            .map(|a| a.to_ip().to_string())
            .collect();
        start.push_str(&format!(
            " self_probe={}/{}ms",
            sources.join(","),
            p.prober.interval().as_millis()
        ));
    }
    if scale != 1 {
        start.push_str(&format!(" lab_time_scale={scale}"));
    }
    // Always printed, even with --quiet: scripts wait for it.
    out(&start);

    let result = control_loop(
        &opts,
        scale,
        &state,
        &shared,
        &ports,
        &mut watch,
        &mut resolver,
        &workers,
        &from_rx,
        signalled,
        &mut self_probe,
        &LiveAddresses {
            plane: Arc::clone(&address_plane),
            routes: Arc::clone(&routes_shared),
        },
    );
    // The API first: no change may be in flight while the workers stop.
    let mut failed = result.err();
    if let Some(a) = api {
        if let Err(e) = a.stop() {
            failed.get_or_insert(format!("API: {e}"));
        }
    }
    // Then the probes, which publish too.
    probes.stop();
    metrics_stop.store(true, Ordering::Relaxed);
    if let Some(j) = metrics_thread {
        let _ = j.join();
    }
    stop.store(true, Ordering::Relaxed);

    let mut snaps = Vec::new();
    for (w, h) in workers.into_iter().enumerate() {
        match h.join.join() {
            Ok(exit) => {
                if let Err(e) = exit.result {
                    failed.get_or_insert(format!("worker {w}: {e}"));
                }
                snaps.push(exit.handler.snapshot());
            }
            Err(_) => {
                failed.get_or_insert(format!("worker {w} panicked"));
            }
        }
    }
    let totals = Totals::sum(&snaps, &state.snapshot().rules);
    out(&format!("xlbd final {}", totals.status_line(scale)));
    if let Some(path) = &opts.stats_file {
        let _ = write_atomic(path, &totals.to_kv(scale));
    }
    // Dropping the program closes its BPF links: XDP is detached from every interface.
    drop(xdp);
    out(&format!(
        "xlbd stopped: XDP detached from {}",
        opts.interfaces.join(",")
    ));
    match failed {
        Some(e) => Err(Failure::runtime(e)),
        None => Ok(()),
    }
}

/// The address plane and the routes it reads, as the control loop sees them.
struct LiveAddresses {
    plane: Arc<std::sync::Mutex<AddressPlane>>,
    routes: SharedRoutes,
}

#[allow(clippy::too_many_arguments)]
fn control_loop(
    opts: &Options,
    scale: u32,
    state: &ControlState,
    shared: &Shared,
    ports: &[Port],
    watch: &mut KernelWatch,
    resolver: &mut Resolver,
    workers: &[WorkerHandle],
    from_rx: &Receiver<FromWorker>,
    signalled: &AtomicBool,
    self_probe: &mut Option<SelfProbe>,
    live: &LiveAddresses,
) -> Result<(), String> {
    const TICK: Duration = Duration::from_millis(20);
    const STATS_FILE_EVERY: Duration = Duration::from_millis(250);
    const KERNEL_WARNING_EVERY: Duration = Duration::from_secs(5);
    let mut next_status = Instant::now() + opts.status_interval;
    let mut next_stats_file = Instant::now();
    let mut next_kernel_warning = Instant::now();
    let mut resyncs = watch.stats().resyncs;
    let mut routes_version = watch.view().routes_version;
    // Backend-side marks to recompute after a route change (when no change is being published).
    let mut marks_stale = false;
    let mut members_probed_at = 0;
    let started = Instant::now();
    while !signalled.load(Ordering::Relaxed) {
        // Members added live: resolve their neighbours before the first SYN needs them.
        let generation = state.generation();
        if generation != members_probed_at {
            members_probed_at = generation;
            for m in state.snapshot().rules.member_addrs() {
                resolver.probe(*m);
            }
        }
        if marks_stale {
            // try_lock: a publish in flight holds the plane, and recomputes the marks itself.
            if let Ok(mut plane) = live.plane.try_lock() {
                marks_stale = false;
                if let Err(e) = plane.apply_now(&state.snapshot().rules) {
                    say(
                        opts.quiet,
                        &format!("xlbd warning: backend-side interfaces after a route change: {e}"),
                    );
                }
            }
        }
        if opts.max_runtime.is_some_and(|d| started.elapsed() >= d) {
            say(opts.quiet, "xlbd: --max-runtime reached, stopping");
            break;
        }
        if let Some(w) = workers.iter().position(|h| h.join.is_finished()) {
            return Err(format!("worker {w} stopped unexpectedly"));
        }
        let wake = Instant::now() + TICK;
        while let Ok(msg) = from_rx.recv_deadline(wake) {
            match msg {
                FromWorker::Stats(s) => shared.store(*s),
                FromWorker::Misses(list) => {
                    // The kernel resolves them; the entries arrive as notifications.
                    for a in list {
                        resolver.probe(a);
                    }
                }
                FromWorker::Event(w, e) => {
                    say(
                        opts.quiet,
                        &format!(
                            "xlbd event worker={w} {}",
                            describe_event(&e, &state.snapshot().rules)
                        ),
                    );
                    shared.event(w, e);
                }
                FromWorker::ProbeAnswer { source, port, ok } => {
                    if let Some(p) = self_probe.as_mut() {
                        p.prober.answered(source, port, ok);
                    }
                }
            }
        }
        if let Some(p) = self_probe.as_mut() {
            let snap = state.snapshot();
            let round = p.prober.round(
                Instant::now(),
                &snap.config,
                &snap.rules,
                workers.len(),
                p.ingress,
                p.mac,
            );
            for (w, inj) in round {
                // A worker whose channel is full does not answer: the probe fails, as it
                // should (that worker is not keeping up).
                let _ = workers[w].to.try_send(ToWorker::Probe(inj));
            }
            *shared
                .datapath
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = p.prober.report();
        }
        let now = Instant::now();
        // Neighbour and route changes: published to every worker's mailbox, never lost.
        if let Err(e) = watch.poll() {
            if now >= next_kernel_warning {
                next_kernel_warning = now + KERNEL_WARNING_EVERY;
                say(
                    opts.quiet,
                    &format!("xlbd warning: following the kernel's neighbours and routes: {e}"),
                );
            }
        }
        // Members, NAT targets and gateways the kernel dropped (its garbage collector does
        // not know the dataplane uses them): resolved again before a new flow needs them.
        let gone = watch.take_gone();
        if !gone.is_empty() {
            let snap = state.snapshot();
            let needed = |a: &Addr| {
                snap.rules.member_addrs().contains(a)
                    || watch.routes().iter().any(|r| r.gateway == Some(*a))
            };
            for a in gone.iter().filter(|a| needed(a)) {
                resolver.probe_soon(*a);
            }
        }
        resolver.retry_deferred();
        if watch.stats().resyncs != resyncs {
            resyncs = watch.stats().resyncs;
            say(
                opts.quiet,
                &format!(
                    "xlbd event kernel_resync resyncs={resyncs} why=\"netlink notifications \
                     were lost; neighbours, routes and links read again\""
                ),
            );
        }
        if watch.view().routes_version != routes_version {
            // The backend-side interfaces depend on the routes to the members.
            routes_version = watch.view().routes_version;
            *live
                .routes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = watch.routes().to_vec();
            marks_stale = true;
        }
        if now >= next_stats_file {
            next_stats_file = now + STATS_FILE_EVERY;
            if let Some(path) = &opts.stats_file {
                let totals = Totals::sum(&shared.snapshots(), &state.snapshot().rules);
                if let Err(e) = write_atomic(path, &totals.to_kv(scale)) {
                    say(
                        opts.quiet,
                        &format!("xlbd warning: writing {}: {e}", path.display()),
                    );
                }
            }
        }
        if now >= next_status {
            next_status = now + opts.status_interval;
            if !opts.quiet {
                let totals = Totals::sum(&shared.snapshots(), &state.snapshot().rules);
                let port_line: Vec<String> = workers
                    .iter()
                    .flat_map(|h| h.stats.ports())
                    .zip(ports.iter().cycle())
                    .map(|(s, p)| format!("{}:rx={}/tx={}", p.name, s.rx_packets, s.tx_packets))
                    .collect();
                say(
                    false,
                    &format!(
                        "xlbd status {} ports[{}]",
                        totals.status_line(scale),
                        port_line.join(" ")
                    ),
                );
            }
        }
    }
    Ok(())
}
