//! The daemon's side of the control API (`xlb-api`) and what it reads from the workers:
//! [`Shared`] holds every worker's counter cell ([`cell`]) and port counters, the generations
//! the workers acknowledged and the events; [`publisher::WorkerPublisher`] pushes a new rule
//! set to every worker and waits for every acknowledgement; [`telemetry::DaemonTelemetry`]
//! answers counters, flows, events and status.
//!
//! Workers never share state with the control thread: rule sets go to them as `Arc`s over
//! their bounded channel, they answer over channels (acks, flow pages) and publish their
//! counters into their cell. Readers (the control loop, the API, the metrics endpoint) read
//! the cells; none of them ever waits for a worker.

pub mod cell;
pub mod publisher;
pub mod telemetry;
#[cfg(test)]
mod tests;

use std::{
    sync::{atomic::AtomicU64, Arc, Mutex, OnceLock, PoisonError},
    time::{Instant, SystemTime},
};

use hdrhistogram::Histogram;
use tokio::sync::broadcast;
use xlb_afxdp::{PortStats, WorkerStats};
use xlb_api::{
    ControlEvent, CounterSum, DrainStatus, EventRecord, FastPathCounters, NatLogStatus, SnatUsage,
    WorkerCounters,
};
use xlb_engine::RuleSet;

use crate::fast_path::FastCounters;
use xlb_engine::drain::DrainProgress;

use cell::{CellReader, WorkerSnapshot};

/// What the control side knows of the workers, shared by the control loop, the API and the
/// metrics endpoint.
#[derive(Debug)]
pub struct Shared {
    /// Every worker's counter cell, in worker order.
    cells: Mutex<Vec<CellReader>>,
    /// Every worker's port counters (the AF_XDP loop's atomics), in worker order.
    ports: Vec<Arc<WorkerStats>>,
    /// Engine events, for `WatchEvents`.
    pub events: broadcast::Sender<EventRecord>,
    /// Generation each worker acknowledged last.
    pub applied: Vec<AtomicU64>,
    /// Rule-set propagation times (publish → every worker acknowledged), in microseconds.
    pub propagation: Mutex<Histogram<u64>>,
    pub started: Instant,
    /// Data-path availability per probed rule (empty without the self-probe).
    pub datapath: Mutex<Vec<crate::selfprobe::Availability>>,
    /// This node's cluster state (`None` unless xlbd runs as a cluster node), written by the
    /// control loop every tick.
    pub cluster: Mutex<Option<xlb_api::ClusterStatus>>,
    /// A drain asked for through the API (drain?, deadline), taken by the control loop.
    pub drain_request: Mutex<Option<(bool, Option<std::time::Duration>)>>,
    /// The NAT event export's figures (`None` when it is off), kept by its thread
    /// (`crate::ipfix`).
    pub nat_log: Mutex<Option<NatLogStatus>>,
    /// The XDP program's fast-path counters, once set.
    fast: OnceLock<Arc<FastCounters>>,
    /// What the big memory runs on (`--huge-pages`), once the workers run.
    huge_pages: OnceLock<crate::huge_pages::HugePages>,
}

impl Shared {
    /// Over the workers' cells (one per worker, in order) and port counters.
    pub fn new(
        cells: Vec<CellReader>,
        ports: Vec<Arc<WorkerStats>>,
        generation: u64,
    ) -> Arc<Shared> {
        let (events, _) = broadcast::channel(1024);
        let workers = cells.len();
        Arc::new(Shared {
            cells: Mutex::new(cells),
            ports,
            events,
            applied: (0..workers).map(|_| AtomicU64::new(generation)).collect(),
            propagation: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("constant, valid bounds"),
            ),
            started: Instant::now(),
            datapath: Mutex::new(Vec::new()),
            cluster: Mutex::new(None),
            drain_request: Mutex::new(None),
            nat_log: Mutex::new(None),
            fast: OnceLock::new(),
            huge_pages: OnceLock::new(),
        })
    }

    /// Where the XDP program's fast-path counters are read (set once, at start).
    pub fn set_fast(&self, fast: Arc<FastCounters>) {
        let _ = self.fast.set(fast);
    }

    /// What the engines' tables and the UMEMs run on (set once, at start).
    pub fn set_huge_pages(&self, h: crate::huge_pages::HugePages) {
        let _ = self.huge_pages.set(h);
    }

    /// The XDP program's fast-path counters for `rules`, when they can be read.
    pub fn fast_counters(&self, rules: &RuleSet) -> Option<FastPathCounters> {
        self.fast.get()?.read(rules)
    }

    /// Every worker's counters added up, with what XDP forwarded for each rule: the sum
    /// that the status line, the stats file and Prometheus render.
    pub fn sum(&self, rules: &RuleSet) -> CounterSum {
        let mut sum = xlb_api::sum(&self.counters(), rules);
        sum.add_fast(self.fast_counters(rules).as_ref());
        sum
    }

    pub fn workers(&self) -> usize {
        self.applied.len()
    }

    /// The latest snapshot of every worker that has published, in worker order.
    pub fn snapshots(&self) -> Vec<WorkerSnapshot> {
        self.cells
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter_mut()
            .map(|c| c.read())
            .filter(|s| s.published())
            .cloned()
            .collect()
    }

    /// The latest counters of every worker that has published: what [`xlb_api::sum`] adds up.
    pub fn counters(&self) -> Vec<WorkerCounters> {
        self.snapshots().into_iter().map(|s| s.counters).collect()
    }

    /// Every drain's progress, summed over the workers' latest snapshots (a worker that has
    /// not published yet counts as not having counted).
    pub fn drains(&self) -> Vec<DrainStatus> {
        let mut cells = self.cells.lock().unwrap_or_else(PoisonError::into_inner);
        let lists: Vec<&[DrainProgress]> = cells
            .iter_mut()
            .map(|c| {
                let s = c.read();
                if s.published() {
                    &s.drains[..]
                } else {
                    &[][..]
                }
            })
            .collect();
        xlb_api::sum_drains(&lists)
    }

    /// The NAT event export's figures, when it runs: the exporter's, plus what the workers
    /// lost before their events reached it.
    pub fn nat_log_status(&self) -> Option<NatLogStatus> {
        let mut s = self
            .nat_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        s.records_lost += (self.snapshots().iter())
            .map(|w| w.nat_events_lost)
            .sum::<u64>();
        Some(s)
    }

    /// What the status line and the stats file show beside the counters.
    pub fn operations(&self) -> crate::stats::Operations {
        crate::stats::Operations {
            drains: self.drains(),
            nat_log: self.nat_log_status(),
            cluster_sync: (self.cluster.lock())
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .and_then(|c| c.sync.clone()),
            huge_pages: (self.huge_pages.get())
                .map(|h| (h.clone(), xlb_afxdp::huge::anon_huge_bytes().ok())),
        }
    }

    /// Every worker's port counters, per port in `--interface` order.
    pub fn ports(&self) -> Vec<Vec<PortStats>> {
        self.ports.iter().map(|s| s.ports()).collect()
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

/// Sums SNAT usage over workers: each worker holds a share of every member's blocks.
pub fn sum_snat(snaps: &[WorkerSnapshot]) -> Vec<SnatUsage> {
    let mut out: Vec<SnatUsage> = Vec::new();
    for u in snaps.iter().flat_map(|s| &s.snat) {
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
    out.sort_by_key(|u| (u.rule, u.member, u.proto));
    out
}
