//! Whether every worker loop still runs, and when the service manager's watchdog may be fed.
//!
//! Each worker stores the monotonic time into its own [`Heartbeat`] each time it publishes its
//! counters (four times a second, from its loop, whatever the traffic: a relaxed store, no
//! lock, no syscall). A worker whose heartbeat is older than the watchdog's `stale_after` is
//! stuck: a bug, a deadlock, a page fault that never ends, a debugger. While any worker is
//! stuck, [`Watchdog`] does not feed the watchdog, so the service manager restarts xlbd rather
//! than leave a dataplane running that black-holes part of the traffic; the control loop feeds
//! it, so a stuck control loop stops the feeding too.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

/// The heartbeats of every worker.
#[derive(Debug, Clone)]
pub struct Heartbeats(Arc<[AtomicU64]>);

/// One worker's heartbeat: the monotonic time, in ns, of its last publication.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    beats: Arc<[AtomicU64]>,
    worker: usize,
}

impl Heartbeats {
    /// `workers` heartbeats, each as if it beat at `now_ns` (a worker that never runs is
    /// found stale after `stale_after`, not at once).
    pub fn new(workers: usize, now_ns: u64) -> Heartbeats {
        Heartbeats((0..workers).map(|_| AtomicU64::new(now_ns)).collect())
    }

    /// Worker `worker`'s end.
    pub fn of(&self, worker: usize) -> Heartbeat {
        Heartbeat {
            beats: Arc::clone(&self.0),
            worker,
        }
    }

    /// The workers whose last beat is older than `max_age` at `now_ns`, with that age.
    pub fn stale(&self, now_ns: u64, max_age: Duration) -> Vec<(usize, Duration)> {
        let max = u64::try_from(max_age.as_nanos()).unwrap_or(u64::MAX);
        self.0
            .iter()
            .enumerate()
            .filter_map(|(w, b)| {
                let age = now_ns.saturating_sub(b.load(Ordering::Relaxed));
                (age > max).then_some((w, Duration::from_nanos(age)))
            })
            .collect()
    }

    /// Whether every worker beat at or after `since_ns` (they all run their loops).
    pub fn all_since(&self, since_ns: u64) -> bool {
        self.0.iter().all(|b| b.load(Ordering::Relaxed) >= since_ns)
    }
}

impl Heartbeat {
    /// The worker runs: called from its loop.
    #[inline]
    pub fn beat(&self, now_ns: u64) {
        if let Some(b) = self.beats.get(self.worker) {
            b.store(now_ns, Ordering::Relaxed);
        }
    }
}

/// What the watchdog does at one tick of the control loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    /// Not time to feed yet.
    Wait,
    /// Every worker runs: send `WATCHDOG=1`.
    Feed,
    /// These workers are stuck (worker, time since its last beat): the watchdog is not fed.
    /// `first` is true on the first tick of a stall (to be told once).
    Withhold {
        stuck: Vec<(usize, Duration)>,
        first: bool,
    },
    /// The first feed after a stall: every worker runs again.
    Recovered,
}

/// The feeding policy for a watchdog of `interval` (systemd's `WATCHDOG_USEC`): fed every
/// quarter interval while every worker beat within half of it (at least 1 s, four of the
/// workers' publication periods), so that a stuck worker stops the feeding well before the
/// service manager gives up, and a late tick of a busy machine does not.
#[derive(Debug)]
pub struct Watchdog {
    feed_every: Duration,
    stale_after: Duration,
    next_ns: u64,
    withholding: bool,
}

impl Watchdog {
    pub fn new(interval: Duration, now_ns: u64) -> Watchdog {
        Watchdog {
            feed_every: (interval / 4).max(Duration::from_millis(10)),
            stale_after: (interval / 2).max(Duration::from_secs(1)),
            next_ns: now_ns,
            withholding: false,
        }
    }

    /// Whether the last tick found a worker stuck.
    pub fn withholding(&self) -> bool {
        self.withholding
    }

    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }

    /// What to do at `now_ns`, given the workers' heartbeats.
    pub fn tick(&mut self, now_ns: u64, beats: &Heartbeats) -> Tick {
        if now_ns < self.next_ns {
            return Tick::Wait;
        }
        let step = u64::try_from(self.feed_every.as_nanos()).unwrap_or(u64::MAX);
        self.next_ns = now_ns.saturating_add(step);
        let stuck = beats.stale(now_ns, self.stale_after);
        if !stuck.is_empty() {
            let first = !self.withholding;
            self.withholding = true;
            return Tick::Withhold { stuck, first };
        }
        if std::mem::take(&mut self.withholding) {
            Tick::Recovered
        } else {
            Tick::Feed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn fed_while_every_worker_beats() {
        let beats = Heartbeats::new(2, 0);
        let mut w = Watchdog::new(Duration::from_secs(2), 0);
        assert_eq!(w.stale_after(), Duration::from_secs(1));
        let mut fed = 0;
        for t in (0..4000).step_by(20) {
            let now = t * MS;
            // Both workers publish every 250 ms.
            if t % 250 == 0 {
                beats.of(0).beat(now);
                beats.of(1).beat(now);
            }
            match w.tick(now, &beats) {
                Tick::Feed => fed += 1,
                Tick::Wait => {}
                other => panic!("at {t} ms: {other:?}"),
            }
        }
        // Every 500 ms over 4 s.
        assert_eq!(fed, 8);
    }

    #[test]
    fn a_stuck_worker_stops_the_feeding_until_it_runs_again() {
        let beats = Heartbeats::new(2, 0);
        let mut w = Watchdog::new(Duration::from_secs(2), 0);
        let mut log = Vec::new();
        for t in (0..6000).step_by(20) {
            let now = t * MS;
            if t % 250 == 0 {
                beats.of(0).beat(now);
                // Worker 1 stops at 1 s and runs again at 3 s.
                if !(1000..3000).contains(&t) {
                    beats.of(1).beat(now);
                }
            }
            match w.tick(now, &beats) {
                Tick::Wait => {}
                Tick::Feed => log.push((t, "feed")),
                Tick::Recovered => log.push((t, "recovered")),
                Tick::Withhold { stuck, first } => {
                    assert_eq!(stuck.len(), 1);
                    assert_eq!(stuck[0].0, 1);
                    assert!(stuck[0].1 > Duration::from_secs(1));
                    log.push((t, if first { "stuck" } else { "withheld" }));
                }
            }
        }
        let feeds: Vec<u64> = log
            .iter()
            .filter(|(_, e)| *e == "feed" || *e == "recovered")
            .map(|(t, _)| *t)
            .collect();
        // Last beat 750 ms: fed up to 1.5 s, withheld from 2 s (older than 1 s), fed again
        // at the first tick after the beat at 3 s.
        assert_eq!(
            feeds,
            [0, 500, 1000, 1500, 3000, 3500, 4000, 4500, 5000, 5500]
        );
        assert!(log.contains(&(2000, "stuck")));
        assert!(log.contains(&(2500, "withheld")));
        assert!(log.contains(&(3000, "recovered")));
    }

    #[test]
    fn a_worker_that_never_ran_is_stale_after_the_grace() {
        let beats = Heartbeats::new(1, 5_000 * MS);
        assert!(beats.stale(5_900 * MS, Duration::from_secs(1)).is_empty());
        assert_eq!(beats.stale(6_100 * MS, Duration::from_secs(1)).len(), 1);
        assert!(!beats.all_since(5_001 * MS));
        beats.of(0).beat(5_500 * MS);
        assert!(beats.all_since(5_001 * MS));
    }

    #[test]
    fn short_intervals_keep_a_floor() {
        let w = Watchdog::new(Duration::from_millis(100), 0);
        assert_eq!(w.stale_after(), Duration::from_secs(1));
        assert_eq!(w.feed_every, Duration::from_millis(25));
    }
}
