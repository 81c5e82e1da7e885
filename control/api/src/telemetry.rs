//! [`Telemetry`]: what the API reads from the workers, implemented by the daemon (which asks
//! its workers over their stats channels), plus [`FakeTelemetry`] for tests.
//!
//! The types carry engine values (`xlb_engine::Counters`, `FlowInfo`, `Event`, rule ids): the
//! daemon ships what the workers hand it, and the API layer names rules with the committed
//! rule set (ids are stable per kind and name), so the daemon has no formatting to do.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use xlb_engine::counters::EvictReason;
use xlb_engine::flow::{FlowId, Nat};
use xlb_engine::net::NextHopStats;
use xlb_engine::ruleset::PROTO_TCP;
use xlb_engine::tcp::TcpState;
use xlb_engine::time::Nanos;
use xlb_engine::{Addr, Counters, DropReason, FlowInfo, RuleCounters, RuleId, RuleSet};

/// Something the operator should hear about, with its wall-clock time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub at: SystemTime,
    pub event: ControlEvent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlEvent {
    /// From a worker's engine: reset on idle, SNAT exhaustion.
    Engine {
        worker: u16,
        event: xlb_engine::Event,
    },
    /// A member's probe verdict flipped.
    ProbeStateChanged {
        probe: String,
        pool: String,
        member: IpAddr,
        healthy: bool,
    },
    /// Every worker runs this generation (sent by [`crate::ControlState`]).
    GenerationApplied { generation: u64 },
    /// A drained member's progress (sent by the daemon's drain watcher).
    Drain(crate::drain::DrainEvent),
}

/// One worker's counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    pub worker: u16,
    pub counters: Counters,
    pub flows: u64,
    pub flow_capacity: u64,
    /// Frames this worker received for a flow another worker owns, and passed on.
    pub handed_off: u64,
    /// Of those, frames lost because the owner's inbox was full.
    pub handoff_dropped: u64,
    /// The next-hop table: entries in use, reclaimed and refused.
    pub next_hops: NextHopStats,
    /// The rule-set generation the worker ran when it took these counters.
    pub generation: u64,
}

impl Clone for WorkerCounters {
    fn clone(&self) -> WorkerCounters {
        let mut c = WorkerCounters::default();
        c.clone_from(self);
        c
    }

    /// Copies into this value's storage (the daemon's workers publish their counters so,
    /// without allocating).
    fn clone_from(&mut self, source: &WorkerCounters) {
        // Destructured so that a new field cannot be forgotten here.
        let WorkerCounters {
            worker,
            counters,
            flows,
            flow_capacity,
            handed_off,
            handoff_dropped,
            next_hops,
            generation,
        } = source;
        self.worker = *worker;
        self.counters.clone_from(counters);
        self.flows = *flows;
        self.flow_capacity = *flow_capacity;
        self.handed_off = *handed_off;
        self.handoff_dropped = *handoff_dropped;
        self.next_hops = *next_hops;
        self.generation = *generation;
    }
}

/// Every worker's counters added up: the one sum that the API, Prometheus, the status line
/// and the stats file all render from ([`sum`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSum {
    /// Workers summed.
    pub workers: usize,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rsts_sent: u64,
    pub events_dropped: u64,
    /// Flows restored from the flow stores at start, and records not restored.
    pub flows_restored: u64,
    pub flows_restore_dropped: u64,
    /// By [`DropReason::index`].
    pub drops: [u64; DropReason::COUNT],
    /// Unconfirmed flows evicted for new ones, by [`EvictReason::index`].
    pub evictions: [u64; EvictReason::COUNT],
    pub flows: u64,
    pub flow_capacity: u64,
    pub handed_off: u64,
    pub handoff_dropped: u64,
    /// Next-hop entries in use, reclaimed and refused (table full).
    pub next_hops: NextHopStats,
    /// Every live rule, in rule-id order, zeros included. With the XDP fast path, the
    /// packets and bytes it forwarded are in these too ([`CounterSum::add_fast`]).
    pub rules: Vec<(RuleId, RuleCounters)>,
    /// The engines' side of the fast path: flows published, withdrawn, expiries put off by a
    /// grace, publications that found no room.
    pub fast_published: u64,
    pub fast_unpublished: u64,
    pub fast_grace_waits: u64,
    pub fast_publish_failed: u64,
    /// New flows opened by XDP, the engines' side: SYNs XDP forwarded whose flow a worker
    /// installed, found with another member, or could not install; rules XDP opens flows
    /// of, and eligible rules left out for lack of room (as worker 0 last wrote them).
    pub fast_new_installed: u64,
    pub fast_new_conflict: u64,
    pub fast_new_refused: u64,
    pub fast_new_rules: u64,
    pub fast_new_rules_left_out: u64,
    /// The XDP program's side of the fast path (`None`: xlbd runs without it).
    pub fast: Option<FastPathCounters>,
}

/// Why the XDP program passed an eligible-looking frame to the workers instead of forwarding
/// it, in the order of [`FastPathCounters::punts`].
pub const FAST_PUNT_REASONS: [&str; 12] = [
    // No published flow has the frame's addresses, ports and protocol.
    "miss",
    // The flow's line is not (or no longer) forwarded by XDP.
    "not_fast",
    // A TCP segment outside the flow's window.
    "window",
    // A partial checksum over a message too long for the program to complete.
    "checksum_too_long",
    // The egress interface is not in the program's transmit map.
    "no_tx",
    // Not a frame XDP forwards: IPv6, VLAN, IP options, a fragment, TTL 1, SYN/FIN/RST, not
    // TCP or UDP.
    "not_eligible",
    // The frame arrived on another interface than its flow's.
    "wrong_port",
    // SYNs the program could have opened a flow for, had it found: a load-balancing rule it
    // may open flows of,
    "new_no_rule",
    // the SYN on that rule's interface,
    "new_wrong_port",
    // a member to send to in the rule's Maglev slot for the flow,
    "new_no_member",
    // room in the ring of the worker owning the flow,
    "new_ring_full",
    // new flows switched on (off while a worker rewrites what the program reads).
    "new_off",
];

/// One rule's frames forwarded by XDP, per direction (original, reply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastRuleCounters {
    pub rule: RuleId,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

/// The XDP fast path's own counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FastPathCounters {
    /// Whether XDP may forward (`--fast-path on`).
    pub enabled: bool,
    /// Frames forwarded by XDP.
    pub forwarded: u64,
    /// SYNs of new flows XDP forwarded itself (the owning worker installs their flows).
    pub new_forwarded: u64,
    /// Frames passed to the workers, by reason ([`FAST_PUNT_REASONS`]).
    pub punts: [u64; FAST_PUNT_REASONS.len()],
    /// Per rule id (of the rules in force when they were read), ascending.
    pub rules: Vec<FastRuleCounters>,
    /// The slowest recent grace period (ns), forgotten by an eighth at each later one: what
    /// the engines start each published flow's expiry ahead of by twice (0 with the fast path
    /// off). Seconds here mean a host whose RCU threads wait for CPU.
    pub grace_slowest_ns: u64,
}

impl CounterSum {
    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }

    pub fn eviction_count(&self, r: EvictReason) -> u64 {
        self.evictions[r.index()]
    }

    /// Adds what the XDP program forwarded into the rules' packets and bytes, and keeps its
    /// counters beside them.
    pub fn add_fast(&mut self, fast: Option<&FastPathCounters>) {
        let Some(fast) = fast else {
            return;
        };
        for (id, total) in self.rules.iter_mut() {
            if let Some(f) = fast.rules.iter().find(|f| f.rule == *id) {
                for d in 0..2 {
                    total.packets[d] += f.packets[d];
                    total.bytes[d] += f.bytes[d];
                }
            }
        }
        self.fast = Some(fast.clone());
    }
}

/// Whether a worker's figures for rule `id`, taken under `generation`, belong to the rule
/// that holds the id in `rules`: taken under it (generation at least the rule's creation), and
/// the rule is live. Counters of a deleted rule whose id went to a new rule never leak into the
/// new rule, not even from a snapshot taken just before the worker switched.
pub fn counts_for(rules: &RuleSet, id: RuleId, generation: u64) -> bool {
    !rules.is_retired(id) && rules.since(id).is_some_and(|since| generation >= since)
}

/// Adds up `workers`' counters; per-rule counters for every live rule of `rules` (retired
/// rules, deleted with flows draining, are left out), counting only figures that
/// [`counts_for`] the rule.
pub fn sum<'a>(
    workers: impl IntoIterator<Item = &'a WorkerCounters>,
    rules: &RuleSet,
) -> CounterSum {
    let mut s = CounterSum {
        workers: 0,
        rx_packets: 0,
        tx_packets: 0,
        rsts_sent: 0,
        events_dropped: 0,
        flows_restored: 0,
        flows_restore_dropped: 0,
        drops: [0; DropReason::COUNT],
        evictions: [0; EvictReason::COUNT],
        flows: 0,
        flow_capacity: 0,
        handed_off: 0,
        handoff_dropped: 0,
        next_hops: NextHopStats::default(),
        rules: rules
            .rules()
            .map(|(id, _)| (id, RuleCounters::default()))
            .collect(),
        fast_published: 0,
        fast_unpublished: 0,
        fast_grace_waits: 0,
        fast_publish_failed: 0,
        fast_new_installed: 0,
        fast_new_conflict: 0,
        fast_new_refused: 0,
        fast_new_rules: 0,
        fast_new_rules_left_out: 0,
        fast: None,
    };
    for w in workers {
        let c = &w.counters;
        s.workers += 1;
        s.rx_packets += c.rx_packets;
        s.tx_packets += c.tx_packets;
        s.rsts_sent += c.rsts_sent;
        s.events_dropped += c.events_dropped;
        s.flows_restored += c.flows_restored;
        s.flows_restore_dropped += c.flows_restore_dropped;
        s.fast_published += c.fast_published;
        s.fast_unpublished += c.fast_unpublished;
        s.fast_grace_waits += c.fast_grace_waits;
        s.fast_publish_failed += c.fast_publish_failed;
        s.fast_new_installed += c.fast_new_installed;
        s.fast_new_conflict += c.fast_new_conflict;
        s.fast_new_refused += c.fast_new_refused;
        s.fast_new_rules += c.fast_new_rules;
        s.fast_new_rules_left_out += c.fast_new_rules_left_out;
        for (total, d) in s.drops.iter_mut().zip(c.drops.iter()) {
            *total += d;
        }
        for (total, e) in s.evictions.iter_mut().zip(c.evictions.iter()) {
            *total += e;
        }
        s.flows += w.flows;
        s.flow_capacity += w.flow_capacity;
        s.handed_off += w.handed_off;
        s.handoff_dropped += w.handoff_dropped;
        s.next_hops.entries += w.next_hops.entries;
        s.next_hops.reclaimed += w.next_hops.reclaimed;
        s.next_hops.refused += w.next_hops.refused;
        for (id, total) in s.rules.iter_mut() {
            if counts_for(rules, *id, w.generation) {
                total.add(&c.rule(*id));
            }
        }
    }
    s
}

/// SNAT ports of one member for one protocol, summed over workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnatUsage {
    pub rule: RuleId,
    /// IP protocol number (6 or 17).
    pub proto: u8,
    pub member: IpAddr,
    pub allocated: u32,
    pub used: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub workers: Vec<WorkerCounters>,
    pub snat: Vec<SnatUsage>,
    /// The XDP fast path's counters (`None`: xlbd runs without it).
    pub fast: Option<FastPathCounters>,
}

/// A TCP state, or "a UDP flow".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateFilter {
    Tcp(TcpState),
    Udp,
}

/// Which flows a listing wants. Every set field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// Any of these rules (a name can exist once per rule kind).
    pub rules: Option<Vec<RuleId>>,
    /// The address that opened the flow (original source).
    pub client: Option<Addr>,
    /// The member: translated destination of an inbound (DNAT) flow, original source of an
    /// outbound (SNAT) flow. Floating-IP flows keep the frontend as destination, so their
    /// member is not known from the flow and this matches the frontend address.
    pub backend: Option<Addr>,
    /// IP protocol number.
    pub proto: Option<u8>,
    pub state: Option<StateFilter>,
}

impl FlowFilter {
    /// The one definition of matching, for the daemon's implementation and the fake alike.
    pub fn matches(&self, f: &FlowInfo) -> bool {
        if let Some(rules) = &self.rules {
            if !rules.contains(&f.rule) {
                return false;
            }
        }
        if self.client.is_some_and(|c| c != f.orig.src) {
            return false;
        }
        if self.backend.is_some_and(|b| b != backend_of(f)) {
            return false;
        }
        if self.proto.is_some_and(|p| p != f.proto) {
            return false;
        }
        match self.state {
            None => true,
            Some(StateFilter::Udp) => f.proto != PROTO_TCP,
            Some(StateFilter::Tcp(s)) => f.tcp_state == Some(s),
        }
    }
}

/// See [`FlowFilter::backend`].
pub fn backend_of(f: &FlowInfo) -> Addr {
    match f.nat {
        Nat::Snat => f.orig.src,
        Nat::Dnat | Nat::None => f.translated.dst,
    }
}

/// Position in a flow listing: flows are ordered by (worker, flow id); a page starts after
/// the cursor. A flow id is a flow-table slot, kept for the flow's life, so a flow that lives
/// through the whole listing is seen exactly once; flows created or removed between pages may
/// be missed or seen, never twice. A page may be short (even empty) and still have a cursor:
/// a worker walks a bounded part of its table per query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowCursor {
    pub worker: u16,
    pub flow: FlowId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub worker: u16,
    pub info: FlowInfo,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowPage {
    pub flows: Vec<FlowEntry>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<FlowCursor>,
    /// "Now" on the workers' time line, to turn `last_seen` and `deadline` into durations.
    pub now: Nanos,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStatus {
    pub worker: u16,
    pub interface: String,
    pub queue: u32,
    /// The pinned core, if any.
    pub core: Option<usize>,
    /// The rule-set generation it runs.
    pub generation: u64,
    pub flows: u64,
    pub flow_capacity: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeStatus {
    pub workers: Vec<WorkerStatus>,
    /// "busy" or "wakeup".
    pub poll_mode: String,
    pub uptime: Duration,
    /// The data-path self-probe's figures, per probed rule (empty when it is off).
    pub datapath: Vec<DatapathAvailability>,
    /// Every drained member's progress.
    pub drains: Vec<crate::drain::DrainStatus>,
    /// The NAT event export, when it is on.
    pub nat_log: Option<crate::drain::NatLogStatus>,
    /// This node's cluster state, when xlbd runs as a cluster node.
    pub cluster: Option<ClusterStatus>,
}

/// One cluster node's view: fitness, drain, what it announces, its peers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterStatus {
    pub node: String,
    pub fit: bool,
    pub unfit_reason: String,
    pub draining: bool,
    pub drain_remaining: Duration,
    pub drain_done: bool,
    pub announced: Vec<String>,
    pub announcer: String,
    pub announce_error: String,
    pub config_fingerprint: String,
    pub peers: Vec<ClusterPeer>,
    pub membership_changes: u64,
    /// The flow-state sync with the peers, when it is on.
    pub sync: Option<ClusterSync>,
}

/// The cluster's flow-state sync since start (docs/cluster.md, "Flow-state sync").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSync {
    pub records_sent: u64,
    pub records_received: u64,
    /// Imported as new standby flows.
    pub records_imported: u64,
    /// Standby flows refreshed by a newer state.
    pub records_refreshed: u64,
    /// For flows live here, or older than the copy here: nothing changed.
    pub records_kept: u64,
    /// Refused by the engine (no such rule here, table full, next hop not known yet).
    pub records_refused: u64,
    /// Lost on this node: a full queue on the way out or in, or the rate cap's backlog.
    pub records_dropped: u64,
    /// Datagrams refused: undecodable, unauthenticated, or from no configured peer.
    pub datagrams_malformed: u64,
    /// Datagrams missing in the peers' sequences.
    pub datagrams_lost: u64,
    /// Lag of created or changed flows, from the packet on the peer to the import here.
    pub lag_count: u64,
    pub lag_mean: std::time::Duration,
    pub lag_max: std::time::Duration,
    /// Host prefixes of lost peers' SNAT addresses this node announces in their stead.
    pub taken_over: Vec<String>,
}

/// A peer as this node last heard it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterPeer {
    pub address: String,
    pub node: String,
    pub alive: bool,
    pub announcing: bool,
    pub config_fingerprint: String,
    pub same_config: bool,
    pub last_heard: Option<Duration>,
}

/// Data-path availability of one (frontend, rule) from the daemon's self-probe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathAvailability {
    pub frontend: String,
    pub rule: String,
    /// Results in the window (the most recent probes), and how many of them were answered.
    pub window: u32,
    pub window_answered: u32,
    /// Since start.
    pub answered_total: u64,
    pub failed_total: u64,
}

impl DatapathAvailability {
    /// Answered share of the window (1.0 before the first result).
    pub fn ratio(&self) -> f64 {
        if self.window == 0 {
            1.0
        } else {
            f64::from(self.window_answered) / f64::from(self.window)
        }
    }
}

/// A read from the workers failed (e.g. the daemon is stopping): `UNAVAILABLE`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TelemetryError(pub String);

/// Reads that come from the workers. Methods may block (the daemon asks its workers and
/// waits); the gRPC layer calls them from a blocking context.
pub trait Telemetry: Send + Sync + 'static {
    fn counters(&self) -> Result<CountersSnapshot, TelemetryError>;
    /// Up to `limit` flows matching `filter`, after `after`, in (worker, flow id) order.
    fn flows(
        &self,
        filter: &FlowFilter,
        after: Option<FlowCursor>,
        limit: usize,
    ) -> Result<FlowPage, TelemetryError>;
    /// Engine and probe events from now on.
    fn subscribe(&self) -> broadcast::Receiver<EventRecord>;
    fn status(&self) -> Result<RuntimeStatus, TelemetryError>;
    /// Drains this cluster node (withdraws its frontends; existing flows go on until they end
    /// or `deadline`) or ends the drain. `None`: not a cluster node.
    fn set_drain(&self, _drain: bool, _deadline: Option<Duration>) -> Option<ClusterStatus> {
        None
    }
}

/// In-memory [`Telemetry`] for tests and for running the API without workers: whatever was
/// stored with its setters, and events sent with [`FakeTelemetry::emit`].
#[derive(Debug)]
pub struct FakeTelemetry {
    inner: Mutex<FakeInner>,
    events: broadcast::Sender<EventRecord>,
}

#[derive(Debug, Default)]
struct FakeInner {
    counters: CountersSnapshot,
    flows: Vec<FlowEntry>,
    now: Nanos,
    status: RuntimeStatus,
}

impl Default for FakeTelemetry {
    fn default() -> FakeTelemetry {
        FakeTelemetry {
            inner: Mutex::new(FakeInner {
                status: RuntimeStatus {
                    poll_mode: "wakeup".into(),
                    ..RuntimeStatus::default()
                },
                ..FakeInner::default()
            }),
            events: broadcast::channel(256).0,
        }
    }
}

impl FakeTelemetry {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    pub fn set_counters(&self, c: CountersSnapshot) {
        self.lock().counters = c;
    }
    pub fn set_flows(&self, mut flows: Vec<FlowEntry>, now: Nanos) {
        flows.sort_by_key(|f| (f.worker, f.info.id));
        let mut g = self.lock();
        g.flows = flows;
        g.now = now;
    }
    pub fn set_status(&self, s: RuntimeStatus) {
        self.lock().status = s;
    }
    /// Sends an event to every subscriber (returns how many got it).
    pub fn emit(&self, event: ControlEvent) -> usize {
        self.events
            .send(EventRecord {
                at: SystemTime::now(),
                event,
            })
            .unwrap_or(0)
    }
}

impl Telemetry for FakeTelemetry {
    fn counters(&self) -> Result<CountersSnapshot, TelemetryError> {
        Ok(self.lock().counters.clone())
    }

    fn flows(
        &self,
        filter: &FlowFilter,
        after: Option<FlowCursor>,
        limit: usize,
    ) -> Result<FlowPage, TelemetryError> {
        let g = self.lock();
        let mut matching = g
            .flows
            .iter()
            .filter(|f| {
                after.is_none_or(|a| {
                    FlowCursor {
                        worker: f.worker,
                        flow: f.info.id,
                    } > a
                })
            })
            .filter(|f| filter.matches(&f.info));
        let flows: Vec<FlowEntry> = matching.by_ref().take(limit).copied().collect();
        let next = match (matching.next(), flows.last()) {
            (Some(_), Some(last)) => Some(FlowCursor {
                worker: last.worker,
                flow: last.info.id,
            }),
            _ => None,
        };
        Ok(FlowPage {
            flows,
            next,
            now: g.now,
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.events.subscribe()
    }

    fn status(&self) -> Result<RuntimeStatus, TelemetryError> {
        Ok(self.lock().status.clone())
    }
}
