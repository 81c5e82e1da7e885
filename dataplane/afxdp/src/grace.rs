//! The grace service of the XDP fast path: a thread that tells the workers when every XDP
//! program run that might still see a line they unpublished has finished.
//!
//! XDP runs inside an RCU read-side section (NAPI, bottom halves off), and
//! `membarrier(MEMBARRIER_CMD_GLOBAL)` returns only after an RCU grace period
//! (`synchronize_rcu()`), so a run that started before the call has ended when it returns.
//! The thread keeps an *epoch* counter: while a grace is wanted it calls membarrier and then
//! increments the epoch. A worker that cleared a line at epoch `e` may reuse it once the epoch
//! reaches `e + 2` (the call in flight when it cleared the line may have started before).
//!
//! The shared state is the engines' [`GraceClock`]; the protocol (take the request, two
//! barriers, an epoch step after each) is its [`GraceClock::serve`]: this thread only supplies
//! the barrier.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use xlb_engine::GraceClock;

use crate::error::{Error, Result};

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
/// How often an idle service looks at the `wanted` flag.
const IDLE_POLL: Duration = Duration::from_millis(2);

fn membarrier(cmd: libc::c_int) -> std::io::Result<libc::c_long> {
    // SAFETY: membarrier takes two integers and a CPU id, touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Whether this kernel offers `membarrier(MEMBARRIER_CMD_GLOBAL)` (not on `nohz_full`
/// systems, nor without `CONFIG_MEMBARRIER`).
pub fn membarrier_global_supported() -> bool {
    membarrier(MEMBARRIER_CMD_QUERY)
        .map(|mask| mask & libc::c_long::from(MEMBARRIER_CMD_GLOBAL) != 0)
        .unwrap_or(false)
}

/// The running grace thread; dropping it (or [`stop`](Self::stop)) stops and joins it.
#[derive(Debug)]
pub struct GraceService {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl GraceService {
    /// Starts the thread on `clock`: when a worker asks for a grace it runs two grace periods,
    /// advancing the epoch after each ([`GraceClock::serve`]): a worker that read epoch `e`
    /// before asking sees `e + 2` or more after a full grace period that began after its
    /// request. Fails where the kernel lacks `MEMBARRIER_CMD_GLOBAL`.
    pub fn spawn(clock: Arc<GraceClock>) -> Result<Self> {
        if !membarrier_global_supported() {
            return Err(Error::msg(
                "membarrier(MEMBARRIER_CMD_GLOBAL) is not available (nohz_full?): no grace \
                 periods for the fast path",
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let (stop2, failures2) = (Arc::clone(&stop), Arc::clone(&failures));
        let thread = std::thread::Builder::new()
            .name("xlb-grace".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    let began = Instant::now();
                    match clock.serve(|| membarrier(MEMBARRIER_CMD_GLOBAL).map(drop)) {
                        // How long it took moves the engines' expiry lead: a grace usually
                        // takes tens of ms, but seconds on a host whose CPUs are starved.
                        Ok(true) => clock.note_served(
                            u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX),
                        ),
                        Ok(false) => std::thread::park_timeout(IDLE_POLL),
                        // The request was put back: retry after a pause.
                        Err(_) => {
                            failures2.fetch_add(1, Ordering::Relaxed);
                            std::thread::park_timeout(IDLE_POLL);
                        }
                    }
                }
            })
            .map_err(|e| Error::with("starting the grace thread", e))?;
        Ok(Self {
            stop,
            failures,
            thread: Some(thread),
        })
    }

    /// membarrier calls that failed (each retried later).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Stops the thread and waits for it (at most one grace period, tens of milliseconds).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for GraceService {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_request_advances_the_epoch_by_two_and_idle_leaves_it() {
        assert!(
            membarrier_global_supported(),
            "membarrier(MEMBARRIER_CMD_GLOBAL) is needed by the fast path (Linux 4.16+, not nohz_full)"
        );
        let c = Arc::new(GraceClock::default());
        let mut g = GraceService::spawn(Arc::clone(&c)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(c.epoch.load(Ordering::Acquire), 0, "no request, no grace");
        let fence = c.epoch.load(Ordering::Acquire);
        c.wanted.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.epoch.load(Ordering::Acquire) < fence + 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(c.epoch.load(Ordering::Acquire) >= fence + 2);
        assert!(!c.wanted.load(Ordering::Acquire), "the request was taken");
        g.stop();
        let after = c.epoch.load(Ordering::Acquire);
        c.wanted.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            c.epoch.load(Ordering::Acquire),
            after,
            "stopped: no more graces"
        );
        assert_eq!(g.failures(), 0);
    }
}
