//! The daemon's side of the control API (`xlb-api`): the [`Publisher`] that pushes a new rule
//! set to every worker over its bounded channel and waits for every acknowledgement, and the
//! [`Telemetry`] that answers counters, flows, events and status from the workers.
//!
//! Workers never share state with the control thread: rule sets go to them as `Arc`s over
//! their channel and they answer over channels (acks, snapshots, flow pages). What this module
//! keeps under a mutex is the control thread's own copy of those answers, read by the gRPC
//! threads and the metrics endpoint, never by a worker.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant, SystemTime},
};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use hdrhistogram::Histogram;
use tokio::sync::broadcast;
use xlb_api::{
    ControlEvent, CountersSnapshot, EventRecord, FlowCursor, FlowEntry, FlowFilter, FlowPage,
    PublishError, Publisher, RuntimeStatus, SnatUsage, Telemetry, TelemetryError, WorkerCounters,
    WorkerStatus,
};
use xlb_engine::{RuleId, RuleSet};

use crate::addresses::AddressPlane;
use crate::handler::{Ack, FlowQuery, Snapshot, ToWorker};

/// How long a telemetry read waits for a worker's answer.
const WORKER_ANSWER: Duration = Duration::from_secs(2);
/// Flow queries one listing page may send to one worker beyond the first (each walks at most
/// `handler::QUERY_SLOTS` slots); a page that needs more goes back short, with its cursor.
/// With xlbd's default table (65 536 flows per worker) one page can walk a whole worker.
const MAX_QUERIES_PER_PAGE: usize = 4;

/// What the control loop learns from the workers, shared with the API and metrics threads.
#[derive(Debug)]
pub struct Shared {
    /// Latest snapshot per worker (every 250 ms).
    pub snaps: Mutex<Vec<Option<Snapshot>>>,
    /// Engine events, for `WatchEvents`.
    pub events: broadcast::Sender<EventRecord>,
    /// Generation each worker acknowledged last.
    pub applied: Vec<AtomicU64>,
    /// Rule-set propagation times (publish → every worker acknowledged), in microseconds.
    pub propagation: Mutex<Histogram<u64>>,
    pub started: Instant,
    /// Data-path availability per probed rule (empty without the self-probe).
    pub datapath: Mutex<Vec<crate::selfprobe::Availability>>,
}

impl Shared {
    pub fn new(workers: usize, generation: u64) -> Arc<Shared> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Shared {
            snaps: Mutex::new(vec![None; workers]),
            events,
            applied: (0..workers).map(|_| AtomicU64::new(generation)).collect(),
            propagation: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("constant, valid bounds"),
            ),
            started: Instant::now(),
            datapath: Mutex::new(Vec::new()),
        })
    }

    /// Stores a worker's snapshot (called by the control loop).
    pub fn store(&self, s: Snapshot) {
        let mut snaps = self.snaps.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = snaps.get_mut(s.worker) {
            *slot = Some(s);
        }
    }

    /// The latest snapshots, cloned out of the lock.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.snaps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Passes an engine event to the API's watchers (none listening is fine).
    pub fn event(&self, worker: usize, event: xlb_engine::Event) {
        let _ = self.events.send(EventRecord {
            at: SystemTime::now(),
            event: ControlEvent::Engine {
                worker: worker as u16,
                event,
            },
        });
    }
}

/// Sends rule sets to the workers and waits for their acks. [`xlb_api::ControlState`] calls
/// it one change at a time, from a blocking thread.
///
/// With an [`AddressPlane`], the XDP program's owned addresses and backend-side interfaces
/// change with the same generation: a call returns `Ok` only once the maps and every worker
/// agree, and on any failure the maps are put back as they were.
#[derive(Debug)]
pub struct WorkerPublisher {
    to: Vec<Sender<ToWorker>>,
    acks: Mutex<Receiver<Ack>>,
    shared: Arc<Shared>,
    addresses: Option<Arc<Mutex<AddressPlane>>>,
}

impl WorkerPublisher {
    pub fn new(to: Vec<Sender<ToWorker>>, acks: Receiver<Ack>, shared: Arc<Shared>) -> Self {
        WorkerPublisher {
            to,
            acks: Mutex::new(acks),
            shared,
            addresses: None,
        }
    }

    /// Applies every generation to these XDP maps too.
    pub fn with_addresses(mut self, addresses: Arc<Mutex<AddressPlane>>) -> Self {
        self.addresses = Some(addresses);
        self
    }
}

impl Publisher for WorkerPublisher {
    fn publish(&self, rules: Arc<RuleSet>, deadline: Duration) -> Result<(), PublishError> {
        let Some(addresses) = &self.addresses else {
            return self.publish_to_workers(rules, deadline);
        };
        let mut addresses = addresses.lock().unwrap_or_else(PoisonError::into_inner);
        let pending = addresses.begin(&rules).map_err(|e| {
            PublishError::Unavailable(format!("updating the XDP program's addresses: {e}"))
        })?;
        if let Err(e) = self.publish_to_workers(Arc::clone(&rules), deadline) {
            addresses.abort(pending);
            return Err(e);
        }
        addresses.finish(pending).map_err(|e| {
            PublishError::Unavailable(format!("updating the XDP program's addresses: {e}"))
        })
    }

    /// Retired rules of `rules` of which no worker holds a flow: every worker's latest
    /// snapshot was taken under `rules`' generation or later (so after the rule stopped taking
    /// new flows there) and counts none.
    fn drained(&self, rules: &RuleSet) -> HashSet<RuleId> {
        let snaps = self.shared.snapshots();
        let all_current = snaps.len() == self.to.len()
            && snaps.iter().all(|s| s.generation >= rules.generation());
        if !all_current {
            return HashSet::new();
        }
        rules
            .retired_rules()
            .map(|(id, _)| id)
            .filter(|id| snaps.iter().all(|s| s.counters.live_flows(*id) == 0))
            .collect()
    }
}

impl WorkerPublisher {
    fn publish_to_workers(
        &self,
        rules: Arc<RuleSet>,
        deadline: Duration,
    ) -> Result<(), PublishError> {
        let generation = rules.generation();
        let started = Instant::now();
        let until = started + deadline;
        let acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut missing: Vec<u16> = Vec::new();
        for (w, tx) in self.to.iter().enumerate() {
            match tx.send_deadline(ToWorker::Rules(Arc::clone(&rules)), until) {
                Ok(()) => {}
                Err(SendTimeoutError::Timeout(_)) => missing.push(w as u16),
                Err(SendTimeoutError::Disconnected(_)) => {
                    return Err(PublishError::Unavailable(format!(
                        "worker {w} has exited (is xlbd stopping?)"
                    )))
                }
            }
        }
        let mut pending: Vec<usize> = (0..self.to.len())
            .filter(|w| !missing.contains(&(*w as u16)))
            .filter(|w| self.shared.applied[*w].load(Ordering::Relaxed) < generation)
            .collect();
        while !pending.is_empty() {
            match acks.recv_deadline(until) {
                Ok(ack) => {
                    if let Some(a) = self.shared.applied.get(ack.worker) {
                        a.fetch_max(ack.generation, Ordering::Relaxed);
                    }
                    if ack.generation >= generation {
                        pending.retain(|w| *w != ack.worker);
                    }
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(PublishError::Unavailable(
                        "the workers' acknowledgement channel closed (is xlbd stopping?)".into(),
                    ))
                }
            }
        }
        missing.extend(pending.iter().map(|w| *w as u16));
        if !missing.is_empty() {
            missing.sort_unstable();
            return Err(PublishError::Timeout {
                generation,
                missing,
                deadline,
            });
        }
        let took = started.elapsed().as_micros().max(1) as u64;
        self.shared
            .propagation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(took);
        Ok(())
    }
}

/// The static part of a worker's status: where it runs.
#[derive(Debug, Clone)]
pub struct WorkerPlacement {
    pub interfaces: String,
    pub first_queue: u32,
    pub core: Option<usize>,
}

/// [`Telemetry`] over the workers of this daemon.
#[derive(Debug)]
pub struct DaemonTelemetry {
    to: Vec<Sender<ToWorker>>,
    shared: Arc<Shared>,
    placement: Vec<WorkerPlacement>,
    poll_mode: String,
}

impl DaemonTelemetry {
    pub fn new(
        to: Vec<Sender<ToWorker>>,
        shared: Arc<Shared>,
        placement: Vec<WorkerPlacement>,
        poll_mode: &str,
    ) -> Self {
        DaemonTelemetry {
            to,
            shared,
            placement,
            poll_mode: poll_mode.to_string(),
        }
    }

    fn ask_flows(
        &self,
        w: usize,
        filter: &FlowFilter,
        after: Option<u32>,
        limit: usize,
    ) -> Result<crate::handler::FlowAnswer, TelemetryError> {
        let (reply, answer) = channel::bounded(1);
        let q = FlowQuery {
            filter: filter.clone(),
            after,
            limit,
            reply,
        };
        let until = Instant::now() + WORKER_ANSWER;
        self.to[w]
            .send_deadline(ToWorker::Flows(q), until)
            .map_err(|_| TelemetryError(format!("worker {w} does not take requests")))?;
        answer
            .recv_deadline(until)
            .map_err(|_| TelemetryError(format!("worker {w} did not answer within 2 s")))
    }
}

/// Sums SNAT usage over workers: each worker holds a share of every member's blocks.
pub fn sum_snat(snaps: &[Snapshot]) -> Vec<SnatUsage> {
    let mut out: Vec<SnatUsage> = Vec::new();
    for s in snaps {
        for u in &s.snat {
            match out
                .iter_mut()
                .find(|o| (o.rule, o.proto, o.member) == (u.rule, u.proto, u.member))
            {
                Some(o) => {
                    o.allocated += u.allocated;
                    o.used += u.used;
                }
                None => out.push(u.clone()),
            }
        }
    }
    out.sort_by_key(|u| (u.rule, u.member, u.proto));
    out
}

impl Telemetry for DaemonTelemetry {
    fn counters(&self) -> Result<CountersSnapshot, TelemetryError> {
        let snaps = self.shared.snapshots();
        Ok(CountersSnapshot {
            workers: snaps
                .iter()
                .map(|s| WorkerCounters {
                    worker: s.worker as u16,
                    counters: s.counters.clone(),
                    flows: s.flows as u64,
                    flow_capacity: u64::from(s.flow_capacity),
                    generation: s.generation,
                })
                .collect(),
            snat: sum_snat(&snaps),
        })
    }

    fn flows(
        &self,
        filter: &FlowFilter,
        after: Option<FlowCursor>,
        limit: usize,
    ) -> Result<FlowPage, TelemetryError> {
        let mut page = FlowPage::default();
        let first = after.map_or(0, |c| usize::from(c.worker));
        'workers: for w in first..self.to.len() {
            let mut from = after.filter(|c| usize::from(c.worker) == w).map(|c| c.flow);
            let mut queries = 0;
            loop {
                let want = limit - page.flows.len();
                let answer = self.ask_flows(w, filter, from, want)?;
                queries += 1;
                if page.now == 0 {
                    page.now = answer.now;
                }
                page.flows
                    .extend(answer.flows.into_iter().map(|info| FlowEntry {
                        worker: w as u16,
                        info,
                    }));
                let Some(slot) = answer.more else {
                    break;
                };
                // The worker has more after `slot`: its walk is bounded (a query costs it at
                // most `QUERY_SLOTS` slots), so ask again, a bounded number of times per page
                // and worker; past that the page goes back short, with the cursor.
                if page.flows.len() >= limit || queries >= MAX_QUERIES_PER_PAGE {
                    page.next = Some(FlowCursor {
                        worker: w as u16,
                        flow: slot,
                    });
                    break 'workers;
                }
                from = Some(slot);
            }
            if page.flows.len() >= limit {
                // Full at the end of this worker: the next page starts with the next worker
                // (asked after its last slot, this one answers nothing more).
                page.next = page
                    .flows
                    .last()
                    .filter(|_| w + 1 < self.to.len())
                    .map(|e| FlowCursor {
                        worker: e.worker,
                        flow: e.info.id,
                    });
                break;
            }
        }
        Ok(page)
    }

    fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.shared.events.subscribe()
    }

    fn status(&self) -> Result<RuntimeStatus, TelemetryError> {
        let snaps = self.shared.snapshots();
        let workers = self
            .placement
            .iter()
            .enumerate()
            .map(|(w, p)| {
                let snap = snaps.iter().find(|s| s.worker == w);
                WorkerStatus {
                    worker: w as u16,
                    interface: p.interfaces.clone(),
                    queue: p.first_queue,
                    core: p.core,
                    generation: self.shared.applied[w].load(Ordering::Relaxed),
                    flows: snap.map_or(0, |s| s.flows as u64),
                    flow_capacity: snap.map_or(0, |s| u64::from(s.flow_capacity)),
                }
            })
            .collect();
        Ok(RuntimeStatus {
            workers,
            poll_mode: self.poll_mode.clone(),
            uptime: self.shared.started.elapsed(),
            datapath: self
                .shared
                .datapath
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use xlb_engine::{
        compile,
        flow::Nat,
        ruleset::{FlowTuple, RuleSet, Timers},
        Addr, Config, FlowInfo, MemberHealth,
    };

    use super::*;

    /// A stand-in for a worker: acks rule sets (unless `mute`), answers flow queries from
    /// `flows` (sorted by id), until its channel closes.
    fn fake_worker(
        id: usize,
        rx: Receiver<ToWorker>,
        acks: Sender<Ack>,
        flows: Vec<FlowInfo>,
        mute: bool,
        capacity: u32,
    ) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            while let Ok(msg) = rx.recv() {
                match msg {
                    ToWorker::Rules(r) if !mute => {
                        let _ = acks.send(Ack {
                            worker: id,
                            generation: r.generation(),
                        });
                    }
                    ToWorker::Flows(q) => {
                        let slots = q.slots(capacity);
                        let live = flows.iter().filter(|f| slots.contains(&f.id)).copied();
                        let _ = q.reply.send(q.answer(id, live, capacity, 5));
                    }
                    _ => {}
                }
            }
        })
    }

    fn info(id: u32) -> FlowInfo {
        let t = FlowTuple {
            proto: 6,
            src: Addr::from_v4_bytes([198, 18, 0, 10]),
            src_port: 40000u16.wrapping_add(id as u16),
            dst: Addr::from_v4_bytes([198, 18, 0, 100]),
            dst_port: 80,
        };
        FlowInfo {
            id,
            rule: 0,
            proto: 6,
            nat: Nat::Dnat,
            orig: t,
            translated: t,
            tcp_state: None,
            last_seen: 1,
            deadline: 2,
        }
    }

    fn rules(generation: u64) -> Arc<RuleSet> {
        Arc::new(RuleSet::empty(generation, Timers::default()))
    }

    /// Workers with the given flows (`mute`: never acks), and the publisher and telemetry
    /// over them.
    fn daemon(
        flows: Vec<Vec<FlowInfo>>,
        mute: &[usize],
    ) -> (
        WorkerPublisher,
        DaemonTelemetry,
        Vec<thread::JoinHandle<()>>,
    ) {
        daemon_with(flows, mute, crate::handler::QUERY_SLOTS)
    }

    /// [`daemon`] with workers whose flow tables have `capacity` slots.
    fn daemon_with(
        flows: Vec<Vec<FlowInfo>>,
        mute: &[usize],
        capacity: u32,
    ) -> (
        WorkerPublisher,
        DaemonTelemetry,
        Vec<thread::JoinHandle<()>>,
    ) {
        let shared = Shared::new(flows.len(), 1);
        let (ack_tx, ack_rx) = channel::bounded(16);
        let mut to = Vec::new();
        let mut joins = Vec::new();
        for (w, f) in flows.into_iter().enumerate() {
            let (tx, rx) = channel::bounded(4);
            to.push(tx);
            joins.push(fake_worker(
                w,
                rx,
                ack_tx.clone(),
                f,
                mute.contains(&w),
                capacity,
            ));
        }
        let placement = vec![
            WorkerPlacement {
                interfaces: "a,b".into(),
                first_queue: 0,
                core: None,
            };
            to.len()
        ];
        let publisher = WorkerPublisher::new(to.clone(), ack_rx, Arc::clone(&shared));
        let telemetry = DaemonTelemetry::new(to, shared, placement, "wakeup");
        (publisher, telemetry, joins)
    }

    #[test]
    fn publish_returns_once_every_worker_acked_and_records_the_generation() {
        let (p, t, _) = daemon(vec![vec![], vec![], vec![]], &[]);
        p.publish(rules(2), Duration::from_secs(2)).unwrap();
        let st = t.status().unwrap();
        assert_eq!(
            st.workers.iter().map(|w| w.generation).collect::<Vec<_>>(),
            vec![2, 2, 2]
        );
        assert_eq!(p.shared.propagation.lock().unwrap().len(), 1);
    }

    #[test]
    fn publish_names_the_workers_that_did_not_ack_in_time() {
        let (p, t, _) = daemon(vec![vec![], vec![], vec![]], &[1]);
        let e = p.publish(rules(2), Duration::from_millis(200)).unwrap_err();
        assert_eq!(
            e,
            PublishError::Timeout {
                generation: 2,
                missing: vec![1],
                deadline: Duration::from_millis(200),
            }
        );
        let gens: Vec<u64> = t
            .status()
            .unwrap()
            .workers
            .iter()
            .map(|w| w.generation)
            .collect();
        assert_eq!(gens, vec![2, 1, 2]);
        // A timeout is not a propagation time.
        assert_eq!(p.shared.propagation.lock().unwrap().len(), 0);
    }

    #[test]
    fn publish_to_an_exited_worker_is_unavailable() {
        let (p, _, joins) = daemon(vec![vec![]], &[]);
        let (tx, rx) = channel::bounded::<ToWorker>(1);
        drop(rx);
        let p = WorkerPublisher::new(
            vec![p.to[0].clone(), tx],
            p.acks.into_inner().unwrap(),
            p.shared,
        );
        let e = p.publish(rules(2), Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(e, PublishError::Unavailable(ref m) if m.contains("worker 1")),
            "{e:?}"
        );
        drop(joins);
    }

    fn snapshot(worker: usize, generation: u64, live: &[(u16, u32)]) -> Snapshot {
        let mut counters = xlb_engine::Counters::default();
        for &(id, n) in live {
            counters.live_flows.resize(usize::from(id) + 1, 0);
            counters.live_flows[usize::from(id)] = n;
        }
        Snapshot {
            worker,
            counters,
            flows: 0,
            flow_capacity: 16,
            handed_off: 0,
            handoff_dropped: 0,
            generation,
            snat: Vec::new(),
            loop_latency: Histogram::new(2).unwrap(),
            next_hops: Default::default(),
        }
    }

    #[test]
    fn retired_rules_are_drained_once_every_worker_reports_none_of_their_flows() {
        let (p, _, _) = daemon(vec![vec![], vec![]], &[]);
        let cfg = |rules: &str| {
            Config::from_toml_str(&format!(
                "[[frontends]]\nname = \"v\"\naddress = \"198.18.0.100\"\nkind = \"public\"\n\
                 [[backend_pools]]\nname = \"p\"\nmembers = [{{ address = \"198.18.1.11\" }}]\n{rules}"
            ))
            .unwrap()
        };
        let rule = |name: &str, port: u16| {
            format!(
                "[[load_balancing_rules]]\nname = \"{name}\"\nfrontend = \"v\"\nprotocol = \"TCP\"\n\
                 frontend_port = {port}\nbackend_pool = \"p\"\nbackend_port = 80\n"
            )
        };
        let g1 = compile(
            &cfg(&(rule("a", 1) + &rule("b", 2))),
            None,
            &MemberHealth::default(),
            1,
        )
        .unwrap();
        let g2 = compile(&cfg(&rule("a", 1)), Some(&g1), &MemberHealth::default(), 2).unwrap();
        let b = 1;
        assert!(g2.is_retired(b));
        // No snapshot yet from worker 1: nothing is known to be drained.
        p.shared.store(snapshot(0, 2, &[]));
        assert!(p.drained(&g2).is_empty());
        // Worker 1 still runs generation 1 (it could create flows of "b"): not drained.
        p.shared.store(snapshot(1, 1, &[]));
        assert!(p.drained(&g2).is_empty());
        // Both on generation 2, worker 1 still holds a flow of "b".
        p.shared.store(snapshot(1, 2, &[(b, 1)]));
        assert!(p.drained(&g2).is_empty());
        // None left anywhere: drained.
        p.shared.store(snapshot(1, 2, &[(b, 0)]));
        assert_eq!(p.drained(&g2), HashSet::from([b]));
    }

    #[test]
    fn flow_pages_walk_workers_in_order_and_end_with_no_cursor() {
        let (_, t, _) = daemon(
            vec![
                (0..5).map(info).collect(),
                vec![],
                (0..3).map(info).collect(),
            ],
            &[],
        );
        let all = FlowFilter::default();
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = t.flows(&all, after, 2).unwrap();
            pages += 1;
            assert!(page.flows.len() <= 2);
            seen.extend(page.flows.iter().map(|e| (e.worker, e.info.id)));
            match page.next {
                Some(c) => after = Some(c),
                None => break,
            }
            assert!(pages < 20, "paging ends");
        }
        let want: Vec<(u16, u32)> = (0..5)
            .map(|i| (0, i))
            .chain((0..3).map(|i| (2, i)))
            .collect();
        assert_eq!(seen, want, "every flow once, in (worker, id) order");
        // One page holding everything has no next page.
        let page = t.flows(&all, None, 100).unwrap();
        assert_eq!(page.flows.len(), 8);
        assert_eq!(page.next, None);
        assert_eq!(page.now, 5);
    }

    /// Flows spread over a table larger than one walk: each query walks a bounded number of
    /// slots, pages come back short with a cursor, and the listing still sees every flow
    /// once, filtered or not.
    #[test]
    fn flow_listing_resumes_where_a_bounded_walk_stopped() {
        let qs = crate::handler::QUERY_SLOTS;
        let ids = [0, 7, qs - 1, qs, qs + 5, 2 * qs + 9, 6 * qs + 2, 8 * qs - 1];
        // Tables of eight walks: more than one page may ask a worker for.
        let (_, t, _) = daemon_with(
            vec![ids.iter().map(|&i| info(i)).collect(), vec![info(qs + 1)]],
            &[],
            8 * qs,
        );
        let odd_ports = FlowFilter {
            client: Some(Addr::from_v4_bytes([198, 18, 0, 10])),
            ..FlowFilter::default()
        };
        for (filter, limit) in [(FlowFilter::default(), 2), (odd_ports, 100)] {
            let mut seen = Vec::new();
            let mut after = None;
            let mut requests = 0;
            loop {
                let page = t.flows(&filter, after, limit).unwrap();
                requests += 1;
                assert!(page.flows.len() <= limit);
                seen.extend(page.flows.iter().map(|e| (e.worker, e.info.id)));
                match page.next {
                    Some(c) => after = Some(c),
                    None => break,
                }
                assert!(requests < 30, "paging ends");
            }
            let want: Vec<(u16, u32)> = ids.iter().map(|&i| (0, i)).chain([(1, qs + 1)]).collect();
            assert_eq!(seen, want, "limit {limit}");
            assert!(requests >= 2, "bounded walks: {requests} requests");
        }
    }

    #[test]
    fn snat_usage_sums_the_workers_shares() {
        let config = Config::from_toml_str(
            r#"
[[frontends]]
name = "snat"
address = "198.19.0.100"
kind = "public"
[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }]
[[outbound_rules]]
name = "out"
frontends = ["snat"]
backend_pool = "web"
protocol = "TCP"
"#,
        )
        .unwrap();
        let rs = compile(&config, None, &MemberHealth::default(), 1).unwrap();
        let rule = rs.rules().next().unwrap().0;
        let usage = |allocated, used| SnatUsage {
            rule,
            proto: 6,
            member: "198.18.1.11".parse().unwrap(),
            allocated,
            used,
        };
        let snap = |w, u| Snapshot {
            worker: w,
            counters: Default::default(),
            flows: 0,
            flow_capacity: 1,
            handed_off: 0,
            handoff_dropped: 0,
            generation: 1,
            snat: vec![u],
            loop_latency: crate::handler::loop_histogram(),
            next_hops: Default::default(),
        };
        let sum = sum_snat(&[snap(0, usage(512, 3)), snap(1, usage(512, 4))]);
        assert_eq!(sum, vec![usage(1024, 7)]);
    }
}
