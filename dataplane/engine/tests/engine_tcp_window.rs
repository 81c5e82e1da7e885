//! The TCP window rule through the whole engine, with byte fixtures and virtual time: spoofed
//! segments outside a flow's window change nothing (state, sequence numbers, idle timer) and are
//! dropped and counted; an RST ends a flow only when exact; reset on idle stays exact.

mod common;

use common::flags::*;
use common::*;
use xlb_engine::tcp::TcpState;
use xlb_engine::time::{mins, Nanos};
use xlb_engine::{DropReason, EngineConfig, FlowInfo, Verdict};

fn establish_with(lab: &mut Lab, dport: u16, sport: u16, c_isn: u32, s_isn: u32) -> Conn {
    Conn::open_with(lab, Tcp::client(dport, sport), c_isn, s_isn)
}

fn rule_id(lab: &Lab, name: &str) -> u16 {
    let rules = lab.engine.rules();
    (0..rules.rule_id_bound() as u16)
        .find(|&id| rules.rule(id).is_some_and(|r| &*r.name == name))
        .unwrap_or_else(|| panic!("no rule {name}"))
}

fn tick() -> Nanos {
    1 << EngineConfig::default().tick_shift
}

fn only_flow(lab: &Lab) -> FlowInfo {
    let flows: Vec<_> = lab.engine.flows().collect();
    assert_eq!(flows.len(), 1, "{flows:?}");
    flows[0]
}

fn out_of_window(lab: &Lab, rule: &str) -> (u64, u64) {
    (
        lab.engine.counters().rule(rule_id(lab, rule)).out_of_window,
        lab.engine.counters().drop_count(DropReason::OutOfWindow),
    )
}

/// Idles the flow out from its last packet at `last` and checks both RSTs, byte for byte.
fn assert_exact_reset_on_idle(lab: &mut Lab, conn: &Conn, last: Nanos, dport: u16) {
    lab.run_until(last + mins(4) - 1);
    assert_eq!(lab.engine.flow_count(), 1, "alive until its idle timeout");
    assert!(lab.emitted.is_empty());
    lab.run_until(last + mins(4) + tick());
    assert_eq!(lab.engine.flow_count(), 0);
    assert_eq!(lab.emitted, conn.expected_idle_rsts(dport).to_vec());
}

const OOW: Verdict = Verdict::Drop(DropReason::OutOfWindow);

#[test]
fn spoofed_out_of_window_rsts_are_dropped_and_counted_and_change_nothing() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 80, 40_100);
    conn.client_sends(&mut lab, b"hello");
    conn.backend_sends(&mut lab, b"world!");
    let last = lab.now;
    let before = only_flow(&lab);
    lab.advance(mins(1));
    // From the client side and from the backend side, with and without ACK, far from the
    // window (the blind attacker's usual guess) and just outside it.
    let spoofs = [
        (
            CLIENT_PORT,
            conn.client
                .seg(RST, conn.c_seq.wrapping_add(1 << 30), 0, &[]),
        ),
        (
            CLIENT_PORT,
            conn.client
                .seg(RST | ACK, conn.c_seq + 64_240 + 1, conn.s_seq, &[]),
        ),
        (
            CLIENT_PORT,
            conn.client
                .seg(RST, conn.c_seq.wrapping_sub(64_240 + 2), 0, &[]),
        ),
        (
            BACKEND_PORT,
            conn.backend
                .seg(RST, conn.s_seq.wrapping_add(3 << 29), 0, &[]),
        ),
        (BACKEND_PORT, conn.backend.seg(RST | ACK, 0, 0, &[])),
    ];
    let n = spoofs.len() as u64;
    for (port, frame) in spoofs {
        assert_eq!(lab.send(port, frame).0, OOW);
    }
    assert_eq!(out_of_window(&lab, "http"), (n, n));
    let after = only_flow(&lab);
    assert_eq!(after.tcp_state, Some(TcpState::Established));
    assert_eq!(
        after.last_seen, before.last_seen,
        "idle timer not refreshed"
    );
    // The connection goes on, then idles out with both RSTs exact.
    lab.advance(mins(1));
    conn.client_sends(&mut lab, b"still here");
    conn.backend_sends(&mut lab, b"yes");
    let last2 = lab.now;
    assert!(last2 > last);
    assert_exact_reset_on_idle(&mut lab, &conn, last2, 80);
}

#[test]
fn in_window_inexact_rst_is_forwarded_and_leaves_the_flow_as_it_is() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 80, 40_101);
    conn.client_sends(&mut lab, b"hello");
    let last = lab.now;
    lab.advance(mins(2));
    let before = only_flow(&lab);
    // Inside the window, not the next sequence number: forwarded, so that the backend answers
    // with a challenge ACK, but neither the state nor the idle timer changes.
    let (port, out) = lab.forward(CLIENT_PORT, conn.client.seg(RST, conn.c_seq + 1000, 0, &[]));
    assert_eq!(port, BACKEND_PORT);
    assert_eq!(seen(&out).tcp_flags, RST);
    let (port, _) = lab.forward(BACKEND_PORT, conn.backend.seg(RST, conn.s_seq + 1, 0, &[]));
    assert_eq!(port, CLIENT_PORT);
    let after = only_flow(&lab);
    assert_eq!(after.tcp_state, Some(TcpState::Established));
    assert_eq!(after.last_seen, before.last_seen);
    assert_eq!(out_of_window(&lab, "http"), (0, 0));
    assert_exact_reset_on_idle(&mut lab, &conn, last, 80);
}

#[test]
fn exact_rst_ends_the_flow_from_either_side() {
    for from_backend in [false, true] {
        let mut lab = Lab::new();
        let mut conn = establish(&mut lab, 80, 40_102);
        conn.client_sends(&mut lab, b"hello");
        conn.backend_sends(&mut lab, b"hi");
        let (port, frame) = if from_backend {
            (
                BACKEND_PORT,
                conn.backend.seg(RST | ACK, conn.s_seq, conn.c_seq, &[]),
            )
        } else {
            (CLIENT_PORT, conn.client.seg(RST, conn.c_seq, 0, &[]))
        };
        lab.forward(port, frame);
        assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::Reset));
        let linger = lab.engine.rules().timers().tcp_close_linger;
        let t = lab.now;
        lab.run_until(t + linger + tick());
        assert_eq!(lab.engine.flow_count(), 0);
        assert!(lab.emitted.is_empty(), "a reset flow gets no RST on idle");
        assert_eq!(
            lab.engine
                .counters()
                .rule(rule_id(&lab, "http"))
                .flows_closed,
            1
        );
    }
}

#[test]
fn spoofed_fin_out_of_window_does_not_turn_reset_on_idle_off() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 80, 40_103);
    conn.client_sends(&mut lab, b"hello");
    let last = lab.now;
    let fins = [
        (
            CLIENT_PORT,
            conn.client
                .seg(FIN | ACK, conn.c_seq + 200_000, conn.s_seq, &[]),
        ),
        (
            BACKEND_PORT,
            conn.backend
                .seg(FIN | ACK, conn.s_seq.wrapping_sub(1 << 20), conn.c_seq, &[]),
        ),
        // In sequence, but acknowledging data the client never sent.
        (
            BACKEND_PORT,
            conn.backend
                .seg(FIN | ACK, conn.s_seq, conn.c_seq + 5000, &[]),
        ),
    ];
    for (port, frame) in fins {
        assert_eq!(lab.send(port, frame).0, OOW);
    }
    assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::Established));
    assert_eq!(out_of_window(&lab, "http"), (3, 3));
    assert_exact_reset_on_idle(&mut lab, &conn, last, 80);
}

#[test]
fn spoofed_far_ahead_data_does_not_move_next_seq_and_idle_rsts_stay_exact() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 80, 40_104);
    conn.client_sends(&mut lab, b"hello");
    conn.backend_sends(&mut lab, b"world");
    let last = lab.now;
    let far = |seq: u32| seq.wrapping_add((1 << 31) - 1);
    let spoofs = [
        (
            CLIENT_PORT,
            conn.client
                .seg(ACK | PSH, far(conn.c_seq), conn.s_seq, b"evil"),
        ),
        (
            BACKEND_PORT,
            conn.backend
                .seg(ACK | PSH, far(conn.s_seq), conn.c_seq, b"evil"),
        ),
    ];
    for (port, frame) in spoofs {
        assert_eq!(lab.send(port, frame).0, OOW);
    }
    // Real traffic continues at the real sequence numbers.
    conn.client_sends(&mut lab, b"more");
    conn.backend_sends(&mut lab, b"ok");
    let last2 = lab.now;
    assert!(last2 >= last);
    assert_exact_reset_on_idle(&mut lab, &conn, last2, 80);
}

#[test]
fn spoofed_out_of_window_packets_do_not_keep_a_flow_alive() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 80, 40_105);
    conn.client_sends(&mut lab, b"hello");
    let last = lab.now;
    // A spoofed segment every 30 s from both sides, none in the window.
    let mut i = 0u32;
    while lab.now + secs_f(30.0) < last + mins(4) {
        lab.advance(secs_f(30.0));
        i += 1;
        let c = conn
            .client
            .seg(ACK, conn.c_seq.wrapping_add(i << 24), conn.s_seq, b"x");
        let b = conn
            .backend
            .seg(ACK, conn.s_seq.wrapping_sub(i << 24), conn.c_seq, b"y");
        assert_eq!(lab.send(CLIENT_PORT, c).0, OOW);
        assert_eq!(lab.send(BACKEND_PORT, b).0, OOW);
    }
    assert!(i >= 7);
    assert_exact_reset_on_idle(&mut lab, &conn, last, 80);
}

#[test]
fn spoofed_rst_then_syn_does_not_recreate_the_flow() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 80, 40_106);
    conn.client_sends(&mut lab, b"hello");
    let last = lab.now;
    let rst = conn
        .client
        .seg(RST, conn.c_seq.wrapping_add(1 << 30), 0, &[]);
    assert_eq!(lab.send(CLIENT_PORT, rst).0, OOW);
    // A SYN on the established tuple: passed on untouched (the backend answers with a challenge
    // ACK), never a new flow stuck in SynSent.
    let (port, _) = lab.forward(CLIENT_PORT, conn.client.seg(SYN, 123_456_789, 0, &[]));
    assert_eq!(port, BACKEND_PORT);
    let f = only_flow(&lab);
    assert_eq!(f.tcp_state, Some(TcpState::Established));
    assert_eq!(f.last_seen, last);
    assert_eq!(
        lab.engine
            .counters()
            .rule(rule_id(&lab, "http"))
            .flows_created,
        1
    );
    // The backend's challenge ACK is in the window; the connection goes on.
    lab.forward(
        BACKEND_PORT,
        conn.backend.seg(ACK, conn.s_seq, conn.c_seq, &[]),
    );
    conn.client_sends(&mut lab, b"on");
    let last2 = lab.now;
    assert_exact_reset_on_idle(&mut lab, &conn, last2, 80);
}

#[test]
fn a_restarted_client_recovers_through_the_challenge_ack() {
    // The client lost its connection state and reuses the port: its SYN reaches the backend,
    // whose challenge ACK draws the client's RST at exactly the sequence number the backend
    // acknowledges; that RST ends the flow and the next SYN opens a new one.
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 80, 40_107);
    conn.client_sends(&mut lab, b"hello");
    lab.forward(CLIENT_PORT, conn.client.seg(SYN, 900_000, 0, &[]));
    lab.forward(
        BACKEND_PORT,
        conn.backend.seg(ACK, conn.s_seq, conn.c_seq, &[]),
    );
    lab.forward(CLIENT_PORT, conn.client.seg(RST, conn.c_seq, 0, &[]));
    assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::Reset));
    lab.forward(CLIENT_PORT, conn.client.seg(SYN, 900_000, 0, &[]));
    assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::SynSent));
    assert_eq!(
        lab.engine
            .counters()
            .rule(rule_id(&lab, "http"))
            .flows_created,
        2
    );
}

#[test]
fn synack_that_does_not_acknowledge_the_syn_is_dropped() {
    let mut lab = Lab::new();
    let client = Tcp::client(80, 40_108);
    let (_, out) = lab.forward(CLIENT_PORT, client.seg(SYN, 5000, 0, &[]));
    let syn = seen(&out);
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    assert_eq!(
        lab.send(BACKEND_PORT, backend.seg(SYN | ACK, 1, 4242, &[]))
            .0,
        OOW
    );
    assert_eq!(
        lab.send(BACKEND_PORT, backend.seg(RST | ACK, 0, 4242, &[]))
            .0,
        OOW
    );
    assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::SynSent));
    lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 1, 5001, &[]));
    assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::SynReceived));
    // A connection refused: RST+ACK acknowledging the SYN ends it.
    let client2 = Tcp::client(80, 40_109);
    let (_, out) = lab.forward(CLIENT_PORT, client2.seg(SYN, 77, 0, &[]));
    let backend2 = Tcp::reply_to(&seen(&out), seen(&out).dst_mac, XLB_MAC[1]);
    lab.forward(BACKEND_PORT, backend2.seg(RST | ACK, 0, 78, &[]));
    let states: Vec<_> = lab.engine.flows().map(|f| f.tcp_state).collect();
    assert!(states.contains(&Some(TcpState::Reset)), "{states:?}");
}

#[test]
fn window_scale_from_the_syns_widens_the_window() {
    // Both SYNs carry shift 7; the backend then advertises 2 000 << 7 = 256 000 bytes.
    let run = |wscale: Option<u8>| {
        let mut lab = Lab::new();
        let client = Tcp::client(80, 40_110);
        let (_, out) = lab.forward(CLIENT_PORT, client.seg_win(SYN, 10, 0, 64_240, wscale, &[]));
        let syn = seen(&out);
        let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
        lab.forward(
            BACKEND_PORT,
            backend.seg_win(SYN | ACK, 20, 11, 65_160, wscale, &[]),
        );
        lab.forward(CLIENT_PORT, client.seg_win(ACK, 11, 21, 502, None, &[]));
        lab.forward(BACKEND_PORT, backend.seg_win(ACK, 21, 11, 2_000, None, &[]));
        // 200 000 bytes ahead: within 256 000, beyond the unscaled 65 160.
        let ahead = client.seg_win(ACK | PSH, 11 + 200_000, 21, 502, None, b"data");
        lab.send(CLIENT_PORT, ahead).0
    };
    assert!(matches!(run(Some(7)), Verdict::Tx { .. }));
    assert_eq!(run(None), OOW);
}

#[test]
fn sequence_numbers_wrap_and_idle_rsts_carry_the_wrapped_values() {
    let mut lab = Lab::new();
    let mut conn = establish_with(&mut lab, 80, 40_111, u32::MAX - 3, u32::MAX - 1);
    conn.client_sends(&mut lab, b"across the wrap");
    conn.backend_sends(&mut lab, b"and back");
    assert!(conn.c_seq < 100 && conn.s_seq < 100, "both wrapped");
    // A keepalive probe at SND.NXT - 1 and a retransmission from before the wrap: in the window.
    lab.forward(
        CLIENT_PORT,
        conn.client
            .seg(ACK, conn.c_seq.wrapping_sub(1), conn.s_seq, &[]),
    );
    let old = conn
        .client
        .seg(ACK | PSH, u32::MAX - 2, conn.s_seq, b"across the wrap");
    lab.forward(CLIENT_PORT, old);
    let far = conn
        .client
        .seg(ACK, conn.c_seq.wrapping_add(1 << 31), conn.s_seq, b"x");
    assert_eq!(lab.send(CLIENT_PORT, far).0, OOW);
    let last = lab.now;
    assert_exact_reset_on_idle(&mut lab, &conn, last, 80);
}

#[test]
fn outbound_snat_flow_keeps_its_port_against_spoofed_rsts() {
    let mut lab = Lab::new();
    let member = Tcp::member_to_remote(50_500);
    let (_, out) = lab.forward(BACKEND_PORT, member.seg(SYN, 100, 0, &[]));
    let snat_port = seen(&out).sport;
    let remote = Tcp::remote_to_snat(snat_port);
    lab.forward(INTERNET_PORT, remote.seg(SYN | ACK, 9000, 101, &[]));
    lab.forward(BACKEND_PORT, member.seg(ACK, 101, 9001, &[]));
    // An attacker on the internet side guesses the SNAT port but not the sequence number.
    for guess in [12_345_678u32, 1 << 20, 1 << 31, 3 << 30] {
        assert_eq!(
            lab.send(INTERNET_PORT, remote.seg(RST, guess, 0, &[])).0,
            OOW
        );
    }
    assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::Established));
    assert_eq!(out_of_window(&lab, "egress"), (4, 4));
    // The remote's own RST (exact) ends it.
    lab.forward(INTERNET_PORT, remote.seg(RST, 9001, 0, &[]));
    assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::Reset));
}

#[test]
fn picked_up_flow_is_not_ended_before_both_directions_are_known() {
    let mut lab = Lab::new();
    let client = Tcp::client(83, 40_112); // http-pickup
    let (port, out) = lab.forward(
        CLIENT_PORT,
        client.seg(ACK | PSH, 5000, 8000, b"mid-stream"),
    );
    assert_eq!(port, BACKEND_PORT);
    let o = seen(&out);
    let backend = Tcp::reply_to(&o, o.dst_mac, XLB_MAC[1]);
    // The client's RST at its next sequence number: forwarded, but the flow stays (one side
    // only has been seen, the number may be stale).
    lab.forward(CLIENT_PORT, client.seg(RST, 5010, 0, &[]));
    assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::Established));
    lab.forward(BACKEND_PORT, backend.seg(ACK, 8000, 5010, &[]));
    // Both known: inexact RSTs pass, the exact one ends it.
    lab.forward(CLIENT_PORT, client.seg(RST, 5011, 0, &[]));
    assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::Established));
    lab.forward(CLIENT_PORT, client.seg(RST, 5010, 0, &[]));
    assert_eq!(only_flow(&lab).tcp_state, Some(TcpState::Reset));
}
