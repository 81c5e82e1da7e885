//! The service manager's notification protocol (systemd's `Type=notify`, through the
//! `sd-notify` crate): `READY=1` once the data path runs, `RELOADING=1` / `READY=1` around a
//! reload, `STOPPING=1` at shutdown, `STATUS=` lines, and `WATCHDOG=1` while every worker loop
//! runs ([`crate::liveness`]). Without `NOTIFY_SOCKET` in the environment every call does
//! nothing. A failed send is logged once and never stops xlbd: the service manager is
//! told, not obeyed.

use std::{
    os::fd::BorrowedFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sd_notify::NotifyState;
use xlb_afxdp::sys;
use xlb_api::ControlState;

use crate::{
    liveness::{Heartbeats, Tick, Watchdog},
    plane::Shared,
};

/// STATUS= is refreshed this often (and after every reload).
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Sends notifications when the service manager asked for them (`NOTIFY_SOCKET`). Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
    /// A failed send was logged already.
    warned: Arc<AtomicBool>,
}

impl Notifier {
    /// From the environment: enabled when `NOTIFY_SOCKET` is set.
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The data path runs.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload starts; `MONOTONIC_USEC` lets systemd 253 and later match it with its
    /// request. [`Notifier::ready`] ends it.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// Shutdown has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Hands `fds` to the service manager's file-descriptor store under `name`
    /// (`FDSTORE=1`, `FDNAME=`): it keeps them across restarts of xlbd and passes them back
    /// at the next start (`LISTEN_FDS`). Needs `FileDescriptorStoreMax=` in the unit.
    pub fn store_fds(&self, name: &str, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], fds)
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!("telling the service manager (NOTIFY_SOCKET): {e}");
            }
        }
    }
}

/// The watchdog interval the service manager asked for (`WATCHDOG_USEC`, for this process).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// What the control loop does for the service manager at each tick: feed the watchdog while
/// every worker runs, refresh STATUS=.
#[derive(Debug)]
pub struct Supervisor {
    notifier: Notifier,
    heartbeats: Heartbeats,
    watchdog: Option<Watchdog>,
    next_status: Instant,
}

impl Supervisor {
    pub fn new(notifier: Notifier, heartbeats: Heartbeats) -> Supervisor {
        let watchdog = (notifier.enabled())
            .then(watchdog_interval)
            .flatten()
            .map(|d| Watchdog::new(d, sys::monotonic_ns()));
        Supervisor {
            notifier,
            heartbeats,
            watchdog,
            next_status: Instant::now() + STATUS_EVERY,
        }
    }

    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Waits until every worker has run its loop since `since_ns` (at most `limit`), then
    /// says `READY=1` with the status. Returns whether every worker did. Without a service
    /// manager, returns at once.
    pub fn ready(&self, since_ns: u64, limit: Duration, status: &str) -> bool {
        if !self.notifier.enabled() {
            return true;
        }
        let end = Instant::now() + limit;
        let mut all = self.heartbeats.all_since(since_ns);
        while !all && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
            all = self.heartbeats.all_since(since_ns);
        }
        self.notifier.ready(status);
        all
    }

    /// One tick of the control loop.
    pub fn tick(&mut self, state: &ControlState, shared: &Shared) {
        if !self.notifier.enabled() {
            return;
        }
        if let Some(w) = self.watchdog.as_mut() {
            match w.tick(sys::monotonic_ns(), &self.heartbeats) {
                Tick::Wait => {}
                Tick::Feed => self.notifier.watchdog(),
                Tick::Recovered => {
                    tracing::warn!("every worker runs again: feeding the watchdog again");
                    self.notifier.watchdog();
                }
                Tick::Withhold { stuck, first } => {
                    if first {
                        let list: Vec<String> = stuck
                            .iter()
                            .map(|(w, age)| format!("worker {w} for {:.1} s", age.as_secs_f64()))
                            .collect();
                        tracing::error!(
                            "not feeding the watchdog: no loop iteration of {}",
                            list.join(", ")
                        );
                        self.notifier.status(&format!("stuck: {}", list.join(", ")));
                    }
                }
            }
        }
        let now = Instant::now();
        if now >= self.next_status {
            self.next_status = now + STATUS_EVERY;
            if !self.watchdog.as_ref().is_some_and(|w| w.withholding()) {
                self.notifier
                    .status(&status_text(state, shared, &self.heartbeats));
            }
        }
    }
}

/// `generation N, F flows, W/W workers running`: what `systemctl status` shows.
pub fn status_text(state: &ControlState, shared: &Shared, heartbeats: &Heartbeats) -> String {
    let flows: u64 = shared.counters().iter().map(|c| c.flows).sum();
    let workers = shared.workers();
    let stuck = heartbeats
        .stale(sys::monotonic_ns(), Duration::from_secs(1))
        .len();
    format!(
        "generation {}, {flows} flows, {}/{workers} workers running",
        state.generation(),
        workers.saturating_sub(stuck)
    )
}
