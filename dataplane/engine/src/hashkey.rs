//! Keyed hashes of packet tuples and endpoints: the flow index's hash and the steering hash
//! that picks the worker of a flow.
//!
//! Whoever can compute a hash can choose inputs that all land in one index bucket (long probe
//! sequences on every lookup) or on one worker (one core does the work of all). Both hashes
//! are therefore keyed with 256 bits derived from a seed the daemon draws at random at start.
//!
//! XOR-ing a key into a hash whose input words were first combined linearly does not help:
//! inputs whose linear combination is equal collide under every key (for IPv6, whose 128
//! source bits an attacker chooses freely, that is a class of 2^64 addresses per value). Here
//! every 64-bit input word meets key material in a *folded multiply* (the 128-bit product of
//! two words, its high half XOR its low half) before anything is combined, so which inputs
//! collide depends on the key. This is the construction of the fast keyed hashes in wide use
//! (wyhash, foldhash); it is not a cryptographic MAC, and it does not need to be: the key
//! never leaves the process and no output is shown to the sender.

use crate::addr::Addr;
use crate::ruleset::FlowTuple;

/// 256 bits of key material for one hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashKey([u64; 4]);

impl HashKey {
    /// Key material expanded from a 64-bit seed (splitmix64, whose outputs are distinct for
    /// distinct seeds and never all zero).
    pub fn from_seed(seed: u64) -> HashKey {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        HashKey([next(), next(), next(), next()])
    }

    /// The key material k0..k3 (the fast path's table hands the steering key to XDP).
    pub fn words(&self) -> [u64; 4] {
        self.0
    }

    /// A key of exactly these words (what [`HashKey::words`] gave).
    pub fn from_words(words: [u64; 4]) -> HashKey {
        HashKey(words)
    }

    /// Hash of a 5-tuple as received, for the flow index (its high 32 bits pick the slot).
    #[inline]
    pub fn tuple(&self, t: &FlowTuple) -> u64 {
        let [k0, k1, k2, k3] = self.0;
        let (s, d) = (t.src.0, t.dst.0);
        let a = fold_mul(s as u64 ^ k0, (s >> 64) as u64 ^ k1);
        let b = fold_mul(d as u64 ^ k2, (d >> 64) as u64 ^ k3);
        let ports =
            (u64::from(t.src_port) << 32) | (u64::from(t.dst_port) << 16) | u64::from(t.proto);
        fold_mul(a ^ ports ^ k3, b ^ k0)
    }

    /// Hash of one endpoint (address and port), for steering.
    #[inline]
    pub fn endpoint(&self, addr: Addr, port: u16) -> u64 {
        let [k0, k1, k2, k3] = self.0;
        let a = fold_mul(addr.0 as u64 ^ k0, (addr.0 >> 64) as u64 ^ k1);
        let h = fold_mul(a ^ u64::from(port) ^ k2, k3);
        // One more fold. In the product above the port's 16 bits reach the high bits, which
        // `steer` reads, only through carries: under a few keys in a hundred, a client's
        // consecutive ports (a NAT gateway's, a probe's) all landed on one worker.
        fold_mul(h, ENDPOINT_MIX)
    }
}

/// The last multiplier of [`HashKey::endpoint`] (odd, bits spread: 2^64 over the golden
/// ratio). The XDP program's copy of the steering hash uses the same.
pub const ENDPOINT_MIX: u64 = 0x9E37_79B9_7F4A_7C15;

// The 128-bit product of two words, high half XOR low half: every output bit depends on
// every bit of both operands (no finaliser needed after the last one).
use crate::select::fold_mul;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn v6(hi: u64, lo: u64) -> Addr {
        Addr((u128::from(hi) << 64) | u128::from(lo))
    }

    fn tuple(src: Addr) -> FlowTuple {
        FlowTuple {
            proto: 6,
            src,
            src_port: 40_000,
            dst: Addr::from(std::net::Ipv4Addr::new(198, 18, 0, 100)),
            dst_port: 80,
        }
    }

    /// Sources crafted so that a linear mix of their halves is constant (each pair of halves
    /// XORs to the same value after a rotation): they collided under the previous hash,
    /// whatever its seed. Under a key they spread.
    #[test]
    fn a_linear_collision_class_spreads_under_every_key() {
        for seed in [0, 1, 0x5EED, u64::MAX] {
            let key = HashKey::from_seed(seed);
            let base = (0x2001_0db8_0000_0000u64, 0x10u64);
            let hashes: HashSet<u64> = (0..4096u64)
                .map(|x| {
                    let x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    key.tuple(&tuple(v6(base.0 ^ x.rotate_right(23), base.1 ^ x)))
                })
                .collect();
            assert_eq!(hashes.len(), 4096, "seed {seed}");
            // Their index slots (the high 32 bits, as the flow table reads them) spread too.
            let slots: HashSet<u64> = hashes.iter().map(|h| (h >> 32) & 0xffff).collect();
            assert!(slots.len() > 3500, "{} slots of 65536", slots.len());
        }
    }

    #[test]
    fn keys_decide_where_endpoints_steer() {
        let (a, b) = (HashKey::from_seed(1), HashKey::from_seed(2));
        assert_ne!(a, b);
        let endpoints: Vec<(Addr, u16)> = (0..1000u32)
            .map(|i| {
                (
                    Addr::from(std::net::Ipv4Addr::from(0xC612_0000 | i)),
                    1024 + i as u16,
                )
            })
            .collect();
        let workers = |k: &HashKey| -> Vec<u64> {
            endpoints
                .iter()
                .map(|&(ad, p)| ((u128::from(k.endpoint(ad, p)) * 4) >> 64) as u64)
                .collect()
        };
        let (wa, wb) = (workers(&a), workers(&b));
        assert_eq!(wa, workers(&HashKey::from_seed(1)), "same key, same answer");
        let same = wa.iter().zip(&wb).filter(|(x, y)| x == y).count();
        // Independent keys agree on about a quarter of 4-way choices.
        assert!((150..350).contains(&same), "{same} of 1000 agree");
        for w in 0..4 {
            let n = wa.iter().filter(|&&x| x == w).count();
            assert!((180..320).contains(&n), "worker {w}: {n} of 1000");
        }
    }

    /// A client whose ports run in sequence (a NAT gateway, the self-probe) spreads over the
    /// workers under every key: 24 consecutive ports of one parity on one of two workers
    /// happened under 1.6 % of keys before the endpoint hash's last fold.
    #[test]
    fn consecutive_ports_of_one_client_spread_under_every_key() {
        let client = Addr::from(std::net::Ipv4Addr::new(198, 18, 0, 250));
        for seed in 0..5_000 {
            let key = HashKey::from_seed(seed);
            let worker = |port: u16| (u128::from(key.endpoint(client, port)) * 2) >> 64;
            for (first, step) in [(40_000u16, 1u16), (40_000, 2), (40_001, 2)] {
                let on_one: u32 = (0..24).map(|i| worker(first + i * step) as u32).sum();
                assert!(
                    (1..24).contains(&on_one),
                    "seed {seed}: ports {first}+{step}·i all on worker {}",
                    on_one.min(1)
                );
            }
        }
    }

    #[test]
    fn every_input_field_changes_the_tuple_hash() {
        let key = HashKey::from_seed(7);
        let t = tuple(Addr::from(std::net::Ipv4Addr::new(198, 18, 0, 10)));
        let h = key.tuple(&t);
        let variants = [
            FlowTuple { proto: 17, ..t },
            FlowTuple {
                src_port: 40_001,
                ..t
            },
            FlowTuple { dst_port: 81, ..t },
            FlowTuple {
                src: Addr::from(std::net::Ipv4Addr::new(198, 18, 0, 11)),
                ..t
            },
            FlowTuple {
                dst: Addr::from(std::net::Ipv4Addr::new(198, 18, 0, 101)),
                ..t
            },
            // Source and destination swapped (the reply key of a floating-IP flow).
            FlowTuple {
                src: t.dst,
                dst: t.src,
                src_port: t.dst_port,
                dst_port: t.src_port,
                proto: t.proto,
            },
        ];
        for v in variants {
            assert_ne!(key.tuple(&v), h, "{v:?}");
        }
    }
}
