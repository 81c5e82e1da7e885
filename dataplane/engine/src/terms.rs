//! The terms the configuration, the compiled rule set and backend selection share: protocol
//! numbers, how a new flow picks its member, what a packet without a flow gets, the 5-tuple.
//! A leaf module (it imports none of them), so that `config`, `ruleset` and `select` do not
//! import each other for these.

use serde::{Deserialize, Serialize};

use crate::addr::Addr;

/// IP protocol numbers the rule set matches on.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    /// src IP, src port, dst IP, dst port, protocol.
    #[default]
    FiveTuple,
    /// src IP + dst IP: one client sticks to one member.
    SourceIp,
    /// src IP + dst IP + protocol.
    SourceIpProtocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownFlowPolicy {
    /// Drop and count `no_flow` (default).
    #[default]
    Drop,
    /// Answer with a TCP RST, as a NAT gateway does.
    Reset,
    /// Re-create the flow with the same deterministic backend choice.
    Pickup,
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
