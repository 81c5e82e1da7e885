//! The control loop (20 ms tick): worker events and neighbour misses in; the kernel's
//! neighbour and route notifications applied and published to the workers' mailbox
//! (`crate::kernel_watch`); neighbours the kernel dropped and members added live resolved
//! again at once; the self-probe's rounds; the status line and the stats file from the one sum
//! of the workers' counters.

use std::{
    sync::{atomic::AtomicBool, atomic::Ordering, Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use xlb_api::ControlState;
use xlb_engine::Addr;

use crate::{
    addresses::{AddressPlane, SharedRoutes},
    cluster::{Cluster, Inputs},
    drain::{self, DrainWatcher},
    messages::{FromWorker, ToWorker},
    options::Options,
    plane::Shared,
    preflight::SelfProbe,
    report,
    sd_notify::Supervisor,
    startup::Kernel,
    stats,
    workers::Workers,
};

const TICK: Duration = Duration::from_millis(20);
const STATS_FILE_EVERY: Duration = Duration::from_millis(250);
const KERNEL_WARNING_EVERY: Duration = Duration::from_secs(5);
/// How often the slowest grace is looked at, and how long a warning about it holds.
const GRACE_CHECK_EVERY: Duration = Duration::from_secs(1);
const GRACE_WARNING_EVERY: Duration = Duration::from_secs(600);
/// A grace slower than this makes resets on idle of XDP-forwarded flows late enough to say so.
const SLOW_GRACE_NS: u64 = 500_000_000;

/// The address plane and the routes it reads, as the control loop sees them.
#[derive(Debug)]
pub struct LiveAddresses {
    pub plane: Arc<Mutex<AddressPlane>>,
    pub routes: SharedRoutes,
}

/// The control thread's loop and what it remembers between ticks.
#[derive(Debug)]
pub struct ControlLoop<'a> {
    opts: &'a Options,
    scale: u32,
    state: &'a ControlState,
    shared: &'a Shared,
    kernel: &'a mut Kernel,
    live: LiveAddresses,
    workers: &'a Workers,
    signalled: &'a AtomicBool,
    self_probe: Option<&'a mut SelfProbe>,
    cluster: Option<&'a mut Cluster>,
    /// Workers still to be told of a cluster membership change (their channel was full).
    cluster_untold: Vec<usize>,
    supervisor: &'a mut Supervisor,
    started: Instant,
    next_status: Instant,
    next_stats_file: Instant,
    next_kernel_warning: Instant,
    next_grace_check: Instant,
    /// The slowest grace last warned about, and when.
    grace_told: Option<(u64, Instant)>,
    /// Resyncs of the kernel watch seen (each is told as an event line).
    resyncs: u64,
    /// The routes' version the backend-side marks were computed from.
    routes_version: u64,
    /// Backend-side marks to recompute after a route change (when no change is being
    /// published).
    marks_stale: bool,
    members_probed_at: u64,
    drains: DrainWatcher,
}

/// What the loop works with.
#[derive(Debug)]
pub struct Parts<'a> {
    pub state: &'a ControlState,
    pub shared: &'a Shared,
    pub kernel: &'a mut Kernel,
    pub live: LiveAddresses,
    pub workers: &'a Workers,
    /// Set by SIGINT / SIGTERM.
    pub signalled: &'a AtomicBool,
    pub self_probe: Option<&'a mut SelfProbe>,
    pub cluster: Option<&'a mut Cluster>,
    /// The service manager's watchdog and status.
    pub supervisor: &'a mut Supervisor,
}

impl<'a> ControlLoop<'a> {
    pub fn new(opts: &'a Options, p: Parts<'a>) -> ControlLoop<'a> {
        let now = Instant::now();
        let resyncs = p.kernel.watch.stats().resyncs;
        let routes_version = p.kernel.watch.view().routes_version;
        ControlLoop {
            opts,
            scale: p.state.snapshot().config.settings.lab_time_scale.max(1),
            state: p.state,
            shared: p.shared,
            kernel: p.kernel,
            live: p.live,
            workers: p.workers,
            signalled: p.signalled,
            self_probe: p.self_probe,
            cluster: p.cluster,
            cluster_untold: Vec::new(),
            supervisor: p.supervisor,
            started: now,
            next_status: now + opts.status_interval,
            next_stats_file: now,
            next_kernel_warning: now,
            next_grace_check: now,
            grace_told: None,
            resyncs,
            routes_version,
            marks_stale: false,
            members_probed_at: 0,
            drains: DrainWatcher::default(),
        }
    }

    /// Runs until signalled or `--max-runtime`; an error when a worker stopped by itself.
    pub fn run(mut self) -> Result<(), String> {
        while !self.signalled.load(Ordering::Relaxed) {
            if self
                .opts
                .max_runtime
                .is_some_and(|d| self.started.elapsed() >= d)
            {
                tracing::info!("--max-runtime reached, stopping");
                break;
            }
            if let Some(w) = self
                .workers
                .handles
                .iter()
                .position(|h| h.join.is_finished())
            {
                return Err(format!("worker {w} stopped unexpectedly"));
            }
            self.follow_configuration();
            self.take_messages(Instant::now() + TICK);
            self.self_probe_round();
            self.cluster_tick();
            self.follow_drains();
            let now = Instant::now();
            self.follow_kernel(now);
            self.stats_file(now);
            self.status_line(now);
            self.watch_grace(now);
            self.supervisor.tick(self.state, self.shared);
        }
        Ok(())
    }

    /// Members added live get their neighbours resolved before the first SYN needs them;
    /// backend-side marks follow route changes.
    fn follow_configuration(&mut self) {
        let generation = self.state.generation();
        if generation != self.members_probed_at {
            self.members_probed_at = generation;
            for m in self.state.snapshot().rules.member_addrs() {
                self.kernel.resolver.probe(*m);
            }
        }
        if self.marks_stale {
            // try_lock: a publish in flight holds the plane, and recomputes the marks itself.
            if let Ok(mut plane) = self.live.plane.try_lock() {
                self.marks_stale = false;
                if let Err(e) = plane.apply_now(&self.state.snapshot().rules) {
                    tracing::warn!("backend-side interfaces after a route change: {e}");
                } else {
                    // The engines follow the maps; sent while the plane is held, so that a
                    // publish (which sends its own marks with its rules) comes after. A full
                    // channel: sent again at the next tick.
                    let ports = plane.ports_of(&plane.applied().backend_side);
                    for h in &self.workers.handles {
                        if h.to
                            .try_send(ToWorker::BackendSide(Arc::clone(&ports)))
                            .is_err()
                        {
                            self.marks_stale = true;
                        }
                    }
                }
            }
        }
    }

    /// Worker messages until `wake`.
    fn take_messages(&mut self, wake: Instant) {
        while let Ok(msg) = self.workers.from.recv_deadline(wake) {
            match msg {
                FromWorker::Misses(list) => {
                    // The kernel resolves them; the entries arrive as notifications.
                    for a in list {
                        self.kernel.resolver.probe(a);
                    }
                }
                FromWorker::Event(w, e) => {
                    if !self.opts.quiet {
                        report::line(&report::event_line(w, &e, &self.state.snapshot().rules));
                    }
                    self.shared.event(w, e);
                }
                FromWorker::ProbeAnswer { source, port, ok } => {
                    if let Some(p) = self.self_probe.as_deref_mut() {
                        p.prober.answered(source, port, ok);
                    }
                }
            }
        }
    }

    /// Drains' progress as `xlbd event drain …` lines and `WatchEvents` events.
    fn follow_drains(&mut self) {
        let events = self.drains.tick(
            Instant::now(),
            &self.state.snapshot(),
            &self.shared.drains(),
            self.state.now(),
        );
        for e in events {
            if !self.opts.quiet {
                report::line(&format!("xlbd event {}", drain::describe(&e)));
            }
            let _ = self.shared.events.send(xlb_api::EventRecord {
                at: std::time::SystemTime::now(),
                event: xlb_api::ControlEvent::Drain(e),
            });
        }
    }

    fn self_probe_round(&mut self) {
        // A drained node sends no probes: their flows would keep it from ever being empty.
        if (self.cluster.as_deref()).is_some_and(|c| c.status().draining) {
            return;
        }
        let Some(p) = self.self_probe.as_deref_mut() else {
            return;
        };
        let snap = self.state.snapshot();
        let workers = &self.workers.handles;
        let round = p.prober.round(
            Instant::now(),
            &snap.config,
            &snap.rules,
            workers.len(),
            p.ingress,
            p.mac,
        );
        for (w, inj) in round {
            // A worker whose channel is full does not answer: the probe fails, as it should
            // (that worker is not keeping up).
            let _ = workers[w].to.try_send(ToWorker::Probe(inj));
        }
        *self
            .shared
            .datapath
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = p.prober.report();
    }

    /// The cluster node's tick: drain requests in, fitness, announcement, heartbeats; a change
    /// of the announcing nodes goes to every worker.
    fn cluster_tick(&mut self) {
        let Some(cluster) = self.cluster.as_deref_mut() else {
            return;
        };
        let now = Instant::now();
        let request = self
            .shared
            .drain_request
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((drain, deadline)) = request {
            cluster.set_drain(drain, deadline, now);
        }
        let snap = self.state.snapshot();
        let generation = self.state.generation();
        let workers_behind: Vec<usize> = (self.shared.applied.iter().enumerate())
            .filter(|(_, g)| g.load(Ordering::Relaxed) != generation)
            .map(|(w, _)| w)
            .collect();
        let flows = self.shared.counters().iter().map(|c| c.flows).sum();
        let inputs = Inputs {
            config: &snap.config,
            workers_behind,
            rules: snap.rules.rules().count(),
            self_probe: self
                .self_probe
                .as_deref()
                .map_or(Ok(()), |p| p.prober.passing()),
            flows,
        };
        let tick = cluster.tick(now, &inputs);
        if tick.membership_changed {
            self.cluster_untold = (0..self.workers.handles.len()).collect();
        }
        // Never lost: a worker whose channel is full is told at a later tick (the settle time
        // is counted from when it hears it, so a late one withholds longer, never less).
        let settle = cluster.options().settle;
        let handles = &self.workers.handles;
        self.cluster_untold.retain(|&w| {
            handles[w]
                .to
                .try_send(ToWorker::ClusterChanged { settle })
                .is_err()
        });
        if !self.opts.quiet {
            for e in &tick.events {
                report::line(e);
            }
        }
        *self
            .shared
            .cluster
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(cluster.status().clone());
    }

    /// The kernel's notifications: neighbour and route changes published to every worker's
    /// mailbox (never lost); neighbours it dropped that the dataplane needs resolved again;
    /// backend-side marks recomputed after a route change.
    fn follow_kernel(&mut self, now: Instant) {
        if let Err(e) = self.kernel.watch.poll() {
            if now >= self.next_kernel_warning {
                self.next_kernel_warning = now + KERNEL_WARNING_EVERY;
                tracing::warn!("following the kernel's neighbours and routes: {e}");
            }
        }
        self.resolve_gone();
        let resyncs = self.kernel.watch.stats().resyncs;
        if resyncs != self.resyncs {
            self.resyncs = resyncs;
            if !self.opts.quiet {
                report::line(&format!(
                    "xlbd event kernel_resync resyncs={resyncs} why=\"netlink notifications \
                     were lost; neighbours, routes and links read again\""
                ));
            }
        }
        let routes_version = self.kernel.watch.view().routes_version;
        if routes_version != self.routes_version {
            // The backend-side interfaces depend on the routes to the members.
            self.routes_version = routes_version;
            *self
                .live
                .routes
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = self.kernel.watch.routes().to_vec();
            self.marks_stale = true;
        }
    }

    /// Members, NAT targets and gateways the kernel dropped (its garbage collector does not
    /// know the dataplane uses them): resolved again before a new flow needs them.
    fn resolve_gone(&mut self) {
        let gone = self.kernel.watch.take_gone();
        if !gone.is_empty() {
            let snap = self.state.snapshot();
            let routes = self.kernel.watch.routes();
            let needed = |a: &Addr| {
                snap.rules.member_addrs().contains(a)
                    || routes.iter().any(|r| r.gateway == Some(*a))
            };
            let wanted: Vec<Addr> = gone.into_iter().filter(|a| needed(a)).collect();
            for a in wanted {
                self.kernel.resolver.probe_soon(a);
            }
        }
        self.kernel.resolver.retry_deferred();
    }

    fn stats_file(&mut self, now: Instant) {
        if now < self.next_stats_file {
            return;
        }
        self.next_stats_file = now + STATS_FILE_EVERY;
        let Some(path) = &self.opts.stats_file else {
            return;
        };
        let rules = self.state.snapshot().rules.clone();
        let sum = self.shared.sum(&rules);
        let kv = stats::to_kv(&sum, &rules, self.scale) + &self.shared.operations().to_kv();
        if let Err(e) = stats::write_atomic(path, &kv) {
            tracing::warn!("writing {}: {e}", path.display());
        }
    }

    /// Warns when grace periods got slow (the host's RCU threads wait for CPU): resets on
    /// idle of XDP-forwarded flows are then late by up to that much.
    fn watch_grace(&mut self, now: Instant) {
        if now < self.next_grace_check {
            return;
        }
        self.next_grace_check = now + GRACE_CHECK_EVERY;
        let rules = self.state.snapshot().rules.clone();
        let Some(slowest) = self.shared.sum(&rules).fast.map(|f| f.grace_slowest_ns) else {
            return;
        };
        let told = self.grace_told.map(|(ns, at)| (ns, now.duration_since(at)));
        if let Some(msg) = slow_grace_warning(slowest, told) {
            tracing::warn!("{msg}");
            self.grace_told = Some((slowest, now));
        }
    }

    fn status_line(&mut self, now: Instant) {
        if now < self.next_status {
            return;
        }
        self.next_status = now + self.opts.status_interval;
        if self.opts.quiet {
            return;
        }
        let rules = self.state.snapshot().rules.clone();
        let sum = self.shared.sum(&rules);
        let ports: Vec<String> = (self.shared.ports().into_iter().flatten())
            .zip(self.kernel.ports.iter().cycle())
            .map(|(s, p)| format!("{}:rx={}/tx={}", p.name, s.rx_packets, s.tx_packets))
            .collect();
        report::line(&format!(
            "xlbd status {}{} ports[{}]",
            stats::status_line(&sum, &rules, self.scale),
            self.shared.operations().status_line(),
            ports.join(" ")
        ));
    }
}

/// What to tell the operator about the slowest recent grace, `slowest_ns`, given the one told
/// last and how long ago: nothing below half a second; else once, again when it doubled, and
/// again after ten minutes.
fn slow_grace_warning(slowest_ns: u64, told: Option<(u64, Duration)>) -> Option<String> {
    if slowest_ns < SLOW_GRACE_NS {
        return None;
    }
    if let Some((ns, ago)) = told {
        if slowest_ns < ns.saturating_mul(2) && ago < GRACE_WARNING_EVERY {
            return None;
        }
    }
    Some(format!(
        "fast path: a kernel grace period took {} ms (usually 15-30): resets on idle of flows \
         XDP forwards start up to 2 s ahead to stay on time, and are late beyond that. The \
         host's RCU threads are waiting for CPU: boot with rcutree.kthread_prio=1 (now: chrt \
         -f -p 1 $(pgrep -x rcu_preempt)) or move other load off this machine \
         (docs/deployment.md, \"Grace periods on a busy host\")",
        slowest_ns / 1_000_000
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_grace_is_told_once_then_when_it_doubles_or_after_ten_minutes() {
        assert_eq!(slow_grace_warning(30_000_000, None), None, "a usual grace");
        let first = slow_grace_warning(900_000_000, None).expect("told");
        assert!(first.contains("took 900 ms") && first.contains("rcutree.kthread_prio=1"));
        let told = Some((900_000_000, Duration::from_secs(5)));
        assert_eq!(
            slow_grace_warning(1_200_000_000, told),
            None,
            "not twice as slow"
        );
        assert!(slow_grace_warning(1_800_000_000, told).is_some(), "doubled");
        let long_ago = Some((900_000_000, Duration::from_secs(600)));
        assert!(
            slow_grace_warning(900_000_000, long_ago).is_some(),
            "ten minutes on"
        );
    }
}
