//! The compiled, immutable rule set a worker runs: dense ids, precomputed backend tables and
//! SNAT port blocks. Built by [`crate::compile`] from a validated [`crate::config::Config`]; a
//! worker swaps its `Arc<RuleSet>` at a batch boundary and only ever indexes into it.
//!
//! OWNER: config helper. The engine relies on exactly the public API below.

use std::sync::Arc;

use crate::addr::Addr;
use crate::time::Nanos;

/// Stable id of a rule (any kind). Ids are kept across generations for a rule of the same
/// kind and name, so that flows, which store the id, follow their rule's current settings.
pub type RuleId = u16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleKind {
    LoadBalancing,
    InboundNat,
    Outbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum UnknownFlowPolicy {
    /// Drop and count `no_flow` (default).
    #[default]
    Drop,
    /// Answer with a TCP RST, as a NAT gateway does.
    Reset,
    /// Re-create the flow with the same deterministic backend choice.
    Pickup,
}

/// What a flow needs from its rule; looked up by [`RuleId`] at every expiry check, so changes
/// apply to existing flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleParams {
    pub kind: RuleKind,
    pub name: Arc<str>,
    /// TCP idle timeout, already divided by the lab time scale.
    pub idle_timeout: Nanos,
    /// Effective TCP reset on idle: already false for HA-ports rules on internal frontends.
    pub tcp_reset: bool,
    pub unknown_flow: UnknownFlowPolicy,
    pub floating_ip: bool,
}

/// Daemon-wide timers, already divided by the lab time scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    /// Idle timeout of every UDP flow (default 4 min), independent of the rules' TCP timeout.
    pub udp_idle: Nanos,
    /// How long a closed TCP flow (FIN both ways, or RST) lingers before removal.
    pub tcp_close_linger: Nanos,
    /// How long a TCP flow that has not reached ESTABLISHED may stay idle.
    pub tcp_half_open: Nanos,
    /// SNAT port release after a FIN (240 s).
    pub snat_fin_release: Nanos,
    /// SNAT port release after an RST (15 s).
    pub snat_rst_release: Nanos,
    /// A packet for a flow that expired idle less than this long ago counts as `late`.
    pub late_window: Nanos,
}

/// The 5-tuple of a packet, as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub proto: u8,
    pub src: Addr,
    pub src_port: u16,
    pub dst: Addr,
    pub dst_port: u16,
}

/// The member chosen for a new inbound flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Destination port after translation (the frontend port for HA ports and floating IP).
    pub port: u16,
}

/// A contiguous block of SNAT ports on one frontend IP, allocated to one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortBlock {
    pub addr: Addr,
    pub first_port: u16,
    /// Number of ports (a multiple of 8).
    pub count: u16,
}

/// The compiled rule set.
#[derive(Debug)]
pub struct RuleSet {
    _todo: (),
}

impl RuleSet {
    /// Configuration generation this set was compiled from.
    pub fn generation(&self) -> u64 {
        todo!()
    }
    pub fn timers(&self) -> &Timers {
        todo!()
    }
    /// Parameters of the rule with this id, or `None` if it was deleted.
    pub fn rule(&self, id: RuleId) -> Option<&RuleParams> {
        let _ = id;
        todo!()
    }
    /// One more than the largest rule id in use (size for per-rule counter arrays).
    pub fn rule_id_bound(&self) -> usize {
        todo!()
    }
    /// Whether `addr` is a frontend IP (of any rule kind, including outbound SNAT addresses).
    pub fn is_frontend(&self, addr: Addr) -> bool {
        let _ = addr;
        todo!()
    }
    /// The load-balancing or inbound NAT rule that serves a packet addressed to
    /// `dst`:`dst_port` with protocol `proto`. Inbound NAT rules and specific-port LB rules win
    /// over HA ports.
    pub fn match_inbound(&self, proto: u8, dst: Addr, dst_port: u16) -> Option<RuleId> {
        let _ = (proto, dst, dst_port);
        todo!()
    }
    /// Chooses the backend of a new flow of rule `id` (LB or inbound NAT) among healthy members
    /// by the rule's distribution mode. Deterministic: the same tuple and rule set give the
    /// same answer (this is what `pickup` relies on). `None`: no healthy member.
    pub fn select_backend(&self, id: RuleId, tuple: &FlowTuple) -> Option<Backend> {
        let _ = (id, tuple);
        todo!()
    }
    /// The outbound rule that SNATs a new connection from member address `src`, and that
    /// member's port blocks.
    pub fn match_outbound(&self, proto: u8, src: Addr) -> Option<(RuleId, &[PortBlock])> {
        let _ = (proto, src);
        todo!()
    }
}
