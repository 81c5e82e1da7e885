//! The compiled, immutable rule set a worker runs: dense ids, precomputed backend tables and
//! SNAT port blocks. Built by [`crate::compile`] from a validated [`crate::config::Config`]; a
//! worker swaps its `Arc<RuleSet>` at a batch boundary and only ever indexes into it.
//!
//! OWNER: config helper. The engine relies on exactly the public API below.
//!
//! Lookups are built for the per-packet path: `match_inbound` is one hash probe (two for an
//! HA-ports frontend), `select_backend` hashes the tuple and indexes a precomputed Maglev
//! table, `match_outbound` is one hash probe. None of them allocates.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use crate::addr::Addr;
use crate::drain::Drain;
use crate::select::{flow_hash, reduce, FastBuild, PoolTable};
pub use crate::terms::{Distribution, FlowTuple, UnknownFlowPolicy, PROTO_TCP, PROTO_UDP};
use crate::time::{secs, Nanos};

/// Stable id of a rule (any kind). Ids are kept across generations for a rule of the same
/// kind and name, so that flows, which store the id, follow their rule's current settings.
pub type RuleId = u16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleKind {
    LoadBalancing,
    InboundNat,
    Outbound,
}

impl RuleKind {
    /// The operator's name of the kind, wherever one is shown: Prometheus' `kind` label,
    /// `xlbctl`'s tables and JSON (the API's enum spells it `RULE_KIND_<NAME>`).
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::LoadBalancing => "load_balancing",
            RuleKind::InboundNat => "inbound_nat",
            RuleKind::Outbound => "outbound",
        }
    }

    /// The kind's short key in xlbd's one-line formats: the status line (`lb.web[…]`) and
    /// the stats file (`rule.lb.web.flows_created`).
    pub fn key(self) -> &'static str {
        match self {
            RuleKind::LoadBalancing => "lb",
            RuleKind::InboundNat => "nat",
            RuleKind::Outbound => "out",
        }
    }
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

impl Default for Timers {
    /// The unscaled defaults (lab time scale 1).
    fn default() -> Timers {
        Timers {
            udp_idle: secs(240),
            // Long enough for the last ACK of a FIN exchange, or a retransmitted FIN, to find
            // the flow and be translated; short enough that closed flows free their slot soon.
            tcp_close_linger: secs(2),
            // Shorter than any idle timeout, so a SYN flood cannot pin entries for minutes; a
            // client whose handshake stalls longer retransmits its SYN, which creates the flow
            // again with the same deterministic backend.
            tcp_half_open: secs(30),
            snat_fin_release: secs(240),
            snat_rst_release: secs(15),
            late_window: secs(120),
        }
    }
}

impl Timers {
    /// Every timer divided by the lab time scale (`scale` 0 is treated as 1).
    pub fn scaled(self, scale: u64) -> Timers {
        let s = scale.max(1);
        Timers {
            udp_idle: self.udp_idle / s,
            tcp_close_linger: self.tcp_close_linger / s,
            tcp_half_open: self.tcp_half_open / s,
            snat_fin_release: self.snat_fin_release / s,
            snat_rst_release: self.snat_rst_release / s,
            late_window: self.late_window / s,
        }
    }
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
    pub(crate) generation: u64,
    pub(crate) timers: Timers,
    /// Indexed by `RuleId`; `None` for ids not in use (deleted rules, holes).
    pub(crate) rules: Vec<Option<CompiledRule>>,
    pub(crate) inbound: HashMap<InboundKey, RuleId, FastBuild>,
    /// HA-ports rules by frontend address: the fallback when no specific port matches.
    pub(crate) ha_ports: HashMap<Addr, RuleId, FastBuild>,
    pub(crate) outbound: HashMap<OutboundKey, OutboundEntry, FastBuild>,
    /// All members' SNAT blocks; `OutboundEntry` holds a range into it, so `match_outbound`
    /// hands out a slice without allocating.
    pub(crate) port_blocks: Vec<PortBlock>,
    pub(crate) frontends: HashSet<Addr, FastBuild>,
    /// Every pool member and inbound NAT target, sorted: the addresses the dataplane forwards
    /// to, whose answers it must take (the daemon marks the interfaces they sit behind).
    pub(crate) members: Vec<Addr>,
    /// Kept so that the next compile can reuse tables whose inputs did not change.
    pub(crate) pool_tables: Vec<Arc<PoolTable>>,
    /// Members drained by the operator (admin state `down`), in configuration order.
    pub(crate) drains: Vec<Drain>,
}

#[derive(Debug)]
pub(crate) struct CompiledRule {
    pub(crate) params: RuleParams,
    pub(crate) selector: Selector,
    /// Generation in which this rule (this kind and name, under this id) was created: an id
    /// that is handed to another rule gets a new `since`, so per-rule counters kept under the
    /// id are known to belong to an older rule and are zeroed.
    pub(crate) since: u64,
    /// A deleted rule whose flows may still run: they keep its last settings until they end,
    /// and its id is not handed to another rule until no worker holds a flow of it. It matches
    /// no new packet and is not listed by [`RuleSet::rules`].
    pub(crate) retired: bool,
}

/// How a rule picks the backend of a new flow.
#[derive(Debug)]
pub(crate) enum Selector {
    LoadBalancing {
        pool: Arc<PoolTable>,
        distribution: Distribution,
        /// `None`: HA ports, the packet's destination port is kept.
        backend_port: Option<u16>,
    },
    /// Port forwarding to one address; `eligible` is false when that member of the rule's
    /// pool is down (probe or admin state).
    NatSingle {
        target: Backend,
        eligible: bool,
    },
    /// Frontend port `first_port + i` forwards to member `i` (`None`: unhealthy or no member).
    NatRange {
        first_port: u16,
        backend_port: u16,
        members: Box<[Option<Addr>]>,
        /// Members of the pool that are down (probe or admin state).
        down: HashSet<Addr, FastBuild>,
    },
    Outbound,
    /// A retired rule: it selects nothing (its flows keep their backend).
    Retired,
}

/// Key of the specific-port inbound table. Packing protocol and port into one word keeps the
/// hash to three mixing rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InboundKey {
    addr: Addr,
    proto_port: u32,
}

impl InboundKey {
    pub(crate) const fn new(proto: u8, addr: Addr, port: u16) -> InboundKey {
        InboundKey {
            addr,
            proto_port: (proto as u32) << 16 | port as u32,
        }
    }
}

impl std::hash::Hash for InboundKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.addr.0 as u64);
        state.write_u64((self.addr.0 >> 64) as u64 ^ u64::from(self.proto_port) << 32);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct OutboundKey {
    pub(crate) proto: u8,
    pub(crate) src: Addr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OutboundEntry {
    pub(crate) rule: RuleId,
    pub(crate) first_block: u32,
    pub(crate) blocks: u32,
}

impl RuleSet {
    /// A rule set with no frontends and no rules, for a daemon that starts unconfigured.
    pub fn empty(generation: u64, timers: Timers) -> RuleSet {
        RuleSet {
            generation,
            timers,
            rules: Vec::new(),
            inbound: HashMap::default(),
            ha_ports: HashMap::default(),
            outbound: HashMap::default(),
            port_blocks: Vec::new(),
            frontends: HashSet::default(),
            members: Vec::new(),
            pool_tables: Vec::new(),
            drains: Vec::new(),
        }
    }
    /// Members drained by the operator (admin state `down`) and their deadlines, in
    /// configuration order (see [`crate::drain`]).
    pub fn drains(&self) -> &[Drain] {
        &self.drains
    }
    /// Configuration generation this set was compiled from.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn timers(&self) -> &Timers {
        &self.timers
    }
    /// Parameters of the rule with this id — a live rule, or a retired one whose flows may
    /// still run (they keep its last settings) — or `None` for an id not in use.
    pub fn rule(&self, id: RuleId) -> Option<&RuleParams> {
        self.rules
            .get(usize::from(id))
            .and_then(Option::as_ref)
            .map(|r| &r.params)
    }
    /// Whether `id` is a deleted rule kept only for the flows it may still have.
    pub fn is_retired(&self, id: RuleId) -> bool {
        self.rules
            .get(usize::from(id))
            .and_then(Option::as_ref)
            .is_some_and(|r| r.retired)
    }
    /// Deleted rules whose flows may still run, by ascending id.
    pub fn retired_rules(&self) -> impl Iterator<Item = (RuleId, &RuleParams)> {
        self.rules.iter().enumerate().filter_map(|(i, r)| {
            let id = RuleId::try_from(i).ok()?;
            r.as_ref().filter(|r| r.retired).map(|r| (id, &r.params))
        })
    }
    /// The generation in which the rule now holding `id` (live or retired) was created; `None`
    /// for an id not in use. Counters gathered under an older generation for this id belong to
    /// another rule.
    pub fn since(&self, id: RuleId) -> Option<u64> {
        self.rules
            .get(usize::from(id))
            .and_then(Option::as_ref)
            .map(|r| r.since)
    }
    /// One more than the largest rule id in use (size for per-rule counter arrays).
    pub fn rule_id_bound(&self) -> usize {
        self.rules.len()
    }
    /// Every live rule (retired ones left out), by ascending id.
    pub fn rules(&self) -> impl Iterator<Item = (RuleId, &RuleParams)> {
        self.rules.iter().enumerate().filter_map(|(i, r)| {
            let id = RuleId::try_from(i).ok()?;
            r.as_ref().filter(|r| !r.retired).map(|r| (id, &r.params))
        })
    }
    /// The id of the rule of this kind and name, if it exists.
    pub fn rule_id(&self, kind: RuleKind, name: &str) -> Option<RuleId> {
        self.rules()
            .find(|(_, p)| p.kind == kind && &*p.name == name)
            .map(|(id, _)| id)
    }
    /// At least the number of distinct addresses the rules name (frontends, members and
    /// inbound NAT targets, SNAT addresses): what a flow table must be able to name without
    /// allocating.
    pub fn address_bound(&self) -> usize {
        self.frontends.len() + self.members.len() + self.port_blocks.len()
    }
    /// Whether `addr` is a frontend IP (of any rule kind, including outbound SNAT addresses).
    pub fn is_frontend(&self, addr: Addr) -> bool {
        self.frontends.contains(&addr)
    }
    /// Every frontend IP (VIPs and SNAT addresses), in no particular order: the addresses the
    /// dataplane owns.
    pub fn frontend_addrs(&self) -> impl Iterator<Item = Addr> + '_ {
        self.frontends.iter().copied()
    }
    /// Every pool member and inbound NAT target, sorted and without duplicates.
    pub fn member_addrs(&self) -> &[Addr] {
        &self.members
    }
    /// The load-balancing or inbound NAT rule that serves a packet addressed to
    /// `dst`:`dst_port` with protocol `proto`. Inbound NAT rules and specific-port LB rules win
    /// over HA ports.
    #[inline]
    pub fn match_inbound(&self, proto: u8, dst: Addr, dst_port: u16) -> Option<RuleId> {
        if let Some(&id) = self.inbound.get(&InboundKey::new(proto, dst, dst_port)) {
            return Some(id);
        }
        if proto == PROTO_TCP || proto == PROTO_UDP {
            self.ha_ports.get(&dst).copied()
        } else {
            None
        }
    }
    /// Chooses the backend of a new flow of rule `id` (LB or inbound NAT) among healthy members
    /// by the rule's distribution mode. Deterministic: the same tuple and rule set give the
    /// same answer (this is what `pickup` relies on). `None`: no healthy member.
    #[inline]
    pub fn select_backend(&self, id: RuleId, tuple: &FlowTuple) -> Option<Backend> {
        let rule = self.rules.get(usize::from(id))?.as_ref()?;
        match &rule.selector {
            Selector::LoadBalancing {
                pool,
                distribution,
                backend_port,
            } => {
                if pool.table.is_empty() {
                    return None;
                }
                let slot = reduce(flow_hash(*distribution, tuple), pool.table.len());
                let member = pool.table[slot];
                Some(Backend {
                    addr: pool.members[usize::from(member)],
                    port: backend_port.unwrap_or(tuple.dst_port),
                })
            }
            Selector::NatSingle { target, eligible } => eligible.then_some(*target),
            Selector::NatRange {
                first_port,
                backend_port,
                members,
                ..
            } => {
                let i = tuple.dst_port.checked_sub(*first_port)?;
                let addr = (*members.get(usize::from(i))?)?;
                Some(Backend {
                    addr,
                    port: *backend_port,
                })
            }
            Selector::Outbound | Selector::Retired => None,
        }
    }
    /// Whether `addr` is still a backend that rule `id` gives new flows to (healthy and not
    /// admin down; for NAT, the member its port maps to).
    pub fn backend_eligible(&self, id: RuleId, addr: Addr) -> bool {
        let Some(rule) = self.rules.get(usize::from(id)).and_then(Option::as_ref) else {
            return false;
        };
        match &rule.selector {
            Selector::LoadBalancing { pool, .. } => pool.eligible.contains(&addr),
            Selector::NatSingle { target, eligible } => *eligible && target.addr == addr,
            Selector::NatRange { members, .. } => members.contains(&Some(addr)),
            Selector::Outbound | Selector::Retired => false,
        }
    }
    /// Whether `addr` is a configured member of rule `id`'s pool that is **down**: failing its
    /// probes or admin state `down` (for a single-target NAT rule: its target). Health moves
    /// UDP flows off such a member: the engine checks this on every original-direction packet
    /// of a UDP flow and re-selects with [`RuleSet::select_backend`] (the flow ends when that
    /// gives `None`). A member removed from the pool, or a deleted rule, is not "down": configuration changes never move flows
    /// says configuration changes never move flows. Per packet this is one load when no member
    /// of the pool is down, else one hash probe.
    #[inline]
    pub fn backend_down(&self, id: RuleId, addr: Addr) -> bool {
        let Some(rule) = self.rules.get(usize::from(id)).and_then(Option::as_ref) else {
            return false;
        };
        match &rule.selector {
            Selector::LoadBalancing { pool, .. } => {
                !pool.down.is_empty() && pool.down.contains(&addr)
            }
            Selector::NatSingle { target, eligible } => !*eligible && target.addr == addr,
            Selector::NatRange { down, .. } => !down.is_empty() && down.contains(&addr),
            Selector::Outbound | Selector::Retired => false,
        }
    }
    /// The outbound rule that SNATs a new connection from member address `src`, and that
    /// member's port blocks.
    #[inline]
    pub fn match_outbound(&self, proto: u8, src: Addr) -> Option<(RuleId, &[PortBlock])> {
        let e = self.outbound.get(&OutboundKey { proto, src })?;
        let first = e.first_block as usize;
        Some((e.rule, &self.port_blocks[first..first + e.blocks as usize]))
    }
    /// Every SNAT allocation: (rule, protocol, member, its blocks), for metrics of ports
    /// allocated per member. Rules for `ALL` appear once per protocol (TCP and UDP ports are
    /// separate spaces).
    pub fn outbound_allocations(&self) -> impl Iterator<Item = (RuleId, u8, Addr, &[PortBlock])> {
        self.outbound.iter().map(|(k, e)| {
            let first = e.first_block as usize;
            (
                e.rule,
                k.proto,
                k.src,
                &self.port_blocks[first..first + e.blocks as usize],
            )
        })
    }
}

/// A specific-port TCP frontend of an inbound rule (for the XDP fast path's new-flow section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFrontend {
    pub rule: RuleId,
    pub addr: Addr,
    pub port: u16,
}

impl RuleSet {
    /// Every specific-port TCP frontend (HA ports left out), by rule id then address and port.
    pub fn tcp_frontends(&self) -> Vec<TcpFrontend> {
        let mut v: Vec<TcpFrontend> = self
            .inbound
            .iter()
            .filter(|(k, _)| k.proto_port >> 16 == u32::from(PROTO_TCP))
            .map(|(k, &rule)| TcpFrontend {
                rule,
                addr: k.addr,
                port: k.proto_port as u16,
            })
            .collect();
        v.sort_by_key(|f| (f.rule, f.addr, f.port));
        v
    }

    /// Whether `backend` is what load-balancing rule `id` may have given a new flow to
    /// `dst_port` (a member of its pool, healthy or not, and the port the rule translates
    /// to): the check of a member XDP chose before the worker installs its flow.
    pub fn lb_choice_valid(&self, id: RuleId, backend: Backend, dst_port: u16) -> bool {
        let Some(rule) = self.rules.get(usize::from(id)).and_then(Option::as_ref) else {
            return false;
        };
        let Selector::LoadBalancing {
            pool, backend_port, ..
        } = &rule.selector
        else {
            return false;
        };
        let port = if rule.params.floating_ip {
            dst_port
        } else {
            backend_port.unwrap_or(dst_port)
        };
        !rule.retired && backend.port == port && pool.members.contains(&backend.addr)
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleKind::LoadBalancing => "load_balancing_rules",
            RuleKind::InboundNat => "inbound_nat_rules",
            RuleKind::Outbound => "outbound_rules",
        })
    }
}
