//! Probe verdicts and drain start times: what [`super::compile`] applies beside the
//! configuration.

use std::collections::{HashMap, HashSet};

use super::{AdminState, Config, Member};
use crate::addr::Addr;
use crate::time::Nanos;

/// Probe results: which (pool, member address) pairs currently fail their probes. The
/// default says every member is healthy. Admin state is applied on top by [`compile`]: `up`
/// makes a member eligible whatever this says, `down` makes it ineligible.
///
/// Health is per pool because probes are: when several rules with different probes share a
/// pool, the daemon decides how their results combine (e.g. healthy only if all pass) and
/// records the outcome here.
///
/// It also holds when each drained member's drain began (on the workers' time line), from
/// which `compile` computes the drain deadlines: the daemon stamps a member when its admin
/// state becomes `down` ([`MemberHealth::follow_drains`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberHealth {
    unhealthy: HashMap<String, HashSet<Addr>>,
    drain_started: HashMap<(String, Addr), Nanos>,
}

impl MemberHealth {
    /// Every member healthy.
    pub fn all_healthy() -> MemberHealth {
        MemberHealth::default()
    }

    /// Records a probe verdict.
    pub fn set_healthy(&mut self, pool: &str, member: impl Into<Addr>, healthy: bool) {
        let member = member.into();
        if healthy {
            if let Some(set) = self.unhealthy.get_mut(pool) {
                set.remove(&member);
                if set.is_empty() {
                    self.unhealthy.remove(pool);
                }
            }
        } else {
            self.unhealthy
                .entry(pool.to_string())
                .or_default()
                .insert(member);
        }
    }

    /// The probe verdict alone (admin state not applied).
    pub fn is_healthy(&self, pool: &str, member: impl Into<Addr>) -> bool {
        let member = member.into();
        self.unhealthy
            .get(pool)
            .is_none_or(|set| !set.contains(&member))
    }

    /// When the drain of `member` of `pool` began, if it is drained and that was recorded.
    pub fn drain_started(&self, pool: &str, member: impl Into<Addr>) -> Option<Nanos> {
        self.drain_started
            .get(&(pool.to_string(), member.into()))
            .copied()
    }

    /// Records that the drain of `member` of `pool` began at `at` (`None`: not drained).
    pub fn set_drain_started(&mut self, pool: &str, member: impl Into<Addr>, at: Option<Nanos>) {
        let key = (pool.to_string(), member.into());
        match at {
            Some(t) => {
                self.drain_started.insert(key, t);
            }
            None => {
                self.drain_started.remove(&key);
            }
        }
    }

    /// Brings the drain start times in line with `config`: a member whose admin state is
    /// `down` and who has no start yet began its drain at `now`; members that are no longer
    /// drained (or no longer exist) lose theirs. A member that stays drained keeps its start,
    /// so a changed `drain_timeout_seconds` counts from when the drain began.
    pub fn follow_drains(&mut self, config: &Config, now: Nanos) {
        let drained: HashSet<(String, Addr)> = config
            .backend_pools
            .iter()
            .flat_map(|p| {
                p.members
                    .iter()
                    .filter(|m| m.admin_state == AdminState::Down)
                    .map(|m| (p.name.clone(), Addr::from(m.address)))
            })
            .collect();
        self.drain_started.retain(|k, _| drained.contains(k));
        for key in drained {
            self.drain_started.entry(key).or_insert(now);
        }
    }

    /// Whether `member` of `pool` may get new flows: its admin state, else its probe verdict.
    pub fn eligible(&self, pool: &str, member: &Member) -> bool {
        match member.admin_state {
            AdminState::Up => true,
            AdminState::Down => false,
            AdminState::None => self.is_healthy(pool, member.address),
        }
    }
}
