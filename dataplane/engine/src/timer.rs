//! Hierarchical timing wheel for idle expiry (after tokio's wheel:
//! 6 levels × 64 slots, O(1) insert / remove / advance with bit tricks).
//!
//! The wheel stores no deadlines. A slot *fires* at its start time and hands every entry in it
//! to the caller, who re-checks the entry's real deadline (`last_seen + timeout`, where the
//! timeout is read from the rule *now*) and either expires it or inserts it again. This is the
//! lazy re-check that keeps the per-packet path to one store (`last_seen`): a packet never
//! touches the wheel, and a rule's new timeout applies at the next check. An entry that fired
//! early (a higher-level slot covers a range of ticks) is simply reinserted at a lower level,
//! which is the cascade.
//!
//! Timing guarantees, with `tick = 2^tick_shift` ns and deadlines rounded *up* to a tick:
//! never early (an entry is handed out only once `now >= deadline` rounded up), and at most one
//! tick late when [`TimerWheel::poll`] is called at least once per tick with enough budget.
//!
//! Entries are `u32` ids (the flow slot index) below [`MAX_IDS`]. Links are two 24-bit fields
//! per id (6 bytes): a list head stores `HEAD | slot` in `prev`, so removal needs no slot field.

use crate::time::Nanos;

const LEVELS: usize = 6;
const SLOTS: usize = 64;
/// The list of entries taken out of fired slots, waiting for the caller.
const DUE_SLOT: u32 = (LEVELS * SLOTS) as u32;
const NIL: u32 = U24::MAX;
/// Flags a `prev` that names a slot (the entry heads that slot's list) rather than an id.
const HEAD: u32 = 0x80_0000;
/// Ids the packed 24-bit links can name (`0..MAX_IDS`: below the `HEAD` flag, never `NIL`).
pub const MAX_IDS: u32 = (1 << 23) - 1;
// Ids, slot references and NIL never collide in a 24-bit field.
const _: () = assert!(MAX_IDS <= HEAD && HEAD | DUE_SLOT < NIL);
/// Deadlines further out than this many ticks are filed in the top level, which then acts as a
/// ring (they fire early and are reinserted).
const MAX_TICKS: u64 = 1 << (6 * LEVELS);

/// A 24-bit value in 3 bytes (alignment 1), so that arrays of links carry no padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct U24([u8; 3]);

impl U24 {
    pub(crate) const MAX: u32 = 0xFF_FFFF;

    /// `value` must be at most [`U24::MAX`] (its high byte is dropped).
    #[inline]
    pub(crate) const fn new(value: u32) -> U24 {
        debug_assert!(value <= U24::MAX);
        let b = value.to_le_bytes();
        U24([b[0], b[1], b[2]])
    }

    #[inline]
    pub(crate) const fn get(self) -> u32 {
        u32::from_le_bytes([self.0[0], self.0[1], self.0[2], 0])
    }
}

#[derive(Clone, Copy, Debug)]
struct Link {
    prev: U24,
    next: U24,
}

impl Link {
    #[inline]
    fn prev(self) -> u32 {
        self.prev.get()
    }

    #[inline]
    fn next(self) -> u32 {
        self.next.get()
    }
}

const UNLINKED: Link = Link {
    prev: U24::new(NIL),
    next: U24::new(NIL),
};

/// A timing wheel over ids `0..capacity`.
#[derive(Debug, Clone)]
pub struct TimerWheel {
    tick_shift: u32,
    /// Ticks up to which every slot has fired.
    elapsed: u64,
    occupied: [u64; LEVELS],
    /// `LEVELS * SLOTS` slot heads, then the due list head.
    heads: Vec<u32>,
    links: Vec<Link>,
    len: usize,
}

impl TimerWheel {
    /// A wheel for ids below `capacity` (at most [`MAX_IDS`]) with a tick of `2^tick_shift`
    /// nanoseconds, whose time line starts at `now`.
    pub fn new(capacity: u32, tick_shift: u32, now: Nanos) -> TimerWheel {
        assert!(
            capacity <= MAX_IDS,
            "timer wheel capacity {capacity} exceeds {MAX_IDS} ids (24-bit links)"
        );
        TimerWheel {
            tick_shift,
            elapsed: now >> tick_shift,
            occupied: [0; LEVELS],
            heads: vec![NIL; LEVELS * SLOTS + 1],
            links: vec![UNLINKED; capacity as usize],
            len: 0,
        }
    }

    /// Bytes of links and slot heads (6 per id).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(self.links.as_slice()) + std::mem::size_of_val(self.heads.as_slice())
    }

    /// The links (one per id), as allocated.
    pub fn memory_regions(&self) -> [crate::MemoryRegion; 1] {
        [crate::MemoryRegion::of("timer links", &self.links)]
    }

    pub fn tick(&self) -> Nanos {
        1 << self.tick_shift
    }

    /// Number of scheduled ids (including those handed to the due list).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_scheduled(&self, id: u32) -> bool {
        self.links[id as usize].prev() != NIL
    }

    /// Schedules `id` to be handed out at `deadline` (or a little earlier for far deadlines, see
    /// the module doc). Reschedules it if it was scheduled.
    pub fn insert(&mut self, id: u32, deadline: Nanos) {
        if self.is_scheduled(id) {
            self.unlink(id);
        } else {
            self.len += 1;
        }
        // Round up so that an entry is never handed out before its deadline.
        let when = deadline.div_ceil(1 << self.tick_shift);
        let slot = if when <= self.elapsed {
            DUE_SLOT
        } else {
            let level = level_for(self.elapsed, when);
            let slot = ((when >> (6 * level)) as usize) % SLOTS;
            self.occupied[level] |= 1 << slot;
            (level * SLOTS + slot) as u32
        };
        self.push(slot, id);
    }

    /// Unschedules `id` (no-op if it is not scheduled).
    pub fn remove(&mut self, id: u32) {
        if self.is_scheduled(id) {
            self.unlink(id);
            self.links[id as usize] = UNLINKED;
            self.len -= 1;
        }
    }

    /// The earliest time at which [`TimerWheel::poll`] may hand out an entry, or `None` when the
    /// wheel is empty. Entries already due report the wheel's current time.
    pub fn next_deadline(&self) -> Option<Nanos> {
        if self.heads[DUE_SLOT as usize] != NIL {
            return Some(self.elapsed << self.tick_shift);
        }
        self.next_expiration()
            .map(|(_, deadline)| deadline << self.tick_shift)
    }

    /// Hands out one entry whose slot has fired by `now`, unscheduling it, or returns `None` when
    /// nothing is due. The caller re-checks the entry and may [`insert`](Self::insert) it again.
    /// Call repeatedly (with a budget) to drain everything due.
    pub fn poll(&mut self, now: Nanos) -> Option<u32> {
        let now_tick = now >> self.tick_shift;
        loop {
            let due = self.heads[DUE_SLOT as usize];
            if due != NIL {
                self.remove(due);
                return Some(due);
            }
            match self.next_expiration() {
                Some((slot, deadline)) if deadline <= now_tick => {
                    self.elapsed = deadline;
                    self.fire(slot);
                }
                _ => {
                    if now_tick > self.elapsed {
                        self.elapsed = now_tick;
                    }
                    return None;
                }
            }
        }
    }

    /// Moves every entry of `slot` to the due list.
    fn fire(&mut self, slot: usize) {
        let (level, index) = (slot / SLOTS, slot % SLOTS);
        self.occupied[level] &= !(1 << index);
        let mut id = self.heads[slot];
        self.heads[slot] = NIL;
        while id != NIL {
            let next = self.links[id as usize].next();
            self.push(DUE_SLOT, id);
            id = next;
        }
    }

    /// The first occupied slot and its start tick.
    fn next_expiration(&self) -> Option<(usize, u64)> {
        // A lower level's slots always start before any higher level's occupied slot: entries
        // are filed by the highest bit in which their deadline differs from `elapsed`.
        for level in 0..LEVELS {
            let occupied = self.occupied[level];
            if occupied == 0 {
                continue;
            }
            let slot_range = 1u64 << (6 * level);
            let level_range = slot_range << 6;
            let now_slot = ((self.elapsed / slot_range) % SLOTS as u64) as u32;
            let slot =
                (occupied.rotate_right(now_slot).trailing_zeros() + now_slot) as usize % SLOTS;
            let level_start = self.elapsed & !(level_range - 1);
            let mut deadline = level_start + slot as u64 * slot_range;
            if deadline <= self.elapsed {
                // Only the top level wraps: a slot "behind" now is in the next rotation.
                deadline += level_range;
            }
            return Some((level * SLOTS + slot, deadline));
        }
        None
    }

    fn push(&mut self, slot: u32, id: u32) {
        let head = self.heads[slot as usize];
        if head != NIL {
            self.links[head as usize].prev = U24::new(id);
        }
        self.links[id as usize] = Link {
            prev: U24::new(HEAD | slot),
            next: U24::new(head),
        };
        self.heads[slot as usize] = id;
    }

    fn unlink(&mut self, id: u32) {
        let link = self.links[id as usize];
        let (prev, next) = (link.prev(), link.next());
        if next != NIL {
            self.links[next as usize].prev = link.prev;
        }
        if prev & HEAD != 0 {
            let slot = prev & !HEAD;
            self.heads[slot as usize] = next;
            if next == NIL && slot != DUE_SLOT {
                let (level, index) = (slot as usize / SLOTS, slot as usize % SLOTS);
                self.occupied[level] &= !(1 << index);
            }
        } else {
            self.links[prev as usize].next = link.next;
        }
    }
}

/// The level an entry due at `when` belongs to, seen from `elapsed`.
fn level_for(elapsed: u64, when: u64) -> usize {
    let mut masked = (elapsed ^ when) | (SLOTS as u64 - 1);
    if masked >= MAX_TICKS {
        masked = MAX_TICKS - 1;
    }
    let significant = 63 - masked.leading_zeros() as usize;
    significant / 6
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const SHIFT: u32 = 20; // ~1.05 ms ticks
    const TICK: u64 = 1 << SHIFT;

    fn drain(w: &mut TimerWheel, now: Nanos) -> Vec<u32> {
        let mut out = vec![];
        while let Some(id) = w.poll(now) {
            out.push(id);
        }
        out
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = TimerWheel::new(8, SHIFT, 0);
        w.insert(3, 10 * TICK);
        assert_eq!(w.next_deadline(), Some(10 * TICK));
        assert!(drain(&mut w, 10 * TICK - 1).is_empty());
        assert_eq!(drain(&mut w, 10 * TICK), vec![3]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn deadline_between_ticks_rounds_up() {
        let mut w = TimerWheel::new(8, SHIFT, 0);
        w.insert(1, 5 * TICK + 1);
        assert!(drain(&mut w, 5 * TICK + 1).is_empty(), "early");
        assert_eq!(drain(&mut w, 6 * TICK), vec![1]);
    }

    #[test]
    fn far_deadline_fires_early_for_recheck_and_cascades() {
        // A 4-minute timeout lands in a high level: its slot fires at the slot start, the caller
        // re-inserts it and it then fires exactly at its tick.
        let mut w = TimerWheel::new(8, SHIFT, 0);
        let deadline = 240 * 1_000_000_000u64;
        w.insert(7, deadline);
        let mut now = 0;
        let mut fired_at = None;
        while fired_at.is_none() {
            let next = w.next_deadline().unwrap();
            assert!(next >= now);
            now = next;
            if let Some(id) = w.poll(now) {
                assert_eq!(id, 7);
                if now >= deadline {
                    fired_at = Some(now);
                } else {
                    w.insert(7, deadline);
                }
            }
        }
        let fired_at = fired_at.unwrap();
        assert!(fired_at >= deadline && fired_at < deadline + TICK);
    }

    #[test]
    fn remove_and_reinsert() {
        let mut w = TimerWheel::new(8, SHIFT, 0);
        w.insert(1, 100 * TICK);
        w.insert(2, 100 * TICK);
        w.insert(3, 100 * TICK);
        w.remove(2);
        assert_eq!(w.len(), 2);
        w.insert(1, 300 * TICK); // reschedule moves it
        assert_eq!(w.len(), 2);
        let mut got = drain(&mut w, 100 * TICK);
        got.sort();
        // Slot-level firing may hand out 1 early (same top slot); the caller re-checks. Only
        // entry 3 is really due.
        assert!(got.contains(&3) && !got.contains(&2));
    }

    #[test]
    fn past_deadline_is_due_immediately() {
        let mut w = TimerWheel::new(8, SHIFT, 1000 * TICK);
        w.insert(4, 10 * TICK);
        assert_eq!(w.next_deadline(), Some(1000 * TICK));
        assert_eq!(drain(&mut w, 1000 * TICK), vec![4]);
    }

    /// Differential test against a BTreeMap: random inserts, removes and time jumps. Entries
    /// that fire before their deadline are reinserted (as the engine does). Checks: never handed
    /// out early once re-checked, everything due by `now` is handed out by `poll(now)`, and an
    /// entry is always handed out within one tick of its deadline when polled every tick.
    #[test]
    fn matches_reference_model() {
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for start in [0u64, (1u64 << 36) * TICK - 5000 * TICK] {
            let mut w = TimerWheel::new(256, SHIFT, start);
            let mut model: BTreeMap<u32, u64> = BTreeMap::new();
            let mut now = start;
            for _ in 0..20_000 {
                match next() % 10 {
                    0..=4 => {
                        let id = (next() % 256) as u32;
                        let range = [50u64, 5_000, 400_000, 10_000_000][(next() % 4) as usize];
                        let d = now + (next() % range) * (TICK / 3);
                        w.insert(id, d);
                        model.insert(id, d);
                    }
                    5 => {
                        let id = (next() % 256) as u32;
                        w.remove(id);
                        model.remove(&id);
                    }
                    _ => {
                        now += (next() % 3) * TICK;
                        if next() % 50 == 0 {
                            now += (next() % 1_000_000) * TICK;
                        }
                        // Poll the way the engine does: re-check and reinsert early entries.
                        while let Some(id) = w.poll(now) {
                            let d = model[&id];
                            if d > now {
                                w.insert(id, d);
                            } else {
                                model.remove(&id);
                            }
                        }
                        let tick_now = now - now % TICK;
                        for (&id, &d) in &model {
                            assert!(d > tick_now, "id {id} due at {d} left behind at {now}");
                        }
                        assert_eq!(w.len(), model.len());
                    }
                }
            }
        }
    }

    #[test]
    fn links_are_six_bytes_without_padding() {
        assert_eq!(std::mem::size_of::<U24>(), 3);
        assert_eq!(std::mem::size_of::<Link>(), 6);
        assert_eq!(std::mem::align_of::<Link>(), 1);
        for v in [0, 1, 0x12_3456, MAX_IDS - 1, HEAD, HEAD | DUE_SLOT, NIL] {
            assert_eq!(U24::new(v).get(), v);
        }
    }

    #[test]
    #[should_panic(expected = "exceeds 8388607 ids")]
    fn capacity_beyond_the_links_is_refused() {
        TimerWheel::new(MAX_IDS + 1, SHIFT, 0);
    }

    /// The highest ids go through every link operation: shared slots (fire walks `next`),
    /// the due list, removal from the middle and the head of a list, rescheduling.
    #[test]
    fn highest_ids_insert_remove_and_fire() {
        let mut w = TimerWheel::new(MAX_IDS, SHIFT, 0);
        let top = MAX_IDS - 1;
        for id in [top, 0, top - 1, top - 2] {
            w.insert(id, 10 * TICK);
        }
        w.insert(top - 3, 20 * TICK);
        assert!(w.is_scheduled(top) && !w.is_scheduled(top - 4));
        w.remove(top - 1); // middle of the slot's list
        w.remove(top - 2); // its head
        assert!(!w.is_scheduled(top - 1) && !w.is_scheduled(top - 2));
        w.insert(top - 1, 10 * TICK);
        w.insert(top, 20 * TICK); // rescheduled to the other slot
        assert_eq!(w.len(), 4);
        let mut got = drain(&mut w, 10 * TICK);
        got.sort();
        assert_eq!(got, vec![0, top - 1]);
        let mut got = drain(&mut w, 20 * TICK);
        got.sort();
        assert_eq!(got, vec![top - 3, top]);
        assert!(w.is_empty() && !w.is_scheduled(top));
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn next_deadline_is_never_late() {
        let mut w = TimerWheel::new(4, SHIFT, 0);
        w.insert(0, 5_000 * TICK);
        w.insert(1, 70 * TICK);
        let nd = w.next_deadline().unwrap();
        assert!(nd <= 70 * TICK);
    }
}
