//! Parsing of untrusted frames: Ethernet II (+ one 802.1Q tag), IPv4 (no options, no fragments),
//! IPv6 (no extension headers), TCP, UDP, ICMP/ICMPv6.

use crate::addr::Addr;
use crate::wire::checksum::{self, L4Checksum};

/// What the engine needs to know about one frame. All offsets are from the start of the frame.
/// `Copy` and small: it lives on the stack for the duration of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// 802.1Q VLAN id when the frame carries one tag.
    pub vlan: Option<u16>,
    /// Offset of the IP header.
    pub l3_off: u16,
    /// Offset of the L4 (TCP/UDP/ICMP) header.
    pub l4_off: u16,
    /// End of the IP packet (frames may carry Ethernet padding after it).
    pub ip_end: u16,
    pub is_v6: bool,
    /// IP protocol number (see [`crate::wire::proto`]).
    pub proto: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    pub src: Addr,
    pub dst: Addr,
    /// TCP/UDP ports; for ICMP echo both are the identifier, otherwise 0.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte (0 for UDP/ICMP).
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers (0 for UDP/ICMP).
    pub seq: u32,
    pub ack: u32,
    /// TCP window field as sent (unscaled; 0 for UDP/ICMP).
    pub window: u16,
    /// The shift of the TCP window-scale option (RFC 7323), read from SYN segments only and
    /// capped at 14; [`NO_WSCALE`] when absent (or not a SYN).
    pub wscale: u8,
    /// TCP/UDP payload length in bytes (bytes after the L4 header up to `ip_end`).
    pub payload_len: u16,
    /// State of the L4 checksum as received (see [`L4Checksum`]).
    pub l4_csum: L4Checksum,
}

/// Why a frame could not be handled. Each variant is a counted drop reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParseError {
    /// Shorter than the headers it announces.
    Truncated,
    /// Not IPv4/IPv6 (ARP, LLDP, ... - these should have been passed to the kernel by XDP).
    NotIp,
    /// IP version / header length / total length / payload length inconsistent with the frame.
    BadIpHeader,
    /// IPv4 fragment (MF set or non-zero offset): the dataplane does not reassemble.
    Fragment,
    /// IPv4 header with options (IHL > 5).
    Ipv4Options,
    /// IPv6 extension headers (the first next-header is not TCP/UDP/ICMPv6).
    Ipv6ExtHeader,
    /// An IP protocol the engine does not handle.
    UnknownProtocol,
    /// TCP data offset < 5 or beyond the packet; UDP length inconsistent with the IP length.
    BadL4Header,
}

impl ParseError {
    pub const ALL: [ParseError; 8] = [
        ParseError::Truncated,
        ParseError::NotIp,
        ParseError::BadIpHeader,
        ParseError::Fragment,
        ParseError::Ipv4Options,
        ParseError::Ipv6ExtHeader,
        ParseError::UnknownProtocol,
        ParseError::BadL4Header,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ParseError::Truncated => "truncated",
            ParseError::NotIp => "not_ip",
            ParseError::BadIpHeader => "bad_ip_header",
            ParseError::Fragment => "fragment",
            ParseError::Ipv4Options => "ipv4_options",
            ParseError::Ipv6ExtHeader => "ipv6_ext_header",
            ParseError::UnknownProtocol => "unknown_protocol",
            ParseError::BadL4Header => "bad_l4_header",
        }
    }
}

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;

/// [`Packet::wscale`] of a segment without a window-scale option.
pub const NO_WSCALE: u8 = 0xff;
/// The largest window shift RFC 7323 allows; larger values are taken as this.
pub const MAX_WSCALE: u8 = 14;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;

/// IPv6 next-header values that are extension headers (IANA "IPv6 Extension Header Types").
const IPV6_EXT_HEADERS: [u8; 11] = [0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254];

/// Offset of the checksum field inside the L4 header, by protocol.
#[inline]
pub const fn l4_csum_field(proto: u8) -> usize {
    match proto {
        crate::wire::proto::TCP => 16,
        crate::wire::proto::UDP => 6,
        _ => 2,
    }
}

/// A fixed-size view `N` bytes at `off`, or `None` when the slice is too short. Lets the hot
/// path index constant offsets without any runtime check beyond this one.
#[inline]
pub(crate) fn chunk<const N: usize>(b: &[u8], off: usize) -> Option<&[u8; N]> {
    b.get(off..)?.first_chunk::<N>()
}

#[inline]
pub(crate) fn chunk_mut<const N: usize>(b: &mut [u8], off: usize) -> Option<&mut [u8; N]> {
    b.get_mut(off..)?.first_chunk_mut::<N>()
}

#[inline]
const fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses an untrusted frame. Never panics.
///
/// Errors are checked outside in: a frame cut inside a header the outer layers announce is
/// `Truncated`; an L4 header that does not fit the IP length the frame does carry is
/// `BadL4Header`. An IPv4 IHL below 5 is a malformed header (`BadIpHeader`), not options;
/// an ICMP message shorter than 8 bytes is `BadL4Header`. IPv6 packets with IPv4-mapped (`::ffff:0:0/96`) addresses are refused as
/// `BadIpHeader`: RFC 4291 forbids them on the wire, Linux drops them, and accepting them would
/// let an IPv6 packet alias an IPv4 flow in tables keyed on [`Addr`].
#[inline]
pub fn parse(frame: &[u8]) -> Result<Packet, ParseError> {
    let eth: &[u8; ETH_HLEN] = chunk(frame, 0).ok_or(ParseError::Truncated)?;
    let mut ethertype = be16([eth[12], eth[13]]);
    let mut l3_off = ETH_HLEN;
    let mut vlan = None;
    if ethertype == ETHERTYPE_VLAN {
        let tag: &[u8; VLAN_HLEN] = chunk(frame, ETH_HLEN).ok_or(ParseError::Truncated)?;
        vlan = Some(be16([tag[0], tag[1]]) & 0x0fff);
        ethertype = be16([tag[2], tag[3]]);
        l3_off += VLAN_HLEN;
    }
    match ethertype {
        ETHERTYPE_IPV4 => parse_v4(frame, l3_off, vlan),
        ETHERTYPE_IPV6 => parse_v6(frame, l3_off, vlan),
        _ => Err(ParseError::NotIp),
    }
}

// Always inlined: one frame of registers for the whole parse, no `L3` spilled to memory.
#[inline(always)]
fn parse_v4(frame: &[u8], l3_off: usize, vlan: Option<u16>) -> Result<Packet, ParseError> {
    let ip: &[u8; IPV4_HLEN] = chunk(frame, l3_off).ok_or(ParseError::Truncated)?;
    if ip[0] >> 4 != 4 {
        return Err(ParseError::BadIpHeader);
    }
    match ip[0] & 0x0f {
        5 => {}
        ihl if ihl > 5 => return Err(ParseError::Ipv4Options),
        _ => return Err(ParseError::BadIpHeader),
    }
    let total = usize::from(be16([ip[2], ip[3]]));
    if total < IPV4_HLEN {
        return Err(ParseError::BadIpHeader);
    }
    let ip_end = l3_off + total;
    if ip_end > frame.len() {
        return Err(ParseError::Truncated);
    }
    // MF (0x2000) or a non-zero offset (0x1fff); DF and the reserved bit are not our business.
    if be16([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(ParseError::Fragment);
    }
    let proto = ip[9];
    let src = Addr::from_v4_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let dst = Addr::from_v4_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let pseudo = match proto {
        crate::wire::proto::TCP | crate::wire::proto::UDP => true,
        crate::wire::proto::ICMP => false,
        _ => return Err(ParseError::UnknownProtocol),
    };
    parse_l4(L3 {
        frame,
        vlan,
        l3_off,
        l4_off: l3_off + IPV4_HLEN,
        ip_end,
        is_v6: false,
        proto,
        hop_limit: ip[8],
        src,
        dst,
        pseudo,
    })
}

// Always inlined: one frame of registers for the whole parse, no `L3` spilled to memory.
#[inline(always)]
fn parse_v6(frame: &[u8], l3_off: usize, vlan: Option<u16>) -> Result<Packet, ParseError> {
    let ip: &[u8; IPV6_HLEN] = chunk(frame, l3_off).ok_or(ParseError::Truncated)?;
    if ip[0] >> 4 != 6 {
        return Err(ParseError::BadIpHeader);
    }
    let ip_end = l3_off + IPV6_HLEN + usize::from(be16([ip[4], ip[5]]));
    if ip_end > frame.len() {
        return Err(ParseError::Truncated);
    }
    let proto = ip[6];
    match proto {
        crate::wire::proto::TCP | crate::wire::proto::UDP | crate::wire::proto::ICMPV6 => {}
        p if IPV6_EXT_HEADERS.contains(&p) => return Err(ParseError::Ipv6ExtHeader),
        _ => return Err(ParseError::UnknownProtocol),
    }
    let (Some(src_b), Some(dst_b)) = (chunk::<16>(ip, 8), chunk::<16>(ip, 24)) else {
        return Err(ParseError::Truncated);
    };
    let src = Addr::from_v6_bytes(*src_b);
    let dst = Addr::from_v6_bytes(*dst_b);
    if src.is_v4() || dst.is_v4() {
        return Err(ParseError::BadIpHeader);
    }
    parse_l4(L3 {
        frame,
        vlan,
        l3_off,
        l4_off: l3_off + IPV6_HLEN,
        ip_end,
        is_v6: true,
        proto,
        hop_limit: ip[7],
        src,
        dst,
        pseudo: true,
    })
}

/// What the IP layer found, handed to the L4 parser.
struct L3<'a> {
    frame: &'a [u8],
    vlan: Option<u16>,
    l3_off: usize,
    l4_off: usize,
    ip_end: usize,
    is_v6: bool,
    proto: u8,
    hop_limit: u8,
    src: Addr,
    dst: Addr,
    /// Whether the L4 checksum covers a pseudo-header (everything but ICMPv4).
    pseudo: bool,
}

// Always inlined: one frame of registers for the whole parse, no `L3` spilled to memory.
#[inline(always)]
fn parse_l4(l3: L3<'_>) -> Result<Packet, ParseError> {
    use crate::wire::proto::{ICMP, ICMPV6, TCP, UDP};
    // Offsets are u16 in `Packet`; a frame that cannot be described that way is refused rather
    // than silently truncated (AF_XDP frames are at most a page, so this never triggers there).
    let (Ok(l3_off), Ok(l4_off), Ok(ip_end16)) = (
        u16::try_from(l3.l3_off),
        u16::try_from(l3.l4_off),
        u16::try_from(l3.ip_end),
    ) else {
        return Err(ParseError::BadIpHeader);
    };
    // Only the IP packet counts: Ethernet padding after `ip_end` is ignored.
    let ip = l3.frame.get(..l3.ip_end).ok_or(ParseError::Truncated)?;
    let l4_room = l3.ip_end.saturating_sub(l3.l4_off);
    let mut pkt = Packet {
        vlan: l3.vlan,
        l3_off,
        l4_off,
        ip_end: ip_end16,
        is_v6: l3.is_v6,
        proto: l3.proto,
        hop_limit: l3.hop_limit,
        src: l3.src,
        dst: l3.dst,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        seq: 0,
        ack: 0,
        window: 0,
        wscale: NO_WSCALE,
        payload_len: 0,
        l4_csum: L4Checksum::Full,
    };
    // Upper-layer length as the pseudo-header states it.
    let csum_len;
    let field;
    match l3.proto {
        TCP => {
            let h: &[u8; TCP_HLEN] = chunk(ip, l3.l4_off).ok_or(ParseError::BadL4Header)?;
            let hlen = usize::from(h[12] >> 4) * 4;
            if hlen < TCP_HLEN || hlen > l4_room {
                return Err(ParseError::BadL4Header);
            }
            pkt.src_port = be16([h[0], h[1]]);
            pkt.dst_port = be16([h[2], h[3]]);
            pkt.seq = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            pkt.ack = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            pkt.tcp_flags = h[13];
            pkt.window = be16([h[14], h[15]]);
            if h[13] & crate::wire::tcp_flags::SYN != 0 {
                let opts = ip
                    .get(l3.l4_off + TCP_HLEN..l3.l4_off + hlen)
                    .unwrap_or_default();
                pkt.wscale = window_scale(opts);
            }
            pkt.payload_len = (l4_room - hlen) as u16;
            csum_len = l4_room;
            field = be16([h[16], h[17]]);
        }
        UDP => {
            let h: &[u8; UDP_HLEN] = chunk(ip, l3.l4_off).ok_or(ParseError::BadL4Header)?;
            let ulen = usize::from(be16([h[4], h[5]]));
            if ulen < UDP_HLEN || ulen > l4_room {
                return Err(ParseError::BadL4Header);
            }
            pkt.src_port = be16([h[0], h[1]]);
            pkt.dst_port = be16([h[2], h[3]]);
            pkt.payload_len = (l4_room - UDP_HLEN) as u16;
            // The UDP checksum covers the datagram as its own length field delimits it.
            csum_len = ulen;
            field = be16([h[6], h[7]]);
        }
        ICMP | ICMPV6 => {
            let h: &[u8; ICMP_HLEN] = chunk(ip, l3.l4_off).ok_or(ParseError::BadL4Header)?;
            let echo = if l3.is_v6 {
                matches!(h[0], 128 | 129)
            } else {
                matches!(h[0], 0 | 8)
            };
            if echo {
                pkt.src_port = be16([h[4], h[5]]);
                pkt.dst_port = pkt.src_port;
            }
            pkt.payload_len = (l4_room - ICMP_HLEN) as u16;
            csum_len = l4_room;
            field = be16([h[2], h[3]]);
        }
        _ => return Err(ParseError::UnknownProtocol),
    }
    let pseudo = l3
        .pseudo
        .then(|| checksum::pseudo_header_sum(l3.src, l3.dst, l3.is_v6, l3.proto, csum_len as u32));
    pkt.l4_csum = checksum::classify(field, pseudo, !l3.is_v6 && l3.proto == UDP);
    Ok(pkt)
}

/// The shift of the window-scale option (kind 3, length 3) among TCP `options`, capped at
/// [`MAX_WSCALE`]; [`NO_WSCALE`] when absent. A malformed option list ends the search (what
/// was found before it stands), as a receiving stack would stop parsing there.
fn window_scale(options: &[u8]) -> u8 {
    const EOL: u8 = 0;
    const NOP: u8 = 1;
    const WSCALE: u8 = 3;
    let mut rest = options;
    while let Some((&kind, tail)) = rest.split_first() {
        match kind {
            EOL => break,
            NOP => rest = tail,
            _ => {
                let Some(&len) = tail.first() else { break };
                let len = usize::from(len);
                if len < 2 || len > rest.len() {
                    break;
                }
                if kind == WSCALE && len == 3 {
                    if let Some(&shift) = rest.get(2) {
                        return shift.min(MAX_WSCALE);
                    }
                }
                rest = rest.get(len..).unwrap_or_default();
            }
        }
    }
    NO_WSCALE
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::wire::checksum::pseudo_header_sum;
    use crate::wire::fixtures::*;
    use crate::wire::{proto, tcp_flags};

    fn l3(vlan: Option<u16>) -> usize {
        if vlan.is_some() {
            18
        } else {
            14
        }
    }

    /// Sets a 16-bit field and returns the frame (the IPv4 header checksum is not checked by
    /// `parse`, so corrupted fixtures need not fix it).
    fn set16(mut f: Vec<u8>, off: usize, v: u16) -> Vec<u8> {
        f[off..off + 2].copy_from_slice(&v.to_be_bytes());
        f
    }

    fn set8(mut f: Vec<u8>, off: usize, v: u8) -> Vec<u8> {
        f[off] = v;
        f
    }

    #[test]
    fn valid_frames_of_every_kind() {
        let payload = b"hello, world";
        for v6 in [false, true] {
            for vlan in [None, Some(42), Some(4095)] {
                for l4 in [
                    tcp(tcp_flags::SYN),
                    L4::Udp,
                    L4::Echo { id: 0x1234 },
                    L4::Unreach,
                ] {
                    let spec = Spec::new(v6, vlan, l4, payload);
                    let f = spec.build();
                    let p = parse(&f).unwrap_or_else(|e| panic!("{spec:?}: {e:?}"));
                    let l3_off = l3(vlan);
                    let l4_off = l3_off + if v6 { 40 } else { 20 };
                    let (proto, l4_hlen, ports) = match l4 {
                        L4::Tcp { .. } => (proto::TCP, 20, (40000, 80)),
                        L4::Udp => (proto::UDP, 8, (40000, 80)),
                        L4::Echo { id } if v6 => (proto::ICMPV6, 8, (id, id)),
                        L4::Echo { id } => (proto::ICMP, 8, (id, id)),
                        L4::Unreach if v6 => (proto::ICMPV6, 8, (0, 0)),
                        L4::Unreach => (proto::ICMP, 8, (0, 0)),
                    };
                    let expected = Packet {
                        vlan,
                        l3_off: l3_off as u16,
                        l4_off: l4_off as u16,
                        ip_end: f.len() as u16,
                        is_v6: v6,
                        proto,
                        hop_limit: 64,
                        src: spec.src,
                        dst: spec.dst,
                        src_port: ports.0,
                        dst_port: ports.1,
                        tcp_flags: if proto == proto::TCP {
                            tcp_flags::SYN
                        } else {
                            0
                        },
                        seq: if proto == proto::TCP { 1000 } else { 0 },
                        ack: 0,
                        window: if proto == proto::TCP { 1000 } else { 0 },
                        wscale: NO_WSCALE,
                        payload_len: payload.len() as u16,
                        l4_csum: L4Checksum::Full,
                    };
                    assert_eq!(p, expected, "{spec:?}");
                    assert_eq!(f.len(), l4_off + l4_hlen + payload.len());
                }
            }
        }
    }

    #[test]
    fn tcp_fields_options_and_ack() {
        let l4 = L4::Tcp {
            flags: tcp_flags::ACK | tcp_flags::PSH | tcp_flags::FIN,
            seq: 0xdead_beef,
            ack: 0x0102_0304,
            opt_words: 3,
        };
        let f = Spec::new(false, None, l4, &[9; 5]).build();
        let p = parse(&f).unwrap();
        assert_eq!(
            p.tcp_flags,
            tcp_flags::ACK | tcp_flags::PSH | tcp_flags::FIN
        );
        assert_eq!((p.seq, p.ack), (0xdead_beef, 0x0102_0304));
        // 12 bytes of options are header, not payload.
        assert_eq!(p.payload_len, 5);
        assert_eq!(usize::from(p.ip_end), f.len());
    }

    #[test]
    fn window_and_window_scale_option() {
        use etherparse::{PacketBuilder, TcpOptionElement as O};
        let build = |syn: bool, opts: &[O]| {
            let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(V4_A, V4_B, 64);
            let mut b = b.tcp(1, 2, 3, 29_200);
            if syn {
                b = b.syn();
            } else {
                b = b.ack(1);
            }
            let b = b.options(opts).unwrap();
            let mut out = Vec::new();
            b.write(&mut out, b"").unwrap();
            out
        };
        let linux = [
            O::MaximumSegmentSize(1460),
            O::SelectiveAcknowledgementPermitted,
            O::Timestamp(1, 0),
            O::Noop,
            O::WindowScale(7),
        ];
        let p = parse(&build(true, &linux)).unwrap();
        assert_eq!((p.window, p.wscale), (29_200, 7));
        // RFC 7323: a shift above 14 is used as 14.
        let p = parse(&build(true, &[O::WindowScale(20)])).unwrap();
        assert_eq!(p.wscale, MAX_WSCALE);
        // Absent, or on a non-SYN segment (where it means nothing): no scale.
        assert_eq!(parse(&build(true, &linux[..3])).unwrap().wscale, NO_WSCALE);
        assert_eq!(parse(&build(false, &linux)).unwrap().wscale, NO_WSCALE);
        assert_eq!(parse(&build(false, &linux)).unwrap().window, 29_200);
        // Malformed lists end the search: a zero length, a length past the header, an
        // end-of-list before the option.
        assert_eq!(window_scale(&[2, 0, 3, 3, 7]), NO_WSCALE);
        assert_eq!(window_scale(&[2, 9, 3, 3, 7]), NO_WSCALE);
        assert_eq!(window_scale(&[0, 3, 3, 7]), NO_WSCALE);
        assert_eq!(window_scale(&[3, 3]), NO_WSCALE);
        assert_eq!(window_scale(&[3, 4, 7, 0]), NO_WSCALE);
        assert_eq!(window_scale(&[1, 1, 3, 3, 9]), 9);
        assert_eq!(window_scale(&[]), NO_WSCALE);
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        for v6 in [false, true] {
            for l4 in [tcp(tcp_flags::ACK), L4::Udp] {
                let f = Spec::new(v6, Some(7), l4, &[]).build();
                let ip_end = f.len();
                for pad in [0x00u8, 0xff] {
                    let mut padded = f.clone();
                    padded.resize(ip_end.max(60) + 8, pad);
                    let p = parse(&padded).unwrap();
                    assert_eq!(usize::from(p.ip_end), ip_end);
                    assert_eq!(p.payload_len, 0);
                    assert_eq!(p.l4_csum, L4Checksum::Full);
                }
            }
        }
    }

    #[test]
    fn truncated_at_every_length() {
        for v6 in [false, true] {
            for vlan in [None, Some(1)] {
                for l4 in [tcp(tcp_flags::SYN), L4::Udp, L4::Echo { id: 1 }] {
                    let f = Spec::new(v6, vlan, l4, b"abcd").build();
                    for len in 0..f.len() {
                        assert_eq!(
                            parse(&f[..len]),
                            Err(ParseError::Truncated),
                            "v6={v6} vlan={vlan:?} {l4:?} cut at {len}"
                        );
                    }
                    assert!(parse(&f).is_ok());
                }
            }
        }
    }

    #[test]
    fn non_ip_ethertypes() {
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC_A);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.resize(60, 0);
        assert_eq!(parse(&arp), Err(ParseError::NotIp));
        let f = Spec::new(false, None, L4::Udp, b"x").build();
        for et in [0x0806u16, 0x88cc, 0x88a8, 0x8100, 0x0000, 0x05dc, 0x86dc] {
            assert_eq!(
                parse(&set16(f.clone(), 12, et)),
                Err(ParseError::NotIp),
                "{et:#x}"
            );
        }
        // Behind a VLAN tag too, including a second tag (QinQ is not supported).
        let f = Spec::new(true, Some(3), L4::Udp, b"x").build();
        for et in [0x0806u16, 0x8100, 0x0800 + 1] {
            assert_eq!(
                parse(&set16(f.clone(), 16, et)),
                Err(ParseError::NotIp),
                "{et:#x}"
            );
        }
    }

    #[test]
    fn bad_ip_headers() {
        let v4 = Spec::new(false, None, tcp(tcp_flags::SYN), b"").build();
        let v6 = Spec::new(true, None, tcp(tcp_flags::SYN), b"").build();
        // Version nibble disagrees with the ethertype.
        assert_eq!(
            parse(&set8(v4.clone(), 14, 0x65)),
            Err(ParseError::BadIpHeader)
        );
        assert_eq!(
            parse(&set8(v6.clone(), 14, 0x45)),
            Err(ParseError::BadIpHeader)
        );
        // IHL below 5.
        for ihl in 0..5 {
            let f = set8(v4.clone(), 14, 0x40 | ihl);
            assert_eq!(parse(&f), Err(ParseError::BadIpHeader), "ihl {ihl}");
        }
        // Total length below the header.
        for total in [0u16, 1, 19] {
            let f = set16(v4.clone(), 16, total);
            assert_eq!(parse(&f), Err(ParseError::BadIpHeader), "total {total}");
        }
        // Total length / payload length beyond the frame.
        assert_eq!(
            parse(&set16(v4.clone(), 16, 41)),
            Err(ParseError::Truncated)
        );
        assert_eq!(
            parse(&set16(v4.clone(), 16, 0xffff)),
            Err(ParseError::Truncated)
        );
        assert_eq!(
            parse(&set16(v6.clone(), 18, 21)),
            Err(ParseError::Truncated)
        );
        // IPv4-mapped addresses inside IPv6.
        let mut mapped = v6.clone();
        mapped[22..38].copy_from_slice(&Addr::from_v4_bytes(V4_A).v6_bytes());
        assert_eq!(parse(&mapped), Err(ParseError::BadIpHeader));
        let mut mapped = v6;
        mapped[38..54].copy_from_slice(&Addr::from_v4_bytes(V4_A).v6_bytes());
        assert_eq!(parse(&mapped), Err(ParseError::BadIpHeader));
    }

    #[test]
    fn ipv4_options() {
        let f = Spec::new(false, None, L4::Udp, &[0; 20]).build();
        for ihl in 6..=15 {
            let f = set8(f.clone(), 14, 0x40 | ihl);
            assert_eq!(parse(&f), Err(ParseError::Ipv4Options), "ihl {ihl}");
        }
    }

    #[test]
    fn fragments() {
        let f = Spec::new(false, Some(9), L4::Udp, &[0; 20]).build();
        let off = 18 + 6;
        assert_eq!(
            parse(&set16(f.clone(), off, 0x2000)),
            Err(ParseError::Fragment)
        );
        assert_eq!(
            parse(&set16(f.clone(), off, 0x0001)),
            Err(ParseError::Fragment)
        );
        assert_eq!(
            parse(&set16(f.clone(), off, 0x1fff)),
            Err(ParseError::Fragment)
        );
        assert_eq!(
            parse(&set16(f.clone(), off, 0x6000)),
            Err(ParseError::Fragment)
        );
        // DF alone, and the reserved bit, are not fragments.
        assert!(parse(&set16(f.clone(), off, 0x4000)).is_ok());
        assert!(parse(&set16(f, off, 0x8000)).is_ok());
    }

    #[test]
    fn ipv6_extension_headers_and_unknown_protocols() {
        let v6 = Spec::new(true, None, L4::Udp, &[0; 16]).build();
        for nh in [0u8, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254] {
            let f = set8(v6.clone(), 14 + 6, nh);
            assert_eq!(parse(&f), Err(ParseError::Ipv6ExtHeader), "nh {nh}");
        }
        for nh in [1u8, 2, 4, 41, 47, 59, 132, 255] {
            let f = set8(v6.clone(), 14 + 6, nh);
            assert_eq!(parse(&f), Err(ParseError::UnknownProtocol), "nh {nh}");
        }
        let v4 = Spec::new(false, None, L4::Udp, &[0; 16]).build();
        for p in [0u8, 2, 4, 41, 47, 50, 58, 132, 255] {
            let f = set8(v4.clone(), 14 + 9, p);
            assert_eq!(parse(&f), Err(ParseError::UnknownProtocol), "proto {p}");
        }
    }

    #[test]
    fn bad_tcp_headers() {
        let f = Spec::new(false, None, tcp(tcp_flags::ACK), &[0; 8]).build();
        let doff = 14 + 20 + 12;
        for d in 0..5u8 {
            assert_eq!(
                parse(&set8(f.clone(), doff, d << 4)),
                Err(ParseError::BadL4Header)
            );
        }
        // Data offset 7 still fits (the 8 payload bytes become options); 8 does not.
        assert_eq!(
            parse(&set8(f.clone(), doff, 7 << 4)).unwrap().payload_len,
            0
        );
        assert_eq!(
            parse(&set8(f.clone(), doff, 8 << 4)),
            Err(ParseError::BadL4Header)
        );
        assert_eq!(
            parse(&set8(f.clone(), doff, 15 << 4)),
            Err(ParseError::BadL4Header)
        );
        // IP length ends inside the TCP header while the frame goes on (padding).
        assert_eq!(
            parse(&set16(f.clone(), 16, 20 + 19)),
            Err(ParseError::BadL4Header)
        );
        assert_eq!(parse(&set16(f, 16, 20)), Err(ParseError::BadL4Header));
        let f6 = Spec::new(true, None, tcp(tcp_flags::ACK), &[0; 8]).build();
        assert_eq!(parse(&set16(f6, 18, 10)), Err(ParseError::BadL4Header));
    }

    #[test]
    fn bad_udp_lengths() {
        for v6 in [false, true] {
            let f = Spec::new(v6, None, L4::Udp, &[0; 8]).build();
            let l4 = 14 + if v6 { 40 } else { 20 };
            for len in [0u16, 7, 17, 0xffff] {
                let g = set16(f.clone(), l4 + 4, len);
                assert_eq!(parse(&g), Err(ParseError::BadL4Header), "v6={v6} len {len}");
            }
            // Shorter than the IP payload is legal (RFC 768); the rest is IP-level slack.
            let p = parse(&set16(f.clone(), l4 + 4, 8)).unwrap();
            assert_eq!(p.payload_len, 8);
            // IP length too short for a UDP header.
            let ip_len_off = if v6 { 18 } else { 16 };
            let short = if v6 { 7 } else { 27 };
            let g = set16(f, ip_len_off, short);
            assert_eq!(parse(&g), Err(ParseError::BadL4Header));
        }
    }

    #[test]
    fn short_icmp() {
        for v6 in [false, true] {
            let f = Spec::new(v6, None, L4::Echo { id: 5 }, &[]).build();
            let ip_len_off = if v6 { 18 } else { 16 };
            let short = if v6 { 4 } else { 24 };
            let g = set16(f, ip_len_off, short);
            assert_eq!(parse(&g), Err(ParseError::BadL4Header), "v6={v6}");
        }
    }

    #[test]
    fn echo_replies_carry_the_identifier() {
        let f = Spec::new(false, None, L4::Echo { id: 0xabcd }, &[]).build();
        let p = parse(&set8(f, 34, 0)).unwrap();
        assert_eq!((p.src_port, p.dst_port), (0xabcd, 0xabcd));
        let f = Spec::new(true, None, L4::Echo { id: 0xabcd }, &[]).build();
        let p = parse(&set8(f.clone(), 54, 129)).unwrap();
        assert_eq!((p.src_port, p.dst_port), (0xabcd, 0xabcd));
        // ICMPv4 echo types mean nothing in ICMPv6.
        let p = parse(&set8(f, 54, 8)).unwrap();
        assert_eq!((p.src_port, p.dst_port), (0, 0));
    }

    #[test]
    fn checksum_state_detection() {
        for v6 in [false, true] {
            for l4 in [tcp(tcp_flags::SYN), L4::Udp, L4::Echo { id: 1 }] {
                let spec = Spec::new(v6, None, l4, b"payload");
                let mut f = spec.build();
                let p = parse(&f).unwrap();
                assert_eq!(p.l4_csum, L4Checksum::Full);
                let l4_off = usize::from(p.l4_off);
                let field = l4_off + l4_csum_field(p.proto);
                let len = (f.len() - l4_off) as u32;
                let partial = pseudo_header_sum(spec.src, spec.dst, v6, p.proto, len);
                f[field..field + 2].copy_from_slice(&partial.to_be_bytes());
                let expected = if p.proto == proto::ICMP {
                    L4Checksum::Full
                } else {
                    L4Checksum::Partial
                };
                assert_eq!(parse(&f).unwrap().l4_csum, expected, "v6={v6} {l4:?}");
                f[field..field + 2].copy_from_slice(&[0, 0]);
                let expected = if !v6 && p.proto == proto::UDP {
                    L4Checksum::Absent
                } else {
                    L4Checksum::Full
                };
                assert_eq!(parse(&f).unwrap().l4_csum, expected, "v6={v6} {l4:?}");
            }
        }
    }

    #[test]
    fn partial_udp_uses_the_udp_length() {
        // An IP payload longer than the UDP length: the kernel's pseudo-header uses the latter.
        let spec = Spec::new(false, None, L4::Udp, &[1, 2, 3, 4]);
        let mut f = spec.build();
        f.extend_from_slice(&[0xee; 4]);
        let total = u16::from_be_bytes([f[16], f[17]]) + 4;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        let partial = pseudo_header_sum(spec.src, spec.dst, false, proto::UDP, 12);
        f[40..42].copy_from_slice(&partial.to_be_bytes());
        let p = parse(&f).unwrap();
        assert_eq!(p.l4_csum, L4Checksum::Partial);
        assert_eq!(p.payload_len, 8);
    }
}
