//! The published fast table: the flows this engine lets the XDP program forward by itself.
//!
//! One shared memory (a BPF array map of 64-byte elements, mapped by the daemon) holds, for
//! every worker, a header, one open-addressing index of `u32` slots and the *lines*: one line
//! per direction of a published flow, with what XDP must match (the frame's addresses and
//! ports as on the wire), what it writes (the translation and the Ethernet addresses of the
//! egress), the port the frame must arrive on and leave by, and the three values both sides
//! advance: the direction's next sequence number, its largest window and the time of its last
//! packet. Word `i` of the memory is bytes `4i..4i+4`, native byte order.
//!
//! The engine stays the authority. It writes a line only while the line's `FAST` bit is clear
//! and sets `FAST` last (a release store); XDP reads the state word first and the rest after.
//! `next_seq`, `max_win` and `last_seen` only move forward on either side (compare-and-swap in
//! serial order), so no advance is lost whoever writes last. A pair of lines that was
//! published is reused for another flow only after a *grace*: two rounds of the daemon's grace
//! thread ([`GraceClock`]) after the pair was withdrawn, by which time no XDP invocation that
//! could still have found it in the index is running.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::fast_new::{
    NF_HEADER_ELEMENT, NF_MEMBERS, NF_RING_RECORDS, NF_RULES, NF_RULE_SLOTS, NF_TABLE_WORDS,
};
use crate::net::PortId;
use crate::tcp::seq_after;
use crate::time::Nanos;

/// Header word 0: "XLBF".
pub const FAST_MAGIC: u32 = 0x584c_4246;
/// Index slots probed at most from a key's home slot (XDP probes as many).
pub const FAST_PROBES: u32 = 16;
/// `u32` words per element of the map (64 bytes).
pub const ELEMENT_WORDS: usize = 16;
/// Index slot: free, never used.
pub const SLOT_EMPTY: u32 = 0;
/// Index slot: freed (probing goes on past it).
pub const SLOT_TOMBSTONE: u32 = u32::MAX;
/// Rule ids XDP counts per rule (`xlb_fast_cnt` has `2 × FAST_RULES` entries).
pub const FAST_RULES: u16 = 4096;

/// Header words (element 0).
pub mod header {
    pub const MAGIC: usize = 0;
    pub const ENABLED: usize = 1;
    pub const INDEX_SLOTS: usize = 2;
    pub const INDEX_BASE: usize = 3;
    pub const LINES_BASE: usize = 4;
    pub const LINES: usize = 5;
    /// How the lines are split between workers (not read by XDP: only for a taker-over).
    pub const PAIRS_PER_WORKER: usize = 6;
    pub const WORKERS: usize = 7;
    /// Hash keys k0..k3, each as its low word then its high word.
    pub const KEYS: usize = 8;
}

/// Words of a line (one direction of one flow).
pub mod line {
    /// [`STATE_FAST`](super::STATE_FAST) and friends; the window scale in bits 8..11.
    pub const STATE: usize = 0;
    pub const INGRESS_PORT: usize = 1;
    pub const TX_PORT: usize = 2;
    /// Low byte: IP protocol; bits 16..31: rule id.
    pub const PROTO_RULE: usize = 3;
    pub const MATCH_SADDR: usize = 4;
    pub const MATCH_DADDR: usize = 5;
    pub const MATCH_PORTS: usize = 6;
    pub const NEW_SADDR: usize = 7;
    pub const NEW_DADDR: usize = 8;
    pub const NEW_PORTS: usize = 9;
    /// Three words: destination MAC then source MAC, as the Ethernet header starts.
    pub const MACS: usize = 10;
    pub const NEXT_SEQ: usize = 13;
    pub const MAX_WIN: usize = 14;
    pub const LAST_SEEN: usize = 15;
}

/// State bit: XDP may forward this direction.
pub const STATE_FAST: u32 = 1;
/// State bit: a TCP flow (XDP checks the window).
pub const STATE_TCP: u32 = 2;
/// State bit: the flow was picked up mid-connection (relaxed acknowledgement check).
pub const STATE_PICKED_UP: u32 = 4;
/// Shift of the sender's window scale in the state word.
pub const STATE_WSCALE_SHIFT: u32 = 8;

/// Where everything is in the shared memory, for `workers` workers of `pairs_per_worker`
/// published flows each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastLayout {
    pub pairs_per_worker: u32,
    pub workers: u16,
    /// Index slots (a power of two, at least 16): two keys per pair at a load of at most 0.5.
    pub index_slots: u32,
    /// Element of the first index word.
    pub index_base: u32,
    /// Element of line 0.
    pub lines_base: u32,
    /// Lines in all (two per pair).
    pub lines: u32,
    /// The new-flow section (`crate::fast_new`), after the lines: element of the rule index,
    /// of rule entry 0, of member entry 0, of the Maglev table area and of ring 0.
    pub nf_rule_index_base: u32,
    pub nf_rules_base: u32,
    pub nf_members_base: u32,
    pub nf_tables_base: u32,
    pub nf_rings_base: u32,
    /// Records per ring (a power of two) and elements per ring (2 + 2 × records).
    pub nf_ring_records: u32,
    pub nf_ring_elements: u32,
}

impl FastLayout {
    pub fn new(pairs_per_worker: u32, workers: u16) -> FastLayout {
        let pairs = pairs_per_worker.saturating_mul(u32::from(workers.max(1)));
        let index_slots = pairs
            .saturating_mul(4)
            .checked_next_power_of_two()
            .unwrap_or(1 << 31)
            .max(16);
        // Element 0: the header; 1: the new-flow header; 2: the steering keys.
        let index_base = 3;
        let lines_base = index_base + index_slots / ELEMENT_WORDS as u32;
        let lines = pairs.saturating_mul(2);
        let e = ELEMENT_WORDS as u32;
        let nf_rule_index_base = lines_base.saturating_add(lines);
        let nf_rules_base = nf_rule_index_base + NF_RULE_SLOTS / e;
        let nf_members_base = nf_rules_base + NF_RULES;
        let nf_tables_base = nf_members_base + NF_MEMBERS;
        let nf_rings_base = nf_tables_base + NF_TABLE_WORDS / e;
        FastLayout {
            pairs_per_worker,
            workers: workers.max(1),
            index_slots,
            index_base,
            lines_base,
            lines,
            nf_rule_index_base,
            nf_rules_base,
            nf_members_base,
            nf_tables_base,
            nf_rings_base,
            nf_ring_records: NF_RING_RECORDS,
            nf_ring_elements: 2 + 2 * NF_RING_RECORDS,
        }
    }

    /// The same layout with rings of `records` records (a power of two, at least 2) instead
    /// of [`NF_RING_RECORDS`]: small rings for tests that wrap them around.
    pub fn with_ring_records(mut self, records: u32) -> FastLayout {
        let records = records.max(2).next_power_of_two();
        self.nf_ring_records = records;
        self.nf_ring_elements = 2 + 2 * records;
        self
    }

    /// Elements (64 bytes each) of the map: its `max_entries`.
    pub fn elements(&self) -> u32 {
        self.nf_rings_base + u32::from(self.workers) * self.nf_ring_elements
    }

    /// Word `w` of element `e`.
    pub fn element_word(&self, e: u32, w: usize) -> usize {
        e as usize * ELEMENT_WORDS + w
    }

    /// The words of the new-flow header as this layout wants them (`crate::fast_new::nf`),
    /// `NF_ENABLED` (word 0) left 0.
    pub fn nf_header(&self) -> [u32; 13] {
        [
            0,
            NF_RULE_SLOTS,
            self.nf_rule_index_base,
            self.nf_rules_base,
            NF_RULES,
            self.nf_members_base,
            NF_MEMBERS,
            self.nf_tables_base,
            NF_TABLE_WORDS,
            self.nf_rings_base,
            self.nf_ring_records,
            self.nf_ring_elements,
            u32::from(self.workers),
        ]
    }

    /// `u32` words of the memory.
    pub fn words(&self) -> usize {
        self.elements() as usize * ELEMENT_WORDS
    }

    /// Bytes of the memory.
    pub fn bytes(&self) -> usize {
        self.words() * 4
    }

    /// Word `w` of line `line`.
    pub fn line_word(&self, line: u32, w: usize) -> usize {
        (self.lines_base + line) as usize * ELEMENT_WORDS + w
    }

    /// Word of index slot `slot`.
    pub fn slot_word(&self, slot: u32) -> usize {
        self.index_base as usize * ELEMENT_WORDS + slot as usize
    }
}

/// Writes the header of a fresh memory: the layout, the hash keys, and `enabled = 0` (XDP
/// punts everything until [`set_enabled`]); the new-flow header with `NF_ENABLED = 0` (XDP
/// opens no flow until a worker wrote the section, `crate::fast_new`) and the steering keys
/// `steer` (the engine's [`crate::hashkey::HashKey::words`]: XDP picks the worker of a new
/// flow as [`crate::engine::steer`] does). Index, lines and section are expected zeroed (a
/// new map).
pub fn init_header(mem: &[AtomicU32], layout: &FastLayout, keys: [u64; 4], steer: [u64; 4]) {
    let put = |w: usize, v: u32| mem[w].store(v, Ordering::Relaxed);
    for (i, v) in layout.nf_header().into_iter().enumerate() {
        put(layout.element_word(NF_HEADER_ELEMENT, i), v);
    }
    crate::fast_new::write_steer_keys(mem, steer);
    put(header::ENABLED, 0);
    put(header::INDEX_SLOTS, layout.index_slots);
    put(header::INDEX_BASE, layout.index_base);
    put(header::LINES_BASE, layout.lines_base);
    put(header::LINES, layout.lines);
    put(header::PAIRS_PER_WORKER, layout.pairs_per_worker);
    put(header::WORKERS, u32::from(layout.workers));
    for (i, k) in keys.iter().enumerate() {
        put(header::KEYS + 2 * i, *k as u32);
        put(header::KEYS + 2 * i + 1, (*k >> 32) as u32);
    }
    mem[header::MAGIC].store(FAST_MAGIC, Ordering::Release);
}

/// The header words that say `layout` (everything [`init_header`] writes but the switch and
/// the keys), as `mem` holds them and as `layout` wants them.
fn header_words(mem: &[AtomicU32], layout: &FastLayout) -> ([u32; 19], [u32; 19]) {
    let h = |w: usize| mem[w].load(Ordering::Acquire);
    let nf = |i: usize| h(layout.element_word(NF_HEADER_ELEMENT, i));
    let nf_want = layout.nf_header();
    let found = [
        h(header::MAGIC),
        h(header::INDEX_SLOTS),
        h(header::INDEX_BASE),
        h(header::LINES_BASE),
        h(header::LINES),
        h(header::PAIRS_PER_WORKER),
        h(header::WORKERS),
        nf(1),
        nf(2),
        nf(3),
        nf(4),
        nf(5),
        nf(6),
        nf(7),
        nf(8),
        nf(9),
        nf(10),
        nf(11),
        nf(12),
    ];
    let want = [
        FAST_MAGIC,
        layout.index_slots,
        layout.index_base,
        layout.lines_base,
        layout.lines,
        layout.pairs_per_worker,
        u32::from(layout.workers),
        nf_want[1],
        nf_want[2],
        nf_want[3],
        nf_want[4],
        nf_want[5],
        nf_want[6],
        nf_want[7],
        nf_want[8],
        nf_want[9],
        nf_want[10],
        nf_want[11],
        nf_want[12],
    ];
    (found, want)
}

/// Whether `mem` holds a table of exactly `layout`: geometry (new-flow section included) and
/// split between workers.
pub fn header_matches(mem: &[AtomicU32], layout: &FastLayout) -> bool {
    mem.len() >= layout.words() && {
        let (found, want) = header_words(mem, layout);
        found == want
    }
}

/// Clears `mem` (switched off first: an XDP program still running on it punts everything
/// meanwhile) and writes a new header for `layout` with `keys`.
pub fn reset_table(mem: &[AtomicU32], layout: &FastLayout, keys: [u64; 4], steer: [u64; 4]) {
    set_enabled(mem, false);
    for w in mem.iter().skip(ELEMENT_WORDS) {
        w.store(0, Ordering::Relaxed);
    }
    init_header(mem, layout, keys, steer);
}

/// The runtime switch: XDP forwards published flows only while it is on.
pub fn set_enabled(mem: &[AtomicU32], on: bool) {
    mem[header::ENABLED].store(u32::from(on), Ordering::Release);
}

/// Whether the switch is on.
pub fn is_enabled(mem: &[AtomicU32]) -> bool {
    mem[header::ENABLED].load(Ordering::Acquire) == 1
}

/// The hash keys the header holds.
pub fn header_keys(mem: &[AtomicU32]) -> [u64; 4] {
    let mut keys = [0u64; 4];
    for (i, k) in keys.iter_mut().enumerate() {
        let lo = mem[header::KEYS + 2 * i].load(Ordering::Relaxed);
        let hi = mem[header::KEYS + 2 * i + 1].load(Ordering::Relaxed);
        *k = u64::from(lo) | (u64::from(hi) << 32);
    }
    keys
}

use crate::select::fold_mul;

/// The index hash of a frame (the XDP program computes the same): its source and destination
/// address words and its port word, each as read natively from the frame, and its protocol.
pub fn fast_hash(keys: &[u64; 4], saddr_w: u32, daddr_w: u32, ports_w: u32, proto: u8) -> u64 {
    let a = u64::from(saddr_w) | (u64::from(daddr_w) << 32);
    let b = u64::from(ports_w) | (u64::from(proto) << 32);
    let h = fold_mul(a ^ keys[0], b ^ keys[1]);
    fold_mul(h ^ keys[2], keys[3])
}

/// The four wire bytes of an IPv4 address (or of a source then destination port) as the
/// native word XDP reads.
pub fn wire_word(bytes: [u8; 4]) -> u32 {
    u32::from_ne_bytes(bytes)
}

/// The port word of a frame from `sport` to `dport`.
pub fn ports_word(sport: u16, dport: u16) -> u32 {
    let (s, d) = (sport.to_be_bytes(), dport.to_be_bytes());
    wire_word([s[0], s[1], d[0], d[1]])
}

/// A time as a line's `last_seen`: units of 2^16 ns, rounded up (never earlier than `t`).
pub fn to_stamp(t: Nanos) -> u32 {
    ((t >> 16) + 1) as u32
}

/// The time a `last_seen` stamp stands for (the end of its 65 µs unit: never earlier than the
/// packet), read in serial order around `near` (any time within 2^31 units, 39 hours, of it).
pub fn from_stamp(stamp: u32, near: Nanos) -> Nanos {
    let here = to_stamp(near);
    let delta = i64::from(stamp.wrapping_sub(here) as i32);
    let units = ((near >> 16) + 1) as i64 + delta;
    (units.max(0) as u64) << 16
}

/// Advances `cell` to `v` if `v` is later in serial order (what both sides do to `next_seq` and
/// `last_seen`). Returns the value it holds afterwards.
pub fn advance_serial(cell: &AtomicU32, v: u32) -> u32 {
    let mut cur = cell.load(Ordering::Relaxed);
    while seq_after(v, cur) {
        match cell.compare_exchange_weak(cur, v, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return v,
            Err(now) => cur = now,
        }
    }
    cur
}

/// Grows `cell` to `v` if larger (what both sides do to `max_win`).
pub fn grow(cell: &AtomicU32, v: u32) -> u32 {
    // Read first: the window rarely grows, and a locked read-modify-write would take the line
    // from the CPU where XDP updates it on every segment.
    let cur = cell.load(Ordering::Acquire);
    if v <= cur {
        return cur;
    }
    cell.fetch_max(v, Ordering::AcqRel).max(v)
}

/// The line index slot of a key probes to: what XDP does. `Some(line)` for the first line in
/// the probe sequence that holds this key (protocol and match words), whatever its state.
pub fn lookup(
    mem: &[AtomicU32],
    layout: &FastLayout,
    saddr_w: u32,
    daddr_w: u32,
    ports_w: u32,
    proto: u8,
) -> Option<u32> {
    let keys = header_keys(mem);
    let h = fast_hash(&keys, saddr_w, daddr_w, ports_w, proto);
    for word in probe_words(layout, h) {
        match mem[word].load(Ordering::Acquire) {
            SLOT_EMPTY => return None,
            SLOT_TOMBSTONE => {}
            v => {
                let line = v - 1;
                if line >= layout.lines {
                    continue;
                }
                let w = |i: usize| mem[layout.line_word(line, i)].load(Ordering::Relaxed);
                if w(line::PROTO_RULE) & 0xff == u32::from(proto)
                    && w(line::MATCH_SADDR) == saddr_w
                    && w(line::MATCH_DADDR) == daddr_w
                    && w(line::MATCH_PORTS) == ports_w
                {
                    return Some(line);
                }
            }
        }
    }
    None
}

/// The words of the index slots a key hashed as `h` probes, in order: [`FAST_PROBES`] slots
/// from its home slot on, wrapping at the end of the index (as XDP probes them).
fn probe_words(layout: &FastLayout, h: u64) -> impl Iterator<Item = usize> + '_ {
    let mask = layout.index_slots - 1;
    (0..FAST_PROBES).map(move |i| layout.slot_word((h as u32).wrapping_add(i) & mask))
}

/// The 16 words of line `line`, state first.
pub fn line_words(mem: &[AtomicU32], layout: &FastLayout, line: u32) -> [u32; 16] {
    let mut out = [0u32; 16];
    out[0] = mem[layout.line_word(line, 0)].load(Ordering::Acquire);
    for (i, w) in out.iter_mut().enumerate().skip(1) {
        *w = mem[layout.line_word(line, i)].load(Ordering::Relaxed);
    }
    out
}

/// The epoch of the daemon's grace thread, shared by every worker (and the thread). While
/// `wanted` is set, the thread runs rounds of "wait until every CPU has left whatever it was
/// running (`membarrier`), then `epoch += 1`". An event (a line cleared, an index key
/// removed) that happened before the engine read `epoch == e` is behind every XDP invocation
/// once `epoch >= e + 2`: a whole round started after it and finished.
///
/// The engine only ever sets `wanted` (each time it starts waiting for a grace, and again
/// each time it checks and still waits); the grace thread serves a request with two rounds
/// ([`GraceClock::serve`]), enough for whatever asked just before, and then sleeps until
/// someone asks again.
/// The most a slow grace moves a published flow's expiry ahead of its deadline: during the
/// lead the flow's packets go through its worker (one packet brings it back to XDP), so a
/// long lead costs little, but it should stay well inside the shortest idle timeouts.
pub const MAX_EXPIRY_LEAD: u64 = 2_000_000_000;

#[derive(Debug, Default)]
pub struct GraceClock {
    pub epoch: AtomicU64,
    pub wanted: AtomicBool,
    /// How long the slowest recent grace took (ns), decaying by an eighth at each later one:
    /// the engines start a published flow's expiry that much earlier, so that its grace has
    /// passed by its deadline ([`GraceClock::expiry_lead`]).
    pub slowest_ns: AtomicU64,
}

impl GraceClock {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Asks the grace thread for rounds.
    pub fn want(&self) {
        self.wanted.store(true, Ordering::Release);
    }

    /// Whether a grace has passed since `epoch` was read.
    pub fn passed(&self, since: u64) -> bool {
        self.epoch() >= since.saturating_add(2)
    }

    /// For the grace thread: takes the request, true when a round is wanted.
    pub fn take_wanted(&self) -> bool {
        self.wanted.swap(false, Ordering::AcqRel)
    }

    /// For the grace thread: a round has finished.
    pub fn advance(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// For the grace thread: a served request took `took_ns` (both rounds). Keeps the slowest,
    /// forgetting an eighth of it at each grace after: one stall (RCU grace periods stretched
    /// by a starved CPU) widens the lead at once, and many quick graces narrow it again.
    pub fn note_served(&self, took_ns: u64) {
        let old = self.slowest_ns.load(Ordering::Relaxed);
        let decayed = old - old / 8;
        self.slowest_ns
            .store(took_ns.max(decayed), Ordering::Relaxed);
    }

    /// How long before a published flow's idle deadline its expiry starts (`FAST` cleared,
    /// a grace asked for): `floor`, or twice the slowest recent grace when that is longer,
    /// at most [`MAX_EXPIRY_LEAD`]. A grace slower than the lead makes the flow's reset late
    /// by the difference (the flow waits a tick at a time, `fast.grace_waits`).
    pub fn expiry_lead(&self, floor: u64) -> u64 {
        let slowest = self.slowest_ns.load(Ordering::Relaxed);
        floor.max(slowest.saturating_mul(2).min(MAX_EXPIRY_LEAD))
    }

    /// For the grace thread: when a grace was asked for, runs two rounds of `barrier` (which
    /// returns once every CPU has left what it was running: `membarrier(GLOBAL)`), advancing
    /// the epoch after each. Returns whether it served a request. A failed barrier leaves the
    /// epoch where it is (a missed grace must never look passed), puts the request back and
    /// returns the error: the caller retries later.
    pub fn serve<E>(&self, mut barrier: impl FnMut() -> Result<(), E>) -> Result<bool, E> {
        if !self.take_wanted() {
            return Ok(false);
        }
        for _ in 0..2 {
            if let Err(e) = barrier() {
                self.want();
                return Err(e);
            }
            self.advance();
        }
        Ok(true)
    }
}

/// One worker's part of the published table: its pairs, their reuse, and which ports may
/// carry fast frames.
#[derive(Clone)]
pub struct FastTable {
    mem: &'static [AtomicU32],
    layout: FastLayout,
    keys: [u64; 4],
    grace: Arc<GraceClock>,
    /// Global number of this worker's first pair.
    first_pair: u32,
    /// Pairs (this worker's numbering) never handed out yet: `next_fresh..pairs_per_worker`.
    next_fresh: u32,
    /// Withdrawn pairs with the epoch they were withdrawn at, oldest first.
    freed: VecDeque<(u32, u64)>,
    port_ok: Vec<bool>,
    /// Pairs a previous process left published ([`FastTable::resume`]): `FAST` cleared at
    /// `epoch`, still indexed until the engine has read them back.
    left: Vec<u32>,
    left_at: u64,
    /// Made by [`FastTable::resume`].
    resumed: bool,
}

impl fmt::Debug for FastTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FastTable")
            .field("layout", &self.layout)
            .field("first_pair", &self.first_pair)
            .field("next_fresh", &self.next_fresh)
            .field("freed", &self.freed.len())
            .field("port_ok", &self.port_ok)
            .finish()
    }
}

/// Why a flow could not be published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishError {
    /// Every pair of this worker is in use or waiting for a grace.
    NoPair,
    /// No free index slot within [`FAST_PROBES`] of a key's home.
    NoSlot,
}

impl FastTable {
    /// Worker `worker`'s part of `mem`, which holds `layout` and whose header was written
    /// ([`init_header`]; the hash keys are read from it). Panics if `mem` is smaller than the
    /// layout or the worker is not in it: a start-up mistake, not a run-time condition.
    pub fn new(
        mem: &'static [AtomicU32],
        layout: FastLayout,
        worker: u16,
        grace: Arc<GraceClock>,
    ) -> FastTable {
        assert!(mem.len() >= layout.words(), "fast table memory too small");
        assert!(worker < layout.workers, "worker outside the fast table");
        let pairs = layout.pairs_per_worker as usize;
        FastTable {
            mem,
            keys: header_keys(mem),
            layout,
            grace,
            first_pair: u32::from(worker) * layout.pairs_per_worker,
            next_fresh: 0,
            freed: VecDeque::with_capacity(pairs),
            port_ok: Vec::new(),
            left: Vec::new(),
            left_at: 0,
            resumed: false,
        }
    }

    /// Worker `worker`'s part of a memory a previous process of the same layout used (the
    /// map outlived it): the flows it left published are withdrawn from XDP at once (`FAST`
    /// cleared; XDP punts them to the worker from now on) and stay readable, so that the
    /// engine takes what XDP recorded for them into the flows it restores
    /// ([`crate::Engine::attach_store`], exact once a grace has passed); then their pairs are
    /// freed. `Err` when the header is not one of this layout (use [`init_header`] and
    /// [`FastTable::new`] on a cleared memory then).
    pub fn resume(
        mem: &'static [AtomicU32],
        layout: FastLayout,
        worker: u16,
        grace: Arc<GraceClock>,
    ) -> Result<FastTable, String> {
        if mem.len() < layout.words() {
            return Err("fast table memory too small".into());
        }
        let (found, want) = header_words(mem, &layout);
        if found != want {
            return Err(format!(
                "fast table header {found:x?} is not this layout's {want:x?}"
            ));
        }
        let mut t = FastTable::new(mem, layout, worker, grace);
        t.next_fresh = layout.pairs_per_worker;
        let mut unused = Vec::with_capacity(layout.pairs_per_worker as usize);
        for pair in t.first_pair..t.first_pair + layout.pairs_per_worker {
            if t.state(2 * pair) != 0 || t.state(2 * pair + 1) != 0 {
                t.set_state(2 * pair, 0);
                t.set_state(2 * pair + 1, 0);
                t.left.push(pair);
            } else {
                // Never used, or withdrawn by the previous process maybe just before it went.
                unused.push(pair - t.first_pair);
            }
        }
        // Read after every line was cleared: a grace from here covers them all.
        t.left_at = t.grace.epoch();
        let at = t.left_at;
        t.freed.extend(unused.into_iter().map(|pair| (pair, at)));
        t.resumed = true;
        t.grace.want();
        Ok(t)
    }

    /// The pair a previous process left for the flow whose original direction arrives as
    /// (`saddr_w`, `daddr_w`, `ports_w`, `proto`) and whose reply arrives as `reply`.
    pub fn left_pair(&self, orig: [u32; 3], reply: [u32; 3], proto: u8) -> Option<u32> {
        if self.left.is_empty() {
            return None;
        }
        let line = lookup(self.mem, &self.layout, orig[0], orig[1], orig[2], proto)?;
        let pair = line / 2;
        let mine = self.first_pair..self.first_pair + self.layout.pairs_per_worker;
        let w = |l: u32, i: usize| self.word(l, i).load(Ordering::Relaxed);
        let reply_ok = [line::MATCH_SADDR, line::MATCH_DADDR, line::MATCH_PORTS]
            .iter()
            .zip(reply)
            .all(|(&i, v)| w(line + 1, i) == v);
        (line % 2 == 0
            && mine.contains(&pair)
            && reply_ok
            && self.left.binary_search(&pair).is_ok())
        .then_some(pair)
    }

    /// Whether `pair` is one a previous process left, not freed yet.
    pub fn is_left(&self, pair: u32) -> bool {
        self.left.binary_search(&pair).is_ok()
    }

    /// Whether this table took over a previous process's memory ([`FastTable::resume`]).
    pub fn is_resumed(&self) -> bool {
        self.resumed
    }

    /// Whether pairs a previous process left wait to be read back and freed.
    pub fn has_left(&self) -> bool {
        !self.left.is_empty()
    }

    /// Once a grace has passed since the pairs left by a previous process were withdrawn
    /// from XDP: calls `read` (the engine's last read-back of them, [`FastTable::is_left`]
    /// still true), then removes their keys and frees them. False while the grace has not
    /// passed (a grace is asked for).
    pub fn retire_left(&mut self, read: impl FnOnce(&FastTable)) -> bool {
        if self.left.is_empty() {
            return true;
        }
        if !self.grace.passed(self.left_at) {
            self.grace.want();
            return false;
        }
        read(self);
        let left = std::mem::take(&mut self.left);
        let epoch = self.grace.epoch();
        for pair in left {
            self.index_remove(2 * pair);
            self.index_remove(2 * pair + 1);
            self.freed.push_back((pair - self.first_pair, epoch));
        }
        true
    }

    pub fn layout(&self) -> &FastLayout {
        &self.layout
    }

    pub fn memory(&self) -> &'static [AtomicU32] {
        self.mem
    }

    pub fn grace(&self) -> &Arc<GraceClock> {
        &self.grace
    }

    /// Whether frames may arrive and leave on `port` through XDP (the interface is attached
    /// natively and its egress is in the devmap). Ports not told are not.
    pub fn set_port_ok(&mut self, port: PortId, ok: bool) {
        let i = usize::from(port);
        if self.port_ok.len() <= i {
            self.port_ok.resize(i + 1, false);
        }
        self.port_ok[i] = ok;
    }

    pub fn port_ok(&self, port: PortId) -> bool {
        self.port_ok
            .get(usize::from(port))
            .copied()
            .unwrap_or(false)
    }

    /// The hash of a key with the table's keys.
    pub fn hash(&self, saddr_w: u32, daddr_w: u32, ports_w: u32, proto: u8) -> u64 {
        fast_hash(&self.keys, saddr_w, daddr_w, ports_w, proto)
    }

    fn word(&self, line: u32, w: usize) -> &AtomicU32 {
        &self.mem[self.layout.line_word(line, w)]
    }

    /// Hands out a pair (global number): a never-used one first, else the oldest withdrawn
    /// one whose grace has passed. `None` asks the grace thread for rounds when a pair waits.
    pub fn alloc(&mut self) -> Option<u32> {
        if self.next_fresh < self.layout.pairs_per_worker {
            self.next_fresh += 1;
            return Some(self.first_pair + self.next_fresh - 1);
        }
        match self.freed.front() {
            Some(&(pair, at)) if self.grace.passed(at) => {
                self.freed.pop_front();
                Some(self.first_pair + pair)
            }
            Some(_) => {
                self.grace.want();
                None
            }
            None => None,
        }
    }

    /// Puts `pair` (withdrawn: out of the index, lines cleared) on the deferred list.
    fn defer(&mut self, pair: u32) {
        let epoch = self.grace.epoch();
        self.freed.push_back((pair - self.first_pair, epoch));
        self.grace.want();
    }

    /// Pairs withdrawn and not yet reusable or reused.
    pub fn deferred(&self) -> usize {
        self.freed.len()
    }

    /// Writes the 15 words after the state (the state word is left as it is: clear).
    pub fn write_line(&self, line: u32, words: &[u32; 16]) {
        for (i, w) in words.iter().enumerate().skip(1) {
            self.word(line, i).store(*w, Ordering::Relaxed);
        }
    }

    /// Stores the state word of `line` (release: after the line's other words).
    pub fn set_state(&self, line: u32, state: u32) {
        self.word(line, line::STATE).store(state, Ordering::Release);
    }

    pub fn state(&self, line: u32) -> u32 {
        self.word(line, line::STATE).load(Ordering::Acquire)
    }

    /// `next_seq`, `max_win` and `last_seen` of `line`.
    pub fn counters_of(&self, line: u32) -> (u32, u32, u32) {
        (
            self.word(line, line::NEXT_SEQ).load(Ordering::Acquire),
            self.word(line, line::MAX_WIN).load(Ordering::Acquire),
            self.word(line, line::LAST_SEEN).load(Ordering::Acquire),
        )
    }

    /// Advances `line`'s `next_seq` and `last_seen`, grows its `max_win` (each only forward).
    pub fn push(&self, line: u32, next_seq: Option<u32>, max_win: Option<u32>, stamp: u32) {
        if let Some(s) = next_seq {
            advance_serial(self.word(line, line::NEXT_SEQ), s);
        }
        if let Some(w) = max_win {
            grow(self.word(line, line::MAX_WIN), w);
        }
        advance_serial(self.word(line, line::LAST_SEEN), stamp);
    }

    /// The hash of the key `line` matches (from its own words).
    fn line_hash(&self, line: u32) -> u64 {
        let w = |i: usize| self.word(line, i).load(Ordering::Relaxed);
        self.hash(
            w(line::MATCH_SADDR),
            w(line::MATCH_DADDR),
            w(line::MATCH_PORTS),
            (w(line::PROTO_RULE) & 0xff) as u8,
        )
    }

    /// Inserts the key of `line` (its words written) into the index.
    pub fn index_insert(&self, line: u32) -> Result<(), PublishError> {
        let h = self.line_hash(line);
        for word in probe_words(&self.layout, h) {
            let slot = &self.mem[word];
            let mut cur = slot.load(Ordering::Relaxed);
            while cur == SLOT_EMPTY || cur == SLOT_TOMBSTONE {
                match slot.compare_exchange(cur, line + 1, Ordering::AcqRel, Ordering::Relaxed) {
                    Ok(_) => return Ok(()),
                    Err(v) => cur = v,
                }
            }
        }
        Err(PublishError::NoSlot)
    }

    /// Removes the key of `line` from the index (a tombstone); false when it was not there.
    pub fn index_remove(&self, line: u32) -> bool {
        let h = self.line_hash(line);
        for word in probe_words(&self.layout, h) {
            let slot = &self.mem[word];
            match slot.load(Ordering::Relaxed) {
                SLOT_EMPTY => return false,
                v if v == line + 1 => {
                    slot.store(SLOT_TOMBSTONE, Ordering::Release);
                    return true;
                }
                _ => {}
            }
        }
        false
    }

    /// Publishes a pair: writes both lines (`lines[0]` ORIG, `lines[1]` REPLY, state words
    /// included but without `FAST`), inserts both keys, then sets `FAST` on both. On failure
    /// nothing stays published (a pair taken is deferred as any withdrawn pair).
    pub fn publish(&mut self, lines: &[[u32; 16]; 2]) -> Result<u32, PublishError> {
        let pair = self.alloc().ok_or(PublishError::NoPair)?;
        for (d, words) in lines.iter().enumerate() {
            let line = 2 * pair + d as u32;
            self.set_state(line, 0);
            self.write_line(line, words);
            self.set_state(line, words[line::STATE] & !STATE_FAST);
        }
        if let Err(e) = self.index_insert(2 * pair) {
            self.withdraw(pair, false);
            return Err(e);
        }
        if let Err(e) = self.index_insert(2 * pair + 1) {
            self.index_remove(2 * pair);
            self.withdraw(pair, false);
            return Err(e);
        }
        self.set_fast(pair, true);
        Ok(pair)
    }

    /// Sets or clears `FAST` on both lines of `pair`.
    pub fn set_fast(&self, pair: u32, on: bool) {
        for line in [2 * pair, 2 * pair + 1] {
            let s = self.state(line);
            self.set_state(line, if on { s | STATE_FAST } else { s & !STATE_FAST });
        }
    }

    /// Whether `pair` has `FAST` set (on its ORIG line).
    pub fn is_fast(&self, pair: u32) -> bool {
        self.state(2 * pair) & STATE_FAST != 0
    }

    /// Withdraws `pair`: clears both lines' state, removes both keys from the index (when
    /// `indexed`) and defers the pair's reuse to after a grace.
    pub fn withdraw(&mut self, pair: u32, indexed: bool) {
        for line in [2 * pair, 2 * pair + 1] {
            self.set_state(line, 0);
            if indexed {
                self.index_remove(line);
            }
        }
        self.defer(pair);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(layout: &FastLayout) -> &'static [AtomicU32] {
        let v: Vec<AtomicU32> = (0..layout.words()).map(|_| AtomicU32::new(0)).collect();
        Box::leak(v.into_boxed_slice())
    }

    #[test]
    fn layout_sizes() {
        let l = FastLayout::new(1000, 3);
        assert_eq!(l.index_slots, 16384);
        assert_eq!(l.index_base, 3);
        assert_eq!(l.lines_base, 3 + 1024);
        assert_eq!(l.lines, 6000);
        let nf = 1027 + 6000;
        assert_eq!(l.nf_rule_index_base, nf);
        assert_eq!(l.nf_rules_base, nf + 64);
        assert_eq!(l.nf_members_base, nf + 64 + 256);
        assert_eq!(l.nf_tables_base, nf + 64 + 256 + 4096);
        assert_eq!(l.nf_rings_base, nf + 64 + 256 + 4096 + 16384);
        assert_eq!(l.nf_ring_elements, 2 + 2 * 32768);
        assert_eq!(l.elements(), l.nf_rings_base + 3 * (2 + 2 * 32768));
        let small = FastLayout::new(1, 1);
        assert_eq!(small.index_slots, 16);
        assert_eq!(small.lines_base, 4);
        let tiny_rings = small.with_ring_records(5);
        assert_eq!(tiny_rings.nf_ring_records, 8);
        assert_eq!(tiny_rings.elements(), small.nf_rings_base + 18);
    }

    #[test]
    fn hash_is_the_documented_fold() {
        // Independent evaluation of the formula with small numbers.
        let keys = [1u64, 3, 0, 1];
        // a = 2 | 0 << 32 = 2; b = 5 | 6 << 32
        let a = 2u64 ^ 1;
        let b = (5u64 | (6 << 32)) ^ 3;
        let p = u128::from(a) * u128::from(b);
        let h = (p as u64) ^ ((p >> 64) as u64);
        assert_eq!(fast_hash(&keys, 2, 0, 5, 6), h);
        // With keys that make the product overflow 64 bits, the high half is folded in.
        let keys = [u64::MAX, 1, 0x1234_5678_9abc_def1, 0xfedc_ba98_7654_3211];
        let a = (7u64 | (9 << 32)) ^ keys[0];
        let b = (11u64 | (17 << 32)) ^ keys[1];
        let p = u128::from(a) * u128::from(b);
        let h = (p as u64) ^ ((p >> 64) as u64);
        let p = u128::from(h ^ keys[2]) * u128::from(keys[3]);
        assert_eq!(
            fast_hash(&keys, 7, 9, 11, 17),
            (p as u64) ^ ((p >> 64) as u64)
        );
    }

    #[test]
    fn header_round_trip() {
        let l = FastLayout::new(8, 2);
        let m = mem(&l);
        let keys = [1, 2 | (5 << 32), 3, 4];
        init_header(m, &l, keys, [9, 8, 7, 6]);
        assert_eq!(m[0].load(Ordering::Relaxed), FAST_MAGIC);
        assert_eq!(header_keys(m), keys);
        assert_eq!(m[header::KEYS + 2].load(Ordering::Relaxed), 2);
        assert_eq!(m[header::KEYS + 3].load(Ordering::Relaxed), 5);
        assert!(!is_enabled(m));
        set_enabled(m, true);
        assert!(is_enabled(m));
        assert_eq!(
            m[header::INDEX_SLOTS].load(Ordering::Relaxed),
            l.index_slots
        );
        assert_eq!(m[header::LINES_BASE].load(Ordering::Relaxed), l.lines_base);
    }

    #[test]
    fn stamps_are_never_early_and_read_back_in_serial_order() {
        let now: Nanos = 5_000_000_000_000;
        let s = to_stamp(now - 1_000_000);
        let t = from_stamp(s, now);
        assert!(t >= now - 1_000_000 && t < now - 1_000_000 + (1 << 16));
        // Around the wrap of the u32.
        let now = (u64::from(u32::MAX) << 16) + 12_345;
        let before = now - 3_000_000;
        assert_eq!(from_stamp(to_stamp(before), now) >> 16, (before >> 16) + 1);
    }

    #[test]
    fn advance_only() {
        let c = AtomicU32::new(10);
        assert_eq!(advance_serial(&c, 5), 10);
        assert_eq!(advance_serial(&c, 20), 20);
        let c = AtomicU32::new(u32::MAX - 1);
        assert_eq!(advance_serial(&c, 3), 3, "serial order across the wrap");
        let w = AtomicU32::new(100);
        assert_eq!(grow(&w, 50), 100);
        assert_eq!(grow(&w, 150), 150);
    }

    #[test]
    fn pairs_are_reused_only_after_a_grace_never_used_first() {
        let l = FastLayout::new(2, 2);
        let m = mem(&l);
        init_header(m, &l, [1, 1, 1, 1], [1, 1, 1, 1]);
        let grace = Arc::new(GraceClock::default());
        let mut t = FastTable::new(m, l, 1, Arc::clone(&grace));
        assert_eq!(t.alloc(), Some(2));
        assert_eq!(t.alloc(), Some(3));
        t.withdraw(2, false);
        assert!(grace.take_wanted());
        assert_eq!(t.alloc(), None);
        grace.advance();
        assert_eq!(t.alloc(), None);
        grace.advance();
        assert_eq!(t.alloc(), Some(2));
        assert_eq!(t.alloc(), None);
    }

    #[test]
    fn index_insert_lookup_remove() {
        let l = FastLayout::new(4, 1);
        let m = mem(&l);
        init_header(m, &l, [7, 9, 11, 13], [1, 1, 1, 1]);
        let mut t = FastTable::new(m, l, 0, Arc::new(GraceClock::default()));
        let mut a = [0u32; 16];
        a[line::PROTO_RULE] = 6 | (3 << 16);
        a[line::MATCH_SADDR] = 0x0a00_0001;
        a[line::MATCH_DADDR] = 0x0a00_0002;
        a[line::MATCH_PORTS] = ports_word(1000, 80);
        let mut b = a;
        b[line::MATCH_SADDR] = 0x0a00_0002;
        b[line::MATCH_DADDR] = 0x0a00_0001;
        b[line::MATCH_PORTS] = ports_word(80, 1000);
        let pair = t.publish(&[a, b]).unwrap();
        assert_eq!(
            lookup(m, &l, 0x0a00_0001, 0x0a00_0002, ports_word(1000, 80), 6),
            Some(2 * pair)
        );
        assert_eq!(
            lookup(m, &l, 0x0a00_0002, 0x0a00_0001, ports_word(80, 1000), 6),
            Some(2 * pair + 1)
        );
        assert_eq!(
            lookup(m, &l, 0x0a00_0002, 0x0a00_0001, ports_word(80, 1000), 17),
            None
        );
        assert!(t.is_fast(pair));
        t.withdraw(pair, true);
        assert!(!t.is_fast(pair));
        assert_eq!(
            lookup(m, &l, 0x0a00_0001, 0x0a00_0002, ports_word(1000, 80), 6),
            None
        );
    }
}
