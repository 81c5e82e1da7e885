//! SNAT port allocation for outbound rules, one allocator per worker.
//!
//! A flow holds its SNAT port for life (and for the release time after FIN/RST, which the flow's
//! linger implements), so the allocator is a bitmap of ports in use per (frontend address,
//! protocol): TCP and UDP have separate port spaces, as on the wire.
//! Ports are partitioned between workers by `port % workers == worker`, so two workers never
//! allocate the same port (docs/architecture.md, "both directions on one worker").
//!
//! Each worker keeps only its share of a port space, as *slots*: slot `i` is port
//! `i × workers + worker`, so a member's block of ports is a contiguous range of slots. Two
//! levels of bits make allocation cost independent of how full the block is:
//! - `used`, one bit per slot, scanned a 64-bit word at a time;
//! - `full`, one bit per word of `used`: set when that word has no free slot.
//!
//! A search reads the `full` words over the block (one per 4096 slots), goes straight to the
//! first word with a free slot and takes its lowest free bit: at most two words are read in
//! vain (the block's partial first and last words). A member whose ports are all in use fails
//! after reading one `full` word per 4096 ports of its share: no scan, no hash probe per port,
//! and no per-block count to rebuild when a rule change reshapes the blocks (the bitmap is per
//! address, so flows keep their ports across rule changes).

use std::collections::HashMap;
use std::ops::Range;

use crate::addr::Addr;
use crate::ruleset::{PortBlock, RuleSet};
use crate::select::FastBuild;

/// Ports in use per frontend address, for this worker's share of every block.
#[derive(Debug, Clone)]
pub struct SnatPorts {
    worker: u16,
    workers: u16,
    spaces: HashMap<(Addr, u8), Space, FastBuild>,
    /// A cluster node's own SNAT addresses (the ones it announces, so that the answers come
    /// back to it): every block's ports are taken on the node's address of the block's
    /// family instead of the block's own (the nodes' addresses differ, so no two nodes ever
    /// hand out one address and port; members whose blocks share a port range share that
    /// range's ports on the node's address, one flow per port as always).
    only: Option<Vec<Addr>>,
}

/// This worker's share of one (frontend address, protocol) port space.
#[derive(Debug, Clone)]
struct Space {
    /// Bit `i % 64` of word `i / 64`: slot `i` is in use.
    used: Box<[u64]>,
    /// Bit `w % 64` of word `w / 64`: word `w` of `used` has every bit set.
    full: Box<[u64]>,
    /// Words read by searches (`full` and `used`), for the tests that bound them.
    #[cfg(test)]
    reads: std::cell::Cell<usize>,
}

impl Space {
    fn new(slots: u32) -> Space {
        let words = (slots as usize).div_ceil(64);
        Space {
            used: vec![0; words].into_boxed_slice(),
            full: vec![0; words.div_ceil(64)].into_boxed_slice(),
            #[cfg(test)]
            reads: std::cell::Cell::new(0),
        }
    }

    #[inline]
    fn read(&self) {
        #[cfg(test)]
        self.reads.set(self.reads.get() + 1);
    }

    /// The lowest free slot in `r` (not empty, within the space).
    fn find_free(&self, r: &Range<u32>) -> Option<u32> {
        let (first_word, last_word) = (r.start as usize / 64, (r.end - 1) as usize / 64);
        let last_summary = last_word / 64;
        for s in first_word / 64..=last_summary {
            self.read();
            let mut candidates = !self.full[s];
            if s == first_word / 64 {
                candidates &= u64::MAX << (first_word % 64);
            }
            if s == last_summary {
                candidates &= u64::MAX >> (63 - last_word % 64);
            }
            while candidates != 0 {
                let w = s * 64 + candidates.trailing_zeros() as usize;
                candidates &= candidates - 1;
                self.read();
                let mut free = !self.used[w];
                if w == first_word {
                    free &= u64::MAX << (r.start % 64);
                }
                if w == last_word {
                    free &= u64::MAX >> (63 - (r.end - 1) % 64);
                }
                if free != 0 {
                    return Some((w * 64) as u32 + free.trailing_zeros());
                }
            }
        }
        None
    }

    fn set(&mut self, slot: u32) {
        let w = slot as usize / 64;
        self.used[w] |= 1 << (slot % 64);
        if self.used[w] == u64::MAX {
            self.full[w / 64] |= 1 << (w % 64);
        }
    }

    fn clear(&mut self, slot: u32) {
        let w = slot as usize / 64;
        self.used[w] &= !(1 << (slot % 64));
        self.full[w / 64] &= !(1 << (w % 64));
    }

    fn is_set(&self, slot: u32) -> bool {
        self.used
            .get(slot as usize / 64)
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    /// Slots in use in `r`.
    fn count(&self, r: &Range<u32>) -> u32 {
        if r.is_empty() {
            return 0;
        }
        let (first_word, last_word) = (r.start as usize / 64, (r.end - 1) as usize / 64);
        (first_word..=last_word)
            .map(|w| {
                let mut bits = self.used[w];
                if w == first_word {
                    bits &= u64::MAX << (r.start % 64);
                }
                if w == last_word {
                    bits &= u64::MAX >> (63 - (r.end - 1) % 64);
                }
                bits.count_ones()
            })
            .sum()
    }
}

impl SnatPorts {
    pub fn new(worker: u16, workers: u16) -> SnatPorts {
        let workers = workers.max(1);
        SnatPorts {
            worker: worker % workers,
            workers,
            spaces: HashMap::default(),
            only: None,
        }
    }

    /// Takes every block's ports on the address of `addrs` of the block's family (`None`:
    /// on the block's own address). Ports already in use stay so until their flows release
    /// them. Call [`prepare`](Self::prepare) after it.
    pub fn restrict_to(&mut self, addrs: Option<Vec<Addr>>) {
        self.only = addrs;
    }

    /// The address block `b`'s ports are taken on here; `None`: none (a cluster node without
    /// an address of that family).
    #[inline]
    fn addr_of(&self, b: &PortBlock) -> Option<Addr> {
        match &self.only {
            None => Some(b.addr),
            Some(only) => only
                .iter()
                .copied()
                .find(|a| a.to_ip().is_ipv4() == b.addr.to_ip().is_ipv4()),
        }
    }

    /// The worker that owns SNAT port `port`.
    pub fn owner(port: u16, workers: u16) -> u16 {
        port % workers.max(1)
    }

    /// Creates the port spaces that `rules`' outbound rules allocate from, so that the packet
    /// path never allocates one. Spaces of addresses no longer in use stay: flows may still
    /// hold their ports.
    pub fn prepare(&mut self, rules: &RuleSet) {
        let slots = self.slots_per_space();
        for (_, proto, _, blocks) in rules.outbound_allocations() {
            for b in blocks {
                if let Some(addr) = self.addr_of(b) {
                    self.spaces
                        .entry((addr, proto))
                        .or_insert_with(|| Space::new(slots));
                }
            }
        }
    }

    /// Takes a free port of this worker's share of `blocks`, starting the search at a point
    /// derived from `hint` so that concurrent connections spread over the blocks. `None`: every
    /// port of the share is in use.
    pub fn allocate(&mut self, blocks: &[PortBlock], proto: u8, hint: u64) -> Option<(Addr, u16)> {
        let total: u32 = blocks.iter().map(|b| self.share_len(b)).sum();
        if total == 0 {
            return None;
        }
        // The block holding the starting point, and the starting point's offset in it.
        let mut offset = (hint % u64::from(total)) as u32;
        let mut first = 0;
        for (i, b) in blocks.iter().enumerate() {
            let n = self.share_len(b);
            if offset < n {
                first = i;
                break;
            }
            offset -= n;
        }
        // From the starting point to the end of its block, the other blocks in order, then the
        // start of the first block.
        for step in 0..=blocks.len() {
            let b = &blocks[(first + step) % blocks.len()];
            let all = self.slots(b);
            let range = match step {
                0 => all.start + offset..all.end,
                s if s == blocks.len() => all.start..all.start + offset,
                _ => all,
            };
            if range.is_empty() {
                continue;
            }
            let Some(addr) = self.addr_of(b) else {
                continue;
            };
            let space = self.space_mut(addr, proto);
            if let Some(slot) = space.find_free(&range) {
                space.set(slot);
                return Some((addr, self.port(slot)));
            }
        }
        None
    }

    /// Marks a port as in use (a flow that already holds it).
    pub fn reserve(&mut self, addr: Addr, proto: u8, port: u16) {
        if let Some(slot) = self.slot(port) {
            self.space_mut(addr, proto).set(slot);
        }
    }

    pub fn release(&mut self, addr: Addr, proto: u8, port: u16) {
        if let (Some(slot), Some(space)) = (self.slot(port), self.spaces.get_mut(&(addr, proto))) {
            space.clear(slot);
        }
    }

    pub fn is_used(&self, addr: Addr, proto: u8, port: u16) -> bool {
        match (self.slot(port), self.spaces.get(&(addr, proto))) {
            (Some(slot), Some(space)) => space.is_set(slot),
            _ => false,
        }
    }

    /// The port bitmaps of every (address, protocol) space, as allocated (they follow the
    /// rule set: [`SnatPorts::prepare`] may replace them).
    pub fn memory_regions(&self) -> impl Iterator<Item = crate::MemoryRegion> + '_ {
        use crate::MemoryRegion;
        self.spaces.values().flat_map(|s| {
            [
                MemoryRegion::of("snat ports", &s.used),
                MemoryRegion::of("snat ports", &s.full),
            ]
        })
    }

    /// Ports of `blocks` in use on this worker for `proto`.
    pub fn used_in(&self, blocks: &[PortBlock], proto: u8) -> u32 {
        blocks
            .iter()
            .map(|b| {
                (self.addr_of(b))
                    .and_then(|a| self.spaces.get(&(a, proto)))
                    .map_or(0, |s| s.count(&self.slots(b)))
            })
            .sum()
    }

    /// Ports of `blocks` that belong to this worker.
    pub fn share_of(&self, blocks: &[PortBlock]) -> u32 {
        blocks.iter().map(|b| self.share_len(b)).sum()
    }

    /// How many ports of block `b` this worker owns.
    fn share_len(&self, b: &PortBlock) -> u32 {
        let r = self.slots(b);
        r.end.saturating_sub(r.start)
    }

    /// The slots of block `b`: the ports `first_port ≤ p < first_port + count` with
    /// `p % workers == worker`, as `p / workers`.
    fn slots(&self, b: &PortBlock) -> Range<u32> {
        if self.addr_of(b).is_none() {
            return 0..0;
        }
        let (w, n) = (u32::from(self.worker), u32::from(self.workers));
        let first = u32::from(b.first_port);
        let end = first + u32::from(b.count);
        first.saturating_sub(w).div_ceil(n)..end.saturating_sub(w).div_ceil(n)
    }

    /// The slot of `port`, if this worker owns it.
    fn slot(&self, port: u16) -> Option<u32> {
        (port % self.workers == self.worker).then_some(u32::from(port / self.workers))
    }

    fn port(&self, slot: u32) -> u16 {
        (slot * u32::from(self.workers) + u32::from(self.worker)) as u16
    }

    /// Slots of one space: this worker's ports among 0–65535.
    fn slots_per_space(&self) -> u32 {
        (65_535 - u32::from(self.worker)) / u32::from(self.workers) + 1
    }

    fn space_mut(&mut self, addr: Addr, proto: u8) -> &mut Space {
        let slots = self.slots_per_space();
        // `prepare` created every space a rule set allocates from; this only allocates for
        // callers that skipped it.
        self.spaces
            .entry((addr, proto))
            .or_insert_with(|| Space::new(slots))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::net::Ipv4Addr;

    fn addr(i: u8) -> Addr {
        Ipv4Addr::new(198, 18, 100, i).into()
    }

    fn block(first: u16, count: u16) -> PortBlock {
        PortBlock {
            addr: addr(1),
            first_port: first,
            count,
        }
    }

    #[test]
    fn a_cluster_node_allocates_only_on_its_own_addresses() {
        let mut s = SnatPorts::new(0, 1);
        let b = [
            block(1024, 8),
            PortBlock {
                addr: addr(2),
                ..block(1024, 8)
            },
        ];
        // This node's address is neither block's: both blocks' ports are taken on it, each
        // port once.
        let own = addr(9);
        s.restrict_to(Some(vec![own]));
        let mut got: Vec<u16> = (0..8)
            .map(|i| {
                let (a, p) = s.allocate(&b, 6, i * 5).unwrap();
                assert_eq!(a, own);
                p
            })
            .collect();
        got.sort();
        assert_eq!(got, (1024..1032).collect::<Vec<_>>());
        assert_eq!(
            s.allocate(&b, 6, 1),
            None,
            "none left in the range on this node"
        );
        // No address of the family: nothing.
        s.restrict_to(Some(vec!["2001:db8::9"
            .parse::<std::net::IpAddr>()
            .unwrap()
            .into()]));
        assert_eq!(s.allocate(&b, 17, 1), None);
        s.restrict_to(None);
        assert_eq!(s.allocate(&b, 6, 1).unwrap().0, addr(1));
    }

    #[test]
    fn allocates_every_port_once_then_exhausts() {
        let mut s = SnatPorts::new(0, 1);
        let b = [block(1024, 16)];
        let mut got: Vec<u16> = (0..16)
            .map(|i| s.allocate(&b, 6, i * 7).unwrap().1)
            .collect();
        got.sort();
        assert_eq!(got, (1024..1040).collect::<Vec<_>>());
        assert_eq!(s.allocate(&b, 6, 3), None);
        assert_eq!(s.used_in(&b, 6), 16);
        assert_eq!(s.used_in(&b, 17), 0, "UDP has its own port space");
        assert!(s.allocate(&b, 17, 0).is_some());
        s.release(b[0].addr, 6, 1030);
        assert_eq!(s.allocate(&b, 6, 0), Some((b[0].addr, 1030)));
    }

    #[test]
    fn workers_partition_ports_by_modulo() {
        let b = [block(1024, 8), block(2048, 8)];
        let mut all = vec![];
        for w in 0..3 {
            let mut s = SnatPorts::new(w, 3);
            while let Some((_, p)) = s.allocate(&b, 6, 0) {
                assert_eq!(SnatPorts::owner(p, 3), w);
                all.push(p);
            }
            assert_eq!(s.used_in(&b, 6), s.share_of(&b));
        }
        all.sort();
        let want: Vec<u16> = (1024..1032).chain(2048..2056).collect();
        assert_eq!(all, want);
    }

    /// The largest block (a whole address, 64 000 ports, one worker): with one free port left
    /// the search reads at most one `full` word per 4096 ports and three `used` words; with
    /// none left it fails after the `full` words alone.
    #[test]
    fn a_nearly_or_fully_exhausted_block_costs_a_few_word_reads() {
        let mut s = SnatPorts::new(0, 1);
        let b = [block(1024, 64_000)];
        for i in 0..64_000u64 {
            assert!(s.allocate(&b, 6, i).is_some());
        }
        let space = |s: &SnatPorts| s.spaces[&(addr(1), 6)].reads.replace(0);
        space(&s);
        assert_eq!(s.allocate(&b, 6, 12_345), None);
        let summary_words = 64_000usize.div_ceil(4096) + 1;
        assert!(space(&s) <= summary_words, "exhausted: {}", space(&s));
        s.release(addr(1), 6, 40_001);
        for hint in [0, 1, 39_000, 63_999] {
            assert_eq!(s.allocate(&b, 6, hint), Some((addr(1), 40_001)));
            let reads = space(&s);
            assert!(
                reads <= 2 * summary_words + 3,
                "one free port: {reads} reads"
            );
            s.release(addr(1), 6, 40_001);
        }
    }

    /// A member's ports are all taken while another member of the same address has free
    /// ones: the exhausted member fails without taking the other's.
    #[test]
    fn exhausted_member_fails_while_its_neighbour_has_ports() {
        let mut s = SnatPorts::new(0, 1);
        let (a, b) = ([block(1024, 64)], [block(1088, 64)]);
        for i in 0..64 {
            let (_, p) = s.allocate(&a, 17, i).unwrap();
            assert!((1024..1088).contains(&p));
        }
        assert_eq!(s.allocate(&a, 17, 5), None);
        assert!(s.allocate(&b, 17, 5).is_some());
        assert_eq!(s.used_in(&a, 17), 64);
        assert_eq!(s.used_in(&b, 17), 1);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Allocate { member: usize, proto: u8, hint: u64 },
        Release { pick: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..3usize, prop::sample::select(vec![6u8, 17]), any::<u64>())
                .prop_map(|(member, proto, hint)| Op::Allocate { member, proto, hint }),
            2 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        ]
    }

    /// Three members' blocks laid out on two addresses, at multiples of 8, some straddling
    /// 64-port words and an address's end, as compile lays them out.
    fn members() -> impl Strategy<Value = Vec<Vec<PortBlock>>> {
        let start = prop::sample::select(vec![1024u32, 1048, 64_600]);
        (start, prop::collection::vec((1u16..40, 0u16..4), 3)).prop_map(|(start, sizes)| {
            let mut next = (0u8, start);
            sizes
                .into_iter()
                .map(|(eighths, gap)| {
                    let mut count = u32::from(eighths) * 8;
                    next.1 += u32::from(gap) * 8;
                    let mut blocks = vec![];
                    while count > 0 {
                        let room = 65_024u32.saturating_sub(next.1);
                        if room == 0 {
                            next = (next.0 + 1, 64_800);
                            continue;
                        }
                        let take = count.min(room).min(200);
                        blocks.push(PortBlock {
                            addr: addr(next.0 + 1),
                            first_port: next.1 as u16,
                            count: take as u16,
                        });
                        next.1 += take;
                        count -= take;
                    }
                    blocks
                })
                .collect()
        })
    }

    proptest! {
        /// The allocator against a set of used ports: every port it hands out is free, in the
        /// member's blocks and in this worker's share; it refuses only when the member's whole
        /// share is in use; counts agree.
        #[test]
        fn allocator_matches_a_reference_set(
            workers in 1u16..5,
            worker_pick in 0u16..5,
            members in members(),
            ops in prop::collection::vec(op(), 1..600),
        ) {
            let worker = worker_pick % workers;
            let mut s = SnatPorts::new(worker, workers);
            let mut model: HashSet<(Addr, u8, u16)> = HashSet::new();
            let mut held: Vec<(Addr, u8, u16)> = Vec::new();
            let share = |blocks: &[PortBlock]| -> Vec<(Addr, u16)> {
                blocks
                    .iter()
                    .flat_map(|b| {
                        (u32::from(b.first_port)..u32::from(b.first_port) + u32::from(b.count))
                            .filter(|p| p % u32::from(workers) == u32::from(worker))
                            .map(move |p| (b.addr, p as u16))
                    })
                    .collect()
            };
            for op in ops {
                match op {
                    Op::Allocate { member, proto, hint } => {
                        let blocks = &members[member];
                        match s.allocate(blocks, proto, hint) {
                            Some((a, p)) => {
                                prop_assert!(
                                    blocks.iter().any(|b| a == b.addr
                                        && p >= b.first_port
                                        && u32::from(p) < u32::from(b.first_port) + u32::from(b.count)),
                                    "{a:?}:{p} not in the member's blocks"
                                );
                                prop_assert_eq!(p % workers, worker, "not this worker's port");
                                prop_assert!(model.insert((a, proto, p)), "{a:?}:{p} given twice");
                                held.push((a, proto, p));
                            }
                            None => {
                                for (a, p) in share(blocks) {
                                    prop_assert!(model.contains(&(a, proto, p)), "{a:?}:{p} was free");
                                }
                            }
                        }
                    }
                    Op::Release { pick } => {
                        if !held.is_empty() {
                            let (a, proto, p) = held.swap_remove(pick % held.len());
                            model.remove(&(a, proto, p));
                            s.release(a, proto, p);
                        }
                    }
                }
            }
            for blocks in &members {
                let ports = share(blocks);
                for proto in [6, 17] {
                    let want = ports
                        .iter()
                        .filter(|(a, p)| model.contains(&(*a, proto, *p)))
                        .count() as u32;
                    prop_assert_eq!(s.used_in(blocks, proto), want);
                }
                prop_assert_eq!(s.share_of(blocks) as usize, ports.len());
            }
            for &(a, proto, p) in &model {
                prop_assert!(s.is_used(a, proto, p));
            }
        }
    }
}
