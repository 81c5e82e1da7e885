//! Short names for the addresses of the configuration, so that a flow record fits one cache
//! line.
//!
//! Of a flow's three addresses, only one comes from the outside (the client of an inbound
//! flow, the remote server of an outbound one); the other two are addresses of the
//! configuration: a frontend and a member, or a member and an SNAT address. A worker's table
//! names those by a 16-bit id from this table instead of storing them (4 bytes instead of
//! 32 per flow). An id is counted once per flow that holds it and is given back when the
//! last of them ends, so a rule change that removes an address frees its id only once the
//! flows still using it have ended.
//!
//! The hot path never allocates here: [`AddrIds::reserve`] is called on the control path
//! whenever rules change, with room for every address of the new rules, and a new flow only
//! takes an id for one of those.

use std::collections::HashMap;

use crate::addr::Addr;
use crate::select::FastBuild;

/// An address's id in a worker's [`AddrIds`].
pub type AddrId = u16;

/// Distinct addresses one table can name at once.
pub const MAX_ADDRS: usize = AddrId::MAX as usize + 1;

/// Slots of the recently-taken cache (a power of two).
const RECENT: usize = 64;

#[derive(Debug, Clone)]
pub struct AddrIds {
    /// By a hash of the address: the id it last got. New flows name the same few frontends,
    /// members and SNAT addresses over and over, and a hit here skips the map (a third of
    /// the cost of a new flow's two ids). An entry checks itself: it counts only while its id
    /// still names that address and is held, so nothing has to clear it when an id is freed
    /// or reused.
    recent: [AddrId; RECENT],
    /// By id; an id given back keeps its last address until it is reused.
    addrs: Vec<Addr>,
    /// By id: the flows holding it (a flow whose two addresses are equal counts twice).
    holders: Vec<u32>,
    by_addr: HashMap<Addr, AddrId, FastBuild>,
    /// Ids given back, reused first.
    free: Vec<AddrId>,
}

impl Default for AddrIds {
    fn default() -> AddrIds {
        AddrIds {
            recent: [0; RECENT],
            addrs: Vec::new(),
            holders: Vec::new(),
            by_addr: HashMap::default(),
            free: Vec::new(),
        }
    }
}

/// `addr`'s slot in [`AddrIds::recent`].
#[inline]
fn recent_slot(addr: Addr) -> usize {
    let folded = (addr.0 as u64) ^ ((addr.0 >> 64) as u64);
    (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - RECENT.trailing_zeros())) as usize
}

impl AddrIds {
    pub fn new() -> AddrIds {
        AddrIds::default()
    }

    /// Makes room for `more` addresses beyond those held now, so that taking ids for them
    /// does not allocate (capped at [`MAX_ADDRS`] in all).
    pub fn reserve(&mut self, more: usize) {
        let more = more.min(MAX_ADDRS.saturating_sub(self.by_addr.len()));
        // Twice the room: ids given back leave tombstones in the map, and a map at most half
        // full clears them by rehashing in place instead of growing.
        self.by_addr.reserve(2 * more);
        let slots = (self.by_addr.len() + more).saturating_sub(self.addrs.len());
        self.addrs.reserve(slots);
        self.holders.reserve(slots);
        // Every id can be given back at once without the list growing.
        self.free
            .reserve(self.addrs.capacity().saturating_sub(self.free.len()));
    }

    /// One more holder of `addr`'s id, taking a new id if no flow holds it; `None` when all
    /// [`MAX_ADDRS`] ids are held.
    #[inline]
    pub fn take(&mut self, addr: Addr) -> Option<AddrId> {
        let slot = recent_slot(addr);
        let recent = usize::from(self.recent[slot]);
        if self.addrs.get(recent) == Some(&addr) && self.holders[recent] > 0 {
            self.holders[recent] += 1;
            return Some(self.recent[slot]);
        }
        if let Some(&id) = self.by_addr.get(&addr) {
            self.holders[usize::from(id)] += 1;
            self.recent[slot] = id;
            return Some(id);
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.addrs[usize::from(id)] = addr;
                self.holders[usize::from(id)] = 1;
                id
            }
            None if self.addrs.len() < MAX_ADDRS => {
                self.addrs.push(addr);
                self.holders.push(1);
                (self.addrs.len() - 1) as AddrId
            }
            None => return None,
        };
        self.by_addr.insert(addr, id);
        self.recent[slot] = id;
        Some(id)
    }

    /// One holder fewer of `id`; the id is free once none is left.
    #[inline]
    pub fn give_back(&mut self, id: AddrId) {
        let n = &mut self.holders[usize::from(id)];
        debug_assert!(*n > 0, "address id {id} given back more often than taken");
        *n -= 1;
        if *n == 0 {
            self.by_addr.remove(&self.addrs[usize::from(id)]);
            self.free.push(id);
        }
    }

    /// The address named `id`.
    #[inline]
    pub fn addr(&self, id: AddrId) -> Addr {
        self.addrs[usize::from(id)]
    }

    /// Addresses named now.
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// Bytes allocated: addresses, holder counts, the lookup map, the free list and the
    /// recently-taken cache.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(&self.recent)
            + self.addrs.capacity() * std::mem::size_of::<Addr>()
            + self.holders.capacity() * 4
            + self.free.capacity() * std::mem::size_of::<AddrId>()
            // hashbrown: key, value and one control byte per bucket, buckets ≥ 8/7 × capacity.
            + self.by_addr.capacity() * 8 / 7
                * (std::mem::size_of::<(Addr, AddrId)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn a(n: u32) -> Addr {
        Ipv4Addr::from(0xc612_0000 | n).into()
    }

    #[test]
    fn ids_are_shared_counted_and_reused() {
        let mut t = AddrIds::new();
        let x = t.take(a(1)).unwrap();
        let y = t.take(a(2)).unwrap();
        assert_ne!(x, y);
        assert_eq!(t.take(a(1)), Some(x));
        assert_eq!((t.addr(x), t.addr(y), t.len()), (a(1), a(2), 2));
        t.give_back(x);
        assert_eq!(t.addr(x), a(1), "still held once");
        t.give_back(x);
        assert_eq!(t.len(), 1);
        let z = t.take(a(3)).unwrap();
        assert_eq!(z, x, "a freed id is reused");
        assert_eq!(t.addr(z), a(3));
        assert_eq!(t.take(a(1)).map(|id| t.addr(id)), Some(a(1)));
    }

    #[test]
    fn a_cached_id_is_not_used_once_freed_or_reused() {
        let mut t = AddrIds::new();
        let x = t.take(a(1)).unwrap();
        assert_eq!(t.take(a(1)), Some(x), "a hit in the cache");
        t.give_back(x);
        t.give_back(x);
        // The cache still names x for a(1); x is free now, then reused by another address.
        let y = t.take(a(2)).unwrap();
        assert_eq!(y, x);
        let z = t.take(a(1)).unwrap();
        assert_ne!(z, y, "a(1) gets an id of its own, not a(2)'s");
        assert_eq!((t.addr(y), t.addr(z)), (a(2), a(1)));
        t.give_back(z);
        assert_eq!(t.len(), 1);
        // Freed and not reused: the cache must not revive it without the map.
        let w = t.take(a(1)).unwrap();
        assert_eq!(t.addr(w), a(1));
        assert_eq!(t.len(), 2);
        t.give_back(w);
        assert_eq!(t.len(), 1, "held once, given back once");
    }

    #[test]
    fn cache_collisions_still_find_every_address() {
        let mut t = AddrIds::new();
        // More addresses than cache slots: many share a slot.
        let ids: Vec<_> = (0..1000).map(|n| t.take(a(n)).unwrap()).collect();
        for round in 0..3 {
            for (n, &id) in ids.iter().enumerate() {
                assert_eq!(t.take(a(n as u32)), Some(id), "round {round}");
            }
        }
        for (n, &id) in ids.iter().enumerate() {
            for _ in 0..4 {
                t.give_back(id);
            }
            assert_eq!(t.len(), 1000 - n - 1);
        }
    }

    #[test]
    fn every_id_can_be_held_then_none() {
        let mut t = AddrIds::new();
        t.reserve(MAX_ADDRS);
        for n in 0..MAX_ADDRS as u32 {
            assert!(t.take(a(n)).is_some());
        }
        assert_eq!(t.take(a(MAX_ADDRS as u32)), None);
        assert!(t.take(a(7)).is_some(), "an address already named is shared");
        let id = t.take(a(9)).unwrap();
        t.give_back(id);
        t.give_back(id);
        assert_eq!(t.take(a(MAX_ADDRS as u32)), Some(id));
    }

    #[test]
    fn reserved_room_is_used_without_growing() {
        let mut t = AddrIds::new();
        t.reserve(100);
        let before = t.memory_bytes();
        let ids: Vec<_> = (0..100).map(|n| t.take(a(n)).unwrap()).collect();
        for id in ids {
            t.give_back(id);
        }
        for n in 100..200 {
            t.take(a(n)).unwrap();
        }
        assert_eq!(t.memory_bytes(), before);
    }
}
