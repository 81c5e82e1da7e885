//! Look-ahead for a frame that will create a flow: where its reply key's index slot lies.
//!
//! A new flow writes two index slots, one per direction key, and at a million flows both are
//! cache misses. The original key's slot is known from the frame alone (stage 0 of
//! [`Engine::prefetch_addr`]); the reply key depends on the backend, so it is worked out here
//! the way `miss` will: the inbound rule, then the rule's backend choice (deterministic for a
//! tuple and a rule set). Read-only, and only for a frame whose original key the index says
//! is absent. Outbound (SNAT) flows are left out: their reply key holds the SNAT port, which
//! only the allocation picks.
//!
//! The look-ahead reads only the tuple ([`lookahead_tuple`]), not the whole packet: a full
//! parse (checksum state, TCP options, every validity check) would cost the look-ahead more
//! than the misses it hides. A frame it reads differently from the parser only costs a
//! useless prefetch. The tuple and its hash are read once per frame ([`Lookahead`]) and
//! carried through both passes into processing ([`Engine::process_hinted`]), which parses the
//! frame for real and takes the hash only when its tuple is the look-ahead's.

use super::Engine;
use crate::addr::Addr;
use crate::flow::{Flow, Nat};
use crate::ruleset::FlowTuple;
use crate::tcp::{TcpTrack, REPLY};
use crate::wire::parse::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN};
use crate::wire::proto;

/// The 5-tuple of a TCP or UDP frame as `process` will key it, read with the fewest checks
/// that keep it in bounds: Ethernet with at most one VLAN tag, IPv4 without options and not
/// a fragment, or IPv6 without extension headers. `None` for anything else.
#[inline]
pub(super) fn lookahead_tuple(frame: &[u8]) -> Option<FlowTuple> {
    let be16 = |off: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]))
    };
    let (mut ethertype, mut l3) = (be16(12)?, 14);
    if ethertype == ETHERTYPE_VLAN {
        (ethertype, l3) = (be16(16)?, 18);
    }
    let (proto, src, dst, l4) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ip: &[u8; 20] = frame.get(l3..l3 + 20)?.try_into().ok()?;
            if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return None;
            }
            let src = Addr::from_v4_bytes(ip[12..16].try_into().ok()?);
            let dst = Addr::from_v4_bytes(ip[16..20].try_into().ok()?);
            (ip[9], src, dst, l3 + 20)
        }
        ETHERTYPE_IPV6 => {
            let ip: &[u8; 40] = frame.get(l3..l3 + 40)?.try_into().ok()?;
            let src = Addr::from_v6_bytes(ip[8..24].try_into().ok()?);
            let dst = Addr::from_v6_bytes(ip[24..40].try_into().ok()?);
            (ip[6], src, dst, l3 + 40)
        }
        _ => return None,
    };
    if proto != proto::TCP && proto != proto::UDP {
        return None;
    }
    Some(FlowTuple {
        proto,
        src,
        src_port: be16(l4)?,
        dst,
        dst_port: be16(l4 + 2)?,
    })
}

/// What the look-ahead read of a frame: its flow key and that key's hash in the flow table
/// of the engine that read it ([`Engine::lookahead`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookahead {
    tuple: FlowTuple,
    hash: u64,
    /// The seed of the hash (an engine's `hash_seed`).
    seed: u64,
}

impl Engine {
    /// Reads `frame`'s flow key and hashes it, for [`lookahead_addr`](Self::lookahead_addr)
    /// and [`process_hinted`](Self::process_hinted). `None` when the look-ahead does not
    /// read such a frame (see [`prefetch_addr`](Self::prefetch_addr)).
    #[inline]
    pub fn lookahead(&self, frame: &[u8]) -> Option<Lookahead> {
        let tuple = lookahead_tuple(frame)?;
        let hash = self.flows.hash(&tuple);
        let seed = self.cfg.hash_seed;
        Some(Lookahead { tuple, hash, seed })
    }

    /// What [`prefetch_addr`](Self::prefetch_addr) names for stage `stage` of the frame
    /// `la` was read from.
    #[inline]
    pub fn lookahead_addr(&self, la: &Lookahead, stage: u8) -> Option<*const u8> {
        if stage == 0 {
            Some(self.flows.index_addr(la.hash))
        } else {
            (self.flows.flow_addr(la.hash))
                .or_else(|| self.new_flow_reply_index_addr(&la.tuple, la.hash))
        }
    }

    /// The hash of `tuple`, a frame's key as parsed: the hint's when it is the hint's key
    /// hashed as this engine hashes (the look-ahead read that frame), else computed.
    #[inline]
    pub(super) fn hash_hinted(&self, tuple: &FlowTuple, hint: Option<&Lookahead>) -> u64 {
        match hint {
            Some(h) if h.tuple == *tuple && h.seed == self.cfg.hash_seed => h.hash,
            _ => self.flows.hash(tuple),
        }
    }

    /// The index slot of the reply key of the flow a frame with `tuple` (hashed as `hash`)
    /// would create, when the index already shows that it has no flow and an inbound rule
    /// would take it.
    pub(super) fn new_flow_reply_index_addr(
        &self,
        tuple: &FlowTuple,
        hash: u64,
    ) -> Option<*const u8> {
        if !self.flows.surely_absent(hash) {
            return None;
        }
        let rule = self
            .rules
            .match_inbound(tuple.proto, tuple.dst, tuple.dst_port)?;
        let floating = self.rules.rule(rule)?.floating_ip;
        let backend = self.rules.select_backend(rule, tuple)?;
        let flow = Flow {
            orig_src: tuple.src,
            orig_dst: tuple.dst,
            xlat: backend.addr,
            orig_sport: tuple.src_port,
            orig_dport: tuple.dst_port,
            xlat_port: if floating {
                tuple.dst_port
            } else {
                backend.port
            },
            proto: tuple.proto,
            nat: if floating { Nat::None } else { Nat::Dnat },
            rule,
            next_hop: [0; 2],
            tcp: TcpTrack::NONE,
            last_seen: 0,
        };
        Some(self.flows.index_addr(self.flows.hash(&flow.key(REPLY))))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use etherparse::{PacketBuilder, PacketBuilderStep};

    use super::lookahead_tuple;
    use crate::ruleset::FlowTuple;

    use crate::config::{compile, Config, MemberHealth};
    use crate::tcp::{ORIG, REPLY};
    use crate::{Engine, EngineConfig, Route, Verdict};

    const RULES: &str = r#"
[[frontends]]
name = "web"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }, { address = "198.18.1.13" }]

[[load_balancing_rules]]
name = "http"
frontend = "web"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080

[[load_balancing_rules]]
name = "dns"
frontend = "web"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 53
floating_ip = true
"#;

    fn engine() -> Engine {
        let cfg = Config::from_toml_str(RULES).unwrap();
        let rules = Arc::new(compile(&cfg, None, &MemberHealth::default(), 1).unwrap());
        let mut e = Engine::new(EngineConfig::default(), rules, 0);
        let net = e.next_hops();
        net.set_routes(vec![Route::v4(Ipv4Addr::new(198, 18, 0, 0), 16, 0, None)]);
        for b in 11..=13 {
            net.set_neighbor(
                Ipv4Addr::new(198, 18, 1, b).into(),
                1,
                [2, 0, 0, 0, 0xb0, b],
            )
            .unwrap();
        }
        e
    }

    fn frame(sport: u16, udp: bool) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0xc1, 1], [2, 0, 0, 0, 0xa0, 0]).ipv4(
            [198, 18, 7, 1],
            [198, 18, 0, 100],
            64,
        );
        let mut v = Vec::new();
        if udp {
            b.udp(sport, 53).write(&mut v, &[0; 8]).unwrap();
        } else {
            b.tcp(sport, 80, 1000, 64000)
                .syn()
                .write(&mut v, &[])
                .unwrap();
        }
        v
    }

    /// The look-ahead's tuple is the parser's for TCP and UDP over IPv4 and IPv6, with and
    /// without a VLAN tag, and there is none for what the engine keys no flow by.
    #[test]
    fn lookahead_tuple_is_the_parsers() {
        let (a, b) = ([2, 0, 0, 0, 0xc1, 1], [2, 0, 0, 0, 0xa0, 0]);
        let (v6a, v6b) = (
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            "2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let mut push = |b: PacketBuilderStep<etherparse::TcpHeader>| {
            let mut v = Vec::new();
            b.write(&mut v, &[1, 2, 3]).unwrap();
            frames.push(v);
        };
        push(
            PacketBuilder::ethernet2(a, b)
                .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 9)
                .tcp(1, 2, 3, 4),
        );
        push(
            PacketBuilder::ethernet2(a, b)
                .single_vlan(7.try_into().unwrap())
                .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 9)
                .tcp(5, 6, 3, 4),
        );
        push(
            PacketBuilder::ethernet2(a, b)
                .ipv6(v6a, v6b, 9)
                .tcp(7, 8, 3, 4),
        );
        for builder in [
            PacketBuilder::ethernet2(a, b)
                .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 9)
                .udp(9, 10),
            PacketBuilder::ethernet2(a, b).ipv6(v6a, v6b, 9).udp(11, 12),
            PacketBuilder::ethernet2(a, b)
                .single_vlan(8.try_into().unwrap())
                .ipv6(v6a, v6b, 9)
                .udp(13, 14),
        ] {
            let mut v = Vec::new();
            builder.write(&mut v, &[1, 2, 3]).unwrap();
            frames.push(v);
        }
        for f in &frames {
            let p = crate::wire::parse(f).unwrap();
            let want = FlowTuple {
                proto: p.proto,
                src: p.src,
                src_port: p.src_port,
                dst: p.dst,
                dst_port: p.dst_port,
            };
            assert_eq!(lookahead_tuple(f), Some(want));
        }
        // ICMP, an IPv4 fragment, IPv4 options, an IPv6 extension header, ARP, a cut frame.
        let mut icmp = Vec::new();
        PacketBuilder::ethernet2(a, b)
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 9)
            .icmpv4_echo_request(1, 1)
            .write(&mut icmp, &[])
            .unwrap();
        let mut fragment = frames[0].clone();
        fragment[20] |= 0x20; // more fragments
        let mut options = frames[0].clone();
        options[14] = 0x46;
        let mut ext = frames[2].clone();
        ext[20] = 0; // hop-by-hop options header
        let mut arp = frames[0].clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let cut = frames[0][..14 + 20 + 3].to_vec();
        for f in [icmp, fragment, options, ext, arp, cut] {
            assert_eq!(lookahead_tuple(&f), None, "{f:?}");
        }
    }

    /// For a frame that creates a flow (TCP to a DNAT rule, UDP to a floating-IP rule), stage
    /// 1 names the index slot where the created flow's reply key is looked up first; for a
    /// frame of that flow afterwards, the flow's record.
    #[test]
    fn stage_one_names_the_new_flows_reply_slot_then_its_record() {
        let mut e = engine();
        for (sport, udp) in [(40_000, false), (40_001, true), (40_002, false)] {
            let f = frame(sport, udp);
            let before = e.prefetch_addr(&f, 1).expect("an address for a new flow");
            let mut buf = f.clone();
            assert!(matches!(e.process(0, 0, &mut buf), Verdict::Tx { .. }));
            let (id, flow) = e
                .flows
                .iter()
                .find(|(_, fl)| fl.orig_sport == sport)
                .unwrap();
            let reply = flow.key(REPLY);
            assert_eq!(before, e.flows.index_addr(e.flows.hash(&reply)));
            assert_ne!(reply, flow.key(ORIG));
            let record = e.flows.record_addr(id);
            assert_eq!(e.prefetch_addr(&f, 1), Some(record));
        }
        // No rule: nothing to fetch beyond the original slot.
        let mut f = frame(40_003, false);
        f[33] = 101; // destination 198.18.0.101
        assert!(e.prefetch_addr(&f, 0).is_some());
        assert_eq!(e.prefetch_addr(&f, 1), None);
    }

    /// A frame processed with the look-ahead's reading of it is processed as without; with
    /// the reading of another frame, or of another engine's hash, too (the hint is checked,
    /// never trusted): same verdicts, same bytes out, same flows.
    #[test]
    fn a_hint_changes_nothing_and_a_wrong_one_is_not_trusted() {
        let (a, b) = (frame(40_010, false), frame(40_011, true));
        let (mut plain, mut hinted) = (engine(), engine());
        let seed = hinted.config().hash_seed ^ 1;
        let cfg = EngineConfig {
            hash_seed: seed,
            ..EngineConfig::default()
        };
        let other = Engine::new(cfg, Arc::clone(hinted.rules()), 0);
        assert_ne!(other.lookahead(&b), hinted.lookahead(&b));
        let hints = [
            hinted.lookahead(&a),
            hinted.lookahead(&b),
            other.lookahead(&b),
            None,
        ];
        for (i, hint) in hints.iter().enumerate() {
            assert_eq!(hint.is_some(), i < 3);
            for f in [&a, &b] {
                let (mut x, mut y) = (f.clone(), f.clone());
                let len = f.len();
                let vx = plain.process_buf(0, 0, &mut x, len);
                let vy = hinted.process_hinted(0, 0, &mut y, len, hint.as_ref());
                assert_eq!(vx, vy, "hint {i}");
                assert!(matches!(vy, Verdict::Tx { .. }));
                assert_eq!(x, y, "hint {i}");
            }
        }
        let key = |e: &Engine| {
            let mut v: Vec<_> = e.flows().map(|f| (f.id, f.orig, f.translated)).collect();
            v.sort_by_key(|f| f.0);
            v
        };
        assert_eq!(key(&plain), key(&hinted));
        assert_eq!(
            hinted.flow_count(),
            2,
            "one flow per frame, found again each time"
        );
    }
}
