//! Health probes (docs/behaviour.md, "Health and drain"): xlbd probes every member of every pool that a
//! load-balancing rule with a `health_probe` sends to, and publishes the verdicts.
//!
//! Probes are ordinary kernel sockets of the appliance namespace (the XDP program passes
//! traffic addressed to the host's own addresses to the kernel), one attempt per
//! (probe, pool, member) and interval:
//! - `TCP`: healthy if the handshake completes;
//! - `HTTP`: `GET <path>` (default `/`), healthy only on status 200.
//!
//! Timing: the interval (default 5 s) is divided by the lab time scale like every timer. An
//! attempt times out after one interval, but never sooner than [`MIN_TIMEOUT`] of real time
//! (a lab-scaled 5 s interval is 83 ms: a loaded host must not fail probes by itself); the
//! next attempt starts one interval after the previous one started, or when it ends if it took
//! longer. The first attempts of a new target are spread over its first interval.
//!
//! Verdicts ([`Tracker`]): every member starts healthy (so a restart does not drain a pool
//! for `threshold` intervals); `threshold` consecutive failures mark it down; a down member
//! recovers after one success, unless it is flapping: a member that goes down again within
//! [`FLAP_WINDOW`] probes of its last recovery needs twice as many consecutive successes as it
//! needed last time (2, 4, up to [`MAX_RISE`]); staying up for [`FLAP_WINDOW`] probes forgives
//! it (back to one).
//!
//! Several probes on one pool (rules with different probes): a member is healthy in that pool
//! only while every probe that covers it passes. Admin state is applied later, by `compile`:
//! members are probed whatever it is, so that the probe state stays visible.
//!
//! Threads: `xlbd-probes` runs every attempt on a current-thread tokio runtime (non-blocking
//! sockets, every attempt bounded by its timeout); it never publishes. `xlbd-health` takes the
//! verdict flips in order, records them with [`ControlState::update_health`] (one new
//! generation per batch of simultaneous flips; the publish waits for every worker's ack, up to
//! the publish deadline, on this thread and not on the control loop), prints an `xlbd event
//! probe_state` line and sends a `ProbeStateChanged` event to the API's watchers. A failed
//! publish is retried every half second until it succeeds.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xlb_api::{ControlEvent, ControlState, EventRecord};
use xlb_engine::config::{Config, ProbeProtocol};

use crate::plane::Shared;

/// Shortest real time an attempt may take before it counts as failed.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(250);
/// Probes after a recovery within which going down again counts as flapping.
pub const FLAP_WINDOW: u64 = 10;
/// Most consecutive successes a flapping member needs to recover.
pub const MAX_RISE: u32 = 8;
/// How often the probe thread looks for configuration changes and the stop flag.
const RECONCILE_EVERY: Duration = Duration::from_millis(100);
/// How long the health thread waits before retrying a failed publish.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// Most bytes of an HTTP answer read to find its status line.
const MAX_STATUS_LINE: usize = 1024;

/// What one (probe, pool, member) is probed for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetKey {
    pub probe: String,
    pub pool: String,
    pub member: IpAddr,
}

/// How a target is probed, already scaled by the lab time scale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub protocol: ProbeProtocol,
    pub port: u16,
    /// HTTP only.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub threshold: u32,
}

/// Every target of `config`: the members of the pools of load-balancing rules that name a
/// probe, once per (probe, pool, member).
pub fn targets(config: &Config) -> BTreeMap<TargetKey, ProbeSpec> {
    let scale = config.settings.lab_time_scale.max(1);
    let mut out = BTreeMap::new();
    for rule in &config.load_balancing_rules {
        let Some(name) = &rule.health_probe else {
            continue;
        };
        let (Some(probe), Some(pool)) = (
            config.health_probes.iter().find(|p| &p.name == name),
            config
                .backend_pools
                .iter()
                .find(|p| p.name == rule.backend_pool),
        ) else {
            // Validation resolves every reference; nothing to probe otherwise.
            continue;
        };
        let interval = Duration::from_secs(u64::from(probe.interval_seconds.max(1))) / scale;
        let spec = ProbeSpec {
            protocol: probe.protocol,
            port: probe.port as u16,
            path: probe.path.clone().unwrap_or_else(|| "/".into()),
            interval,
            timeout: interval.max(MIN_TIMEOUT),
            threshold: probe.threshold.max(1),
        };
        for m in &pool.members {
            let key = TargetKey {
                probe: probe.name.clone(),
                pool: pool.name.clone(),
                member: m.address,
            };
            out.insert(key, spec.clone());
        }
    }
    out
}

/// The verdict of one target from its attempts (see the module notes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    healthy: bool,
    /// Consecutive failures while healthy, consecutive successes while down.
    run: u32,
    /// Consecutive successes the next recovery needs.
    rise: u32,
    /// Attempts recorded so far.
    attempts: u64,
    /// `attempts` at the last recovery.
    recovered_at: Option<u64>,
}

impl Default for Tracker {
    fn default() -> Tracker {
        Tracker::new()
    }
}

impl Tracker {
    /// A healthy target.
    pub fn new() -> Tracker {
        Tracker {
            healthy: true,
            run: 0,
            rise: 1,
            attempts: 0,
            recovered_at: None,
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Successes a down target needs to recover now.
    pub fn rise(&self) -> u32 {
        self.rise
    }

    /// Records an attempt; returns the new verdict when it flipped.
    pub fn record(&mut self, ok: bool, threshold: u32) -> Option<bool> {
        self.attempts += 1;
        if self.healthy {
            if ok {
                self.run = 0;
                if self
                    .recovered_at
                    .is_some_and(|at| self.attempts - at >= FLAP_WINDOW)
                {
                    self.rise = 1;
                    self.recovered_at = None;
                }
                return None;
            }
            self.run += 1;
            if self.run < threshold.max(1) {
                return None;
            }
            let flapping = self
                .recovered_at
                .is_some_and(|at| self.attempts - at < FLAP_WINDOW);
            self.rise = if flapping {
                (self.rise * 2).min(MAX_RISE)
            } else {
                1
            };
            self.healthy = false;
            self.run = 0;
            Some(false)
        } else {
            if !ok {
                self.run = 0;
                return None;
            }
            self.run += 1;
            if self.run < self.rise {
                return None;
            }
            self.healthy = true;
            self.run = 0;
            self.recovered_at = Some(self.attempts);
            Some(true)
        }
    }
}

/// One attempt: `Ok` if healthy, else why not.
pub async fn probe_once(spec: &ProbeSpec, member: IpAddr) -> Result<(), String> {
    let addr = SocketAddr::new(member, spec.port);
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if spec.protocol == ProbeProtocol::Tcp {
            return Ok(());
        }
        let host = match member {
            IpAddr::V4(a) => format!("{a}:{}", spec.port),
            IpAddr::V6(a) => format!("[{a}]:{}", spec.port),
        };
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xlbd-health-probe\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n",
            spec.path
        );
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < MAX_STATUS_LINE {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        match http_status(&buf) {
            Some(200) => Ok(()),
            Some(code) => Err(format!("HTTP status {code}")),
            None => Err("no HTTP status line in the answer".into()),
        }
    };
    match tokio::time::timeout(spec.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
    }
}

/// The status code of an HTTP/1.x status line at the start of `buf`.
pub fn http_status(buf: &[u8]) -> Option<u16> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..end]).ok()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// What the probe thread tells the health thread.
#[derive(Debug)]
enum Msg {
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

/// The running probe threads.
#[derive(Debug)]
pub struct Probes {
    stop: Arc<AtomicBool>,
    probe: JoinHandle<()>,
    health: JoinHandle<()>,
}

impl Probes {
    /// Starts probing the targets of the committed configuration, following its changes.
    pub fn spawn(state: Arc<ControlState>, shared: Arc<Shared>, quiet: bool) -> io::Result<Probes> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel::unbounded();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let probe = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("xlbd-probes".into())
                .spawn(move || runtime.block_on(probe_loop(&state, &stop, tx)))?
        };
        let health = std::thread::Builder::new()
            .name("xlbd-health".into())
            .spawn(move || health_loop(&state, &shared, quiet, &rx))?;
        Ok(Probes {
            stop,
            probe,
            health,
        })
    }

    /// Stops probing; returns once both threads are gone (at most one attempt's timeout plus
    /// one publish).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.probe.join();
        let _ = self.health.join();
    }
}

struct Target {
    spec: ProbeSpec,
    tracker: Tracker,
    next_at: Instant,
    /// Bumped when the spec changes: answers of older attempts are ignored.
    epoch: u64,
    in_flight: bool,
    last_error: Option<String>,
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
                reconcile(&mut targets, self::targets(&snap.config), now, &tx);
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
            Some(done) = attempts.join_next(), if !attempts.is_empty() => {
                let Ok((key, epoch, result)) = done else { continue };
                let Some(t) = targets.get_mut(&key) else { continue };
                if t.epoch != epoch {
                    continue;
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
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    // Dropping `attempts` aborts the attempts in flight; dropping `tx` ends the health thread.
}

/// Brings the running targets in line with `want`: new ones start healthy with their first
/// attempt spread over their first interval, changed ones keep their verdict, removed ones
/// are reported gone.
fn reconcile(
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

fn health_loop(state: &ControlState, shared: &Shared, quiet: bool, rx: &Receiver<Msg>) {
    let mut verdicts = Verdicts::default();
    // What the committed `MemberHealth` says for the (pool, member) pairs probes touched.
    let mut applied: BTreeMap<(String, IpAddr), bool> = BTreeMap::new();
    let mut pending: BTreeSet<(String, IpAddr)> = BTreeSet::new();
    let mut connected = true;
    while connected || !pending.is_empty() {
        let mut batch = Vec::new();
        match rx.recv_timeout(RETRY_EVERY) {
            Ok(m) => batch.push(m),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => connected = false,
        }
        batch.extend(rx.try_iter());
        let mut flips = Vec::new();
        for m in batch {
            match m {
                Msg::Flip { key, healthy, why } => {
                    verdicts.set(key.clone(), healthy);
                    pending.insert((key.pool.clone(), key.member));
                    flips.push((key, healthy, why));
                }
                Msg::Gone(key) => {
                    verdicts.remove(&key);
                    pending.insert((key.pool.clone(), key.member));
                }
            }
        }
        let changes: Vec<(String, IpAddr, bool)> = pending
            .iter()
            .map(|(pool, m)| (pool.clone(), *m, verdicts.healthy(pool, *m)))
            .filter(|(pool, m, h)| applied.get(&(pool.clone(), *m)).copied().unwrap_or(true) != *h)
            .collect();
        let mut generation = None;
        if changes.is_empty() {
            pending.clear();
        } else {
            match state.update_health(|h| {
                for (pool, m, healthy) in &changes {
                    h.set_healthy(pool, *m, *healthy);
                }
            }) {
                Ok(g) => {
                    generation = Some(g);
                    for (pool, m, healthy) in changes {
                        if healthy {
                            applied.remove(&(pool, m));
                        } else {
                            applied.insert((pool, m), false);
                        }
                    }
                    pending.clear();
                }
                Err(e) => {
                    if !quiet {
                        crate::daemon::out(&format!(
                            "xlbd warning: recording probe verdicts: {e}; retrying"
                        ));
                    }
                    if !connected {
                        // Stopping: the workers may be gone; give up.
                        pending.clear();
                    }
                }
            }
        }
        for (key, healthy, why) in flips {
            if !quiet {
                crate::daemon::out(&format!(
                    "xlbd event probe_state probe={} pool={} member={} state={} generation={} why=\"{why}\"",
                    key.probe,
                    key.pool,
                    key.member,
                    if healthy { "up" } else { "down" },
                    generation.map_or_else(|| "-".to_string(), |g| g.to_string()),
                ));
            }
            let _ = shared.events.send(EventRecord {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: &mut Tracker, threshold: u32, results: &str) -> Vec<Option<bool>> {
        results
            .chars()
            .map(|c| t.record(c == 'o', threshold))
            .collect()
    }

    #[test]
    fn threshold_consecutive_failures_mark_down_and_one_success_recovers() {
        let mut t = Tracker::new();
        assert!(t.healthy());
        // A failure between successes resets the count.
        assert_eq!(run(&mut t, 3, "xxoxx"), [None; 5]);
        assert_eq!(t.record(false, 3), Some(false));
        assert!(!t.healthy());
        assert_eq!(t.record(false, 3), None);
        assert_eq!(t.record(true, 3), Some(true));
        assert!(t.healthy());
    }

    #[test]
    fn threshold_one_flips_on_the_first_failure() {
        let mut t = Tracker::new();
        assert_eq!(t.record(false, 1), Some(false));
    }

    #[test]
    fn flapping_members_need_more_successes_and_are_forgiven() {
        let mut t = Tracker::new();
        assert_eq!(run(&mut t, 2, "xxo"), [None, Some(false), Some(true)]);
        // Down again right after recovering: the next recovery needs 2 successes.
        assert_eq!(run(&mut t, 2, "xx"), [None, Some(false)]);
        assert_eq!(t.rise(), 2);
        assert_eq!(run(&mut t, 2, "oxoo"), [None, None, None, Some(true)]);
        // And again: 4.
        assert_eq!(run(&mut t, 2, "xx"), [None, Some(false)]);
        assert_eq!(t.rise(), 4);
        assert_eq!(run(&mut t, 2, "oooo"), [None, None, None, Some(true)]);
        // Capped at MAX_RISE.
        for _ in 0..5 {
            run(&mut t, 2, "xx");
            run(&mut t, 2, &"o".repeat(MAX_RISE as usize));
        }
        assert_eq!(t.rise(), MAX_RISE);
        assert!(t.healthy());
        // Up for FLAP_WINDOW probes: forgiven.
        run(&mut t, 2, &"o".repeat(FLAP_WINDOW as usize));
        assert_eq!(t.rise(), 1);
        assert_eq!(run(&mut t, 2, "xxo"), [None, Some(false), Some(true)]);
    }

    #[test]
    fn a_relapse_after_the_flap_window_is_not_flapping() {
        let mut t = Tracker::new();
        run(&mut t, 2, "xxo");
        // Down again at the FLAP_WINDOW-th... probe after the recovery (its second failure).
        run(&mut t, 2, &"o".repeat(FLAP_WINDOW as usize - 1));
        assert_eq!(run(&mut t, 2, "xx"), [None, Some(false)]);
        assert_eq!(t.rise(), 1);
    }

    #[test]
    fn status_lines() {
        assert_eq!(http_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            http_status(b"HTTP/1.0 503 Service Unavailable\r\nx"),
            Some(503)
        );
        assert_eq!(http_status(b"HTTP/1.1 200 OK"), None, "incomplete line");
        assert_eq!(http_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(http_status(b"HTTP/1.1 20 OK\r\n"), None);
    }

    const CONFIG: &str = r#"
        [settings]
        lab_time_scale = 10
        [[frontends]]
        name = "vip"
        address = "198.18.0.100"
        kind = "public"
        [[backend_pools]]
        name = "web"
        members = [{ address = "198.18.1.11" }, { address = "198.18.1.12", admin_state = "down" }]
        [[backend_pools]]
        name = "other"
        members = [{ address = "198.18.1.13" }]
        [[health_probes]]
        name = "tcp"
        protocol = "TCP"
        port = 8080
        threshold = 3
        [[health_probes]]
        name = "http"
        protocol = "HTTP"
        port = 8081
        path = "/healthz"
        interval_seconds = 1
        [[load_balancing_rules]]
        name = "a"
        frontend = "vip"
        protocol = "TCP"
        frontend_port = 80
        backend_pool = "web"
        backend_port = 8080
        health_probe = "tcp"
        [[load_balancing_rules]]
        name = "b"
        frontend = "vip"
        protocol = "TCP"
        frontend_port = 81
        backend_pool = "web"
        backend_port = 8080
        health_probe = "http"
        [[load_balancing_rules]]
        name = "c"
        frontend = "vip"
        protocol = "TCP"
        frontend_port = 82
        backend_pool = "web"
        backend_port = 8080
        health_probe = "tcp"
        [[load_balancing_rules]]
        name = "no-probe"
        frontend = "vip"
        protocol = "TCP"
        frontend_port = 83
        backend_pool = "other"
        backend_port = 8080
    "#;

    #[test]
    fn targets_are_per_probe_pool_and_member_and_lab_scaled() {
        let config = Config::from_toml_str(CONFIG).unwrap();
        let t = targets(&config);
        let keys: Vec<(&str, &str, String)> = t
            .keys()
            .map(|k| (k.probe.as_str(), k.pool.as_str(), k.member.to_string()))
            .collect();
        assert_eq!(
            keys,
            [
                ("http", "web", "198.18.1.11".to_string()),
                ("http", "web", "198.18.1.12".to_string()),
                ("tcp", "web", "198.18.1.11".to_string()),
                ("tcp", "web", "198.18.1.12".to_string()),
            ],
            "admin-down members are probed too; pools without a probe are not"
        );
        let tcp = t
            .values()
            .find(|s| s.protocol == ProbeProtocol::Tcp)
            .unwrap();
        assert_eq!(tcp.interval, Duration::from_millis(500), "5 s / 10");
        assert_eq!(tcp.timeout, Duration::from_millis(500));
        assert_eq!(tcp.threshold, 3);
        assert_eq!(tcp.path, "/");
        let http = t
            .values()
            .find(|s| s.protocol == ProbeProtocol::Http)
            .unwrap();
        assert_eq!(http.interval, Duration::from_millis(100));
        assert_eq!(http.timeout, MIN_TIMEOUT, "never below the floor");
        assert_eq!(
            (http.port, http.path.as_str(), http.threshold),
            (8081, "/healthz", 2)
        );
    }

    #[test]
    fn a_member_is_healthy_in_a_pool_only_while_every_probe_passes() {
        let m: IpAddr = "198.18.1.11".parse().unwrap();
        let key = |probe: &str| TargetKey {
            probe: probe.into(),
            pool: "web".into(),
            member: m,
        };
        let mut v = Verdicts::default();
        assert!(v.healthy("web", m));
        v.set(key("tcp"), true);
        v.set(key("http"), false);
        assert!(!v.healthy("web", m));
        assert!(v.healthy("other", m), "health is per pool");
        v.set(key("http"), true);
        assert!(v.healthy("web", m));
        v.set(key("tcp"), false);
        v.remove(&key("tcp"));
        assert!(v.healthy("web", m), "a removed probe no longer counts");
    }

    #[test]
    fn reconcile_adds_spreads_keeps_verdicts_and_reports_removals() {
        let config = Config::from_toml_str(CONFIG).unwrap();
        let (tx, rx) = channel::unbounded();
        let mut running = HashMap::new();
        let now = Instant::now();
        reconcile(&mut running, targets(&config), now, &tx);
        assert_eq!(running.len(), 4);
        let starts: BTreeSet<Instant> = running.values().map(|t| t.next_at).collect();
        assert_eq!(starts.len(), 4, "first attempts are spread");
        assert!(running.values().all(|t| t.next_at < now + t.spec.interval));
        // A verdict survives a change of the probe's settings.
        let key = running.keys().find(|k| k.probe == "tcp").unwrap().clone();
        running.get_mut(&key).unwrap().tracker.record(false, 1);
        let mut changed = config.clone();
        changed.health_probes[0].threshold = 5;
        reconcile(&mut running, targets(&changed), now, &tx);
        let t = &running[&key];
        assert!(!t.tracker.healthy());
        assert_eq!((t.spec.threshold, t.epoch), (5, 1));
        assert!(rx.try_recv().is_err(), "nothing removed");
        // Removing rule `b` removes the HTTP targets.
        changed.load_balancing_rules.remove(1);
        reconcile(&mut running, targets(&changed), now, &tx);
        let gone: Vec<String> = rx
            .try_iter()
            .map(|m| match m {
                Msg::Gone(k) => format!("{}/{}", k.probe, k.member),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(gone.len(), 2);
        assert!(gone.iter().all(|g| g.starts_with("http/")), "{gone:?}");
        assert_eq!(running.len(), 2);
    }

    /// A publisher that records generations and fails when told to.
    #[derive(Debug, Default)]
    struct Recorder {
        published: std::sync::Mutex<Vec<u64>>,
        fail: AtomicBool,
    }

    impl xlb_api::Publisher for Recorder {
        fn publish(
            &self,
            rules: Arc<xlb_engine::RuleSet>,
            _: Duration,
        ) -> Result<(), xlb_api::PublishError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(xlb_api::PublishError::Unavailable("test".into()));
            }
            self.published.lock().unwrap().push(rules.generation());
            Ok(())
        }
    }

    #[test]
    fn health_thread_combines_verdicts_publishes_flips_and_retries() {
        let publisher = Arc::new(Recorder::default());
        let state = Arc::new(
            ControlState::start(
                Config::from_toml_str(CONFIG).unwrap(),
                xlb_engine::MemberHealth::all_healthy(),
                publisher.clone(),
                xlb_api::StateOptions::default(),
            )
            .unwrap(),
        );
        let shared = Shared::new(1, 1);
        let mut events = shared.events.subscribe();
        let (tx, rx) = channel::unbounded();
        let thread = {
            let (state, shared) = (Arc::clone(&state), Arc::clone(&shared));
            std::thread::spawn(move || health_loop(&state, &shared, true, &rx))
        };
        let m: IpAddr = "198.18.1.11".parse().unwrap();
        let key = |probe: &str| TargetKey {
            probe: probe.into(),
            pool: "web".into(),
            member: m,
        };
        let flip = |probe: &str, healthy: bool| Msg::Flip {
            key: key(probe),
            healthy,
            why: "test".into(),
        };
        let wait = |want: &dyn Fn(&xlb_api::Snapshot) -> bool| {
            let end = Instant::now() + Duration::from_secs(5);
            while !want(&state.snapshot()) {
                assert!(Instant::now() < end, "{:?}", state.snapshot().members());
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let healthy = |s: &xlb_api::Snapshot| s.health.is_healthy("web", m);

        tx.send(flip("tcp", false)).unwrap();
        wait(&|s| !healthy(s));
        let ev = events.blocking_recv().unwrap();
        assert!(
            matches!(&ev.event, ControlEvent::ProbeStateChanged { probe, healthy: false, .. } if probe == "tcp"),
            "{ev:?}"
        );
        // The HTTP probe fails too, then the TCP one recovers: still down (every probe must
        // pass), and no generation for a flip that changes nothing.
        let published = publisher.published.lock().unwrap().len();
        tx.send(flip("http", false)).unwrap();
        tx.send(flip("tcp", true)).unwrap();
        assert!(events.blocking_recv().is_ok() && events.blocking_recv().is_ok());
        assert!(!healthy(&state.snapshot()));
        assert_eq!(publisher.published.lock().unwrap().len(), published);
        // A failed publish is retried until it succeeds.
        publisher.fail.store(true, Ordering::SeqCst);
        tx.send(flip("http", true)).unwrap();
        assert!(events.blocking_recv().is_ok());
        std::thread::sleep(RETRY_EVERY / 2);
        assert!(
            !healthy(&state.snapshot()),
            "not applied while publishing fails"
        );
        publisher.fail.store(false, Ordering::SeqCst);
        wait(&|s| healthy(s));
        // A member that was down and whose probe is removed is healthy again.
        tx.send(flip("tcp", false)).unwrap();
        wait(&|s| !healthy(s));
        tx.send(Msg::Gone(key("tcp"))).unwrap();
        wait(&|s| healthy(s));
        drop(tx);
        thread.join().unwrap();
    }

    #[test]
    fn probes_against_local_servers() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            // An HTTP server: 200 on /ok, 503 elsewhere.
            let server = tokio::spawn(async move {
                for _ in 0..3 {
                    let (mut s, _) = listener.accept().await.unwrap();
                    let mut buf = vec![0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let answer = if req.starts_with("GET /ok HTTP/1.1\r\n") {
                        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                    } else {
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                    };
                    // The TCP probe closes without reading: its answer may not be taken.
                    let _ = s.write_all(answer.as_bytes()).await;
                }
            });
            let local: IpAddr = "127.0.0.1".parse().unwrap();
            let mut spec = ProbeSpec {
                protocol: ProbeProtocol::Http,
                port,
                path: "/ok".into(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(5),
                threshold: 1,
            };
            assert_eq!(probe_once(&spec, local).await, Ok(()));
            spec.path = "/other".into();
            assert_eq!(
                probe_once(&spec, local).await,
                Err("HTTP status 503".to_string())
            );
            spec.protocol = ProbeProtocol::Tcp;
            assert_eq!(probe_once(&spec, local).await, Ok(()));
            server.await.unwrap();
            // Nothing listens any more: refused at once.
            let refused = probe_once(&spec, local).await.unwrap_err();
            assert!(refused.starts_with("connect:"), "{refused}");
        });
    }

    #[test]
    fn a_silent_server_times_out_within_the_bound() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Accepts (the kernel completes the handshake) but never answers the request.
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let spec = ProbeSpec {
                protocol: ProbeProtocol::Http,
                port,
                path: "/".into(),
                interval: Duration::from_millis(300),
                timeout: Duration::from_millis(300),
                threshold: 1,
            };
            let started = Instant::now();
            let r = probe_once(&spec, "127.0.0.1".parse().unwrap()).await;
            let took = started.elapsed();
            assert!(r.unwrap_err().starts_with("no answer within"));
            assert!(took >= Duration::from_millis(300), "{took:?}");
            assert!(took < Duration::from_secs(3), "{took:?}");
            drop(listener);
        });
    }
}
