//! Backend selection: the flow hash and the weighted Maglev tables behind
//! [`crate::RuleSet::select_backend`], and the hasher of the rule set's lookup maps.
//!
//! Why Maglev: a flow keeps its backend for life, so the table only matters for new flows and
//! for `pickup` of flows the appliance forgot. Maglev gives near-perfect balance (each member
//! owns a share of slots proportional to its weight, ±1 slot) and, when one member goes down
//! or comes back, moves only about that member's share of the tuples, so `pickup` after a
//! health change still finds most connections where they were.
//!
//! Table size (a prime, so every member's probe sequence visits every slot): 4,099 slots
//! (8 KiB) when the pool's total weight is at most 40 times its lightest member's weight (so
//! that member still owns ~100 slots), else 65,537 (128 KiB). The size depends only on the
//! configured members and weights, never on health, so that a health change keeps the
//! table's geometry and Maglev's minimal disruption holds. A member whose weight is below
//! about 1/65,537 of the pool's total may own no slot at all. Tables are shared by every rule
//! on the same pool and reused across compiles when nothing they depend on changed.

use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use crate::addr::Addr;
use crate::terms::{Distribution, FlowTuple};

/// Slots of a small table (prime).
pub const MAGLEV_SMALL: usize = 4_099;
/// Slots of a large table (prime, 2^16 + 1).
pub const MAGLEV_LARGE: usize = 65_537;

const SEED: u64 = 0x243F_6A88_85A3_08D3;
const MUL: u64 = 0x9E37_79B9_7F4A_7C15;
const SEED_OFFSET: u64 = 0x1319_8A2E_0370_7344;
const SEED_SKIP: u64 = 0xA409_3822_299F_31D0;

/// 64×64→128 multiply folded to 64 bits (the wyhash/foldhash round): one multiply that
/// spreads every input bit over the whole word.
/// Shared by every keyed hash of the engine (`hashkey`, the fast path's table).
#[inline(always)]
pub(crate) const fn fold_mul(a: u64, b: u64) -> u64 {
    let p = (a as u128) * (b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

/// MurmurHash3's 64-bit finalizer: full avalanche, so both the high bits (used by
/// [`reduce`]) and the low bits (used by hash maps) are well mixed.
#[inline(always)]
pub const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

#[inline(always)]
const fn absorb(state: u64, word: u64) -> u64 {
    fold_mul(state ^ word, MUL)
}

/// The hash of a tuple under a distribution mode. Fixed (no per-process random seed) so
/// that every worker, and every restart, maps a tuple to the same slot.
#[inline]
pub fn flow_hash(distribution: Distribution, t: &FlowTuple) -> u64 {
    let mut h = SEED;
    h = absorb(h, t.src.0 as u64);
    h = absorb(h, (t.src.0 >> 64) as u64);
    h = absorb(h, t.dst.0 as u64);
    h = absorb(h, (t.dst.0 >> 64) as u64);
    match distribution {
        Distribution::FiveTuple => {
            let ports =
                u64::from(t.proto) << 32 | u64::from(t.src_port) << 16 | u64::from(t.dst_port);
            h = absorb(h, ports);
        }
        Distribution::SourceIp => {}
        Distribution::SourceIpProtocol => h = absorb(h, u64::from(t.proto) << 32),
    }
    fmix64(h)
}

/// Maps a 64-bit hash onto `0..n` with a multiply instead of a division (Lemire's reduction).
#[inline(always)]
pub const fn reduce(h: u64, n: usize) -> usize {
    ((h as u128 * n as u128) >> 64) as usize
}

fn addr_hash(addr: Addr, seed: u64) -> u64 {
    fmix64(absorb(absorb(seed, addr.0 as u64), (addr.0 >> 64) as u64))
}

/// The hasher of the rule set's maps. SipHash (std's default) resists collision flooding of
/// maps that attackers insert into; these maps are filled from the configuration only, and
/// are probed per packet, so a fast fixed mixer is the better trade.
#[derive(Clone, Copy, Debug)]
pub struct FastHasher(u64);

impl Default for FastHasher {
    fn default() -> FastHasher {
        FastHasher(SEED)
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 = absorb(self.0, u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.0 = absorb(self.0, u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.0 = absorb(self.0, u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = absorb(self.0, u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = absorb(self.0, i);
    }
    fn write_u128(&mut self, i: u128) {
        self.0 = absorb(absorb(self.0, i as u64), (i >> 64) as u64);
    }
    fn write_usize(&mut self, i: usize) {
        self.0 = absorb(self.0, i as u64);
    }
    fn finish(&self) -> u64 {
        fmix64(self.0)
    }
}

pub type FastBuild = BuildHasherDefault<FastHasher>;

/// One pool member as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableInput {
    pub addr: Addr,
    pub weight: u32,
    pub healthy: bool,
}

/// A pool's precomputed weighted Maglev table.
pub struct PoolTable {
    /// Every configured member, in configuration order.
    pub(crate) members: Box<[Addr]>,
    /// Slot → index into `members`; empty when no member is healthy.
    pub(crate) table: Box<[u16]>,
    /// What the table was built from, so a later compile can reuse it.
    pub(crate) inputs: Box<[TableInput]>,
    /// Members that may get new flows.
    pub(crate) eligible: HashSet<Addr, FastBuild>,
    /// Members that are down (probe or admin state), for moving UDP flows off them.
    pub(crate) down: HashSet<Addr, FastBuild>,
}

impl fmt::Debug for PoolTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The table itself is up to 65,537 entries: summarise it.
        f.debug_struct("PoolTable")
            .field("members", &self.members)
            .field("slots", &self.table.len())
            .finish()
    }
}

/// The table size for a pool (see the module notes).
pub fn table_size(inputs: &[TableInput]) -> usize {
    let min = inputs.iter().map(|m| u64::from(m.weight.max(1))).min();
    let total: u64 = inputs.iter().map(|m| u64::from(m.weight.max(1))).sum();
    match min {
        Some(min) if total <= 40 * min => MAGLEV_SMALL,
        _ => MAGLEV_LARGE,
    }
}

impl PoolTable {
    /// Builds the table. Members beyond `u16::MAX` cannot be indexed; validation caps pools
    /// below that.
    pub fn build(inputs: &[TableInput]) -> PoolTable {
        let members: Box<[Addr]> = inputs.iter().map(|m| m.addr).collect();
        let table = maglev(inputs, table_size(inputs));
        let eligible = inputs
            .iter()
            .filter(|m| m.healthy && m.weight > 0)
            .map(|m| m.addr)
            .collect();
        let down = inputs
            .iter()
            .filter(|m| !m.healthy)
            .map(|m| m.addr)
            .collect();
        PoolTable {
            members,
            table,
            inputs: inputs.into(),
            eligible,
            down,
        }
    }

    /// How many slots each member owns (index = member order), for tests and diagnostics.
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.members.len()];
        for &m in self.table.iter() {
            counts[usize::from(m)] += 1;
        }
        counts
    }
}

/// Weighted Maglev population. Each round, every healthy member earns its weight in credit
/// and claims one slot per `max_weight` of credit, so slot counts end up proportional to
/// weight while claims stay interleaved, which is what keeps disruption minimal.
fn maglev(inputs: &[TableInput], m: usize) -> Box<[u16]> {
    const EMPTY: u16 = u16::MAX;
    struct Cursor {
        member: u16,
        weight: u64,
        credit: u64,
        pos: usize,
        skip: usize,
    }
    let mut cursors: Vec<Cursor> = inputs
        .iter()
        .enumerate()
        .filter(|(i, x)| x.healthy && x.weight > 0 && *i < usize::from(EMPTY))
        .map(|(i, x)| Cursor {
            member: i as u16,
            weight: u64::from(x.weight),
            credit: 0,
            pos: reduce(addr_hash(x.addr, SEED_OFFSET), m),
            skip: 1 + reduce(addr_hash(x.addr, SEED_SKIP), m - 1),
        })
        .collect();
    let Some(max_weight) = cursors.iter().map(|c| c.weight).max() else {
        return Box::new([]);
    };
    let mut table = vec![EMPTY; m];
    let mut filled = 0;
    while filled < m {
        for c in cursors.iter_mut() {
            c.credit += c.weight;
            if c.credit < max_weight {
                continue;
            }
            c.credit -= max_weight;
            // `m` is prime and 0 < skip < m, so this walk visits every slot: it ends.
            while table[c.pos] != EMPTY {
                c.pos += c.skip;
                if c.pos >= m {
                    c.pos -= m;
                }
            }
            table[c.pos] = c.member;
            filled += 1;
            if filled == m {
                break;
            }
        }
    }
    table.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_prime(n: usize) -> bool {
        n > 1 && (2..).take_while(|i| i * i <= n).all(|i| n % i != 0)
    }

    fn member(i: u8, weight: u32, healthy: bool) -> TableInput {
        TableInput {
            addr: Addr::from_v4_bytes([10, 0, 0, i]),
            weight,
            healthy,
        }
    }

    #[test]
    fn table_sizes_are_prime() {
        assert!(is_prime(MAGLEV_SMALL));
        assert!(is_prime(MAGLEV_LARGE));
    }

    #[test]
    fn size_depends_on_weight_spread_not_health() {
        let small: Vec<_> = (1..=40).map(|i| member(i, 1, true)).collect();
        assert_eq!(table_size(&small), MAGLEV_SMALL);
        let mut big = small.clone();
        big.push(member(41, 1, true));
        assert_eq!(table_size(&big), MAGLEV_LARGE);
        let skewed = [member(1, 1, true), member(2, 100, true)];
        assert_eq!(table_size(&skewed), MAGLEV_LARGE);
        let down: Vec<_> = (1..=40).map(|i| member(i, 1, i % 2 == 0)).collect();
        assert_eq!(table_size(&down), MAGLEV_SMALL);
    }

    #[test]
    fn equal_weights_own_equal_slots() {
        let t = PoolTable::build(&(1..=7).map(|i| member(i, 1, true)).collect::<Vec<_>>());
        let counts = t.slot_counts();
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1, "{counts:?}");
    }

    #[test]
    fn slots_follow_weights() {
        let t = PoolTable::build(&[member(1, 1, true), member(2, 3, true)]);
        let c = t.slot_counts();
        assert_eq!(c[0] + c[1], MAGLEV_SMALL);
        let ratio = c[1] as f64 / c[0] as f64;
        assert!((ratio - 3.0).abs() < 0.01, "{c:?}");
    }

    #[test]
    fn unhealthy_members_own_nothing() {
        let t = PoolTable::build(&[member(1, 1, true), member(2, 1, false), member(3, 1, true)]);
        assert_eq!(t.slot_counts()[1], 0);
        let none = PoolTable::build(&[member(1, 1, false)]);
        assert!(none.table.is_empty());
    }

    #[test]
    fn one_member_down_moves_little() {
        let all: Vec<_> = (1..=10).map(|i| member(i, 1, true)).collect();
        let mut one_down = all.clone();
        one_down[3].healthy = false;
        let (a, b) = (PoolTable::build(&all), PoolTable::build(&one_down));
        let moved = a
            .table
            .iter()
            .zip(b.table.iter())
            .filter(|(x, y)| x != y && **x != 3)
            .count();
        // Only member 3's slots must move; Maglev moves a few others, far from a reshuffle.
        assert!(moved < MAGLEV_SMALL / 20, "moved {moved}");
    }

    #[test]
    fn hasher_spreads_low_and_high_bits() {
        let mut lows = std::collections::HashSet::new();
        let mut highs = std::collections::HashSet::new();
        for i in 0..256u64 {
            let mut h = FastHasher::default();
            h.write_u64(i);
            lows.insert(h.finish() & 0xff);
            highs.insert(h.finish() >> 56);
        }
        assert!(lows.len() > 140 && highs.len() > 140);
    }
}
