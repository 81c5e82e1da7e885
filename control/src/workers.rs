//! Opening and spawning the workers: one AF_XDP worker per set of queues, each running an
//! engine behind an [`EngineHandler`], with its channels to the control thread, its counter
//! cell and its steering channels to the other workers.

use std::{
    sync::{atomic::AtomicBool, Arc},
    thread::JoinHandle,
    time::Duration,
};

use crossbeam::channel::{self, Receiver, Sender};
use xlb_afxdp::{
    spawn, sys, worker::SocketInfo, PollMode, Worker, WorkerConfig, WorkerExit, WorkerStats,
    XdpProgram,
};
use xlb_engine::{
    natlog::{NatEvent, NatLogMode},
    Addr, Engine, EngineConfig, RuleSet,
};

use crate::{
    fast_path::FastPath,
    handler::EngineHandler,
    huge_pages::HugePages,
    kernel::{Port, PortVlan},
    kernel_watch::KernelMailbox,
    liveness::Heartbeats,
    messages::{Ack, ControlLink, FromWorker, ToWorker},
    options::{Failure, Options},
    persist::{self, Stores, WorkerStore},
    plane::{
        cell::{cell, CellReader},
        telemetry::WorkerPlacement,
    },
    steering::Steering,
};

/// Counters travel to the cells four times a second.
const PUBLISH_EVERY_NS: u64 = 250_000_000;
/// Frames a worker's hand-off inbox holds.
const HANDOFF_INBOX: usize = 4096;

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    pub join: JoinHandle<WorkerExit<EngineHandler>>,
    pub to: Sender<ToWorker>,
}

/// The running workers and the control side's ends of their channels and cells.
#[derive(Debug)]
pub struct Workers {
    pub handles: Vec<WorkerHandle>,
    pub from: Receiver<FromWorker>,
    /// The workers' acknowledgements, for the publisher (taken once).
    pub acks: Option<Receiver<Ack>>,
    pub cells: Vec<CellReader>,
    pub port_stats: Vec<Arc<WorkerStats>>,
    pub placement: Vec<WorkerPlacement>,
    /// The AF_XDP sockets as the kernel granted them.
    pub sockets: Vec<SocketInfo>,
    /// Set to stop the workers.
    pub stop: Arc<AtomicBool>,
    /// Each worker's loop beats here (the watchdog's liveness).
    pub heartbeats: Heartbeats,
    /// What the engines' tables and the UMEMs run on (`--huge-pages`).
    pub huge_pages: HugePages,
}

impl Workers {
    pub fn senders(&self) -> Vec<Sender<ToWorker>> {
        self.handles.iter().map(|h| h.to.clone()).collect()
    }
}

/// What every worker starts from.
#[derive(Debug)]
pub struct Start<'a> {
    pub opts: &'a Options,
    pub xdp: &'a XdpProgram,
    pub ports: &'a [Port],
    pub port_vlans: &'a [PortVlan],
    /// The kernel's neighbours and routes, as every engine follows them.
    pub kernel: Arc<KernelMailbox>,
    pub rules: &'a Arc<RuleSet>,
    pub queues: u32,
    /// Self-probe sources: answers to them are taken off the wire.
    pub probe_sources: Vec<Addr>,
    /// Per port, whether it faces the members: outbound flows are taken only from there
    /// (anti-spoofing).
    pub backend_side: &'a [bool],
    /// The steering key's seed, one for every worker (they must agree on each flow's owner).
    pub steer_seed: u64,
    /// The configuration's hash, recorded in the flow stores.
    pub config_hash: u64,
    /// A cluster node's own SNAT addresses (`None`: every address of the outbound rules).
    pub snat_only: Option<Vec<Addr>>,
    /// Where the engines' NAT events go (`crate::ipfix`); `None`: the export is off.
    pub nat_events: Option<Sender<NatEvent>>,
    /// Each worker's end of the cluster's flow-state sync (taken by its worker), when on.
    pub sync: std::sync::Mutex<Vec<Option<crate::cluster::sync::WorkerSync>>>,
    /// The XDP fast path: each engine publishes its eligible flows to its part of the table.
    pub fast: Option<&'a FastPath>,
}

/// 64 random bits from the kernel, for the secret seeds of the engine's hashes.
pub fn random_seed() -> Result<u64, Failure> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Failure::runtime(format!("reading /dev/urandom: {e}")))?;
    Ok(u64::from_ne_bytes(b))
}

/// The control side's channels, shared by every worker.
struct Links {
    from: Sender<FromWorker>,
    acks: Sender<Ack>,
}

/// Opens and spawns `--workers` workers; each attaches its flow store, if given.
pub fn spawn_all(s: &Start, stores: Option<Stores>) -> Result<Workers, Failure> {
    let mut stores = stores.map(|s| s.workers.into_iter());
    let (from_tx, from) = channel::bounded(1024);
    let (ack_tx, acks) = channel::bounded(256);
    let links = Links {
        from: from_tx,
        acks: ack_tx,
    };
    let mut out = Workers {
        handles: Vec::new(),
        from,
        acks: Some(acks),
        cells: Vec::new(),
        port_stats: Vec::new(),
        placement: Vec::new(),
        sockets: Vec::new(),
        stop: Arc::new(AtomicBool::new(false)),
        heartbeats: Heartbeats::new(s.opts.workers, sys::monotonic_ns()),
        huge_pages: HugePages::new(s.opts.huge_pages),
    };
    for (w, steering) in Steering::mesh(s.opts.workers, HANDOFF_INBOX)
        .into_iter()
        .enumerate()
    {
        let store = stores.as_mut().and_then(Iterator::next);
        spawn_one(s, w, steering, &links, &mut out, store)?;
    }
    Ok(out)
}

fn poll_mode(opts: &Options) -> PollMode {
    if opts.busy_poll {
        PollMode::Busy
    } else {
        // A sleeping worker only wakes for its own sockets: frames handed to it by another
        // worker wait for the timeout, so keep it short when there are hand-offs.
        PollMode::Wakeup {
            timeout: Duration::from_millis(if opts.workers > 1 { 1 } else { 10 }),
        }
    }
}

/// The engine of worker `w`, told the ports, which of them are backend side, and their VLANs
/// (the kernel's view comes with the mailbox).
fn engine(s: &Start, w: usize, store: Option<WorkerStore>) -> Result<Engine, Failure> {
    let hash_seed = match store.as_ref().and_then(|st| st.flow_seed) {
        Some(seed) => seed,
        None => random_seed()?,
    };
    let ecfg = EngineConfig {
        worker: w as u16,
        workers: s.opts.workers as u16,
        flow_capacity: s.opts.flow_capacity,
        admission: s.opts.admission,
        reset_rate: s.opts.reset_rate,
        hash_seed,
        steer_seed: s.steer_seed,
        cluster_pickup: s.opts.cluster.is_some(),
        nat_log: (s.opts.ipfix.as_ref()).map_or(NatLogMode::Off, |o| o.mode()),
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(ecfg, Arc::clone(s.rules), sys::monotonic_ns());
    engine.set_snat_addresses(s.snat_only.clone());
    let net = engine.next_hops();
    for (p, bs) in s.ports.iter().zip(s.backend_side) {
        net.set_port(p.id, p.mac);
        net.set_backend_side(p.id, *bs);
    }
    for pv in s.port_vlans {
        net.allow_vlan(pv.port, pv.vlan);
    }
    if let Some(fast) = s.fast {
        // Before the store: XDP may have forwarded the stored flows since their records were
        // written (the store never hears of it), so the engine restores them as seen now;
        // they are published again at their next packet.
        engine.attach_fast(fast.table(w, s.ports)?);
    }
    if let Some(store) = store {
        // After the ports: restored flows take their next hops on them.
        let report = engine
            .attach_store(sys::monotonic_ns(), store.mem, s.config_hash)
            .map_err(|e| Failure::runtime(format!("worker {w}: flow store: {e}")))?;
        crate::report::line(&persist::report_line(w, &report, sys::monotonic_ns()));
    }
    Ok(engine)
}

fn spawn_one(
    s: &Start,
    w: usize,
    steering: Steering,
    links: &Links,
    out: &mut Workers,
    store: Option<WorkerStore>,
) -> Result<(), Failure> {
    let opts = s.opts;
    let cfg = WorkerConfig {
        interfaces: opts.interfaces.clone(),
        queues: (0..s.queues)
            .filter(|q| *q as usize % opts.workers == w)
            .collect(),
        poll: poll_mode(opts),
        memlock_share: opts.workers as u32,
        huge_pages: opts.huge_pages,
        ..WorkerConfig::default()
    };
    let worker = Worker::open(&cfg, s.xdp).map_err(|e| {
        Failure::runtime(format!(
            "worker {w}: {e} (queues {:?} on {}; set --queues if the interfaces have fewer)",
            cfg.queues,
            opts.interfaces.join(",")
        ))
    })?;
    out.sockets.extend(worker.sockets());
    out.huge_pages.add_umems(worker.umem_memory());
    let (to_tx, to_rx) = channel::bounded(64);
    let (writer, reader) = cell(w);
    let link = ControlLink {
        from_control: to_rx,
        to_control: links.from.clone(),
        acks: links.acks.clone(),
        counters: writer,
    };
    let engine = engine(s, w, store)?;
    // The tables are allocated (and initialised) now: advised before the first packet.
    out.huge_pages.add_engine(&engine);
    let handler = EngineHandler::new(w, engine, link, PUBLISH_EVERY_NS, Some(steering))
        .with_probe_sources(s.probe_sources.clone())
        .with_kernel(Arc::clone(&s.kernel))
        .with_heartbeat(out.heartbeats.of(w))
        .with_nat_events(s.nat_events.clone())
        .with_sync(
            (s.sync
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner))
            .get_mut(w)
            .and_then(Option::take),
        );
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let core = if opts.cores.is_empty() {
        Some((w + 1) % ncpu)
    } else {
        Some(opts.cores[w % opts.cores.len()])
    };
    out.placement.push(WorkerPlacement {
        interfaces: opts.interfaces.join(","),
        first_queue: cfg.queues.first().copied().unwrap_or(0),
        core,
    });
    out.port_stats.push(worker.stats());
    out.cells.push(reader);
    let join = spawn(w, worker, handler, Arc::clone(&out.stop), core)
        .map_err(|e| Failure::runtime(format!("spawning worker {w}: {e}")))?;
    out.handles.push(WorkerHandle { join, to: to_tx });
    Ok(())
}
