//! Backend selection: determinism, weights, health, distribution modes, HA ports, floating
//! IP, inbound NAT.

use std::collections::HashMap;
use std::net::IpAddr;

use xlb_engine::config::{
    AdminState, BackendPool, Config, Distribution, Frontend, FrontendKind, InboundNatRule,
    LoadBalancingRule, Member, PortRange, Protocol,
};
use xlb_engine::ruleset::{Backend, FlowTuple, RuleKind, PROTO_TCP, PROTO_UDP};
use xlb_engine::{compile, Addr, MemberHealth, RuleSet};

fn addr(s: &str) -> Addr {
    Addr::from(s.parse::<IpAddr>().unwrap())
}

/// splitmix64: a reproducible stream of random tuples without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn tuple(&mut self, dst: Addr, dst_port: u16) -> FlowTuple {
        let r = self.next();
        FlowTuple {
            proto: PROTO_TCP,
            src: Addr::from_v4_bytes([
                100,
                64 + (r >> 56) as u8 % 64,
                (r >> 48) as u8,
                (r >> 40) as u8,
            ]),
            src_port: r as u16 | 1024,
            dst,
            dst_port,
        }
    }
}

const VIP: &str = "198.18.0.10";
const ILB: &str = "198.18.4.100";

fn member(a: &str, weight: u32) -> Member {
    Member {
        weight,
        ..Member::new(a.parse().unwrap())
    }
}

fn rule(name: &str, frontend: &str, protocol: Protocol, port: u32) -> LoadBalancingRule {
    LoadBalancingRule {
        name: name.into(),
        frontend: frontend.into(),
        protocol,
        frontend_port: port,
        backend_pool: "web".into(),
        backend_port: if port == 0 { 0 } else { 8080 },
        idle_timeout_minutes: 4,
        tcp_reset: false,
        floating_ip: false,
        distribution: Distribution::FiveTuple,
        health_probe: None,
        unknown_flow: Default::default(),
    }
}

fn config(weights: &[u32]) -> Config {
    Config {
        frontends: vec![
            Frontend {
                name: "vip".into(),
                address: VIP.parse().unwrap(),
                kind: FrontendKind::Public,
            },
            Frontend {
                name: "ilb".into(),
                address: ILB.parse().unwrap(),
                kind: FrontendKind::Internal,
            },
        ],
        backend_pools: vec![BackendPool {
            name: "web".into(),
            members: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| member(&format!("198.18.2.{}", i + 1), w))
                .collect(),
        }],
        load_balancing_rules: vec![rule("web", "vip", Protocol::Tcp, 80)],
        ..Config::default()
    }
}

fn build(c: &Config, health: &MemberHealth) -> RuleSet {
    compile(c, None, health, 1).unwrap()
}

fn lb_id(rs: &RuleSet, name: &str) -> u16 {
    rs.rule_id(RuleKind::LoadBalancing, name).unwrap()
}

/// How many of `n` random tuples each member gets.
fn spread(rs: &RuleSet, id: u16, n: usize) -> HashMap<Addr, usize> {
    let mut rng = Rng(42);
    let mut counts = HashMap::new();
    for _ in 0..n {
        let b = rs.select_backend(id, &rng.tuple(addr(VIP), 80)).unwrap();
        *counts.entry(b.addr).or_insert(0) += 1;
    }
    counts
}

#[test]
fn selection_is_deterministic_across_compiles() {
    let c = config(&[1, 1, 1, 1]);
    let (a, b) = (
        build(&c, &MemberHealth::all_healthy()),
        build(&c, &MemberHealth::all_healthy()),
    );
    let id = lb_id(&a, "web");
    let mut rng = Rng(7);
    for _ in 0..10_000 {
        let t = rng.tuple(addr(VIP), 80);
        let first = a.select_backend(id, &t);
        assert!(first.is_some());
        assert_eq!(first, a.select_backend(id, &t));
        assert_eq!(first, b.select_backend(id, &t));
    }
}

#[test]
fn spread_follows_weights() {
    let rs = build(&config(&[1, 2, 3, 4]), &MemberHealth::all_healthy());
    let n = 100_000;
    let counts = spread(&rs, lb_id(&rs, "web"), n);
    for (i, w) in [1.0, 2.0, 3.0, 4.0].into_iter().enumerate() {
        let got = counts[&addr(&format!("198.18.2.{}", i + 1))] as f64 / n as f64;
        let want = w / 10.0;
        assert!((got - want).abs() < 0.01, "member {i}: {got} vs {want}");
    }
}

#[test]
fn equal_weights_spread_evenly_over_many_members() {
    let rs = build(&config(&[1; 50]), &MemberHealth::all_healthy());
    let n = 100_000;
    let counts = spread(&rs, lb_id(&rs, "web"), n);
    assert_eq!(counts.len(), 50);
    for (a, c) in counts {
        let share = c as f64 / n as f64;
        assert!((share - 0.02).abs() < 0.004, "{a}: {share}");
    }
}

#[test]
fn unhealthy_members_are_never_chosen() {
    let c = config(&[1, 1, 1]);
    let mut health = MemberHealth::all_healthy();
    health.set_healthy("web", addr("198.18.2.2"), false);
    let rs = build(&c, &health);
    let counts = spread(&rs, lb_id(&rs, "web"), 20_000);
    assert!(!counts.contains_key(&addr("198.18.2.2")));
    assert_eq!(counts.len(), 2);

    // Health of another pool does not matter.
    let mut other = MemberHealth::all_healthy();
    other.set_healthy("other", addr("198.18.2.2"), false);
    let rs = build(&c, &other);
    assert_eq!(spread(&rs, lb_id(&rs, "web"), 20_000).len(), 3);
}

#[test]
fn admin_state_overrides_probes() {
    let mut c = config(&[1, 1, 1]);
    c.backend_pools[0].members[0].admin_state = AdminState::Down;
    c.backend_pools[0].members[1].admin_state = AdminState::Up;
    let mut health = MemberHealth::all_healthy();
    health.set_healthy("web", addr("198.18.2.2"), false);
    health.set_healthy("web", addr("198.18.2.3"), false);
    let rs = build(&c, &health);
    let counts = spread(&rs, lb_id(&rs, "web"), 10_000);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        [addr("198.18.2.2")]
    );
}

#[test]
fn no_healthy_member_selects_none() {
    let c = config(&[1, 1]);
    let mut health = MemberHealth::all_healthy();
    health.set_healthy("web", addr("198.18.2.1"), false);
    health.set_healthy("web", addr("198.18.2.2"), false);
    let rs = build(&c, &health);
    let t = Rng(1).tuple(addr(VIP), 80);
    assert_eq!(rs.select_backend(lb_id(&rs, "web"), &t), None);

    // Marked healthy again: chosen again.
    health.set_healthy("web", addr("198.18.2.1"), true);
    let rs = build(&c, &health);
    assert_eq!(
        rs.select_backend(lb_id(&rs, "web"), &t).unwrap().addr,
        addr("198.18.2.1")
    );

    let mut empty = config(&[]);
    empty.backend_pools[0].members.clear();
    let rs = build(&empty, &MemberHealth::all_healthy());
    assert_eq!(rs.select_backend(lb_id(&rs, "web"), &t), None);
}

#[test]
fn unknown_ids_select_none() {
    let rs = build(&config(&[1]), &MemberHealth::all_healthy());
    let t = Rng(1).tuple(addr(VIP), 80);
    assert_eq!(rs.select_backend(999, &t), None);
}

#[test]
fn source_ip_ignores_ports_five_tuple_does_not() {
    let mut c = config(&[1; 8]);
    c.load_balancing_rules[0].distribution = Distribution::SourceIp;
    let mut five = rule("five", "vip", Protocol::Tcp, 81);
    five.distribution = Distribution::FiveTuple;
    let mut sip_proto = rule("sip-proto", "vip", Protocol::All, 82);
    sip_proto.distribution = Distribution::SourceIpProtocol;
    c.load_balancing_rules.push(five);
    c.load_balancing_rules.push(sip_proto);
    let rs = build(&c, &MemberHealth::all_healthy());
    let (sip, five, sipp) = (
        lb_id(&rs, "web"),
        lb_id(&rs, "five"),
        lb_id(&rs, "sip-proto"),
    );

    let mut rng = Rng(3);
    for _ in 0..200 {
        let base = rng.tuple(addr(VIP), 80);
        let mut five_backends = std::collections::HashSet::new();
        let first = rs.select_backend(sip, &base).unwrap();
        let first_proto = rs.select_backend(sipp, &base).unwrap();
        for sport in 1024..1056 {
            let t = FlowTuple {
                src_port: sport,
                ..base
            };
            assert_eq!(rs.select_backend(sip, &t), Some(first));
            assert_eq!(rs.select_backend(sipp, &t), Some(first_proto));
            five_backends.insert(rs.select_backend(five, &t).unwrap().addr);
        }
        // 32 source ports over 8 members: five-tuple spreads them.
        assert!(five_backends.len() >= 4, "{five_backends:?}");
    }

    // source_ip_protocol: TCP and UDP of one client may go to different members, and across
    // clients they do for a fair share.
    let mut differ = 0;
    for _ in 0..1000 {
        let t = rng.tuple(addr(VIP), 82);
        let u = FlowTuple {
            proto: PROTO_UDP,
            ..t
        };
        if rs.select_backend(sipp, &t) != rs.select_backend(sipp, &u) {
            differ += 1;
        }
        // source_ip does not look at the protocol at all.
        assert_eq!(rs.select_backend(sip, &t), rs.select_backend(sip, &u));
    }
    assert!(differ > 700, "{differ}");
}

#[test]
fn ha_ports_keep_the_destination_port_and_floating_ip_keeps_the_frontend_port() {
    let mut c = config(&[1, 1]);
    c.load_balancing_rules
        .push(rule("ha", "ilb", Protocol::All, 0));
    let mut fl = rule("floating", "vip", Protocol::Udp, 5000);
    fl.floating_ip = true;
    fl.backend_port = 5000;
    c.load_balancing_rules.push(fl);
    let rs = build(&c, &MemberHealth::all_healthy());

    let mut rng = Rng(5);
    for port in [1, 22, 443, 65535] {
        let t = FlowTuple {
            proto: PROTO_UDP,
            ..rng.tuple(addr(ILB), port)
        };
        let b = rs.select_backend(lb_id(&rs, "ha"), &t).unwrap();
        assert_eq!(b.port, port);
        assert!(b.addr == addr("198.18.2.1") || b.addr == addr("198.18.2.2"));
    }
    let t = rng.tuple(addr(VIP), 5000);
    let b = rs.select_backend(lb_id(&rs, "floating"), &t).unwrap();
    assert_eq!(b.port, 5000);
    assert!(rs.rule(lb_id(&rs, "floating")).unwrap().floating_ip);
    let t = rng.tuple(addr(VIP), 80);
    assert_eq!(rs.select_backend(lb_id(&rs, "web"), &t).unwrap().port, 8080);
}

fn nat(name: &str) -> InboundNatRule {
    InboundNatRule {
        name: name.into(),
        frontend: "vip".into(),
        protocol: Protocol::Tcp,
        frontend_port: None,
        frontend_port_range: None,
        target: None,
        backend_pool: None,
        backend_port: 22,
        idle_timeout_minutes: 4,
        tcp_reset: false,
        floating_ip: false,
        unknown_flow: Default::default(),
    }
}

#[test]
fn inbound_nat_single_target() {
    let mut c = config(&[1, 1, 1]);
    c.inbound_nat_rules.push(InboundNatRule {
        frontend_port: Some(2202),
        target: Some("198.18.2.2".parse().unwrap()),
        backend_pool: Some("web".into()),
        ..nat("pooled")
    });
    c.inbound_nat_rules.push(InboundNatRule {
        frontend_port: Some(2209),
        target: Some("198.18.9.9".parse().unwrap()),
        ..nat("loose")
    });
    let mut health = MemberHealth::all_healthy();
    let rs = build(&c, &health);
    let pooled = rs.rule_id(RuleKind::InboundNat, "pooled").unwrap();
    let loose = rs.rule_id(RuleKind::InboundNat, "loose").unwrap();
    let mut rng = Rng(9);
    for _ in 0..100 {
        let t = rng.tuple(addr(VIP), 2202);
        assert_eq!(
            rs.select_backend(pooled, &t),
            Some(Backend {
                addr: addr("198.18.2.2"),
                port: 22
            })
        );
        let t = rng.tuple(addr(VIP), 2209);
        assert_eq!(
            rs.select_backend(loose, &t).unwrap().addr,
            addr("198.18.9.9")
        );
    }

    // Its pool says it is down: no backend (no fail-over: port forwarding is to one host).
    health.set_healthy("web", addr("198.18.2.2"), false);
    let rs = build(&c, &health);
    assert_eq!(rs.select_backend(pooled, &rng.tuple(addr(VIP), 2202)), None);
    assert!(rs
        .select_backend(loose, &rng.tuple(addr(VIP), 2209))
        .is_some());
}

#[test]
fn inbound_nat_port_range_maps_one_port_per_member_in_order() {
    let mut c = config(&[1, 1, 1]);
    c.inbound_nat_rules.push(InboundNatRule {
        frontend_port_range: Some(PortRange {
            start: 50_000,
            end: 50_004,
        }),
        backend_pool: Some("web".into()),
        ..nat("range")
    });
    let mut health = MemberHealth::all_healthy();
    health.set_healthy("web", addr("198.18.2.3"), false);
    let rs = build(&c, &health);
    let id = rs.rule_id(RuleKind::InboundNat, "range").unwrap();
    let mut rng = Rng(11);
    let pick = |port: u16, rng: &mut Rng| rs.select_backend(id, &rng.tuple(addr(VIP), port));
    assert_eq!(pick(50_000, &mut rng).unwrap().addr, addr("198.18.2.1"));
    assert_eq!(pick(50_001, &mut rng).unwrap().addr, addr("198.18.2.2"));
    assert_eq!(pick(50_001, &mut rng).unwrap().port, 22);
    // Member 3 is down; ports 50003–50004 are spare.
    assert_eq!(pick(50_002, &mut rng), None);
    assert_eq!(pick(50_003, &mut rng), None);
    assert_eq!(pick(50_004, &mut rng), None);
    assert_eq!(rs.match_inbound(PROTO_TCP, addr(VIP), 50_004), Some(id));
    assert_eq!(pick(49_999, &mut rng), None);
}

#[test]
fn a_member_going_down_moves_only_its_own_flows_mostly() {
    // What `pickup` relies on after a health change: tuples of healthy members mostly stay.
    let c = config(&[1; 10]);
    let before = build(&c, &MemberHealth::all_healthy());
    let mut health = MemberHealth::all_healthy();
    health.set_healthy("web", addr("198.18.2.4"), false);
    let after = build(&c, &health);
    let id = lb_id(&before, "web");
    let mut rng = Rng(13);
    let (mut kept, mut total) = (0, 0);
    for _ in 0..20_000 {
        let t = rng.tuple(addr(VIP), 80);
        let b = before.select_backend(id, &t).unwrap();
        if b.addr == addr("198.18.2.4") {
            continue;
        }
        total += 1;
        if after.select_backend(id, &t) == Some(b) {
            kept += 1;
        }
    }
    assert!(kept as f64 / total as f64 > 0.95, "{kept}/{total}");
}

#[test]
fn backend_eligible_follows_health_and_admin_state() {
    let mut c = config(&[1, 1, 1]);
    c.backend_pools[0].members[2].admin_state = AdminState::Down;
    c.inbound_nat_rules.push(InboundNatRule {
        frontend_port_range: Some(PortRange {
            start: 50_000,
            end: 50_002,
        }),
        backend_pool: Some("web".into()),
        ..nat("range")
    });
    let mut health = MemberHealth::all_healthy();
    health.set_healthy("web", addr("198.18.2.2"), false);
    let rs = build(&c, &health);
    let web = lb_id(&rs, "web");
    let range = rs.rule_id(RuleKind::InboundNat, "range").unwrap();
    for id in [web, range] {
        assert!(rs.backend_eligible(id, addr("198.18.2.1")));
        assert!(!rs.backend_eligible(id, addr("198.18.2.2")));
        assert!(!rs.backend_eligible(id, addr("198.18.2.3")));
        assert!(!rs.backend_eligible(id, addr("198.18.2.9")));
    }
    assert!(!rs.backend_eligible(999, addr("198.18.2.1")));
}

#[test]
fn backend_down_names_configured_members_that_are_down_only() {
    let mut c = config(&[1, 1, 1, 1]);
    c.backend_pools[0].members[2].admin_state = AdminState::Down;
    // Admin `up` wins over a failing probe: not down.
    c.backend_pools[0].members[3].admin_state = AdminState::Up;
    c.inbound_nat_rules.push(InboundNatRule {
        frontend_port_range: Some(PortRange {
            start: 50_000,
            end: 50_003,
        }),
        backend_pool: Some("web".into()),
        ..nat("range")
    });
    c.inbound_nat_rules.push(InboundNatRule {
        frontend_port: Some(2202),
        target: Some("198.18.2.2".parse().unwrap()),
        backend_pool: Some("web".into()),
        ..nat("single")
    });
    c.inbound_nat_rules.push(InboundNatRule {
        frontend_port: Some(2203),
        target: Some("198.18.2.9".parse().unwrap()),
        ..nat("no-pool")
    });
    let mut health = MemberHealth::all_healthy();
    health.set_healthy("web", addr("198.18.2.2"), false);
    health.set_healthy("web", addr("198.18.2.4"), false);
    let rs = build(&c, &health);
    let web = lb_id(&rs, "web");
    let range = rs.rule_id(RuleKind::InboundNat, "range").unwrap();
    for id in [web, range] {
        assert!(!rs.backend_down(id, addr("198.18.2.1")));
        assert!(rs.backend_down(id, addr("198.18.2.2")), "probe failed");
        assert!(rs.backend_down(id, addr("198.18.2.3")), "admin down");
        assert!(!rs.backend_down(id, addr("198.18.2.4")), "admin up");
        assert!(!rs.backend_down(id, addr("198.18.2.9")), "not a member");
    }
    let single = rs.rule_id(RuleKind::InboundNat, "single").unwrap();
    assert!(rs.backend_down(single, addr("198.18.2.2")));
    assert!(!rs.backend_down(single, addr("198.18.2.1")));
    let no_pool = rs.rule_id(RuleKind::InboundNat, "no-pool").unwrap();
    assert!(
        !rs.backend_down(no_pool, addr("198.18.2.9")),
        "no pool, never down"
    );
    assert!(!rs.backend_down(999, addr("198.18.2.2")), "deleted rule");
    let healthy = build(&config(&[1, 1]), &MemberHealth::all_healthy());
    assert!(!healthy.backend_down(lb_id(&healthy, "web"), addr("198.18.2.1")));
}
