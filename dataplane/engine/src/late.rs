//! Late-packet detection: remembers, in bounded memory, the keys of TCP flows that expired idle,
//! so that a packet arriving for one of them shortly after is counted as `late` on its rule —
//! the casualty that the silent default otherwise hides.
//!
//! A direct-mapped table of key hashes: a newer expiry overwrites an older one in the same slot,
//! so under heavy churn some late packets go uncounted; it never counts a packet that is not
//! late except on a 64-bit hash collision.

use crate::ruleset::RuleId;
use crate::time::Nanos;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    hash: u64,
    expired_at: Nanos,
    rule: RuleId,
    used: bool,
}

#[derive(Debug, Clone)]
pub struct LateTable {
    entries: Vec<Entry>,
    mask: usize,
}

impl LateTable {
    /// A table of `slots` entries (rounded up to a power of two; 24 bytes each).
    pub fn new(slots: usize) -> LateTable {
        let n = slots.max(1).next_power_of_two();
        LateTable {
            entries: vec![Entry::default(); n],
            mask: n - 1,
        }
    }

    /// Remembers that the flow key hashed as `hash` expired idle at `now`.
    pub fn record(&mut self, hash: u64, now: Nanos, rule: RuleId) {
        self.entries[hash as usize & self.mask] = Entry {
            hash,
            expired_at: now,
            rule,
            used: true,
        };
    }

    /// The rule of a flow with key hash `hash` that expired idle within `window` before `now`.
    pub fn check(&self, hash: u64, now: Nanos, window: Nanos) -> Option<RuleId> {
        let e = &self.entries[hash as usize & self.mask];
        (e.used && e.hash == hash && now.saturating_sub(e.expired_at) <= window).then_some(e.rule)
    }

    /// Forgets every entry of rule `id` (its id now belongs to another rule). A scan of the
    /// table: only done on a rule change, never per packet.
    pub fn forget_rule(&mut self, id: RuleId) {
        for e in self.entries.iter_mut().filter(|e| e.rule == id) {
            e.used = false;
        }
    }

    /// Forgets `hash` (a new flow took the key); whether an entry was forgotten.
    pub fn forget(&mut self, hash: u64) -> bool {
        let e = &mut self.entries[hash as usize & self.mask];
        let hit = e.used && e.hash == hash;
        if hit {
            e.used = false;
        }
        hit
    }

    /// Slots of the table (a power of two).
    pub fn slots(&self) -> usize {
        self.entries.len()
    }

    /// The slot that remembers `hash`.
    pub fn slot_of(&self, hash: u64) -> usize {
        hash as usize & self.mask
    }

    /// Slot `slot` as (key hash, expiry time, rule, in use), for the flow store.
    pub fn entry(&self, slot: usize) -> (u64, Nanos, RuleId, bool) {
        let e = self.entries[slot & self.mask];
        (e.hash, e.expired_at, e.rule, e.used)
    }

    /// Restores slot `slot` from the flow store. An entry whose hash does not belong in
    /// the slot is ignored.
    pub fn restore(&mut self, slot: usize, hash: u64, expired_at: Nanos, rule: RuleId) {
        if slot < self.entries.len() && self.slot_of(hash) == slot {
            self.entries[slot] = Entry {
                hash,
                expired_at,
                rule,
                used: true,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_overwrite() {
        let mut t = LateTable::new(4);
        t.record(0x10, 1_000, 3);
        assert_eq!(t.check(0x10, 1_500, 1_000), Some(3));
        assert_eq!(t.check(0x10, 2_001, 1_000), None);
        assert_eq!(t.check(0x11, 1_500, 1_000), None);
        t.record(0x14, 1_200, 4); // same slot
        assert_eq!(t.check(0x10, 1_500, 1_000), None);
        t.forget(0x14);
        assert_eq!(t.check(0x14, 1_300, 1_000), None);
    }
}
