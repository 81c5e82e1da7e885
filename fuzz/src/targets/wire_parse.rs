//! Target: `wire::parse` on arbitrary frames, and the in-place operations that follow it on the
//! engine's hot path (hop-limit decrement, NAT rewrite, the `reset` policy's RST answer).
//!
//! Input: one control byte (which rewrite to apply), then the frame.
//!
//! Invariants:
//! - `parse` never panics; on success its offsets lie inside the frame in order, and a TCP/UDP
//!   frame reads the same through an independent reader (addresses, ports, flags, numbers,
//!   lengths, hop limit, VLAN); a well-formed TCP/UDP frame of the kinds the engine handles is
//!   never refused;
//! - the rewrite writes exactly the requested addresses and ports, changes nothing else, and
//!   keeps every checksum valid that was valid (and completes a partial one);
//! - the RST answer is a well-formed RST, with valid checksums, from the segment's destination to
//!   its source, never longer than the segment.

use std::net::IpAddr;

use xlb_engine::wire::{self, proto, L4Checksum, Packet, Rewrite};
use xlb_engine::Addr;

use crate::frames::flags::{ACK, RST};
use crate::verify::{self, Frame};

const V4: [[u8; 4]; 2] = [[198, 18, 7, 1], [198, 19, 255, 254]];
const V6: [[u8; 16]; 2] = [
    [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
    [
        0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xfe,
    ],
];

/// Runs one input. Panics when an invariant breaks.
pub fn run(data: &[u8]) {
    let Some((&control, frame)) = data.split_first() else {
        return;
    };
    let parsed = wire::parse(frame);
    let reader = verify::read(frame);
    let pkt = match parsed {
        Ok(p) => p,
        Err(_) => {
            if let Some(f) = reader {
                assert!(
                    !handled_shape(frame, &f),
                    "parse refused a well-formed frame: {f:?}"
                );
            }
            return;
        }
    };
    check_offsets(frame, &pkt);
    if pkt.proto == proto::TCP || pkt.proto == proto::UDP {
        let f = reader.expect("parse accepted a TCP/UDP frame the reader refuses");
        assert_eq!(
            (pkt.src.to_ip(), pkt.dst.to_ip(), pkt.src_port, pkt.dst_port),
            (f.src, f.dst, f.sport, f.dport)
        );
        assert_eq!(
            (pkt.is_v6, pkt.proto, pkt.hop_limit, pkt.vlan),
            (f.is_v6, f.proto, f.hop_limit, f.vlan)
        );
        assert_eq!(
            (
                usize::from(pkt.l3_off),
                usize::from(pkt.l4_off),
                usize::from(pkt.ip_end)
            ),
            (f.l3_off, f.l4_off, f.ip_end)
        );
        assert_eq!(usize::from(pkt.payload_len), f.payload_len);
        if pkt.proto == proto::TCP {
            assert_eq!((pkt.tcp_flags, pkt.seq, pkt.ack), (f.flags, f.seq, f.ack));
        }
        check_rewrite(frame, &pkt, &f, control);
        check_rst_answer(frame, &pkt, &f);
    } else {
        // ICMP: the operations must still be safe.
        let mut copy = frame.to_vec();
        wire::decrement_hop_limit(&mut copy, &pkt);
        wire::rewrite(&mut copy, &pkt, &rewrite_for(&pkt, control));
        assert_eq!(wire::reply_rst_in_place(&mut copy, &pkt), 0);
    }
}

/// Frames the engine is meant to handle: Ethernet II (+ at most one 802.1Q tag), IPv4 without
/// options, IPv6 without extension headers, no IPv4-mapped IPv6 address, TCP or UDP whose
/// lengths fit.
fn handled_shape(frame: &[u8], f: &Frame) -> bool {
    let v4_mapped = |a: IpAddr| matches!(a, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
    let ipv4_options = !f.is_v6 && f.l4_off - f.l3_off != 20;
    // A second VLAN tag (QinQ) is not handled.
    let double_tag = f.vlan.is_some() && frame.get(16..18) == Some(&[0x81, 0x00]);
    !(ipv4_options || double_tag || v4_mapped(f.src) || v4_mapped(f.dst))
}

fn check_offsets(frame: &[u8], p: &Packet) {
    let (l3, l4, end) = (
        usize::from(p.l3_off),
        usize::from(p.l4_off),
        usize::from(p.ip_end),
    );
    assert_eq!(l3, if p.vlan.is_some() { 18 } else { 14 });
    assert!(l3 < l4 && l4 <= end && end <= frame.len(), "offsets {p:?}");
    assert!(l4 + usize::from(p.payload_len) <= end);
    assert_eq!(p.src.is_v4(), !p.is_v6);
    assert_eq!(p.dst.is_v4(), !p.is_v6);
}

fn rewrite_for(p: &Packet, control: u8) -> Rewrite {
    let addr = |i: u8| {
        if p.is_v6 {
            Addr::from_v6_bytes(V6[usize::from(i & 1)])
        } else {
            Addr::from_v4_bytes(V4[usize::from(i & 1)])
        }
    };
    let port = |i: u8| if i & 1 == 0 { 8080 } else { 0xfffe };
    Rewrite {
        src: (control & 0x01 != 0).then(|| addr(control >> 4)),
        src_port: (control & 0x02 != 0).then(|| port(control >> 5)),
        dst: (control & 0x04 != 0).then(|| addr(control >> 6)),
        dst_port: (control & 0x08 != 0).then(|| port(control >> 7)),
    }
}

fn check_rewrite(frame: &[u8], p: &Packet, before: &Frame, control: u8) {
    let mut copy = frame.to_vec();
    let decremented = wire::decrement_hop_limit(&mut copy, p);
    assert_eq!(decremented, p.hop_limit > 1);
    let rw = rewrite_for(p, control);
    wire::rewrite(&mut copy, p, &rw);
    let after = verify::read(&copy).expect("a rewritten frame reads");
    let want = Frame {
        src: rw.src.map_or(before.src, Addr::to_ip),
        dst: rw.dst.map_or(before.dst, Addr::to_ip),
        sport: rw.src_port.unwrap_or(before.sport),
        dport: rw.dst_port.unwrap_or(before.dport),
        hop_limit: before.hop_limit - u8::from(decremented),
        ip_checksum_ok: after.ip_checksum_ok,
        l4_checksum_ok: after.l4_checksum_ok,
        ..*before
    };
    assert_eq!(after, want, "rewrite changed more or less than asked");
    // Bytes outside the IP packet (Ethernet padding) and the MACs are untouched.
    assert_eq!(copy[..12], frame[..12]);
    assert_eq!(copy[before.ip_end..], frame[before.ip_end..]);
    // The IPv4 header checksum is only ever updated; a partial L4 checksum is completed.
    if before.ip_checksum_ok {
        assert!(
            after.ip_checksum_ok,
            "rewrite broke the IPv4 header checksum"
        );
    }
    if before.l4_checksum_ok || p.l4_csum == L4Checksum::Partial {
        assert!(
            after.l4_checksum_ok,
            "rewrite broke a valid L4 checksum: {before:?} -> {after:?}"
        );
    }
}

fn check_rst_answer(frame: &[u8], p: &Packet, before: &Frame) {
    let mut copy = frame.to_vec();
    let len = wire::reply_rst_in_place(&mut copy, p);
    if p.proto != proto::TCP || p.tcp_flags & RST != 0 {
        assert_eq!(len, 0, "answered a non-TCP segment or an RST");
        assert_eq!(copy, frame);
        return;
    }
    assert!(len > 0 && len <= frame.len(), "RST answer of length {len}");
    let out = &copy[..len];
    let o = verify::read(out).expect("the RST answer reads as TCP");
    assert!(o.checksums_ok(), "RST answer with a bad checksum");
    assert!(wire::parse(out).is_ok());
    assert_eq!(o.flags & RST, RST);
    assert_eq!(
        (o.src, o.sport, o.dst, o.dport),
        (before.dst, before.dport, before.src, before.sport)
    );
    assert_eq!(o.payload_len, 0);
    assert_eq!(out[..6], frame[6..12]);
    assert_eq!(out[6..12], frame[..6]);
    if before.flags & ACK != 0 {
        assert_eq!(
            o.seq, before.ack,
            "RST answer to an ACK must carry seq = its ack"
        );
    }
}
