//! New flows opened by XDP: the new-flow section of the published fast table
//! ([`crate::fast`]).
//!
//! A pure TCP SYN of a load-balancing rule can be forwarded by the XDP program itself: it
//! finds the rule in the section's rule index, picks the member in the rule's Maglev table
//! exactly as [`crate::RuleSet::select_backend`] does, rewrites the frame and redirects it
//! out of the member's egress. Before it touches the frame it copies the SYN's IP and TCP
//! headers into a record of the ring of the worker that owns the flow (the worker
//! [`crate::engine::steer`] picks), and that worker installs the flow by running its
//! ordinary SYN path on them, the member forced to the one XDP chose and no frame sent
//! (`Engine::fast_new_drain`). What XDP cannot do exactly as the worker would, it punts.
//!
//! Layout (64-byte elements of 16 `u32` words, native byte order):
//! - element [`NF_HEADER_ELEMENT`]: the new-flow header ([`nf`]); `NF_ENABLED` is the
//!   section's own switch;
//! - element [`NF_STEER_ELEMENT`]: the steering keys k0..k3, each low word then high word;
//! - after the lines of the published flows: the rule index (`u32` slots, 0 empty, else rule
//!   entry + 1), the rule entries ([`nfr`], one element each), the member entries ([`nfm`],
//!   one element each), the Maglev table area (two 16-bit slots per word, low half first),
//!   and one ring per worker (element 0 word 0 `PROD`, element 1 word 0 `CONS`, then records
//!   of two elements, [`nfq`]).
//!
//! Who writes what: worker 0's engine writes the whole section (the rule index has no
//! tombstones: it is rewritten from scratch) while `NF_ENABLED` is 0 and a grace has passed
//! since it went 0, so that no XDP invocation reads a section half old and half new; it then
//! sets `NF_ENABLED`. XDP only reserves ring records (compare-and-swap on `PROD`) and writes
//! them, `SEQ` last; each worker only consumes its own ring (`CONS`).

use std::sync::atomic::{AtomicU32, Ordering};

use crate::fast::{fast_hash, header_keys, ports_word, wire_word, FastLayout, ELEMENT_WORDS};
use crate::select::{flow_hash, reduce};
use crate::terms::{Distribution, FlowTuple, PROTO_TCP};
use crate::Addr;

/// Element of the new-flow header.
pub const NF_HEADER_ELEMENT: u32 = 1;
/// Element of the steering keys.
pub const NF_STEER_ELEMENT: u32 = 2;
/// Rule index slots (a power of two): at most [`NF_RULES`] keys, a load of at most 1/4.
pub const NF_RULE_SLOTS: u32 = 1024;
/// Rule entries: load-balancing rules XDP may open flows of (the rest stay on the workers).
pub const NF_RULES: u32 = 256;
/// Member entries, for every pool of those rules together.
pub const NF_MEMBERS: u32 = 4096;
/// Words of the Maglev table area (1 MiB): 127 small tables (4,099 slots) or 7 large ones
/// (65,537 slots). Rules on one pool share its table.
pub const NF_TABLE_WORDS: u32 = 262_144;
/// Records per worker's ring (128 bytes each: 4 MiB per worker).
pub const NF_RING_RECORDS: u32 = 32_768;
/// Rule index slots probed at most from a key's home slot.
pub const NF_RULE_PROBES: u32 = 16;
/// A Maglev slot naming no member (XDP punts).
pub const NO_MEMBER: u16 = 0xffff;
/// Rule entry flag: the destination address becomes the member's (DNAT).
pub const FLAG_DNAT_ADDR: u32 = 1;
/// Rule entry flag: the destination port becomes `BACKEND_PORT`. Neither flag: floating IP.
pub const FLAG_DNAT_PORT: u32 = 2;
/// Elements of one ring record.
pub const RECORD_ELEMENTS: u32 = 2;
/// Bytes of IP and TCP header a record holds at most (20 + 60).
pub const RECORD_HEADERS: usize = 80;

/// Words of the new-flow header (element [`NF_HEADER_ELEMENT`]).
pub mod nf {
    /// 1: XDP may open new flows (the header's `ENABLED` must be 1 too).
    pub const ENABLED: usize = 0;
    pub const RULE_SLOTS: usize = 1;
    pub const RULE_INDEX_BASE: usize = 2;
    pub const RULES_BASE: usize = 3;
    pub const RULES: usize = 4;
    pub const MEMBERS_BASE: usize = 5;
    pub const MEMBERS: usize = 6;
    pub const TABLES_BASE: usize = 7;
    pub const TABLE_WORDS: usize = 8;
    pub const RINGS_BASE: usize = 9;
    pub const RING_RECORDS: usize = 10;
    pub const RING_ELEMENTS: usize = 11;
    pub const WORKERS: usize = 12;
}

/// Words of a rule entry.
pub mod nfr {
    /// The frontend address, wire word.
    pub const VIP: usize = 0;
    /// `ports_word(0, vport)`.
    pub const PORTS: usize = 1;
    /// Protocol | rule id << 16.
    pub const PROTO_RULE: usize = 2;
    /// The port the SYN must arrive on.
    pub const INGRESS_PORT: usize = 3;
    /// [`FLAG_DNAT_ADDR`](super::FLAG_DNAT_ADDR), [`FLAG_DNAT_PORT`](super::FLAG_DNAT_PORT).
    pub const FLAGS: usize = 4;
    /// Host-order port in the low half.
    pub const BACKEND_PORT: usize = 5;
    /// 0 five-tuple, 1 source IP, 2 source IP and protocol.
    pub const DIST: usize = 6;
    /// Word offset of the rule's Maglev table in the table area.
    pub const TABLE_OFF: usize = 7;
    pub const TABLE_SLOTS: usize = 8;
    /// Member entry of the pool's member 0.
    pub const MEMBERS_OFF: usize = 9;
    pub const MEMBERS_N: usize = 10;
}

/// Words of a member entry.
pub mod nfm {
    /// 1: XDP may send to it (its next hop is resolved, untagged, on a fast port).
    pub const VALID: usize = 0;
    /// The member's address, wire word.
    pub const ADDR: usize = 1;
    /// The port of its egress (key of `xlb_tx`).
    pub const TX_PORT: usize = 2;
    /// Three words: destination MAC then source MAC.
    pub const MACS: usize = 3;
}

/// Words of a ring record (two elements).
pub mod nfq {
    /// `i + 1` once record `i` is complete (written last).
    pub const SEQ: usize = 0;
    /// 0: XDP does not read the clock for a SYN (the worker installs at its own `now`).
    pub const STAMP: usize = 1;
    /// The member's address, wire word (for DNAT the SYN's new destination).
    pub const ADDR: usize = 2;
    /// Host-order destination port the SYN left with.
    pub const PORT: usize = 3;
    pub const RULE: usize = 4;
    pub const INGRESS_PORT: usize = 5;
    /// Bytes of IP and TCP header copied (20 + doff × 4).
    pub const LEN: usize = 6;
    /// Zero.
    pub const RESERVED: usize = 7;
    /// The IP header then the TCP header with its options, as received (80 bytes at most).
    pub const HEADERS: usize = 8;
    /// Three words: the received frame's destination MAC then source MAC (the worker learns
    /// the hop back to the client from the source MAC, as from a frame it received).
    pub const MACS: usize = 28;
}

/// Distribution mode as a rule entry's `DIST` word.
pub fn dist_word(d: Distribution) -> u32 {
    match d {
        Distribution::FiveTuple => 0,
        Distribution::SourceIp => 1,
        Distribution::SourceIpProtocol => 2,
    }
}

fn dist_of(w: u32) -> Distribution {
    match w {
        1 => Distribution::SourceIp,
        2 => Distribution::SourceIpProtocol,
        _ => Distribution::FiveTuple,
    }
}

/// An IPv4 address (wire bytes) as the engine's IPv4-mapped [`Addr`].
pub fn mapped(bytes: [u8; 4]) -> Addr {
    Addr::from(std::net::Ipv4Addr::from(bytes))
}

/// Writes the steering keys (element [`NF_STEER_ELEMENT`]).
pub fn write_steer_keys(mem: &[AtomicU32], steer: [u64; 4]) {
    let base = NF_STEER_ELEMENT as usize * ELEMENT_WORDS;
    for (i, k) in steer.iter().enumerate() {
        mem[base + 2 * i].store(*k as u32, Ordering::Relaxed);
        mem[base + 2 * i + 1].store((*k >> 32) as u32, Ordering::Relaxed);
    }
}

/// The steering keys the section holds.
pub fn steer_keys(mem: &[AtomicU32]) -> [u64; 4] {
    let base = NF_STEER_ELEMENT as usize * ELEMENT_WORDS;
    let mut keys = [0u64; 4];
    for (i, k) in keys.iter_mut().enumerate() {
        let lo = mem[base + 2 * i].load(Ordering::Relaxed);
        let hi = mem[base + 2 * i + 1].load(Ordering::Relaxed);
        *k = u64::from(lo) | (u64::from(hi) << 32);
    }
    keys
}

fn nf_word(w: usize) -> usize {
    NF_HEADER_ELEMENT as usize * ELEMENT_WORDS + w
}

/// The section's switch: XDP opens new flows only while it is on (and the header's too).
pub fn set_nf_enabled(mem: &[AtomicU32], on: bool) {
    mem[nf_word(nf::ENABLED)].store(u32::from(on), Ordering::Release);
}

pub fn nf_enabled(mem: &[AtomicU32]) -> bool {
    mem[nf_word(nf::ENABLED)].load(Ordering::Acquire) == 1
}

/// A member of a pool as XDP sends to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NfMember {
    /// Its next hop is resolved, untagged, and leaves by a port XDP may send on.
    pub valid: bool,
    pub addr: [u8; 4],
    pub tx_port: u16,
    /// Destination MAC then source MAC.
    pub macs: [u8; 12],
}

/// A pool: its Maglev table (slot → member number, as the engine's) and its members in
/// configuration order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfPool {
    pub table: Vec<u16>,
    pub members: Vec<NfMember>,
}

/// A rule XDP may open flows of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NfRule {
    pub vip: [u8; 4],
    pub vport: u16,
    pub rule: u16,
    pub ingress_port: u16,
    /// [`FLAG_DNAT_ADDR`] and [`FLAG_DNAT_PORT`].
    pub flags: u32,
    pub backend_port: u16,
    pub dist: Distribution,
    /// Index into the section's pools.
    pub pool: usize,
}

/// What XDP may open flows of: rules and the pools they use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NfSection {
    pub rules: Vec<NfRule>,
    pub pools: Vec<NfPool>,
}

/// How a section was written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NfWritten {
    pub rules: u32,
    /// Rules left out: no room (entries, members, table words, index probes).
    pub left_out: u32,
}

/// The key hash of a rule entry (XDP computes the same from the SYN's destination).
pub fn rule_hash(keys: &[u64; 4], vip: [u8; 4], vport: u16) -> u64 {
    fast_hash(keys, 0, wire_word(vip), ports_word(0, vport), PROTO_TCP)
}

/// Writes `section` into the new-flow section of `mem` (laid out as `layout`), from scratch:
/// every rule index slot, rule entry, member entry and table word it does not use is
/// zeroed. Call it only while `NF_ENABLED` is 0 and a grace has passed since it went 0 (XDP
/// does not read the section then); the rings and the switch are left alone.
pub fn write_section(mem: &[AtomicU32], layout: &FastLayout, section: &NfSection) -> NfWritten {
    let keys = header_keys(mem);
    let put = |w: usize, v: u32| mem[w].store(v, Ordering::Relaxed);
    let (index, rules_base, members_base, tables_base) = (
        layout.element_word(layout.nf_rule_index_base, 0),
        layout.nf_rules_base,
        layout.nf_members_base,
        layout.element_word(layout.nf_tables_base, 0),
    );
    for w in index..layout.element_word(layout.nf_rings_base, 0) {
        put(w, 0);
    }
    // Pools are written when their first rule is: (member entry of member 0, table offset).
    let mut placed: Vec<Option<(u32, u32)>> = vec![None; section.pools.len()];
    let (mut members_used, mut words_used, mut entries) = (0u32, 0u32, 0u32);
    let mut out = NfWritten::default();
    let mask = NF_RULE_SLOTS - 1;
    for r in &section.rules {
        let Some(pool) = section.pools.get(r.pool) else {
            out.left_out += 1;
            continue;
        };
        let table_words = pool.table.len().div_ceil(2) as u32;
        let fits_pool = placed[r.pool].is_some()
            || (members_used + pool.members.len() as u32 <= NF_MEMBERS
                && words_used + table_words <= NF_TABLE_WORDS
                && pool.members.len() < usize::from(NO_MEMBER));
        let h = rule_hash(&keys, r.vip, r.vport) as u32;
        let slot = (0..NF_RULE_PROBES)
            .map(|i| h.wrapping_add(i) & mask)
            .find(|&s| mem[index + s as usize].load(Ordering::Relaxed) == 0);
        let (true, Some(slot), true) = (fits_pool, slot, entries < NF_RULES) else {
            out.left_out += 1;
            continue;
        };
        let (members_off, table_off) = match placed[r.pool] {
            Some(p) => p,
            None => {
                let p = (members_used, words_used);
                for (i, m) in pool.members.iter().enumerate() {
                    let e = |w: usize| layout.element_word(members_base + p.0 + i as u32, w);
                    put(e(nfm::ADDR), wire_word(m.addr));
                    put(e(nfm::TX_PORT), u32::from(m.tx_port));
                    for (j, c) in m.macs.chunks_exact(4).enumerate() {
                        put(e(nfm::MACS + j), wire_word([c[0], c[1], c[2], c[3]]));
                    }
                    put(e(nfm::VALID), u32::from(m.valid));
                }
                for (i, pair) in pool.table.chunks(2).enumerate() {
                    let hi = pair.get(1).copied().unwrap_or(NO_MEMBER);
                    let w = u32::from(pair[0]) | (u32::from(hi) << 16);
                    put(tables_base + (p.1 as usize) + i, w);
                }
                members_used += pool.members.len() as u32;
                words_used += table_words;
                placed[r.pool] = Some(p);
                p
            }
        };
        let e = |w: usize| layout.element_word(rules_base + entries, w);
        put(e(nfr::VIP), wire_word(r.vip));
        put(e(nfr::PORTS), ports_word(0, r.vport));
        put(
            e(nfr::PROTO_RULE),
            u32::from(PROTO_TCP) | (u32::from(r.rule) << 16),
        );
        put(e(nfr::INGRESS_PORT), u32::from(r.ingress_port));
        put(e(nfr::FLAGS), r.flags);
        put(e(nfr::BACKEND_PORT), u32::from(r.backend_port));
        put(e(nfr::DIST), dist_word(r.dist));
        put(e(nfr::TABLE_OFF), table_off);
        put(e(nfr::TABLE_SLOTS), pool.table.len() as u32);
        put(e(nfr::MEMBERS_OFF), members_off);
        put(e(nfr::MEMBERS_N), pool.members.len() as u32);
        put(index + slot as usize, entries + 1);
        entries += 1;
        out.rules += 1;
    }
    out
}

/// What the section says about a SYN from `client`:`sport` to `vip`:`vport` arriving on
/// `ingress`: the choice XDP makes, step by step as it makes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NfChoice {
    pub rule: u16,
    pub flags: u32,
    /// The member's address and the port the SYN leaves with.
    pub addr: [u8; 4],
    pub port: u16,
    pub tx_port: u16,
    pub macs: [u8; 12],
    /// The worker whose ring gets the record.
    pub owner: u16,
}

/// Why XDP punts a SYN (its `xlb_fast_stats` reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NfPunt {
    Off,
    NoRule,
    WrongPort,
    NoMember,
    RingFull,
}

fn load(mem: &[AtomicU32], w: usize) -> u32 {
    mem[w].load(Ordering::Relaxed)
}

/// The XDP program's choice for a SYN (see [`NfChoice`]): rule lookup, ingress check, Maglev
/// slot, member, owner. The reference the BPF code follows, and the tests' stand-in.
pub fn choose(
    mem: &[AtomicU32],
    layout: &FastLayout,
    ingress: u16,
    client: [u8; 4],
    sport: u16,
    vip: [u8; 4],
    vport: u16,
) -> Result<NfChoice, NfPunt> {
    if !(crate::fast::is_enabled(mem) && nf_enabled(mem)) {
        return Err(NfPunt::Off);
    }
    let keys = header_keys(mem);
    let h = rule_hash(&keys, vip, vport) as u32;
    let index = layout.element_word(layout.nf_rule_index_base, 0);
    let mut entry = None;
    for i in 0..NF_RULE_PROBES {
        let v = load(
            mem,
            index + (h.wrapping_add(i) & (NF_RULE_SLOTS - 1)) as usize,
        );
        if v == 0 {
            break;
        }
        let e = v - 1;
        if e >= NF_RULES {
            continue;
        }
        let w = |x: usize| load(mem, layout.element_word(layout.nf_rules_base + e, x));
        if w(nfr::VIP) == wire_word(vip)
            && w(nfr::PORTS) == ports_word(0, vport)
            && w(nfr::PROTO_RULE) & 0xffff == u32::from(PROTO_TCP)
        {
            entry = Some(e);
            break;
        }
    }
    let e = entry.ok_or(NfPunt::NoRule)?;
    let r = |x: usize| load(mem, layout.element_word(layout.nf_rules_base + e, x));
    if r(nfr::INGRESS_PORT) != u32::from(ingress) {
        return Err(NfPunt::WrongPort);
    }
    let tuple = FlowTuple {
        proto: PROTO_TCP,
        src: mapped(client),
        src_port: sport,
        dst: mapped(vip),
        dst_port: vport,
    };
    let m = r(nfr::TABLE_SLOTS) as usize;
    if m == 0 {
        return Err(NfPunt::NoMember);
    }
    let slot = reduce(flow_hash(dist_of(r(nfr::DIST)), &tuple), m);
    let word = load(
        mem,
        layout.element_word(layout.nf_tables_base, 0) + r(nfr::TABLE_OFF) as usize + slot / 2,
    );
    let member = if slot % 2 == 0 {
        word & 0xffff
    } else {
        word >> 16
    };
    if member == u32::from(NO_MEMBER) || member >= r(nfr::MEMBERS_N) {
        return Err(NfPunt::NoMember);
    }
    let me = layout.nf_members_base + r(nfr::MEMBERS_OFF) + member;
    if me >= layout.nf_members_base + NF_MEMBERS {
        return Err(NfPunt::NoMember);
    }
    let mw = |x: usize| load(mem, layout.element_word(me, x));
    if mw(nfm::VALID) != 1 {
        return Err(NfPunt::NoMember);
    }
    let flags = r(nfr::FLAGS);
    let port = if flags & FLAG_DNAT_PORT != 0 {
        r(nfr::BACKEND_PORT) as u16
    } else {
        vport
    };
    let mut macs = [0u8; 12];
    for j in 0..3 {
        macs[4 * j..4 * j + 4].copy_from_slice(&mw(nfm::MACS + j).to_ne_bytes());
    }
    let steer = crate::hashkey::HashKey::from_words(steer_keys(mem));
    let workers = layout.workers;
    let owner = crate::engine::steer(&steer, tuple.src, sport, workers);
    Ok(NfChoice {
        rule: (r(nfr::PROTO_RULE) >> 16) as u16,
        flags,
        addr: mw(nfm::ADDR).to_ne_bytes(),
        port,
        tx_port: mw(nfm::TX_PORT) as u16,
        macs,
        owner,
    })
}

/// One record of a ring, as the worker takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NfRecord {
    pub stamp: u32,
    /// The member's address and the port the SYN left with.
    pub addr: [u8; 4],
    pub port: u16,
    pub rule: u32,
    pub ingress_port: u32,
    /// Bytes of `headers` used.
    pub len: u32,
    /// The received frame's destination MAC then source MAC.
    pub macs: [u8; 12],
    pub headers: [u8; RECORD_HEADERS],
}

impl NfRecord {
    pub const EMPTY: NfRecord = NfRecord {
        stamp: 0,
        addr: [0; 4],
        port: 0,
        rule: 0,
        ingress_port: 0,
        len: 0,
        macs: [0; 12],
        headers: [0; RECORD_HEADERS],
    };
}

/// Ring of worker `worker`: word of `PROD`, word of `CONS`, word of record `i`'s word 0.
fn ring_words(layout: &FastLayout, worker: u16) -> (usize, usize, u32) {
    let base = layout.nf_rings_base + u32::from(worker) * layout.nf_ring_elements;
    (
        layout.element_word(base, 0),
        layout.element_word(base + 1, 0),
        base + 2,
    )
}

fn record_word(layout: &FastLayout, first: u32, i: u32, w: usize) -> usize {
    let slot = i & (layout.nf_ring_records - 1);
    layout.element_word(first + RECORD_ELEMENTS * slot, w)
}

/// Whether worker `worker`'s ring holds a record not consumed yet (complete or being written).
#[inline]
pub fn ring_pending(mem: &[AtomicU32], layout: &FastLayout, worker: u16) -> bool {
    let (prod, cons, _) = ring_words(layout, worker);
    mem[prod].load(Ordering::Acquire) != mem[cons].load(Ordering::Relaxed)
}

/// Records reserved and not consumed yet in worker `worker`'s ring.
pub fn ring_len(mem: &[AtomicU32], layout: &FastLayout, worker: u16) -> u32 {
    let (prod, cons, _) = ring_words(layout, worker);
    mem[prod]
        .load(Ordering::Acquire)
        .wrapping_sub(mem[cons].load(Ordering::Acquire))
}

/// The consumer (worker `worker`'s engine, the ring's only consumer): takes the oldest
/// record into `out` if it is complete. False when the ring is empty or its oldest record is
/// still being written (the next call tries again: records are consumed in order).
pub fn ring_pop(mem: &[AtomicU32], layout: &FastLayout, worker: u16, out: &mut NfRecord) -> bool {
    let mut drain = RingDrain::begin(mem, layout, worker);
    let taken = drain.next(mem, out);
    drain.end(mem);
    taken
}

/// A pass of the consumer over worker `worker`'s ring: [`begin`](Self::begin) reads `PROD`
/// once, [`next`](Self::next) takes records up to it in order, [`end`](Self::end) stores
/// `CONS` once for all of them. The two counters' cache lines then cross between the
/// worker's core and XDP's once per pass rather than once per record; records reserved
/// during the pass wait for the next one.
#[derive(Clone, Copy, Debug)]
pub struct RingDrain {
    cons_word: usize,
    first: u32,
    records: u32,
    prod: u32,
    start: u32,
    cons: u32,
}

impl RingDrain {
    /// Starts a pass (`CONS` is the consumer's own: read relaxed; `PROD` with acquire).
    pub fn begin(mem: &[AtomicU32], layout: &FastLayout, worker: u16) -> RingDrain {
        let (prod_word, cons_word, first) = ring_words(layout, worker);
        let cons = mem[cons_word].load(Ordering::Relaxed);
        RingDrain {
            cons_word,
            first,
            records: layout.nf_ring_records,
            prod: mem[prod_word].load(Ordering::Acquire),
            start: cons,
            cons,
        }
    }

    /// Takes the next record into `out` if it was reserved before the pass began and is
    /// complete; false otherwise (a record still being written stops the pass: records are
    /// consumed in order).
    pub fn next(&mut self, mem: &[AtomicU32], out: &mut NfRecord) -> bool {
        let c = self.cons;
        if c == self.prod {
            return false;
        }
        let at = (self.first + RECORD_ELEMENTS * (c & (self.records - 1))) as usize * ELEMENT_WORDS;
        let w = |x: usize| mem[at + x].load(Ordering::Acquire);
        if w(nfq::SEQ) != c.wrapping_add(1) {
            return false;
        }
        out.stamp = w(nfq::STAMP);
        out.addr = w(nfq::ADDR).to_ne_bytes();
        out.port = w(nfq::PORT) as u16;
        out.rule = w(nfq::RULE);
        out.ingress_port = w(nfq::INGRESS_PORT);
        out.len = w(nfq::LEN).min(RECORD_HEADERS as u32);
        for j in 0..RECORD_HEADERS / 4 {
            out.headers[4 * j..4 * j + 4].copy_from_slice(&w(nfq::HEADERS + j).to_ne_bytes());
        }
        for j in 0..3 {
            out.macs[4 * j..4 * j + 4].copy_from_slice(&w(nfq::MACS + j).to_ne_bytes());
        }
        self.cons = c.wrapping_add(1);
        true
    }

    /// Ends the pass: `CONS` (release: every record taken was read before) past the records
    /// taken, if any.
    pub fn end(self, mem: &[AtomicU32]) {
        if self.cons != self.start {
            mem[self.cons_word].store(self.cons, Ordering::Release);
        }
    }
}

/// The ring is full (or every try to reserve lost a race): XDP punts the SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingFull;

/// The producer's half of the XDP procedure, in Rust (the stand-in XDP of the tests): reserves
/// a record in worker `worker`'s ring (at most 4 tries of compare-and-swap on `PROD`, none if
/// the ring is full), writes it and, last, its `SEQ`.
pub fn ring_push(
    mem: &[AtomicU32],
    layout: &FastLayout,
    worker: u16,
    rec: &NfRecord,
) -> Result<(), RingFull> {
    let (prod, cons, _) = ring_words(layout, worker);
    let mut reserved = None;
    for _ in 0..4 {
        let p = mem[prod].load(Ordering::Acquire);
        let c = mem[cons].load(Ordering::Acquire);
        if p.wrapping_sub(c) >= layout.nf_ring_records {
            return Err(RingFull);
        }
        if mem[prod]
            .compare_exchange(p, p.wrapping_add(1), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            reserved = Some(p);
            break;
        }
    }
    let p = reserved.ok_or(RingFull)?;
    ring_finish(mem, layout, worker, p, rec);
    Ok(())
}

/// The start of a record a producer has reserved but not finished (for tests of the
/// consumer's wait): reserves the record and returns its number; [`ring_finish`] writes it.
pub fn ring_reserve(mem: &[AtomicU32], layout: &FastLayout, worker: u16) -> Result<u32, RingFull> {
    let (prod, cons, _) = ring_words(layout, worker);
    let p = mem[prod].load(Ordering::Acquire);
    if p.wrapping_sub(mem[cons].load(Ordering::Acquire)) >= layout.nf_ring_records {
        return Err(RingFull);
    }
    mem[prod].store(p.wrapping_add(1), Ordering::Release);
    Ok(p)
}

/// Writes reserved record `p` ([`ring_reserve`]) as XDP does: every word, the reserved ones
/// zero, `SEQ` last.
pub fn ring_finish(mem: &[AtomicU32], layout: &FastLayout, worker: u16, p: u32, rec: &NfRecord) {
    let (_, _, first) = ring_words(layout, worker);
    let put = |x: usize, v: u32| mem[record_word(layout, first, p, x)].store(v, Ordering::Relaxed);
    put(nfq::STAMP, rec.stamp);
    put(nfq::ADDR, wire_word(rec.addr));
    put(nfq::PORT, u32::from(rec.port));
    put(nfq::RULE, rec.rule);
    put(nfq::INGRESS_PORT, rec.ingress_port);
    put(nfq::LEN, rec.len);
    put(nfq::RESERVED, 0);
    for (j, c) in rec.headers.chunks_exact(4).enumerate() {
        put(nfq::HEADERS + j, wire_word([c[0], c[1], c[2], c[3]]));
    }
    for (j, c) in rec.macs.chunks_exact(4).enumerate() {
        put(nfq::MACS + j, wire_word([c[0], c[1], c[2], c[3]]));
    }
    put(nfq::MACS + 3, 0);
    mem[record_word(layout, first, p, nfq::SEQ)].store(p.wrapping_add(1), Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fast::init_header;

    fn mem(layout: &FastLayout) -> &'static [AtomicU32] {
        let v: Vec<AtomicU32> = (0..layout.words()).map(|_| AtomicU32::new(0)).collect();
        Box::leak(v.into_boxed_slice())
    }

    fn record(n: u8) -> NfRecord {
        let mut r = NfRecord::EMPTY;
        r.rule = u32::from(n);
        r.len = 40;
        r.headers[0] = 0x45;
        r.headers[39] = n;
        r.macs[11] = n;
        r
    }

    #[test]
    fn ring_wraps_fills_and_waits_for_an_unfinished_record() {
        let l = FastLayout::new(4, 2).with_ring_records(4);
        let m = mem(&l);
        init_header(m, &l, [1, 3, 5, 7], [2, 4, 6, 8]);
        let mut out = NfRecord::EMPTY;
        for round in 0..3u8 {
            for i in 0..4 {
                ring_push(m, &l, 1, &record(round * 4 + i)).unwrap();
            }
            assert_eq!(ring_push(m, &l, 1, &record(99)), Err(RingFull));
            assert!(!ring_pending(m, &l, 0), "worker 0's ring is apart");
            for i in 0..4 {
                assert!(ring_pop(m, &l, 1, &mut out));
                assert_eq!(out, record(round * 4 + i));
            }
            assert!(!ring_pop(m, &l, 1, &mut out));
        }
        // A record reserved but not written holds back the ones behind it.
        let p = ring_reserve(m, &l, 1).unwrap();
        ring_push(m, &l, 1, &record(50)).unwrap();
        assert!(ring_pending(m, &l, 1));
        assert!(!ring_pop(m, &l, 1, &mut out));
        ring_finish(m, &l, 1, p, &record(49));
        assert!(ring_pop(m, &l, 1, &mut out));
        assert_eq!(out.rule, 49);
        assert!(ring_pop(m, &l, 1, &mut out));
        assert_eq!(out.rule, 50);
        assert!(!ring_pending(m, &l, 1));
    }

    #[test]
    fn header_and_steer_keys_are_written() {
        let l = FastLayout::new(4, 3);
        let m = mem(&l);
        init_header(m, &l, [1, 3, 5, 7], [2, 4 | (9 << 32), 6, 8]);
        assert_eq!(steer_keys(m), [2, 4 | (9 << 32), 6, 8]);
        let w = |i: usize| m[nf_word(i)].load(Ordering::Relaxed);
        assert_eq!(w(nf::ENABLED), 0);
        assert_eq!(w(nf::RULE_SLOTS), NF_RULE_SLOTS);
        assert_eq!(w(nf::RINGS_BASE), l.nf_rings_base);
        assert_eq!(w(nf::RING_ELEMENTS), 2 + 2 * NF_RING_RECORDS);
        assert_eq!(w(nf::WORKERS), 3);
        assert!(crate::fast::header_matches(m, &l));
        m[nf_word(nf::RING_RECORDS)].store(8, Ordering::Relaxed);
        assert!(!crate::fast::header_matches(m, &l));
    }

    #[test]
    fn a_written_section_gives_the_member_of_its_table() {
        let l = FastLayout::new(4, 2);
        let m = mem(&l);
        init_header(m, &l, [1, 3, 5, 7], [2, 4, 6, 8]);
        crate::fast::set_enabled(m, true);
        let member = |i: u8| NfMember {
            valid: i != 2,
            addr: [198, 18, 1, i],
            tx_port: 1,
            macs: [i; 12],
        };
        let table: Vec<u16> = (0..4099u32).map(|s| (s % 3) as u16).collect();
        let section = NfSection {
            pools: vec![NfPool {
                table: table.clone(),
                members: vec![member(0), member(1), member(2)],
            }],
            rules: vec![NfRule {
                vip: [198, 18, 0, 100],
                vport: 80,
                rule: 7,
                ingress_port: 0,
                flags: FLAG_DNAT_ADDR | FLAG_DNAT_PORT,
                backend_port: 8080,
                dist: Distribution::FiveTuple,
                pool: 0,
            }],
        };
        assert_eq!(
            write_section(m, &l, &section),
            NfWritten {
                rules: 1,
                left_out: 0
            }
        );
        let go = |sport| choose(m, &l, 0, [198, 18, 2, 1], sport, [198, 18, 0, 100], 80);
        assert_eq!(go(1000), Err(NfPunt::Off));
        set_nf_enabled(m, true);
        let mut seen = [0; 3];
        for sport in 1000..1400 {
            let tuple = FlowTuple {
                proto: PROTO_TCP,
                src: mapped([198, 18, 2, 1]),
                src_port: sport,
                dst: mapped([198, 18, 0, 100]),
                dst_port: 80,
            };
            let want = table[reduce(flow_hash(Distribution::FiveTuple, &tuple), 4099)];
            match go(sport) {
                Ok(c) => {
                    assert_eq!(c.addr, [198, 18, 1, want as u8]);
                    assert_eq!((c.port, c.rule, c.tx_port), (8080, 7, 1));
                    assert_eq!(c.macs, [want as u8; 12]);
                    seen[usize::from(want)] += 1;
                }
                Err(e) => {
                    assert_eq!((e, want), (NfPunt::NoMember, 2));
                    seen[2] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        let other = choose(m, &l, 0, [198, 18, 2, 1], 1, [198, 18, 0, 100], 81);
        assert_eq!(other, Err(NfPunt::NoRule));
        let port = choose(m, &l, 1, [198, 18, 2, 1], 1, [198, 18, 0, 100], 80);
        assert_eq!(port, Err(NfPunt::WrongPort));
    }
}
