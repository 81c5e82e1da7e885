//! Cluster behaviour of one node's engine (docs/cluster.md): cluster pickup of flows that the
//! router's ECMP moved here, under the `drop` unknown-flow policy, with the backend every node
//! chooses; and reset on idle withheld for flows that may have moved away.

mod common;

use std::net::IpAddr;

use common::flags::*;
use common::*;
use xlb_engine::tcp::TcpState;
use xlb_engine::time::mins;
use xlb_engine::{DropReason, EngineConfig, Verdict};

fn cluster_node() -> Lab {
    Lab::with(
        DEFAULT_CONFIG,
        EngineConfig {
            cluster_pickup: true,
            ..EngineConfig::default()
        },
    )
}

fn rule_id(lab: &Lab, name: &str) -> u16 {
    lab.engine
        .rules()
        .rule_id(xlb_engine::ruleset::RuleKind::LoadBalancing, name)
        .expect("rule exists")
}

fn tick() -> u64 {
    1 << EngineConfig::default().tick_shift
}

/// A connection on rule `http` (port 80: `drop` policy, reset on idle) established through
/// `lab`: returns (client, backend side, client's next seq, backend's next seq, backend).
fn establish(lab: &mut Lab, sport: u16) -> (Tcp, Tcp, u32, u32, IpAddr) {
    let client = Tcp::client(80, sport);
    let (_, out) = lab.forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[]));
    let syn = seen(&out);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 70_000, 1001, &[]));
    lab.forward(CLIENT_PORT, client.seg(ACK, 1001, 70_001, &[]));
    (client, backend, 1001, 70_001, syn.dst)
}

#[test]
fn a_moved_flow_is_picked_up_under_drop_with_the_backend_of_its_first_node() {
    // Node A saw the handshake and some data; then the router moved the flow to node B.
    let mut a = Lab::new();
    let (client, _, c_seq, s_seq, backend_on_a) = establish(&mut a, 40_100);
    let (_, out) = a.forward(CLIENT_PORT, client.seg(ACK | PSH, c_seq, s_seq, b"on A"));
    let c_seq = c_seq + 4;
    assert_eq!(seen(&out).dst, backend_on_a);

    // A node without cluster pickup drops the mid-flow segment (the `drop` policy).
    let mut plain = Lab::new();
    assert_eq!(
        plain
            .send(CLIENT_PORT, client.seg(ACK | PSH, c_seq, s_seq, b"moved"))
            .0,
        Verdict::Drop(DropReason::NoFlow)
    );

    // Node B, in cluster mode, continues it with the same backend and both directions.
    let mut b = cluster_node();
    let (port, out) = b.forward(CLIENT_PORT, client.seg(ACK | PSH, c_seq, s_seq, b"moved"));
    assert_eq!(port, BACKEND_PORT);
    let o = seen(&out);
    assert_eq!(
        (o.dst, o.dport),
        (backend_on_a, 8080),
        "same backend as node A"
    );
    let c_seq = c_seq + 5;
    let http = rule_id(&b, "http");
    assert_eq!(b.engine.counters().rule(http).flows_picked_up, 1);
    assert_eq!(b.engine.counters().rule(http).no_flow, 0);
    let backend = Tcp::reply_to(&o, o.dst_mac, XLB_MAC[1]);
    let (port, out) = b.forward(BACKEND_PORT, backend.seg(ACK | PSH, s_seq, c_seq, b"ok"));
    assert_eq!(port, CLIENT_PORT);
    assert_eq!(seen(&out).src, IpAddr::from(VIP));
    let s_seq = s_seq + 2;
    let f = b.engine.flows().next().expect("flow re-created");
    assert_eq!(f.tcp_state, Some(TcpState::Established));

    // Both directions learned on B: its reset on idle is exact.
    let last = b.now;
    b.run_until(last + mins(4) + tick());
    assert_eq!(b.emitted.len(), 2, "one RST to each end");
    assert_eq!(
        seen(&b.emitted[0].1).seq,
        s_seq,
        "to the client: the backend's next"
    );
    assert_eq!(
        seen(&b.emitted[1].1).seq,
        c_seq,
        "to the backend: the client's next"
    );
}

#[test]
fn a_flow_picked_up_from_one_direction_only_never_resets() {
    let mut b = cluster_node();
    let client = Tcp::client(80, 40_101);
    b.forward(CLIENT_PORT, client.seg(ACK | PSH, 5000, 9000, b"one way"));
    let last = b.now;
    b.run_until(last + mins(4) + tick());
    assert_eq!(b.engine.flow_count(), 0);
    assert!(b.emitted.is_empty(), "one sequence number would be a guess");
}

#[test]
fn cluster_pickup_needs_a_live_looking_segment() {
    let mut b = cluster_node();
    let client = Tcp::client(80, 40_102);
    for frame in [
        client.seg(RST, 5000, 0, &[]),
        client.seg(SYN | ACK, 5000, 9000, &[]),
    ] {
        assert_eq!(
            b.send(CLIENT_PORT, frame).0,
            Verdict::Drop(DropReason::NoFlow)
        );
    }
    assert_eq!(b.engine.flow_count(), 0);
}

#[test]
fn reset_on_idle_is_withheld_for_flows_idle_since_the_membership_changed() {
    let mut a = cluster_node();
    let (client, backend, c_seq, s_seq, _) = establish(&mut a, 40_103);
    a.forward(CLIENT_PORT, client.seg(ACK | PSH, c_seq, s_seq, b"x"));
    // A second connection that keeps talking here after the change.
    let (client2, backend2, c2, s2, _) = establish(&mut a, 40_104);

    a.advance(mins(1));
    let change = a.now;
    a.engine.cluster_changed(change);
    a.advance(mins(1));
    // The second connection proves it stayed: both directions after the change.
    a.forward(CLIENT_PORT, client2.seg(ACK | PSH, c2, s2, b"still here"));
    a.forward(BACKEND_PORT, backend2.seg(ACK, s2, c2 + 10, &[]));
    let _ = backend;

    a.run_until(change + mins(6));
    assert_eq!(a.engine.flow_count(), 0);
    let http = rule_id(&a, "http");
    let c = a.engine.counters().rule(http);
    assert_eq!(c.flows_expired_idle, 2);
    assert_eq!(
        c.flows_reset_withheld, 1,
        "the first one may live on elsewhere"
    );
    assert_eq!(c.flows_reset_on_idle, 1);
    assert_eq!(
        a.emitted.len(),
        2,
        "RSTs only for the connection seen since"
    );
    for (_, f) in &a.emitted {
        let s = seen(f);
        assert!(s.sport == 40_104 || s.dport == 40_104, "{s:?}");
    }
}

#[test]
fn two_nodes_with_their_own_seeds_and_worker_counts_choose_the_same_backends() {
    // What differs between the nodes of a cluster: every secret seed, the worker count, the
    // worker. What must not: the backend each connection gets.
    let mut a = Lab::with(
        DEFAULT_CONFIG,
        EngineConfig {
            hash_seed: 1,
            steer_seed: 2,
            cluster_pickup: true,
            ..EngineConfig::default()
        },
    );
    let mut b = Lab::with(
        DEFAULT_CONFIG,
        EngineConfig {
            hash_seed: 0xdead_beef,
            steer_seed: 0x1234_5678,
            worker: 3,
            workers: 4,
            cluster_pickup: true,
            ..EngineConfig::default()
        },
    );
    let mut by_backend = std::collections::HashMap::new();
    for sport in 20_000..22_000u16 {
        let syn = Tcp::client(80, sport).seg(SYN, 1, 0, &[]);
        let on_a = seen(&a.forward(CLIENT_PORT, syn.clone()).1).dst;
        let on_b = seen(&b.forward(CLIENT_PORT, syn).1).dst;
        assert_eq!(on_a, on_b, "source port {sport}");
        *by_backend.entry(on_a).or_insert(0) += 1;
    }
    assert_eq!(by_backend.len(), 2, "both members chosen: {by_backend:?}");
}
