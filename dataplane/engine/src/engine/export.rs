//! One flow's state out of an engine and into another: the small API a flow-state sync
//! between cluster nodes (or any other store of flows) goes through, so that it needs nothing
//! of how the flow table is laid out.
//!
//! What travels is what the other engine cannot learn from the wire: the tuples and the
//! translation, the rule (by kind and name: rule ids are each node's own), the TCP tracking
//! (both next sequence numbers, windows, state) and how long the flow has been idle. Next hops
//! are not exported: the importing engine resolves them from its own kernel's routes and
//! neighbours, as a node's MACs and ports are its own.

use std::sync::Arc;

use super::{hop_error, live_flows, Engine};
use crate::addr::Addr;
use crate::flow::{Flow, FlowId, InsertError, Nat};
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
}

impl Engine {
    /// The state of flow `id` at `now`; `None` when the slot holds no flow, or its rule is
    /// gone (an orphan drains where it is).
    pub fn export_flow(&self, now: Nanos, id: FlowId) -> Option<FlowState> {
        if !self.flows.is_live(id) {
            return None;
        }
        let f = self.flows.get(id);
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
            tcp: if s.proto == proto::TCP {
                s.tcp
            } else {
                TcpTrack::NONE
            },
            last_seen: now.saturating_sub(s.idle),
        };
        let key = flow.key(ORIG);
        let hash = self.flows.hash(&key);
        if let Some((id, _)) = self.flows.lookup(&key, hash) {
            return Ok(Imported::AlreadyHere(id));
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
        let deadline = self.deadline(self.flows.get(id));
        // Confirmed where it ran: never evicted as a half-open flow here.
        self.wheel.insert(id, deadline);
        // Into the flow store like any other flow: it outlives this process too.
        let hops = [self.net.get(forward), self.net.get(back)];
        self.store.put(id, self.flows.get(id), true, hops);
        Ok(Imported::Created(id))
    }
}
