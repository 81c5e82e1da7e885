//! Look-ahead for a frame that will create a flow: where its reply key's index slot lies.
//!
//! A new flow writes two index slots, one per direction key, and at a million flows both are
//! cache misses. The original key's slot is known from the frame alone (stage 0 of
//! [`Engine::prefetch_addr`]); the reply key depends on the backend, so it is worked out here
//! the way `miss` will: the inbound rule, then the rule's backend choice (deterministic for a
//! tuple and a rule set). Read-only, and only for a frame whose original key the index says
//! is absent. Outbound (SNAT) flows are left out: their reply key holds the SNAT port, which
//! only the allocation picks.

use super::Engine;
use crate::flow::{Flow, Nat};
use crate::ruleset::FlowTuple;
use crate::tcp::{TcpTrack, REPLY};
use crate::wire::Packet;

impl Engine {
    /// The index slot of the reply key of the flow `pkt` (hashed as `hash`) would create, when
    /// the index already shows that `pkt` has no flow and an inbound rule would take it.
    pub(super) fn new_flow_reply_index_addr(
        &self,
        pkt: &Packet,
        tuple: &FlowTuple,
        hash: u64,
    ) -> Option<*const u8> {
        if !self.flows.surely_absent(hash) {
            return None;
        }
        let rule = self.rules.match_inbound(pkt.proto, pkt.dst, pkt.dst_port)?;
        let floating = self.rules.rule(rule)?.floating_ip;
        let backend = self.rules.select_backend(rule, tuple)?;
        let flow = Flow {
            orig_src: pkt.src,
            orig_dst: pkt.dst,
            xlat: backend.addr,
            orig_sport: pkt.src_port,
            orig_dport: pkt.dst_port,
            xlat_port: if floating { pkt.dst_port } else { backend.port },
            proto: pkt.proto,
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

    use etherparse::PacketBuilder;

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
            let record: *const u8 = std::ptr::from_ref(e.flows.get(id)).cast();
            assert_eq!(e.prefetch_addr(&f, 1), Some(record));
        }
        // No rule: nothing to fetch beyond the original slot.
        let mut f = frame(40_003, false);
        f[33] = 101; // destination 198.18.0.101
        assert!(e.prefetch_addr(&f, 0).is_some());
        assert_eq!(e.prefetch_addr(&f, 1), None);
    }
}
