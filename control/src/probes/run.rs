//! Where the probes run: the probe task on xlbd's tokio runtime, and the `xlbd-health` thread
//! that records verdict flips (see the module notes of [`super`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Instant, SystemTime},
};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use tokio::runtime::Handle;
use xlb_api::{ControlEvent, ControlState, EventRecord};

use super::{probe_once, ProbeSpec, TargetKey, Tracker, RECONCILE_EVERY, RETRY_EVERY};
use crate::{plane::Shared, report};

/// What the probe thread tells the health thread.
#[derive(Debug)]
pub(super) enum Msg {
    /// A target's verdict flipped.
    Flip {
        key: TargetKey,
        healthy: bool,
        why: String,
    },
    /// A target is no longer probed (rule, probe or member removed, or its probe changed
    /// pool).
    Gone(TargetKey),
}

/// The running probes: a task on the daemon's runtime, and the health thread.
#[derive(Debug)]
pub struct Probes {
    stop: Arc<AtomicBool>,
    runtime: Handle,
    probe: tokio::task::JoinHandle<()>,
    health: JoinHandle<()>,
}

impl Probes {
    /// Starts probing the targets of the committed configuration, following its changes,
    /// on `runtime`.
    pub fn spawn(
        runtime: &Handle,
        state: Arc<ControlState>,
        shared: Arc<Shared>,
        quiet: bool,
    ) -> io::Result<Probes> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel::unbounded();
        let probe = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            runtime.spawn(async move { probe_loop(&state, &stop, tx).await })
        };
        let health = std::thread::Builder::new()
            .name("xlbd-health".into())
            .spawn(move || health_loop(&state, &shared, quiet, &rx))?;
        Ok(Probes {
            stop,
            runtime: runtime.clone(),
            probe,
            health,
        })
    }

    /// Stops probing; returns once the task and the thread are gone (at most one attempt's
    /// timeout plus one publish).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.runtime.block_on(self.probe);
        let _ = self.health.join();
    }
}

pub(super) struct Target {
    pub(super) spec: ProbeSpec,
    pub(super) tracker: Tracker,
    pub(super) next_at: Instant,
    /// Bumped when the spec changes: answers of older attempts are ignored.
    pub(super) epoch: u64,
    pub(super) in_flight: bool,
    pub(super) last_error: Option<String>,
}

async fn probe_loop(state: &ControlState, stop: &AtomicBool, tx: Sender<Msg>) {
    let mut targets: HashMap<TargetKey, Target> = HashMap::new();
    let mut attempts = tokio::task::JoinSet::new();
    let mut seen_generation = None;
    let mut next_reconcile = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_reconcile {
            next_reconcile = now + RECONCILE_EVERY;
            let snap = state.snapshot();
            if seen_generation != Some(snap.generation) {
                seen_generation = Some(snap.generation);
                // A changed configuration may name a CA file whose contents changed too.
                super::tls::forget_configs();
                reconcile(&mut targets, super::targets(&snap.config), now, &tx);
            }
        }
        for (key, t) in targets.iter_mut() {
            if t.in_flight || t.next_at > now {
                continue;
            }
            t.in_flight = true;
            // The next attempt: one interval after this one started (or when it ends).
            t.next_at = now + t.spec.interval;
            let (key, spec, epoch) = (key.clone(), t.spec.clone(), t.epoch);
            attempts.spawn(async move {
                let r = probe_once(&spec, key.member).await;
                (key, epoch, r)
            });
        }
        let wake = targets
            .values()
            .filter(|t| !t.in_flight)
            .map(|t| t.next_at)
            .chain([next_reconcile])
            .min()
            .unwrap_or(next_reconcile);
        tokio::select! {
            Some(Ok((key, epoch, result))) = attempts.join_next(), if !attempts.is_empty() => {
                record(&mut targets, key, epoch, result, &tx);
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    // Dropping `attempts` aborts the attempts in flight; dropping `tx` ends the health thread.
}

/// Records an attempt's result; a verdict that flips goes to the health thread.
fn record(
    targets: &mut HashMap<TargetKey, Target>,
    key: TargetKey,
    epoch: u64,
    result: Result<(), String>,
    tx: &Sender<Msg>,
) {
    let Some(t) = targets.get_mut(&key) else {
        return;
    };
    if t.epoch != epoch {
        return;
    }
    t.in_flight = false;
    let ok = result.is_ok();
    if let Err(e) = result {
        t.last_error = Some(e);
    }
    if let Some(healthy) = t.tracker.record(ok, t.spec.threshold) {
        let why = if healthy {
            "probe succeeded".to_string()
        } else {
            format!(
                "{} consecutive failures, last: {}",
                t.spec.threshold,
                t.last_error.as_deref().unwrap_or("?")
            )
        };
        let _ = tx.send(Msg::Flip { key, healthy, why });
    }
}

/// Brings the running targets in line with `want`: new ones start healthy with their first
/// attempt spread over their first interval, changed ones keep their verdict, removed ones
/// are reported gone.
pub(super) fn reconcile(
    targets: &mut HashMap<TargetKey, Target>,
    want: BTreeMap<TargetKey, ProbeSpec>,
    now: Instant,
    tx: &Sender<Msg>,
) {
    let gone: Vec<TargetKey> = targets
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for k in gone {
        targets.remove(&k);
        let _ = tx.send(Msg::Gone(k));
    }
    let n = want.len().max(1) as u32;
    for (i, (key, spec)) in want.into_iter().enumerate() {
        match targets.get_mut(&key) {
            Some(t) if t.spec == spec => {}
            Some(t) => {
                t.epoch += 1;
                t.in_flight = false;
                t.next_at = now;
                t.spec = spec;
            }
            None => {
                let offset = spec.interval / n * i as u32;
                targets.insert(
                    key,
                    Target {
                        spec,
                        tracker: Tracker::new(),
                        next_at: now + offset,
                        epoch: 0,
                        in_flight: false,
                        last_error: None,
                    },
                );
            }
        }
    }
}

/// Member health as probes see it: `verdicts` per target, combined per (pool, member).
#[derive(Debug, Default)]
pub struct Verdicts {
    verdicts: BTreeMap<TargetKey, bool>,
}

impl Verdicts {
    pub fn set(&mut self, key: TargetKey, healthy: bool) {
        self.verdicts.insert(key, healthy);
    }

    pub fn remove(&mut self, key: &TargetKey) {
        self.verdicts.remove(key);
    }

    /// Healthy while every probe that covers (pool, member) passes (and when none does).
    pub fn healthy(&self, pool: &str, member: IpAddr) -> bool {
        self.verdicts
            .iter()
            .filter(|(k, _)| k.pool == pool && k.member == member)
            .all(|(_, h)| *h)
    }
}

/// The health thread's state: the probes' verdicts and what the committed health says.
struct Health<'a> {
    state: &'a ControlState,
    shared: &'a Shared,
    quiet: bool,
    verdicts: Verdicts,
    /// What the committed `MemberHealth` says for the (pool, member) pairs probes touched.
    applied: BTreeMap<(String, IpAddr), bool>,
    /// Pairs whose verdict may differ from the committed one.
    pending: BTreeSet<(String, IpAddr)>,
}

impl Health<'_> {
    /// Takes the messages in; returns the flips, to announce.
    fn take(&mut self, batch: Vec<Msg>) -> Vec<(TargetKey, bool, String)> {
        let mut flips = Vec::new();
        for m in batch {
            match m {
                Msg::Flip { key, healthy, why } => {
                    self.verdicts.set(key.clone(), healthy);
                    self.pending.insert((key.pool.clone(), key.member));
                    flips.push((key, healthy, why));
                }
                Msg::Gone(key) => {
                    self.verdicts.remove(&key);
                    self.pending.insert((key.pool.clone(), key.member));
                }
            }
        }
        flips
    }

    /// Publishes the pending changes as one generation (none if nothing changes); on failure
    /// they stay pending, unless `stopping`.
    fn apply(&mut self, stopping: bool) -> Option<u64> {
        let changes: Vec<(String, IpAddr, bool)> = self
            .pending
            .iter()
            .map(|(pool, m)| (pool.clone(), *m, self.verdicts.healthy(pool, *m)))
            .filter(|(pool, m, h)| {
                let committed = self.applied.get(&(pool.clone(), *m)).copied();
                committed.unwrap_or(true) != *h
            })
            .collect();
        if changes.is_empty() {
            self.pending.clear();
            return None;
        }
        let published = self.state.update_health(|h| {
            for (pool, m, healthy) in &changes {
                h.set_healthy(pool, *m, *healthy);
            }
        });
        match published {
            Ok(g) => {
                for (pool, m, healthy) in changes {
                    if healthy {
                        self.applied.remove(&(pool, m));
                    } else {
                        self.applied.insert((pool, m), false);
                    }
                }
                self.pending.clear();
                Some(g)
            }
            Err(e) => {
                tracing::warn!("recording probe verdicts: {e}; retrying");
                if stopping {
                    // The workers may be gone; give up.
                    self.pending.clear();
                }
                None
            }
        }
    }

    /// The `xlbd event probe_state` line and the API event of each flip.
    fn announce(&self, flips: Vec<(TargetKey, bool, String)>, generation: Option<u64>) {
        for (key, healthy, why) in flips {
            if !self.quiet {
                report::line(&format!(
                    "xlbd event probe_state probe={} pool={} member={} state={} generation={} \
                     why=\"{why}\"",
                    key.probe,
                    key.pool,
                    key.member,
                    if healthy { "up" } else { "down" },
                    generation.map_or_else(|| "-".to_string(), |g| g.to_string()),
                ));
            }
            let _ = self.shared.events.send(EventRecord {
                at: SystemTime::now(),
                event: ControlEvent::ProbeStateChanged {
                    probe: key.probe,
                    pool: key.pool,
                    member: key.member,
                    healthy,
                },
            });
        }
    }
}

/// Takes the verdict flips in order and records them (see the module notes), until the probe
/// task is gone and nothing is pending.
pub(super) fn health_loop(state: &ControlState, shared: &Shared, quiet: bool, rx: &Receiver<Msg>) {
    let mut health = Health {
        state,
        shared,
        quiet,
        verdicts: Verdicts::default(),
        applied: BTreeMap::new(),
        pending: BTreeSet::new(),
    };
    let mut connected = true;
    while connected || !health.pending.is_empty() {
        let mut batch = Vec::new();
        match rx.recv_timeout(RETRY_EVERY) {
            Ok(m) => batch.push(m),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => connected = false,
        }
        batch.extend(rx.try_iter());
        let flips = health.take(batch);
        let generation = health.apply(!connected);
        health.announce(flips, generation);
    }
}
