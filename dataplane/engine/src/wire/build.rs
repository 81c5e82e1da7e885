//! Building TCP RST frames: the two RSTs of "TCP reset on idle", and the answer of the `reset`
//! unknown-flow policy.

use crate::addr::Addr;
use crate::wire::checksum;
use crate::wire::parse::{
    chunk, chunk_mut, Packet, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN,
};
use crate::wire::{proto, tcp_flags};

/// Largest frame [`build_tcp_rst`] writes (Ethernet + 802.1Q + IPv6 + TCP).
pub const MAX_RST_FRAME: usize = 14 + 4 + 40 + 20;

/// Everything one RST frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RstSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    /// Must equal the receiver's RCV.NXT exactly (RFC 5961).
    pub seq: u32,
    /// When `Some`, the ACK flag is set with this acknowledgement number.
    pub ack: Option<u32>,
}

/// Writes a complete RST frame (valid IPv4 header checksum and TCP checksum, TTL/hop limit 64,
/// window 0, no options) into `buf` and returns its length. Returns `None` when `buf` is
/// shorter than the frame or when `src` and `dst` are of different families.
///
/// The 802.1Q tag carries `vlan & 0x0fff` with priority 0. IPv4: id 0, DF set (an RST is never
/// worth fragmenting). Frames are not padded to the Ethernet minimum of 60 bytes: NICs and
/// veth pad or accept short frames themselves.
pub fn build_tcp_rst(buf: &mut [u8], spec: &RstSpec) -> Option<usize> {
    let flags = match spec.ack {
        Some(_) => tcp_flags::RST | tcp_flags::ACK,
        None => tcp_flags::RST,
    };
    write_segment(buf, spec, spec.vlan.map(|v| v & 0x0fff), flags, 0)
}

/// A payload-less TCP segment with `flags` (e.g. the SYN of xlbd's data-path self-probe),
/// otherwise as [`build_tcp_rst`]: `spec.ack` sets the ACK flag, the window is `window`.
pub fn build_tcp_segment(buf: &mut [u8], spec: &RstSpec, flags: u8, window: u16) -> Option<usize> {
    let flags = match spec.ack {
        Some(_) => flags | tcp_flags::ACK,
        None => flags & !tcp_flags::ACK,
    };
    write_segment(buf, spec, spec.vlan.map(|v| v & 0x0fff), flags, window)
}

/// [`build_tcp_rst`] with the raw 802.1Q TCI, so that a reply keeps the priority bits too.
fn write_rst(buf: &mut [u8], spec: &RstSpec, tci: Option<u16>) -> Option<usize> {
    let flags = match spec.ack {
        Some(_) => tcp_flags::RST | tcp_flags::ACK,
        None => tcp_flags::RST,
    };
    write_segment(buf, spec, tci, flags, 0)
}

fn write_segment(
    buf: &mut [u8],
    spec: &RstSpec,
    tci: Option<u16>,
    flags: u8,
    window: u16,
) -> Option<usize> {
    let is_v6 = match (spec.src.is_v4(), spec.dst.is_v4()) {
        (true, true) => false,
        (false, false) => true,
        _ => return None,
    };
    let l3 = if tci.is_some() { 18 } else { 14 };
    let l4 = l3 + if is_v6 { 40 } else { 20 };
    let len = l4 + 20;
    let out = buf.get_mut(..len)?;

    let eth = chunk_mut::<14>(out, 0)?;
    eth[0..6].copy_from_slice(&spec.dst_mac);
    eth[6..12].copy_from_slice(&spec.src_mac);
    let ethertype = if is_v6 {
        ETHERTYPE_IPV6
    } else {
        ETHERTYPE_IPV4
    };
    if let Some(tci) = tci {
        eth[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        let tag = chunk_mut::<4>(out, 14)?;
        tag[0..2].copy_from_slice(&tci.to_be_bytes());
        tag[2..4].copy_from_slice(&ethertype.to_be_bytes());
    } else {
        eth[12..14].copy_from_slice(&ethertype.to_be_bytes());
    }

    if is_v6 {
        let ip = chunk_mut::<40>(out, l3)?;
        ip[0..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 20, proto::TCP, 64]);
        ip[8..24].copy_from_slice(&spec.src.v6_bytes());
        ip[24..40].copy_from_slice(&spec.dst.v6_bytes());
    } else {
        let ip = chunk_mut::<20>(out, l3)?;
        ip[0..12].copy_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, proto::TCP, 0, 0]);
        ip[12..16].copy_from_slice(&spec.src.v4_bytes());
        ip[16..20].copy_from_slice(&spec.dst.v4_bytes());
        let csum = checksum::checksum(ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
    }

    let tcp = chunk_mut::<20>(out, l4)?;
    tcp[0..2].copy_from_slice(&spec.src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&spec.dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&spec.seq.to_be_bytes());
    // Without ACK the acknowledgement field is ignored by the receiver; 0 is the convention.
    tcp[8..12].copy_from_slice(&spec.ack.unwrap_or(0).to_be_bytes());
    let w = window.to_be_bytes();
    tcp[12..20].copy_from_slice(&[5 << 4, flags, w[0], w[1], 0, 0, 0, 0]);
    let csum = checksum::l4_checksum(spec.src, spec.dst, is_v6, proto::TCP, tcp);
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    Some(len)
}

/// Turns a received TCP segment (parsed as `pkt`) into the RST that answers it (RFC 9293
/// §3.10.7.1: if the segment has ACK, `seq = SEG.ACK` and flags RST; otherwise `seq = 0`,
/// `ack = SEG.SEQ + SEG.LEN` (SYN and FIN count) and flags RST|ACK), swapping MACs, addresses and
/// ports, dropping the payload. Returns the new frame length (never longer than the input).
///
/// Returns 0 (frame unchanged, nothing to send) when `pkt` is not TCP, when the segment is
/// itself an RST (RFC 9293: an RST is never answered, which also keeps two resetting
/// middleboxes from ping-ponging), or when `pkt` does not describe `frame`. The 802.1Q tag is
/// kept as received (priority included); TTL/hop limit 64, IPv4 id 0 + DF, window 0.
pub fn reply_rst_in_place(frame: &mut [u8], pkt: &Packet) -> usize {
    if pkt.proto != proto::TCP || pkt.tcp_flags & tcp_flags::RST != 0 {
        return 0;
    }
    let Some(eth) = chunk::<14>(frame, 0) else {
        return 0;
    };
    let (mut src_mac, mut dst_mac) = ([0u8; 6], [0u8; 6]);
    src_mac.copy_from_slice(&eth[0..6]);
    dst_mac.copy_from_slice(&eth[6..12]);
    let tci = match pkt.vlan {
        Some(_) => match chunk::<2>(frame, 14) {
            Some(t) => Some(u16::from_be_bytes(*t)),
            None => return 0,
        },
        None => None,
    };
    let l3 = if tci.is_some() { 18 } else { 14 };
    if usize::from(pkt.l3_off) != l3 || pkt.src.is_v4() == pkt.is_v6 {
        return 0;
    }
    let (seq, ack) = if pkt.tcp_flags & tcp_flags::ACK != 0 {
        (pkt.ack, None)
    } else {
        let syn = u32::from(pkt.tcp_flags & tcp_flags::SYN != 0);
        let fin = u32::from(pkt.tcp_flags & tcp_flags::FIN != 0);
        let seg_len = u32::from(pkt.payload_len) + syn + fin;
        (0, Some(pkt.seq.wrapping_add(seg_len)))
    };
    let spec = RstSpec {
        src_mac,
        dst_mac,
        vlan: pkt.vlan,
        src: pkt.dst,
        dst: pkt.src,
        src_port: pkt.dst_port,
        dst_port: pkt.src_port,
        seq,
        ack,
    };
    write_rst(frame, &spec, tci).unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::wire::checksum::{fold, sum_reference, verify_sum};
    use crate::wire::fixtures::*;
    use crate::wire::parse::parse;
    use crate::wire::L4Checksum;

    fn l4_ok(f: &[u8]) -> bool {
        let p = parse(f).unwrap();
        let seg = &f[usize::from(p.l4_off)..usize::from(p.ip_end)];
        verify_sum(p.src, p.dst, p.is_v6, p.proto, seg) == 0xffff
    }

    fn v4_spec() -> RstSpec {
        RstSpec {
            src_mac: MAC_A,
            dst_mac: MAC_B,
            vlan: None,
            src: Addr::from_v4_bytes(V4_A),
            dst: Addr::from_v4_bytes(V4_B),
            src_port: 80,
            dst_port: 12345,
            seq: 0x0102_0304,
            ack: Some(0x0a0b_0c0d),
        }
    }

    #[test]
    fn ipv4_rst_exact_bytes() {
        let mut buf = [0xaau8; MAX_RST_FRAME];
        let n = build_tcp_rst(&mut buf, &v4_spec()).unwrap();
        #[rustfmt::skip]
        let want: [u8; 54] = [
            // Ethernet: dst, src, IPv4.
            0x02, 0, 0, 0, 0, 0x0b, 0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x00,
            // IPv4: v4/IHL 5, TOS 0, total 40, id 0, DF, TTL 64, TCP, checksum, addresses.
            0x45, 0x00, 0x00, 0x28, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0xaa, 0xa8,
            198, 18, 2, 1, 198, 18, 2, 2,
            // TCP: 80 -> 12345, seq, ack, offset 5, RST|ACK, window 0, checksum, urgent 0.
            0x00, 0x50, 0x30, 0x39, 0x01, 0x02, 0x03, 0x04, 0x0a, 0x0b, 0x0c, 0x0d,
            0x50, 0x14, 0x00, 0x00, 0xd5, 0x01, 0x00, 0x00,
        ];
        assert_eq!(n, 54);
        assert_eq!(&buf[..n], &want[..]);
        assert!(buf[n..].iter().all(|&b| b == 0xaa), "wrote past the frame");
        assert_eq!(fold(sum_reference(0, &buf[14..34])), 0xffff);
        assert!(l4_ok(&buf[..n]));

        // Field by field through an independent parser.
        let s = etherparse::SlicedPacket::from_ethernet(&buf[..n]).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
            panic!("not ipv4")
        };
        let h = ip.header();
        assert_eq!(
            (h.ttl(), h.identification(), h.dont_fragment()),
            (64, 0, true)
        );
        assert_eq!(h.total_len(), 40);
        let Some(etherparse::TransportSlice::Tcp(t)) = s.transport else {
            panic!("not tcp")
        };
        assert!(t.rst() && t.ack() && !t.syn() && !t.fin() && !t.psh());
        assert_eq!((t.source_port(), t.destination_port()), (80, 12345));
        assert_eq!(
            (t.sequence_number(), t.acknowledgment_number()),
            (0x0102_0304, 0x0a0b_0c0d)
        );
        assert_eq!((t.window_size(), t.data_offset()), (0, 5));
        assert_eq!(
            t.calc_checksum_ipv4(h.source(), h.destination()).unwrap(),
            t.checksum()
        );
    }

    #[test]
    fn a_syn_segment_has_its_flags_window_and_valid_checksums() {
        let mut buf = [0u8; MAX_RST_FRAME];
        let spec = RstSpec {
            ack: None,
            ..v4_spec()
        };
        let n = build_tcp_segment(&mut buf, &spec, tcp_flags::SYN, 64_240).unwrap();
        assert!(l4_ok(&buf[..n]));
        let p = parse(&buf[..n]).unwrap();
        assert_eq!(p.tcp_flags, tcp_flags::SYN);
        assert_eq!((p.seq, p.src_port, p.dst_port), (0x0102_0304, 80, 12345));
        {
            let s = etherparse::SlicedPacket::from_ethernet(&buf[..n]).unwrap();
            let Some(etherparse::TransportSlice::Tcp(t)) = s.transport else {
                panic!("not tcp")
            };
            assert!(t.syn() && !t.ack() && !t.rst());
            assert_eq!(t.window_size(), 64_240);
        }
        // With `ack`, the ACK flag joins; the RST builder is unchanged by the refactor.
        let n = build_tcp_segment(&mut buf, &v4_spec(), tcp_flags::RST, 0).unwrap();
        let mut rst = [0u8; MAX_RST_FRAME];
        let m = build_tcp_rst(&mut rst, &v4_spec()).unwrap();
        assert_eq!(&buf[..n], &rst[..m]);
    }

    #[test]
    fn ipv6_rst_exact_bytes() {
        let spec = RstSpec {
            src_mac: MAC_B,
            dst_mac: MAC_A,
            vlan: Some(0xf123), // only the 12-bit id is carried
            src: Addr::from_v6_bytes(V6_A),
            dst: Addr::from_v6_bytes(V6_B),
            src_port: 443,
            dst_port: 50000,
            seq: 0xfedc_ba98,
            ack: None,
        };
        let mut buf = [0u8; 100];
        let n = build_tcp_rst(&mut buf, &spec).unwrap();
        assert_eq!(n, MAX_RST_FRAME);
        let mut want = vec![0x02, 0, 0, 0, 0, 0x0a, 0x02, 0, 0, 0, 0, 0x0b];
        want.extend_from_slice(&[0x81, 0x00, 0x01, 0x23, 0x86, 0xdd]);
        want.extend_from_slice(&[0x60, 0, 0, 0, 0x00, 0x14, 0x06, 0x40]);
        want.extend_from_slice(&V6_A);
        want.extend_from_slice(&V6_B);
        want.extend_from_slice(&[0x01, 0xbb, 0xc3, 0x50, 0xfe, 0xdc, 0xba, 0x98, 0, 0, 0, 0]);
        // Offset 5, RST only, window 0, checksum d5ea, urgent 0.
        want.extend_from_slice(&[0x50, 0x04, 0x00, 0x00, 0xd5, 0xea, 0x00, 0x00]);
        assert_eq!(&buf[..n], &want[..]);
        assert!(l4_ok(&buf[..n]));
        let p = parse(&buf[..n]).unwrap();
        assert_eq!(p.vlan, Some(0x123));
        assert_eq!(
            (p.hop_limit, p.tcp_flags, p.seq, p.ack),
            (64, tcp_flags::RST, 0xfedc_ba98, 0)
        );
        assert_eq!((p.payload_len, p.l4_csum), (0, L4Checksum::Full));
    }

    #[test]
    fn refuses_short_buffers_and_mixed_families() {
        let spec = v4_spec();
        let mut buf = [0u8; 53];
        assert_eq!(build_tcp_rst(&mut buf, &spec), None);
        let mut buf = [0u8; 54];
        assert_eq!(build_tcp_rst(&mut buf, &spec), Some(54));
        let mixed = RstSpec {
            dst: Addr::from_v6_bytes(V6_B),
            ..spec
        };
        assert_eq!(build_tcp_rst(&mut [0u8; 100], &mixed), None);
        let vlan = RstSpec {
            vlan: Some(7),
            ..spec
        };
        assert_eq!(build_tcp_rst(&mut [0u8; 57], &vlan), None);
        assert_eq!(build_tcp_rst(&mut [0u8; 58], &vlan), Some(58));
    }

    fn checked_reply(f: &mut Vec<u8>) -> (Packet, Packet, usize) {
        let orig = f.clone();
        let p = parse(f).unwrap();
        let n = reply_rst_in_place(f, &p);
        assert!(n > 0 && n <= orig.len());
        f.truncate(n);
        let r = parse(f).unwrap();
        // MACs, addresses and ports swapped; the VLAN tag kept byte for byte.
        assert_eq!(&f[0..6], &orig[6..12]);
        assert_eq!(&f[6..12], &orig[0..6]);
        assert_eq!(
            &f[12..usize::from(p.l3_off)],
            &orig[12..usize::from(p.l3_off)]
        );
        assert_eq!((r.src, r.dst), (p.dst, p.src));
        assert_eq!((r.src_port, r.dst_port), (p.dst_port, p.src_port));
        assert_eq!(
            (r.vlan, r.is_v6, r.hop_limit, r.payload_len),
            (p.vlan, p.is_v6, 64, 0)
        );
        assert_eq!(usize::from(r.ip_end), n);
        assert_eq!(n, usize::from(p.l4_off) + 20);
        assert!(l4_ok(f));
        if !p.is_v6 {
            let l3 = usize::from(p.l3_off);
            assert_eq!(fold(sum_reference(0, &f[l3..l3 + 20])), 0xffff);
        }
        (p, r, n)
    }

    #[test]
    fn reply_to_a_segment_with_ack() {
        for v6 in [false, true] {
            for vlan in [None, Some(33)] {
                let l4 = L4::Tcp {
                    flags: tcp_flags::ACK | tcp_flags::PSH,
                    seq: 100,
                    ack: 0xffff_fff0,
                    opt_words: 2,
                };
                let mut f = Spec::new(v6, vlan, l4, &[7; 100]).build();
                f.resize(f.len() + 6, 0); // trailing padding is dropped too
                let (_, r, _) = checked_reply(&mut f);
                assert_eq!(r.tcp_flags, tcp_flags::RST);
                assert_eq!((r.seq, r.ack), (0xffff_fff0, 0));
            }
        }
    }

    #[test]
    fn reply_to_a_segment_without_ack() {
        for v6 in [false, true] {
            // SYN: SEG.LEN counts the SYN.
            let mut f = Spec::new(
                v6,
                None,
                L4::Tcp {
                    flags: tcp_flags::SYN,
                    seq: 0xffff_ffff,
                    ack: 0,
                    opt_words: 0,
                },
                b"",
            )
            .build();
            let (_, r, n) = checked_reply(&mut f);
            assert_eq!(r.tcp_flags, tcp_flags::RST | tcp_flags::ACK);
            assert_eq!((r.seq, r.ack), (0, 0)); // 0xffffffff + 1 wraps
            assert_eq!(n, if v6 { 74 } else { 54 });
            // SYN + FIN + data, tagged: payload and both flags count.
            let l4 = L4::Tcp {
                flags: tcp_flags::SYN | tcp_flags::FIN,
                seq: 1000,
                ack: 0,
                opt_words: 0,
            };
            let mut f = Spec::new(v6, Some(4000), l4, &[1; 10]).build();
            let (_, r, n) = checked_reply(&mut f);
            assert_eq!((r.seq, r.ack), (0, 1012));
            assert_eq!(n, if v6 { 78 } else { 58 });
        }
    }

    #[test]
    fn vlan_priority_bits_survive_a_reply() {
        let mut f = Spec::new(false, Some(12), tcp(tcp_flags::SYN), b"").build();
        f[14] |= 0xa0; // PCP 5
        let (_, r, _) = checked_reply(&mut f);
        assert_eq!(r.vlan, Some(12));
        assert_eq!(f[14] & 0xf0, 0xa0);
    }

    #[test]
    fn never_answers_rsts_or_non_tcp() {
        let mut f = Spec::new(false, None, tcp(tcp_flags::RST | tcp_flags::ACK), b"").build();
        let orig = f.clone();
        let p = parse(&f).unwrap();
        assert_eq!(reply_rst_in_place(&mut f, &p), 0);
        assert_eq!(f, orig);
        let mut f = Spec::new(true, None, L4::Udp, b"").build();
        let p = parse(&f).unwrap();
        assert_eq!(reply_rst_in_place(&mut f, &p), 0);
        let mut f = Spec::new(false, None, tcp(tcp_flags::SYN), b"").build();
        let p = parse(&f).unwrap();
        assert_eq!(reply_rst_in_place(&mut f[..40], &p), 0);
    }
}
