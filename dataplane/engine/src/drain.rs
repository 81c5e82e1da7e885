//! Drain with a deadline: the members an operator drains (admin state `down`), how many flows
//! each still has on this worker, and what happens to them at the deadline.
//!
//! A drained member gets no new flow from the moment the rule set that drains it runs (its
//! pools' Maglev tables leave it out, as for a failed probe). Its flows are found by a
//! **census**: a walk over the flow table a bounded number of slots per
//! [`crate::Engine::expire`] call, started every [`EngineConfig::drain_census_interval`]
//! while a drain is open and at once when a deadline passes. Nothing is added to the packet
//! path. A round counts, per drain, the flows whose rule sends to the member's pool and whose
//! backend is the member; a round that *starts* at or after a drain's deadline also ends them
//! when the drain's action is `reset`: established TCP flows get the two RSTs of reset on idle
//! (exact sequence numbers, both ends), other TCP flows are removed silently. UDP flows are
//! left to move at their next datagram, as they do all along the drain.
//!
//! A flow published to the XDP fast path is not reset by the round itself: XDP may advance
//! its sequence numbers up to the moment its `FAST` bit is cleared, and a little after. The
//! round clears the bit and hands the flow to the timer wheel, which resets it once two grace
//! rounds have passed (a tick or so later), from its lines read a last time; its packets
//! meanwhile reach the worker and do not publish it again. The deadline counts as done on the
//! worker when the round has finished and every flow it handed over is ended.
//!
//! Once every open drain found no flow and has no deadline still to come, rounds stop until
//! the next rule set: a drained member gets no new flows, so its count cannot grow.
//!
//! [`EngineConfig::drain_census_interval`]: crate::EngineConfig

use std::sync::Arc;

use crate::addr::Addr;
use crate::config::{AdminState, Config, DrainAction, MemberHealth};
use crate::ruleset::{RuleId, RuleKind, RuleSet};
use crate::time::{secs, Nanos};

/// Flow slots a census looks at per `expire` call: about 4–10 µs of work.
pub const CENSUS_SLOTS_PER_CALL: u32 = 4096;

/// One drained member, as compiled into a [`crate::RuleSet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drain {
    pub pool: Arc<str>,
    pub member: Addr,
    /// The load-balancing and inbound NAT rules that send to `pool`, ascending: the rules
    /// whose flows to `member` belong to this drain.
    pub rules: Box<[RuleId]>,
    /// When the remaining flows meet `action`, on the workers' time line; `None`: drained
    /// until undrained.
    pub deadline: Option<Nanos>,
    pub action: DrainAction,
}

impl Drain {
    /// Whether a flow of `rule` whose backend is `backend` belongs to this drain.
    #[inline]
    pub fn covers(&self, rule: RuleId, backend: Addr) -> bool {
        self.member == backend && self.rules.binary_search(&rule).is_ok()
    }
}

/// What one worker knows of one drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainProgress {
    pub pool: Arc<str>,
    pub member: Addr,
    /// Flows of the member found by the last complete census round (`None` before the first).
    pub flows_left: Option<u64>,
    /// TCP flows ended at the deadline with an RST to both ends.
    pub flows_reset: u64,
    /// TCP flows ended at the deadline without RSTs (not established: no sequence numbers to
    /// send).
    pub flows_ended: u64,
    /// A census round that started at or after the deadline has completed: the deadline's
    /// action is done on this worker.
    pub deadline_done: bool,
}

/// The census of one worker's engine (see the module notes).
#[derive(Clone, Debug, Default)]
pub(crate) struct Census {
    /// The slot the running round looks at next; `None` between rounds.
    pub(crate) cursor: Option<u32>,
    /// When the running round started: it applies the deadlines that passed by then.
    pub(crate) round_started: Nanos,
    pub(crate) next_round: Nanos,
    /// Flows counted by the running round, per drain of the rule set.
    pub(crate) counting: Vec<u64>,
    /// Per drain of the rule set, in its order.
    pub(crate) progress: Vec<DrainProgress>,
    /// No round is needed until the rule set changes.
    pub(crate) settled: bool,
    /// Flows a round ended through the fast path's grace (see the module notes) that are not
    /// ended yet.
    pub(crate) ending: u32,
    /// When the round that finished while flows were still `ending` started: the deadlines
    /// it applied are done once they are.
    pub(crate) held: Option<Nanos>,
}

impl Census {
    /// Follows a new rule set's drains: progress of members still drained is kept (a drain
    /// that ends and starts again starts from zero), a running round restarts.
    pub(crate) fn set_drains(&mut self, drains: &[Drain]) {
        let old = std::mem::take(&mut self.progress);
        self.progress = drains
            .iter()
            .map(|d| {
                old.iter()
                    .find(|p| p.pool == d.pool && p.member == d.member)
                    .cloned()
                    .map(|mut p| {
                        // A later deadline (the operator extended it) is not done yet.
                        if d.deadline.is_none_or(|t| t > self.round_started) {
                            p.deadline_done = false;
                        }
                        p
                    })
                    .unwrap_or(DrainProgress {
                        pool: Arc::clone(&d.pool),
                        member: d.member,
                        flows_left: None,
                        flows_reset: 0,
                        flows_ended: 0,
                        deadline_done: false,
                    })
            })
            .collect();
        self.counting = vec![0; drains.len()];
        self.cursor = None;
        self.next_round = 0;
        // Flows still `ending` are ended (or their end called off) against the new drains;
        // the round that starts now decides what is done.
        self.held = None;
        self.settled = drains.is_empty() && self.ending == 0;
    }

    /// The earliest time at which the census has work.
    pub(crate) fn next_due(&self, drains: &[Drain]) -> Option<Nanos> {
        if self.settled {
            return None;
        }
        if self.cursor.is_some() {
            return Some(0);
        }
        let held = self.held;
        let deadline = drains
            .iter()
            .zip(&self.progress)
            .filter(|(_, p)| !p.deadline_done)
            .filter_map(|(d, _)| d.deadline)
            // A deadline waiting for its flows' ends needs no new round.
            .filter(|&t| held.is_none_or(|h| t > h))
            .min();
        Some(deadline.map_or(self.next_round, |d| d.min(self.next_round)))
    }

    /// Starts a round if one is due at `now`.
    pub(crate) fn maybe_start(&mut self, now: Nanos, drains: &[Drain]) {
        if self.cursor.is_some() || self.settled {
            return;
        }
        if self.next_due(drains).is_some_and(|t| t <= now) {
            self.cursor = Some(0);
            self.round_started = now;
            self.counting.iter_mut().for_each(|c| *c = 0);
        }
    }

    /// Whether the running round ends flows of drain `i` (its deadline passed when the round
    /// started and its action is `reset`).
    pub(crate) fn ends_flows(&self, drains: &[Drain], i: usize) -> bool {
        let d = &drains[i];
        d.action == DrainAction::Reset && d.deadline.is_some_and(|t| t <= self.round_started)
    }

    /// The running round has looked at every slot.
    pub(crate) fn finish_round(&mut self, drains: &[Drain], interval: Nanos) {
        self.cursor = None;
        self.next_round = self.round_started.saturating_add(interval.max(1));
        for (p, &n) in self.progress.iter_mut().zip(&self.counting) {
            p.flows_left = Some(n);
        }
        if self.ending > 0 {
            self.held = Some(self.round_started);
            self.settled = false;
            return;
        }
        self.held = None;
        self.deadlines_done(drains, self.round_started);
    }

    /// A flow counted in `ending` is ended (or its end called off): once none is left, the
    /// deadlines of the round that handed them over are done.
    pub(crate) fn ended_one(&mut self, drains: &[Drain]) {
        self.ending = self.ending.saturating_sub(1);
        if self.ending == 0 {
            if let Some(started) = self.held.take() {
                self.deadlines_done(drains, started);
            }
        }
    }

    /// Marks done the deadlines that passed by `started` (a finished round's start) and
    /// settles when nothing is left to do.
    fn deadlines_done(&mut self, drains: &[Drain], started: Nanos) {
        for (p, d) in self.progress.iter_mut().zip(drains) {
            if d.deadline.is_some_and(|t| t <= started) {
                p.deadline_done = true;
            }
        }
        self.settled = self
            .progress
            .iter()
            .zip(drains)
            .all(|(p, d)| p.flows_left == Some(0) && (d.deadline.is_none() || p.deadline_done));
    }
}

/// The drained members of `config` (admin state `down`), with the rules of `rs` that send to
/// their pools and their deadlines from the drain start `health` recorded (none recorded: no
/// deadline).
pub(crate) fn compile(
    config: &Config,
    rs: &RuleSet,
    health: &MemberHealth,
    scale: u64,
) -> Vec<Drain> {
    let mut out = Vec::new();
    for pool in &config.backend_pools {
        let mut rules: Vec<RuleId> = config
            .load_balancing_rules
            .iter()
            .filter(|r| r.backend_pool == pool.name)
            .filter_map(|r| rs.rule_id(RuleKind::LoadBalancing, &r.name))
            .chain(
                config
                    .inbound_nat_rules
                    .iter()
                    .filter(|r| r.backend_pool.as_deref() == Some(pool.name.as_str()))
                    .filter_map(|r| rs.rule_id(RuleKind::InboundNat, &r.name)),
            )
            .collect();
        rules.sort_unstable();
        let name: Arc<str> = Arc::from(pool.name.as_str());
        for m in pool
            .members
            .iter()
            .filter(|m| m.admin_state == AdminState::Down)
        {
            let deadline = match (
                m.drain_timeout_seconds,
                health.drain_started(&pool.name, m.address),
            ) {
                (Some(t), Some(started)) => {
                    Some(started.saturating_add(secs(u64::from(t)) / scale))
                }
                _ => None,
            };
            out.push(Drain {
                pool: Arc::clone(&name),
                member: Addr::from(m.address),
                rules: rules.clone().into_boxed_slice(),
                deadline,
                action: m.drain_action,
            });
        }
    }
    out
}
