//! Through the whole engine, in virtual time: drain with a deadline (flows counted, exact RSTs
//! to both ends at the deadline or nothing with the `idle` action), the NAT event log, and
//! floating-IP flows (no destination rewrite; idle timeout, keepalive refresh and reset on
//! idle exactly as for ordinary rules).

mod common;

use std::net::IpAddr;
use std::sync::Arc;

use common::flags::*;
use common::*;
use xlb_engine::config::{AdminState, Config, DrainAction, MemberHealth};
use xlb_engine::flow::Nat;
use xlb_engine::natlog::{NatEventKind, NatLogMode};
use xlb_engine::time::{mins, secs, Nanos};
use xlb_engine::{compile, Addr, EngineConfig, RuleSet, Verdict};

const CONFIG: &str = r#"
[[frontends]]
name = "web"
address = "198.18.0.100"
kind = "public"

[[frontends]]
name = "egress"
address = "198.19.0.1"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[load_balancing_rules]]
name = "http"
frontend = "web"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 4
tcp_reset = true

[[load_balancing_rules]]
name = "float"
frontend = "web"
protocol = "TCP"
frontend_port = 8080
backend_pool = "web"
backend_port = 8080
floating_ip = true
idle_timeout_minutes = 4
tcp_reset = true

[[load_balancing_rules]]
name = "float-silent"
frontend = "web"
protocol = "TCP"
frontend_port = 8081
backend_pool = "web"
backend_port = 8081
floating_ip = true
idle_timeout_minutes = 4

[[load_balancing_rules]]
name = "dns"
frontend = "web"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 5353

[[outbound_rules]]
name = "egress"
frontends = ["egress"]
backend_pool = "web"
protocol = "ALL"
allocated_outbound_ports = 8
"#;

/// One connection to VIP:`dport` on each backend: (on B1, on B2). Source ports are chosen by
/// asking the rule set where they would go, so that no other flow is made.
fn one_per_backend(lab: &mut Lab, dport: u16) -> (Conn, Conn) {
    let rules = Arc::clone(lab.engine.rules());
    let rule = rules
        .match_inbound(6, Addr::from(VIP), dport)
        .expect("a rule on the port");
    let lands_on = |sport: u16| {
        let t = xlb_engine::ruleset::FlowTuple {
            proto: 6,
            src: Addr::from(CLIENT),
            src_port: sport,
            dst: Addr::from(VIP),
            dst_port: dport,
        };
        rules.select_backend(rule, &t).map(|b| b.addr)
    };
    let s1 = (41_000..42_000)
        .find(|&p| lands_on(p) == Some(Addr::from(B1)))
        .unwrap();
    let s2 = (41_000..42_000)
        .find(|&p| lands_on(p) == Some(Addr::from(B2)))
        .unwrap();
    let (c1, c2) = (establish(lab, dport, s1), establish(lab, dport, s2));
    assert_eq!((c1.backend_ip, c2.backend_ip), (B1.into(), B2.into()));
    (c1, c2)
}

/// A small table: the census walks every slot each round.
fn lab() -> Lab {
    Lab::with(
        CONFIG,
        EngineConfig {
            flow_capacity: 4096,
            ..EngineConfig::default()
        },
    )
}

/// `CONFIG` with B1 drained since `started`, deadline `timeout_s` later, compiled against
/// the lab's rule set.
fn drained(lab: &Lab, timeout_s: Option<u32>, action: DrainAction, started: Nanos) -> Arc<RuleSet> {
    let mut config = Config::from_toml_str(CONFIG).unwrap();
    let m = &mut config.backend_pools[0].members[0];
    m.admin_state = AdminState::Down;
    m.drain_timeout_seconds = timeout_s;
    m.drain_action = action;
    let mut health = MemberHealth::default();
    health.follow_drains(&config, started);
    let prev = lab.engine.rules();
    Arc::new(compile(&config, Some(prev), &health, prev.generation() + 1).unwrap())
}

#[test]
fn a_drain_counts_the_members_flows_and_resets_them_at_its_deadline_with_exact_rsts() {
    let mut lab = lab();
    let (mut on1, mut on2) = one_per_backend(&mut lab, 80);
    let before = lab.engine.flow_count();
    on1.client_sends(&mut lab, b"before");
    on1.backend_sends(&mut lab, b"answer");

    let start = lab.now;
    let rules = drained(&lab, Some(60), DrainAction::Reset, start);
    let d = &rules.drains()[0];
    assert_eq!(
        (d.member, d.deadline, d.action),
        (Addr::from(B1), Some(start + secs(60)), DrainAction::Reset)
    );
    assert_eq!(d.rules.len(), 4, "every load-balancing rule on the pool");
    lab.engine.set_rules(rules);
    // No new flow to B1 from now on.
    for sport in 42_000..42_020 {
        let c = establish(&mut lab, 80, sport);
        assert_eq!(c.backend_ip, IpAddr::from(B2));
    }
    // The census counts B1's one flow.
    lab.run_until(start + secs(1));
    let p = &lab.engine.drain_progress()[0];
    assert_eq!(
        (p.member, p.flows_left, p.deadline_done),
        (Addr::from(B1), Some(1), false)
    );
    // Before the deadline the drained connection works both ways.
    lab.run_until(start + secs(59));
    on1.client_sends(&mut lab, b"still");
    on1.backend_sends(&mut lab, b"here");
    assert!(lab.emitted.is_empty());

    // At the deadline: the two RSTs of reset on idle, exact, and the flow is gone.
    lab.run_until(start + secs(60) + secs(1));
    let want = on1.expected_rsts((VIP.into(), 80), (on1.backend_ip, 8080));
    let got = lab.emitted.clone();
    assert_eq!(
        got,
        vec![
            (CLIENT_PORT, want[0].clone()),
            (BACKEND_PORT, want[1].clone())
        ]
    );
    let p = &lab.engine.drain_progress()[0];
    assert_eq!(
        (p.flows_left, p.flows_reset, p.flows_ended, p.deadline_done),
        (Some(0), 1, 0, true)
    );
    assert_eq!(lab.engine.flow_count(), before + 20 - 1);
    assert_eq!(lab.engine.counters().rsts_sent, 2);
    // The other member's connection is untouched; B1's late packet is counted late.
    on2.client_sends(&mut lab, b"other");
    let (v, _) = lab.send(
        CLIENT_PORT,
        on1.client.seg(ACK | PSH, on1.c_seq, on1.s_seq, b"late"),
    );
    assert!(matches!(v, Verdict::Drop(_)));
    let http = lab
        .engine
        .rules()
        .rule_id(xlb_engine::ruleset::RuleKind::LoadBalancing, "http");
    assert_eq!(lab.engine.counters().rule(http.unwrap()).late_packets, 1);
}

#[test]
fn a_drain_with_the_idle_action_leaves_the_flows_to_their_idle_timeout() {
    let mut lab = lab();
    let (_on1, _on2) = one_per_backend(&mut lab, 80);
    let start = lab.now;
    lab.engine
        .set_rules(drained(&lab, Some(30), DrainAction::Idle, start));
    lab.run_until(start + secs(31));
    assert!(lab.emitted.is_empty(), "nothing at the deadline");
    let p = &lab.engine.drain_progress()[0];
    assert_eq!(
        (p.flows_left, p.flows_reset, p.deadline_done),
        (Some(1), 0, true)
    );
    // The rule's idle timeout (4 minutes, reset on idle) ends it as usual.
    lab.run_until(start + mins(4) + secs(1));
    assert_eq!(
        lab.emitted.len(),
        4,
        "reset on idle, of both members' connections"
    );
    lab.run_until(start + mins(4) + secs(2));
    assert_eq!(lab.engine.drain_progress()[0].flows_left, Some(0));
}

#[test]
fn a_drain_without_deadline_counts_and_the_census_settles_once_nothing_is_left() {
    let mut lab = lab();
    let start = lab.now;
    lab.engine
        .set_rules(drained(&lab, None, DrainAction::Reset, start));
    assert_eq!(lab.engine.rules().drains()[0].deadline, None);
    lab.run_until(start + secs(1));
    assert_eq!(lab.engine.drain_progress()[0].flows_left, Some(0));
    assert_eq!(
        lab.engine.next_deadline(),
        None,
        "no flow, no deadline: the census stops"
    );
    // A drain whose start was never recorded has no deadline either.
    let mut config = Config::from_toml_str(CONFIG).unwrap();
    config.backend_pools[0].members[0].admin_state = AdminState::Down;
    config.backend_pools[0].members[0].drain_timeout_seconds = Some(5);
    let rs = compile(&config, None, &MemberHealth::default(), 9).unwrap();
    assert_eq!(rs.drains()[0].deadline, None);
}

#[test]
fn drain_start_times_follow_the_admin_state() {
    let mut config = Config::from_toml_str(CONFIG).unwrap();
    let mut h = MemberHealth::default();
    h.follow_drains(&config, 10);
    assert_eq!(h, MemberHealth::default());
    config.backend_pools[0].members[0].admin_state = AdminState::Down;
    h.follow_drains(&config, 20);
    assert_eq!(h.drain_started("web", B1), Some(20));
    // Staying drained keeps the start; a changed deadline counts from it.
    config.backend_pools[0].members[0].drain_timeout_seconds = Some(7);
    h.follow_drains(&config, 30);
    assert_eq!(h.drain_started("web", B1), Some(20));
    let rs = compile(&config, None, &h, 1).unwrap();
    assert_eq!(rs.drains()[0].deadline, Some(20 + secs(7)));
    // Undrained: forgotten, and a new drain starts afresh.
    config.backend_pools[0].members[0].admin_state = AdminState::None;
    h.follow_drains(&config, 40);
    assert_eq!(h.drain_started("web", B1), None);
    assert!(compile(&config, None, &h, 2).unwrap().drains().is_empty());
}

#[test]
fn snat_allocations_and_releases_are_logged_with_every_address_and_port() {
    let mut lab = Lab::with(
        CONFIG,
        EngineConfig {
            nat_log: NatLogMode::Snat,
            ..EngineConfig::default()
        },
    );
    let member = Tcp::member_to_remote(50_000);
    let (port, out) = lab.forward(BACKEND_PORT, member.seg(SYN, 5, 0, &[]));
    assert_eq!(port, INTERNET_PORT);
    let syn = seen(&out);
    // An LB flow is not logged in this mode.
    establish(&mut lab, 80, 43_000);
    let mut events = Vec::new();
    lab.engine.drain_nat_events(|e| events.push(e));
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(
        (e.kind, e.nat, e.proto, e.at),
        (NatEventKind::Create, Nat::Snat, 6, T0)
    );
    assert_eq!(e.src, (Addr::from(B1), 50_000));
    assert_eq!(e.post_src, (Addr::from(SNAT_IP), syn.sport));
    assert_eq!(
        (e.dst, e.post_dst),
        ((Addr::from(REMOTE), 443), (Addr::from(REMOTE), 443))
    );
    // The remote host resets: the port is released after its RST linger, and logged then.
    let remote = Tcp::reply_to(&syn, NET_MAC, XLB_MAC[2]);
    lab.forward(INTERNET_PORT, remote.seg(RST | ACK, 0, 6, &[]));
    let reset_at = lab.now;
    lab.run_until(reset_at + secs(16));
    lab.engine.drain_nat_events(|e| events.push(e));
    assert_eq!(events.len(), 2);
    let d = events[1];
    assert_eq!(d.kind, NatEventKind::Delete);
    assert_eq!((d.src, d.post_src, d.dst), (e.src, e.post_src, e.dst));
    assert!(d.at >= reset_at + secs(15), "released after the RST linger");
    assert_eq!(lab.engine.nat_events_lost(), 0);
}

#[test]
fn inbound_flows_are_logged_on_request_and_a_full_queue_counts_its_losses() {
    let mut lab = Lab::with(
        CONFIG,
        EngineConfig {
            nat_log: NatLogMode::SnatAndInbound,
            nat_log_capacity: 2,
            ..EngineConfig::default()
        },
    );
    let c = establish(&mut lab, 80, 43_001);
    let mut events = Vec::new();
    lab.engine.drain_nat_events(|e| events.push(e));
    assert_eq!(events.len(), 1);
    let e = events[0];
    assert_eq!((e.kind, e.nat), (NatEventKind::Create, Nat::Dnat));
    assert_eq!(e.src, (Addr::from(CLIENT), 43_001));
    assert_eq!(e.post_src, e.src, "inbound flows keep the client's address");
    assert_eq!(e.dst, (Addr::from(VIP), 80));
    assert_eq!(e.post_dst, (Addr::from(c.backend_ip), 8080));
    for sport in 43_002..43_006 {
        establish(&mut lab, 80, sport);
    }
    assert_eq!(lab.engine.nat_events_lost(), 2, "two fit, two are lost");
    lab.engine.drain_nat_events(|e| events.push(e));
    assert_eq!(events.len(), 3);
}

#[test]
fn a_floating_ip_flow_reaches_the_member_addressed_to_the_vip_and_answers_from_it() {
    let mut lab = lab();
    let mut c = establish(&mut lab, 8080, 44_000);
    let data = c.client_sends(&mut lab, b"hello");
    assert_eq!(
        (data.dst, data.dport),
        (IpAddr::from(VIP), 8080),
        "no destination rewrite"
    );
    assert_eq!((data.src, data.sport), (IpAddr::from(CLIENT), 44_000));
    assert!(
        data.dst_mac == B1_MAC || data.dst_mac == B2_MAC,
        "to a member's MAC"
    );
    assert_eq!(data.ttl, 63);
    let answer = c.backend_sends(&mut lab, b"world");
    assert_eq!((answer.src, answer.sport), (IpAddr::from(VIP), 8080));
    assert_eq!((answer.dst, answer.dport), (IpAddr::from(CLIENT), 44_000));
    assert_eq!((answer.src_mac, answer.dst_mac), (XLB_MAC[0], CLIENT_MAC));
    let flows: Vec<_> = lab.engine.flows().collect();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].nat, Nat::None);
}

#[test]
fn floating_ip_flows_idle_out_are_kept_by_keepalives_and_reset_exactly() {
    let mut lab = lab();
    let mut c = establish(&mut lab, 8080, 44_001);
    c.client_sends(&mut lab, b"x");
    c.backend_sends(&mut lab, b"y");
    // Keepalives (seq = next - 1, no data) every 3 minutes keep it past the 4-minute timeout.
    let mut t = lab.now;
    for _ in 0..3 {
        t += mins(3);
        lab.run_until(t);
        let probe = c.client.seg(ACK, c.c_seq.wrapping_sub(1), c.s_seq, &[]);
        let (port, _) = lab.forward(CLIENT_PORT, probe);
        assert_eq!(port, BACKEND_PORT);
        let ack = c.backend.seg(ACK, c.s_seq, c.c_seq, &[]);
        lab.forward(BACKEND_PORT, ack);
    }
    assert!(lab.emitted.is_empty());
    assert_eq!(
        lab.engine.flow_count(),
        1,
        "alive after 9 minutes of keepalives"
    );
    // Silent for the idle timeout: both ends get their exact RST, from the VIP to the client
    // and from the client to the VIP (the member's own address) to the member.
    lab.run_until(t + mins(4) + secs(1));
    let want = c.expected_rsts((VIP.into(), 8080), (VIP.into(), 8080));
    let got = lab.emitted.clone();
    assert_eq!(
        got,
        vec![
            (CLIENT_PORT, want[0].clone()),
            (BACKEND_PORT, want[1].clone())
        ]
    );
    assert_eq!(lab.engine.flow_count(), 0);

    // Without reset on idle the flow ends silently at the same time.
    let mut s = establish(&mut lab, 8081, 44_002);
    s.client_sends(&mut lab, b"z");
    let last = lab.now;
    lab.run_until(last + mins(4) - secs(1));
    assert_eq!(lab.engine.flow_count(), 1);
    lab.run_until(last + mins(4) + secs(1));
    assert_eq!(lab.engine.flow_count(), 0);
    assert_eq!(lab.emitted.len(), 2, "no RST for the silent rule");
}
