//! One flow's state exported from one engine and imported into another (the API a flow-state
//! sync between cluster nodes goes through): the importing engine continues the flow as if it
//! had seen it all — same backend, the same SNAT address and port, and reset on idle with the
//! exact numbers at once.

mod common;

use std::net::IpAddr;

use common::flags::*;
use common::*;
use xlb_engine::time::mins;
use xlb_engine::{DropReason, EngineConfig, Imported};

fn tick() -> u64 {
    1 << EngineConfig::default().tick_shift
}

#[test]
fn an_imported_tcp_flow_continues_with_its_backend_and_exact_resets() {
    let mut a = Lab::new();
    let client = Tcp::client(80, 40_300);
    let (_, out) = a.forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[]));
    let syn = seen(&out);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    a.forward(BACKEND_PORT, backend.seg(SYN | ACK, 70_000, 1001, &[]));
    a.forward(CLIENT_PORT, client.seg(ACK | PSH, 1001, 70_001, b"hello"));
    a.forward(BACKEND_PORT, backend.seg(ACK | PSH, 70_001, 1006, b"hi!"));
    let id = a.engine.flows().next().unwrap().id;
    a.advance(secs_f(10.0));
    let state = a.engine.export_flow(a.now, id).expect("a live flow");
    assert_eq!(&*state.rule_name, "http");
    assert_eq!(state.idle, secs_f(10.0));
    assert_eq!(a.engine.export_flow(a.now, id + 1), None, "an empty slot");

    // Node B has never seen the flow; it imports it (its own seeds, no pickup needed).
    let mut b = Lab::with(
        DEFAULT_CONFIG,
        EngineConfig {
            hash_seed: 99,
            ..EngineConfig::default()
        },
    );
    let got = b.engine.import_flow(b.now, &state).unwrap();
    assert!(matches!(got, Imported::Created(_)));
    assert_eq!(
        b.engine.import_flow(b.now, &state).unwrap(),
        match got {
            Imported::Created(id) => Imported::AlreadyHere(id),
            other => other,
        }
    );
    // Its idle timer runs from the flow's last packet on A.
    b.run_until(b.now + mins(4) - secs_f(10.0) + tick());
    assert_eq!(
        b.engine.flow_count(),
        0,
        "expired 4 minutes after its last packet"
    );
    assert_eq!(b.emitted.len(), 2, "reset on idle, both ends");
    let (to_client, to_backend) = (seen(&b.emitted[0].1), seen(&b.emitted[1].1));
    assert_eq!(
        (to_client.dst, to_client.seq),
        (IpAddr::from(CLIENT), 70_004)
    );
    assert_eq!((to_backend.dst, to_backend.seq), (syn.dst, 1006));

    // Imported again and used: the next segment goes to the same backend, nothing picked up.
    let mut c = Lab::new();
    c.engine.import_flow(c.now, &state).unwrap();
    let (_, out) = c.forward(CLIENT_PORT, client.seg(ACK | PSH, 1006, 70_004, b"more"));
    assert_eq!(seen(&out).dst, syn.dst);
    let http = c.engine.flows().next().unwrap().rule;
    assert_eq!(c.engine.counters().rule(http).flows_picked_up, 0);
}

#[test]
fn an_imported_snat_flow_keeps_its_address_and_port() {
    let mut a = Lab::new();
    let member = Tcp::member_to_remote(50_100);
    let (_, out) = a.forward(BACKEND_PORT, member.seg(SYN, 1, 0, &[]));
    let port = seen(&out).sport;
    let id = a.engine.flows().next().unwrap().id;
    let state = a.engine.export_flow(a.now, id).unwrap();

    let mut b = Lab::new();
    b.engine.import_flow(b.now, &state).unwrap();
    // The remote host's answer to the SNAT address and port reaches the member through B.
    let remote = Tcp::remote_to_snat(port);
    let (p, back) = b.forward(INTERNET_PORT, remote.seg(SYN | ACK, 77, 2, &[]));
    assert_eq!(p, BACKEND_PORT);
    let s = seen(&back);
    assert_eq!((s.dst, s.dport), (IpAddr::from(B1), 50_100));
    // B will not hand that port to another of its own flows: a new SYN of the member gets
    // another one.
    let again = Tcp {
        sport: 50_101,
        ..member
    };
    let (_, out) = b.forward(BACKEND_PORT, again.seg(SYN, 1, 0, &[]));
    assert_ne!(seen(&out).sport, port);
}

#[test]
fn a_flow_whose_rule_is_unknown_here_is_refused() {
    let mut a = Lab::new();
    let client = Tcp::client(80, 40_301);
    a.forward(CLIENT_PORT, client.seg(SYN, 1, 0, &[]));
    let id = a.engine.flows().next().unwrap().id;
    let mut state = a.engine.export_flow(a.now, id).unwrap();
    state.rule_name = "no-such-rule".into();
    let mut b = Lab::new();
    assert_eq!(b.engine.import_flow(b.now, &state), Err(DropReason::NoRule));
    assert_eq!(b.engine.flow_count(), 0);
}
