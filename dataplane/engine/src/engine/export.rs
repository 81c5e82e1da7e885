//! One flow's state out of an engine and into another: the small API a flow-state sync
//! between cluster nodes (or any other store of flows) goes through, so that it needs nothing
//! of how the flow table is laid out.
//!
//! What travels is what the other engine cannot learn from the wire: the tuples and the
//! translation, the rule (by kind and name: rule ids are each node's own), the TCP tracking
//! (both next sequence numbers, windows, state) and how long the flow has been idle. Next hops
//! are not exported: the importing engine resolves them from its own kernel's routes and
//! neighbours, as a node's MACs and ports are its own.
//!
//! A flow can be imported *live* ([`Engine::import_flow`]: this engine owns it from now on) or
//! as a *standby* copy ([`Engine::import_standby`]: a cluster peer owns it and keeps sending
//! its state). The rule, for every flow a peer sends: **the latest state wins**. A synced
//! state whose last packet is later than this engine's last packet of the flow replaces the
//! flow's tracking and idle time and makes it standby (the peer owns it now: created here, or
//! a flow that moved away from this node); an older one changes nothing. A standby flow
//! forwards like any flow (a packet that reaches this node finds its backend, SNAT port and
//! sequence numbers), and its idle expiry is **silent** (no reset on idle, counted
//! `flows_reset_withheld`): the owner sends the RSTs, or the connection lives on there. The
//! first packet of the flow that reaches this node makes it live here — the router moved it.
//! Because a copy is as old as the sync's lag and refresh, its tracking lets a segment's
//! acknowledgement run ahead of it by a window (as for a picked-up flow); its reset on idle is
//! exact as of what the copy held plus everything seen here since.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::{hop_error, live_flows, Engine};
use crate::addr::Addr;
use crate::flow::{Flow, FlowId, InsertError, Nat};
use crate::hashkey::HashKey;
use crate::ruleset::RuleKind;
use crate::tcp::{TcpTrack, ORIG};
use crate::time::Nanos;
use crate::wire::proto;
use crate::DropReason;

/// A flow's state, as [`Engine::export_flow`] gives it and [`Engine::import_flow`] takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowState {
    pub rule_kind: RuleKind,
    pub rule_name: Arc<str>,
    pub proto: u8,
    pub nat: Nat,
    pub orig_src: Addr,
    pub orig_dst: Addr,
    pub orig_sport: u16,
    pub orig_dport: u16,
    /// The translated address and port (DNAT: the member; SNAT: the SNAT address).
    pub xlat: Addr,
    pub xlat_port: u16,
    pub tcp: TcpTrack,
    /// Time since the flow's last packet, when it was exported.
    pub idle: Nanos,
}

/// What an import did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imported {
    /// A new flow, with this id.
    Created(FlowId),
    /// The flow exists here already: what this engine saw itself is kept.
    AlreadyHere(FlowId),
    /// A standby flow that had seen no packet here took the newer synced state.
    Refreshed(FlowId),
}

impl FlowState {
    /// The endpoint that steering hashes for this flow (the side that is not the frontend:
    /// the client of an inbound flow, the remote host of an outbound one), as
    /// [`crate::engine::owner`] hashes it for the flow's frames.
    pub fn steering_endpoint(&self) -> (Addr, u16) {
        match self.nat {
            Nat::Snat => (self.orig_dst, self.orig_dport),
            Nat::Dnat | Nat::None => (self.orig_src, self.orig_sport),
        }
    }

    /// The worker among `workers` whose engine holds this flow under steering key `key`: the
    /// one the data path steers the flow's frames to.
    pub fn owner(&self, key: &HashKey, workers: u16) -> u16 {
        if workers <= 1 {
            return 0;
        }
        let (addr, port) = self.steering_endpoint();
        super::steer(key, addr, port, workers)
    }
}

/// The standby flows of one engine: flow slot → (the `last_seen` the latest synced state set,
/// the hash of the flow's original key). A flow is standby while both still match: a packet
/// here moves `last_seen`, and a slot reused by another flow changes the key. Bounded by the
/// flow table's slots; entries of flows that ended are dropped when the slot is looked at.
#[derive(Clone, Debug, Default)]
pub(super) struct Standby {
    marks: HashMap<FlowId, (Nanos, u64)>,
}

/// Why a flow's state is handed to a sync ([`Engine::sync_export`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncReason {
    /// The flow was created, or its TCP state changed (established, closed, reset).
    Noted,
    /// The periodic refresh of a flow that saw packets since the previous pass.
    Refresh,
}

/// Flows to hand to a flow-state sync: the ids noted at creation and at TCP state changes
/// (a ring preallocated when the sync is enabled, so the data path never allocates; an id
/// that finds it full is lost, counted), and the refresh pass's cursor.
#[derive(Clone, Debug, Default)]
pub(super) struct SyncLog {
    on: bool,
    noted: VecDeque<FlowId>,
    capacity: usize,
    lost: u64,
    cursor: u32,
    /// When the current refresh pass began, and the one before it: a flow with a packet
    /// after the previous pass's start is refreshed (every slot was looked at after that).
    pass_started: Nanos,
    previous_pass_started: Nanos,
}

impl Engine {
    /// Notes flow changes for [`sync_export`](Self::sync_export) from now on, in a ring of
    /// `ring` ids.
    pub fn enable_sync(&mut self, ring: usize) {
        let log = &mut self.sync;
        log.on = true;
        log.capacity = ring.max(1);
        log.noted = VecDeque::with_capacity(log.capacity);
    }

    /// Flow changes the full ring did not take (their flows are still sent by the refresh
    /// pass if they see packets).
    pub fn sync_lost(&self) -> u64 {
        self.sync.lost
    }

    /// Notes flow `id` for the sync (creation, TCP state change); no-op while it is off.
    #[inline]
    pub(super) fn sync_note(&mut self, id: FlowId) {
        let log = &mut self.sync;
        if !log.on {
            return;
        }
        if log.noted.len() < log.capacity {
            log.noted.push_back(id);
        } else {
            log.lost += 1;
        }
    }

    /// Hands the sync at most `budget` flow states: first the noted flows, then the refresh
    /// pass, which looks at up to `scan` more slots and exports those with a packet since the
    /// previous pass began. Standby flows (a peer's) are never exported: only their owner's
    /// states travel. Returns how many were handed.
    pub fn sync_export(
        &mut self,
        now: Nanos,
        budget: usize,
        scan: u32,
        mut f: impl FnMut(SyncReason, FlowState),
    ) -> usize {
        let mut handed = 0;
        while handed < budget {
            let Some(id) = self.sync.noted.pop_front() else {
                break;
            };
            if self.flows.is_live(id) && !self.is_standby(id, &self.flows.get(id)) {
                if let Some(s) = self.export_flow(now, id) {
                    f(SyncReason::Noted, s);
                    handed += 1;
                }
            }
        }
        let capacity = self.flows.capacity();
        let mut looked = 0;
        while handed < budget && looked < scan && capacity > 0 {
            let id = self.sync.cursor;
            looked += 1;
            // With the time XDP recorded: a flow the fast path keeps busy is refreshed at the
            // peers like any other, although the worker saw none of its packets.
            let fresh = self.flows.is_live(id) && {
                let fl = self.fast_view(id, &self.flows.get(id));
                fl.last_seen > self.sync.previous_pass_started && !self.is_standby(id, &fl)
            };
            if fresh {
                if let Some(s) = self.export_flow(now, id) {
                    f(SyncReason::Refresh, s);
                    handed += 1;
                }
            }
            if id + 1 >= capacity {
                // A pass ends: the next one starts at the next call.
                self.sync.cursor = 0;
                self.sync.previous_pass_started = self.sync.pass_started;
                self.sync.pass_started = now;
                break;
            }
            self.sync.cursor = id + 1;
        }
        handed
    }

    /// The state of flow `id` at `now`; `None` when the slot holds no flow, or its rule is
    /// gone (an orphan drains where it is).
    pub fn export_flow(&self, now: Nanos, id: FlowId) -> Option<FlowState> {
        if !self.flows.is_live(id) {
            return None;
        }
        let f = &self.fast_view(id, &self.flows.get(id));
        let rule = self.rules.rule(f.rule)?;
        Some(FlowState {
            rule_kind: rule.kind,
            rule_name: Arc::clone(&rule.name),
            proto: f.proto,
            nat: f.nat,
            orig_src: f.orig_src,
            orig_dst: f.orig_dst,
            orig_sport: f.orig_sport,
            orig_dport: f.orig_dport,
            xlat: f.xlat,
            xlat_port: f.xlat_port,
            tcp: f.tcp,
            idle: now.saturating_sub(f.last_seen),
        })
    }

    /// Adds the flow `s` describes, as of `now`: its rule looked up by kind and name, its next
    /// hops resolved here, an outbound flow's SNAT port marked in use. The caller hands it to
    /// the worker that owns the flow (`owner` of one of its frames). Refused with a drop
    /// reason when its rule does not exist here (`NoRule`), the table is full, or a next hop
    /// is not known yet (the caller may retry once the kernel resolved it).
    pub fn import_flow(&mut self, now: Nanos, s: &FlowState) -> Result<Imported, DropReason> {
        self.import(now, s, false)
    }

    /// Adds or refreshes the standby copy of a flow a cluster peer owns (see the module's
    /// rule): created as [`import_flow`](Self::import_flow) creates it but marked standby; a
    /// flow already here takes `s`'s tracking and idle time when they are later than its own
    /// and becomes standby (`Refreshed`), or is kept as it is (`AlreadyHere`).
    pub fn import_standby(&mut self, now: Nanos, s: &FlowState) -> Result<Imported, DropReason> {
        self.import(now, s, true)
    }

    /// Whether flow `id` is a standby copy that has seen no packet here.
    pub fn is_standby_flow(&self, id: FlowId) -> bool {
        self.flows.is_live(id) && self.is_standby(id, &self.flows.get(id))
    }

    /// Standby flows of this engine (an upper bound: marks of flows that ended since are
    /// counted until their slot is looked at again).
    pub fn standby_marks(&self) -> usize {
        self.standby.marks.len()
    }

    /// The `last_seen` that makes flow `id` a standby copy, for the flow store.
    pub(super) fn standby_seen(&self, id: FlowId) -> Option<u64> {
        self.standby.marks.get(&id).map(|&(seen, _)| seen)
    }

    /// Marks restored flow `id` standby while its `last_seen` is `seen` (the flow store kept
    /// the mark, so a restart does not turn a peer's flows into this node's own).
    pub(super) fn restore_standby(&mut self, id: FlowId, seen: u64) {
        let key = self.flows.hash(&self.flows.get(id).key(ORIG));
        self.standby.marks.insert(id, (seen, key));
    }

    pub(super) fn is_standby(&self, id: FlowId, f: &Flow) -> bool {
        match self.standby.marks.get(&id) {
            None => false,
            Some(&(seen, key)) => seen == f.last_seen && key == self.flows.hash(&f.key(ORIG)),
        }
    }

    fn import(&mut self, now: Nanos, s: &FlowState, standby: bool) -> Result<Imported, DropReason> {
        let rule = self
            .rules
            .rule_id(s.rule_kind, &s.rule_name)
            .ok_or(DropReason::NoRule)?;
        let flow = Flow {
            orig_src: s.orig_src,
            orig_dst: s.orig_dst,
            xlat: s.xlat,
            orig_sport: s.orig_sport,
            orig_dport: s.orig_dport,
            xlat_port: s.xlat_port,
            proto: s.proto,
            nat: s.nat,
            rule,
            next_hop: [0; 2],
            tcp: if s.proto == proto::TCP && standby {
                s.tcp.behind()
            } else if s.proto == proto::TCP {
                s.tcp
            } else {
                TcpTrack::NONE
            },
            last_seen: now.saturating_sub(s.idle),
        };
        let key = flow.key(ORIG);
        let hash = self.flows.hash(&key);
        if let Some((id, _)) = self.flows.lookup(&key, hash) {
            return Ok(self.refresh(now, id, &flow, standby));
        }
        if self.flows.len() >= self.flows.capacity() as usize {
            return Err(DropReason::FlowTableFull);
        }
        // Toward the member or the remote host, and back toward the client or the member.
        let (toward, back_to) = match flow.nat {
            Nat::Snat => (flow.orig_dst, flow.orig_src),
            Nat::Dnat | Nat::None => (flow.xlat, flow.orig_src),
        };
        let forward = self.net.resolve(toward).map_err(hop_error)?;
        let back = self.net.resolve(back_to).map_err(hop_error)?;
        let mut flow = flow;
        flow.next_hop = [forward, back];
        let id = self.flows.insert_new(flow, hash).map_err(|e| match e {
            InsertError::Full => DropReason::FlowTableFull,
            InsertError::Conflict => DropReason::TupleConflict,
        })?;
        self.net.acquire(forward);
        self.net.acquire(back);
        if flow.nat == Nat::Snat {
            self.snat.reserve(flow.xlat, flow.proto, flow.xlat_port);
        }
        if self.late.forget(hash) {
            self.store.put_late(&self.late, self.late.slot_of(hash));
        }
        live_flows(&mut self.counters, rule);
        if standby {
            self.standby.marks.insert(id, (flow.last_seen, hash));
        } else {
            self.standby.marks.remove(&id);
        }
        let deadline = self.deadline(&self.flows.get(id));
        // Confirmed where it ran: never evicted as a half-open flow here.
        self.wheel.insert(id, deadline);
        // Into the flow store like any other flow: it outlives this process too.
        let hops = [self.net.get(forward), self.net.get(back)];
        self.store.put(id, &self.flows.get(id), true, hops);
        if standby {
            self.store.put_standby(id, flow.last_seen);
        }
        Ok(Imported::Created(id))
    }

    /// A synced state of flow `id`, which exists here: taken when it is later than this
    /// node's last packet of the flow (as recent, for a standby copy); the flow is standby
    /// from then on.
    fn refresh(&mut self, now: Nanos, id: FlowId, synced: &Flow, standby: bool) -> Imported {
        self.fast_pull(now, id);
        let here = self.flows.get(id);
        // A standby copy takes a state as recent as its own; a flow live here only a later one.
        let newer = if self.is_standby(id, &here) {
            synced.last_seen >= here.last_seen
        } else {
            synced.last_seen > here.last_seen
        };
        if !standby || !newer {
            return Imported::AlreadyHere(id);
        }
        // A standby copy is never fast, and never ended by a drain here (its owner does).
        if self.fast_drop_drain_end(id) {
            let rules = Arc::clone(&self.rules);
            self.census.ended_one(rules.drains());
        }
        self.fast_withdraw(id);
        let f = self.flows.get_mut(id);
        f.last_seen = synced.last_seen;
        f.tcp = synced.tcp;
        let key = self.flows.hash(&synced.key(ORIG));
        self.standby.marks.insert(id, (synced.last_seen, key));
        self.store.put_live(id, self.flows.track(id));
        self.store.put_standby(id, synced.last_seen);
        let deadline = self.deadline(&self.flows.get(id));
        self.wheel.insert(id, deadline);
        Imported::Refreshed(id)
    }
}
