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

/// A node A's established flow, after `a` saw the handshake and one segment each way.
fn established_on_a(a: &mut Lab, client: &Tcp) -> (Seen, Tcp) {
    let (_, out) = a.forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[]));
    let syn = seen(&out);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    a.forward(BACKEND_PORT, backend.seg(SYN | ACK, 70_000, 1001, &[]));
    a.forward(CLIENT_PORT, client.seg(ACK | PSH, 1001, 70_001, b"hello"));
    a.forward(BACKEND_PORT, backend.seg(ACK | PSH, 70_001, 1006, b"hi!"));
    (syn, backend)
}

#[test]
fn a_standby_flow_that_sees_no_packet_here_expires_without_resets() {
    let mut a = Lab::new();
    let client = Tcp::client(80, 40_310);
    established_on_a(&mut a, &client);
    let id = a.engine.flows().next().unwrap().id;
    let state = a.engine.export_flow(a.now, id).unwrap();

    let mut b = Lab::new();
    let Imported::Created(sid) = b.engine.import_standby(b.now, &state).unwrap() else {
        panic!("a new standby flow");
    };
    assert!(b.engine.is_standby_flow(sid));
    assert_eq!(b.engine.standby_marks(), 1);
    b.run_until(b.now + mins(4) + tick());
    assert_eq!(b.engine.flow_count(), 0, "expired at its idle timeout");
    assert!(b.emitted.is_empty(), "no reset on idle from a standby copy");
    let http = a.engine.flows().next().unwrap().rule;
    assert_eq!(b.engine.counters().rule(http).flows_reset_withheld, 1);
    assert_eq!(b.engine.counters().rule(http).flows_reset_on_idle, 0);
}

#[test]
fn a_refreshed_standby_flow_moved_here_continues_with_exact_resets() {
    let mut a = Lab::new();
    let client = Tcp::client(80, 40_311);
    let (syn, backend) = established_on_a(&mut a, &client);
    let id = a.engine.flows().next().unwrap().id;
    let first = a.engine.export_flow(a.now, id).unwrap();

    let mut b = Lab::with(
        DEFAULT_CONFIG,
        EngineConfig {
            hash_seed: 7,
            ..EngineConfig::default()
        },
    );
    let Imported::Created(sid) = b.engine.import_standby(b.now, &first).unwrap() else {
        panic!("a new standby flow");
    };

    // The connection goes on through A; A's newer state replaces B's copy.
    a.advance(secs_f(2.0));
    b.advance(secs_f(2.0));
    a.forward(CLIENT_PORT, client.seg(ACK | PSH, 1006, 70_004, b"more"));
    a.forward(BACKEND_PORT, backend.seg(ACK | PSH, 70_004, 1010, b"ok"));
    let second = a.engine.export_flow(a.now, id).unwrap();
    assert_eq!(
        b.engine.import_standby(b.now, &second).unwrap(),
        Imported::Refreshed(sid)
    );
    // An older state arriving late (its idle time counts its time on the way) changes nothing.
    let mut stale = first.clone();
    stale.idle += secs_f(2.0);
    assert_eq!(
        b.engine.import_standby(b.now, &stale).unwrap(),
        Imported::AlreadyHere(sid)
    );
    assert!(b.engine.is_standby_flow(sid));

    // A is lost; the router moves the connection to B: the same backend, no pickup, live.
    b.advance(secs_f(1.0));
    let (_, out) = b.forward(CLIENT_PORT, client.seg(ACK | PSH, 1010, 70_006, b"again"));
    assert_eq!(seen(&out).dst, syn.dst, "the backend A chose");
    assert!(!b.engine.is_standby_flow(sid), "live once a packet arrived");
    let http = b.engine.flows().next().unwrap().rule;
    assert_eq!(b.engine.counters().rule(http).flows_picked_up, 0);
    // Synced states no longer change a flow that is live here.
    assert_eq!(
        b.engine.import_standby(b.now, &second).unwrap(),
        Imported::AlreadyHere(sid)
    );

    // Idle: reset on idle with the exact numbers of the latest segments.
    b.run_until(b.now + mins(4) + tick());
    assert_eq!(b.engine.flow_count(), 0);
    assert_eq!(b.emitted.len(), 2, "reset on idle, both ends");
    let (to_client, to_backend) = (seen(&b.emitted[0].1), seen(&b.emitted[1].1));
    assert_eq!(
        (to_client.dst, to_client.seq),
        (IpAddr::from(CLIENT), 70_006)
    );
    assert_eq!((to_backend.dst, to_backend.seq), (syn.dst, 1015));
}

#[test]
fn a_standby_snat_flow_keeps_its_port_when_answers_reach_the_peer() {
    let mut a = Lab::new();
    let member = Tcp {
        src_mac: B1_MAC,
        dst_mac: XLB_MAC[1],
        src: B1.into(),
        dst: REMOTE.into(),
        sport: 50_200,
        dport: 443,
    };
    let (_, out) = a.forward(BACKEND_PORT, member.seg(SYN, 1, 0, &[]));
    let port = seen(&out).sport;
    let id = a.engine.flows().next().unwrap().id;
    let state = a.engine.export_flow(a.now, id).unwrap();
    assert_eq!(state.steering_endpoint(), (REMOTE.into(), 443));

    let mut b = Lab::new();
    let Imported::Created(sid) = b.engine.import_standby(b.now, &state).unwrap() else {
        panic!("a new standby flow");
    };
    b.advance(secs_f(0.5));
    let remote = Tcp {
        src_mac: NET_MAC,
        dst_mac: XLB_MAC[2],
        src: REMOTE.into(),
        dst: SNAT_IP.into(),
        sport: 443,
        dport: port,
    };
    let (p, back) = b.forward(INTERNET_PORT, remote.seg(SYN | ACK, 77, 2, &[]));
    assert_eq!(p, BACKEND_PORT);
    let s = seen(&back);
    assert_eq!((s.dst, s.dport), (IpAddr::from(B1), 50_200));
    assert!(!b.engine.is_standby_flow(sid));
}

#[test]
fn sync_export_hands_created_and_changed_flows_then_refreshes_active_ones() {
    use xlb_engine::SyncReason;
    let mut a = Lab::new();
    a.engine.enable_sync(2);
    let client = Tcp::client(80, 40_320);
    let (_, out) = a.forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[]));
    let syn = seen(&out);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    a.forward(BACKEND_PORT, backend.seg(SYN | ACK, 70_000, 1001, &[]));
    a.forward(CLIENT_PORT, client.seg(ACK, 1001, 70_001, &[]));
    // Created, then established: two notes; a third flow's creation finds the ring full.
    a.forward(CLIENT_PORT, Tcp::client(80, 40_321).seg(SYN, 5, 0, &[]));
    assert_eq!(a.engine.sync_lost(), 1);
    let mut got = Vec::new();
    let n = a.engine.sync_export(a.now, 10, 0, |r, s| got.push((r, s)));
    assert_eq!(n, 2);
    assert!(got
        .iter()
        .all(|(r, s)| *r == SyncReason::Noted && s.orig_sport == 40_320));
    assert_eq!(got[1].1.tcp.state, xlb_engine::tcp::TcpState::Established);
    // The refresh pass: both flows had packets, each is handed once per pass, within the
    // budget.
    got.clear();
    let slots = a.engine.flow_capacity();
    let n = a
        .engine
        .sync_export(a.now, 1, slots, |r, s| got.push((r, s)));
    assert_eq!(n, 1);
    let n = a
        .engine
        .sync_export(a.now, 10, slots, |r, s| got.push((r, s)));
    assert_eq!(n, 1);
    assert!(got.iter().all(|(r, _)| *r == SyncReason::Refresh));
    // A pass hands the flows with a packet after the previous pass began: the next pass
    // still hands both, the one after it nothing (they have been quiet since).
    a.advance(secs_f(1.0));
    got.clear();
    a.engine
        .sync_export(a.now, 10, slots, |r, s| got.push((r, s)));
    assert_eq!(got.len(), 2);
    got.clear();
    a.engine
        .sync_export(a.now, 10, slots, |r, s| got.push((r, s)));
    assert!(got.is_empty(), "{got:?}");

    // A standby flow is its owner's to send.
    let state = a
        .engine
        .export_flow(a.now, a.engine.flows().next().unwrap().id)
        .unwrap();
    let mut b = Lab::new();
    b.engine.enable_sync(8);
    b.engine.import_standby(b.now, &state).unwrap();
    let mut sent = 0;
    b.engine
        .sync_export(b.now, 10, b.engine.flow_capacity(), |_, _| sent += 1);
    assert_eq!(sent, 0);
}

#[test]
fn a_stale_copy_lets_acknowledgements_run_ahead_and_a_later_state_makes_a_live_flow_standby() {
    let mut a = Lab::new();
    let client = Tcp::client(80, 40_330);
    let (syn, backend) = established_on_a(&mut a, &client);
    let id = a.engine.flows().next().unwrap().id;
    let stale = a.engine.export_flow(a.now, id).unwrap();
    // A goes on; B's copy misses it (the sync's lag).
    a.advance(secs_f(0.2));
    a.forward(CLIENT_PORT, client.seg(ACK | PSH, 1006, 70_004, b"more"));
    a.forward(BACKEND_PORT, backend.seg(ACK | PSH, 70_004, 1010, b"ok"));

    let mut b = Lab::new();
    let Imported::Created(sid) = b.engine.import_standby(b.now, &stale).unwrap() else {
        panic!("a new standby flow");
    };
    // Moved to B: the client acknowledges the backend's "ok", which the copy never saw.
    b.advance(secs_f(0.5));
    let (_, out) = b.forward(CLIENT_PORT, client.seg(ACK | PSH, 1010, 70_006, b"again"));
    assert_eq!(seen(&out).dst, syn.dst);
    let (_, back) = b.forward(BACKEND_PORT, backend.seg(ACK | PSH, 70_006, 1015, b"!"));
    assert_eq!(seen(&back).dst, IpAddr::from(CLIENT));
    assert!(!b.engine.is_standby_flow(sid));
    assert_eq!(b.engine.counters().drop_count(DropReason::OutOfWindow), 0);

    // B's later state makes A's flow (live there, stale now) a standby copy.
    a.advance(secs_f(1.0));
    b.advance(secs_f(0.5));
    let from_b = b.engine.export_flow(b.now, sid).unwrap();
    assert_eq!(
        a.engine.import_standby(a.now, &from_b).unwrap(),
        Imported::Refreshed(id)
    );
    assert!(a.engine.is_standby_flow(id));
    // The router moves it back to A: A's later state makes B's flow standby again, silent.
    a.advance(secs_f(0.1));
    a.forward(CLIENT_PORT, client.seg(ACK | PSH, 1015, 70_007, b"back"));
    let later = a.engine.export_flow(a.now, id).unwrap();
    assert_eq!(
        b.engine.import_standby(b.now, &later).unwrap(),
        Imported::Refreshed(sid)
    );
    assert!(b.engine.is_standby_flow(sid));
    b.run_until(b.now + mins(4) + tick());
    assert_eq!(b.engine.flow_count(), 0);
    assert!(b.emitted.is_empty(), "no RST from the node the flow left");
}
