//! [`WorkerPublisher`]: the [`Publisher`] that pushes a new rule set to every worker over its
//! bounded channel and waits for every acknowledgement, keeping the XDP program's addresses
//! in the same generation.

use std::{
    collections::HashSet,
    sync::{atomic::Ordering, Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use crossbeam::channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};
use xlb_api::{PublishError, Publisher};
use xlb_engine::{RuleId, RuleSet};

use super::Shared;
use crate::addresses::AddressPlane;
use crate::messages::{Ack, BackendSide, ToWorker};

/// Sends rule sets to the workers and waits for their acks. [`xlb_api::ControlState`] calls
/// it one change at a time, from a blocking thread.
///
/// With an [`AddressPlane`], the XDP program's owned addresses and backend-side interfaces
/// change with the same generation: a call returns `Ok` only once the maps and every worker
/// agree, and on any failure the maps are put back as they were.
#[derive(Debug)]
pub struct WorkerPublisher {
    pub(super) to: Vec<Sender<ToWorker>>,
    pub(super) acks: Mutex<Receiver<Ack>>,
    pub(super) shared: Arc<Shared>,
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
            return self.publish_to_workers(rules, None, deadline);
        };
        let mut addresses = addresses.lock().unwrap_or_else(PoisonError::into_inner);
        let pending = addresses.begin(&rules).map_err(|e| {
            PublishError::Unavailable(format!("updating the XDP program's addresses: {e}"))
        })?;
        // The engines' backend-side ports switch with the rules, in the same generation.
        let backend_side = addresses.ports_of(pending.backend_side());
        if let Err(e) = self.publish_to_workers(Arc::clone(&rules), Some(backend_side), deadline) {
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
        let snaps = self.shared.counters();
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
        backend_side: Option<BackendSide>,
        deadline: Duration,
    ) -> Result<(), PublishError> {
        let generation = rules.generation();
        let started = Instant::now();
        let until = started + deadline;
        let acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut missing: Vec<u16> = Vec::new();
        for (w, tx) in self.to.iter().enumerate() {
            let msg = ToWorker::Rules(Arc::clone(&rules), backend_side.clone());
            match tx.send_deadline(msg, until) {
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
