//! Internet checksums for the bare forwarder.
//!
//! TCP and UDP packets sent by sockets in a network namespace cross a veth with
//! CHECKSUM_PARTIAL: the checksum field holds only the pseudo-header sum and the NIC (there
//! is none) was supposed to finish it. AF_XDP hands us the bytes without that metadata and
//! its transmit path builds a CHECKSUM_NONE skb, so a frame forwarded as-is is dropped by
//! the receiver. The bare forwarder has no idea which packets were partial, so it
//! recomputes every TCP/UDP checksum from scratch. The real engine instead patches
//! checksums incrementally (RFC 1624) and does not touch what it was not asked to.

/// Ones'-complement sum of `data` read as big-endian 16-bit words, added to `acc`.
/// Not folded: chain calls, then [`finish`].
#[inline]
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    // Summing 32-bit words and folding later gives the same ones'-complement result as
    // summing 16-bit words (end-around carries commute), with half the additions.
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u64::from(u16::from_be_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    if i < rest.len() {
        acc += u64::from(rest[i]) << 8;
    }
    acc
}

/// Folds a [`sum`] to 16 bits and complements it: the value to store in a header.
#[inline]
pub fn finish(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// What [`fill_l4_checksum`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Checksum {
    /// The TCP or UDP checksum now covers the whole segment.
    Filled,
    /// Not TCP or UDP over IPv4/IPv6 (ICMP, ARP, IPv6 extension headers...): untouched.
    NotTcpUdp,
    /// A non-first or non-last IP fragment: the checksum spans fragments, untouched.
    Fragment,
    /// Headers cut short or lengths inconsistent: untouched.
    Malformed,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Offset of the L3 header and its EtherType, skipping up to two VLAN tags.
pub fn l3_offset(frame: &[u8]) -> Option<(usize, u16)> {
    let mut off = ETH_HLEN;
    let mut proto = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        proto = u16::from_be_bytes([*frame.get(off + 2)?, *frame.get(off + 3)?]);
        off += 4;
    }
    Some((off, proto))
}

/// Recomputes the TCP or UDP checksum of an Ethernet frame in place.
///
/// Lengths come from the IP header, not the frame: short frames carry Ethernet padding
/// that is not part of the segment.
pub fn fill_l4_checksum(frame: &mut [u8]) -> L4Checksum {
    let Some((l3, proto)) = l3_offset(frame) else {
        return L4Checksum::Malformed;
    };
    match proto {
        ETH_P_IP => fill_v4(frame, l3),
        ETH_P_IPV6 => fill_v6(frame, l3),
        _ => L4Checksum::NotTcpUdp,
    }
}

fn fill_v4(frame: &mut [u8], l3: usize) -> L4Checksum {
    let Some(ip) = frame.get(l3..l3 + 20) else {
        return L4Checksum::Malformed;
    };
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let proto = ip[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return L4Checksum::NotTcpUdp;
    }
    if frag & 0x3fff != 0 {
        return L4Checksum::Fragment;
    }
    if ihl < 20 || total < ihl || l3 + total > frame.len() {
        return L4Checksum::Malformed;
    }
    let l4_len = total - ihl;
    // pseudo header: src, dst, zero, protocol, L4 length
    let mut acc = sum(&frame[l3 + 12..l3 + 20], 0);
    acc += u64::from(proto) + l4_len as u64;
    write_l4(frame, l3 + ihl, l4_len, proto, acc)
}

fn fill_v6(frame: &mut [u8], l3: usize) -> L4Checksum {
    let Some(ip) = frame.get(l3..l3 + 40) else {
        return L4Checksum::Malformed;
    };
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let next = ip[6];
    // A fragment header or any other extension header lands here too.
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return L4Checksum::NotTcpUdp;
    }
    if l3 + 40 + payload > frame.len() {
        return L4Checksum::Malformed;
    }
    // pseudo header: src, dst, 32-bit length, 3 zero bytes, next header
    let mut acc = sum(&frame[l3 + 8..l3 + 40], 0);
    acc += payload as u64 + u64::from(next);
    write_l4(frame, l3 + 40, payload, next, acc)
}

fn write_l4(frame: &mut [u8], l4: usize, len: usize, proto: u8, pseudo: u64) -> L4Checksum {
    let (min, at) = if proto == IPPROTO_TCP {
        (20, 16)
    } else {
        (8, 6)
    };
    if len < min {
        return L4Checksum::Malformed;
    }
    let seg = &mut frame[l4..l4 + len];
    seg[at] = 0;
    seg[at + 1] = 0;
    let mut c = finish(sum(seg, pseudo));
    if proto == IPPROTO_UDP && c == 0 {
        // 0 means "no checksum" in UDP (RFC 768); its ones'-complement twin says "valid".
        c = 0xffff;
    }
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    L4Checksum::Filled
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    /// Plain reference: 16-bit words, fold at the end.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            acc += u32::from(w);
        }
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    #[test]
    fn sum_matches_reference_on_every_length() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 37 + 11) as u8).collect();
        for len in 0..data.len() {
            assert_eq!(
                finish(sum(&data[..len], 0)),
                reference(&data[..len]),
                "len {len}"
            );
        }
        // RFC 1071 example
        let ex = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(finish(sum(&ex, 0)), !0xddf2);
    }

    fn udp4(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([198, 18, 1, 2], [198, 18, 2, 2], 64)
            .udp(40000, 7000);
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    fn tcp6(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6(
                [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            )
            .tcp(40000, 7001, 12345, 64000)
            .ack(777)
            .psh();
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    fn l4_csum_field(frame: &[u8]) -> u16 {
        match SlicedPacket::from_ethernet(frame)
            .unwrap()
            .transport
            .unwrap()
        {
            TransportSlice::Udp(u) => u.checksum(),
            TransportSlice::Tcp(t) => t.checksum(),
            _ => panic!("not tcp/udp"),
        }
    }

    /// Simulates CHECKSUM_PARTIAL: the field holds only the (uncomplemented) pseudo sum.
    fn make_partial(frame: &mut [u8], at: usize, pseudo: u16) {
        frame[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    }

    #[test]
    fn completes_partial_udp_over_ipv4() {
        let good = udp4(b"hello, partial world");
        let want = l4_csum_field(&good);
        let mut f = good.clone();
        make_partial(&mut f, 14 + 20 + 6, 0x1234);
        assert_eq!(fill_l4_checksum(&mut f), L4Checksum::Filled);
        assert_eq!(l4_csum_field(&f), want);
        assert_eq!(f, good);
    }

    #[test]
    fn completes_tcp_over_ipv6_odd_length() {
        let good = tcp6(b"odd-length payload!");
        let want = l4_csum_field(&good);
        let mut f = good.clone();
        make_partial(&mut f, 14 + 40 + 16, 0xbeef);
        assert_eq!(fill_l4_checksum(&mut f), L4Checksum::Filled);
        assert_eq!(l4_csum_field(&f), want);
    }

    #[test]
    fn ignores_ethernet_padding() {
        let good = udp4(b"x");
        let want = l4_csum_field(&good);
        let mut f = good.clone();
        f.resize(60, 0xaa); // minimum frame, padded with junk
        make_partial(&mut f, 14 + 20 + 6, 0);
        assert_eq!(fill_l4_checksum(&mut f), L4Checksum::Filled);
        assert_eq!(l4_csum_field(&f), want);
        assert!(f[good.len()..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn skips_fragments_other_protocols_and_truncation() {
        let mut f = udp4(b"frag");
        f[14 + 6] = 0x20; // more fragments
        let before = f.clone();
        assert_eq!(fill_l4_checksum(&mut f), L4Checksum::Fragment);
        assert_eq!(f, before);

        let mut f = udp4(b"icmp");
        f[14 + 9] = 1;
        assert_eq!(fill_l4_checksum(&mut f), L4Checksum::NotTcpUdp);

        let mut f = udp4(b"cut short");
        let n = f.len();
        assert_eq!(fill_l4_checksum(&mut f[..n - 3]), L4Checksum::Malformed);
        assert_eq!(fill_l4_checksum(&mut [0u8; 10]), L4Checksum::Malformed);

        let mut arp = vec![0u8; 42];
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert_eq!(fill_l4_checksum(&mut arp), L4Checksum::NotTcpUdp);
    }

    #[test]
    fn vlan_tagged_frame() {
        let good = udp4(b"tagged");
        let want = l4_csum_field(&good);
        let mut f = Vec::new();
        f.extend_from_slice(&good[..12]);
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        f.extend_from_slice(&good[12..]);
        f[18 + 20 + 6] ^= 0xff;
        assert_eq!(l3_offset(&f), Some((18, ETH_P_IP)));
        assert_eq!(fill_l4_checksum(&mut f), L4Checksum::Filled);
        assert_eq!(u16::from_be_bytes([f[18 + 20 + 6], f[18 + 20 + 7]]), want);
    }
}
