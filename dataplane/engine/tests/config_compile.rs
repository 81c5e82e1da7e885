//! Compilation into a RuleSet: the documented example, stable rule ids, inbound matching,
//! SNAT port blocks, lab-time scaling.

use std::net::IpAddr;

use xlb_engine::config::{
    BackendPool, Config, Frontend, FrontendKind, LoadBalancingRule, Member, OutboundRule, Protocol,
};
use xlb_engine::ruleset::{PortBlock, RuleKind, PROTO_TCP, PROTO_UDP};
use xlb_engine::time::{mins, secs, NANOS_PER_MILLI};
use xlb_engine::{compile, Addr, MemberHealth, RuleSet};

const ICMP: u8 = 1;

fn addr(s: &str) -> Addr {
    Addr::from(s.parse::<IpAddr>().unwrap())
}

fn build(c: &Config, previous: Option<&RuleSet>, generation: u64) -> RuleSet {
    compile(c, previous, &MemberHealth::all_healthy(), generation).unwrap()
}

fn example() -> Config {
    let text = include_str!("../../../docs/examples/xlb.toml");
    Config::from_toml_str(text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn documented_example_parses_and_compiles() {
    let c = example();
    let rs = build(&c, None, 7);
    assert_eq!(rs.generation(), 7);
    assert_eq!(rs.rules().count(), 7);

    let web = rs.rule_id(RuleKind::LoadBalancing, "web").unwrap();
    assert_eq!(
        rs.match_inbound(PROTO_TCP, addr("198.18.0.10"), 80),
        Some(web)
    );
    let p = rs.rule(web).unwrap();
    assert_eq!(p.idle_timeout, mins(4));
    assert!(!p.tcp_reset);

    let ssh = rs.rule_id(RuleKind::InboundNat, "ssh-web1").unwrap();
    assert_eq!(
        rs.match_inbound(PROTO_TCP, addr("198.18.0.10"), 2201),
        Some(ssh)
    );
    assert_eq!(rs.rule(ssh).unwrap().idle_timeout, mins(10));

    let ha = rs.rule_id(RuleKind::LoadBalancing, "ha").unwrap();
    let dns = rs.rule_id(RuleKind::LoadBalancing, "dns").unwrap();
    let ilb = addr("198.18.4.100");
    assert_eq!(rs.match_inbound(PROTO_UDP, ilb, 53), Some(dns));
    assert_eq!(rs.match_inbound(PROTO_UDP, ilb, 5353), Some(ha));
    let nat_range = rs.rule_id(RuleKind::InboundNat, "ssh-apps").unwrap();
    assert_eq!(rs.match_inbound(PROTO_TCP, ilb, 50001), Some(nat_range));
    assert_eq!(rs.match_inbound(PROTO_UDP, ilb, 50001), Some(ha));

    let (out, blocks) = rs.match_outbound(PROTO_UDP, addr("198.18.2.3")).unwrap();
    assert_eq!(rs.rule(out).unwrap().kind, RuleKind::Outbound);
    assert_eq!(rs.rule(out).unwrap().idle_timeout, mins(60));
    assert_eq!(
        blocks.iter().map(|b| u32::from(b.count)).sum::<u32>(),
        10_000
    );

    for fe in &c.frontends {
        assert!(rs.is_frontend(Addr::from(fe.address)), "{}", fe.name);
    }
    assert!(!rs.is_frontend(addr("198.18.2.1")));
}

#[test]
fn config_round_trips_through_toml() {
    let c = example();
    let text = c.to_toml_string().unwrap();
    assert_eq!(Config::from_toml_str(&text).unwrap(), c);
}

fn frontend(name: &str, address: &str, kind: FrontendKind) -> Frontend {
    Frontend {
        name: name.into(),
        address: address.parse().unwrap(),
        kind,
    }
}

fn pool(name: &str, n: usize) -> BackendPool {
    BackendPool {
        name: name.into(),
        members: (0..n)
            .map(|i| {
                Member::new(
                    format!("198.19.{}.{}", (i / 256) % 256, i % 256)
                        .parse()
                        .unwrap(),
                )
            })
            .collect(),
    }
}

fn lb(name: &str, frontend: &str, protocol: Protocol, port: u32) -> LoadBalancingRule {
    LoadBalancingRule {
        name: name.into(),
        frontend: frontend.into(),
        protocol,
        frontend_port: port,
        backend_pool: "web".into(),
        backend_port: port,
        idle_timeout_minutes: 4,
        tcp_reset: false,
        floating_ip: false,
        distribution: Default::default(),
        health_probe: None,
        unknown_flow: Default::default(),
    }
}

fn lb_config(rules: &[&str]) -> Config {
    Config {
        frontends: vec![frontend("vip", "198.18.0.10", FrontendKind::Public)],
        backend_pools: vec![pool("web", 2)],
        load_balancing_rules: rules
            .iter()
            .enumerate()
            .map(|(i, n)| lb(n, "vip", Protocol::Tcp, 1000 + i as u32))
            .collect(),
        ..Config::default()
    }
}

fn id(rs: &RuleSet, name: &str) -> u16 {
    rs.rule_id(RuleKind::LoadBalancing, name)
        .unwrap_or_else(|| panic!("no rule {name}"))
}

#[test]
fn rule_ids_are_stable_across_compiles() {
    let g1 = build(&lb_config(&["a", "b", "c"]), None, 1);
    assert_eq!([id(&g1, "a"), id(&g1, "b"), id(&g1, "c")], [0, 1, 2]);
    assert_eq!(g1.rule_id_bound(), 3);
    assert_eq!(g1.since(1), Some(1));

    // Reordering and changing settings keep ids (and the generation the rule was created in).
    let mut cfg = lb_config(&["c", "a", "b"]);
    cfg.load_balancing_rules[0].idle_timeout_minutes = 9;
    let g2 = build(&cfg, Some(&g1), 2);
    assert_eq!([id(&g2, "a"), id(&g2, "b"), id(&g2, "c")], [0, 1, 2]);
    assert_eq!(g2.rule(2).unwrap().idle_timeout, mins(9));
    assert_eq!(g2.since(2), Some(1));

    // Delete "b": it is retired — no longer a rule, but its flows keep its last settings.
    let g3 = build(&lb_config(&["a", "c"]), Some(&g2), 3);
    assert_eq!(g3.rule_id(RuleKind::LoadBalancing, "b"), None);
    assert!(g3.is_retired(1));
    assert_eq!(g3.rule(1).unwrap().name.as_ref(), "b");
    assert_eq!(g3.rules().map(|(i, _)| i).collect::<Vec<_>>(), [0, 2]);
    assert_eq!(g3.retired_rules().map(|(i, _)| i).collect::<Vec<_>>(), [1]);
    assert_eq!([id(&g3, "a"), id(&g3, "c")], [0, 2]);

    // Re-add "b": a new rule, so a fresh id — never the retired one, whose flows may run.
    let g4 = build(&lb_config(&["a", "c", "b"]), Some(&g3), 4);
    assert_eq!(id(&g4, "b"), 3);
    assert_eq!(g4.since(3), Some(4));
    assert!(g4.is_retired(1), "still retired until released");

    // Rename "c" to "d": a new rule, new id; "c" retires.
    let g5 = build(&lb_config(&["a", "d", "b"]), Some(&g4), 5);
    assert_eq!(id(&g5, "d"), 4);
    assert!(g5.is_retired(2));
    assert_eq!(g5.rule(4).unwrap().name.as_ref(), "d");
}

#[test]
fn a_retired_id_is_reused_only_once_released() {
    let g1 = build(&lb_config(&["a", "b"]), None, 1);
    let g2 = build(&lb_config(&["a"]), Some(&g1), 2);
    assert!(g2.is_retired(1));
    // Retired rules match nothing.
    assert_eq!(
        g2.match_inbound(
            6,
            "198.18.0.10".parse::<std::net::IpAddr>().unwrap().into(),
            1001
        ),
        None
    );
    // Not drained: kept across further compiles.
    let g3 = build(&lb_config(&["a", "new"]), Some(&g2), 3);
    assert_eq!(id(&g3, "new"), 2);
    assert!(g3.is_retired(1));
    // Drained (no worker holds a flow of it): released, and then free for the next new rule,
    // which gets a new creation generation.
    let drained = std::collections::HashSet::from([1u16]);
    let g4 = xlb_engine::compile_releasing(
        &lb_config(&["a", "new"]),
        Some(&g3),
        &MemberHealth::default(),
        4,
        &drained,
    )
    .unwrap();
    assert_eq!(g4.rule(1), None);
    assert_eq!(g4.since(1), None);
    let g5 = build(&lb_config(&["a", "new", "newer"]), Some(&g4), 5);
    assert_eq!(id(&g5, "newer"), 1);
    assert_eq!(g5.since(1), Some(5));
}

#[test]
fn a_deleted_id_is_not_reused_in_the_same_generation() {
    let g1 = build(&lb_config(&["a", "b"]), None, 1);
    let g2 = build(&lb_config(&["a", "new"]), Some(&g1), 2);
    assert_eq!(id(&g2, "new"), 2);
    assert!(g2.is_retired(1));
}

#[test]
fn rule_ids_are_per_kind() {
    let mut c = lb_config(&["x"]);
    c.outbound_rules.push(OutboundRule {
        name: "x".into(),
        frontends: vec!["vip".into()],
        backend_pool: "web".into(),
        protocol: Protocol::Tcp,
        allocated_outbound_ports: None,
        idle_timeout_minutes: 4,
        tcp_reset: false,
        unknown_flow: Default::default(),
    });
    let g1 = build(&c, None, 1);
    let lb_id = g1.rule_id(RuleKind::LoadBalancing, "x").unwrap();
    let out_id = g1.rule_id(RuleKind::Outbound, "x").unwrap();
    assert_ne!(lb_id, out_id);
    // The LB rule goes away: the outbound rule of the same name keeps its id.
    c.load_balancing_rules.clear();
    let g2 = build(&c, Some(&g1), 2);
    assert_eq!(g2.rule_id(RuleKind::Outbound, "x"), Some(out_id));
    assert!(g2.is_retired(lb_id));
}

fn ilb_config() -> Config {
    let mut c = Config {
        frontends: vec![
            frontend("ilb", "198.18.4.100", FrontendKind::Internal),
            frontend("vip", "198.18.0.10", FrontendKind::Public),
        ],
        backend_pools: vec![pool("web", 3)],
        ..Config::default()
    };
    c.load_balancing_rules = vec![
        lb("ha", "ilb", Protocol::All, 0),
        lb("dns", "ilb", Protocol::All, 53),
        lb("web", "vip", Protocol::Tcp, 80),
        lb("tcp443", "ilb", Protocol::Tcp, 443),
    ];
    let mut nat = xlb_engine::config::InboundNatRule {
        name: "ssh".into(),
        frontend: "ilb".into(),
        protocol: Protocol::Tcp,
        frontend_port: Some(2222),
        frontend_port_range: None,
        target: Some("198.18.5.1".parse().unwrap()),
        backend_pool: None,
        backend_port: 22,
        idle_timeout_minutes: 4,
        tcp_reset: true,
        floating_ip: false,
        unknown_flow: Default::default(),
    };
    c.inbound_nat_rules.push(nat.clone());
    nat.name = "range".into();
    nat.frontend_port = None;
    nat.target = None;
    nat.frontend_port_range = Some(xlb_engine::config::PortRange {
        start: 6000,
        end: 6004,
    });
    nat.backend_pool = Some("web".into());
    c.inbound_nat_rules.push(nat);
    c
}

#[test]
fn match_inbound_precedence() {
    let rs = build(&ilb_config(), None, 1);
    let (ilb, vip) = (addr("198.18.4.100"), addr("198.18.0.10"));
    let ha = id(&rs, "ha");
    let dns = id(&rs, "dns");
    let tcp443 = id(&rs, "tcp443");
    let ssh = rs.rule_id(RuleKind::InboundNat, "ssh").unwrap();
    let range = rs.rule_id(RuleKind::InboundNat, "range").unwrap();

    // ALL on a specific port matches TCP and UDP, and beats HA ports.
    assert_eq!(rs.match_inbound(PROTO_TCP, ilb, 53), Some(dns));
    assert_eq!(rs.match_inbound(PROTO_UDP, ilb, 53), Some(dns));
    // A TCP-only rule beats HA ports for TCP only.
    assert_eq!(rs.match_inbound(PROTO_TCP, ilb, 443), Some(tcp443));
    assert_eq!(rs.match_inbound(PROTO_UDP, ilb, 443), Some(ha));
    // NAT rules beat HA ports, over their whole range.
    assert_eq!(rs.match_inbound(PROTO_TCP, ilb, 2222), Some(ssh));
    assert_eq!(rs.match_inbound(PROTO_TCP, ilb, 6000), Some(range));
    assert_eq!(rs.match_inbound(PROTO_TCP, ilb, 6004), Some(range));
    assert_eq!(rs.match_inbound(PROTO_TCP, ilb, 6005), Some(ha));
    // HA ports: every TCP and UDP port, nothing else.
    for port in [0, 1, 54, 8080, 65535] {
        assert_eq!(rs.match_inbound(PROTO_TCP, ilb, port), Some(ha));
        assert_eq!(rs.match_inbound(PROTO_UDP, ilb, port), Some(ha));
    }
    assert_eq!(rs.match_inbound(ICMP, ilb, 0), None);
    // No HA ports on the public frontend: only its specific rule.
    assert_eq!(rs.match_inbound(PROTO_TCP, vip, 80), Some(id(&rs, "web")));
    assert_eq!(rs.match_inbound(PROTO_UDP, vip, 80), None);
    assert_eq!(rs.match_inbound(PROTO_TCP, vip, 81), None);
    assert_eq!(rs.match_inbound(PROTO_TCP, addr("198.18.4.101"), 53), None);
    assert_eq!(rs.match_inbound(PROTO_TCP, addr("2001:db8::1"), 53), None);
}

#[test]
fn tcp_reset_on_ha_ports_is_refused_naming_the_field() {
    let mut c = ilb_config();
    c.load_balancing_rules[0].tcp_reset = true;
    c.load_balancing_rules[1].tcp_reset = true;
    let e = compile(&c, None, &MemberHealth::all_healthy(), 1).unwrap_err();
    assert_eq!(e.len(), 1, "{e}");
    let v = &e.0[0];
    assert_eq!(v.path, "load_balancing_rules[ha].tcp_reset");
    assert_eq!(v.value, "true");
    assert!(v.allowed.contains("false for HA-ports rules"), "{v:?}");
    c.load_balancing_rules[0].tcp_reset = false;
    let rs = build(&c, None, 1);
    assert!(!rs.rule(id(&rs, "ha")).unwrap().tcp_reset);
    assert!(rs.rule(id(&rs, "dns")).unwrap().tcp_reset);
    assert!(!rs.rule(id(&rs, "web")).unwrap().tcp_reset);
    let ssh = rs.rule_id(RuleKind::InboundNat, "ssh").unwrap();
    assert!(rs.rule(ssh).unwrap().tcp_reset);
}

#[test]
fn lab_time_scale_divides_every_timer() {
    let mut c = ilb_config();
    c.load_balancing_rules[0].idle_timeout_minutes = 30;
    let real = build(&c, None, 1);
    let t = real.timers();
    assert_eq!(t.udp_idle, secs(240));
    assert_eq!(t.tcp_close_linger, secs(2));
    assert_eq!(t.tcp_half_open, secs(30));
    assert_eq!(t.snat_fin_release, secs(240));
    assert_eq!(t.snat_rst_release, secs(15));
    assert_eq!(t.late_window, secs(120));

    c.settings.lab_time_scale = 60;
    c.settings.udp_idle_timeout_seconds = 120;
    let lab = build(&c, None, 1);
    let t = lab.timers();
    assert_eq!(t.udp_idle, secs(2));
    assert_eq!(t.tcp_close_linger, 2_000 * NANOS_PER_MILLI / 60);
    assert_eq!(t.tcp_half_open, secs(30) / 60);
    assert_eq!(t.snat_fin_release, secs(4));
    assert_eq!(t.snat_rst_release, secs(15) / 60);
    assert_eq!(t.late_window, secs(2));
    assert_eq!(lab.rule(id(&lab, "ha")).unwrap().idle_timeout, secs(30));
    assert_eq!(lab.rule(id(&lab, "web")).unwrap().idle_timeout, secs(4));
}

#[test]
fn is_frontend_covers_every_frontend_and_nothing_else() {
    let mut c = ilb_config();
    c.frontends
        .push(frontend("snat-only", "198.18.0.99", FrontendKind::Public));
    c.frontends
        .push(frontend("v6", "2001:db8::10", FrontendKind::Public));
    let rs = build(&c, None, 1);
    for a in ["198.18.4.100", "198.18.0.10", "198.18.0.99", "2001:db8::10"] {
        assert!(rs.is_frontend(addr(a)), "{a}");
    }
    for a in ["198.18.5.0", "198.18.0.11", "2001:db8::11", "0.0.0.0"] {
        assert!(!rs.is_frontend(addr(a)), "{a}");
    }
}

#[test]
fn invalid_config_does_not_compile() {
    let mut c = ilb_config();
    c.load_balancing_rules[2].idle_timeout_minutes = 31;
    let e = compile(&c, None, &MemberHealth::all_healthy(), 1).unwrap_err();
    assert_eq!(
        e.0[0].path,
        "load_balancing_rules[web].idle_timeout_minutes"
    );
}

fn snat_config(members: usize, ips: usize, ports: Option<u32>, protocol: Protocol) -> Config {
    let frontends: Vec<Frontend> = (0..ips)
        .map(|i| {
            frontend(
                &format!("snat{i}"),
                &format!("198.18.1.{}", i + 1),
                FrontendKind::Public,
            )
        })
        .collect();
    Config {
        outbound_rules: vec![OutboundRule {
            name: "out".into(),
            frontends: frontends.iter().map(|f| f.name.clone()).collect(),
            backend_pool: "web".into(),
            protocol,
            allocated_outbound_ports: ports,
            idle_timeout_minutes: 4,
            tcp_reset: false,
            unknown_flow: Default::default(),
        }],
        frontends,
        backend_pools: vec![pool("web", members)],
        ..Config::default()
    }
}

fn member(i: usize) -> Addr {
    addr(&format!("198.19.{}.{}", (i / 256) % 256, i % 256))
}

fn blocks(rs: &RuleSet, i: usize) -> Vec<PortBlock> {
    rs.match_outbound(PROTO_TCP, member(i)).unwrap().1.to_vec()
}

#[test]
fn snat_default_allocation_by_pool_size() {
    for (n, each) in [
        (1, 1024),
        (50, 1024),
        (51, 512),
        (101, 256),
        (801, 32),
        (1000, 32),
    ] {
        let rs = build(&snat_config(n, 1, None, Protocol::All), None, 1);
        let ip = addr("198.18.1.1");
        for i in 0..n {
            let b = blocks(&rs, i);
            let want = PortBlock {
                addr: ip,
                first_port: (1024 + i * each) as u16,
                count: each as u16,
            };
            assert_eq!(b, [want], "{n} members, member {i}");
        }
    }
}

#[test]
fn snat_blocks_spill_onto_the_next_frontend_ip() {
    let (ip1, ip2) = (addr("198.18.1.1"), addr("198.18.1.2"));
    let rs = build(&snat_config(4, 2, Some(32_000), Protocol::Tcp), None, 1);
    let want = [(ip1, 1024), (ip1, 33024), (ip2, 1024), (ip2, 33024)];
    for (i, (ip, first)) in want.into_iter().enumerate() {
        let b = blocks(&rs, i);
        assert_eq!(
            b,
            [PortBlock {
                addr: ip,
                first_port: first,
                count: 32_000
            }],
            "member {i}"
        );
    }

    // An allocation that straddles the end of the first IP continues on the second: the
    // blocks never pass port 65023 and add up to the allocation.
    let rs = build(&snat_config(3, 2, Some(24_000), Protocol::Tcp), None, 1);
    assert_eq!(
        blocks(&rs, 2),
        [
            PortBlock {
                addr: ip1,
                first_port: 49_024,
                count: 16_000
            },
            PortBlock {
                addr: ip2,
                first_port: 1024,
                count: 8_000
            },
        ]
    );
    let mut seen = std::collections::HashSet::new();
    for i in 0..3 {
        let b = blocks(&rs, i);
        assert_eq!(b.iter().map(|b| u32::from(b.count)).sum::<u32>(), 24_000);
        for b in b {
            assert_eq!(b.first_port % 8, 0);
            assert!(b.first_port >= 1024 && u32::from(b.first_port) + u32::from(b.count) <= 65_024);
            for p in b.first_port..b.first_port + b.count {
                assert!(
                    seen.insert((b.addr, p)),
                    "port {p} on {:?} given twice",
                    b.addr
                );
            }
        }
    }
}

#[test]
fn snat_full_capacity_fits_exactly() {
    // 125 members × 1,024 = 128,000 = 2 IPs × 64,000.
    let rs = build(&snat_config(125, 2, Some(1024), Protocol::Tcp), None, 1);
    let total: u32 = (0..125)
        .flat_map(|i| blocks(&rs, i))
        .map(|b| u32::from(b.count))
        .sum();
    assert_eq!(total, 128_000);
    let last = blocks(&rs, 124);
    let end = last.last().unwrap();
    assert_eq!(u32::from(end.first_port) + u32::from(end.count), 65_024);
    assert_eq!(end.addr, addr("198.18.1.2"));
}

#[test]
fn match_outbound_by_protocol_and_member() {
    let rs = build(&snat_config(2, 1, None, Protocol::Tcp), None, 1);
    let out = rs.rule_id(RuleKind::Outbound, "out").unwrap();
    assert_eq!(rs.match_outbound(PROTO_TCP, member(1)).unwrap().0, out);
    assert!(rs.match_outbound(PROTO_UDP, member(1)).is_none());
    assert!(rs.match_outbound(PROTO_TCP, addr("198.18.9.9")).is_none());
    assert!(rs.match_outbound(ICMP, member(1)).is_none());
    assert!(rs.is_frontend(addr("198.18.1.1")));

    let rs = build(&snat_config(2, 1, None, Protocol::All), None, 1);
    assert_eq!(
        rs.match_outbound(PROTO_TCP, member(0)).unwrap().1,
        rs.match_outbound(PROTO_UDP, member(0)).unwrap().1
    );
    assert_eq!(rs.outbound_allocations().count(), 4);
}
