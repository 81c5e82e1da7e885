//! Flow-state sync between cluster nodes (docs/cluster.md, "Flow-state sync").
//!
//! Every worker hands the states of its flows — at creation, at TCP state changes, and a
//! bounded refresh pass of the flows active since the previous pass — to one bounded channel
//! ([`WorkerSync::pass`], in the worker's control poll, never on the packet path; a full
//! channel loses the record, counted). The sender thread batches them into datagrams
//! ([`super::sync_wire`]) sent to every peer's sync port, under a byte-rate cap. The receiver
//! thread takes datagrams from configured peers' addresses only (optionally authenticated),
//! and hands each record to the worker that steering gives the flow, through that worker's
//! bounded inbox; the worker imports it as a *standby* flow
//! ([`xlb_engine::Engine::import_standby`]). The lag — from the packet that created or
//! changed a flow on one node to its import on another — is measured on the wall clocks of
//! both (the nodes' clocks must agree: NTP or PTP).
//!
//! From the records of a peer's outbound flows the receiver also learns that peer's SNAT
//! addresses: when the peer is lost, one survivor announces them (see
//! [`super::Cluster::tick`]) so that the answers of its outbound connections reach the
//! standby copies.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TrySendError};
use xlb_engine::{flow::Nat, hashkey::HashKey, Engine, Imported, SyncReason};

use super::sync_wire::{self, Encoder, Record, SyncKey};

/// Records waiting for the sender thread (from every worker).
pub const OUT_QUEUE: usize = 16_384;
/// Records waiting for one worker's import.
pub const INBOX: usize = 8_192;
/// Flow ids a worker's engine notes between two passes.
pub const NOTE_RING: usize = 8_192;
/// Records a worker exports, and imports, per pass.
const EXPORT_BUDGET: usize = 512;
const IMPORT_BUDGET: usize = 512;
/// A partly filled datagram waits at most this long for more records.
const FLUSH_AFTER: Duration = Duration::from_millis(1);
/// How often an idle worker passes (the handler's next deadline while the sync is on).
pub const PASS_EVERY_NS: u64 = 1_000_000;

/// `--cluster-sync-*`.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The UDP port of the sync on this node's `--cluster-listen` address and on every peer's.
    pub port: u16,
    /// Bytes per second the sender may send, all peers together.
    pub rate: u64,
    /// How long a refresh pass over a worker's flow table takes.
    pub refresh: Duration,
    pub key: Option<SyncKey>,
}

/// The sync's counters (all nodes' workers and both threads add to them).
#[derive(Debug, Default)]
pub struct SyncStats {
    pub records_sent: AtomicU64,
    pub datagrams_sent: AtomicU64,
    pub records_received: AtomicU64,
    pub datagrams_received: AtomicU64,
    /// Imported as new standby flows.
    pub records_imported: AtomicU64,
    /// Standby flows refreshed by a newer state.
    pub records_refreshed: AtomicU64,
    /// Records for flows live here (what this node saw is kept) or older than the copy.
    pub records_kept: AtomicU64,
    /// Records the engine refused (no such rule here, table full, next hop not known yet).
    pub records_refused: AtomicU64,
    /// Records lost before they left: a worker's note ring or the sender's queue was full.
    pub records_dropped_send: AtomicU64,
    /// Records lost after they arrived: a worker's inbox was full.
    pub records_dropped_receive: AtomicU64,
    /// Datagrams that did not decode or authenticate, or came from no configured peer.
    pub datagrams_malformed: AtomicU64,
    pub datagrams_strangers: AtomicU64,
    /// Datagrams missing in a peer's sequence (lost on the way).
    pub datagrams_lost: AtomicU64,
    /// Waits of the sender for the rate cap.
    pub rate_limited: AtomicU64,
    /// The lag of created or changed flows, sender's packet to receiver's import.
    pub lag_count: AtomicU64,
    pub lag_sum_ns: AtomicU64,
    pub lag_max_ns: AtomicU64,
}

impl SyncStats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    fn lag(&self, ns: u64) {
        Self::add(&self.lag_count, 1);
        Self::add(&self.lag_sum_ns, ns);
        self.lag_max_ns.fetch_max(ns, Relaxed);
    }

    /// A copy for the status, the stats file and Prometheus.
    pub fn snapshot(&self) -> SyncSnapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        SyncSnapshot {
            records_sent: g(&self.records_sent),
            datagrams_sent: g(&self.datagrams_sent),
            records_received: g(&self.records_received),
            datagrams_received: g(&self.datagrams_received),
            records_imported: g(&self.records_imported),
            records_refreshed: g(&self.records_refreshed),
            records_kept: g(&self.records_kept),
            records_refused: g(&self.records_refused),
            records_dropped_send: g(&self.records_dropped_send),
            records_dropped_receive: g(&self.records_dropped_receive),
            datagrams_malformed: g(&self.datagrams_malformed),
            datagrams_strangers: g(&self.datagrams_strangers),
            datagrams_lost: g(&self.datagrams_lost),
            rate_limited: g(&self.rate_limited),
            lag_count: g(&self.lag_count),
            lag_sum_ns: g(&self.lag_sum_ns),
            lag_max_ns: g(&self.lag_max_ns),
        }
    }
}

/// [`SyncStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncSnapshot {
    pub records_sent: u64,
    pub datagrams_sent: u64,
    pub records_received: u64,
    pub datagrams_received: u64,
    pub records_imported: u64,
    pub records_refreshed: u64,
    pub records_kept: u64,
    pub records_refused: u64,
    pub records_dropped_send: u64,
    pub records_dropped_receive: u64,
    pub datagrams_malformed: u64,
    pub datagrams_strangers: u64,
    pub datagrams_lost: u64,
    pub rate_limited: u64,
    pub lag_count: u64,
    pub lag_sum_ns: u64,
    pub lag_max_ns: u64,
}

impl SyncSnapshot {
    /// Every counter by its name (the stats file's keys; Prometheus adds its prefix).
    pub fn fields(&self) -> [(&'static str, u64); 17] {
        [
            ("records_sent", self.records_sent),
            ("datagrams_sent", self.datagrams_sent),
            ("records_received", self.records_received),
            ("datagrams_received", self.datagrams_received),
            ("records_imported", self.records_imported),
            ("records_refreshed", self.records_refreshed),
            ("records_kept", self.records_kept),
            ("records_refused", self.records_refused),
            ("records_dropped_send", self.records_dropped_send),
            ("records_dropped_receive", self.records_dropped_receive),
            ("datagrams_malformed", self.datagrams_malformed),
            ("datagrams_strangers", self.datagrams_strangers),
            ("datagrams_lost", self.datagrams_lost),
            ("rate_limited", self.rate_limited),
            ("lag_count", self.lag_count),
            ("lag_sum_ns", self.lag_sum_ns),
            ("lag_max_ns", self.lag_max_ns),
        ]
    }

    /// The mean lag, in ms (0 before the first measurement).
    pub fn lag_mean_ms(&self) -> f64 {
        if self.lag_count == 0 {
            0.0
        } else {
            self.lag_sum_ns as f64 / self.lag_count as f64 / 1e6
        }
    }
}

/// What the sync learned of each peer (by address): the SNAT addresses of its outbound flows.
pub type LearnedSnat = Arc<Mutex<BTreeMap<IpAddr, BTreeSet<IpAddr>>>>;

/// The running sync: its threads, counters and what it learned.
#[derive(Debug)]
pub struct FlowSync {
    pub stats: Arc<SyncStats>,
    pub learned_snat: LearnedSnat,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Nanoseconds since the Unix epoch on this node's wall clock.
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl FlowSync {
    /// Binds the sync port on `listen`'s address and starts both threads; returns the
    /// workers' ends in worker order. `steer_key` and `workers` are the data path's: a record
    /// goes to the worker the flow's frames are steered to.
    pub fn start(
        opts: &SyncOptions,
        listen: IpAddr,
        peers: &[SocketAddr],
        steer_key: HashKey,
        workers: usize,
    ) -> std::io::Result<(FlowSync, Vec<WorkerSync>)> {
        let socket = UdpSocket::bind(SocketAddr::new(listen, opts.port))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let send_socket = socket.try_clone()?;
        let stats = Arc::new(SyncStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let learned_snat: LearnedSnat = Arc::default();
        let (out_tx, out_rx) = channel::bounded(OUT_QUEUE);
        let (inbox_tx, ends): (Vec<_>, Vec<_>) = (0..workers.max(1))
            .map(|_| {
                let (tx, rx) = channel::bounded(INBOX);
                (
                    tx,
                    WorkerSync {
                        out: out_tx.clone(),
                        inbox: rx,
                        stats: Arc::clone(&stats),
                        refresh_ns: u64::try_from(opts.refresh.as_nanos())
                            .unwrap_or(u64::MAX)
                            .max(1),
                        last_pass_ns: 0,
                        scan_carry: 0,
                        lost_seen: 0,
                        enabled: false,
                    },
                )
            })
            .unzip();
        let targets: Vec<SocketAddr> = peers
            .iter()
            .map(|p| SocketAddr::new(p.ip(), opts.port))
            .collect();
        let sender = Sender_ {
            socket: send_socket,
            targets,
            rx: out_rx,
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            encoder: Encoder::new(opts.key.clone()),
            bucket: Bucket::new(opts.rate),
            seq: 0,
        };
        let receiver = Receiver_ {
            socket,
            peers: peers.iter().map(|p| p.ip()).collect(),
            key: opts.key.clone(),
            inboxes: inbox_tx,
            steer_key,
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            learned_snat: Arc::clone(&learned_snat),
            last_seq: BTreeMap::new(),
        };
        let threads = vec![
            std::thread::Builder::new()
                .name("xlb-sync-send".into())
                .spawn(move || sender.run())?,
            std::thread::Builder::new()
                .name("xlb-sync-recv".into())
                .spawn(move || receiver.run())?,
        ];
        Ok((
            FlowSync {
                stats,
                learned_snat,
                stop,
                threads,
            },
            ends,
        ))
    }

    /// The SNAT addresses learned from the peer at `peer`.
    pub fn snat_of(&self, peer: IpAddr) -> Vec<IpAddr> {
        (self
            .learned_snat
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
        .get(&peer)
        .map(|s| s.iter().copied().collect())
        .unwrap_or_default()
    }

    pub fn stop(mut self) {
        self.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A worker's end of the sync.
#[derive(Debug)]
pub struct WorkerSync {
    out: Sender<Record>,
    inbox: Receiver<Record>,
    stats: Arc<SyncStats>,
    refresh_ns: u64,
    last_pass_ns: u64,
    /// Slots owed to the refresh pass (a fraction of a slot carried between passes, ×2³²).
    scan_carry: u64,
    lost_seen: u64,
    enabled: bool,
}

impl WorkerSync {
    /// When the worker should pass again.
    pub fn next_pass_ns(&self) -> u64 {
        self.last_pass_ns.saturating_add(PASS_EVERY_NS)
    }

    /// Imports what arrived for this worker and exports what changed (both bounded).
    pub fn pass(&mut self, engine: &mut Engine, now_ns: u64) {
        if !self.enabled {
            engine.enable_sync(NOTE_RING);
            self.enabled = true;
            self.last_pass_ns = now_ns;
        }
        let wall = wall_ns();
        for _ in 0..IMPORT_BUDGET {
            let Ok(mut r) = self.inbox.try_recv() else {
                break;
            };
            r.state.idle = wall.saturating_sub(r.last_seen_ns);
            let s = &self.stats;
            match engine.import_standby(now_ns, &r.state) {
                Ok(got) => {
                    match got {
                        Imported::Created(_) => SyncStats::add(&s.records_imported, 1),
                        Imported::Refreshed(_) => SyncStats::add(&s.records_refreshed, 1),
                        Imported::AlreadyHere(_) => SyncStats::add(&s.records_kept, 1),
                    }
                    if r.reason == SyncReason::Noted && !matches!(got, Imported::AlreadyHere(_)) {
                        s.lag(r.state.idle);
                    }
                }
                Err(_) => SyncStats::add(&s.records_refused, 1),
            }
        }
        // The refresh pass covers the table once per `refresh`.
        let elapsed = now_ns.saturating_sub(self.last_pass_ns);
        self.last_pass_ns = now_ns;
        let owed = (u128::from(engine.flow_capacity()) * u128::from(elapsed)) << 32;
        let owed = (owed / u128::from(self.refresh_ns)) as u64;
        let total = self.scan_carry.saturating_add(owed);
        let scan = (total >> 32).min(u64::from(engine.flow_capacity())) as u32;
        self.scan_carry = total & 0xffff_ffff;
        let (out, stats) = (&self.out, &self.stats);
        engine.sync_export(now_ns, EXPORT_BUDGET, scan, |reason, state| {
            let r = Record {
                reason,
                last_seen_ns: wall.saturating_sub(state.idle),
                state,
            };
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = out.try_send(r) {
                SyncStats::add(&stats.records_dropped_send, 1);
            }
        });
        let lost = engine.sync_lost();
        SyncStats::add(&self.stats.records_dropped_send, lost - self.lost_seen);
        self.lost_seen = lost;
    }
}

/// A token bucket of bytes: `rate` a second, a burst of a tenth of a second (at least one
/// datagram per peer).
#[derive(Debug)]
struct Bucket {
    rate: u64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate: rate.max(1),
            tokens: 0.0,
            at: Instant::now(),
        }
    }

    fn burst(&self) -> f64 {
        (self.rate as f64 / 10.0).max(16.0 * sync_wire::MAX_DATAGRAM as f64)
    }

    /// How long to wait before `bytes` may go (zero: take them now).
    fn take(&mut self, bytes: usize, now: Instant) -> Duration {
        let dt = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst());
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((bytes as f64 - self.tokens) / self.rate as f64)
        }
    }
}

// The threads' state (named apart from crossbeam's `Sender` / `Receiver`).
struct Sender_ {
    socket: UdpSocket,
    targets: Vec<SocketAddr>,
    rx: Receiver<Record>,
    stats: Arc<SyncStats>,
    stop: Arc<AtomicBool>,
    encoder: Encoder,
    bucket: Bucket,
    seq: u64,
}

impl Sender_ {
    fn run(mut self) {
        while !self.stop.load(Relaxed) {
            let first = match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            self.add(first);
            let deadline = Instant::now() + FLUSH_AFTER;
            while let Ok(r) = self.rx.recv_deadline(deadline) {
                self.add(r);
            }
            self.flush();
        }
    }

    fn add(&mut self, r: Record) {
        if self.encoder.push(&r) {
            return;
        }
        self.flush();
        if !self.encoder.push(&r) {
            // Cannot be synced (its rule name is too long).
            SyncStats::add(&self.stats.records_dropped_send, 1);
        }
    }

    fn flush(&mut self) {
        if self.encoder.is_empty() {
            return;
        }
        let records = self.encoder.len() as u64;
        self.seq += 1;
        let d = self.encoder.finish(self.seq, wall_ns());
        let wait = self
            .bucket
            .take(d.len() * self.targets.len(), Instant::now());
        if !wait.is_zero() {
            SyncStats::add(&self.stats.rate_limited, 1);
            std::thread::sleep(wait);
            self.bucket.take(0, Instant::now());
            self.bucket.tokens = 0.0;
        }
        for t in &self.targets {
            // A peer that is down drops it: the refresh pass sends its flows again later.
            if self.socket.send_to(&d, t).is_ok() {
                SyncStats::add(&self.stats.datagrams_sent, 1);
                SyncStats::add(&self.stats.records_sent, records);
            }
        }
    }
}

struct Receiver_ {
    socket: UdpSocket,
    peers: Vec<IpAddr>,
    key: Option<SyncKey>,
    inboxes: Vec<Sender<Record>>,
    steer_key: HashKey,
    stats: Arc<SyncStats>,
    stop: Arc<AtomicBool>,
    learned_snat: LearnedSnat,
    last_seq: BTreeMap<IpAddr, u64>,
}

impl Receiver_ {
    fn run(mut self) {
        let mut buf = vec![0u8; 2048];
        while !self.stop.load(Relaxed) {
            let Ok((n, from)) = self.socket.recv_from(&mut buf) else {
                continue;
            };
            self.datagram(from.ip(), &buf[..n]);
        }
    }

    fn datagram(&mut self, from: IpAddr, d: &[u8]) {
        let s = &self.stats;
        if !self.peers.contains(&from) {
            SyncStats::add(&s.datagrams_strangers, 1);
            return;
        }
        let Ok(batch) = sync_wire::decode(d, self.key.as_ref()) else {
            SyncStats::add(&s.datagrams_malformed, 1);
            return;
        };
        SyncStats::add(&s.datagrams_received, 1);
        // A sequence number not above the last one: the peer restarted (its count starts
        // again), or a datagram came late.
        let last = self.last_seq.insert(from, batch.seq).unwrap_or(0);
        if batch.seq > last.saturating_add(1) && last > 0 {
            SyncStats::add(&s.datagrams_lost, batch.seq - last - 1);
        }
        SyncStats::add(&s.records_received, batch.records.len() as u64);
        let workers = self.inboxes.len() as u16;
        let mut snat = Vec::new();
        for r in batch.records {
            if r.state.nat == Nat::Snat {
                snat.push(r.state.xlat.to_ip());
            }
            let w = usize::from(r.state.owner(&self.steer_key, workers));
            if self.inboxes[w].try_send(r).is_err() {
                SyncStats::add(&s.records_dropped_receive, 1);
            }
        }
        if !snat.is_empty() {
            let mut learned = self
                .learned_snat
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let set = learned.entry(from).or_default();
            // Bounded: a peer's SNAT addresses are a few frontends of the configuration.
            if set.len() < 64 {
                set.extend(snat);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use xlb_engine::{compile, Addr, Config, EngineConfig, MemberHealth, Route};

    const CONFIG: &str = r#"
[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
"#;

    /// An engine whose client (198.18.0.10) and members are known neighbours.
    fn engine() -> Engine {
        let config = Config::from_toml_str(CONFIG).unwrap();
        let rules = Arc::new(compile(&config, None, &MemberHealth::default(), 1).unwrap());
        let mut e = Engine::new(EngineConfig::default(), rules, 1);
        let net = e.next_hops();
        net.set_port(0, [2, 0, 0, 0, 0xa0, 0]);
        net.set_port(1, [2, 0, 0, 0, 0xa0, 1]);
        net.set_routes(vec![
            Route::v4(Ipv4Addr::new(198, 18, 0, 0), 24, 0, None),
            Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None),
        ]);
        for (a, port, mac) in [
            ([198, 18, 0, 10], 0, 0xc1),
            ([198, 18, 1, 11], 1, 0xb1),
            ([198, 18, 1, 12], 1, 0xb2),
        ] {
            net.set_neighbor(Addr::from_v4_bytes(a), port, [2, 0, 0, 0, mac, 1])
                .unwrap();
        }
        e
    }

    fn syn(sport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0xc1, 1], [2, 0, 0, 0, 0xa0, 0])
            .ipv4([198, 18, 0, 10], [198, 18, 0, 100], 64)
            .tcp(sport, 80, 1, 1000)
            .syn()
            .write(&mut out, &[])
            .unwrap();
        out
    }

    /// Two loopback addresses' sync ends, each the other's peer, on a port of this run.
    fn pair(key: Option<SyncKey>) -> ((FlowSync, WorkerSync), (FlowSync, WorkerSync)) {
        let port = 40_000 + (std::process::id() % 20_000) as u16;
        let (a, b) = (IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2]));
        let opts = SyncOptions {
            port,
            rate: 10_000_000,
            refresh: Duration::from_millis(200),
            key,
        };
        let start = |me: IpAddr, peer: IpAddr| {
            let (s, mut ends) = FlowSync::start(
                &opts,
                me,
                &[SocketAddr::new(peer, 7946)],
                HashKey::from_seed(5),
                1,
            )
            .unwrap();
            (s, ends.pop().unwrap())
        };
        (start(a, b), start(b, a))
    }

    #[test]
    fn a_flow_created_on_one_node_becomes_a_standby_flow_on_the_other() {
        let ((sa, mut wa), (sb, mut wb)) = pair(Some(SyncKey::new(b"0123456789abcdef")));
        let (mut ea, mut eb) = (engine(), engine());
        let now = || xlb_afxdp::sys::monotonic_ns();
        wa.pass(&mut ea, now());
        wb.pass(&mut eb, now());
        let mut frame = syn(40_000);
        assert!(matches!(
            ea.process(now(), 0, &mut frame),
            xlb_engine::Verdict::Tx { .. }
        ));
        let t0 = Instant::now();
        while eb.flow_count() == 0 && t0.elapsed() < Duration::from_secs(5) {
            wa.pass(&mut ea, now());
            wb.pass(&mut eb, now());
            std::thread::sleep(Duration::from_millis(1));
        }
        let flow = eb.flows().next().expect("the flow reached node B");
        assert!(eb.is_standby_flow(flow.id));
        let a_flow = ea.flows().next().unwrap();
        assert_eq!(flow.translated, a_flow.translated, "the same backend");
        let (na, nb) = (sa.stats.snapshot(), sb.stats.snapshot());
        assert!(na.records_sent >= 1);
        assert_eq!(nb.records_imported, 1);
        assert_eq!(nb.lag_count, 1);
        assert!(nb.lag_max_ns < 5_000_000_000);
        assert_eq!(nb.datagrams_malformed + nb.datagrams_strangers, 0);
        // B's standby copy is not sent back to A.
        for _ in 0..50 {
            wb.pass(&mut eb, now());
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sb.stats.snapshot().records_sent, 0);

        // Garbage from the peer's address and anything from elsewhere: counted, no harm.
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let stranger = UdpSocket::bind("127.0.0.3:0").unwrap();
        let port = 40_000 + (std::process::id() % 20_000) as u16;
        let b = SocketAddr::new(IpAddr::from([127, 0, 0, 2]), port);
        peer.send_to(b"XLBS\x01\x00garbage", b).unwrap();
        stranger.send_to(b"XLBS", b).unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            let n = sb.stats.snapshot();
            if n.datagrams_malformed == 1 && n.datagrams_strangers == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let n = sb.stats.snapshot();
        assert_eq!((n.datagrams_malformed, n.datagrams_strangers), (1, 1));
        sa.stop();
        sb.stop();
    }

    #[test]
    fn the_receiver_counts_gaps_learns_snat_addresses_and_steers_to_the_owner() {
        let peer = IpAddr::from([198, 18, 1, 2]);
        let (tx, rx) = channel::bounded(2);
        let (tx2, rx2) = channel::bounded(2);
        let mut r = Receiver_ {
            socket: UdpSocket::bind("127.0.0.1:0").unwrap(),
            peers: vec![peer],
            key: None,
            inboxes: vec![tx, tx2],
            steer_key: HashKey::from_seed(9),
            stats: Arc::default(),
            stop: Arc::default(),
            learned_snat: Arc::default(),
            last_seq: BTreeMap::new(),
        };
        let mut e = Encoder::new(None);
        let snat = Addr::from(Ipv4Addr::new(198, 18, 200, 2));
        let state = xlb_engine::FlowState {
            rule_kind: xlb_engine::ruleset::RuleKind::Outbound,
            rule_name: Arc::from("out"),
            proto: 6,
            nat: Nat::Snat,
            orig_src: Addr::from(Ipv4Addr::new(198, 18, 1, 103)),
            orig_dst: Addr::from(Ipv4Addr::new(198, 18, 0, 10)),
            orig_sport: 40_000,
            orig_dport: 9000,
            xlat: snat,
            xlat_port: 1234,
            tcp: xlb_engine::tcp::TcpTrack::NONE,
            idle: 0,
        };
        let record = Record {
            reason: SyncReason::Noted,
            last_seen_ns: 1,
            state: state.clone(),
        };
        let mut datagram = |seq| {
            assert!(e.push(&record));
            e.finish(seq, 0)
        };
        for seq in [1, 2, 5, u64::MAX, 3] {
            r.datagram(peer, &datagram(seq));
        }
        r.datagram(IpAddr::from([198, 18, 1, 9]), &datagram(1));
        let n = r.stats.snapshot();
        assert_eq!(n.datagrams_received, 5);
        assert_eq!(n.datagrams_lost, 2 + (u64::MAX - 5 - 1));
        assert_eq!(n.datagrams_strangers, 1);
        // Two inboxes of 2: the owner's takes two, the rest is dropped and counted.
        let owner = usize::from(state.owner(&HashKey::from_seed(9), 2));
        let (mine, other) = if owner == 0 { (&rx, &rx2) } else { (&rx2, &rx) };
        assert_eq!((mine.len(), other.len()), (2, 0));
        assert_eq!(n.records_dropped_receive, 3);
        assert_eq!(
            r.learned_snat.lock().unwrap().get(&peer).unwrap().len(),
            1,
            "the peer's SNAT address"
        );
    }

    #[test]
    fn the_bucket_caps_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100_000);
        assert!(b.take(1000, t0) > Duration::ZERO, "starts empty");
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.take(5000, t1), Duration::ZERO);
        let w = b.take(10_000, t1);
        assert!(w >= Duration::from_millis(40), "{w:?}");
    }
}
