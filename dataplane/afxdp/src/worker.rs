//! One dataplane worker: the AF_XDP sockets of its queues on every interface, their UMEM,
//! and the loop that feeds frames to a [`FrameHandler`].
//!
//! A worker owns, for each queue it serves, one socket per interface. All those sockets
//! share one UMEM by default (XDP_SHARED_UMEM across devices, Linux >= 5.10), so a frame
//! received on interface A is transmitted on interface B by moving its descriptor, with
//! no copy. Sockets that cannot join the shared UMEM (e.g. the first socket bound
//! zero-copy on a NIC and another interface only does copy mode, since shared sockets
//! inherit the first one's mode) get a UMEM of their own, and frames crossing between
//! UMEMs are copied. See README.md.
//!
//! The loop, per iteration: read the clock once → receive a batch from every socket →
//! handle each frame → transmit on the verdict's port → recycle completions → run
//! `expire` with a bounded budget → refill the fill rings → in wakeup mode, sleep in
//! `ppoll()` bounded by `next_deadline`.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use xsk_rs::{
    config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig},
    CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem,
};

use crate::{
    error::{Error, Result},
    handler::{FrameHandler, PortId, Verdict},
    huge,
    netlink::Netlink,
    sys,
    umem::{self, UmemBacking, UmemMemory, UmemPlan},
    xdp::XdpProgram,
};

/// How a worker waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Spin on the rings: lowest latency, one full core per worker.
    Busy,
    /// Sleep in `ppoll()` when idle, at most `timeout` (also how fast the stop flag is
    /// noticed) and never past the handler's next deadline. For tests and small hosts:
    /// on 2 vCPUs a spinning worker starves everything else.
    Wakeup { timeout: Duration },
}

/// Zero-copy or copy-mode binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BindMode {
    /// Zero-copy when the driver offers it, copy mode otherwise (veth: always copy).
    #[default]
    Auto,
    Copy,
    ZeroCopy,
}

/// Whether the sockets of a worker share one UMEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UmemSharing {
    /// One UMEM for all the worker's sockets: forwarding between interfaces moves
    /// descriptors, no copy.
    #[default]
    PerWorker,
    /// One UMEM per socket: every frame that changes interface is copied. Only useful
    /// where sharing is impossible, and to measure what sharing saves.
    PerSocket,
}

/// What a worker serves and how.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Interfaces, in [`PortId`] order.
    pub interfaces: Vec<String>,
    /// Queues this worker owns on every interface. Queues not owned by any worker get
    /// nothing from the XDP program (their packets fall back to the kernel).
    pub queues: Vec<u32>,
    pub bind: BindMode,
    pub poll: PollMode,
    pub sharing: UmemSharing,
    /// Size of every ring (power of two); shrunk to fit RLIMIT_MEMLOCK if needed.
    pub ring_size: u32,
    /// UMEM frame size: 2048 or 4096.
    pub frame_size: u32,
    /// Frames received per socket per iteration.
    pub batch: u32,
    /// Timer work per iteration.
    pub expire_budget: usize,
    /// How many workers share this process's RLIMIT_MEMLOCK budget.
    pub memlock_share: u32,
    /// Copy mode: the most frames one `sendto()` kick transmits (`XDP_MAX_TX_SKB_BUDGET`,
    /// Linux ≥ 6.17; the kernel's default is 32). 0: the TX ring's size. Kernels without
    /// the option keep 32.
    pub copy_tx_budget: u32,
    /// Back the UMEMs with huge pages: from the hugetlb pool when it has room, else
    /// transparent huge pages where the kernel allows them, else normal pages (never an
    /// error). [`Worker::umem_memory`] says which.
    pub huge_pages: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            queues: vec![0],
            bind: BindMode::Auto,
            poll: PollMode::Busy,
            sharing: UmemSharing::PerWorker,
            ring_size: 1024,
            frame_size: 2048,
            batch: 64,
            expire_budget: 256,
            memlock_share: 1,
            copy_tx_budget: 0,
            huge_pages: false,
        }
    }
}

/// Counters of one port (interface) of a worker.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames put on this port's TX rings.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames the handler dropped (counted on the ingress port).
    pub dropped: u64,
    /// Frames for this port lost because its TX ring was full.
    pub tx_ring_full: u64,
    /// Frames for this port lost because no free UMEM frame was left to copy into.
    pub no_frame: u64,
    /// `Verdict::Tx` naming a port that does not exist or a length beyond the frame.
    pub bad_verdict: u64,
    /// Frames emitted by `expire` on this port.
    pub emitted: u64,
    /// TX wakeups (`sendto`) issued on this port.
    pub kicks: u64,
    /// Wakeups that failed with something else than EAGAIN/EBUSY/ENOBUFS/ENETDOWN.
    pub kick_errors: u64,
}

const N_FIELDS: usize = 11;

impl PortStats {
    fn to_array(self) -> [u64; N_FIELDS] {
        [
            self.rx_packets,
            self.rx_bytes,
            self.tx_packets,
            self.tx_bytes,
            self.dropped,
            self.tx_ring_full,
            self.no_frame,
            self.bad_verdict,
            self.emitted,
            self.kicks,
            self.kick_errors,
        ]
    }

    fn from_array(a: [u64; N_FIELDS]) -> Self {
        Self {
            rx_packets: a[0],
            rx_bytes: a[1],
            tx_packets: a[2],
            tx_bytes: a[3],
            dropped: a[4],
            tx_ring_full: a[5],
            no_frame: a[6],
            bad_verdict: a[7],
            emitted: a[8],
            kicks: a[9],
            kick_errors: a[10],
        }
    }
}

impl std::ops::Add for PortStats {
    type Output = Self;

    /// Field-wise sum (totals over ports or workers).
    fn add(self, other: Self) -> Self {
        let (a, b) = (self.to_array(), other.to_array());
        Self::from_array(std::array::from_fn(|i| a[i] + b[i]))
    }
}

/// Counters a worker publishes for other threads (single writer, relaxed stores).
#[derive(Debug)]
pub struct WorkerStats {
    ports: Vec<[AtomicU64; N_FIELDS]>,
    loops: AtomicU64,
    sleeps: AtomicU64,
    pinned: AtomicBool,
}

impl WorkerStats {
    fn new(ports: usize) -> Self {
        Self {
            ports: (0..ports)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            loops: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            pinned: AtomicBool::new(false),
        }
    }

    /// Per-port counters, indexed by [`PortId`].
    pub fn ports(&self) -> Vec<PortStats> {
        self.ports
            .iter()
            .map(|p| PortStats::from_array(std::array::from_fn(|i| p[i].load(Ordering::Relaxed))))
            .collect()
    }

    /// Loop iterations so far.
    pub fn loops(&self) -> u64 {
        self.loops.load(Ordering::Relaxed)
    }

    /// Times the worker slept in `ppoll()`.
    pub fn sleeps(&self) -> u64 {
        self.sleeps.load(Ordering::Relaxed)
    }

    /// Whether the worker thread got the core it asked for.
    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }

    fn publish(&self, local: &[PortStats], loops: u64, sleeps: u64) {
        for (dst, src) in self.ports.iter().zip(local) {
            for (d, s) in dst.iter().zip(src.to_array()) {
                d.store(s, Ordering::Relaxed);
            }
        }
        self.loops.store(loops, Ordering::Relaxed);
        self.sleeps.store(sleeps, Ordering::Relaxed);
    }
}

/// An interface of the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub ifindex: u32,
    pub mac: Option<[u8; 6]>,
}

/// One AF_XDP socket of the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketInfo {
    pub port: PortId,
    pub queue: u32,
    pub zero_copy: bool,
    /// Index of the UMEM the socket uses (equal indexes: frames move without a copy).
    pub umem: usize,
    pub ring_size: u32,
    /// Copy mode: frames one `sendto()` transmits (32 unless the kernel took a larger
    /// `XDP_MAX_TX_SKB_BUDGET`).
    pub tx_budget: u32,
}

/// The kernel's per-socket drop counters (`XDP_STATISTICS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketKernelStats {
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    pub rx_ring_full: u64,
    pub rx_fill_ring_empty_descs: u64,
    pub tx_ring_empty_descs: u64,
}

struct Sock {
    port: PortId,
    queue: u32,
    umem: usize,
    ring_size: u32,
    zero_copy: bool,
    /// Frames one copy-mode kick transmits.
    tx_budget: u32,
    fd: RawFd,
    rx: RxQueue,
    tx: TxQueue,
    fq: FillQueue,
    cq: CompQueue,
    /// Frames decided for this socket's TX ring during the current step.
    pending: Vec<FrameDesc>,
}

/// Everything the loop touches except the handler, so that `expire`'s emit callback can
/// borrow it while the handler is borrowed too.
struct Io {
    umems: Vec<Umem>,
    /// Free frames of each UMEM (a stack: recently used frames are warm in cache).
    free: Vec<Vec<FrameDesc>>,
    socks: Vec<Sock>,
    nports: usize,
    /// `tx_route[ingress_socket * nports + port]`: the socket a verdict for `port` uses —
    /// the one on the ingress socket's queue, so a flow stays on one queue.
    tx_route: Vec<usize>,
    /// Socket used for frames emitted by timers, per port.
    emit_sock: Vec<usize>,
    counters: Vec<PortStats>,
    rx_scratch: Vec<FrameDesc>,
    cq_scratch: Vec<FrameDesc>,
}

/// A worker ready to run. Created (and its sockets registered in the XSKMAP) in the
/// namespace of its interfaces; run on any thread.
pub struct Worker {
    io: Io,
    ports: Vec<PortInfo>,
    pollfds: Vec<libc::pollfd>,
    poll: PollMode,
    batch: usize,
    expire_budget: usize,
    stats: Arc<WorkerStats>,
    loops: u64,
    sleeps: u64,
    /// Each UMEM's memory, in UMEM order.
    umem_memory: Vec<UmemMemory>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("ports", &self.ports)
            .field("sockets", &self.sockets())
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

// From include/uapi/linux/if_xdp.h; not in the libc crate.
const XDP_OPTIONS: libc::c_int = 8;
const XDP_OPTIONS_ZEROCOPY: u32 = 1;
/// Linux ≥ 6.17 (Debian's headers lack it): frames one copy-mode `sendto()` may transmit,
/// 32 (`TX_BATCH_SIZE`) up to the TX ring's size.
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;

/// Asks the kernel to let one copy-mode kick transmit `budget` frames; the budget in force
/// (32 where the kernel lacks the option or refuses the value).
fn set_tx_budget(fd: RawFd, budget: u32) -> u32 {
    if budget <= COPY_MODE_KICK_FRAMES {
        return COPY_MODE_KICK_FRAMES;
    }
    // SAFETY: `budget` is a valid u32 for reads and its size is passed as the length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            XDP_MAX_TX_SKB_BUDGET,
            (&budget as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        budget
    } else {
        COPY_MODE_KICK_FRAMES
    }
}

fn is_zero_copy(fd: RawFd) -> bool {
    let mut opts: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: `opts` and `len` are valid for writes and `len` holds the buffer size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_XDP,
            XDP_OPTIONS,
            (&mut opts as *mut u32).cast(),
            &mut len,
        )
    };
    rc == 0 && opts & XDP_OPTIONS_ZEROCOPY != 0
}

type Queues = (TxQueue, RxQueue, Option<(FillQueue, CompQueue)>);

fn new_umem(plan: &UmemPlan, hugetlb: bool) -> Result<(Umem, Vec<FrameDesc>)> {
    let config = UmemConfig::builder()
        .frame_size(FrameSize::new(plan.frame_size).map_err(|e| Error::with("UMEM frame size", e))?)
        .fill_queue_size(QueueSize::new(plan.ring_size).map_err(|e| Error::with("ring", e))?)
        .comp_queue_size(QueueSize::new(plan.ring_size).map_err(|e| Error::with("ring", e))?)
        .frame_headroom(0)
        .build()
        .map_err(|e| Error::with("UMEM config", e))?;
    let frames =
        std::num::NonZeroU32::new(plan.frames).ok_or_else(|| Error::msg("a UMEM needs frames"))?;
    Umem::new(config, frames, hugetlb)
        .map_err(|e| Error::with(format!("creating a UMEM of {} bytes", plan.bytes()), e))
}

/// The address range of `umem`'s memory (`plan`'s bytes), found from its first frame.
fn umem_range(umem: &Umem, frames: &[FrameDesc], plan: &UmemPlan) -> Option<(usize, usize)> {
    let first = frames.first()?;
    // SAFETY: `first` is a frame of `umem` (Umem::new just made it) that no one has written
    // or handed to the kernel yet; the data slice is only used for its address.
    let data = unsafe { umem.data(first) };
    let start = (data.contents().as_ptr() as usize).checked_sub(first.addr())?;
    Some((start, plan.bytes() as usize))
}

/// How long a bind attempt waits for the hugetlb pages of the previous attempt's UMEM: the
/// kernel releases a UMEM (and unpins its pages) from a work queue after the socket closes.
const POOL_RETURN_WAIT: Duration = Duration::from_millis(500);

/// Whether the hugetlb pool holds `bytes` now, or within `wait` (polled every 10 ms).
fn pool_holds(bytes: u64, wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if huge::hugetlb_free_bytes().unwrap_or(0) >= bytes {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A UMEM for `plan`. With `huge_pages`: from the hugetlb pool when it holds the UMEM
/// (rounded up to whole huge pages, if that stays within `budget`; waiting up to `pool_wait`
/// for pages still being released), else with normal pages advised for transparent huge
/// pages. What it came to is in the [`UmemMemory`].
fn create_umem(
    plan: &UmemPlan,
    huge_pages: bool,
    budget: Option<u64>,
    pool_wait: Duration,
) -> Result<(Umem, Vec<FrameDesc>, UmemMemory)> {
    if huge_pages {
        let rounded = umem::hugetlb_plan(plan, huge::HUGE_PAGE as u64, budget)
            .filter(|p| pool_holds(p.bytes(), pool_wait));
        if let Some(p) = rounded {
            // A pool that another process emptied meanwhile fails the mapping: normal pages.
            if let Ok((u, frames)) = new_umem(&p, true) {
                let huge = umem_range(&u, &frames, &p)
                    .and_then(|r| huge::backed(&[r]).ok())
                    .unwrap_or(0);
                let memory = UmemMemory {
                    backing: UmemBacking::Hugetlb,
                    bytes: p.bytes(),
                    huge,
                };
                return Ok((u, frames, memory));
            }
        }
    }
    let (u, frames) = new_umem(plan, false)?;
    let mut memory = UmemMemory {
        backing: UmemBacking::Pages,
        bytes: plan.bytes(),
        huge: 0,
    };
    if huge_pages {
        if let Some(range) = umem_range(&u, &frames, plan) {
            let (report, _) = huge::advise_all(&[range]);
            if report.huge > 0 {
                memory.backing = UmemBacking::Thp;
                memory.huge = report.huge;
            }
        }
    }
    Ok((u, frames, memory))
}

fn bind(umem: &Umem, ifname: &str, queue: u32, ring: u32, flags: BindFlags) -> Result<Queues> {
    let q = QueueSize::new(ring).map_err(|e| Error::with("ring", e))?;
    let config = SocketConfig::builder()
        .rx_queue_size(q)
        .tx_queue_size(q)
        // Our own program and XSKMAP: libxdp must not attach its default program.
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(flags)
        .build();
    let iface: Interface = ifname
        .parse()
        .map_err(|e| Error::with(format!("interface name {ifname:?}"), e))?;
    // SAFETY: INHIBIT_PROG_LOAD is set, which is what `Socket::new` requires when the
    // UMEM is shared and the (interface, queue) pair is already bound; we never bind a
    // pair twice anyway.
    unsafe { Socket::new(config, umem, &iface, queue) }
        .map_err(|e| Error::with(format!("AF_XDP socket on {ifname} queue {queue}"), e))
}

/// Binds the first socket of a fresh UMEM, trying zero-copy first in `Auto`. A failed
/// bind leaves libxdp state on the UMEM, so each attempt gets a fresh one.
fn bind_primary(
    plan: &UmemPlan,
    memory: (bool, Option<u64>),
    ifname: &str,
    queue: u32,
    mode: BindMode,
) -> Result<(Umem, Vec<FrameDesc>, UmemMemory, Queues)> {
    let attempts: &[BindFlags] = match mode {
        BindMode::Auto => &[BindFlags::XDP_ZEROCOPY, BindFlags::XDP_COPY],
        BindMode::Copy => &[BindFlags::XDP_COPY],
        BindMode::ZeroCopy => &[BindFlags::XDP_ZEROCOPY],
    };
    let mut last = None;
    let mut pool_wait = Duration::ZERO;
    for &flags in attempts {
        let (umem, frames, memory) = create_umem(plan, memory.0, memory.1, pool_wait)?;
        if memory.backing == UmemBacking::Hugetlb {
            // Dropped if this bind fails: the next attempt waits for its pages.
            pool_wait = POOL_RETURN_WAIT;
        }
        // need_wakeup lets a zero-copy driver skip syscalls; in copy mode it is harmless.
        match bind(
            &umem,
            ifname,
            queue,
            plan.ring_size,
            flags | BindFlags::XDP_USE_NEED_WAKEUP,
        ) {
            Ok(q) => return Ok((umem, frames, memory, q)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::msg("no bind attempted")))
}

impl Worker {
    /// Creates the worker's UMEM(s) and sockets on `cfg.interfaces` × `cfg.queues`,
    /// registers the sockets in `xdp`'s XSKMAP (the program must already be attached to
    /// every interface) and primes the fill rings. Call in the interfaces' namespace.
    pub fn open(cfg: &WorkerConfig, xdp: &XdpProgram) -> Result<Self> {
        if cfg.interfaces.is_empty() || cfg.queues.is_empty() {
            return Err(Error::msg(
                "a worker needs at least one interface and one queue",
            ));
        }
        if cfg.interfaces.len() > usize::from(PortId::MAX) {
            return Err(Error::msg("too many interfaces"));
        }
        if cfg.batch == 0 || cfg.batch > cfg.ring_size {
            return Err(Error::msg(format!(
                "batch {} must be in 1..=ring size {}",
                cfg.batch, cfg.ring_size
            )));
        }
        let mut nl = Netlink::open().map_err(|e| Error::with("netlink socket", e))?;
        let links = nl
            .links()
            .map_err(|e| Error::with("listing interfaces", e))?;
        let ports: Vec<PortInfo> = cfg
            .interfaces
            .iter()
            .map(|name| {
                links
                    .iter()
                    .find(|l| &l.name == name)
                    .map(|l| PortInfo {
                        name: name.clone(),
                        ifindex: l.ifindex,
                        mac: l.mac,
                    })
                    .ok_or_else(|| Error::msg(format!("no interface {name} in this namespace")))
            })
            .collect::<Result<_>>()?;
        for p in &ports {
            xdp.xsk_key(p.ifindex, *cfg.queues.iter().max().unwrap_or(&0))?;
        }

        let pairs: Vec<(PortId, u32)> = cfg
            .queues
            .iter()
            .flat_map(|&q| (0..ports.len()).map(move |p| (p as PortId, q)))
            .collect();
        let n_umems = match cfg.sharing {
            UmemSharing::PerWorker => 1,
            UmemSharing::PerSocket => pairs.len() as u64,
        };
        let budget = sys::memlock_budget()
            .map_err(|e| Error::with("reading RLIMIT_MEMLOCK", e))?
            .map(|b| b / u64::from(cfg.memlock_share.max(1)) / n_umems);
        let sockets_per_umem = match cfg.sharing {
            UmemSharing::PerWorker => pairs.len() as u32,
            UmemSharing::PerSocket => 1,
        };
        let shared_plan = umem::plan(
            sockets_per_umem,
            cfg.ring_size,
            cfg.frame_size,
            cfg.batch,
            budget,
        )
        .map_err(|e| Error::with("sizing the UMEM", e))?;
        let solo_plan = umem::plan(1, shared_plan.ring_size, cfg.frame_size, cfg.batch, budget)
            .map_err(|e| Error::with("sizing a UMEM", e))?;

        let memory = (cfg.huge_pages, budget);
        let mut umems: Vec<Umem> = Vec::new();
        let mut umem_memory: Vec<UmemMemory> = Vec::new();
        let mut free: Vec<Vec<FrameDesc>> = Vec::new();
        let mut socks: Vec<Sock> = Vec::new();
        for &(port, queue) in &pairs {
            let ifname = &ports[usize::from(port)].name;
            let (umem_idx, queues) = match (cfg.sharing, umems.first()) {
                (UmemSharing::PerWorker, Some(shared)) => {
                    // Joins the shared UMEM (libxdp binds with XDP_SHARED_UMEM and the
                    // kernel gives it the first socket's copy/zero-copy mode). If that
                    // mode does not suit this interface, fall back to a UMEM of its own.
                    match bind(
                        shared,
                        ifname,
                        queue,
                        shared_plan.ring_size,
                        BindFlags::empty(),
                    ) {
                        Ok(q) => (0, q),
                        Err(_) => {
                            let (u, frames, m, q) =
                                bind_primary(&solo_plan, memory, ifname, queue, cfg.bind)?;
                            umems.push(u);
                            umem_memory.push(m);
                            free.push(frames);
                            (umems.len() - 1, q)
                        }
                    }
                }
                _ => {
                    let plan = if cfg.sharing == UmemSharing::PerWorker {
                        &shared_plan
                    } else {
                        &solo_plan
                    };
                    let (u, frames, m, q) = bind_primary(plan, memory, ifname, queue, cfg.bind)?;
                    umems.push(u);
                    umem_memory.push(m);
                    free.push(frames);
                    (umems.len() - 1, q)
                }
            };
            let (tx, rx, fq_cq) = queues;
            let (fq, cq) = fq_cq.ok_or_else(|| {
                Error::msg(format!(
                    "{ifname} queue {queue}: libxdp returned no fill/completion rings"
                ))
            })?;
            let fd = rx.fd().as_raw_fd();
            let ring_size = if umem_idx == 0 && cfg.sharing == UmemSharing::PerWorker {
                shared_plan.ring_size
            } else {
                solo_plan.ring_size
            };
            let zero_copy = is_zero_copy(fd);
            let tx_budget = if zero_copy {
                COPY_MODE_KICK_FRAMES
            } else {
                let want = match cfg.copy_tx_budget {
                    0 => ring_size,
                    b => b.min(ring_size),
                };
                set_tx_budget(fd, want)
            };
            socks.push(Sock {
                port,
                queue,
                umem: umem_idx,
                ring_size,
                zero_copy,
                tx_budget,
                fd,
                rx,
                tx,
                fq,
                cq,
                pending: Vec::with_capacity(ring_size as usize),
            });
        }

        let nports = ports.len();
        let mut tx_route = Vec::with_capacity(socks.len() * nports);
        for s in &socks {
            for p in 0..nports {
                let same_queue = socks
                    .iter()
                    .position(|t| usize::from(t.port) == p && t.queue == s.queue);
                let any = socks.iter().position(|t| usize::from(t.port) == p);
                tx_route.push(same_queue.or(any).unwrap_or(0));
            }
        }
        let emit_sock = (0..nports)
            .map(|p| {
                socks
                    .iter()
                    .position(|t| usize::from(t.port) == p)
                    .unwrap_or(0)
            })
            .collect();
        let pollfds = socks
            .iter()
            .map(|s| libc::pollfd {
                fd: s.fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let max_ring = socks.iter().map(|s| s.ring_size).max().unwrap_or(64) as usize;
        let mut worker = Worker {
            io: Io {
                umems,
                free,
                socks,
                nports,
                tx_route,
                emit_sock,
                counters: vec![PortStats::default(); nports],
                rx_scratch: vec![FrameDesc::default(); cfg.batch as usize],
                cq_scratch: vec![FrameDesc::default(); max_ring],
            },
            ports,
            pollfds,
            poll: cfg.poll,
            batch: cfg.batch as usize,
            expire_budget: cfg.expire_budget,
            stats: Arc::new(WorkerStats::new(nports)),
            loops: 0,
            sleeps: 0,
            umem_memory,
        };
        // Frames in the fill rings before the sockets are in the XSKMAP: the first
        // redirected packet already has somewhere to land.
        for s in 0..worker.io.socks.len() {
            worker.io.refill(s);
        }
        for s in &worker.io.socks {
            let p = &worker.ports[usize::from(s.port)];
            // SAFETY: `s.fd` is the socket's fd, kept open by `s.rx`/`s.tx` which live
            // as long as `worker`; the borrow ends with this call.
            let fd = unsafe { BorrowedFd::borrow_raw(s.fd) };
            xdp.register_xsk(p.ifindex, s.queue, fd)?;
        }
        Ok(worker)
    }

    /// The worker's interfaces, in [`PortId`] order.
    pub fn ports(&self) -> &[PortInfo] {
        &self.ports
    }

    pub fn sockets(&self) -> Vec<SocketInfo> {
        self.io
            .socks
            .iter()
            .map(|s| SocketInfo {
                port: s.port,
                queue: s.queue,
                zero_copy: s.zero_copy,
                umem: s.umem,
                ring_size: s.ring_size,
                tx_budget: s.tx_budget,
            })
            .collect()
    }

    /// Each UMEM's memory (size, backing, bytes on huge pages), in UMEM order.
    pub fn umem_memory(&self) -> &[UmemMemory] {
        &self.umem_memory
    }

    /// Counters, readable from any thread while the worker runs.
    pub fn stats(&self) -> Arc<WorkerStats> {
        Arc::clone(&self.stats)
    }

    /// The kernel's drop counters of every socket, in [`Worker::sockets`] order.
    pub fn kernel_stats(&self) -> Vec<io::Result<SocketKernelStats>> {
        self.io
            .socks
            .iter()
            .map(|s| {
                s.rx.fd().xdp_statistics().map(|x| SocketKernelStats {
                    rx_dropped: x.rx_dropped(),
                    rx_invalid_descs: x.rx_invalid_descs(),
                    tx_invalid_descs: x.tx_invalid_descs(),
                    rx_ring_full: x.rx_ring_full(),
                    rx_fill_ring_empty_descs: x.rx_fill_ring_empty_descs(),
                    tx_ring_empty_descs: x.tx_ring_empty_descs(),
                })
            })
            .collect()
    }

    /// Runs the loop until `stop` is set. Returns early only on an error that leaves the
    /// sockets unusable (a failing `ppoll`).
    pub fn run<H: FrameHandler + ?Sized>(
        &mut self,
        handler: &mut H,
        stop: &AtomicBool,
    ) -> Result<()> {
        let result = self.run_inner(handler, stop);
        self.stats
            .publish(&self.io.counters, self.loops, self.sleeps);
        result
    }

    fn run_inner<H: FrameHandler + ?Sized>(&mut self, h: &mut H, stop: &AtomicBool) -> Result<()> {
        let nsocks = self.io.socks.len();
        while !stop.load(Ordering::Relaxed) {
            self.loops += 1;
            let now = sys::monotonic_ns();
            h.poll_control(now);

            let mut received = 0;
            for s in 0..nsocks {
                let n = self.io.rx_batch(s, self.batch, now, h);
                if n > 0 {
                    received += n;
                    // Transmit right after each batch: keeps `pending` within one batch
                    // and the TX ring fed while other sockets are read.
                    self.io.flush_all();
                }
            }

            for s in 0..nsocks {
                self.io.reap(s);
            }

            let mut more_timers = false;
            let mut expired = false;
            if h.next_deadline().is_some_and(|d| d <= now) {
                let io = &mut self.io;
                let done = h.expire(now, self.expire_budget, &mut |port, bytes| {
                    io.emit(port, bytes)
                });
                more_timers = done >= self.expire_budget;
                expired = true;
                self.io.flush_all();
            }

            for s in 0..nsocks {
                self.io.refill(s);
            }
            if received > 0 || expired {
                h.end_of_iteration(now);
            }

            if received > 0 || self.loops % 1024 == 0 {
                self.stats
                    .publish(&self.io.counters, self.loops, self.sleeps);
            }

            if let PollMode::Wakeup { timeout } = self.poll {
                if received == 0 && !more_timers {
                    let mut wait = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
                    if let Some(d) = h.next_deadline() {
                        let until = d.saturating_sub(sys::monotonic_ns());
                        // A deadline still in the past right after `expire` had budget
                        // left is one the handler cannot act on yet (a timer wheel
                        // rounding to its tick): without a floor the worker would spin.
                        let until = if expired {
                            until.max(STALE_DEADLINE_FLOOR_NS)
                        } else {
                            until
                        };
                        wait = wait.min(until);
                    }
                    if self.io.tx_backlog() {
                        // copy-mode frames left in a TX ring: come back soon to kick again
                        wait = wait.min(TX_BACKLOG_WAIT_NS);
                    }
                    if wait > 0 {
                        self.sleeps += 1;
                        sleep_poll(&mut self.pollfds, wait)
                            .map_err(|e| Error::with("ppoll on AF_XDP sockets", e))?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn sleep_poll(fds: &mut [libc::pollfd], ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `fds` is a valid, writable slice of pollfd of the length passed; `ts` lives
    // across the call; a null sigmask keeps the thread's mask.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Shortest sleep when the handler's deadline is overdue but `expire` had nothing to do.
const STALE_DEADLINE_FLOOR_NS: u64 = 1_000_000;
/// Longest sleep while copy-mode frames wait in a TX ring.
const TX_BACKLOG_WAIT_NS: u64 = 100_000;

/// Most frames one copy-mode `sendto()` transmits (the kernel's TX_BATCH_SIZE).
const COPY_MODE_KICK_FRAMES: u32 = 32;

impl Io {
    /// Receives up to `batch` frames on socket `s`, hands each to the handler and queues
    /// the transmitted ones. Returns the number received.
    fn rx_batch<H: FrameHandler + ?Sized>(
        &mut self,
        s: usize,
        batch: usize,
        now: u64,
        h: &mut H,
    ) -> usize {
        let Io {
            umems,
            free,
            socks,
            nports,
            tx_route,
            counters,
            rx_scratch,
            ..
        } = self;
        let nports = *nports;
        let descs = &mut rx_scratch[..batch];
        // SAFETY: the RX ring only carries frames of this socket's UMEM, and `descs` are
        // scratch descriptors the call overwrites.
        let n = unsafe { socks[s].rx.consume(descs) };
        let port = socks[s].port;
        let su = socks[s].umem;
        let umem = &umems[su];
        if n > 0 {
            for stage in 0..h.prefetch_stages() {
                for desc in &descs[..n] {
                    // SAFETY: consumed from the RX ring just above: the kernel is done with
                    // the frame and nothing else refers to it; read only, before `handle`.
                    let data = unsafe { umem.data(desc) };
                    h.prefetch(stage, port, data.contents());
                }
            }
        }
        for desc in &mut descs[..n] {
            let rx_len = desc.lengths().data();
            let c = &mut counters[usize::from(port)];
            c.rx_packets += 1;
            c.rx_bytes += rx_len as u64;
            let (verdict, room) = {
                // SAFETY: the frame was just consumed from the RX ring: the kernel is done
                // with it and nothing else refers to it until we hand it back.
                let mut data = unsafe { umem.data_mut(desc) };
                // The handler sees the whole UMEM frame and may grow the packet into it.
                let mut cur = data.cursor();
                let room = cur.buf_len();
                cur.set_pos(room);
                (h.handle_in(now, port, data.contents_mut(), rx_len), room)
            };
            let (out, len) = match verdict {
                Verdict::Drop => {
                    c.dropped += 1;
                    free[su].push(*desc);
                    continue;
                }
                Verdict::Tx { port: out, len }
                    if usize::from(out) < nports && usize::from(len) <= room && len > 0 =>
                {
                    (usize::from(out), usize::from(len))
                }
                Verdict::Tx { .. } => {
                    c.bad_verdict += 1;
                    free[su].push(*desc);
                    continue;
                }
            };
            // SAFETY: still our exclusive frame (see above); from here on its descriptor
            // says the length to send, which the copy below reads too.
            unsafe { umem.data_mut(desc) }.cursor().set_pos(len);
            let t = tx_route[s * nports + out];
            let tu = socks[t].umem;
            if socks[t].pending.len() >= socks[t].ring_size as usize {
                counters[out].tx_ring_full += 1;
                free[su].push(*desc);
                continue;
            }
            if tu == su {
                socks[t].pending.push(*desc);
                continue;
            }
            // Different UMEMs: copy into a frame of the egress socket's UMEM.
            match free[tu].pop() {
                Some(mut copy) => {
                    // SAFETY: `desc` is our exclusive frame of UMEM `su`.
                    let src = unsafe { umems[su].data(desc) };
                    // SAFETY: `copy` came off UMEM `tu`'s free list: in no ring, no other
                    // reference. `tu != su`, so it cannot alias `src`.
                    let mut dst = unsafe { umems[tu].data_mut(&mut copy) };
                    let mut cur = dst.cursor();
                    cur.set_pos(len);
                    if cur.pos() == len {
                        dst.contents_mut().copy_from_slice(&src.contents()[..len]);
                        socks[t].pending.push(copy);
                    } else {
                        counters[out].no_frame += 1;
                        free[tu].push(copy);
                    }
                }
                None => counters[out].no_frame += 1,
            }
            free[su].push(*desc);
        }
        n
    }

    /// Queues a frame built by the handler's timers on `port`.
    fn emit(&mut self, port: PortId, bytes: &[u8]) {
        let p = usize::from(port);
        if p >= self.nports {
            if let Some(c) = self.counters.first_mut() {
                c.bad_verdict += 1;
            }
            return;
        }
        let t = self.emit_sock[p];
        let sock = &mut self.socks[t];
        let c = &mut self.counters[p];
        if sock.pending.len() >= sock.ring_size as usize {
            c.tx_ring_full += 1;
            return;
        }
        let Some(mut desc) = self.free[sock.umem].pop() else {
            c.no_frame += 1;
            return;
        };
        // SAFETY: the frame came off the free list: in no ring, no other reference.
        let mut data = unsafe { self.umems[sock.umem].data_mut(&mut desc) };
        let mut cur = data.cursor();
        cur.set_pos(bytes.len());
        if cur.pos() != bytes.len() || bytes.is_empty() {
            c.bad_verdict += 1;
            self.free[sock.umem].push(desc);
            return;
        }
        data.contents_mut().copy_from_slice(bytes);
        c.emitted += 1;
        sock.pending.push(desc);
    }

    fn flush_all(&mut self) {
        for t in 0..self.socks.len() {
            self.flush(t);
        }
    }

    /// Puts socket `t`'s pending frames on its TX ring and makes the kernel send them.
    fn flush(&mut self, t: usize) {
        let sock = &mut self.socks[t];
        let c = &mut self.counters[usize::from(sock.port)];
        let want = sock.pending.len();
        if want > 0 {
            // `produce` is all-or-nothing: ask only for what fits.
            let room = sock.tx.nb_free(want as u32) as usize;
            let n = want.min(room);
            let done = if n > 0 {
                // SAFETY: every pending descriptor is a frame of this socket's UMEM that
                // no ring holds and nothing else references.
                unsafe { sock.tx.produce(&sock.pending[..n]) }
            } else {
                0
            };
            for d in &sock.pending[..done] {
                c.tx_packets += 1;
                c.tx_bytes += d.lengths().data() as u64;
            }
            for d in &sock.pending[done..] {
                c.tx_ring_full += 1;
                self.free[sock.umem].push(*d);
            }
            sock.pending.clear();
        }
        if sock.zero_copy {
            // The driver transmits asynchronously; it only needs a nudge when it asks.
            if sock.tx.needs_wakeup() {
                c.kicks += 1;
                if sock.tx.wakeup().is_err() {
                    c.kick_errors += 1;
                }
            }
            return;
        }
        self.kick_copy_mode(t);
    }

    /// Copy mode transmits inside `sendto()`, at most `tx_budget` frames per call (32 unless
    /// the kernel took `XDP_MAX_TX_SKB_BUDGET`): kick until the ring is drained, reaping completions when the kernel stalls on a full completion
    /// ring, and give up after a few kicks without progress (device queue full) so that
    /// receiving is not starved; the rest goes out on the next iteration.
    fn kick_copy_mode(&mut self, t: usize) {
        let ring = self.socks[t].ring_size;
        let mut outstanding = ring - self.socks[t].tx.nb_free_exact();
        if outstanding == 0 {
            return;
        }
        let max_kicks = outstanding / self.socks[t].tx_budget.max(1) + 4;
        let mut stalls = 0;
        for _ in 0..max_kicks {
            let sock = &mut self.socks[t];
            let c = &mut self.counters[usize::from(sock.port)];
            c.kicks += 1;
            if sock.tx.wakeup().is_err() {
                c.kick_errors += 1;
            }
            let left = ring - sock.tx.nb_free_exact();
            if left == 0 {
                return;
            }
            if left >= outstanding {
                stalls += 1;
                if stalls > 2 {
                    return;
                }
                self.reap(t);
            }
            outstanding = left;
        }
    }

    /// Whether a copy-mode socket still has frames in its TX ring (the kick loop gave up
    /// on a busy device).
    fn tx_backlog(&mut self) -> bool {
        self.socks
            .iter_mut()
            .any(|s| !s.zero_copy && s.tx.nb_free_exact() < s.ring_size)
    }

    /// Returns completed TX frames of socket `s` to its UMEM's free list.
    fn reap(&mut self, s: usize) {
        let sock = &mut self.socks[s];
        loop {
            // SAFETY: the completion ring only carries frames of this socket's UMEM that
            // we submitted for TX; `cq_scratch` are scratch descriptors it overwrites.
            let n = unsafe { sock.cq.consume(&mut self.cq_scratch) };
            if n == 0 {
                return;
            }
            self.free[sock.umem].extend_from_slice(&self.cq_scratch[..n]);
        }
    }

    /// Tops up socket `s`'s fill ring from its UMEM's free list.
    fn refill(&mut self, s: usize) {
        let sock = &mut self.socks[s];
        let free = &mut self.free[sock.umem];
        let want = free.len().min(sock.ring_size as usize);
        if want > 0 {
            let room = (sock.fq.nb_free(want as u32) as usize).min(want);
            if room > 0 {
                let start = free.len() - room;
                // SAFETY: frames on the free list belong to this socket's UMEM and are in
                // no ring; after `produce` they are the kernel's until RX returns them.
                let done = unsafe { sock.fq.produce(&free[start..]) };
                if done == room {
                    free.truncate(start);
                }
            }
        }
        if sock.zero_copy && sock.fq.needs_wakeup() {
            kick_rx(sock.fd);
        }
    }
}

/// Tells a zero-copy driver that the fill ring has frames again.
fn kick_rx(fd: RawFd) {
    // SAFETY: a zero-length recvfrom with null buffers is the documented AF_XDP RX wakeup.
    let _ = unsafe {
        libc::recvfrom(
            fd,
            std::ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
}

/// What a worker thread hands back when it ends.
#[derive(Debug)]
pub struct WorkerExit<H> {
    pub worker: Worker,
    pub handler: H,
    pub result: Result<()>,
}

/// Runs `worker` with `handler` on a new thread named `xlb-worker-<id>`, pinned to
/// `core` if given, until `stop` is set.
pub fn spawn<H>(
    id: usize,
    mut worker: Worker,
    mut handler: H,
    stop: Arc<AtomicBool>,
    core: Option<usize>,
) -> io::Result<JoinHandle<WorkerExit<H>>>
where
    H: FrameHandler + Send + 'static,
{
    std::thread::Builder::new()
        .name(format!("xlb-worker-{id}"))
        .spawn(move || {
            if let Some(core) = core {
                let ok = core_affinity::set_for_current(core_affinity::CoreId { id: core });
                worker.stats.pinned.store(ok, Ordering::Relaxed);
            }
            let result = worker.run(&mut handler, &stop);
            WorkerExit {
                worker,
                handler,
                result,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UMEM asked for huge pages gets them from the hugetlb pool when it has room, else
    /// says it runs on other pages, and in any case works as a UMEM of the planned size.
    #[test]
    fn a_umem_with_huge_pages_says_what_backs_it() {
        if !sys::is_root() {
            println!("skipped: creating a UMEM needs root (an AF_XDP socket)");
            return;
        }
        // 8.5 MiB: whole huge pages inside, for THP.
        let plan = umem::plan(2, 1024, 2048, 64, None).unwrap();
        let pool = huge::hugetlb_free_bytes().unwrap();
        let (_u, frames, memory) = create_umem(&plan, true, None, Duration::ZERO).unwrap();
        println!(
            "UMEM of {} bytes: {memory:?} (hugetlb pool: {pool} bytes free, THP {})",
            plan.bytes(),
            huge::Thp::host()
        );
        assert!(memory.bytes >= plan.bytes());
        assert_eq!(frames.len() as u64 * 2048, memory.bytes);
        let rounded = umem::hugetlb_plan(&plan, huge::HUGE_PAGE as u64, None).unwrap();
        if pool >= rounded.bytes() {
            assert_eq!(memory.backing, UmemBacking::Hugetlb);
            assert_eq!(memory.huge, memory.bytes);
        } else {
            assert_ne!(memory.backing, UmemBacking::Hugetlb);
        }
        if memory.backing == UmemBacking::Pages {
            assert_eq!(memory.huge, 0);
        }
        let (_u, _, plain) = create_umem(&plan, false, None, Duration::ZERO).unwrap();
        assert_eq!(
            plain,
            UmemMemory {
                backing: UmemBacking::Pages,
                bytes: plan.bytes(),
                huge: 0
            }
        );
    }

    #[test]
    fn port_stats_round_trip_and_add() {
        let a = PortStats {
            rx_packets: 1,
            rx_bytes: 2,
            tx_packets: 3,
            tx_bytes: 4,
            dropped: 5,
            tx_ring_full: 6,
            no_frame: 7,
            bad_verdict: 8,
            emitted: 9,
            kicks: 10,
            kick_errors: 11,
        };
        assert_eq!(PortStats::from_array(a.to_array()), a);
        let s = a + a;
        assert_eq!(s.kick_errors, 22);
        assert_eq!(s.rx_packets, 2);
    }

    #[test]
    fn stats_publish_and_read() {
        let st = WorkerStats::new(2);
        let local = vec![
            PortStats {
                rx_packets: 5,
                ..Default::default()
            },
            PortStats {
                tx_packets: 7,
                ..Default::default()
            },
        ];
        st.publish(&local, 3, 1);
        assert_eq!(st.ports(), local);
        assert_eq!((st.loops(), st.sleeps()), (3, 1));
    }
}
