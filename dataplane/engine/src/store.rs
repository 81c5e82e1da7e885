//! The flow store: one worker's flows as fixed-size records in memory the engine is handed,
//! so that they can outlive the process (xlbd maps a BPF array pinned in bpffs; tests hand a
//! `Vec<u8>`). The owning worker is the only writer; the engine writes a flow's record when
//! the flow is created, on every packet it forwards (TCP tracking and `last_seen`), when it is
//! confirmed or re-homed, and clears it when the flow goes. The indexes, the timer wheel, the
//! admission lists and the SNAT bitmap are not stored: they are rebuilt from the records when
//! an engine attaches a store that holds flows ([`crate::Engine::attach_store`]).
//!
//! Layout, native byte order, every region a multiple of [`RECORD`] bytes (so that the
//! records can later be read as the values of a BPF array of `RECORD`-byte elements):
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 128 | header: magic, layout version, record size, geometry (flow capacity, late slots, worker, workers), open marker, configuration hash, steering seed, attach count |
//! | 128 | 8 × 65 536 | rule identities: per rule id, a hash of the rule's kind and name (0: none) |
//! | after | 128 × capacity | one record per flow slot |
//! | after | 32 × late slots | the late-packet memory |
//!
//! A record's first word is its commit marker: 0 free, odd while the identity of the flow
//! is being written, even (≥ 2) once it is complete. A process killed in the middle of a
//! creation leaves an odd marker: that record is dropped on restore (its first packet never
//! left, so its sender retransmits and the flow is created again). The per-packet fields
//! (TCP tracking and `last_seen`) are written in place without the marker: each of them is
//! valid alone, and a packet being processed when the process died was never transmitted,
//! so either its old or its new value is one the two ends agree with.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{compiler_fence, Ordering};

use crate::addr::Addr;
use crate::flow::{Flow, FlowTrack, Nat};
use crate::late::LateTable;
use crate::net::NextHop;
use crate::ruleset::{RuleId, RuleSet};
use crate::tcp::{TcpTrack, TRACK_RECORD_BYTES};
use crate::time::Nanos;

/// Memory a flow store lives in: a mapping that outlives the process, or a plain vector.
pub trait StoreMemory: Send + Debug {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl StoreMemory for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// "XLBFLOWS": a flow store's first eight bytes.
pub const MAGIC: [u8; 8] = *b"XLBFLOWS";
/// Bumped whenever the layout changes, or the meaning of what it holds (version 2: the
/// steering hash of the recorded seed changed, so version-1 flows sit in other workers'
/// stores): a store of another version is discarded.
pub const LAYOUT_VERSION: u32 = 2;
/// Bytes per flow record (and per header, and the unit of every region).
pub const RECORD: usize = 128;
/// Rule ids the identity region covers (`RuleId` is 16 bits).
const RULE_IDS: usize = 1 << 16;
const LATE_ENTRY: usize = 32;
const RULES_AT: usize = RECORD;
const RECORDS_AT: usize = RULES_AT + RULE_IDS * 8;

// Header fields.
const H_VERSION: usize = 8;
const H_RECORD: usize = 12;
const H_CAPACITY: usize = 16;
const H_LATE: usize = 20;
const H_WORKER: usize = 24;
const H_WORKERS: usize = 26;
const H_OPEN: usize = 28;
const H_CONFIG: usize = 32;
const H_STEER: usize = 40;
const H_ATTACHES: usize = 48;
const H_CLOSED_AT: usize = 56;
const H_FLOW_SEED: usize = 64;
const H_PORTS: usize = 72;

// Record fields.
const R_SEQ: usize = 0;
const R_PROTO: usize = 4;
const R_NAT: usize = 5;
const R_FLAGS: usize = 6;
const R_RULE: usize = 8;
const R_SPORT: usize = 10;
const R_DPORT: usize = 12;
const R_XPORT: usize = 14;
const R_SRC: usize = 16;
const R_DST: usize = 32;
const R_XLAT: usize = 48;
const R_TCP: usize = 64;
const R_LAST_SEEN: usize = 88;
/// Per direction (original, reply): port u16, VLAN u16 (0: none, else id + 1), MAC.
const R_HOPS: usize = 96;
const HOP_BYTES: usize = 10;
/// A cluster standby copy: the `last_seen` its latest synced state set (0: not a standby copy).
/// It is standby while its `last_seen` is still that one. Older stores have zeros here.
const R_STANDBY_SEEN: usize = 120;
const _: () = assert!(R_HOPS + 2 * HOP_BYTES <= R_STANDBY_SEEN && R_STANDBY_SEEN + 8 <= RECORD);

const FLAG_CONFIRMED: u8 = 1;

/// What a store must agree on with the engine attaching it; anything else discards it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub capacity: u32,
    pub late_slots: u32,
    pub worker: u16,
    pub workers: u16,
}

impl Geometry {
    /// The geometry of the store of an engine made with `cfg`.
    pub fn of(cfg: &crate::EngineConfig) -> Geometry {
        Geometry {
            capacity: cfg.flow_capacity.max(1),
            late_slots: cfg.late_slots.max(1).next_power_of_two() as u32,
            worker: cfg.worker,
            workers: cfg.workers,
        }
    }

    /// Bytes a store of this geometry needs.
    pub fn bytes(&self) -> usize {
        RECORDS_AT + RECORD * self.capacity as usize + LATE_ENTRY * self.late_slots as usize
    }
}

/// How an engine's flows got to it when it attached a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The store was empty: a first start.
    Fresh,
    /// The records were restored.
    Restored,
    /// The store could not be trusted and was wiped; why.
    Discarded(String),
}

/// What attaching a store did, for the daemon's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreReport {
    pub outcome: StoreOutcome,
    /// Flows restored.
    pub flows: u32,
    /// SNAT ports those flows hold again.
    pub snat_ports: u32,
    /// Records dropped: torn by a process that died while creating the flow.
    pub torn: u32,
    /// Records dropped: unreadable (a field out of range, a tuple another record holds).
    pub invalid: u32,
    /// Records dropped: their rule is not in the configuration any more.
    pub rule_gone: u32,
    /// Late-packet entries restored.
    pub late: u32,
    /// The previous owner did not close the store (it crashed or was killed).
    pub unclean: bool,
    /// The configuration hash differed: flows were matched to rules by kind and name.
    pub config_changed: bool,
    /// When the previous owner closed the store (its `now`), if it did.
    pub closed_at: Option<Nanos>,
    /// The late-packet memory was keyed with this engine's flow hash seed (else it is
    /// dropped: its entries could never match).
    pub late_keyed: bool,
}

impl StoreReport {
    fn new(outcome: StoreOutcome) -> StoreReport {
        StoreReport {
            outcome,
            flows: 0,
            snat_ports: 0,
            torn: 0,
            invalid: 0,
            rule_gone: 0,
            late: 0,
            unclean: false,
            config_changed: false,
            closed_at: None,
            late_keyed: false,
        }
    }
}

/// A flow as its record holds it, with its two next hops by value.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub flow: Flow,
    pub confirmed: bool,
    /// (port, VLAN, destination MAC) per direction.
    pub hops: [(u16, Option<u16>, [u8; 6]); 2],
    /// A cluster standby copy: the `last_seen` its synced state set; 0 when not one.
    pub standby_seen: u64,
}

/// The engine's handle on its store; detached (writes nothing) until one is attached. A
/// clone of an engine is detached: only one engine writes a store.
#[derive(Debug, Default)]
pub struct FlowStore {
    mem: Option<Box<dyn StoreMemory>>,
}

impl Clone for FlowStore {
    fn clone(&self) -> FlowStore {
        FlowStore::default()
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}
fn u128_at(b: &[u8], at: usize) -> u128 {
    let mut w = [0u8; 16];
    w.copy_from_slice(&b[at..at + 16]);
    u128::from_ne_bytes(w)
}

/// The identity of an engine's ports: their MAC addresses in port order, hashed (FNV-1a).
/// Flows store their next hops by port id, so a store is only valid for the same ports.
pub fn ports_identity(macs: &[[u8; 6]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in macs
        .iter()
        .flatten()
        .chain(&(macs.len() as u64).to_ne_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The identity of a rule across configurations: its kind and name, hashed (FNV-1a), never 0.
pub fn rule_identity(rules: &RuleSet, id: RuleId) -> u64 {
    let Some(p) = rules.rule(id) else { return 0 };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in p.kind.as_str().bytes().chain([0]).chain(p.name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// The seeds a valid store of `geometry` holds in `bytes`: (steering, flow hash). Every
/// worker of one daemon must steer with the seed the flows were placed with; the flow hash
/// seed keys the late-packet memory (the flow index is rebuilt with whatever seed).
pub fn stored_seeds(bytes: &[u8], geometry: Geometry) -> Option<(u64, u64)> {
    header_problem(bytes, geometry)
        .is_none()
        .then(|| (u64_at(bytes, H_STEER), u64_at(bytes, H_FLOW_SEED)))
}

/// Why the header of `bytes` does not describe a store of `geometry`; `None` when it does.
fn header_problem(b: &[u8], g: Geometry) -> Option<String> {
    if b.len() < g.bytes() {
        return Some(format!(
            "the memory holds {} bytes, the geometry needs {}",
            b.len(),
            g.bytes()
        ));
    }
    if b[..8] != MAGIC {
        return Some("no flow store header".into());
    }
    let version = u32_at(b, H_VERSION);
    if version != LAYOUT_VERSION || u32_at(b, H_RECORD) as usize != RECORD {
        return Some(format!(
            "layout version {version} (record {} bytes), this xlbd writes version \
             {LAYOUT_VERSION} ({RECORD} bytes)",
            u32_at(b, H_RECORD)
        ));
    }
    let stored = Geometry {
        capacity: u32_at(b, H_CAPACITY),
        late_slots: u32_at(b, H_LATE),
        worker: u16_at(b, H_WORKER),
        workers: u16_at(b, H_WORKERS),
    };
    (stored != g).then(|| {
        format!(
            "written for worker {} of {} with {} flows and {} late slots, now worker {} of {} \
             with {} and {}",
            stored.worker,
            stored.workers,
            stored.capacity,
            stored.late_slots,
            g.worker,
            g.workers,
            g.capacity,
            g.late_slots
        )
    })
}

impl FlowStore {
    pub fn is_attached(&self) -> bool {
        self.mem.is_some()
    }

    /// Checks `mem`'s header against `g` and `steer_seed`: a store to restore, or one that
    /// is empty or cannot be trusted, which is wiped to a fresh header (the report says
    /// which). `Err`: the memory is too small.
    pub(crate) fn open(
        &mut self,
        mut mem: Box<dyn StoreMemory>,
        g: Geometry,
        config_hash: u64,
        (steer_seed, flow_seed): (u64, u64),
        ports: u64,
    ) -> Result<(Box<dyn StoreMemory>, StoreReport), String> {
        let b = mem.bytes_mut();
        if b.len() < g.bytes() {
            return Err(format!(
                "flow store of {} bytes, {} needed",
                b.len(),
                g.bytes()
            ));
        }
        let empty = b[..RECORD].iter().all(|&x| x == 0);
        let problem = if empty {
            None
        } else {
            header_problem(b, g)
                .or_else(|| {
                    (u64_at(b, H_STEER) != steer_seed).then(|| {
                        "written with another steering seed: its flows belong to other workers"
                            .to_string()
                    })
                })
                .or_else(|| {
                    (u64_at(b, H_PORTS) != ports).then(|| {
                        "written for other interfaces (names the ports by their order and MAC \
                         addresses): its flows' next hops would be wrong"
                            .to_string()
                    })
                })
        };
        let outcome = match (empty, problem) {
            (true, _) => StoreOutcome::Fresh,
            (false, Some(p)) => StoreOutcome::Discarded(p),
            (false, None) => StoreOutcome::Restored,
        };
        let mut report = StoreReport::new(outcome);
        if report.outcome != StoreOutcome::Restored {
            b[..g.bytes()].fill(0);
            write_header(b, g, config_hash, steer_seed, flow_seed, ports);
        } else {
            report.late_keyed = u64_at(b, H_FLOW_SEED) == flow_seed;
            report.unclean = u32_at(b, H_OPEN) != 0;
            report.config_changed = u64_at(b, H_CONFIG) != config_hash;
            let closed = u64_at(b, H_CLOSED_AT);
            report.closed_at = (!report.unclean && closed != 0).then_some(closed);
        }
        Ok((mem, report))
    }

    /// Starts writing `mem` (after [`open`](Self::open) and any restore): marks it open.
    pub(crate) fn start(
        &mut self,
        mut mem: Box<dyn StoreMemory>,
        config_hash: u64,
        flow_seed: u64,
    ) {
        let b = mem.bytes_mut();
        b[H_FLOW_SEED..H_FLOW_SEED + 8].copy_from_slice(&flow_seed.to_ne_bytes());
        b[H_CONFIG..H_CONFIG + 8].copy_from_slice(&config_hash.to_ne_bytes());
        let attaches = u64_at(b, H_ATTACHES).wrapping_add(1);
        b[H_ATTACHES..H_ATTACHES + 8].copy_from_slice(&attaches.to_ne_bytes());
        b[H_CLOSED_AT..H_CLOSED_AT + 8].fill(0);
        b[H_OPEN..H_OPEN + 4].copy_from_slice(&1u32.to_ne_bytes());
        self.mem = Some(mem);
    }

    /// Marks the store closed by its owner at `now` (a planned stop) and detaches it.
    pub(crate) fn close(&mut self, now: Nanos) -> Option<Box<dyn StoreMemory>> {
        let mut mem = self.mem.take()?;
        let b = mem.bytes_mut();
        compiler_fence(Ordering::SeqCst);
        b[H_CLOSED_AT..H_CLOSED_AT + 8].copy_from_slice(&now.max(1).to_ne_bytes());
        b[H_OPEN..H_OPEN + 4].fill(0);
        Some(mem)
    }

    /// Stops writing without closing.
    pub(crate) fn abandon(&mut self) -> Option<Box<dyn StoreMemory>> {
        self.mem.take()
    }

    /// Writes the identities of `rules`' ids (and none for the ids beyond them).
    pub(crate) fn put_rules(&mut self, rules: &RuleSet) {
        let Some(mem) = self.mem.as_mut() else { return };
        let b = mem.bytes_mut();
        let bound = rules.rule_id_bound().min(RULE_IDS);
        b[RULES_AT + 8 * bound..RECORDS_AT].fill(0);
        for id in 0..bound {
            let at = RULES_AT + 8 * id;
            let ident = rule_identity(rules, id as RuleId);
            b[at..at + 8].copy_from_slice(&ident.to_ne_bytes());
        }
    }

    /// Writes the whole record of flow `id`.
    pub(crate) fn put(&mut self, id: u32, f: &Flow, confirmed: bool, hops: [&NextHop; 2]) {
        let Some(mem) = self.mem.as_mut() else { return };
        let Some(r) = record_mut(mem.bytes_mut(), id) else {
            return;
        };
        let seq = u32_at(r, R_SEQ) | 1;
        r[R_SEQ..R_SEQ + 4].copy_from_slice(&seq.to_ne_bytes());
        compiler_fence(Ordering::SeqCst);
        r[R_PROTO] = f.proto;
        r[R_NAT] = f.nat as u8;
        r[R_FLAGS] = if confirmed { FLAG_CONFIRMED } else { 0 };
        r[R_RULE..R_RULE + 2].copy_from_slice(&f.rule.to_ne_bytes());
        r[R_SPORT..R_SPORT + 2].copy_from_slice(&f.orig_sport.to_ne_bytes());
        r[R_DPORT..R_DPORT + 2].copy_from_slice(&f.orig_dport.to_ne_bytes());
        r[R_XPORT..R_XPORT + 2].copy_from_slice(&f.xlat_port.to_ne_bytes());
        r[R_SRC..R_SRC + 16].copy_from_slice(&f.orig_src.0.to_ne_bytes());
        r[R_DST..R_DST + 16].copy_from_slice(&f.orig_dst.0.to_ne_bytes());
        r[R_XLAT..R_XLAT + 16].copy_from_slice(&f.xlat.0.to_ne_bytes());
        r[R_TCP..R_TCP + TRACK_RECORD_BYTES].copy_from_slice(&f.tcp.to_record());
        r[R_LAST_SEEN..R_LAST_SEEN + 8].copy_from_slice(&f.last_seen.to_ne_bytes());
        for (dir, hop) in hops.into_iter().enumerate() {
            write_hop(r, dir, hop);
        }
        r[R_STANDBY_SEEN..R_STANDBY_SEEN + 8].fill(0);
        compiler_fence(Ordering::SeqCst);
        let done = seq.wrapping_add(1).max(2);
        r[R_SEQ..R_SEQ + 4].copy_from_slice(&done.to_ne_bytes());
    }

    /// Writes what a packet changes: the TCP tracking and `last_seen`.
    #[inline]
    pub(crate) fn put_live(&mut self, id: u32, f: &FlowTrack) {
        let Some(mem) = self.mem.as_mut() else { return };
        if let Some(r) = record_mut(mem.bytes_mut(), id) {
            r[R_TCP..R_TCP + TRACK_RECORD_BYTES].copy_from_slice(&f.tcp.to_record());
            r[R_LAST_SEEN..R_LAST_SEEN + 8].copy_from_slice(&f.last_seen.to_ne_bytes());
        }
    }

    /// Flow `id` is a cluster standby copy while its `last_seen` is `seen` (0: it is not one).
    pub(crate) fn put_standby(&mut self, id: u32, seen: u64) {
        let Some(mem) = self.mem.as_mut() else { return };
        if let Some(r) = record_mut(mem.bytes_mut(), id) {
            r[R_STANDBY_SEEN..R_STANDBY_SEEN + 8].copy_from_slice(&seen.to_ne_bytes());
        }
    }

    /// Flow `id` is confirmed (never evicted).
    pub(crate) fn put_confirmed(&mut self, id: u32) {
        let Some(mem) = self.mem.as_mut() else { return };
        if let Some(r) = record_mut(mem.bytes_mut(), id) {
            r[R_FLAGS] |= FLAG_CONFIRMED;
        }
    }

    /// Flow `id` sends direction `dir` through `hop` now.
    pub(crate) fn put_hop(&mut self, id: u32, dir: usize, hop: &NextHop) {
        let Some(mem) = self.mem.as_mut() else { return };
        if let Some(r) = record_mut(mem.bytes_mut(), id) {
            write_hop(r, dir, hop);
        }
    }

    /// Flow `id` is gone.
    pub(crate) fn clear(&mut self, id: u32) {
        let Some(mem) = self.mem.as_mut() else { return };
        if let Some(r) = record_mut(mem.bytes_mut(), id) {
            r[R_SEQ..R_SEQ + 4].fill(0);
        }
    }

    /// Writes slot `slot` of the late-packet memory from `late`.
    pub(crate) fn put_late(&mut self, late: &LateTable, slot: usize) {
        let Some(mem) = self.mem.as_mut() else { return };
        let b = mem.bytes_mut();
        let capacity = u32_at(b, H_CAPACITY) as usize;
        let at = RECORDS_AT + RECORD * capacity + LATE_ENTRY * slot;
        let Some(e) = b.get_mut(at..at + LATE_ENTRY) else {
            return;
        };
        let (hash, expired_at, rule, used) = late.entry(slot);
        e[0..8].copy_from_slice(&hash.to_ne_bytes());
        e[8..16].copy_from_slice(&expired_at.to_ne_bytes());
        e[16..18].copy_from_slice(&rule.to_ne_bytes());
        e[18] = u8::from(used);
    }

    /// Writes every slot of the late-packet memory.
    pub(crate) fn put_late_all(&mut self, late: &LateTable) {
        for slot in 0..late.slots() {
            self.put_late(late, slot);
        }
    }
}

fn write_header(
    b: &mut [u8],
    g: Geometry,
    config_hash: u64,
    steer_seed: u64,
    flow_seed: u64,
    ports: u64,
) {
    b[H_VERSION..H_VERSION + 4].copy_from_slice(&LAYOUT_VERSION.to_ne_bytes());
    b[H_RECORD..H_RECORD + 4].copy_from_slice(&(RECORD as u32).to_ne_bytes());
    b[H_CAPACITY..H_CAPACITY + 4].copy_from_slice(&g.capacity.to_ne_bytes());
    b[H_LATE..H_LATE + 4].copy_from_slice(&g.late_slots.to_ne_bytes());
    b[H_WORKER..H_WORKER + 2].copy_from_slice(&g.worker.to_ne_bytes());
    b[H_WORKERS..H_WORKERS + 2].copy_from_slice(&g.workers.to_ne_bytes());
    b[H_CONFIG..H_CONFIG + 8].copy_from_slice(&config_hash.to_ne_bytes());
    b[H_STEER..H_STEER + 8].copy_from_slice(&steer_seed.to_ne_bytes());
    b[H_FLOW_SEED..H_FLOW_SEED + 8].copy_from_slice(&flow_seed.to_ne_bytes());
    b[H_PORTS..H_PORTS + 8].copy_from_slice(&ports.to_ne_bytes());
    compiler_fence(Ordering::SeqCst);
    // The magic last: a header cut short by a crash reads as no header.
    b[..8].copy_from_slice(&MAGIC);
}

/// Where the record of flow slot `id` starts in a store.
pub fn record_offset(id: u32) -> usize {
    RECORDS_AT + RECORD * id as usize
}

fn record_mut(b: &mut [u8], id: u32) -> Option<&mut [u8]> {
    let at = RECORDS_AT + RECORD * id as usize;
    b.get_mut(at..at + RECORD)
}

fn write_hop(r: &mut [u8], dir: usize, hop: &NextHop) {
    let at = R_HOPS + HOP_BYTES * dir;
    r[at..at + 2].copy_from_slice(&hop.port.to_ne_bytes());
    let vlan = hop.vlan.map_or(0, |v| (v & 0x0fff) + 1);
    r[at + 2..at + 4].copy_from_slice(&vlan.to_ne_bytes());
    r[at + 4..at + 10].copy_from_slice(&hop.dst_mac);
}

/// What a restore reads: the records of live flows and the late-packet entries of a store
/// that passed the header checks.
pub(crate) struct Contents<'a> {
    bytes: &'a [u8],
    capacity: u32,
    late_slots: usize,
    /// Current rule id per stored rule id, built from the identity region.
    remap: Vec<Option<RuleId>>,
}

/// One slot's record, as read.
pub(crate) enum Slot {
    Free,
    /// Written partly: its creation was cut short.
    Torn,
    /// Its fields are out of range.
    Invalid,
    /// Its rule is not in the configuration any more.
    RuleGone,
    Live(Record),
}

impl<'a> Contents<'a> {
    pub(crate) fn new(bytes: &'a [u8], rules: &RuleSet) -> Contents<'a> {
        let capacity = u32_at(bytes, H_CAPACITY);
        let late_slots = u32_at(bytes, H_LATE) as usize;
        let current: HashMap<u64, RuleId> = (0..rules.rule_id_bound().min(RULE_IDS))
            .map(|id| (rule_identity(rules, id as RuleId), id as RuleId))
            .filter(|(ident, _)| *ident != 0)
            .collect();
        let remap = (0..RULE_IDS)
            .map(|id| {
                let ident = u64_at(bytes, RULES_AT + 8 * id);
                (ident != 0).then(|| current.get(&ident).copied()).flatten()
            })
            .collect();
        Contents {
            bytes,
            capacity,
            late_slots,
            remap,
        }
    }

    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }

    pub(crate) fn slot(&self, id: u32) -> Slot {
        let at = RECORDS_AT + RECORD * id as usize;
        let Some(r) = self.bytes.get(at..at + RECORD) else {
            return Slot::Invalid;
        };
        let seq = u32_at(r, R_SEQ);
        if seq == 0 {
            return Slot::Free;
        }
        if seq & 1 == 1 {
            return Slot::Torn;
        }
        let nat = match r[R_NAT] {
            0 => Nat::Dnat,
            1 => Nat::Snat,
            2 => Nat::None,
            _ => return Slot::Invalid,
        };
        let proto = r[R_PROTO];
        let mut track = [0u8; TRACK_RECORD_BYTES];
        track.copy_from_slice(&r[R_TCP..R_TCP + TRACK_RECORD_BYTES]);
        let (Some(tcp), true) = (
            TcpTrack::from_record(&track),
            proto == crate::wire::proto::TCP || proto == crate::wire::proto::UDP,
        ) else {
            return Slot::Invalid;
        };
        let Some(rule) = self.remap[usize::from(u16_at(r, R_RULE))] else {
            return Slot::RuleGone;
        };
        let hop = |dir: usize| {
            let at = R_HOPS + HOP_BYTES * dir;
            let vlan = u16_at(r, at + 2);
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&r[at + 4..at + 10]);
            (u16_at(r, at), vlan.checked_sub(1), mac)
        };
        Slot::Live(Record {
            flow: Flow {
                orig_src: Addr(u128_at(r, R_SRC)),
                orig_dst: Addr(u128_at(r, R_DST)),
                xlat: Addr(u128_at(r, R_XLAT)),
                orig_sport: u16_at(r, R_SPORT),
                orig_dport: u16_at(r, R_DPORT),
                xlat_port: u16_at(r, R_XPORT),
                proto,
                nat,
                rule,
                next_hop: [0; 2],
                tcp,
                last_seen: u64_at(r, R_LAST_SEEN),
            },
            confirmed: r[R_FLAGS] & FLAG_CONFIRMED != 0,
            hops: [hop(0), hop(1)],
            standby_seen: u64_at(r, R_STANDBY_SEEN),
        })
    }

    /// The late-packet entries in use: (slot, hash, expired at, rule as now numbered).
    pub(crate) fn late(&self) -> impl Iterator<Item = (usize, u64, Nanos, RuleId)> + '_ {
        let base = RECORDS_AT + RECORD * self.capacity as usize;
        (0..self.late_slots).filter_map(move |slot| {
            let e = self
                .bytes
                .get(base + LATE_ENTRY * slot..base + LATE_ENTRY * (slot + 1))?;
            if e[18] == 0 {
                return None;
            }
            let rule = self.remap[usize::from(u16_at(e, 16))]?;
            Some((slot, u64_at(e, 0), u64_at(e, 8), rule))
        })
    }
}
