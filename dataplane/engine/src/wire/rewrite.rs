//! In-place NAT rewrite of addresses and ports with incremental checksum updates.

use crate::addr::Addr;
use crate::wire::checksum::{self, L4Checksum};
use crate::wire::parse::{chunk, chunk_mut, l4_csum_field, Packet};
use crate::wire::proto;

/// The new values for a packet's addresses and ports. A `None` field is left as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    pub src: Option<Addr>,
    pub src_port: Option<u16>,
    pub dst: Option<Addr>,
    pub dst_port: Option<u16>,
}

/// Rewrites `frame` (already parsed into `pkt`) in place: addresses, ports, the IPv4 header
/// checksum and the L4 checksum (incremental for `Full`, completed for `Partial`, untouched
/// for `Absent`). New addresses must be of the packet's family.
///
/// An address of the other family is ignored (left as it is) rather than written half-way;
/// a `pkt` that does not describe `frame` leaves the frame untouched. For ICMP echo the
/// identifier stands for both ports: `src_port` is applied when it changes it, else
/// `dst_port`; other ICMP messages have no ports and only their addresses change.
#[inline]
pub fn rewrite(frame: &mut [u8], pkt: &Packet, rw: &Rewrite) {
    let l3 = usize::from(pkt.l3_off);
    let l4 = usize::from(pkt.l4_off);
    let ip_end = usize::from(pkt.ip_end);
    let ip_hlen = if pkt.is_v6 { 40 } else { 20 };
    let l4_hlen = match pkt.proto {
        proto::TCP => 20,
        proto::UDP | proto::ICMP | proto::ICMPV6 => 8,
        _ => return,
    };
    if l3 + ip_hlen > l4 || l4 + l4_hlen > ip_end || ip_end > frame.len() {
        return;
    }
    let has_pseudo = pkt.is_v6 || pkt.proto != proto::ICMP;
    let family_ok = |a: &Addr| a.is_v4() != pkt.is_v6;
    let (new_src, new_dst) = (rw.src.filter(family_ok), rw.dst.filter(family_ok));

    // One accumulator per checksum, folded once at the end (RFC 1624 eqn. 3 over all words).
    let mut l4_delta = 0u64;
    let (final_src, final_dst);
    if pkt.is_v6 {
        let Some(ip) = chunk_mut::<40>(frame, l3) else {
            return;
        };
        let (s, d) = ip.split_at_mut(24);
        let (Some(s), Some(d)) = (chunk_mut::<16>(s, 8), chunk_mut::<16>(d, 0)) else {
            return;
        };
        final_src = swap128(s, new_src, &mut l4_delta);
        final_dst = swap128(d, new_dst, &mut l4_delta);
    } else {
        let Some(ip) = chunk_mut::<20>(frame, l3) else {
            return;
        };
        let mut ip_delta = 0u64;
        let (head, addrs) = ip.split_at_mut(12);
        let (s, d) = addrs.split_at_mut(4);
        let (Some(s), Some(d)) = (chunk_mut::<4>(s, 0), chunk_mut::<4>(d, 0)) else {
            return;
        };
        final_src = swap32(s, new_src, &mut ip_delta);
        final_dst = swap32(d, new_dst, &mut ip_delta);
        if ip_delta != 0 {
            if let Some(c) = chunk_mut::<2>(head, 10) {
                *c = checksum::apply_delta(u16::from_be_bytes(*c), ip_delta).to_be_bytes();
            }
        }
        // The IPv4 header checksum and the pseudo-header see the same address words.
        if has_pseudo {
            l4_delta = ip_delta;
        }
    }

    let Some(seg) = frame.get_mut(l4..ip_end) else {
        return;
    };
    match pkt.proto {
        proto::TCP | proto::UDP => {
            if let Some(p) = chunk_mut::<2>(seg, 0) {
                swap16(p, rw.src_port, &mut l4_delta);
            }
            if let Some(p) = chunk_mut::<2>(seg, 2) {
                swap16(p, rw.dst_port, &mut l4_delta);
            }
        }
        _ => {
            let echo = match seg.first() {
                Some(&t) if pkt.is_v6 => t == 128 || t == 129,
                Some(&t) => t == 0 || t == 8,
                None => false,
            };
            if let (true, Some(id)) = (echo, chunk_mut::<2>(seg, 4)) {
                let cur = u16::from_be_bytes(*id);
                let new = [rw.src_port, rw.dst_port]
                    .into_iter()
                    .flatten()
                    .find(|&p| p != cur);
                swap16(id, new, &mut l4_delta);
            }
        }
    }

    let field = l4_csum_field(pkt.proto);
    let is_udp = pkt.proto == proto::UDP;
    match pkt.l4_csum {
        L4Checksum::Absent => {}
        L4Checksum::Full => {
            if l4_delta != 0 {
                if let Some(c) = chunk_mut::<2>(seg, field) {
                    let new = checksum::apply_delta(u16::from_be_bytes(*c), l4_delta);
                    *c = udp_nonzero(new, is_udp).to_be_bytes();
                }
            }
        }
        L4Checksum::Partial => {
            // The UDP checksum covers the datagram its own length delimits, not the IP payload.
            let len = if is_udp {
                chunk::<2>(seg, 4).map_or(0, |l| usize::from(u16::from_be_bytes(*l)))
            } else {
                seg.len()
            };
            let Some(msg) = seg.get_mut(..len) else {
                return;
            };
            let Some(c) = chunk_mut::<2>(msg, field) else {
                return;
            };
            *c = [0, 0];
            let initial = if has_pseudo {
                checksum::pseudo_header_sum_wide(
                    final_src, final_dst, pkt.is_v6, pkt.proto, len as u32,
                )
            } else {
                0
            };
            let new = !checksum::fold(checksum::sum_bytes(initial, msg));
            if let Some(c) = chunk_mut::<2>(msg, field) {
                *c = udp_nonzero(new, is_udp).to_be_bytes();
            }
        }
    }
}

/// UDP sends a computed checksum of 0 as 0xffff (RFC 768): 0 means "no checksum".
#[inline]
const fn udp_nonzero(csum: u16, is_udp: bool) -> u16 {
    if is_udp && csum == 0 {
        0xffff
    } else {
        csum
    }
}

/// Writes `new` (if any) over a 16-bit field and accumulates the checksum delta.
#[inline]
fn swap16(field: &mut [u8; 2], new: Option<u16>, acc: &mut u64) {
    if let Some(new) = new {
        let old = u16::from_be_bytes(*field);
        if old != new {
            *acc = checksum::delta16(*acc, old, new);
            *field = new.to_be_bytes();
        }
    }
}

/// Same for an IPv4 address; returns the address the field holds afterwards.
#[inline]
fn swap32(field: &mut [u8; 4], new: Option<Addr>, acc: &mut u64) -> Addr {
    let old = Addr::from_v4_bytes(*field);
    match new {
        Some(new) if new != old => {
            *acc = checksum::delta32(*acc, old.0 as u32, new.0 as u32);
            *field = new.v4_bytes();
            new
        }
        _ => old,
    }
}

/// Same for an IPv6 address.
#[inline]
fn swap128(field: &mut [u8; 16], new: Option<Addr>, acc: &mut u64) -> Addr {
    let old = Addr::from_v6_bytes(*field);
    match new {
        Some(new) if new != old => {
            *acc = checksum::delta128(*acc, old.0, new.0);
            *field = new.v6_bytes();
            new
        }
        _ => old,
    }
}

/// Decrements the IPv4 TTL (with an incremental header checksum update) or the IPv6 hop
/// limit. Returns false (and leaves the frame unchanged) when the hop limit is <= 1.
#[inline]
pub fn decrement_hop_limit(frame: &mut [u8], pkt: &Packet) -> bool {
    let l3 = usize::from(pkt.l3_off);
    if pkt.is_v6 {
        match frame.get_mut(l3 + 7) {
            Some(h) if *h > 1 => {
                *h -= 1;
                true
            }
            _ => false,
        }
    } else {
        let Some(ip) = chunk_mut::<20>(frame, l3) else {
            return false;
        };
        let ttl = ip[8];
        if ttl <= 1 {
            return false;
        }
        // TTL shares its 16-bit word with the protocol byte.
        let old = u16::from_be_bytes([ttl, ip[9]]);
        let new = u16::from_be_bytes([ttl - 1, ip[9]]);
        ip[8] = ttl - 1;
        let csum = checksum::update16(u16::from_be_bytes([ip[10], ip[11]]), old, new);
        [ip[10], ip[11]] = csum.to_be_bytes();
        true
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::wire::checksum::{fold, pseudo_header_sum, sum_reference, verify_sum};
    use crate::wire::fixtures::*;
    use crate::wire::parse::parse;
    use crate::wire::tcp_flags;

    fn new_addrs(v6: bool) -> (Addr, Addr) {
        if v6 {
            (
                Addr::from_v6_bytes([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34]),
                Addr::from_v6_bytes([
                    0x20, 0x01, 0x0d, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9,
                ]),
            )
        } else {
            (
                Addr::from_v4_bytes([192, 168, 77, 1]),
                Addr::from_v4_bytes([172, 16, 200, 254]),
            )
        }
    }

    /// The rewrites the engine does: DNAT (to a backend), SNAT (to a frontend), both.
    fn rewrites(v6: bool) -> Vec<(Rewrite, &'static str)> {
        let (s, d) = new_addrs(v6);
        vec![
            (
                Rewrite {
                    dst: Some(d),
                    dst_port: Some(8080),
                    ..Rewrite::default()
                },
                "dnat",
            ),
            (
                Rewrite {
                    src: Some(s),
                    src_port: Some(61000),
                    ..Rewrite::default()
                },
                "snat",
            ),
            (
                Rewrite {
                    src: Some(s),
                    src_port: Some(1),
                    dst: Some(d),
                    dst_port: Some(65535),
                },
                "both",
            ),
            (
                Rewrite {
                    dst: Some(d),
                    ..Rewrite::default()
                },
                "address only",
            ),
        ]
    }

    /// The frame a correct rewrite must produce: the fixture rebuilt with the new tuple.
    fn expected(spec: &Spec, rw: &Rewrite) -> Vec<u8> {
        let mut s = spec.clone();
        s.src = rw.src.unwrap_or(s.src);
        s.dst = rw.dst.unwrap_or(s.dst);
        match &mut s.l4 {
            L4::Echo { id } => {
                *id = [rw.src_port, rw.dst_port]
                    .into_iter()
                    .flatten()
                    .find(|p| p != id)
                    .unwrap_or(*id)
            }
            L4::Unreach => {}
            _ => {
                s.sport = rw.src_port.unwrap_or(s.sport);
                s.dport = rw.dst_port.unwrap_or(s.dport);
            }
        }
        s.build()
    }

    fn kinds() -> [L4; 4] {
        [
            tcp(tcp_flags::ACK | tcp_flags::PSH),
            L4::Udp,
            L4::Echo { id: 0x0bad },
            L4::Unreach,
        ]
    }

    fn ipv4_header_ok(f: &[u8], l3: usize) -> bool {
        fold(sum_reference(0, &f[l3..l3 + 20])) == 0xffff
    }

    fn l4_verify(f: &[u8]) -> u16 {
        let p = parse(f).unwrap();
        let seg = &f[usize::from(p.l4_off)..usize::from(p.ip_end)];
        verify_sum(p.src, p.dst, p.is_v6, p.proto, seg)
    }

    fn csum_at(f: &[u8]) -> usize {
        let p = parse(f).unwrap();
        usize::from(p.l4_off) + l4_csum_field(p.proto)
    }

    #[test]
    fn full_checksums_are_updated_incrementally() {
        for v6 in [false, true] {
            for vlan in [None, Some(100)] {
                for l4 in kinds() {
                    for (rw, what) in rewrites(v6) {
                        let spec = Spec::new(v6, vlan, l4, b"some payload, odd len");
                        let mut f = spec.build();
                        let pkt = parse(&f).unwrap();
                        assert_eq!(pkt.l4_csum, L4Checksum::Full);
                        rewrite(&mut f, &pkt, &rw);
                        let want = expected(&spec, &rw);
                        assert_eq!(f, want, "v6={v6} vlan={vlan:?} {l4:?} {what}");
                        // Independently of the builder: both checksums verify.
                        if !v6 {
                            assert!(ipv4_header_ok(&f, usize::from(pkt.l3_off)));
                        }
                        assert_eq!(l4_verify(&f), 0xffff);
                    }
                }
            }
        }
    }

    #[test]
    fn partial_checksums_are_completed() {
        for v6 in [false, true] {
            for l4 in [tcp(tcp_flags::SYN), L4::Udp, L4::Echo { id: 3 }] {
                for (rw, what) in rewrites(v6) {
                    let spec = Spec::new(v6, Some(5), l4, b"partial");
                    let mut f = spec.build();
                    let pkt = parse(&f).unwrap();
                    let at = csum_at(&f);
                    let len = (f.len() - usize::from(pkt.l4_off)) as u32;
                    let ph = pseudo_header_sum(spec.src, spec.dst, v6, pkt.proto, len);
                    f[at..at + 2].copy_from_slice(&ph.to_be_bytes());
                    let pkt = parse(&f).unwrap();
                    if pkt.proto == crate::wire::proto::ICMP {
                        // ICMPv4 has no pseudo-header: never partial.
                        assert_eq!(pkt.l4_csum, L4Checksum::Full);
                        continue;
                    }
                    assert_eq!(pkt.l4_csum, L4Checksum::Partial, "v6={v6} {l4:?}");
                    rewrite(&mut f, &pkt, &rw);
                    assert_eq!(f, expected(&spec, &rw), "v6={v6} {l4:?} {what}");
                    assert_eq!(l4_verify(&f), 0xffff);
                    assert_eq!(parse(&f).unwrap().l4_csum, L4Checksum::Full);
                }
            }
        }
    }

    #[test]
    fn completed_udp_checksum_of_zero_is_sent_as_ffff() {
        for v6 in [false, true] {
            let (rw, _) = rewrites(v6).swap_remove(2);
            // Pick the 2-byte payload that makes the rewritten datagram's checksum 0.
            let mut target = Spec::new(v6, None, L4::Udp, &[0, 0]);
            target.src = rw.src.unwrap();
            target.dst = rw.dst.unwrap();
            target.sport = rw.src_port.unwrap();
            target.dport = rw.dst_port.unwrap();
            let t = target.build();
            let at = csum_at(&t);
            let c = [t[at], t[at + 1]];
            let spec = Spec::new(v6, None, L4::Udp, &c);
            let mut f = spec.build();
            let pkt = parse(&f).unwrap();
            let ph = pseudo_header_sum(spec.src, spec.dst, v6, pkt.proto, 10);
            f[at..at + 2].copy_from_slice(&ph.to_be_bytes());
            let pkt = parse(&f).unwrap();
            assert_eq!(pkt.l4_csum, L4Checksum::Partial);
            rewrite(&mut f, &pkt, &rw);
            assert_eq!(&f[at..at + 2], &[0xff, 0xff], "v6={v6}");
            assert_eq!(l4_verify(&f), 0xffff);
        }
    }

    #[test]
    fn full_udp_checksum_reaching_zero_is_sent_as_ffff() {
        // Same construction, but from a valid full checksum: the incremental result is the
        // one's-complement zero, which UDP must carry as 0xffff.
        let v6 = false;
        let (rw, _) = rewrites(v6).swap_remove(2);
        let mut target = Spec::new(v6, None, L4::Udp, &[0, 0]);
        target.src = rw.src.unwrap();
        target.dst = rw.dst.unwrap();
        target.sport = rw.src_port.unwrap();
        target.dport = rw.dst_port.unwrap();
        let t = target.build();
        let at = csum_at(&t);
        let spec = Spec::new(v6, None, L4::Udp, &[t[at], t[at + 1]]);
        let mut f = spec.build();
        let pkt = parse(&f).unwrap();
        assert_eq!(pkt.l4_csum, L4Checksum::Full);
        rewrite(&mut f, &pkt, &rw);
        assert_eq!(&f[at..at + 2], &[0xff, 0xff]);
        assert_eq!(l4_verify(&f), 0xffff);
    }

    #[test]
    fn wrong_full_checksums_stay_exactly_as_wrong() {
        for v6 in [false, true] {
            for l4 in kinds() {
                for (rw, what) in rewrites(v6) {
                    let spec = Spec::new(v6, None, l4, b"wrong");
                    let mut f = spec.build();
                    let at = csum_at(&f);
                    let bad = u16::from_be_bytes([f[at], f[at + 1]]) ^ 0x0f0f;
                    f[at..at + 2].copy_from_slice(&bad.to_be_bytes());
                    // A wrong IPv4 header checksum too.
                    if !v6 {
                        f[24] ^= 0x55;
                    }
                    let pkt = parse(&f).unwrap();
                    if pkt.l4_csum != L4Checksum::Full {
                        continue;
                    }
                    let before = l4_verify(&f);
                    let ip_before = fold(sum_reference(0, &f[14..34]));
                    assert_ne!(before, 0xffff);
                    rewrite(&mut f, &pkt, &rw);
                    assert_eq!(l4_verify(&f), before, "v6={v6} {l4:?} {what}");
                    if !v6 {
                        assert_eq!(fold(sum_reference(0, &f[14..34])), ip_before);
                        assert_ne!(ip_before, 0xffff);
                    }
                }
            }
        }
    }

    #[test]
    fn absent_udp_checksum_stays_zero() {
        let spec = Spec::new(false, None, L4::Udp, b"no checksum");
        let mut f = spec.build();
        f[40..42].copy_from_slice(&[0, 0]);
        let pkt = parse(&f).unwrap();
        assert_eq!(pkt.l4_csum, L4Checksum::Absent);
        for (rw, what) in rewrites(false) {
            let mut g = f.clone();
            rewrite(&mut g, &pkt, &rw);
            assert_eq!(&g[40..42], &[0, 0], "{what}");
            assert!(ipv4_header_ok(&g, 14));
            let mut want = expected(&spec, &rw);
            want[40..42].copy_from_slice(&[0, 0]);
            assert_eq!(g, want, "{what}");
        }
    }

    #[test]
    fn addresses_of_the_other_family_are_ignored() {
        let spec = Spec::new(false, None, L4::Udp, b"x");
        let mut f = spec.build();
        let orig = f.clone();
        let pkt = parse(&f).unwrap();
        let (v6_src, _) = new_addrs(true);
        rewrite(
            &mut f,
            &pkt,
            &Rewrite {
                src: Some(v6_src),
                ..Rewrite::default()
            },
        );
        assert_eq!(f, orig);
        let spec = Spec::new(true, None, L4::Udp, b"x");
        let mut f = spec.build();
        let orig = f.clone();
        let pkt = parse(&f).unwrap();
        let (v4_src, _) = new_addrs(false);
        rewrite(
            &mut f,
            &pkt,
            &Rewrite {
                dst: Some(v4_src),
                ..Rewrite::default()
            },
        );
        assert_eq!(f, orig);
    }

    #[test]
    fn a_packet_that_does_not_match_the_frame_is_left_alone() {
        let f = Spec::new(false, None, tcp(tcp_flags::ACK), b"abc").build();
        let pkt = parse(&f).unwrap();
        let (s, d) = new_addrs(false);
        let rw = Rewrite {
            src: Some(s),
            dst: Some(d),
            src_port: Some(1),
            dst_port: Some(2),
        };
        let mut short = f[..f.len() - 1].to_vec();
        let orig = short.clone();
        rewrite(&mut short, &pkt, &rw);
        assert_eq!(short, orig);
        let mut bogus = pkt;
        bogus.l4_off = 10;
        let mut g = f.clone();
        rewrite(&mut g, &bogus, &rw);
        assert_eq!(g, f);
    }

    #[test]
    fn hop_limit_decrement() {
        for v6 in [false, true] {
            let spec = Spec::new(v6, Some(2), tcp(tcp_flags::ACK), b"");
            let mut f = spec.build();
            let pkt = parse(&f).unwrap();
            let hop_at = 18 + if v6 { 7 } else { 8 };
            for expect in (1..64u8).rev() {
                assert!(decrement_hop_limit(&mut f, &pkt));
                assert_eq!(f[hop_at], expect);
                if !v6 {
                    assert!(ipv4_header_ok(&f, 18), "ttl {expect}");
                }
            }
            let before = f.clone();
            assert!(!decrement_hop_limit(&mut f, &pkt));
            assert_eq!(f, before);
            f[hop_at] = 0;
            let before = f.clone();
            assert!(!decrement_hop_limit(&mut f, &pkt));
            assert_eq!(f, before);
            // L4 checksums do not cover the hop limit.
            assert_eq!(l4_verify(&f), 0xffff);
        }
        assert!(!decrement_hop_limit(
            &mut [0u8; 10],
            &parse(&Spec::new(false, None, L4::Udp, b"").build()).unwrap()
        ));
    }
}
