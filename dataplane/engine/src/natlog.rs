//! NAT event log: the engine's side of the NAT event records (IPFIX, RFC 8158) the daemon
//! exports. When it is on, the engine notes every SNAT port allocation and release (and, if
//! asked, every load-balancing flow created and removed) as a small fixed-size record in a
//! bounded queue that the worker drains at its next loop iteration; the daemon encodes and
//! sends them off the worker. A full queue drops the record and counts it lost: logging never
//! slows or stops the data path. Off (the default), it costs one predictable branch per flow
//! created or removed, nothing per packet.

use crate::addr::Addr;
use crate::flow::{Flow, Nat};
use crate::ruleset::RuleId;
use crate::time::Nanos;

/// Which flows are logged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NatLogMode {
    #[default]
    Off,
    /// SNAT port allocations and releases (outbound rules).
    Snat,
    /// SNAT, and load-balancing / inbound NAT / floating-IP flows created and removed.
    SnatAndInbound,
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatEventKind {
    /// A flow (and, for SNAT, its port) was created.
    Create,
    /// A flow was removed (for SNAT: its port is free again).
    Delete,
}

/// One NAT event, as the worker hands it on: about 90 bytes, `Copy`, no heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatEvent {
    /// On the worker's time line; the daemon turns it into wall-clock time.
    pub at: Nanos,
    pub kind: NatEventKind,
    pub nat: Nat,
    pub proto: u8,
    pub rule: RuleId,
    /// The original source (the member of an SNAT flow, the client of an inbound one) ...
    pub src: (Addr, u16),
    /// ... and what the network on the other side sees instead (the SNAT address and port;
    /// the client unchanged for inbound flows).
    pub post_src: (Addr, u16),
    /// The original destination (the remote host; the frontend of an inbound flow) ...
    pub dst: (Addr, u16),
    /// ... and where the packet really goes (the remote host unchanged; the member).
    pub post_dst: (Addr, u16),
}

impl NatEvent {
    /// The event of `kind` for flow `f` at `at`.
    pub fn of(f: &Flow, kind: NatEventKind, at: Nanos) -> NatEvent {
        let src = (f.orig_src, f.orig_sport);
        let dst = (f.orig_dst, f.orig_dport);
        let (post_src, post_dst) = match f.nat {
            Nat::Snat => ((f.xlat, f.xlat_port), dst),
            Nat::Dnat | Nat::None => (src, (f.xlat, f.xlat_port)),
        };
        NatEvent {
            at,
            kind,
            nat: f.nat,
            proto: f.proto,
            rule: f.rule,
            src,
            post_src,
            dst,
            post_dst,
        }
    }
}

/// The bounded queue of one engine.
#[derive(Clone, Debug)]
pub(crate) struct NatLog {
    pub(crate) mode: NatLogMode,
    queue: Vec<NatEvent>,
    capacity: usize,
    /// Records dropped because the queue was full.
    pub(crate) lost: u64,
}

impl NatLog {
    pub(crate) fn new(mode: NatLogMode, capacity: usize) -> NatLog {
        let capacity = if mode == NatLogMode::Off { 0 } else { capacity };
        NatLog {
            mode,
            queue: Vec::with_capacity(capacity),
            capacity,
            lost: 0,
        }
    }

    /// Whether flows of this translation are logged.
    #[inline]
    pub(crate) fn wants(&self, nat: Nat) -> bool {
        match self.mode {
            NatLogMode::Off => false,
            NatLogMode::Snat => nat == Nat::Snat,
            NatLogMode::SnatAndInbound => true,
        }
    }

    #[inline]
    pub(crate) fn note(&mut self, f: &Flow, kind: NatEventKind, at: Nanos) {
        if !self.wants(f.nat) {
            return;
        }
        if self.queue.len() < self.capacity {
            self.queue.push(NatEvent::of(f, kind, at));
        } else {
            self.lost += 1;
        }
    }

    pub(crate) fn drain(&mut self, f: &mut impl FnMut(NatEvent)) {
        for e in self.queue.drain(..) {
            f(e);
        }
    }
}
