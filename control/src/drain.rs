//! The drain watcher of the control loop: turns the workers' drain progress (each worker's
//! engine counts a drained member's flows and ends them at the deadline, `xlb_engine::drain`)
//! into the events an operator follows — `started`, `progress` (the flow count changed; at
//! most once a second per member), `deadline` (every worker ran the deadline's action) and
//! `completed` (no flow of the member is left on any worker) — as `xlbd event drain` lines and
//! `WatchEvents` events.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use xlb_api::{DrainEvent, DrainPhase, DrainStatus, Snapshot};

/// Shortest time between two `progress` events of one member.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Seen {
    /// The flow count last reported.
    left: Option<u64>,
    progress_at: Instant,
    deadline_reported: bool,
    completed: bool,
}

/// What the watcher has reported of each open drain.
#[derive(Debug, Default)]
pub struct DrainWatcher {
    seen: HashMap<(String, IpAddr), Seen>,
}

impl DrainWatcher {
    /// The events due now, from the committed configuration (`snap`), the workers' summed
    /// progress (`status`) and the workers' clock (`now_ns`).
    pub fn tick(
        &mut self,
        now: Instant,
        snap: &Snapshot,
        status: &[DrainStatus],
        now_ns: u64,
    ) -> Vec<DrainEvent> {
        let mut events = Vec::new();
        if snap.rules.drains().is_empty() && self.seen.is_empty() {
            return events;
        }
        let members = snap.members();
        self.seen.retain(|(pool, addr), _| {
            members
                .iter()
                .any(|m| m.drain.is_some() && &m.pool == pool && m.address == *addr)
        });
        for m in members {
            let Some(drain) = m.drain else {
                continue;
            };
            let progress = status
                .iter()
                .find(|d| d.pool == m.pool && d.member == m.address);
            let left = progress.and_then(|p| p.flows_left);
            let event = |phase: DrainPhase| DrainEvent {
                pool: m.pool.clone(),
                member: m.address,
                phase,
                flows_left: left,
                flows_reset: progress.map_or(0, |p| p.flows_reset),
                deadline_in_ms: drain
                    .deadline
                    .map(|d| xlb_api::service::ms_between(now_ns, d)),
                action: m.drain_action,
            };
            let key = (m.pool.clone(), m.address);
            let seen = match self.seen.get_mut(&key) {
                Some(s) => s,
                None => {
                    events.push(event(DrainPhase::Started));
                    self.seen.entry(key).or_insert(Seen {
                        left,
                        progress_at: now,
                        deadline_reported: false,
                        completed: false,
                    })
                }
            };
            let deadline_done = progress.is_some_and(|p| p.deadline_done);
            if drain.deadline.is_some() && deadline_done && !seen.deadline_reported {
                seen.deadline_reported = true;
                seen.left = left;
                events.push(event(DrainPhase::Deadline));
            } else if left.is_some()
                && left != seen.left
                && now.duration_since(seen.progress_at) >= PROGRESS_EVERY
            {
                seen.left = left;
                seen.progress_at = now;
                events.push(event(DrainPhase::Progress));
            }
            if left == Some(0) && !seen.completed {
                seen.completed = true;
                seen.left = left;
                events.push(event(DrainPhase::Completed));
            }
        }
        events
    }
}

/// The event as an `xlbd event` line.
pub fn describe(e: &DrainEvent) -> String {
    let mut line = format!(
        "drain pool={} member={} phase={} flows_left={}",
        e.pool,
        e.member,
        e.phase.as_str(),
        e.flows_left
            .map_or_else(|| "counting".to_string(), |n| n.to_string())
    );
    if let Some(ms) = e.deadline_in_ms {
        line.push_str(&format!(
            " deadline_in={:.3}s action={} flows_reset={}",
            ms as f64 / 1000.0,
            e.action.as_str(),
            e.flows_reset
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use xlb_api::{ControlState, StateOptions};
    use xlb_engine::config::{AdminState, Config};

    use super::*;

    #[derive(Debug)]
    struct Accept;
    impl xlb_api::Publisher for Accept {
        fn publish(
            &self,
            _: Arc<xlb_engine::RuleSet>,
            _: Duration,
        ) -> Result<(), xlb_api::PublishError> {
            Ok(())
        }
    }

    fn fixed_clock() -> u64 {
        1_000_000_000
    }

    const CONFIG: &str = r#"
        [[frontends]]
        name = "vip"
        address = "198.18.0.100"
        kind = "public"
        [[backend_pools]]
        name = "web"
        members = [{ address = "198.18.1.11", drain_timeout_seconds = 10 }, { address = "198.18.1.12" }]
        [[load_balancing_rules]]
        name = "web"
        frontend = "vip"
        protocol = "TCP"
        frontend_port = 80
        backend_pool = "web"
        backend_port = 8080
    "#;

    fn status(left: Option<u64>, reset: u64, done: bool) -> Vec<DrainStatus> {
        vec![DrainStatus {
            pool: "web".into(),
            member: "198.18.1.11".parse().unwrap(),
            flows_left: left,
            flows_reset: reset,
            flows_ended: 0,
            deadline_done: done,
        }]
    }

    /// Sets the admin state of the pool's first member (the one with a drain timeout).
    fn set_admin(state: &ControlState, admin: AdminState) {
        state
            .set_member("web", "198.18.1.11".parse().unwrap(), None, Some(admin))
            .unwrap();
    }

    #[test]
    fn a_drain_is_reported_started_in_progress_at_its_deadline_and_completed() {
        let state = ControlState::start(
            Config::from_toml_str(CONFIG).unwrap(),
            Default::default(),
            Arc::new(Accept),
            StateOptions {
                clock: fixed_clock,
                ..StateOptions::default()
            },
        )
        .unwrap();
        let mut w = DrainWatcher::default();
        let t0 = Instant::now();
        assert!(w.tick(t0, &state.snapshot(), &[], 0).is_empty());
        set_admin(&state, AdminState::Down);
        let snap = state.snapshot();
        let phases = |ev: Vec<DrainEvent>| ev.iter().map(|e| e.phase).collect::<Vec<_>>();
        let ev = w.tick(t0, &snap, &status(None, 0, false), fixed_clock());
        assert_eq!(phases(ev.clone()), [DrainPhase::Started]);
        assert_eq!(ev[0].deadline_in_ms, Some(10_000));
        assert_eq!(
            describe(&ev[0]),
            "drain pool=web member=198.18.1.11 phase=started flows_left=counting \
             deadline_in=10.000s action=reset flows_reset=0"
        );
        // Counted: progress, but at most once a second.
        assert!(w.tick(t0, &snap, &status(Some(3), 0, false), 0).is_empty());
        let t1 = t0 + PROGRESS_EVERY;
        assert_eq!(
            phases(w.tick(t1, &snap, &status(Some(3), 0, false), 0)),
            [DrainPhase::Progress]
        );
        assert!(w.tick(t1, &snap, &status(Some(3), 0, false), 0).is_empty());
        // The deadline resets what is left: deadline, then completed.
        let ev = w.tick(t1, &snap, &status(Some(0), 3, true), 0);
        assert_eq!(
            phases(ev.clone()),
            [DrainPhase::Deadline, DrainPhase::Completed]
        );
        assert_eq!((ev[0].flows_left, ev[0].flows_reset), (Some(0), 3));
        assert!(w
            .tick(t1 + PROGRESS_EVERY * 2, &snap, &status(Some(0), 3, true), 0)
            .is_empty());
        // Undrained and drained again: a new drain.
        set_admin(&state, AdminState::None);
        assert!(w.tick(t1, &state.snapshot(), &[], 0).is_empty());
        set_admin(&state, AdminState::Down);
        assert_eq!(
            phases(w.tick(t1, &state.snapshot(), &status(None, 0, false), 0)),
            [DrainPhase::Started]
        );
    }
}
