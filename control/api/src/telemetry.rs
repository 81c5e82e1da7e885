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
use xlb_engine::flow::{FlowId, Nat};
use xlb_engine::ruleset::PROTO_TCP;
use xlb_engine::tcp::TcpState;
use xlb_engine::time::Nanos;
use xlb_engine::{Addr, Counters, FlowInfo, RuleId};

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
    Drain(DrainEvent),
}

/// What a drain reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainPhase {
    /// The member's admin state became `down`.
    Started,
    /// Its flow count changed.
    Progress,
    /// Its deadline passed and its action ran on every worker.
    Deadline,
    /// No flow of it is left on any worker.
    Completed,
}

impl DrainPhase {
    pub const fn as_str(self) -> &'static str {
        match self {
            DrainPhase::Started => "started",
            DrainPhase::Progress => "progress",
            DrainPhase::Deadline => "deadline",
            DrainPhase::Completed => "completed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainEvent {
    pub pool: String,
    pub member: IpAddr,
    pub phase: DrainPhase,
    /// Summed over workers; `None` until every worker counted.
    pub flows_left: Option<u64>,
    pub flows_reset: u64,
    /// Milliseconds to the deadline (negative once passed); `None` without a deadline.
    pub deadline_in_ms: Option<i64>,
    pub action: xlb_engine::config::DrainAction,
}

/// One drained member's progress, summed over workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainStatus {
    pub pool: String,
    pub member: IpAddr,
    /// Its flows on every worker; `None` until every worker has counted them once.
    pub flows_left: Option<u64>,
    /// TCP flows reset at the deadline (RSTs to both ends).
    pub flows_reset: u64,
    /// TCP flows ended at the deadline without RSTs (not established).
    pub flows_ended: u64,
    /// Every worker ran the deadline's action.
    pub deadline_done: bool,
}

/// Sums the drain progress of every worker (each a list in its rule set's order; a worker
/// that has not reported yet gives an empty list): per (pool, member), in the order first
/// seen. A drain that some worker does not report yet (it runs an older rule set) is not
/// counted yet: `flows_left` is `None` and its deadline not done.
pub fn sum_drains(workers: &[&[xlb_engine::drain::DrainProgress]]) -> Vec<DrainStatus> {
    let mut out: Vec<(DrainStatus, usize)> = Vec::new();
    for list in workers {
        for p in *list {
            let member = p.member.to_ip();
            let i = match out
                .iter()
                .position(|(d, _)| d.pool == *p.pool && d.member == member)
            {
                Some(i) => i,
                None => {
                    out.push((
                        DrainStatus {
                            pool: p.pool.to_string(),
                            member,
                            flows_left: Some(0),
                            flows_reset: 0,
                            flows_ended: 0,
                            deadline_done: true,
                        },
                        0,
                    ));
                    out.len() - 1
                }
            };
            let (d, reported) = &mut out[i];
            *reported += 1;
            d.flows_left = match (d.flows_left, p.flows_left) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            };
            d.flows_reset += p.flows_reset;
            d.flows_ended += p.flows_ended;
            d.deadline_done &= p.deadline_done;
        }
    }
    out.into_iter()
        .map(|(mut d, reported)| {
            if reported < workers.len() {
                d.flows_left = None;
                d.deadline_done = false;
            }
            d
        })
        .collect()
}

#[cfg(test)]
mod drain_tests {
    use std::sync::Arc;

    use xlb_engine::drain::DrainProgress;
    use xlb_engine::Addr;

    use super::sum_drains;

    fn p(member: u8, left: Option<u64>, reset: u64, done: bool) -> DrainProgress {
        DrainProgress {
            pool: Arc::from("web"),
            member: Addr::from_v4_bytes([198, 18, 1, member]),
            flows_left: left,
            flows_reset: reset,
            flows_ended: 0,
            deadline_done: done,
        }
    }

    #[test]
    fn drains_are_summed_only_once_every_worker_counted_them() {
        let w0 = [p(11, Some(2), 1, true), p(12, Some(0), 0, false)];
        let w1 = [p(11, Some(3), 2, true)];
        let s = sum_drains(&[&w0, &w1]);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].flows_left, s[0].flows_reset, s[0].deadline_done),
            (Some(5), 3, true)
        );
        assert_eq!(
            (s[1].flows_left, s[1].deadline_done),
            (None, false),
            "worker 1 does not run that drain yet"
        );
        let w1 = [p(11, None, 0, false)];
        assert_eq!(
            sum_drains(&[&w0, &w1])[0].flows_left,
            None,
            "not counted yet"
        );
        assert_eq!(
            sum_drains(&[&w0, &[]])[0].flows_left,
            None,
            "no snapshot yet"
        );
    }
}

/// One worker's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerCounters {
    pub worker: u16,
    pub counters: Counters,
    pub flows: u64,
    pub flow_capacity: u64,
    /// The rule-set generation the worker ran when it took these counters.
    pub generation: u64,
}

/// Per-rule counters of every live rule of `rules`, summed over workers, in rule-id order:
/// the one place where workers' rule counters are added up (the API, Prometheus, the status
/// line and the stats file all render from it).
///
/// Each item of `workers` is a worker's counters with the generation it ran when it took them.
/// A worker's figures for an id count only when they were taken under the rule that holds the
/// id now (generation at least the rule's creation): counters of a deleted rule whose id was
/// released and handed to a new rule never leak into the new rule, not even from a snapshot
/// taken just before the worker switched. Retired rules (deleted, flows draining) are left out.
pub fn sum_rule_counters<'a>(
    workers: impl IntoIterator<Item = (&'a Counters, u64)>,
    rules: &xlb_engine::RuleSet,
) -> Vec<(RuleId, xlb_engine::RuleCounters)> {
    let mut sum: Vec<(RuleId, xlb_engine::RuleCounters)> = rules
        .rules()
        .map(|(id, _)| (id, xlb_engine::RuleCounters::default()))
        .collect();
    for (c, generation) in workers {
        for (id, total) in sum.iter_mut() {
            if rules.since(*id).is_some_and(|since| generation >= since) {
                total.add(&c.rule(*id));
            }
        }
    }
    sum
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
/// the cursor. Flows created or removed between pages may be missed or seen, never twice.
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
    pub drains: Vec<DrainStatus>,
    /// The NAT event export, when it is on.
    pub nat_log: Option<NatLogStatus>,
}

/// The NAT event log's figures since start (IPFIX export, docs/xlbd.md).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatLogStatus {
    /// Where records go.
    pub collector: String,
    /// Records and IPFIX messages sent.
    pub records_sent: u64,
    pub messages_sent: u64,
    /// Records lost: queues full (engine, worker → exporter), sends that failed.
    pub records_lost: u64,
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
