//! Health and drain through the whole engine: what a member going down (failed probes or admin state
//! `down`) does to existing and new flows. Health changes reach the engine only as a new rule
//! set, exactly as the daemon publishes them.

mod common;

use std::net::IpAddr;
use std::sync::Arc;

use common::flags::*;
use common::*;
use xlb_engine::config::{AdminState, Config, MemberHealth};
use xlb_engine::{compile, Addr, DropReason, RuleSet, Verdict};

fn rules_with(config: &Config, health: &MemberHealth, lab: &Lab) -> Arc<RuleSet> {
    let prev = lab.engine.rules();
    Arc::new(compile(config, Some(prev), health, prev.generation() + 1).expect("compiles"))
}

fn default_config() -> Config {
    Config::from_toml_str(DEFAULT_CONFIG).unwrap()
}

fn rule_id(lab: &Lab, name: &str) -> u16 {
    let rules = lab.engine.rules();
    (0..rules.rule_id_bound() as u16)
        .find(|&id| rules.rule(id).is_some_and(|r| &*r.name == name))
        .unwrap_or_else(|| panic!("no rule {name}"))
}

fn other(b: IpAddr) -> IpAddr {
    if b == IpAddr::from(B1) {
        B2.into()
    } else {
        B1.into()
    }
}

fn mac_of(b: IpAddr) -> [u8; 6] {
    if b == IpAddr::from(B1) {
        B1_MAC
    } else {
        B2_MAC
    }
}

/// A client datagram to VIP:53 (the `dns` rule) from `sport`.
fn query(sport: u16, payload: &[u8]) -> Vec<u8> {
    udp(
        CLIENT_MAC,
        XLB_MAC[0],
        CLIENT.into(),
        sport,
        VIP.into(),
        53,
        payload,
    )
}

/// The backend's answer to a query it received as `q`.
fn answer(q: &Seen, payload: &[u8]) -> Vec<u8> {
    udp(
        mac_of(q.dst),
        XLB_MAC[1],
        q.dst,
        q.dport,
        q.src,
        q.sport,
        payload,
    )
}

fn send_query(lab: &mut Lab, sport: u16) -> Seen {
    let (port, out) = lab.forward(CLIENT_PORT, query(sport, b"q"));
    assert_eq!(port, BACKEND_PORT);
    let s = seen(&out);
    assert_eq!(s.dport, 5353);
    s
}

fn health_down(members: &[IpAddr]) -> MemberHealth {
    let mut h = MemberHealth::all_healthy();
    for m in members {
        h.set_healthy("web", Addr::from(*m), false);
    }
    h
}

#[test]
fn udp_flow_moves_off_a_member_that_went_down_and_replies_translate_back() {
    let mut lab = Lab::new();
    let first = send_query(&mut lab, 40_000);
    let down = first.dst;
    // A reply from the backend still finds the flow.
    let (port, out) = lab.forward(BACKEND_PORT, answer(&first, b"a1"));
    assert_eq!(port, CLIENT_PORT);
    assert_eq!(seen(&out).src, IpAddr::from(VIP));

    let rules = rules_with(&default_config(), &health_down(&[down]), &lab);
    lab.engine.set_rules(rules);
    // A reply the old backend sends before the client's next packet is still forwarded.
    let (port, _) = lab.forward(BACKEND_PORT, answer(&first, b"late"));
    assert_eq!(port, CLIENT_PORT);

    let moved = send_query(&mut lab, 40_000);
    assert_eq!(
        moved.dst,
        other(down),
        "the flow moved to the healthy member"
    );
    assert_eq!((moved.src, moved.sport), (IpAddr::from(CLIENT), 40_000));
    assert_eq!(moved.dst_mac, mac_of(moved.dst));
    assert_eq!(lab.engine.flow_count(), 1, "moved, not duplicated");
    assert_eq!(
        lab.engine.counters().rule(rule_id(&lab, "dns")).flows_moved,
        1
    );
    // The new member's replies are translated back to the VIP.
    let (port, out) = lab.forward(BACKEND_PORT, answer(&moved, b"a2"));
    assert_eq!(port, CLIENT_PORT);
    let a2 = seen(&out);
    assert_eq!((a2.src, a2.sport), (IpAddr::from(VIP), 53));
    assert_eq!((a2.dst, a2.dport), (IpAddr::from(CLIENT), 40_000));
    assert_eq!(a2.payload, b"a2");
    // The old member's replies no longer belong to the flow: never translated to the VIP
    // (in this configuration the member is also SNATed by the outbound rule `egress`, so
    // its datagram leaves as a new outbound flow from the SNAT address).
    let (v, out) = lab.send(BACKEND_PORT, answer(&first, b"stale"));
    assert!(matches!(v, Verdict::Tx { .. }), "{v:?}");
    assert_eq!(seen(&out).src, IpAddr::from(SNAT_IP));
    let flows = lab.engine.flow_count();
    assert_eq!(flows, 2, "the moved flow and the outbound one");
    // Later packets stay on the new member, also once the old one is back.
    assert_eq!(send_query(&mut lab, 40_000).dst, other(down));
    let rules = rules_with(&default_config(), &MemberHealth::all_healthy(), &lab);
    lab.engine.set_rules(rules);
    assert_eq!(
        send_query(&mut lab, 40_000).dst,
        other(down),
        "no move back"
    );

    let c = lab.engine.counters().rule(rule_id(&lab, "dns"));
    assert_eq!(c.flows_moved, 1);
    assert_eq!(
        c.flows_created, 2,
        "the moved flow counts as created once more"
    );
    assert_eq!(c.flows_expired_idle, 0);
}

#[test]
fn udp_flows_on_healthy_members_do_not_move() {
    let mut lab = Lab::new();
    let mut on: Vec<(u16, IpAddr)> = (0..40)
        .map(|i| (41_000 + i, send_query(&mut lab, 41_000 + i).dst))
        .collect();
    let down: IpAddr = B1.into();
    assert!(on.iter().any(|(_, b)| *b == down) && on.iter().any(|(_, b)| *b != down));
    let rules = rules_with(&default_config(), &health_down(&[down]), &lab);
    lab.engine.set_rules(rules);
    for (sport, was) in on.iter_mut() {
        let now = send_query(&mut lab, *sport).dst;
        if *was == down {
            assert_eq!(now, other(down));
        } else {
            assert_eq!(now, *was, "a flow on a healthy member keeps it");
        }
    }
    let moved = on.iter().filter(|(_, b)| *b == down).count() as u64;
    let c = lab.engine.counters().rule(rule_id(&lab, "dns"));
    assert_eq!(c.flows_moved, moved);
    assert_eq!(lab.engine.flow_count(), 40);
}

#[test]
fn with_every_member_down_udp_flows_end_no_new_flows_and_established_tcp_continues() {
    let mut lab = Lab::new();
    let q = send_query(&mut lab, 42_000);
    // An established TCP connection.
    let client = Tcp::client(80, 42_001);
    let (_, out) = lab.forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[]));
    let syn = seen(&out);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 5000, 1001, &[]));
    lab.forward(CLIENT_PORT, client.seg(ACK, 1001, 5001, &[]));
    assert_eq!(lab.engine.flow_count(), 2);

    let rules = rules_with(
        &default_config(),
        &health_down(&[B1.into(), B2.into()]),
        &lab,
    );
    lab.engine.set_rules(rules);

    // UDP: the flow ends, its packet is dropped and counted; later ones too, with no flow made.
    assert_eq!(
        lab.send(CLIENT_PORT, query(42_000, b"q")).0,
        Verdict::Drop(DropReason::NoBackend)
    );
    assert_eq!(lab.engine.flow_count(), 1, "only the TCP flow is left");
    assert_eq!(
        lab.send(CLIENT_PORT, query(42_000, b"q")).0,
        Verdict::Drop(DropReason::NoBackend)
    );
    let _ = q;
    // TCP: the established connection still works both ways.
    let (port, out) = lab.forward(CLIENT_PORT, client.seg(ACK | PSH, 1001, 5001, b"ping"));
    assert_eq!(port, BACKEND_PORT);
    assert_eq!(seen(&out).dst, syn.dst);
    let (port, out) = lab.forward(BACKEND_PORT, backend.seg(ACK | PSH, 5001, 1005, b"pong"));
    assert_eq!(port, CLIENT_PORT);
    assert_eq!(seen(&out).payload, b"pong");
    // No new flow of either protocol.
    assert_eq!(
        lab.send(CLIENT_PORT, Tcp::client(80, 42_002).seg(SYN, 1, 0, &[]))
            .0,
        Verdict::Drop(DropReason::NoBackend)
    );
    assert_eq!(
        lab.send(CLIENT_PORT, query(42_003, b"q")).0,
        Verdict::Drop(DropReason::NoBackend)
    );
    assert_eq!(lab.engine.flow_count(), 1);
    let dns = lab.engine.counters().rule(rule_id(&lab, "dns"));
    assert_eq!((dns.no_backend, dns.flows_moved), (3, 0));
    assert_eq!(
        lab.engine.counters().rule(rule_id(&lab, "http")).no_backend,
        1
    );

    // A member coming back takes new flows again.
    let rules = rules_with(&default_config(), &health_down(&[B1.into()]), &lab);
    lab.engine.set_rules(rules);
    assert_eq!(send_query(&mut lab, 42_000).dst, IpAddr::from(B2));
}

#[test]
fn established_tcp_to_a_down_member_continues_and_new_connections_go_elsewhere() {
    let mut lab = Lab::new();
    let client = Tcp::client(80, 43_000);
    let (_, out) = lab.forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[]));
    let syn = seen(&out);
    let down = syn.dst;
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 5000, 1001, &[]));
    lab.forward(CLIENT_PORT, client.seg(ACK, 1001, 5001, &[]));

    let rules = rules_with(&default_config(), &health_down(&[down]), &lab);
    lab.engine.set_rules(rules);
    let (_, out) = lab.forward(CLIENT_PORT, client.seg(ACK | PSH, 1001, 5001, b"data"));
    assert_eq!(
        seen(&out).dst,
        down,
        "the established flow keeps its member"
    );
    for sport in 43_001..43_041 {
        let (_, out) = lab.forward(CLIENT_PORT, Tcp::client(80, sport).seg(SYN, 7, 0, &[]));
        assert_eq!(
            seen(&out).dst,
            other(down),
            "new flows avoid the down member"
        );
    }
}

#[test]
fn admin_down_acts_like_a_failed_probe_and_admin_up_overrides_probes() {
    let mut lab = Lab::new();
    let mut on: Vec<(u16, IpAddr)> = (0..20)
        .map(|i| (44_000 + i, send_query(&mut lab, 44_000 + i).dst))
        .collect();
    // Drain B1 with admin state `down` (probes say healthy).
    let mut config = default_config();
    config.backend_pools[0].members[0].admin_state = AdminState::Down;
    let rules = rules_with(&config, &MemberHealth::all_healthy(), &lab);
    lab.engine.set_rules(rules);
    for (sport, b) in on.iter_mut() {
        *b = send_query(&mut lab, *sport).dst;
        assert_eq!(*b, IpAddr::from(B2), "UDP flows left the drained member");
    }
    for sport in 44_100..44_120 {
        let (_, out) = lab.forward(CLIENT_PORT, Tcp::client(80, sport).seg(SYN, 7, 0, &[]));
        assert_eq!(seen(&out).dst, IpAddr::from(B2));
    }

    // B2's probes fail but its admin state is `up`; B1 is back to `none` and healthy.
    config.backend_pools[0].members[0].admin_state = AdminState::None;
    config.backend_pools[0].members[1].admin_state = AdminState::Up;
    let rules = rules_with(&config, &health_down(&[B2.into()]), &lab);
    lab.engine.set_rules(rules);
    for (sport, _) in &on {
        assert_eq!(
            send_query(&mut lab, *sport).dst,
            IpAddr::from(B2),
            "`up` overrides the probe: nothing moves"
        );
    }
    let mut seen_members = std::collections::HashSet::new();
    for sport in 44_200..44_240 {
        seen_members.insert(send_query(&mut lab, sport).dst);
    }
    assert_eq!(seen_members.len(), 2, "both members take new flows");
}

#[test]
fn removing_a_member_from_the_pool_does_not_move_its_udp_flows() {
    // Configuration changes never move flows; only health does.
    let mut lab = Lab::new();
    let mut sport = 45_000;
    let q = loop {
        let q = send_query(&mut lab, sport);
        if q.dst == IpAddr::from(B1) {
            break q;
        }
        sport += 1;
    };
    let mut config = default_config();
    config.backend_pools[0].members.remove(0);
    let rules = rules_with(&config, &MemberHealth::all_healthy(), &lab);
    lab.engine.set_rules(rules);
    assert_eq!(send_query(&mut lab, sport).dst, q.dst);
    assert_eq!(
        lab.engine.counters().rule(rule_id(&lab, "dns")).flows_moved,
        0
    );
}

const NAT_UDP: &str = r#"
[[inbound_nat_rules]]
name = "syslog-b1"
frontend = "web"
protocol = "UDP"
frontend_port = 5514
target = "198.18.1.11"
backend_pool = "web"
backend_port = 514
"#;

#[test]
fn udp_flow_of_a_nat_rule_ends_when_its_target_goes_down() {
    let toml = format!("{DEFAULT_CONFIG}{NAT_UDP}");
    let mut lab = Lab::with(&toml, Default::default());
    let dgram = || {
        udp(
            CLIENT_MAC,
            XLB_MAC[0],
            CLIENT.into(),
            46_000,
            VIP.into(),
            5514,
            b"log",
        )
    };
    let (_, out) = lab.forward(CLIENT_PORT, dgram());
    assert_eq!(seen(&out).dst, IpAddr::from(B1));
    let config = Config::from_toml_str(&toml).unwrap();
    let rules = rules_with(&config, &health_down(&[B1.into()]), &lab);
    lab.engine.set_rules(rules);
    assert_eq!(
        lab.send(CLIENT_PORT, dgram()).0,
        Verdict::Drop(DropReason::NoBackend)
    );
    assert_eq!(lab.engine.flow_count(), 0);
    // Back up: a new flow to the same target.
    let rules = rules_with(&config, &MemberHealth::all_healthy(), &lab);
    lab.engine.set_rules(rules);
    let (_, out) = lab.forward(CLIENT_PORT, dgram());
    assert_eq!(seen(&out).dst, IpAddr::from(B1));
}
