//! An independent reader of the frames the engine emits: Ethernet II (+ one 802.1Q tag), IPv4
//! or IPv6, TCP or UDP, with every checksum verified from scratch (one's-complement sums over
//! the bytes, not the engine's incremental code). The harnesses compare what the engine says
//! and does against it.

use std::net::IpAddr;

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_VLAN: u16 = 0x8100;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// What a TCP/UDP frame says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub vlan: Option<u16>,
    pub is_v6: bool,
    pub proto: u8,
    pub hop_limit: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP).
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// TCP window field (0 for UDP).
    pub window: u16,
    /// Bytes after the L4 header up to the end of the IP packet.
    pub payload_len: usize,
    /// Offsets of the IP header, the L4 header and the end of the IP packet.
    pub l3_off: usize,
    pub l4_off: usize,
    pub ip_end: usize,
    /// Whether the IPv4 header checksum verifies (always true for IPv6, which has none).
    pub ip_checksum_ok: bool,
    /// Whether the TCP/UDP checksum verifies. A UDP/IPv4 checksum of 0 (none) verifies.
    pub l4_checksum_ok: bool,
}

impl Frame {
    /// Every checksum of the frame verifies.
    pub fn checksums_ok(&self) -> bool {
        self.ip_checksum_ok && self.l4_checksum_ok
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

/// One's-complement sum of `data` (odd length padded with a zero byte), unfolded.
fn sum(mut acc: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Reads a TCP or UDP frame; `None` for anything else or anything malformed (IPv4 fragments,
/// IPv6 extension headers, lengths that do not add up).
pub fn read(frame: &[u8]) -> Option<Frame> {
    let mut ethertype = be16(frame, 12)?;
    let mut l3 = 14;
    let mut vlan = None;
    if ethertype == ETH_VLAN {
        vlan = Some(be16(frame, 14)? & 0x0fff);
        ethertype = be16(frame, 16)?;
        l3 = 18;
    }
    let (is_v6, proto, hop_limit, src, dst, l4, ip_end, ip_ok, pseudo) = match ethertype {
        ETH_IPV4 => {
            let vihl = *frame.get(l3)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 || frame.len() < l3 + ihl {
                return None;
            }
            let total = usize::from(be16(frame, l3 + 2)?);
            let frag = be16(frame, l3 + 6)?;
            if total < ihl || l3 + total > frame.len() || frag & 0x3fff != 0 {
                return None;
            }
            let h = &frame[l3..l3 + ihl];
            let ip_ok = fold(sum(0, h)) == 0xffff;
            let (s, d) = (&h[12..16], &h[16..20]);
            let proto = h[9];
            let len = (total - ihl) as u64;
            let pseudo = sum(sum(0, s), d) + u64::from(proto) + len;
            let src = IpAddr::from(<[u8; 4]>::try_from(s).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(d).ok()?);
            (
                false,
                proto,
                h[8],
                src,
                dst,
                l3 + ihl,
                l3 + total,
                ip_ok,
                pseudo,
            )
        }
        ETH_IPV6 => {
            let h = frame.get(l3..l3 + 40)?;
            if h[0] >> 4 != 6 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([h[4], h[5]]));
            if l3 + 40 + plen > frame.len() {
                return None;
            }
            let proto = h[6];
            let (s, d) = (&h[8..24], &h[24..40]);
            let pseudo = sum(sum(0, s), d) + u64::from(proto) + plen as u64;
            let src = IpAddr::from(<[u8; 16]>::try_from(s).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(d).ok()?);
            (
                true,
                proto,
                h[7],
                src,
                dst,
                l3 + 40,
                l3 + 40 + plen,
                true,
                pseudo,
            )
        }
        _ => return None,
    };
    let seg = &frame[l4..ip_end];
    let sport = be16(seg, 0)?;
    let dport = be16(seg, 2)?;
    match proto {
        TCP => {
            let off = usize::from(*seg.get(12)? >> 4) * 4;
            if off < 20 || off > seg.len() {
                return None;
            }
            Some(Frame {
                vlan,
                is_v6,
                proto,
                hop_limit,
                src,
                dst,
                sport,
                dport,
                flags: seg[13],
                seq: be32(seg, 4)?,
                ack: be32(seg, 8)?,
                window: be16(seg, 14)?,
                payload_len: seg.len() - off,
                l3_off: l3,
                l4_off: l4,
                ip_end,
                ip_checksum_ok: ip_ok,
                l4_checksum_ok: fold(sum(pseudo, seg)) == 0xffff,
            })
        }
        UDP => {
            let ulen = usize::from(be16(seg, 4)?);
            if ulen < 8 || ulen > seg.len() {
                return None;
            }
            let csum = be16(seg, 6)?;
            // The UDP checksum covers the datagram its length field delimits.
            let pseudo = pseudo - (seg.len() as u64) + ulen as u64;
            let l4_ok = (csum == 0 && !is_v6) || fold(sum(pseudo, &seg[..ulen])) == 0xffff;
            Some(Frame {
                vlan,
                is_v6,
                proto,
                hop_limit,
                src,
                dst,
                sport,
                dport,
                flags: 0,
                seq: 0,
                ack: 0,
                window: 0,
                // As the engine counts it: up to the end of the IP packet (a UDP length
                // shorter than that is legal, RFC 768; the rest is IP-level slack).
                payload_len: seg.len() - 8,
                l3_off: l3,
                l4_off: l4,
                ip_end,
                ip_checksum_ok: ip_ok,
                l4_checksum_ok: l4_ok,
            })
        }
        _ => None,
    }
}
