//! Internet checksums: full computation (the reference), RFC 1624 incremental updates, and
//! completion of partial (offloaded) checksums.
//!
//! Conventions: a *sum* is the one's-complement sum of 16-bit big-endian words, folded to 16
//! bits and **not** complemented (what a CHECKSUM_PARTIAL field holds for the pseudo-header);
//! a *checksum* is the complemented sum (what goes on the wire). Wide accumulators (`u64`)
//! are used because `2^16 ≡ 1 (mod 0xffff)`: adding 32-bit words and folding at the end gives
//! the same one's-complement value as adding 16-bit words, with fewer carries to handle.

use crate::addr::Addr;
use crate::wire::proto;

/// How the L4 checksum field of a received packet stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Checksum {
    /// A complete checksum (valid or not): update it incrementally, never "fix" it.
    Full,
    /// The field holds only the folded pseudo-header sum: the sender's stack left the rest to
    /// the NIC (CHECKSUM_PARTIAL on veth). The engine must complete it before transmit.
    Partial,
    /// UDP over IPv4 with checksum 0: no checksum; leave it 0.
    Absent,
}

/// Folds a wide one's-complement accumulator to 16 bits (end-around carry), not complemented.
/// A non-zero input never folds to 0 (it folds to 0xffff, "negative zero"), as in Linux's
/// `csum_fold`, so partial sums compare bit for bit with what the kernel writes.
#[inline]
pub const fn fold(sum: u64) -> u16 {
    // Four steps are enough for any u64 (each at least halves the excess over 16 bits; the
    // third can still carry into bit 16, e.g. for 0x0001_0000_ffff_ffff).
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The plain RFC 1071 reference: one's-complement sum of `data` as 16-bit big-endian words (an
/// odd last byte is padded with a zero), added to `initial`, not folded. Kept deliberately
/// simple so that the fast paths can be tested against it.
pub fn sum_reference(initial: u64, data: &[u8]) -> u64 {
    let mut sum = initial;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        if let [hi, lo] = *w {
            sum += u64::from(u16::from_be_bytes([hi, lo]));
        }
    }
    if let [last] = *words.remainder() {
        sum += u64::from(u16::from_be_bytes([last, 0]));
    }
    sum
}

/// Fast one's-complement sum of `data` (32-bit words), added to `initial`, not folded. Same
/// value as [`sum_reference`] modulo 0xffff. `data` must start at an even offset of the
/// checksummed unit; only the last slice of a unit may have an odd length.
#[inline]
pub fn sum_bytes(initial: u64, data: &[u8]) -> u64 {
    let mut sum = initial;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        if let [a, b, c, d] = *w {
            sum += u64::from(u32::from_be_bytes([a, b, c, d]));
        }
    }
    // Up to 3 bytes left: one 16-bit word and/or one zero-padded byte.
    match *words.remainder() {
        [a] => sum += u64::from(u16::from_be_bytes([a, 0])),
        [a, b] => sum += u64::from(u16::from_be_bytes([a, b])),
        [a, b, c] => {
            sum += u64::from(u16::from_be_bytes([a, b])) + u64::from(u16::from_be_bytes([c, 0]))
        }
        _ => {}
    }
    sum
}

/// RFC 1071 checksum of `data` (e.g. an IPv4 header with its checksum field zeroed).
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_bytes(0, data))
}

/// Adds an address to a wide accumulator the way it appears in a pseudo-header.
#[inline]
const fn add_addr(sum: u64, a: Addr, is_v6: bool) -> u64 {
    if is_v6 {
        let (hi, lo) = ((a.0 >> 64) as u64, a.0 as u64);
        sum + (hi >> 32) + (hi & 0xffff_ffff) + (lo >> 32) + (lo & 0xffff_ffff)
    } else {
        sum + a.0 as u32 as u64
    }
}

/// Unfolded pseudo-header sum (RFC 768 / RFC 9293 for IPv4, RFC 8200 §8.1 for IPv6). `len` is
/// the upper-layer length (TCP segment, UDP length field, ICMPv6 message).
#[inline]
pub fn pseudo_header_sum_wide(src: Addr, dst: Addr, is_v6: bool, proto: u8, len: u32) -> u64 {
    let sum = add_addr(add_addr(0, src, is_v6), dst, is_v6);
    // IPv4 carries a 16-bit length, IPv6 a 32-bit one; both are the same sum of 16-bit words
    // for any length that fits the packet.
    sum + u64::from(proto) + u64::from(len)
}

/// Folded, non-complemented pseudo-header sum: exactly what Linux leaves in the checksum field
/// of a CHECKSUM_PARTIAL packet (`~csum_tcpudp_magic(saddr, daddr, len, proto, 0)`).
#[inline]
pub fn pseudo_header_sum(src: Addr, dst: Addr, is_v6: bool, proto: u8, len: u32) -> u16 {
    fold(pseudo_header_sum_wide(src, dst, is_v6, proto, len))
}

/// Full L4 checksum (TCP, UDP, ICMPv6; ICMPv4 has no pseudo-header, use [`checksum`]) of
/// `segment`, whose checksum field must be zero. UDP callers map a result of 0 to 0xffff.
pub fn l4_checksum(src: Addr, dst: Addr, is_v6: bool, proto: u8, segment: &[u8]) -> u16 {
    let len = u32::try_from(segment.len()).unwrap_or(u32::MAX);
    !fold(sum_bytes(
        pseudo_header_sum_wide(src, dst, is_v6, proto, len),
        segment,
    ))
}

/// The plain reference for a whole L4 message, used by tests to verify what the fast paths
/// produce: folded sum of pseudo-header (when `proto` has one) and `segment` *including* its
/// checksum field. A correct checksum gives 0xffff; a wrong one is off by the same amount
/// forever as long as only incremental updates touch it.
pub fn verify_sum(src: Addr, dst: Addr, is_v6: bool, proto: u8, segment: &[u8]) -> u16 {
    let len = u32::try_from(segment.len()).unwrap_or(u32::MAX);
    let mut ph = [0u8; 40];
    let pseudo = if proto == proto::ICMP && !is_v6 {
        0
    } else if is_v6 {
        ph[0..16].copy_from_slice(&src.v6_bytes());
        ph[16..32].copy_from_slice(&dst.v6_bytes());
        ph[32..36].copy_from_slice(&len.to_be_bytes());
        ph[39] = proto;
        sum_reference(0, &ph)
    } else {
        ph[0..4].copy_from_slice(&src.v4_bytes());
        ph[4..8].copy_from_slice(&dst.v4_bytes());
        ph[9] = proto;
        ph[10..12].copy_from_slice(&(len as u16).to_be_bytes());
        sum_reference(0, &ph[..12])
    };
    fold(sum_reference(pseudo, segment))
}

/// Accumulates the RFC 1624 term `~m + m'` of one changed 16-bit word.
#[inline]
pub const fn delta16(acc: u64, old: u16, new: u16) -> u64 {
    acc + (!old) as u64 + new as u64
}

/// Accumulates `~m + m'` for a changed 32-bit value (two adjacent 16-bit words).
#[inline]
pub const fn delta32(acc: u64, old: u32, new: u32) -> u64 {
    acc + (!old) as u64 + new as u64
}

/// Accumulates `~m + m'` for a changed 128-bit value (an IPv6 address).
#[inline]
pub const fn delta128(acc: u64, old: u128, new: u128) -> u64 {
    let (o, n) = (!old, new);
    acc + (o >> 96) as u32 as u64
        + (o >> 64) as u32 as u64
        + (o >> 32) as u32 as u64
        + o as u32 as u64
        + (n >> 96) as u32 as u64
        + (n >> 64) as u32 as u64
        + (n >> 32) as u32 as u64
        + n as u32 as u64
}

/// Applies accumulated deltas to checksum `hc`: RFC 1624 eqn. 3, `HC' = ~(~HC + Σ(~m + m'))`.
/// Eqn. 3 (not eqn. 2) because it never turns a valid checksum into the non-canonical 0xffff.
#[inline]
pub const fn apply_delta(hc: u16, acc: u64) -> u16 {
    !fold(acc + (!hc) as u64)
}

/// RFC 1624 update of checksum `hc` for one 16-bit word changing from `old` to `new`.
#[inline]
pub const fn update16(hc: u16, old: u16, new: u16) -> u16 {
    apply_delta(hc, delta16(0, old, new))
}

/// RFC 1624 update of checksum `hc` for a 32-bit value (IPv4 address, TCP sequence number).
#[inline]
pub const fn update32(hc: u16, old: u32, new: u32) -> u16 {
    apply_delta(hc, delta32(0, old, new))
}

/// RFC 1624 update of checksum `hc` for a 128-bit value (IPv6 address).
#[inline]
pub const fn update128(hc: u16, old: u128, new: u128) -> u16 {
    apply_delta(hc, delta128(0, old, new))
}

/// Classifies a received L4 checksum field (see [`L4Checksum`]). `pseudo` is the folded
/// pseudo-header sum of the packet as received; pass `None` for ICMPv4, which has none.
#[inline]
pub fn classify(field: u16, pseudo: Option<u16>, udp_over_v4: bool) -> L4Checksum {
    match pseudo {
        Some(p) if p == field => L4Checksum::Partial,
        _ if udp_over_v4 && field == 0 => L4Checksum::Absent,
        _ => L4Checksum::Full,
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to 2ddf0, folded ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum_reference(0, &data), 0x2ddf0);
        assert_eq!(fold(sum_bytes(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn ipv4_header_example() {
        // A captured header whose checksum field is b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(fold(sum_reference(0, &h)), 0xffff);
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn fold_edges() {
        assert_eq!(fold(0), 0);
        assert_eq!(fold(0xffff), 0xffff);
        assert_eq!(fold(0x1_0000), 1);
        assert_eq!(fold(0x1_fffe), 0xffff);
        assert_eq!(fold(u64::MAX), 0xffff);
        assert_eq!(fold(0xffff_0000_0000), 0xffff);
        // The one input shape that needs the fourth folding step: 0x1_0000_ffff after the
        // first, 0x1_ffff after the second, 0x1_0000 after the third.
        assert_eq!(fold(0x0001_0000_ffff_ffff), 1);
    }

    #[test]
    fn fast_sum_matches_reference_for_every_alignment() {
        let data: Vec<u8> = (0..257u32).map(|i| (i * 37 + 11) as u8).collect();
        for start in 0..4 {
            for end in start..data.len() {
                // Unit boundaries start at even offsets; only odd lengths vary.
                let s = &data[start * 2..end.max(start * 2)];
                assert_eq!(
                    fold(sum_bytes(0, s)),
                    fold(sum_reference(0, s)),
                    "{start}..{end}"
                );
            }
        }
    }

    #[test]
    fn pseudo_header_sums() {
        let (s4, d4) = (
            Addr::from_v4_bytes([198, 18, 2, 1]),
            Addr::from_v4_bytes([198, 18, 2, 2]),
        );
        // c612 + 0201 + c612 + 0202 + 0006 + 0014, end-around carried.
        assert_eq!(pseudo_header_sum(s4, d4, false, 6, 20), 0x9042);
        let s6 = Addr::from_v6_bytes([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let d6 = Addr::from_v6_bytes([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        // 2001 + 0db8 + 0001 + fe80 + ffff + 0011 + 0008, end-around carried.
        let words: u64 = 0x2001 + 0x0db8 + 0x0001 + 0xfe80 + 0xffff + 0x0011 + 0x0008;
        assert_eq!(pseudo_header_sum(s6, d6, true, 17, 8), fold(words));
        // The reference verifier agrees: an all-zero segment adds nothing to the pseudo-sum.
        assert_eq!(verify_sum(s4, d4, false, 6, &[0; 20]), 0x9042);
    }

    #[test]
    fn incremental_updates_equal_recomputation() {
        // A non-zero leading word keeps the from-scratch sum off the all-zero corner case.
        let mut buf: Vec<u8> = (0..64u32).map(|i| (i * 101 + 7) as u8).collect();
        buf[0] = 0x45;
        let csum_at = 10;
        buf[csum_at] = 0;
        buf[csum_at + 1] = 0;
        let mut hc = checksum(&buf);

        let old16 = u16::from_be_bytes([buf[2], buf[3]]);
        buf[2..4].copy_from_slice(&0xfffeu16.to_be_bytes());
        hc = update16(hc, old16, 0xfffe);
        assert_eq!(hc, checksum(&buf));

        let old32 = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
        buf[12..16].copy_from_slice(&0xc0a8_0001u32.to_be_bytes());
        hc = update32(hc, old32, 0xc0a8_0001);
        assert_eq!(hc, checksum(&buf));

        let mut o = [0u8; 16];
        o.copy_from_slice(&buf[24..40]);
        let new = 0x2001_0db8_0000_0000_0000_0000_dead_beefu128;
        buf[24..40].copy_from_slice(&new.to_be_bytes());
        hc = update128(hc, u128::from_be_bytes(o), new);
        assert_eq!(hc, checksum(&buf));

        // No-op updates keep the exact bits.
        assert_eq!(update16(hc, 7, 7), hc);
        assert_eq!(update32(hc, 0xdead_beef, 0xdead_beef), hc);
    }

    #[test]
    fn wrong_checksums_stay_wrong_by_the_same_amount() {
        let mut buf = [0x12u8, 0x34, 0x56, 0x78, 0, 0, 0x9a, 0xbc];
        let good = checksum(&buf);
        let bad = good.wrapping_add(0x0101);
        buf[4..6].copy_from_slice(&bad.to_be_bytes());
        let before = fold(sum_reference(0, &buf));
        assert_ne!(before, 0xffff);
        let new = update16(bad, 0x1234, 0x4321);
        buf[0..2].copy_from_slice(&0x4321u16.to_be_bytes());
        buf[4..6].copy_from_slice(&new.to_be_bytes());
        assert_eq!(fold(sum_reference(0, &buf)), before);
    }

    #[test]
    fn classification() {
        assert_eq!(classify(0x1234, Some(0x1234), false), L4Checksum::Partial);
        assert_eq!(classify(0x1234, Some(0x1234), true), L4Checksum::Partial);
        assert_eq!(classify(0, Some(0x1234), true), L4Checksum::Absent);
        assert_eq!(classify(0, Some(0x1234), false), L4Checksum::Full);
        assert_eq!(classify(0x1234, None, false), L4Checksum::Full);
        assert_eq!(classify(0x1235, Some(0x1234), false), L4Checksum::Full);
    }
}
