//! Property tests of the wire layer: the parser never panics on hostile bytes, the in-place
//! operations never panic on whatever the parser accepts, and the fast incremental checksum
//! paths agree with a plain recomputation (differential testing, as s2n-quic does).

use etherparse::{PacketBuilder, TcpHeader, VlanId};
use proptest::prelude::*;
use xlb_engine::wire::checksum::{
    checksum, fold, pseudo_header_sum, sum_bytes, sum_reference, update128, update16, update32,
    verify_sum,
};
use xlb_engine::wire::{
    decrement_hop_limit, parse, proto, reply_rst_in_place, rewrite, tcp_flags, L4Checksum, Rewrite,
};
use xlb_engine::Addr;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Tcp { flags: u8, seq: u32, ack: u32 },
    Udp,
    Echo { id: u16 },
    Unreach,
}

#[derive(Clone, Debug)]
struct Spec {
    v6: bool,
    vlan: Option<u16>,
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
    kind: Kind,
    payload: Vec<u8>,
}

impl Spec {
    fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = match (self.vlan, self.v6) {
            (Some(v), false) => eth.single_vlan(VlanId::try_new(v).unwrap()).ipv4(
                self.src.v4_bytes(),
                self.dst.v4_bytes(),
                64,
            ),
            (Some(v), true) => eth.single_vlan(VlanId::try_new(v).unwrap()).ipv6(
                self.src.v6_bytes(),
                self.dst.v6_bytes(),
                64,
            ),
            (None, false) => eth.ipv4(self.src.v4_bytes(), self.dst.v4_bytes(), 64),
            (None, true) => eth.ipv6(self.src.v6_bytes(), self.dst.v6_bytes(), 64),
        };
        let mut out = Vec::new();
        let p = &self.payload;
        match self.kind {
            Kind::Tcp { flags, seq, ack } => {
                let mut h = TcpHeader::new(self.sport, self.dport, seq, 512);
                h.syn = flags & tcp_flags::SYN != 0;
                h.fin = flags & tcp_flags::FIN != 0;
                h.rst = flags & tcp_flags::RST != 0;
                h.ack = flags & tcp_flags::ACK != 0;
                h.acknowledgment_number = ack;
                ip.tcp_header(h).write(&mut out, p).unwrap();
            }
            Kind::Udp => ip.udp(self.sport, self.dport).write(&mut out, p).unwrap(),
            Kind::Echo { id } if self.v6 => {
                ip.icmpv6_echo_request(id, 1).write(&mut out, p).unwrap()
            }
            Kind::Echo { id } => ip.icmpv4_echo_request(id, 1).write(&mut out, p).unwrap(),
            Kind::Unreach if self.v6 => ip.icmpv6_raw(1, 0, [0; 4]).write(&mut out, p).unwrap(),
            Kind::Unreach => ip.icmpv4_raw(3, 1, [0; 4]).write(&mut out, p).unwrap(),
        }
        out
    }

    /// The spec of the frame a correct rewrite produces.
    fn rewritten(&self, rw: &Rewrite) -> Spec {
        let mut s = self.clone();
        s.src = rw.src.unwrap_or(s.src);
        s.dst = rw.dst.unwrap_or(s.dst);
        match &mut s.kind {
            Kind::Echo { id } => {
                if let Some(p) = [rw.src_port, rw.dst_port]
                    .into_iter()
                    .flatten()
                    .find(|p| p != id)
                {
                    *id = p;
                }
            }
            Kind::Unreach => {}
            _ => {
                s.sport = rw.src_port.unwrap_or(s.sport);
                s.dport = rw.dst_port.unwrap_or(s.dport);
            }
        }
        s
    }
}

fn addr(v6: bool) -> BoxedStrategy<Addr> {
    if v6 {
        any::<[u8; 16]>()
            .prop_map(|mut b| {
                // IPv4-mapped addresses are refused inside IPv6 by design.
                if Addr::from_v6_bytes(b).is_v4() {
                    b[0] = 0x20;
                }
                Addr::from_v6_bytes(b)
            })
            .boxed()
    } else {
        any::<[u8; 4]>().prop_map(Addr::from_v4_bytes).boxed()
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (any::<u8>(), any::<u32>(), any::<u32>()).prop_map(|(f, seq, ack)| Kind::Tcp {
            flags: f & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST | tcp_flags::ACK),
            seq,
            ack
        }),
        Just(Kind::Udp),
        any::<u16>().prop_map(|id| Kind::Echo { id }),
        Just(Kind::Unreach),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (any::<bool>(), proptest::option::of(0u16..4096)).prop_flat_map(|(v6, vlan)| {
        (
            addr(v6),
            addr(v6),
            any::<u16>(),
            any::<u16>(),
            kind(),
            proptest::collection::vec(any::<u8>(), 0..80),
        )
            .prop_map(move |(src, dst, sport, dport, kind, payload)| Spec {
                v6,
                vlan,
                src,
                dst,
                sport,
                dport,
                kind,
                payload,
            })
    })
}

fn rewrite_of(v6: bool) -> impl Strategy<Value = Rewrite> {
    (
        proptest::option::of(addr(v6)),
        proptest::option::of(any::<u16>()),
        proptest::option::of(addr(v6)),
        proptest::option::of(any::<u16>()),
    )
        .prop_map(|(src, src_port, dst, dst_port)| Rewrite {
            src,
            src_port,
            dst,
            dst_port,
        })
}

/// Any rewrite at all, addresses of either family included.
fn any_rewrite() -> impl Strategy<Value = Rewrite> {
    any::<bool>().prop_flat_map(rewrite_of)
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Truncate {
        keep: usize,
    },
    /// Overwrites a 16-bit length field (IPv4 total, IPv6 payload, UDP length) or the TCP data
    /// offset; which one is chosen by offset from the L3 header.
    Length {
        at: usize,
        value: u16,
    },
    Pad {
        bytes: usize,
        fill: u8,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        (
            prop_oneof![
                Just(2usize),
                Just(4),
                Just(24),
                Just(44),
                Just(32),
                Just(52)
            ],
            any::<u16>()
        )
            .prop_map(|(at, value)| Mutation::Length { at, value }),
        (0usize..40, any::<u8>()).prop_map(|(bytes, fill)| Mutation::Pad { bytes, fill }),
    ]
}

fn apply(f: &mut Vec<u8>, m: &Mutation, l3: usize) {
    match *m {
        Mutation::Flip { at, bit } => {
            if !f.is_empty() {
                let i = at % f.len();
                f[i] ^= 1 << bit;
            }
        }
        Mutation::Truncate { keep } => {
            let n = keep % (f.len() + 1);
            f.truncate(n);
        }
        Mutation::Length { at, value } => {
            // 2: IPv4 total length, 4: IPv6 payload length, 24/44: UDP length (v4/v6),
            // 32/52: TCP data-offset byte (v4/v6).
            let i = l3 + at;
            if i + 2 <= f.len() {
                f[i..i + 2].copy_from_slice(&value.to_be_bytes());
            }
        }
        Mutation::Pad { bytes, fill } => f.resize(f.len() + bytes, fill),
    }
}

/// Runs every in-place operation on copies of `f`, with the parse result and with a stale one.
fn exercise(f: &[u8], pkt: &xlb_engine::wire::Packet, rw: &Rewrite) {
    let mut g = f.to_vec();
    rewrite(&mut g, pkt, rw);
    let _ = decrement_hop_limit(&mut g, pkt);
    let n = reply_rst_in_place(&mut g, pkt);
    assert!(n <= f.len());
    if n > 0 {
        let r = parse(&g[..n]).expect("an RST reply parses");
        assert_eq!(r.tcp_flags & tcp_flags::RST, tcp_flags::RST);
        assert_eq!(l4_verify(&g[..n]), 0xffff);
    }
    let mut g = f.to_vec();
    let _ = decrement_hop_limit(&mut g, pkt);
    let mut g = f.to_vec();
    let _ = reply_rst_in_place(&mut g, pkt);
}

fn l4_verify(f: &[u8]) -> u16 {
    let p = parse(f).unwrap();
    let seg = &f[usize::from(p.l4_off)..usize::from(p.ip_end)];
    verify_sum(p.src, p.dst, p.is_v6, p.proto, seg)
}

fn csum_offset(f: &[u8]) -> usize {
    let p = parse(f).unwrap();
    usize::from(p.l4_off)
        + match p.proto {
            proto::TCP => 16,
            proto::UDP => 6,
            _ => 2,
        }
}

#[derive(Clone, Copy, Debug)]
enum State {
    Valid,
    Partial,
    Wrong(u16),
    Absent,
}

fn state() -> impl Strategy<Value = State> {
    prop_oneof![
        Just(State::Valid),
        Just(State::Partial),
        (1u16..).prop_map(State::Wrong),
        Just(State::Absent),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(pkt) = parse(&bytes) {
            exercise(&bytes, &pkt, &Rewrite::default());
        }
    }

    #[test]
    fn parse_never_panics_behind_plausible_headers(
        prefix in prop_oneof![
            Just(vec![0x08u8, 0x00, 0x45]),
            Just(vec![0x86, 0xdd, 0x60]),
            Just(vec![0x81, 0x00, 0x00, 0x05, 0x08, 0x00, 0x45]),
            Just(vec![0x81, 0x00, 0x00, 0x05, 0x86, 0xdd, 0x60]),
        ],
        rest in proptest::collection::vec(any::<u8>(), 0..120),
        rw in any_rewrite(),
    ) {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&prefix);
        f.extend_from_slice(&rest);
        if let Ok(pkt) = parse(&f) {
            exercise(&f, &pkt, &rw);
        }
    }

    #[test]
    fn mutated_frames_never_panic(
        s in spec(),
        muts in proptest::collection::vec(mutation(), 1..4),
        rw in any_rewrite(),
    ) {
        let orig = s.build();
        let stale = parse(&orig).unwrap();
        let mut f = orig.clone();
        for m in &muts {
            apply(&mut f, m, usize::from(stale.l3_off));
        }
        if let Ok(pkt) = parse(&f) {
            prop_assert!(usize::from(pkt.ip_end) <= f.len());
            prop_assert!(pkt.l3_off < pkt.l4_off && pkt.l4_off < pkt.ip_end);
            exercise(&f, &pkt, &rw);
        }
        // A packet description that no longer matches the bytes must not panic either.
        exercise(&f, &stale, &rw);
    }

    #[test]
    fn valid_frames_parse_to_their_spec(s in spec()) {
        let f = s.build();
        let p = parse(&f).unwrap();
        prop_assert_eq!((p.src, p.dst, p.is_v6, p.vlan), (s.src, s.dst, s.v6, s.vlan));
        prop_assert_eq!(usize::from(p.ip_end), f.len());
        prop_assert_eq!(usize::from(p.payload_len), s.payload.len());
        prop_assert_eq!(l4_verify(&f), 0xffff);
    }

    /// The differential test: incremental updates (and completion of partial checksums) give
    /// exactly the bytes of the frame built from scratch with the new tuple.
    #[test]
    fn rewrite_equals_rebuild(
        (s, rw) in spec().prop_flat_map(|s| { let v6 = s.v6; (Just(s), rewrite_of(v6)) }),
        st in state(),
    ) {
        let mut f = s.build();
        let at = csum_offset(&f);
        let p0 = parse(&f).unwrap();
        let len = u32::from(p0.ip_end - p0.l4_off);
        let valid = u16::from_be_bytes([f[at], f[at + 1]]);
        let field = match st {
            State::Valid => valid,
            State::Partial => pseudo_header_sum(s.src, s.dst, s.v6, p0.proto, len),
            State::Wrong(d) => valid ^ d,
            State::Absent => 0,
        };
        f[at..at + 2].copy_from_slice(&field.to_be_bytes());
        let pkt = parse(&f).unwrap();
        let mut want = s.rewritten(&rw).build();
        let before = l4_verify(&f);
        rewrite(&mut f, &pkt, &rw);
        match pkt.l4_csum {
            L4Checksum::Absent => {
                prop_assert!(matches!(st, State::Absent | State::Wrong(_)));
                want[at..at + 2].copy_from_slice(&[0, 0]);
                prop_assert_eq!(f, want);
            }
            L4Checksum::Partial => prop_assert_eq!(f, want),
            L4Checksum::Full if before == 0xffff => prop_assert_eq!(f, want),
            L4Checksum::Full => {
                // Never fixed: exactly as wrong as before, everything else as rebuilt.
                prop_assert_eq!(l4_verify(&f), before);
                f[at..at + 2].copy_from_slice(&want[at..at + 2]);
                prop_assert_eq!(f, want);
            }
        }
    }

    #[test]
    fn incremental_helpers_equal_recomputation(
        mut data in proptest::collection::vec(any::<u8>(), 24..96),
        edits in proptest::collection::vec((any::<usize>(), any::<u128>(), 0u8..3), 1..6),
    ) {
        // Word 0 non-zero: a from-scratch sum of all-zero data is the only case where the
        // two representations of zero (0x0000 / 0xffff) could differ.
        data[0] = 0x45;
        let len = data.len() & !1;
        data.truncate(len);
        // The checksum lives in word 1.
        data[2] = 0;
        data[3] = 0;
        let mut hc = checksum(&data);
        for (at, value, width) in edits {
            let bytes = [2usize, 4, 16][usize::from(width)];
            let slots = (len - 4) / 2;
            let start = 4 + (at % slots) * 2;
            if start + bytes > len {
                continue;
            }
            let old = &data[start..start + bytes];
            hc = match bytes {
                2 => {
                    let o = u16::from_be_bytes([old[0], old[1]]);
                    data[start..start + 2].copy_from_slice(&(value as u16).to_be_bytes());
                    update16(hc, o, value as u16)
                }
                4 => {
                    let o = u32::from_be_bytes([old[0], old[1], old[2], old[3]]);
                    data[start..start + 4].copy_from_slice(&(value as u32).to_be_bytes());
                    update32(hc, o, value as u32)
                }
                _ => {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(old);
                    data[start..start + 16].copy_from_slice(&value.to_be_bytes());
                    update128(hc, u128::from_be_bytes(b), value)
                }
            };
            prop_assert_eq!(hc, checksum(&data));
        }
    }

    #[test]
    fn fast_sum_equals_reference(data in proptest::collection::vec(any::<u8>(), 0..300), init in 0u64..1 << 40) {
        prop_assert_eq!(fold(sum_bytes(init, &data)), fold(sum_reference(init, &data)));
    }
}
