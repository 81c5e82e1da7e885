//! The per-worker flow table: a fixed pool of flows addressed by `u32`, and one open-addressing
//! index holding two keys per flow (one per direction), so a packet finds its flow in one
//! lookup from either side.
//!
//! Memory is fixed at start: `capacity` flow records (64 bytes each, one cache line: the two
//! addresses that come from the configuration are named by 16-bit ids, see
//! [`crate::addr_ids`]) plus an index of
//! `INDEX_SLOTS_PER_FLOW × capacity` 4-byte slots (two keys per flow, load ≤ 2/3 when the table
//! is full: 12 bytes per flow), plus 6 bytes of timer links kept by the timer wheel and 12
//! bytes of admission links (`crate::admission`): about 94 bytes per flow for both
//! directions ([`crate::Engine::table_bytes`] counts them). Free flow slots cost nothing: they
//! are chained through the free records themselves.
//!
//! Index slots pack `tag << 24 | ref` in a `u32`, where `ref = flow << 1 | dir` (so flow ids
//! fit in 23 bits: [`MAX_CAPACITY`]) and `tag` is the low byte of the key's hash. The home
//! slot is `(h × slots) >> 32` with `h` the hash's high half (a multiply, not a mask: the index
//! has exactly the slots it needs instead of the next power of two, which would double it for
//! a capacity just above one). The tag comes from other bits than the home so that the
//! entries of one cluster, whose homes are neighbours, do not share it: a foreign entry
//! matches a key's tag once in 256, and only then is its record read and compared. Linear
//! probing; deletion shifts later entries back (no tombstones, so probe lengths never
//! degrade), recomputing a shifted entry's home from its record's key, as the slot no longer
//! holds enough of the hash.

use crate::addr::Addr;
use crate::addr_ids::{AddrId, AddrIds};
use crate::hashkey::HashKey;
use crate::net::NextHopId;
use crate::ruleset::{FlowTuple, RuleId};
use crate::tcp::{Dir, TcpTrack, ORIG, REPLY};
use crate::time::Nanos;

pub type FlowId = u32;

/// What the flow's translation rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Nat {
    /// Load balancing / inbound NAT: the original destination becomes the backend.
    Dnat,
    /// Outbound: the original source (a member) becomes a frontend address and port.
    Snat,
    /// Floating IP: the backend receives the frontend address unchanged.
    None,
}

/// The rewrite a flow applies to a packet of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// The source address and port become these.
    Src(Addr, u16),
    /// The destination address and port become these.
    Dst(Addr, u16),
    /// Nothing is rewritten (floating IP).
    None,
}

/// One connection, both directions.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    /// The original direction as the creating packet arrived.
    pub orig_src: Addr,
    pub orig_dst: Addr,
    /// The replacement of `orig_dst` (DNAT) or `orig_src` (SNAT).
    pub xlat: Addr,
    pub orig_sport: u16,
    pub orig_dport: u16,
    pub xlat_port: u16,
    pub proto: u8,
    pub nat: Nat,
    pub rule: RuleId,
    /// Egress per direction.
    pub next_hop: [NextHopId; 2],
    pub tcp: TcpTrack,
    pub last_seen: Nanos,
}

impl Flow {
    /// The key under which a packet of direction `dir` arrives.
    pub fn key(&self, dir: Dir) -> FlowTuple {
        if dir == ORIG {
            return FlowTuple {
                proto: self.proto,
                src: self.orig_src,
                src_port: self.orig_sport,
                dst: self.orig_dst,
                dst_port: self.orig_dport,
            };
        }
        let (src, src_port, dst, dst_port) = match self.nat {
            Nat::Dnat => (self.xlat, self.xlat_port, self.orig_src, self.orig_sport),
            Nat::Snat => (self.orig_dst, self.orig_dport, self.xlat, self.xlat_port),
            Nat::None => (
                self.orig_dst,
                self.orig_dport,
                self.orig_src,
                self.orig_sport,
            ),
        };
        FlowTuple {
            proto: self.proto,
            src,
            src_port,
            dst,
            dst_port,
        }
    }

    /// The fields that change while the flow lives.
    pub fn track(&self) -> FlowTrack {
        FlowTrack {
            last_seen: self.last_seen,
            tcp: self.tcp,
            next_hop: self.next_hop,
        }
    }

    /// Puts `t`'s fields into the flow.
    pub fn set_track(&mut self, t: FlowTrack) {
        (self.last_seen, self.tcp, self.next_hop) = (t.last_seen, t.tcp, t.next_hop);
    }

    /// The addresses and ports a packet of direction `dir` leaves with.
    pub fn translated(&self, dir: Dir) -> FlowTuple {
        // A packet leaving in one direction looks like the reverse of a packet arriving in the
        // other.
        let k = self.key(1 - dir);
        FlowTuple {
            proto: k.proto,
            src: k.dst,
            src_port: k.dst_port,
            dst: k.src,
            dst_port: k.src_port,
        }
    }
}

/// The fields of a flow that change while it lives: what a packet, a timer or a route change
/// writes ([`FlowTable::get_mut`]). A flow's addresses, ports, rule and NAT kind never change.
#[derive(Clone, Copy, Debug)]
pub struct FlowTrack {
    pub last_seen: Nanos,
    pub tcp: TcpTrack,
    /// Egress per direction.
    pub next_hop: [NextHopId; 2],
}

/// A flow as the table stores it: one cache line. `peer` is the one address that does not come
/// from the configuration (the original source of an inbound flow, the original destination
/// of an outbound one); the other two are ids in the table's [`AddrIds`].
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Record {
    track: FlowTrack,
    peer: Addr,
    /// Inbound: `[orig_dst, xlat]`; outbound (SNAT): `[orig_src, xlat]`.
    local: [AddrId; 2],
    /// `orig_sport`, `orig_dport`, `xlat_port`.
    ports: [u16; 3],
    rule: RuleId,
    proto: u8,
    nat: Nat,
}

impl Record {
    /// The flow's original source and destination.
    #[inline]
    fn orig(&self, ids: &AddrIds) -> (Addr, Addr) {
        match self.nat {
            Nat::Snat => (ids.addr(self.local[0]), self.peer),
            Nat::Dnat | Nat::None => (self.peer, ids.addr(self.local[0])),
        }
    }

    #[inline]
    fn flow(&self, ids: &AddrIds) -> Flow {
        let (orig_src, orig_dst) = self.orig(ids);
        Flow {
            orig_src,
            orig_dst,
            xlat: ids.addr(self.local[1]),
            orig_sport: self.ports[0],
            orig_dport: self.ports[1],
            xlat_port: self.ports[2],
            proto: self.proto,
            nat: self.nat,
            rule: self.rule,
            next_hop: self.track.next_hop,
            tcp: self.track.tcp,
            last_seen: self.track.last_seen,
        }
    }

    /// Whether a packet of direction `dir` with tuple `t` belongs to this flow: the tuple
    /// compared field by field, the peer's address first (the one that varies most).
    #[inline]
    fn matches(&self, ids: &AddrIds, dir: Dir, t: &FlowTuple) -> bool {
        if t.proto != self.proto {
            return false;
        }
        let [sport, dport, xport] = self.ports;
        // (peer's port, local address id, local port) of the key, and whether the peer is
        // the key's source.
        let (peer_is_src, peer_port, local, local_port) = match (dir, self.nat) {
            (ORIG, Nat::Snat) => (false, dport, self.local[0], sport),
            (ORIG, _) => (true, sport, self.local[0], dport),
            (_, Nat::Snat) => (true, dport, self.local[1], xport),
            (_, Nat::Dnat) => (false, sport, self.local[1], xport),
            // Floating IP: the member answers from the frontend address and port.
            (_, Nat::None) => (false, sport, self.local[0], dport),
        };
        let (peer, peer_p, here, here_p) = if peer_is_src {
            (t.src, t.src_port, t.dst, t.dst_port)
        } else {
            (t.dst, t.dst_port, t.src, t.src_port)
        };
        peer == self.peer && peer_p == peer_port && here_p == local_port && ids.addr(local) == here
    }
}

/// An unused index slot. It reads as tag `0xff` with ref `0xff_ffff` (flow `2^23 - 1`,
/// reply): no entry, because flow ids stay below [`MAX_CAPACITY`].
const EMPTY: u32 = u32::MAX;
/// Bits of an index entry that hold its ref (`flow << 1 | dir`); the 8 above hold its tag.
const REF_BITS: u32 = 24;
const REF_MASK: u32 = (1 << REF_BITS) - 1;
/// End of the free-slot chain.
const NIL: FlowId = FlowId::MAX;

/// Index slots per flow: 3 for the flow's two keys is a load of 2/3 with every flow slot in
/// use (measured by `probe_lengths_at_full_load`: about 2 slots read per hit and 5 per miss,
/// most of them in the cache line of the first).
pub const INDEX_SLOTS_PER_FLOW: usize = 3;

/// The most flows a table holds: an index entry has 24 bits for `flow << 1 | dir`, and the
/// highest of those refs (flow `2^23 - 1`, reply) is part of the `EMPTY` pattern, so flow
/// ids stay below `2^23 - 1`. (The timer and admission links pack flow ids in 24 bits too.)
pub const MAX_CAPACITY: u32 = (1 << 23) - 1;

/// Slots the look-ahead reads from a key's home (a cache line's worth of 4-byte slots): at
/// the index's load nearly every key is found within them (`probe_lengths_at_full_load`).
const LOOKAHEAD_SLOTS: usize = 16;

/// Why a flow could not be inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// Every flow slot is in use.
    Full,
    /// Another flow already owns one of the two keys.
    Conflict,
}

/// Fixed-capacity flow table.
#[derive(Debug, Clone)]
pub struct FlowTable {
    flows: Vec<Record>,
    /// The configuration's addresses the records name by id.
    addrs: AddrIds,
    /// Bit `id % 64` of word `id / 64`: slot `id` holds a live flow. Listing walks it a word
    /// at a time, so a page costs its flows plus one word per 64 slots it spans.
    live: Vec<u64>,
    /// The most recently freed slot (reused first: its record is likely still cached); each
    /// free slot's `last_seen` holds the next one, `NIL` ending the chain.
    free_head: FlowId,
    /// Slots from here on have never held a flow (taken in order once the chain is empty).
    fresh: FlowId,
    live_count: u32,
    /// `tag << REF_BITS | ref` per slot, or `EMPTY` (see the module docs).
    index: Vec<u32>,
    key: HashKey,
}

impl FlowTable {
    /// A table of `capacity` flows; `seed` keys the hash (draw it at random and keep it
    /// secret: see [`crate::hashkey`]).
    pub fn new(capacity: u32, seed: u64) -> FlowTable {
        let capacity = capacity.max(1);
        FlowTable::with_index_slots(capacity, seed, capacity as usize * INDEX_SLOTS_PER_FLOW)
    }

    /// A table with an index of `slots` slots (at least one more than two per flow, so that
    /// every probe ends at an empty slot), for measuring other loads.
    pub fn with_index_slots(capacity: u32, seed: u64, slots: usize) -> FlowTable {
        let capacity = capacity.max(1);
        assert!(
            capacity <= MAX_CAPACITY,
            "flow capacity {capacity} over the most an index entry can name ({MAX_CAPACITY})"
        );
        let slots = slots.max(2 * capacity as usize + 1);
        assert!(slots <= u32::MAX as usize, "index of {slots} slots");
        FlowTable {
            flows: vec![EMPTY_RECORD; capacity as usize],
            addrs: AddrIds::new(),
            live: vec![0; (capacity as usize).div_ceil(64)],
            free_head: NIL,
            fresh: 0,
            live_count: 0,
            index: vec![EMPTY; slots],
            key: HashKey::from_seed(seed),
        }
    }

    pub fn capacity(&self) -> u32 {
        self.flows.len() as u32
    }

    pub fn len(&self) -> usize {
        self.live_count as usize
    }

    /// Bytes this table holds for its capacity: records, index, live bitmap and the table of
    /// configuration addresses.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(self.flows.as_slice())
            + std::mem::size_of_val(self.index.as_slice())
            + std::mem::size_of_val(self.live.as_slice())
            + self.addrs.memory_bytes()
    }

    /// The records, the index and the live bitmap, as allocated.
    pub fn memory_regions(&self) -> [crate::MemoryRegion; 3] {
        use crate::MemoryRegion;
        [
            MemoryRegion::of("flow records", &self.flows),
            MemoryRegion::of("flow index", &self.index),
            MemoryRegion::of("flow bitmap", &self.live),
        ]
    }

    /// Index slots (for measuring).
    pub fn index_slots(&self) -> usize {
        self.index.len()
    }

    /// The slot where a probe for `hash` starts: its high half scaled to the index size.
    #[inline]
    fn home(&self, hash: u64) -> usize {
        (((hash >> 32) * self.index.len() as u64) >> 32) as usize
    }

    #[inline]
    fn next_slot(&self, i: usize) -> usize {
        if i + 1 == self.index.len() {
            0
        } else {
            i + 1
        }
    }

    /// Slots from `from` forward to `to`, wrapping at the end of the index.
    #[inline]
    fn distance(&self, from: usize, to: usize) -> usize {
        if to >= from {
            to - from
        } else {
            to + self.index.len() - from
        }
    }

    /// Takes a free slot: the most recently freed one, else a never-used one.
    fn take_slot(&mut self) -> Option<FlowId> {
        if self.free_head != NIL {
            let id = self.free_head;
            self.free_head = self.flows[id as usize].track.last_seen as FlowId;
            return Some(id);
        }
        if self.fresh < self.capacity() {
            self.fresh += 1;
            return Some(self.fresh - 1);
        }
        None
    }

    fn has_free_slot(&self) -> bool {
        self.free_head != NIL || self.fresh < self.capacity()
    }

    /// Chains slot `id` (not live) in front of the free slots.
    fn give_slot(&mut self, id: FlowId) {
        self.flows[id as usize].track.last_seen = u64::from(self.free_head);
        self.free_head = id;
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn hash(&self, t: &FlowTuple) -> u64 {
        self.key.tuple(t)
    }

    /// Finds the flow and direction a packet with tuple `t` (hashed as `hash`) belongs to.
    #[inline]
    pub fn lookup(&self, t: &FlowTuple, hash: u64) -> Option<(FlowId, Dir)> {
        let tag = tag_of(hash);
        let mut i = self.home(hash);
        loop {
            let e = self.index[i];
            if e == EMPTY {
                return None;
            }
            // A tag matches a foreign entry once in 256: the record decides.
            if entry_tag(e) == tag {
                let (id, dir) = entry_flow(e);
                if self.flows[id as usize].matches(&self.addrs, dir, t) {
                    return Some((id, dir));
                }
            }
            i = self.next_slot(i);
        }
    }

    /// Whether some flow owns key `t`.
    /// The index slot a lookup of `hash` reads first, for a caller to prefetch (a raw
    /// address, never dereferenced here).
    #[inline]
    pub fn index_addr(&self, hash: u64) -> *const u8 {
        let i = self.home(hash);
        std::ptr::from_ref(&self.index[i]).cast()
    }

    /// The flow a lookup of `hash` would compare first (the first index entry with the
    /// hash's tag, within a few slots), for a caller to prefetch: reads the index, so the
    /// index slot should be in cache already (`index_addr` one step before). Possibly
    /// another key's flow (tags are 8 bits): a hint, never an answer.
    #[inline]
    pub fn flow_addr(&self, hash: u64) -> Option<*const u8> {
        match self.first_with_tag(hash) {
            Probe::Found(id) => Some(self.record_addr(id)),
            Probe::Absent | Probe::Unsure => None,
        }
    }

    /// Whether a lookup of `hash` is sure to miss, reading only the index: an empty slot
    /// comes before any entry with the hash's tag within a few slots. Exact when true (the
    /// key's own entry would carry the tag and sit before the empty slot); `false` only
    /// means unsure (a foreign entry may share the 8-bit tag).
    #[inline]
    pub fn surely_absent(&self, hash: u64) -> bool {
        matches!(self.first_with_tag(hash), Probe::Absent)
    }

    /// The first entry with `hash`'s tag within `LOOKAHEAD_SLOTS` slots of its home.
    #[inline]
    fn first_with_tag(&self, hash: u64) -> Probe {
        let tag = tag_of(hash);
        let mut i = self.home(hash);
        for _ in 0..LOOKAHEAD_SLOTS {
            let e = self.index[i];
            if e == EMPTY {
                return Probe::Absent;
            }
            if entry_tag(e) == tag {
                return Probe::Found(entry_flow(e).0);
            }
            i = self.next_slot(i);
        }
        Probe::Unsure
    }

    pub fn contains_key(&self, t: &FlowTuple) -> bool {
        self.lookup(t, self.hash(t)).is_some()
    }

    /// Inserts `flow` under both of its keys.
    pub fn insert(&mut self, flow: Flow) -> Result<FlowId, InsertError> {
        let (k0, k1) = (flow.key(ORIG), flow.key(REPLY));
        let (h0, h1) = (self.hash(&k0), self.hash(&k1));
        if self.lookup(&k0, h0).is_some() || self.lookup(&k1, h1).is_some() || k0 == k1 {
            return Err(InsertError::Conflict);
        }
        let id = self.take_slot().ok_or(InsertError::Full)?;
        if let Err(e) = self.store(id, &flow) {
            self.give_slot(id);
            return Err(e);
        }
        self.set_live(id, true);
        self.index_insert(h0, id << 1);
        self.index_insert(h1, (id << 1) | 1);
        Ok(id)
    }

    /// Inserts `flow` whose original key hashes to `orig_hash` and is known to be absent (the
    /// caller just looked it up and missed): one probe sequence for the reply key, which both
    /// checks for a conflict and finds its slot.
    pub fn insert_new(&mut self, flow: Flow, orig_hash: u64) -> Result<FlowId, InsertError> {
        let k1 = flow.key(REPLY);
        if flow.key(ORIG) == k1 {
            return Err(InsertError::Conflict);
        }
        if !self.has_free_slot() {
            return Err(InsertError::Full);
        }
        let h1 = self.hash(&k1);
        let tag1 = tag_of(h1);
        let mut i = self.home(h1);
        loop {
            let e = self.index[i];
            if e == EMPTY {
                break;
            }
            if entry_tag(e) == tag1 {
                let (id, dir) = entry_flow(e);
                if self.flows[id as usize].matches(&self.addrs, dir, &k1) {
                    return Err(InsertError::Conflict);
                }
            }
            i = self.next_slot(i);
        }
        let id = self.take_slot().ok_or(InsertError::Full)?;
        if let Err(e) = self.store(id, &flow) {
            self.give_slot(id);
            return Err(e);
        }
        self.set_live(id, true);
        // The reply entry first: the slot found above is still empty.
        self.index[i] = entry(h1, (id << 1) | 1);
        self.index_insert(orig_hash, id << 1);
        Ok(id)
    }

    /// Puts `flow` back in slot `id` under both of its keys (a flow store's record being
    /// restored into an empty table). Call [`finish_restore`](Self::finish_restore) after
    /// the last one.
    pub fn restore_at(&mut self, id: FlowId, flow: Flow) -> Result<(), InsertError> {
        if id >= self.capacity() || self.is_live(id) {
            return Err(InsertError::Conflict);
        }
        let (k0, k1) = (flow.key(ORIG), flow.key(REPLY));
        let (h0, h1) = (self.hash(&k0), self.hash(&k1));
        if self.lookup(&k0, h0).is_some() || self.lookup(&k1, h1).is_some() || k0 == k1 {
            return Err(InsertError::Conflict);
        }
        self.store(id, &flow)?;
        self.set_live(id, true);
        self.index_insert(h0, id << 1);
        self.index_insert(h1, (id << 1) | 1);
        Ok(())
    }

    /// Rebuilds the free slots from the live ones after [`restore_at`](Self::restore_at):
    /// the slots above the highest live one are never-used again, the others are chained so
    /// that the lowest is taken first.
    pub fn finish_restore(&mut self) {
        self.live_count = self.live.iter().map(|w| w.count_ones()).sum();
        self.fresh = (0..self.live.len())
            .rev()
            .find(|&w| self.live[w] != 0)
            .map_or(0, |w| {
                (w * 64) as FlowId + 64 - self.live[w].leading_zeros()
            });
        self.free_head = NIL;
        for id in (0..self.fresh).rev() {
            if !self.is_live(id) {
                self.give_slot(id);
            }
        }
    }

    /// Removes flow `id` (both keys). No-op if it is not live.
    pub fn remove(&mut self, id: FlowId) {
        if !self.is_live(id) {
            return;
        }
        let f = self.get(id);
        let (h0, h1) = (self.hash(&f.key(ORIG)), self.hash(&f.key(REPLY)));
        self.index_remove(h0, id << 1);
        self.index_remove(h1, (id << 1) | 1);
        let [a, b] = self.flows[id as usize].local;
        self.addrs.give_back(a);
        self.addrs.give_back(b);
        self.set_live(id, false);
        self.give_slot(id);
    }

    pub fn is_live(&self, id: FlowId) -> bool {
        self.live
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    fn set_live(&mut self, id: FlowId, live: bool) {
        let (w, bit) = (id as usize / 64, 1u64 << (id % 64));
        if live {
            self.live[w] |= bit;
            self.live_count += 1;
        } else {
            self.live[w] &= !bit;
            self.live_count -= 1;
        }
    }

    /// Writes `flow` into free slot `id`, taking ids for its two configuration addresses.
    fn store(&mut self, id: FlowId, flow: &Flow) -> Result<(), InsertError> {
        let (peer, first) = match flow.nat {
            Nat::Snat => (flow.orig_dst, flow.orig_src),
            Nat::Dnat | Nat::None => (flow.orig_src, flow.orig_dst),
        };
        let a = self.addrs.take(first).ok_or(InsertError::Full)?;
        let Some(b) = self.addrs.take(flow.xlat) else {
            self.addrs.give_back(a);
            return Err(InsertError::Full);
        };
        self.flows[id as usize] = Record {
            track: FlowTrack {
                last_seen: flow.last_seen,
                tcp: flow.tcp,
                next_hop: flow.next_hop,
            },
            peer,
            local: [a, b],
            ports: [flow.orig_sport, flow.orig_dport, flow.xlat_port],
            rule: flow.rule,
            proto: flow.proto,
            nat: flow.nat,
        };
        Ok(())
    }

    /// Makes room for `addresses` more configuration addresses (frontends, members, SNAT
    /// addresses) than the flows name now, so that new flows naming them do not allocate.
    /// Call it on the control path whenever rules change.
    pub fn reserve_addresses(&mut self, addresses: usize) {
        self.addrs.reserve(addresses);
    }

    /// Configuration addresses the live flows name.
    pub fn addresses_named(&self) -> usize {
        self.addrs.len()
    }

    /// Flow `id` (a live one; a free slot reads as garbage).
    #[inline]
    pub fn get(&self, id: FlowId) -> Flow {
        self.flows[id as usize].flow(&self.addrs)
    }

    /// The fields of flow `id` that change while it lives.
    #[inline]
    pub fn get_mut(&mut self, id: FlowId) -> &mut FlowTrack {
        &mut self.flows[id as usize].track
    }

    /// Flow `id`'s rule, read without decoding the rest of the record.
    #[inline]
    pub fn rule(&self, id: FlowId) -> RuleId {
        self.flows[id as usize].rule
    }

    /// Flow `id`'s NAT kind, read without decoding the rest of the record.
    #[inline]
    pub fn nat(&self, id: FlowId) -> Nat {
        self.flows[id as usize].nat
    }

    /// What a packet of flow `id` travelling `dir` has rewritten, read without decoding the
    /// rest of the record: the one address the packet path needs (a second id lookup per
    /// packet would be wasted).
    #[inline]
    pub fn translation(&self, id: FlowId, dir: Dir) -> Translation {
        let r = &self.flows[id as usize];
        match (r.nat, dir) {
            (Nat::Dnat, ORIG) => Translation::Dst(self.addrs.addr(r.local[1]), r.ports[2]),
            (Nat::Dnat, _) => Translation::Src(self.addrs.addr(r.local[0]), r.ports[1]),
            (Nat::Snat, ORIG) => Translation::Src(self.addrs.addr(r.local[1]), r.ports[2]),
            (Nat::Snat, _) => Translation::Dst(self.addrs.addr(r.local[0]), r.ports[0]),
            (Nat::None, _) => Translation::None,
        }
    }

    /// Flow `id`'s changing fields, read without decoding the rest.
    #[inline]
    pub fn track(&self, id: FlowId) -> &FlowTrack {
        &self.flows[id as usize].track
    }

    /// The address of flow `id`'s record, for a caller to prefetch (never dereferenced here).
    #[inline]
    pub fn record_addr(&self, id: FlowId) -> *const u8 {
        std::ptr::from_ref(&self.flows[id as usize]).cast()
    }

    /// Live flows, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, Flow)> + '_ {
        self.iter_range(0..self.capacity())
    }

    /// Live flows whose slot is in `slots`, in slot order: a listing's cursor. A flow keeps
    /// its slot for life, so paging by slot sees every flow that lives through the whole walk
    /// exactly once, whatever comes and goes meanwhile. Costs the flows returned plus one
    /// bitmap word per 64 slots of the range.
    pub fn iter_range(
        &self,
        slots: std::ops::Range<FlowId>,
    ) -> impl Iterator<Item = (FlowId, Flow)> + '_ {
        let end = slots.end.min(self.capacity());
        let start = slots.start.min(end);
        let mut word = start as usize / 64;
        // The first word without the slots below `start`.
        let mut bits = self
            .live
            .get(word)
            .map_or(0, |w| w & (u64::MAX << (start % 64)));
        std::iter::from_fn(move || loop {
            if bits != 0 {
                let id = (word * 64) as FlowId + bits.trailing_zeros();
                bits &= bits - 1;
                if id >= end {
                    return None;
                }
                return Some((id, self.get(id)));
            }
            word += 1;
            if word * 64 >= end as usize {
                return None;
            }
            bits = self.live[word];
        })
    }

    fn index_insert(&mut self, hash: u64, r: u32) {
        let mut i = self.home(hash);
        while self.index[i] != EMPTY {
            i = self.next_slot(i);
        }
        self.index[i] = entry(hash, r);
    }

    fn index_remove(&mut self, hash: u64, r: u32) {
        let want = entry(hash, r);
        let mut i = self.home(hash);
        while self.index[i] != want {
            if self.index[i] == EMPTY {
                debug_assert!(false, "flow key missing from index");
                return;
            }
            i = self.next_slot(i);
        }
        // Backward-shift deletion: pull later entries of the cluster into the hole when their
        // home slot is not between the hole and their position. An entry holds only 8 bits of
        // its hash, so its home comes from hashing its record's key again (a record's key
        // never changes while it is live; removals are not per packet).
        let mut hole = i;
        let mut j = self.next_slot(i);
        loop {
            let e = self.index[j];
            if e == EMPTY {
                break;
            }
            let (id, dir) = entry_flow(e);
            let home = self.home(self.hash(&self.get(id).key(dir)));
            if self.distance(home, j) >= self.distance(hole, j) {
                self.index[hole] = e;
                hole = j;
            }
            j = self.next_slot(j);
        }
        self.index[hole] = EMPTY;
    }
}

/// The tag of a key hashing to `hash`: its low byte, independent of its home slot (which
/// the high half picks), so that neighbouring entries seldom share it.
#[inline]
fn tag_of(hash: u64) -> u32 {
    u32::from(hash as u8)
}

/// The index entry of ref `r` (`flow << 1 | dir`) for a key hashing to `hash`.
#[inline]
fn entry(hash: u64, r: u32) -> u32 {
    debug_assert!(r < REF_MASK, "ref {r:#x} past MAX_CAPACITY");
    (tag_of(hash) << REF_BITS) | r
}

#[inline]
fn entry_tag(e: u32) -> u32 {
    e >> REF_BITS
}

/// The flow and direction an index entry names.
#[inline]
fn entry_flow(e: u32) -> (FlowId, Dir) {
    let r = e & REF_MASK;
    (r >> 1, (r & 1) as Dir)
}

/// What the first slots of a probe say about a key.
enum Probe {
    /// An entry with the key's tag: probably the key's flow (a foreign entry shares the
    /// 8-bit tag once in 256).
    Found(FlowId),
    /// An empty slot first: the key is not in the table.
    Absent,
    /// Neither within the first slots.
    Unsure,
}

const EMPTY_RECORD: Record = Record {
    track: FlowTrack {
        last_seen: 0,
        tcp: TcpTrack::NONE,
        next_hop: [0; 2],
    },
    peer: Addr::UNSPECIFIED,
    local: [0; 2],
    ports: [0; 3],
    rule: 0,
    proto: 0,
    nat: Nat::None,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::TcpTrack;
    use std::net::Ipv4Addr;

    fn v4(a: u8, b: u8) -> Addr {
        Ipv4Addr::new(198, 18, a, b).into()
    }

    fn flow(client: u8, sport: u16, nat: Nat) -> Flow {
        Flow {
            orig_src: v4(0, client),
            orig_dst: v4(10, 1),
            xlat: v4(1, 1),
            orig_sport: sport,
            orig_dport: 80,
            xlat_port: 8080,
            proto: 6,
            nat,
            rule: 0,
            next_hop: [0, 0],
            tcp: TcpTrack::NONE,
            last_seen: 0,
        }
    }

    #[test]
    fn lookup_from_both_directions() {
        let mut t = FlowTable::new(16, 42);
        let f = flow(2, 40000, Nat::Dnat);
        let id = t.insert(f).unwrap();
        let fwd = FlowTuple {
            proto: 6,
            src: v4(0, 2),
            src_port: 40000,
            dst: v4(10, 1),
            dst_port: 80,
        };
        let rev = FlowTuple {
            proto: 6,
            src: v4(1, 1),
            src_port: 8080,
            dst: v4(0, 2),
            dst_port: 40000,
        };
        assert_eq!(t.lookup(&fwd, t.hash(&fwd)), Some((id, ORIG)));
        assert_eq!(t.lookup(&rev, t.hash(&rev)), Some((id, REPLY)));
        assert_eq!(
            f.translated(ORIG),
            FlowTuple {
                dst: v4(1, 1),
                dst_port: 8080,
                ..fwd
            }
        );
        assert_eq!(
            f.translated(REPLY),
            FlowTuple {
                src: v4(10, 1),
                src_port: 80,
                ..rev
            }
        );
        t.remove(id);
        assert_eq!(t.lookup(&fwd, t.hash(&fwd)), None);
        assert_eq!(t.lookup(&rev, t.hash(&rev)), None);
    }

    #[test]
    fn snat_keys() {
        let mut f = flow(2, 40000, Nat::Snat);
        f.xlat = v4(10, 9);
        f.xlat_port = 2048;
        let rev = f.key(REPLY);
        assert_eq!(
            (rev.src, rev.src_port, rev.dst, rev.dst_port),
            (v4(10, 1), 80, v4(10, 9), 2048)
        );
        let out = f.translated(ORIG);
        assert_eq!((out.src, out.src_port), (v4(10, 9), 2048));
    }

    #[test]
    fn full_and_conflict() {
        let mut t = FlowTable::new(2, 1);
        t.insert(flow(1, 1, Nat::Dnat)).unwrap();
        assert_eq!(t.insert(flow(1, 1, Nat::Dnat)), Err(InsertError::Conflict));
        t.insert(flow(2, 1, Nat::Dnat)).unwrap();
        assert_eq!(t.insert(flow(3, 1, Nat::Dnat)), Err(InsertError::Full));
        assert_eq!(t.len(), 2);
    }

    /// Random inserts and removes against a HashMap model, on a small index so clusters and
    /// wrap-around deletions happen.
    #[test]
    fn matches_model_under_churn() {
        let mut t = FlowTable::new(64, 7);
        let mut model = std::collections::HashMap::new();
        let mut rng = 99u64;
        for _ in 0..50_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let client = (rng % 40) as u8;
            let sport = ((rng >> 8) % 4) as u16 + 1;
            let f = flow(client, sport, Nat::Dnat);
            let key = (client, sport);
            if rng & (1 << 20) != 0 {
                match t.insert(f) {
                    Ok(id) => assert!(model.insert(key, id).is_none()),
                    Err(InsertError::Conflict) => assert!(model.contains_key(&key)),
                    Err(InsertError::Full) => assert_eq!(model.len(), 64),
                }
            } else if let Some(id) = model.remove(&key) {
                t.remove(id);
            }
            if rng % 997 == 0 {
                for (&(c, s), &id) in &model {
                    let k = flow(c, s, Nat::Dnat);
                    assert_eq!(
                        t.lookup(&k.key(ORIG), t.hash(&k.key(ORIG))),
                        Some((id, ORIG))
                    );
                    assert_eq!(
                        t.lookup(&k.key(REPLY), t.hash(&k.key(REPLY))),
                        Some((id, REPLY))
                    );
                }
                assert_eq!(t.len(), model.len());
            }
        }
    }

    /// Restored flows keep their slots; the free ones are taken lowest first afterwards, a
    /// freed slot is reused first, and the table fills to exactly its capacity.
    #[test]
    fn free_slots_after_restore_and_removal() {
        let mut t = FlowTable::new(200, 3);
        for (id, client) in [(5u32, 1u8), (64, 2), (130, 3)] {
            t.restore_at(id, flow(client, 1, Nat::Dnat)).unwrap();
        }
        assert_eq!(
            t.restore_at(64, flow(9, 9, Nat::Dnat)),
            Err(InsertError::Conflict)
        );
        t.finish_restore();
        assert_eq!(t.len(), 3);
        let mut got = Vec::new();
        for i in 0..197u16 {
            got.push(t.insert(flow(4, 100 + i, Nat::Dnat)).unwrap());
        }
        let want: Vec<FlowId> = (0..200).filter(|id| ![5, 64, 130].contains(id)).collect();
        assert_eq!(got, want);
        assert_eq!(t.insert(flow(5, 1, Nat::Dnat)), Err(InsertError::Full));
        t.remove(64);
        t.remove(7);
        assert_eq!(t.len(), 198);
        assert_eq!(t.insert(flow(5, 1, Nat::Dnat)), Ok(7));
        assert_eq!(t.insert(flow(5, 2, Nat::Dnat)), Ok(64));
        assert_eq!(t.insert(flow(5, 3, Nat::Dnat)), Err(InsertError::Full));
        for (id, f) in t.iter() {
            assert_eq!(
                t.lookup(&f.key(ORIG), t.hash(&f.key(ORIG))),
                Some((id, ORIG))
            );
        }
        assert_eq!(t.iter().count(), 200);
    }

    /// The index has `INDEX_SLOTS_PER_FLOW` slots per flow whatever the capacity (no rounding
    /// up to a power of two), and at least one more than two per flow.
    #[test]
    fn index_is_sized_to_the_capacity() {
        for cap in [1u32, 3, 1000, 1_250_000] {
            let t = FlowTable::new(cap, 1);
            assert_eq!(t.index_slots(), cap as usize * INDEX_SLOTS_PER_FLOW);
        }
        assert_eq!(FlowTable::with_index_slots(10, 1, 4).index_slots(), 21);
        let t = FlowTable::new(1_250_000, 1);
        let per_flow = t.memory_bytes() as f64 / 1_250_000.0;
        // The record, 3 slots of 4 bytes, and the live bit.
        let want = (std::mem::size_of::<Record>() + 4 * INDEX_SLOTS_PER_FLOW) as f64 + 0.125;
        assert!((per_flow - want).abs() < 0.01, "{per_flow}, not {want}");
    }

    /// Refs up to the highest flow id a table may hold decode to what was encoded, whatever
    /// the tag (0xff included, the tag of `EMPTY`), and never read as `EMPTY`.
    #[test]
    fn entries_of_the_highest_flow_ids_round_trip() {
        let ids = [0, 1, 2, 0x7f_ffff / 2, MAX_CAPACITY - 2, MAX_CAPACITY - 1];
        for id in ids {
            for dir in [ORIG, REPLY] {
                for hash in [0u64, 0xff, 0x5a, 0xffff_ffff_ffff_ff00, u64::MAX] {
                    let e = entry(hash, (id << 1) | dir as u32);
                    assert_ne!(e, EMPTY, "flow {id} dir {dir} hash {hash:#x}");
                    assert_eq!(entry_flow(e), (id, dir));
                    assert_eq!(entry_tag(e), tag_of(hash));
                }
            }
        }
        // `EMPTY` is the reply entry of flow `MAX_CAPACITY` with tag 0xff: one past the last.
        assert_eq!(entry_flow(EMPTY), (MAX_CAPACITY, REPLY));
        assert_eq!(entry_tag(EMPTY), 0xff);
    }

    #[test]
    #[should_panic(expected = "over the most an index entry can name")]
    fn a_capacity_past_the_refs_is_refused() {
        FlowTable::new(MAX_CAPACITY + 1, 1);
    }

    impl FlowTable {
        /// Every index entry names a live flow under the tag of its key's hash, and is
        /// reachable from its home slot without crossing an empty one; two entries per flow.
        fn check_index(&self) {
            let mut entries = 0;
            for (i, &e) in self.index.iter().enumerate() {
                if e == EMPTY {
                    continue;
                }
                entries += 1;
                let (id, dir) = entry_flow(e);
                assert!(self.is_live(id), "slot {i}: flow {id} not live");
                let h = self.hash(&self.get(id).key(dir));
                assert_eq!(entry_tag(e), tag_of(h), "slot {i}");
                let mut j = self.home(h);
                while j != i {
                    assert_ne!(self.index[j], EMPTY, "slot {i}: empty slot {j} after home");
                    j = self.next_slot(j);
                }
            }
            assert_eq!(entries, 2 * self.len());
        }
    }

    /// Flows both of whose keys have the same 8-bit tag (0xff, as `EMPTY`'s high byte), in an
    /// index barely larger than their keys: every probe passes entries with the key's tag
    /// that are not its own, and every removal shifts such entries back.
    #[test]
    fn keys_sharing_one_tag_insert_look_up_and_remove() {
        let cap = 24u32;
        let mut t = FlowTable::with_index_slots(cap, 5, 0);
        let same_tag = |t: &FlowTable, f: &Flow| {
            [ORIG, REPLY]
                .iter()
                .all(|&d| tag_of(t.hash(&f.key(d))) == 0xff)
        };
        let mut flows = Vec::new();
        'search: for client in 0..=255u8 {
            for sport in 1..=u16::MAX {
                let f = flow(client, sport, Nat::Dnat);
                if same_tag(&t, &f) {
                    flows.push(f);
                    if flows.len() == cap as usize + 4 {
                        break 'search;
                    }
                }
            }
        }
        let (inserted, absent) = flows.split_at(cap as usize);
        let mut ids = Vec::new();
        for (n, f) in inserted.iter().enumerate() {
            let id = if n % 2 == 0 {
                t.insert(*f).unwrap()
            } else {
                t.insert_new(*f, t.hash(&f.key(ORIG))).unwrap()
            };
            ids.push(id);
            t.check_index();
        }
        assert_eq!(t.insert(absent[0]), Err(InsertError::Full));
        let found = |t: &FlowTable, f: &Flow, id: FlowId| {
            [ORIG, REPLY].iter().all(|&d| {
                let k = f.key(d);
                t.lookup(&k, t.hash(&k)) == Some((id, d))
            })
        };
        for (f, &id) in inserted.iter().zip(&ids) {
            assert!(found(&t, f, id));
            assert_eq!(t.insert(*f), Err(InsertError::Conflict));
        }
        for f in absent {
            for d in [ORIG, REPLY] {
                let k = f.key(d);
                assert_eq!(t.lookup(&k, t.hash(&k)), None);
            }
        }
        // Remove in an order unrelated to the slots; the rest stay found each time.
        let mut order: Vec<usize> = (0..inserted.len()).collect();
        order.sort_by_key(|&n| (n * 7) % inserted.len());
        for (done, &n) in order.iter().enumerate() {
            t.remove(ids[n]);
            t.check_index();
            for &m in &order[done + 1..] {
                assert!(
                    found(&t, &inserted[m], ids[m]),
                    "flow {m} after removing {n}"
                );
            }
            let k = inserted[n].key(ORIG);
            assert_eq!(t.lookup(&k, t.hash(&k)), None);
        }
        assert!(t.is_empty());
        assert!(t.index.iter().all(|&e| e == EMPTY));
    }

    #[test]
    fn insert_new_matches_insert() {
        let mut t = FlowTable::new(8, 3);
        let f = flow(9, 9, Nat::Dnat);
        let h0 = t.hash(&f.key(ORIG));
        let id = t.insert_new(f, h0).unwrap();
        assert_eq!(t.lookup(&f.key(ORIG), h0), Some((id, ORIG)));
        let k1 = f.key(REPLY);
        assert_eq!(t.lookup(&k1, t.hash(&k1)), Some((id, REPLY)));
        // Another flow whose reply key collides is refused.
        let mut g = flow(9, 9, Nat::Dnat);
        g.orig_dst = v4(10, 2);
        let hg = t.hash(&g.key(ORIG));
        assert_eq!(t.insert_new(g, hg), Err(InsertError::Conflict));
        t.remove(id);
        assert!(t.is_empty());
    }

    #[test]
    fn prefetch_addresses_are_what_a_lookup_reads() {
        let mut t = FlowTable::new(1024, 7);
        let mut ids = Vec::new();
        for sport in 1000..1600 {
            ids.push((sport, t.insert(flow(3, sport, Nat::Dnat)).unwrap()));
        }
        let index = t.index.as_ptr_range();
        let mut hits = 0;
        for &(sport, id) in &ids {
            let k = FlowTuple {
                proto: 6,
                src: v4(0, 3),
                src_port: sport,
                dst: v4(10, 1),
                dst_port: 80,
            };
            let h = t.hash(&k);
            assert!(index.contains(&t.index_addr(h).cast::<u32>()));
            // The first entry with the hash's tag within `LOOKAHEAD_SLOTS` slots: this
            // flow, unless its key sits further down a probe chain.
            let own: *const u8 = std::ptr::from_ref(&t.flows[id as usize]).cast();
            if t.flow_addr(h) == Some(own) {
                hits += 1;
            }
        }
        assert!(hits * 100 >= ids.len() * 95, "{hits} of {}", ids.len());
        let missing = FlowTuple {
            proto: 17,
            src: v4(9, 9),
            src_port: 1,
            dst: v4(9, 8),
            dst_port: 2,
        };
        assert_eq!(t.flow_addr(t.hash(&missing)), None);
    }

    /// A listing that pages by slot while flows come and go between pages sees every flow
    /// that lives through the whole walk exactly once, and no slot twice.
    #[test]
    fn slot_cursor_pages_cover_every_lasting_flow_once_under_churn() {
        let cap = 300;
        let mut t = FlowTable::new(cap, 5);
        let mut live: std::collections::HashMap<(u8, u16), FlowId> = Default::default();
        let mut rng = 7u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for i in 0..200u16 {
            let f = flow((i % 50) as u8, 1000 + i, Nat::Dnat);
            live.insert(((i % 50) as u8, 1000 + i), t.insert(f).unwrap());
        }
        for page in [1usize, 7, 64, 1000] {
            let at_start: std::collections::HashSet<(u8, u16)> = live.keys().copied().collect();
            let mut removed = std::collections::HashSet::new();
            let mut seen_slots = std::collections::HashSet::new();
            let mut seen_keys = Vec::new();
            let mut cursor = 0;
            loop {
                let got: Vec<(FlowId, (u8, u16))> = t
                    .iter_range(cursor..cap)
                    .take(page)
                    .map(|(id, f)| {
                        let client = (f.orig_src.0 & 0xff) as u8;
                        (id, (client, f.orig_sport))
                    })
                    .collect();
                for &(id, key) in &got {
                    assert!(seen_slots.insert(id), "slot {id} seen twice");
                    seen_keys.push(key);
                }
                let Some(&(last, _)) = got.last() else { break };
                cursor = last + 1;
                // Churn between pages: remove a few, add a few (slots get reused).
                for _ in 0..3 {
                    let r = next();
                    let key = ((r % 50) as u8, 1000 + (r >> 8) as u16 % 400);
                    if let Some(id) = live.remove(&key) {
                        t.remove(id);
                        removed.insert(key);
                    } else if let Ok(id) = t.insert(flow(key.0, key.1, Nat::Dnat)) {
                        live.insert(key, id);
                    }
                }
            }
            for key in at_start.difference(&removed) {
                assert_eq!(
                    seen_keys.iter().filter(|k| *k == key).count(),
                    1,
                    "page {page}: {key:?}"
                );
            }
        }
        // A range stops at its end, and at the capacity.
        let all: Vec<FlowId> = t.iter().map(|(id, _)| id).collect();
        let mid: Vec<FlowId> = t.iter_range(64..130).map(|(id, _)| id).collect();
        let want: Vec<FlowId> = all
            .iter()
            .copied()
            .filter(|id| (64..130).contains(id))
            .collect();
        assert_eq!(mid, want);
        assert_eq!(t.iter_range(cap..cap + 100).count(), 0);
        assert_eq!(t.iter().count(), t.len());
    }

    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        proptest! {
            /// Inserts (both ways) and removes against a HashMap, on an index with one slot
            /// to spare beyond two per flow: long clusters, removals that shift entries back
            /// across the wrap, and foreign entries with the key's 8-bit tag on most probes.
            #[test]
            fn index_matches_a_hash_map(
                seed in any::<u64>(),
                ops in prop::collection::vec((0..3u8, 0..7u8, 1..9u16), 1..300),
            ) {
                let cap = 24u32;
                let mut t = FlowTable::with_index_slots(cap, seed, 0);
                let mut model: HashMap<(u8, u16), FlowId> = HashMap::new();
                for (kind, client, sport) in ops {
                    let f = flow(client, sport, Nat::Dnat);
                    let key = (client, sport);
                    let orig = f.key(ORIG);
                    let got = match kind {
                        0 => Some(t.insert(f)),
                        // `insert_new` is for a key just looked up and missed.
                        1 if t.lookup(&orig, t.hash(&orig)).is_none() => {
                            Some(t.insert_new(f, t.hash(&orig)))
                        }
                        1 => None,
                        _ => {
                            if let Some(id) = model.remove(&key) {
                                t.remove(id);
                            }
                            None
                        }
                    };
                    match got {
                        Some(Ok(id)) => prop_assert!(model.insert(key, id).is_none()),
                        Some(Err(InsertError::Conflict)) => prop_assert!(model.contains_key(&key)),
                        Some(Err(InsertError::Full)) => {
                            prop_assert_eq!(model.len(), cap as usize);
                            prop_assert!(!model.contains_key(&key));
                        }
                        None => {}
                    }
                    t.check_index();
                    prop_assert_eq!(t.len(), model.len());
                    for c in 0..7u8 {
                        for s in 1..9u16 {
                            let f = flow(c, s, Nat::Dnat);
                            for d in [ORIG, REPLY] {
                                let k = f.key(d);
                                let h = t.hash(&k);
                                let want = model.get(&(c, s)).map(|&id| (id, d));
                                prop_assert_eq!(t.lookup(&k, h), want);
                                // "Surely absent" is never said of a present key.
                                if want.is_some() {
                                    prop_assert!(!t.surely_absent(h));
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    impl FlowTable {
        /// Slots a lookup of `t` reads (the home slot counted), and records it compares.
        fn probe_length(&self, t: &FlowTuple) -> (usize, usize) {
            let (h, mut n, mut records) = (self.hash(t), 1, 0);
            let mut i = self.home(h);
            loop {
                let e = self.index[i];
                if e == EMPTY {
                    return (n, records);
                }
                if entry_tag(e) == tag_of(h) {
                    let (id, dir) = entry_flow(e);
                    records += 1;
                    if self.flows[id as usize].matches(&self.addrs, dir, t) {
                        return (n, records);
                    }
                }
                i = self.next_slot(i);
                n += 1;
            }
        }
    }

    /// Mean and worst slots read per hit and per miss with every flow slot in use, at
    /// `INDEX_SLOTS_PER_FLOW` and two other sizes (printed: `--nocapture`), on clients that
    /// differ only in their port and clients that differ in their address.
    #[test]
    fn probe_lengths_at_full_load() {
        let cap = 1u32 << 15;
        for slots_per_flow in [INDEX_SLOTS_PER_FLOW, 4, 8] {
            for spread_addresses in [false, true] {
                let mut t = FlowTable::with_index_slots(cap, 11, cap as usize * slots_per_flow);
                let mut keys = Vec::new();
                for i in 0..cap {
                    let mut f = flow((i % 200) as u8, 1024 + (i / 200) as u16, Nat::Dnat);
                    if !spread_addresses {
                        f = flow(1, 1024 + i as u16, Nat::Dnat);
                    }
                    t.insert(f).unwrap();
                    keys.push(f.key(ORIG));
                    keys.push(f.key(REPLY));
                }
                assert_eq!(t.len(), cap as usize);
                let (hits, hit_records): (Vec<usize>, Vec<usize>) =
                    keys.iter().map(|k| t.probe_length(k)).unzip();
                let (misses, miss_records): (Vec<usize>, Vec<usize>) = (0..cap)
                    .map(|i| {
                        let mut k = keys[i as usize * 2];
                        k.proto = 17;
                        t.probe_length(&k)
                    })
                    .unzip();
                let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len() as f64;
                let (hit, miss) = (mean(&hits), mean(&misses));
                // Records compared: one per hit, plus the foreign entries sharing the 8-bit tag.
                let (hit_reads, miss_reads) = (mean(&hit_records), mean(&miss_records));
                let within =
                    hits.iter().filter(|&&n| n <= LOOKAHEAD_SLOTS).count() * 100 / hits.len();
                println!(
                    "{slots_per_flow} slots/flow (load {:.2}), {}: hit {hit:.2} (worst {}, {within} % within {LOOKAHEAD_SLOTS}), miss {miss:.2} (worst {}); records read per hit {hit_reads:.4}, per miss {miss_reads:.4}",
                    2.0 / slots_per_flow as f64,
                    if spread_addresses { "200 clients" } else { "one client" },
                    hits.iter().max().unwrap(),
                    misses.iter().max().unwrap(),
                );
                // Linear probing's expected lengths at load a: (1 + 1/(1-a))/2 per hit,
                // (1 + 1/(1-a)^2)/2 per miss; a bad spread of home slots would exceed them.
                let a = 2.0 / slots_per_flow as f64;
                assert!(hit < 1.3 * (1.0 + 1.0 / (1.0 - a)) / 2.0, "hit {hit}");
                assert!(
                    miss < 1.3 * (1.0 + 1.0 / ((1.0 - a) * (1.0 - a))) / 2.0,
                    "miss {miss}"
                );
                // A foreign entry shares the tag once in 256 slots passed.
                assert!(
                    hit_reads < 1.0 + 2.0 * (hit - 1.0) / 256.0 + 0.01,
                    "{hit_reads}"
                );
                assert!(
                    miss_reads < 2.0 * (miss - 1.0) / 256.0 + 0.01,
                    "{miss_reads}"
                );
            }
        }
    }

    #[test]
    fn a_record_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Record>(), 64);
        assert_eq!(std::mem::align_of::<Record>(), 64);
    }
}
