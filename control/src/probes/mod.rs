//! Health probes (docs/behaviour.md, "Health and drain"): xlbd probes every member of every pool that a
//! load-balancing rule with a `health_probe` sends to, and publishes the verdicts.
//!
//! Probes are ordinary kernel sockets of the appliance namespace (the XDP program passes
//! traffic addressed to the host's own addresses to the kernel), one attempt per
//! (probe, pool, member) and interval:
//! - `TCP`: healthy if the handshake completes;
//! - `HTTP`: `GET <path>` (default `/`), healthy only on status 200 (or `http_status`);
//! - `HTTPS`: the same over TLS ([`tls`]: the certificate is not checked unless `tls_verify`
//!   is set).
//!
//! One attempt is [`probe_once`] (`attempt`). Timing: the interval (default 5 s) is divided by
//! the lab time scale like every timer. An attempt times out after `timeout_seconds` (default:
//! the interval, at most 30 s; lab-scaled too), but never sooner than [`MIN_TIMEOUT`] of real
//! time
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
//! Where they run ([`run`]): every attempt is a task on xlbd's tokio runtime (non-blocking
//! sockets, every attempt bounded by its timeout); the probe task never publishes. The
//! `xlbd-health` thread takes the verdict flips in order, records them with [`ControlState::update_health`] (one new
//! generation per batch of simultaneous flips; the publish waits for every worker's ack, up to
//! the publish deadline, on this thread and not on the control loop), prints an `xlbd event
//! probe_state` line and sends a `ProbeStateChanged` event to the API's watchers. A failed
//! publish is retried every half second until it succeeds.

mod attempt;
mod run;
#[cfg(test)]
mod tests;
pub mod tls;

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use xlb_engine::config::{Config, ProbeProtocol};

pub use attempt::{http_status, probe_once};
pub use run::{Probes, Verdicts};
use tls::TlsSpec;

/// Shortest real time an attempt may take before it counts as failed.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(250);
/// Probes after a recovery within which going down again counts as flapping.
pub const FLAP_WINDOW: u64 = 10;
/// Most consecutive successes a flapping member needs to recover.
pub const MAX_RISE: u32 = 8;
/// How often the probe thread looks for configuration changes and the stop flag.
pub(crate) const RECONCILE_EVERY: Duration = Duration::from_millis(100);
/// How long the health thread waits before retrying a failed publish.
pub(crate) const RETRY_EVERY: Duration = Duration::from_millis(500);

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
    /// HTTP(S) only.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub threshold: u32,
    /// HTTPS only.
    pub tls: Option<TlsSpec>,
    /// HTTP(S): the status codes that count as healthy, inclusive.
    pub accept: (u16, u16),
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
        let timeout =
            Duration::from_secs(u64::from(probe.effective_timeout_seconds().max(1))) / scale;
        let spec = ProbeSpec {
            protocol: probe.protocol,
            port: probe.port as u16,
            path: probe.path.clone().unwrap_or_else(|| "/".into()),
            interval,
            timeout: timeout.max(MIN_TIMEOUT),
            threshold: probe.threshold.max(1),
            tls: (probe.protocol == ProbeProtocol::Https).then(|| TlsSpec {
                verify: probe.tls_verify,
                server_name: probe.tls_server_name.clone(),
                ca_file: probe.tls_ca_file.clone(),
            }),
            // Validation refused a malformed range; 200 only otherwise.
            accept: probe.accepted_status().unwrap_or((200, 200)),
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
