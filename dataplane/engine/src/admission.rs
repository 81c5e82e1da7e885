//! Admission of new flows when the table is under pressure: budgets for flows that have not
//! been confirmed, and eviction of the oldest of them, in O(1).
//!
//! A flow is **unconfirmed** from its creation until its original sender proves that it
//! receives the reply direction, which a sender of spoofed packets cannot do:
//! - TCP: a segment of the original direction acknowledges exactly the next sequence number
//!   of the reply direction (the client's ACK of the SYN-ACK, or of the data the other end sent
//!   last). A SYN-ACK alone proves nothing: a listening backend answers every spoofed SYN.
//! - UDP: a packet of the reply direction (there is no acknowledgement to check).
//!
//! A confirmed flow is never evicted. Unconfirmed flows are kept in two intrusive FIFO lists,
//! by admission order: one per class (TCP, UDP) and one per rule. Before a new flow of rule
//! `r` and class `c` is inserted, in this order:
//! 1. `r` holds its share of unconfirmed flows (`rule_percent` of the table): evict `r`'s
//!    oldest unconfirmed flow. A flood aimed at one rule recycles its own share and never
//!    takes the rest of the table from other rules.
//! 2. class `c` holds its budget (`half_open_percent` for TCP, `unreplied_udp_percent` for
//!    UDP): evict the oldest unconfirmed flow of class `c`.
//! 3. the table is full: evict the oldest unconfirmed flow of class `c`, else of the other
//!    class; when every flow is confirmed, the new flow is refused (`flow_table_full`).
//!
//! Oldest first is what keeps a legitimate handshake alive in a flood: at `R` new spoofed
//! flows per second and a budget of `B` flows, an unconfirmed flow survives `B / R` seconds,
//! which is all its handshake needs (one round trip), and once confirmed it is safe. Every
//! step is a list head, so admission costs the same whatever the table holds.
//! Memory: 12 bytes of links per flow slot (four 24-bit ids), one bit of flag, 12 bytes per
//! rule id.

use crate::flow::FlowId;
use crate::ruleset::RuleId;
use crate::timer::{MAX_IDS, U24};

/// Shares of the flow table, in percent of its capacity, that unconfirmed flows may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// TCP flows whose handshake is not confirmed (half-open).
    pub half_open_percent: u8,
    /// UDP flows that have had no reply.
    pub unreplied_udp_percent: u8,
    /// Unconfirmed flows (TCP and UDP) of any one rule.
    pub rule_percent: u8,
}

impl Default for AdmissionLimits {
    /// Each class may hold half of the table, so a UDP flood cannot evict TCP handshakes
    /// in progress nor the reverse; one rule a quarter, so a flood at one rule leaves other
    /// rules' new flows three quarters of the table.
    fn default() -> AdmissionLimits {
        AdmissionLimits {
            half_open_percent: 50,
            unreplied_udp_percent: 50,
            rule_percent: 25,
        }
    }
}

impl AdmissionLimits {
    /// Every share must be 1–100 %.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("half_open_percent", self.half_open_percent),
            ("unreplied_udp_percent", self.unreplied_udp_percent),
            ("rule_percent", self.rule_percent),
        ] {
            if !(1..=100).contains(&v) {
                return Err(format!(
                    "{name} = {v}: allowed 1–100 (percent of the flow table)"
                ));
            }
        }
        Ok(())
    }

    /// `percent` of `capacity` flows, at least one.
    fn budget(percent: u8, capacity: u32) -> u32 {
        ((u64::from(capacity) * u64::from(percent.min(100)) / 100) as u32).max(1)
    }
}

/// Why an unconfirmed flow was evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EvictReason {
    /// Its rule held its share of unconfirmed flows.
    RuleShare,
    /// TCP: the half-open budget was full.
    HalfOpenBudget,
    /// UDP: the unreplied budget was full.
    UnrepliedUdpBudget,
    /// The table was full.
    TableFull,
}

impl EvictReason {
    pub const COUNT: usize = 4;
    pub const ALL: [EvictReason; EvictReason::COUNT] = [
        EvictReason::RuleShare,
        EvictReason::HalfOpenBudget,
        EvictReason::UnrepliedUdpBudget,
        EvictReason::TableFull,
    ];

    /// Dense index for counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::RuleShare => "rule_share",
            EvictReason::HalfOpenBudget => "half_open_budget",
            EvictReason::UnrepliedUdpBudget => "unreplied_udp_budget",
            EvictReason::TableFull => "table_full",
        }
    }
}

/// Class of a flow for the budgets: 0 TCP, 1 UDP.
pub type Class = usize;
pub const TCP: Class = 0;
pub const UDP: Class = 1;

/// What to do before inserting a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Evict this flow first, then insert.
    Evict(FlowId, EvictReason),
    /// The table is full of confirmed flows.
    Refuse,
}

/// No flow: the end of a list, in the links and in the list heads alike.
const NIL: u32 = U24::MAX;
/// Link index of the class list and of the rule list.
const BY_CLASS: usize = 0;
const BY_RULE: usize = 1;

/// A FIFO: `head` is the oldest.
#[derive(Clone, Copy, Debug)]
struct List {
    head: u32,
    tail: u32,
    len: u32,
}

const EMPTY: List = List {
    head: NIL,
    tail: NIL,
    len: 0,
};

/// Per flow, its neighbours in the class list and in the rule list (index `BY_CLASS` or
/// `BY_RULE`), 24 bits each.
#[derive(Clone, Copy, Debug)]
struct Links {
    prev: [U24; 2],
    next: [U24; 2],
}

const UNLINKED: Links = Links {
    prev: [U24::new(NIL); 2],
    next: [U24::new(NIL); 2],
};

/// The unconfirmed flows of one worker's table.
#[derive(Clone, Debug)]
pub struct Unconfirmed {
    /// Bit `id % 64` of word `id / 64`: flow `id` is unconfirmed (in the lists).
    flags: Vec<u64>,
    links: Vec<Links>,
    classes: [List; 2],
    rules: Vec<List>,
    class_budget: [u32; 2],
    rule_budget: u32,
}

impl Unconfirmed {
    /// Lists for flow ids below `capacity` (at most [`MAX_IDS`]).
    pub fn new(capacity: u32, limits: AdmissionLimits) -> Unconfirmed {
        let capacity = capacity.max(1);
        assert!(
            capacity <= MAX_IDS,
            "admission capacity {capacity} exceeds {MAX_IDS} flows (24-bit links)"
        );
        Unconfirmed {
            flags: vec![0; (capacity as usize).div_ceil(64)],
            links: vec![UNLINKED; capacity as usize],
            classes: [EMPTY; 2],
            rules: Vec::new(),
            class_budget: [
                AdmissionLimits::budget(limits.half_open_percent, capacity),
                AdmissionLimits::budget(limits.unreplied_udp_percent, capacity),
            ],
            rule_budget: AdmissionLimits::budget(limits.rule_percent, capacity),
        }
    }

    /// Bytes of links and flags (12 and 1/8 per flow) and list heads.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(self.links.as_slice())
            + std::mem::size_of_val(self.flags.as_slice())
            + std::mem::size_of_val(self.rules.as_slice())
    }

    /// The links and flags (one each per flow), as allocated.
    pub fn memory_regions(&self) -> [crate::MemoryRegion; 2] {
        use crate::MemoryRegion;
        [
            MemoryRegion::of("admission links", &self.links),
            MemoryRegion::of("admission flags", &self.flags),
        ]
    }

    /// Sizes the per-rule lists for rule ids below `bound` (on rule-set changes, so that the
    /// packet path never grows them).
    pub fn reserve_rules(&mut self, bound: usize) {
        if self.rules.len() < bound {
            self.rules.resize(bound, EMPTY);
        }
    }

    #[inline]
    pub fn is_unconfirmed(&self, id: FlowId) -> bool {
        self.flags
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    /// Unconfirmed flows of `class`, and of rule `rule`.
    pub fn class_len(&self, class: Class) -> u32 {
        self.classes[class].len
    }

    pub fn rule_len(&self, rule: RuleId) -> u32 {
        self.rules.get(usize::from(rule)).map_or(0, |l| l.len)
    }

    /// What must happen before a new flow of `rule` and `class` is inserted into a table that
    /// is `full` or not (see the module notes).
    pub fn decide(&self, rule: RuleId, class: Class, full: bool) -> Admission {
        if let Some(r) = self.rules.get(usize::from(rule)) {
            if r.len >= self.rule_budget {
                return Admission::Evict(r.head, EvictReason::RuleShare);
            }
        }
        let own = &self.classes[class];
        if own.len >= self.class_budget[class] {
            let reason = if class == TCP {
                EvictReason::HalfOpenBudget
            } else {
                EvictReason::UnrepliedUdpBudget
            };
            return Admission::Evict(own.head, reason);
        }
        if !full {
            return Admission::Admit;
        }
        let other = &self.classes[1 - class];
        match (own.len, other.len) {
            (0, 0) => Admission::Refuse,
            (0, _) => Admission::Evict(other.head, EvictReason::TableFull),
            _ => Admission::Evict(own.head, EvictReason::TableFull),
        }
    }

    /// Records new flow `id` as unconfirmed, the newest of its lists.
    pub fn admit(&mut self, id: FlowId, rule: RuleId, class: Class) {
        if self.is_unconfirmed(id) {
            return;
        }
        self.reserve_rules(usize::from(rule) + 1);
        self.flags[id as usize / 64] |= 1 << (id % 64);
        let (classes, rules, links) = (&mut self.classes, &mut self.rules, &mut self.links);
        push_back(links, &mut classes[class], BY_CLASS, id);
        push_back(links, &mut rules[usize::from(rule)], BY_RULE, id);
    }

    /// Takes flow `id` out of the lists (confirmed, or removed from the table). No-op when it
    /// is not unconfirmed.
    pub fn forget(&mut self, id: FlowId, rule: RuleId, class: Class) {
        if !self.is_unconfirmed(id) {
            return;
        }
        self.flags[id as usize / 64] &= !(1 << (id % 64));
        let (classes, rules, links) = (&mut self.classes, &mut self.rules, &mut self.links);
        unlink(links, &mut classes[class], BY_CLASS, id);
        if let Some(list) = rules.get_mut(usize::from(rule)) {
            unlink(links, list, BY_RULE, id);
        }
    }
}

fn push_back(links: &mut [Links], list: &mut List, k: usize, id: FlowId) {
    links[id as usize].prev[k] = U24::new(list.tail);
    links[id as usize].next[k] = U24::new(NIL);
    if list.tail == NIL {
        list.head = id;
    } else {
        links[list.tail as usize].next[k] = U24::new(id);
    }
    list.tail = id;
    list.len += 1;
}

fn unlink(links: &mut [Links], list: &mut List, k: usize, id: FlowId) {
    let Links { prev, next } = links[id as usize];
    let (prev, next) = (prev[k].get(), next[k].get());
    if prev == NIL {
        list.head = next;
    } else {
        links[prev as usize].next[k] = U24::new(next);
    }
    if next == NIL {
        list.tail = prev;
    } else {
        links[next as usize].prev[k] = U24::new(prev);
    }
    list.len -= 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn limits(half_open: u8, udp: u8, rule: u8) -> AdmissionLimits {
        AdmissionLimits {
            half_open_percent: half_open,
            unreplied_udp_percent: udp,
            rule_percent: rule,
        }
    }

    #[test]
    fn limits_are_validated_and_budgets_never_zero() {
        assert!(AdmissionLimits::default().validate().is_ok());
        let e = limits(0, 50, 25).validate().unwrap_err();
        assert!(
            e.contains("half_open_percent = 0") && e.contains("1–100"),
            "{e}"
        );
        assert!(limits(50, 101, 25).validate().is_err());
        assert!(limits(50, 50, 0).validate().is_err());
        assert_eq!(AdmissionLimits::budget(1, 10), 1);
        assert_eq!(AdmissionLimits::budget(25, 65_536), 16_384);
        assert_eq!(AdmissionLimits::budget(100, 7), 7);
    }

    #[test]
    fn oldest_first_per_rule_then_per_class_then_table() {
        // 20 flows: 10 % per rule (2), 50 % per class (10).
        let mut u = Unconfirmed::new(20, limits(50, 50, 10));
        u.reserve_rules(4);
        u.admit(0, 1, TCP);
        assert_eq!(u.decide(1, TCP, false), Admission::Admit);
        u.admit(1, 1, TCP);
        assert_eq!(
            u.decide(1, TCP, false),
            Admission::Evict(0, EvictReason::RuleShare),
            "rule 1 holds its share: its oldest goes"
        );
        assert_eq!(
            u.decide(2, TCP, false),
            Admission::Admit,
            "rule 2 is not held back"
        );
        // Confirming takes a flow out of every list: it is never a victim.
        u.forget(0, 1, TCP);
        assert_eq!(u.decide(1, TCP, false), Admission::Admit);
        // Fill the TCP class over several rules (one flow each).
        let mut u = Unconfirmed::new(20, limits(50, 50, 10));
        for id in 0..10 {
            u.admit(id, id as RuleId, TCP);
        }
        assert_eq!(
            u.decide(99, TCP, false),
            Admission::Evict(0, EvictReason::HalfOpenBudget)
        );
        assert_eq!(
            u.decide(99, UDP, false),
            Admission::Admit,
            "UDP has its own budget"
        );
        assert_eq!(
            u.decide(99, UDP, true),
            Admission::Evict(0, EvictReason::TableFull),
            "full table, no UDP to evict: the oldest TCP goes"
        );
        u.admit(10, 50, UDP);
        assert_eq!(
            u.decide(99, UDP, true),
            Admission::Evict(10, EvictReason::TableFull),
            "its own class first"
        );
        for id in 0..11 {
            u.forget(
                id,
                if id == 10 { 50 } else { id as RuleId },
                [TCP, UDP][(id == 10) as usize],
            );
        }
        assert_eq!(u.decide(99, TCP, true), Admission::Refuse, "all confirmed");
        assert_eq!((u.class_len(TCP), u.class_len(UDP)), (0, 0));
    }

    #[test]
    fn links_are_twelve_bytes_without_padding() {
        assert_eq!(std::mem::size_of::<Links>(), 12);
        assert_eq!(std::mem::align_of::<Links>(), 1);
    }

    #[test]
    #[should_panic(expected = "exceeds 8388607 flows")]
    fn capacity_beyond_the_links_is_refused() {
        Unconfirmed::new(MAX_IDS + 1, AdmissionLimits::default());
    }

    /// The ids of list `list` (`k`: which links) from head to tail, checking on the way that
    /// the `prev` links mirror the `next` links and that the tail and length agree.
    fn walk(u: &Unconfirmed, list: List, k: usize) -> Vec<u32> {
        let (mut out, mut prev, mut id) = (vec![], NIL, list.head);
        while id != NIL {
            assert_eq!(u.links[id as usize].prev[k].get(), prev, "prev of {id}");
            out.push(id);
            (prev, id) = (id, u.links[id as usize].next[k].get());
        }
        assert_eq!((list.tail, list.len as usize), (prev, out.len()));
        out
    }

    /// The highest flow ids linked into and unlinked from both lists (head, middle, tail), and
    /// evicted oldest first.
    #[test]
    fn highest_ids_link_unlink_and_evict() {
        let mut u = Unconfirmed::new(MAX_IDS, AdmissionLimits::default());
        let top = MAX_IDS - 1;
        for (id, rule) in [(top, 1), (0, 2), (top - 1, 1), (top - 2, 1), (top - 3, 2)] {
            u.admit(id, rule, TCP);
        }
        assert_eq!(
            walk(&u, u.classes[TCP], BY_CLASS),
            [top, 0, top - 1, top - 2, top - 3]
        );
        assert_eq!(walk(&u, u.rules[1], BY_RULE), [top, top - 1, top - 2]);
        assert_eq!(walk(&u, u.rules[2], BY_RULE), [0, top - 3]);
        assert_eq!(
            u.decide(3, TCP, true),
            Admission::Evict(top, EvictReason::TableFull)
        );
        u.forget(top - 1, 1, TCP); // middle
        u.forget(top, 1, TCP); // head
        u.forget(top - 3, 2, TCP); // tail
        assert!(!u.is_unconfirmed(top) && u.is_unconfirmed(top - 2));
        assert_eq!(walk(&u, u.classes[TCP], BY_CLASS), [0, top - 2]);
        assert_eq!(walk(&u, u.rules[1], BY_RULE), [top - 2]);
        assert_eq!(walk(&u, u.rules[2], BY_RULE), [0]);
        u.admit(top, 2, UDP);
        assert_eq!(walk(&u, u.classes[UDP], BY_CLASS), [top]);
        assert_eq!(walk(&u, u.rules[2], BY_RULE), [0, top]);
        assert_eq!(
            u.decide(3, UDP, true),
            Admission::Evict(top, EvictReason::TableFull)
        );
        for (id, rule, class) in [(0, 2, TCP), (top - 2, 1, TCP), (top, 2, UDP)] {
            u.forget(id, rule, class);
        }
        assert_eq!(u.decide(3, TCP, true), Admission::Refuse);
        for list in [u.classes[TCP], u.classes[UDP], u.rules[1], u.rules[2]] {
            assert_eq!((list.head, list.tail, list.len), (NIL, NIL, 0));
        }
    }

    /// Random admits and removals against a model of the lists (VecDeques in admission
    /// order): the heads, lengths and flags agree after every step.
    #[test]
    fn lists_match_a_model_under_churn() {
        let cap = 64u32;
        let mut u = Unconfirmed::new(cap, AdmissionLimits::default());
        u.reserve_rules(4);
        let mut class_model: [VecDeque<u32>; 2] = Default::default();
        let mut rule_model: Vec<VecDeque<u32>> = vec![VecDeque::new(); 4];
        let mut of: Vec<Option<(RuleId, Class)>> = vec![None; cap as usize];
        let mut rng = 3u64;
        for _ in 0..20_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let id = (rng % u64::from(cap)) as u32;
            match of[id as usize] {
                None => {
                    let (rule, class) = (((rng >> 8) % 4) as RuleId, ((rng >> 12) % 2) as Class);
                    u.admit(id, rule, class);
                    of[id as usize] = Some((rule, class));
                    class_model[class].push_back(id);
                    rule_model[usize::from(rule)].push_back(id);
                }
                Some((rule, class)) => {
                    u.forget(id, rule, class);
                    of[id as usize] = None;
                    class_model[class].retain(|&x| x != id);
                    rule_model[usize::from(rule)].retain(|&x| x != id);
                }
            }
            for c in [TCP, UDP] {
                assert_eq!(u.class_len(c) as usize, class_model[c].len());
                assert_eq!(
                    u.classes[c].head,
                    class_model[c].front().copied().unwrap_or(NIL)
                );
            }
            for (r, m) in rule_model.iter().enumerate() {
                assert_eq!(u.rule_len(r as RuleId) as usize, m.len());
                assert_eq!(u.rules[r].head, m.front().copied().unwrap_or(NIL));
            }
            assert_eq!(u.is_unconfirmed(id), of[id as usize].is_some());
        }
    }
}
