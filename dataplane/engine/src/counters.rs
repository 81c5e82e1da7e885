//! Counters of one worker: per rule (indexed by stable `RuleId`) and per drop reason. Plain
//! `u64`s owned by the worker; the control thread reads copies sent back over the stats channel.

pub use crate::admission::EvictReason;
use crate::wire::ParseError;

/// Why the engine dropped a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Malformed or unsupported frame.
    Parse(ParseError),
    /// ICMP and other protocols the engine parses but does not forward.
    Unsupported,
    /// Addressed to no frontend and from no outbound member.
    NoRule,
    /// TCP non-SYN without a flow under the `drop` policy (or an outbound rule).
    NoFlow,
    /// No healthy member.
    NoBackend,
    /// The flow table is full: new flows are refused, existing ones untouched.
    FlowTableFull,
    /// Another flow already uses the translated tuple.
    TupleConflict,
    /// No route toward the destination.
    NoRoute,
    /// The next hop's MAC is unknown (resolution requested).
    NoNeighbor,
    /// The next-hop table is full.
    NextHopTableFull,
    /// The member has no free SNAT port.
    SnatExhausted,
    /// TTL / hop limit of 1 or 0: the packet would expire on its next hop. Checked before the
    /// flow table, so it neither creates nor changes a flow.
    HopLimit,
    /// A TCP flag combination no real stack sends (see `tcp::valid_flags`): never creates or
    /// changes a flow.
    BadTcpFlags,
    /// A TCP segment of a known flow outside its window (see `tcp`): changes nothing.
    OutOfWindow,
    /// An 802.1Q tag the configuration does not name on the ingress port.
    VlanTag,
    /// The `reset` unknown-flow policy would answer, but this worker's RST rate is spent.
    ResetRateLimited,
    /// A packet from a member's address (an outbound rule's source, or the original direction
    /// of an outbound flow) on a port that does not face the members.
    SpoofedSource,
    /// A reply-direction packet of a flow on another port than the one the flow sends its
    /// original direction to (where its replies come from).
    WrongSide,
}

impl DropReason {
    pub const COUNT: usize = DropReason::NON_PARSE.len() + ParseError::ALL.len();

    pub const NON_PARSE: [DropReason; 17] = [
        DropReason::Unsupported,
        DropReason::NoRule,
        DropReason::NoFlow,
        DropReason::NoBackend,
        DropReason::FlowTableFull,
        DropReason::TupleConflict,
        DropReason::NoRoute,
        DropReason::NoNeighbor,
        DropReason::NextHopTableFull,
        DropReason::SnatExhausted,
        DropReason::HopLimit,
        DropReason::BadTcpFlags,
        DropReason::OutOfWindow,
        DropReason::VlanTag,
        DropReason::ResetRateLimited,
        DropReason::SpoofedSource,
        DropReason::WrongSide,
    ];

    /// Dense index for counter arrays.
    pub fn index(self) -> usize {
        match self {
            DropReason::Parse(p) => {
                DropReason::NON_PARSE.len()
                    + ParseError::ALL.iter().position(|&x| x == p).unwrap_or(0)
            }
            other => DropReason::NON_PARSE
                .iter()
                .position(|&x| x == other)
                .unwrap_or(0),
        }
    }

    /// Every reason, in `index` order.
    pub fn all() -> impl Iterator<Item = DropReason> {
        DropReason::NON_PARSE
            .into_iter()
            .chain(ParseError::ALL.into_iter().map(DropReason::Parse))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Parse(p) => p.as_str(),
            DropReason::Unsupported => "unsupported_protocol",
            DropReason::NoRule => "no_rule",
            DropReason::NoFlow => "no_flow",
            DropReason::NoBackend => "no_backend",
            DropReason::FlowTableFull => "flow_table_full",
            DropReason::TupleConflict => "tuple_conflict",
            DropReason::NoRoute => "no_route",
            DropReason::NoNeighbor => "no_neighbor",
            DropReason::NextHopTableFull => "next_hop_table_full",
            DropReason::SnatExhausted => "snat_exhausted",
            DropReason::HopLimit => "hop_limit",
            DropReason::BadTcpFlags => "bad_tcp_flags",
            DropReason::OutOfWindow => "out_of_window",
            DropReason::VlanTag => "vlan_tag",
            DropReason::ResetRateLimited => "reset_rate_limited",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::WrongSide => "wrong_side",
        }
    }
}

/// Counters of one rule on one worker. Index 0 of the pairs is the original direction
/// (client → frontend, member → internet), 1 the reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    pub flows_created: u64,
    pub flows_expired_idle: u64,
    pub flows_reset_on_idle: u64,
    pub flows_closed: u64,
    pub flows_picked_up: u64,
    /// Idle expiries of flows due a reset on idle that went silent instead: the cluster's
    /// membership changed since their last packet, so the connection may live on elsewhere.
    pub flows_reset_withheld: u64,
    /// UDP flows moved off a member that went down.
    pub flows_moved: u64,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub syns: u64,
    pub late_packets: u64,
    /// Unknown-flow packets answered with an RST (`reset` policy).
    pub unknown_flow_resets: u64,
    /// Drops attributed to this rule: no_flow, no_backend, snat_exhausted, flow_table_full,
    /// out_of_window.
    pub no_flow: u64,
    pub no_backend: u64,
    pub snat_exhausted: u64,
    pub flow_table_full: u64,
    /// TCP segments of this rule's flows outside the window (dropped, nothing changed).
    pub out_of_window: u64,
    /// Unconfirmed flows of this rule evicted to admit new flows (docs/architecture.md,
    /// "Flow admission and eviction"; by reason in [`Counters::evictions`]).
    pub flows_evicted: u64,
    /// Unknown-flow segments not answered with an RST: the worker's RST rate was spent.
    pub reset_rate_limited: u64,
    /// Packets from a member's address on a port that does not face the members.
    pub spoofed_source: u64,
    /// Reply-direction packets of this rule's flows on the wrong port.
    pub wrong_side: u64,
}

/// All counters of one worker.
#[derive(Debug, PartialEq, Eq)]
pub struct Counters {
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// RST frames sent by reset-on-idle (two per reset flow).
    pub rsts_sent: u64,
    pub drops: [u64; DropReason::COUNT],
    pub rules: Vec<RuleCounters>,
    /// Flows this worker holds per rule id right now (a gauge, not a counter): the daemon
    /// releases a deleted rule's id once no worker holds a flow of it.
    pub live_flows: Vec<u32>,
    /// Events lost because the event queue was full.
    pub events_dropped: u64,
    /// Unconfirmed flows evicted to admit new ones, by [`EvictReason::index`].
    pub evictions: [u64; EvictReason::COUNT],
    /// Flows restored from the flow store when the engine attached it (a restart).
    pub flows_restored: u64,
    /// Records of the flow store not restored: torn by a crash, unreadable, or of a rule that
    /// is gone (a wiped store counts none: its reason is reported instead).
    pub flows_restore_dropped: u64,
    /// Flows published to the XDP fast path (each time one is).
    pub fast_published: u64,
    /// Published flows withdrawn from the fast path (no longer eligible, removed or expired).
    pub fast_unpublished: u64,
    /// Idle expiries of fast flows put off by a tick because the grace after withdrawing
    /// them from XDP had not passed yet.
    pub fast_grace_waits: u64,
    /// Eligible flows that could not be published: no free pair or no free index slot.
    pub fast_publish_failed: u64,
    /// SYNs XDP forwarded by itself whose flow this worker installed (or found already
    /// there with the same member: a retransmitted SYN).
    pub fast_new_installed: u64,
    /// SYNs XDP forwarded to another member than the one the flow already has (the table
    /// changed between two SYNs of one connection): the flow keeps its member.
    pub fast_new_conflict: u64,
    /// SYNs XDP forwarded whose flow could not be installed: the rule or the member is gone,
    /// the flow table is full of confirmed flows, no next hop.
    pub fast_new_refused: u64,
    /// Rules XDP opens new flows of, as last written (worker 0 writes them; 0 elsewhere).
    pub fast_new_rules: u64,
    /// Eligible rules left on the workers because the section had no room for them (idem).
    pub fast_new_rules_left_out: u64,
}

impl Clone for Counters {
    fn clone(&self) -> Counters {
        let mut c = Counters::default();
        c.clone_from(self);
        c
    }

    /// Copies into this value's storage: no allocation once the per-rule vectors are as long
    /// as the source's (how a worker publishes its counters).
    fn clone_from(&mut self, source: &Counters) {
        // Destructured so that a new field cannot be forgotten here.
        let Counters {
            rx_packets,
            tx_packets,
            rsts_sent,
            drops,
            rules,
            live_flows,
            events_dropped,
            evictions,
            flows_restored,
            flows_restore_dropped,
            fast_published,
            fast_unpublished,
            fast_grace_waits,
            fast_publish_failed,
            fast_new_installed,
            fast_new_conflict,
            fast_new_refused,
            fast_new_rules,
            fast_new_rules_left_out,
        } = source;
        self.rx_packets = *rx_packets;
        self.tx_packets = *tx_packets;
        self.rsts_sent = *rsts_sent;
        self.drops = *drops;
        self.rules.clone_from(rules);
        self.live_flows.clone_from(live_flows);
        self.events_dropped = *events_dropped;
        self.evictions = *evictions;
        self.flows_restored = *flows_restored;
        self.flows_restore_dropped = *flows_restore_dropped;
        self.fast_published = *fast_published;
        self.fast_unpublished = *fast_unpublished;
        self.fast_grace_waits = *fast_grace_waits;
        self.fast_publish_failed = *fast_publish_failed;
        self.fast_new_installed = *fast_new_installed;
        self.fast_new_conflict = *fast_new_conflict;
        self.fast_new_refused = *fast_new_refused;
        self.fast_new_rules = *fast_new_rules;
        self.fast_new_rules_left_out = *fast_new_rules_left_out;
    }
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            rx_packets: 0,
            tx_packets: 0,
            rsts_sent: 0,
            drops: [0; DropReason::COUNT],
            rules: Vec::new(),
            live_flows: Vec::new(),
            events_dropped: 0,
            evictions: [0; EvictReason::COUNT],
            flows_restored: 0,
            flows_restore_dropped: 0,
            fast_published: 0,
            fast_unpublished: 0,
            fast_grace_waits: 0,
            fast_publish_failed: 0,
            fast_new_installed: 0,
            fast_new_conflict: 0,
            fast_new_refused: 0,
            fast_new_rules: 0,
            fast_new_rules_left_out: 0,
        }
    }
}

impl RuleCounters {
    /// Every counter with its stable name (the stats file's and Prometheus' suffixes), in a
    /// fixed order: the one list that every exporter walks.
    pub fn fields(&self) -> [(&'static str, u64); 23] {
        [
            ("flows_created", self.flows_created),
            ("flows_expired_idle", self.flows_expired_idle),
            ("flows_reset_on_idle", self.flows_reset_on_idle),
            ("flows_closed", self.flows_closed),
            ("flows_picked_up", self.flows_picked_up),
            ("flows_reset_withheld", self.flows_reset_withheld),
            ("flows_moved", self.flows_moved),
            ("packets_orig", self.packets[0]),
            ("packets_reply", self.packets[1]),
            ("bytes_orig", self.bytes[0]),
            ("bytes_reply", self.bytes[1]),
            ("syns", self.syns),
            ("late_packets", self.late_packets),
            ("unknown_flow_resets", self.unknown_flow_resets),
            ("no_flow", self.no_flow),
            ("no_backend", self.no_backend),
            ("snat_exhausted", self.snat_exhausted),
            ("flow_table_full", self.flow_table_full),
            ("out_of_window", self.out_of_window),
            ("flows_evicted", self.flows_evicted),
            ("reset_rate_limited", self.reset_rate_limited),
            ("spoofed_source", self.spoofed_source),
            ("wrong_side", self.wrong_side),
        ]
    }

    /// Adds `other` counter by counter (sums over workers).
    pub fn add(&mut self, other: &RuleCounters) {
        self.flows_created += other.flows_created;
        self.flows_expired_idle += other.flows_expired_idle;
        self.flows_reset_on_idle += other.flows_reset_on_idle;
        self.flows_closed += other.flows_closed;
        self.flows_picked_up += other.flows_picked_up;
        self.flows_reset_withheld += other.flows_reset_withheld;
        self.flows_moved += other.flows_moved;
        for i in 0..2 {
            self.packets[i] += other.packets[i];
            self.bytes[i] += other.bytes[i];
        }
        self.syns += other.syns;
        self.late_packets += other.late_packets;
        self.unknown_flow_resets += other.unknown_flow_resets;
        self.no_flow += other.no_flow;
        self.no_backend += other.no_backend;
        self.snat_exhausted += other.snat_exhausted;
        self.flow_table_full += other.flow_table_full;
        self.out_of_window += other.out_of_window;
        self.flows_evicted += other.flows_evicted;
        self.reset_rate_limited += other.reset_rate_limited;
        self.spoofed_source += other.spoofed_source;
        self.wrong_side += other.wrong_side;
    }
}

impl Counters {
    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub fn eviction_count(&self, r: EvictReason) -> u64 {
        self.evictions[r.index()]
    }

    /// Counters of rule `id` (zero if never seen).
    pub fn rule(&self, id: u16) -> RuleCounters {
        self.rules.get(id as usize).copied().unwrap_or_default()
    }

    /// Flows held now for rule `id`.
    pub fn live_flows(&self, id: u16) -> u32 {
        self.live_flows.get(id as usize).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_indices_are_dense_and_unique() {
        let idx: Vec<usize> = DropReason::all().map(DropReason::index).collect();
        assert_eq!(idx, (0..DropReason::COUNT).collect::<Vec<_>>());
        let names: std::collections::HashSet<_> =
            DropReason::all().map(DropReason::as_str).collect();
        assert_eq!(names.len(), DropReason::COUNT);
    }
}
