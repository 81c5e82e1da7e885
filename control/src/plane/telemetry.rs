//! [`DaemonTelemetry`]: the API's reads from the workers — counters and SNAT usage from their
//! cells, pages of flows by asking each worker, events, status.

use std::{
    sync::{atomic::Ordering, Arc, PoisonError},
    time::{Duration, Instant},
};

use crossbeam::channel::{self, Sender};
use tokio::sync::broadcast;
use xlb_api::{
    CountersSnapshot, EventRecord, FlowCursor, FlowEntry, FlowFilter, FlowPage, RuntimeStatus,
    Telemetry, TelemetryError, WorkerStatus,
};

use super::{sum_snat, Shared};
use crate::messages::{FlowAnswer, FlowQuery, ToWorker};

/// How long a telemetry read waits for a worker's answer.
const WORKER_ANSWER: Duration = Duration::from_secs(2);
/// Flow queries one listing page may send to one worker beyond the first (each walks at most
/// `messages::QUERY_SLOTS` slots); a page that needs more goes back short, with its cursor.
/// With xlbd's default table (65 536 flows per worker) one page can walk a whole worker.
const MAX_QUERIES_PER_PAGE: usize = 4;

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
    /// The committed rules, for the XDP program's per-rule counters (`None`: not shown).
    state: Option<Arc<xlb_api::ControlState>>,
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
            state: None,
        }
    }

    /// Shows the XDP fast path's counters with the workers', per rule of `state`'s rules.
    pub fn with_rules(mut self, state: Arc<xlb_api::ControlState>) -> Self {
        self.state = Some(state);
        self
    }

    fn ask_flows(
        &self,
        w: usize,
        filter: &FlowFilter,
        after: Option<u32>,
        limit: usize,
    ) -> Result<FlowAnswer, TelemetryError> {
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

impl DaemonTelemetry {
    /// Adds worker `w`'s flows after `from` to `page`; the cursor to go on from when the page
    /// has to stop inside this worker (full, or the bounded walks ran out).
    fn page_from(
        &self,
        w: usize,
        filter: &FlowFilter,
        mut from: Option<u32>,
        limit: usize,
        page: &mut FlowPage,
    ) -> Result<Option<FlowCursor>, TelemetryError> {
        for queries in 1..=MAX_QUERIES_PER_PAGE {
            let want = limit - page.flows.len();
            let answer = self.ask_flows(w, filter, from, want)?;
            if page.now == 0 {
                page.now = answer.now;
            }
            page.flows
                .extend(answer.flows.into_iter().map(|info| FlowEntry {
                    worker: w as u16,
                    info,
                }));
            let Some(slot) = answer.more else {
                return Ok(None);
            };
            // The worker has more after `slot`: its walk is bounded (a query costs it at most
            // `QUERY_SLOTS` slots), so ask again, a bounded number of times per page and
            // worker; past that the page goes back short, with the cursor.
            if page.flows.len() >= limit || queries == MAX_QUERIES_PER_PAGE {
                return Ok(Some(FlowCursor {
                    worker: w as u16,
                    flow: slot,
                }));
            }
            from = Some(slot);
        }
        Ok(None)
    }
}

impl Telemetry for DaemonTelemetry {
    fn counters(&self) -> Result<CountersSnapshot, TelemetryError> {
        let snaps = self.shared.snapshots();
        Ok(CountersSnapshot {
            workers: snaps.iter().map(|s| s.counters.clone()).collect(),
            snat: sum_snat(&snaps),
            fast: (self.state.as_ref())
                .and_then(|s| self.shared.fast_counters(&s.snapshot().rules)),
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
        for w in first..self.to.len() {
            let from = after.filter(|c| usize::from(c.worker) == w).map(|c| c.flow);
            if let Some(next) = self.page_from(w, filter, from, limit, &mut page)? {
                page.next = Some(next);
                break;
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
        let snaps = self.shared.counters();
        let workers = self
            .placement
            .iter()
            .enumerate()
            .map(|(w, p)| {
                let snap = snaps.iter().find(|s| usize::from(s.worker) == w);
                WorkerStatus {
                    worker: w as u16,
                    interface: p.interfaces.clone(),
                    queue: p.first_queue,
                    core: p.core,
                    generation: self.shared.applied[w].load(Ordering::Relaxed),
                    flows: snap.map_or(0, |s| s.flows),
                    flow_capacity: snap.map_or(0, |s| s.flow_capacity),
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
            cluster: self
                .shared
                .cluster
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            drains: self.shared.drains(),
            nat_log: self.shared.nat_log_status(),
        })
    }

    fn set_drain(
        &self,
        drain: bool,
        deadline: Option<std::time::Duration>,
    ) -> Option<xlb_api::ClusterStatus> {
        let cluster = || {
            self.shared
                .cluster
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        };
        cluster()?;
        *self
            .shared
            .drain_request
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((drain, deadline));
        // The control loop takes it within a tick (20 ms); answer with the state it made.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(500);
        while std::time::Instant::now() < until {
            let pending = self
                .shared
                .drain_request
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some();
            if !pending && cluster().is_some_and(|c| c.draining == drain) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        cluster()
    }
}
