//! Per-packet checks before the flow table: a packet whose TTL / hop limit would expire on the
//! next hop, or a TCP segment with a flag combination no real stack sends, neither creates nor
//! changes a flow (nor takes a SNAT port); each is a counted drop.

mod common;

use std::net::IpAddr;

use common::flags::*;
use common::*;
use xlb_engine::tcp::TcpState;
use xlb_engine::time::mins;
use xlb_engine::{DropReason, EngineConfig, Verdict};

const HOP: Verdict = Verdict::Drop(DropReason::HopLimit);
const BAD: Verdict = Verdict::Drop(DropReason::BadTcpFlags);

fn rule_id(lab: &Lab, name: &str) -> u16 {
    let rules = lab.engine.rules();
    (0..rules.rule_id_bound() as u16)
        .find(|&id| rules.rule(id).is_some_and(|r| &*r.name == name))
        .unwrap_or_else(|| panic!("no rule {name}"))
}

fn member(sport: u16) -> Tcp {
    Tcp {
        src_mac: B1_MAC,
        dst_mac: XLB_MAC[1],
        src: B1.into(),
        dst: REMOTE.into(),
        sport,
        dport: 443,
    }
}

fn remote(dport: u16) -> Tcp {
    Tcp {
        src_mac: NET_MAC,
        dst_mac: XLB_MAC[2],
        src: REMOTE.into(),
        dst: SNAT_IP.into(),
        sport: 443,
        dport,
    }
}

#[test]
fn ttl_1_creates_no_flow() {
    let mut lab = Lab::new();
    let c6 = Tcp {
        src: CLIENT6.into(),
        dst: VIP6.into(),
        ..Tcp::client(80, 43_001)
    };
    let frames = [
        with_ttl(Tcp::client(80, 41_000).seg(SYN, 1, 0, &[]), 1),
        with_ttl(Tcp::client(80, 41_001).seg(SYN, 1, 0, &[]), 0),
        with_ttl(c6.seg(SYN, 1, 0, &[]), 1),
        // Under `pickup`, under `reset` (no RST is answered either), and UDP.
        with_ttl(Tcp::client(83, 41_002).seg(ACK, 1, 1, b"x"), 1),
        with_ttl(Tcp::client(82, 41_003).seg(ACK, 1, 1, b"x"), 1),
        with_ttl(
            udp(
                CLIENT_MAC,
                XLB_MAC[0],
                CLIENT.into(),
                5000,
                VIP.into(),
                53,
                b"q",
            ),
            1,
        ),
    ];
    let n = frames.len() as u64;
    for f in frames {
        assert_eq!(lab.send(CLIENT_PORT, f).0, HOP);
    }
    assert_eq!(lab.engine.flow_count(), 0);
    assert_eq!(lab.engine.counters().drop_count(DropReason::HopLimit), n);
    for rule in ["http", "http6", "http-pickup", "http-reset-policy", "dns"] {
        let c = lab.engine.counters().rule(rule_id(&lab, rule));
        assert_eq!((c.flows_created, c.unknown_flow_resets), (0, 0), "{rule}");
    }
    // TTL 2 goes through with TTL 1.
    let (_, out) = lab.forward(
        CLIENT_PORT,
        with_ttl(Tcp::client(80, 41_000).seg(SYN, 1, 0, &[]), 2),
    );
    assert_eq!(seen(&out).ttl, 1);
}

#[test]
fn ttl_1_takes_no_snat_port_and_no_port_is_released_twice() {
    // The member has 8 ports. A TTL-1 SYN first: before the fix it created a flow holding a
    // port and released that port at once, and again when the flow expired.
    let mut lab = Lab::new();
    let rules = lab.engine.rules().clone();
    let (_, blocks) = rules.match_outbound(6, B1.into()).unwrap();
    assert_eq!(
        lab.send(
            BACKEND_PORT,
            with_ttl(member(50_000).seg(SYN, 1, 0, &[]), 1)
        )
        .0,
        HOP
    );
    assert_eq!(lab.engine.flow_count(), 0);
    assert_eq!(lab.engine.snat_usage(blocks, 6).0, 0);
    // Eight connections, established so that they outlive the half-open timeout.
    let mut ports = std::collections::HashSet::new();
    for i in 0..8 {
        let m = member(50_001 + i);
        let (_, out) = lab.forward(BACKEND_PORT, m.seg(SYN, 1, 0, &[]));
        let port = seen(&out).sport;
        assert!(ports.insert(port), "port {port} given twice");
        lab.forward(INTERNET_PORT, remote(port).seg(SYN | ACK, 9, 2, &[]));
        lab.forward(BACKEND_PORT, m.seg(ACK, 2, 10, &[]));
    }
    assert_eq!(lab.engine.snat_usage(blocks, 6).0, 8);
    let half_open = lab.engine.rules().timers().tcp_half_open;
    let t = lab.now;
    lab.run_until(t + half_open + mins(1));
    assert_eq!(lab.engine.flow_count(), 8);
    assert_eq!(lab.engine.snat_usage(blocks, 6).0, 8);
    assert_eq!(
        lab.send(BACKEND_PORT, member(50_100).seg(SYN, 1, 0, &[])).0,
        Verdict::Drop(DropReason::SnatExhausted),
        "every port is held by a live flow"
    );
    assert_eq!(
        lab.engine
            .counters()
            .rule(rule_id(&lab, "egress"))
            .flows_created,
        8
    );
}

#[test]
fn ttl_1_segment_of_a_flow_changes_nothing() {
    let mut lab = Lab::new();
    let client = Tcp::client(80, 41_010);
    let (_, out) = lab.forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[]));
    let syn = seen(&out);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 5000, 1001, &[]));
    lab.forward(CLIENT_PORT, client.seg(ACK, 1001, 5001, &[]));
    let last = lab.now;
    lab.advance(mins(1));
    // Data that will never reach the backend must not move the client's next sequence number
    // (the idle RSTs would be off by its length) nor refresh the idle timer.
    let data = with_ttl(client.seg(ACK | PSH, 1001, 5001, b"lost"), 1);
    assert_eq!(lab.send(CLIENT_PORT, data).0, HOP);
    let fin = with_ttl(backend.seg(FIN | ACK, 5001, 1001, &[]), 1);
    assert_eq!(lab.send(BACKEND_PORT, fin).0, HOP);
    let f = lab.engine.flows().next().unwrap();
    assert_eq!(
        (f.tcp_state, f.last_seen),
        (Some(TcpState::Established), last)
    );
    lab.run_until(last + mins(4) + (1 << EngineConfig::default().tick_shift));
    assert_eq!(lab.emitted.len(), 2);
    let to_backend = expected_rst(
        (XLB_MAC[1], syn.dst_mac),
        (CLIENT.into(), 41_010),
        (syn.dst, 8080),
        1001,
        5001,
    );
    assert_eq!(lab.emitted[1].1, to_backend);
    assert_eq!(syn.src, IpAddr::from(CLIENT));
}

#[test]
fn invalid_flag_combinations_never_create_a_flow() {
    let mut lab = Lab::new();
    let combos = [
        SYN | FIN,
        SYN | RST,
        0,
        FIN,
        SYN | FIN | ACK,
        RST | FIN,
        PSH,
    ];
    let mut sport = 42_000;
    let mut sent = 0;
    // Every policy: drop (80), reset (82: never answered), pickup (83), and an outbound rule.
    for dport in [80u16, 82, 83] {
        for flags in combos {
            sport += 1;
            let f = Tcp::client(dport, sport).seg(flags, 1, 0, b"");
            assert_eq!(lab.send(CLIENT_PORT, f).0, BAD, "{flags:#x} to {dport}");
            sent += 1;
        }
    }
    for flags in combos {
        sport += 1;
        assert_eq!(
            lab.send(BACKEND_PORT, member(sport).seg(flags, 1, 0, b""))
                .0,
            BAD
        );
        sent += 1;
    }
    assert_eq!(lab.engine.flow_count(), 0);
    assert_eq!(
        lab.engine.counters().drop_count(DropReason::BadTcpFlags),
        sent
    );
    assert_eq!(lab.engine.counters().tx_packets, 0, "no RST answered");
}

#[test]
fn invalid_flag_combinations_leave_an_existing_flow_alone() {
    let mut lab = Lab::new();
    let client = Tcp::client(80, 42_100);
    let (_, out) = lab.forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[]));
    let syn = seen(&out);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 5000, 1001, &[]));
    lab.forward(CLIENT_PORT, client.seg(ACK, 1001, 5001, &[]));
    for flags in [SYN | FIN, SYN | RST, RST | FIN | ACK, 0, FIN] {
        assert_eq!(
            lab.send(CLIENT_PORT, client.seg(flags, 1001, 5001, b"")).0,
            BAD
        );
        assert_eq!(
            lab.send(BACKEND_PORT, backend.seg(flags, 5001, 1001, b""))
                .0,
            BAD
        );
    }
    let f = lab.engine.flows().next().unwrap();
    assert_eq!(f.tcp_state, Some(TcpState::Established));
    assert_eq!(
        lab.engine
            .counters()
            .rule(rule_id(&lab, "http"))
            .flows_created,
        1
    );
}
