//! Start-up, in named phases (docs/xlbd.md, "Start-up, in order"): the configuration, the
//! preflight checks, the runtime and the endpoints, what the kernel knows, XDP, the workers,
//! the services; each phase's failure says what to do and carries its exit code.

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::runtime::Runtime;
use xlb_afxdp::{netlink::Netlink, AddrKind, XdpProgram};
use xlb_api::{Bound, ServeOptions};
use xlb_engine::{Addr, Config, MemberHealth, RuleSet};

use crate::{
    addresses::{AddressPlane, SharedRoutes, XdpMaps},
    fast_path::{self, FastCounters, FastPath},
    kernel::{self, Port, PortVlan, Resolver},
    kernel_watch::KernelWatch,
    metrics,
    options::{describe_listen, load_config, Failure, Options},
    preflight,
};

/// Phase 1: the configuration, validated and compiled as generation 1. Members the file
/// drains begin their drain now (their deadlines count from here, on the workers' clock).
pub fn configure(opts: &Options) -> Result<(Config, Arc<RuleSet>, MemberHealth), Failure> {
    let config = load_config(opts)?;
    let mut health = MemberHealth::default();
    health.follow_drains(&config, xlb_afxdp::sys::monotonic_ns());
    let rules = xlb_engine::compile(&config, None, &health, 1)
        .map_err(|errs| Failure::usage(format!("{}: {errs}", opts.config.display())))?;
    opts.admission
        .validate()
        .map_err(|e| Failure::usage(format!("flow admission: {e}")))?;
    preflight::command(opts)?;
    preflight::privileges()?;
    Ok((config, Arc::new(rules), health))
}

/// Phase 2: the one tokio runtime (API, metrics, probes, signals) and the stop flag that
/// SIGINT and SIGTERM set.
pub fn runtime() -> Result<(Runtime, Arc<AtomicBool>), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .thread_name("xlbd-rt")
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("starting the runtime: {e}")))?;
    let signalled = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&signalled);
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let _enter = runtime.enter();
        signal(SignalKind::interrupt()).and_then(|i| Ok((i, signal(SignalKind::terminate())?)))
    };
    let (mut int, mut term) = signals.map_err(|e| Failure::runtime(format!("signals: {e}")))?;
    runtime.spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        flag.store(true, Ordering::Relaxed);
    });
    Ok((runtime, signalled))
}

/// The API's and the metrics' sockets, bound before anything is attached so that a busy
/// socket, a missing token or a bad certificate fails the start cleanly.
#[derive(Debug)]
pub struct Endpoints {
    pub api: Option<Bound>,
    pub metrics: Option<std::net::TcpListener>,
}

/// Phase 3: bind the endpoints.
pub fn bind_endpoints(runtime: &Runtime, opts: &Options) -> Result<Endpoints, Failure> {
    let api = match &opts.api {
        None => None,
        Some(listen) => {
            let serve = ServeOptions {
                listen: listen.clone(),
                token: opts.api_token.clone(),
                tls: opts.api_tls.clone(),
                insecure: opts.api_insecure,
                ..ServeOptions::default()
            };
            let bound = runtime.block_on(xlb_api::bind(serve)).map_err(|e| {
                Failure::usage(format!(
                    "--api {}: {e} (--api none runs without the API)",
                    describe_listen(listen)
                ))
            })?;
            Some(bound)
        }
    };
    let metrics = match opts.metrics {
        None => None,
        Some(addr) => Some(metrics::bind(addr).map_err(|e| {
            Failure::usage(format!(
                "--metrics {addr}: {e} (is another process listening there?)"
            ))
        })?),
    };
    Ok(Endpoints { api, metrics })
}

/// What the kernel of the appliance knows, as the daemon keeps it.
#[derive(Debug)]
pub struct Kernel {
    /// Neighbours and routes, followed from the kernel's notifications.
    pub watch: KernelWatch,
    pub ports: Vec<Port>,
    /// `--vlan`, by port.
    pub port_vlans: Vec<PortVlan>,
    /// Pool members and NAT targets of the start-up configuration.
    pub members: Vec<IpAddr>,
    pub resolver: Resolver,
    pub queues: u32,
    pub backend_side: Vec<bool>,
}

/// Phase 4: the ports (and their `--vlan`s), the kernel's neighbours and routes (subscribed
/// to, then read once; followed from the notifications from here on), the queues and the
/// backend-side interfaces; members' neighbours are asked for at once, so that the first SYN
/// does not wait for ARP (a miss costs the client a SYN retransmission, 1 s).
pub fn read_kernel(opts: &Options, config: &Config) -> Result<Kernel, Failure> {
    let mut nl = Netlink::open().map_err(|e| Failure::runtime(format!("netlink socket: {e}")))?;
    let links = nl
        .links()
        .map_err(|e| Failure::runtime(format!("listing interfaces: {e}")))?;
    let ports = kernel::ports(&links, &opts.interfaces).map_err(Failure::usage)?;
    let port_vlans = kernel::port_vlans(&ports, &opts.vlans).map_err(Failure::usage)?;
    let watch = KernelWatch::start(&ports, &port_vlans)
        .map_err(|e| Failure::runtime(format!("reading routes and neighbours: {e}")))?;
    let queues = preflight::queues(opts, &ports)?;
    let members = preflight::members(config);
    let backend_side = preflight::backend_side(opts, &ports, watch.routes(), &members)?;
    let mut resolver = Resolver::new(Duration::from_millis(200));
    for m in &members {
        resolver.probe(Addr::from(*m));
    }
    Ok(Kernel {
        watch,
        ports,
        port_vlans,
        members,
        resolver,
        queues,
        backend_side,
    })
}

/// The XDP program, attached, and the owned addresses and backend-side marks that follow the
/// rule set from here on.
#[derive(Debug)]
pub struct Attached {
    pub xdp: XdpProgram,
    pub plane: Arc<Mutex<AddressPlane>>,
    pub routes: SharedRoutes,
    /// `name=mode[+backend_side]` per interface, for the ready line.
    pub described: Vec<String>,
    /// The XDP fast path (`--fast-path on`).
    pub fast: Option<FastPath>,
    /// The program's fast-path counters (also with `--fast-path off`).
    pub fast_counters: Arc<FastCounters>,
}

/// Phase 5: load the XDP program, mark the host's addresses local, attach to every
/// interface, then take the frontends (after the host's own addresses: one that is also
/// configured on an interface, so that the kernel answers ARP for it, must still be the
/// dataplane's).
pub fn attach_xdp(
    opts: &Options,
    k: &Kernel,
    rules: &RuleSet,
    steer_seed: u64,
) -> Result<Attached, Failure> {
    // The fast path's table is sized before the program is loaded (a map's size is fixed).
    let fast_layout = (opts.fast_path)
        .then(|| fast_path::layout(opts.flow_capacity, opts.workers))
        .transpose()?;
    // With a state directory the table is pinned there: it outlives xlbd with the flows,
    // and a table a previous xlbd left holds what XDP recorded of them since.
    let pin = opts
        .state_dir
        .as_deref()
        .map(xlb_afxdp::pinned::fast_table_path);
    let loaded = match &fast_layout {
        Some(layout) => XdpProgram::load_with_pinned(layout.elements(), pin.as_deref()),
        None => XdpProgram::load().map(|x| (x, false)),
    };
    let (mut xdp, found) = loaded.map_err(|e| {
        Failure::runtime(format!(
            "loading the XDP program: {e}; xlbd needs root (CAP_BPF) and a kernel with XDP \
             and BTF"
        ))
    })?;
    xdp.add_local_addrs_from_kernel()
        .map_err(|e| Failure::runtime(e.to_string()))?;
    // The frontends are owned before the program runs anywhere: a program that takes over a
    // pinned attachment carrying live flows must never pass their frames to the host.
    for a in rules.frontend_addrs() {
        xdp.add_addr(a.to_ip(), AddrKind::Owned)
            .map_err(|e| Failure::runtime(format!("marking the frontends as owned: {e}")))?;
    }
    let mut modes = Vec::new();
    // With a state directory the attachment outlives xlbd (a pinned link) and frames wait
    // for a worker rather than reach the host untranslated (crate::persist).
    xdp.set_hold_without_socket(opts.state_dir.is_some());
    for (p, bs) in k.ports.iter().zip(&k.backend_side) {
        let attached = match &opts.state_dir {
            Some(dir) => xdp
                .attach_pinned(p.ifindex, opts.xdp_mode, *bs, dir)
                .map(|(mode, _)| mode),
            None => xdp.attach(p.ifindex, opts.xdp_mode, *bs),
        };
        let mode = attached.map_err(|e| {
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
    let fast = fast_layout
        .map(|layout| FastPath::set_up(&mut xdp, layout, &k.ports, found, steer_seed))
        .transpose()?;
    let fast_counters = fast_path::counters(
        &xdp,
        fast.is_some(),
        fast.as_ref().map(|f| Arc::clone(&f.grace)),
    )?;
    let routes: SharedRoutes = Arc::new(Mutex::new(k.watch.routes().to_vec()));
    let maps = XdpMaps {
        table: xdp
            .addr_table()
            .map_err(|e| Failure::runtime(e.to_string()))?,
        ifindexes: k.ports.iter().map(|p| p.ifindex).collect(),
    };
    let fixed = opts.backend_side.as_ref().map(|_| k.backend_side.clone());
    let mut plane = AddressPlane::new(Box::new(maps), k.ports.clone(), fixed, Arc::clone(&routes));
    plane
        .apply_now(rules)
        .map_err(|e| Failure::runtime(format!("marking the frontends as owned: {e}")))?;
    let described = k
        .ports
        .iter()
        .zip(&modes)
        .zip(&plane.applied().backend_side)
        .enumerate()
        .map(|(i, ((p, mode), bs))| {
            let fast = fast.as_ref().is_some_and(|f| f.port_ok[i]);
            format!(
                "{}={mode}{}{}",
                p.name,
                if *bs { "+backend_side" } else { "" },
                if fast { "+fast" } else { "" }
            )
        })
        .collect();
    Ok(Attached {
        xdp,
        plane: Arc::new(Mutex::new(plane)),
        routes,
        described,
        fast,
        fast_counters,
    })
}

/// Phase 6: give the warm-up probes up to 300 ms (their answers arrive as notifications),
/// then take the neighbour table as it is.
pub fn settle_neighbours(k: &mut Kernel) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        k.watch
            .poll()
            .map_err(|e| Failure::runtime(format!("reading neighbours: {e}")))?;
        if k.members.iter().all(|m| k.watch.knows(Addr::from(*m))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
