//! Packet-in / packet-out and virtual-time tests of the flow behaviour (docs/behaviour.md) through the whole engine.

mod common;

use std::net::IpAddr;

use common::flags::*;
use common::*;
use xlb_engine::tcp::TcpState;
use xlb_engine::time::mins;
use xlb_engine::{DropReason, EngineConfig, Event, Verdict};

#[test]
fn lb_rule_translates_both_directions_with_valid_checksums() {
    let mut lab = Lab::new();
    let client = Tcp::client(80, 40_000);
    let (port, out) = lab.forward(CLIENT_PORT, client.seg(SYN, 1000, 0, &[]));
    assert_eq!(port, BACKEND_PORT);
    let syn = seen(&out);
    assert!(
        syn.dst == IpAddr::from(B1) || syn.dst == IpAddr::from(B2),
        "{:?}",
        syn.dst
    );
    assert_eq!(syn.dport, 8080);
    assert_eq!(
        (syn.src, syn.sport),
        (IpAddr::from(CLIENT), 40_000),
        "client address preserved"
    );
    assert_eq!(syn.src_mac, XLB_MAC[1]);
    assert_eq!(
        syn.dst_mac,
        if syn.dst == IpAddr::from(B1) {
            B1_MAC
        } else {
            B2_MAC
        }
    );
    assert_eq!(syn.ttl, 63);
    assert_eq!(syn.tcp_flags, SYN);

    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    let (port, out) = lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 9000, 1001, &[]));
    assert_eq!(port, CLIENT_PORT);
    let synack = seen(&out);
    assert_eq!((synack.src, synack.sport), (IpAddr::from(VIP), 80));
    assert_eq!((synack.dst, synack.dport), (IpAddr::from(CLIENT), 40_000));
    assert_eq!(
        (synack.src_mac, synack.dst_mac),
        (XLB_MAC[0], CLIENT_MAC),
        "reply goes back to the sender's MAC"
    );

    let mut conn = Conn {
        client,
        backend,
        c_seq: 1001,
        s_seq: 9001,
        backend_ip: syn.dst,
        backend_mac: syn.dst_mac,
    };
    lab.forward(CLIENT_PORT, client.seg(ACK, 1001, 9001, &[]));
    let data = conn.client_sends(&mut lab, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(data.payload, b"GET / HTTP/1.0\r\n\r\n");
    let reply = conn.backend_sends(&mut lab, b"HTTP/1.0 200 OK\r\n\r\n");
    assert_eq!(reply.payload, b"HTTP/1.0 200 OK\r\n\r\n");

    let c = lab.engine.counters().rule(rule_id(&lab, "http"));
    assert_eq!(c.flows_created, 1);
    assert_eq!(c.syns, 1);
    assert_eq!(c.packets, [3, 2]);
    let flows: Vec<_> = lab.engine.flows().collect();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].tcp_state, Some(TcpState::Established));
}

fn rule_id(lab: &Lab, name: &str) -> u16 {
    let rules = lab.engine.rules();
    (0..rules.rule_id_bound() as u16)
        .find(|&id| rules.rule(id).is_some_and(|r| &*r.name == name))
        .unwrap_or_else(|| panic!("no rule {name}"))
}

#[test]
fn reset_on_idle_sends_exact_rsts_to_both_ends() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 80, 40_001);
    conn.client_sends(&mut lab, b"hello");
    conn.backend_sends(&mut lab, b"world!");
    let last = lab.now;
    lab.run_until(last + mins(4) - 1);
    assert!(lab.emitted.is_empty(), "nothing before the idle timeout");
    assert_eq!(lab.engine.flow_count(), 1);
    lab.run_until(last + mins(4) + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
    assert_eq!(lab.emitted.len(), 2, "one RST to each end");

    assert_eq!(conn.backend_mac, backend_mac(conn.backend_ip));
    let [to_client, to_backend] = conn.expected_rsts((VIP.into(), 80), (conn.backend_ip, 8080));
    let (p0, f0) = &lab.emitted[0];
    let (p1, f1) = &lab.emitted[1];
    assert_eq!(
        (*p0, f0),
        (CLIENT_PORT, &to_client),
        "RST to the client, exact bytes"
    );
    assert_eq!(
        (*p1, f1),
        (BACKEND_PORT, &to_backend),
        "RST to the backend, exact bytes"
    );

    let c = lab.engine.counters().rule(rule_id(&lab, "http"));
    assert_eq!((c.flows_expired_idle, c.flows_reset_on_idle), (1, 1));
    let mut events = vec![];
    lab.engine.drain_events(|e| events.push(e));
    assert!(
        matches!(events[..], [Event::ResetOnIdle { .. }]),
        "{events:?}"
    );
}

fn lab_tick() -> u64 {
    1 << EngineConfig::default().tick_shift
}

#[test]
fn silent_expiry_then_late_packet_is_dropped_and_counted() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 81, 40_002);
    conn.client_sends(&mut lab, b"x");
    let last = lab.now;
    lab.run_until(last + mins(4) + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
    assert!(lab.emitted.is_empty(), "silent by default");
    let id = rule_id(&lab, "http-silent");
    assert_eq!(lab.engine.counters().rule(id).flows_expired_idle, 1);

    let (v, _) = lab.send(
        CLIENT_PORT,
        conn.client.seg(ACK | PSH, conn.c_seq, conn.s_seq, b"late"),
    );
    assert_eq!(v, Verdict::Drop(DropReason::NoFlow));
    // The backend's late packet meets no rule either, and is counted late too.
    let (v, _) = lab.send(
        BACKEND_PORT,
        conn.backend.seg(ACK, conn.s_seq, conn.c_seq, b""),
    );
    assert_eq!(v, Verdict::Drop(DropReason::NoFlow));
    let c = lab.engine.counters().rule(id);
    assert_eq!(c.late_packets, 2);
    assert_eq!(c.no_flow, 1);
}

#[test]
fn keepalive_before_timeout_keeps_flow_and_never_moves_seq_back() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 80, 40_003);
    conn.client_sends(&mut lab, b"abc");
    // Linux keepalive probe at timeout - 1 s: seq = SND.NXT - 1, no payload; the peer ACKs.
    let start = lab.now;
    lab.run_until(start + mins(4) - s(1));
    lab.forward(
        CLIENT_PORT,
        conn.client.seg(ACK, conn.c_seq - 1, conn.s_seq, &[]),
    );
    lab.forward(
        BACKEND_PORT,
        conn.backend.seg(ACK, conn.s_seq, conn.c_seq, &[]),
    );
    lab.run_until(start + mins(4) + s(30));
    assert_eq!(
        lab.engine.flow_count(),
        1,
        "keepalive refreshed the idle timer"
    );
    assert!(lab.emitted.is_empty());
    let probe_time = start + mins(4) - s(1);
    lab.run_until(probe_time + mins(4) + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
    // The RST to the backend carries the client's real next sequence number, not the probe's.
    assert_eq!(conn.backend_mac, backend_mac(conn.backend_ip));
    let [_, to_backend] = conn.expected_rsts((VIP.into(), 80), (conn.backend_ip, 8080));
    assert_eq!(lab.emitted[1].1, to_backend);
}

#[test]
fn udp_uses_fixed_udp_timeout_not_the_rules_tcp_timeout() {
    let mut lab = Lab::new();
    let q = udp(
        CLIENT_MAC,
        XLB_MAC[0],
        CLIENT.into(),
        5000,
        VIP.into(),
        53,
        b"query",
    );
    let (port, out) = lab.forward(CLIENT_PORT, q);
    assert_eq!(port, BACKEND_PORT);
    let o = seen(&out);
    assert_eq!(o.dport, 5353);
    let r = udp(
        o.dst_mac,
        XLB_MAC[1],
        o.dst,
        5353,
        CLIENT.into(),
        5000,
        b"answer",
    );
    let (port, out) = lab.forward(BACKEND_PORT, r);
    assert_eq!(port, CLIENT_PORT);
    let back = seen(&out);
    assert_eq!((back.src, back.sport), (IpAddr::from(VIP), 53));
    let last = lab.now;
    // The rule says 30 minutes; UDP flows use the daemon's 4-minute UDP timeout.
    lab.run_until(last + s(240) - 1);
    assert_eq!(lab.engine.flow_count(), 1);
    lab.run_until(last + s(240) + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
    assert!(lab.emitted.is_empty(), "no RST for UDP");
    assert_eq!(
        lab.engine
            .counters()
            .rule(rule_id(&lab, "dns"))
            .flows_expired_idle,
        1
    );
}

#[test]
fn udp_timeout_setting_is_honoured() {
    let toml = DEFAULT_CONFIG.replace(
        "lab_time_scale = 1",
        "lab_time_scale = 1\nudp_idle_timeout_seconds = 60",
    );
    let mut lab = Lab::with(&toml, EngineConfig::default());
    let q = udp(
        CLIENT_MAC,
        XLB_MAC[0],
        CLIENT.into(),
        5001,
        VIP.into(),
        53,
        b"q",
    );
    lab.forward(CLIENT_PORT, q);
    let t = lab.now;
    lab.run_until(t + s(60) - 1);
    assert_eq!(lab.engine.flow_count(), 1);
    lab.run_until(t + s(60) + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
}

#[test]
fn ha_ports_on_internal_frontend_never_reset() {
    let mut lab = Lab::new();
    let client = common::Tcp {
        dst: ILB_VIP.into(),
        ..Tcp::client(443, 40_004)
    };
    let (_, out) = lab.forward(CLIENT_PORT, client.seg(SYN, 1, 0, &[]));
    let syn = seen(&out);
    assert_eq!(syn.dport, 443, "HA ports keep the destination port");
    let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
    lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 50, 2, &[]));
    lab.forward(CLIENT_PORT, client.seg(ACK, 2, 51, &[]));
    let t = lab.now;
    lab.run_until(t + mins(4) + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
    assert!(
        lab.emitted.is_empty(),
        "no RST for HA ports on internal frontends"
    );
    let c = lab.engine.counters().rule(rule_id(&lab, "ha"));
    assert_eq!((c.flows_expired_idle, c.flows_reset_on_idle), (1, 0));
}

#[test]
fn half_open_flow_expires_without_rst() {
    let mut lab = Lab::new();
    let client = Tcp::client(80, 40_005);
    lab.forward(CLIENT_PORT, client.seg(SYN, 1, 0, &[]));
    let half_open = lab.engine.rules().timers().tcp_half_open;
    let t = lab.now;
    lab.run_until(t + half_open - 1);
    assert_eq!(lab.engine.flow_count(), 1);
    lab.run_until(t + half_open + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
    assert!(
        lab.emitted.is_empty(),
        "no RST for a flow that never reached ESTABLISHED"
    );
}

#[test]
fn closed_flow_lingers_briefly_not_for_the_idle_timeout() {
    let mut lab = Lab::new();
    let conn = establish(&mut lab, 80, 40_006);
    lab.forward(
        CLIENT_PORT,
        conn.client.seg(FIN | ACK, conn.c_seq, conn.s_seq, &[]),
    );
    lab.forward(
        BACKEND_PORT,
        conn.backend.seg(FIN | ACK, conn.s_seq, conn.c_seq + 1, &[]),
    );
    lab.forward(
        CLIENT_PORT,
        conn.client.seg(ACK, conn.c_seq + 1, conn.s_seq + 1, &[]),
    );
    let linger = lab.engine.rules().timers().tcp_close_linger;
    assert!(linger < mins(1));
    let t = lab.now;
    lab.run_until(t + linger - 1);
    assert_eq!(lab.engine.flow_count(), 1);
    lab.run_until(t + linger + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
    assert!(lab.emitted.is_empty());
    let c = lab.engine.counters().rule(rule_id(&lab, "http"));
    assert_eq!((c.flows_closed, c.flows_expired_idle), (1, 0));
}

#[test]
fn half_closed_flow_gets_no_rst_on_idle() {
    let mut lab = Lab::new();
    let conn = establish(&mut lab, 80, 40_016);
    lab.forward(
        CLIENT_PORT,
        conn.client.seg(FIN | ACK, conn.c_seq, conn.s_seq, &[]),
    );
    let t = lab.now;
    lab.run_until(t + mins(4) + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
    assert!(
        lab.emitted.is_empty(),
        "a half-closed flow is not ESTABLISHED"
    );
}

#[test]
fn syn_reopens_a_lingering_tuple() {
    let mut lab = Lab::new();
    let conn = establish(&mut lab, 80, 40_017);
    lab.forward(CLIENT_PORT, conn.client.seg(RST, conn.c_seq, 0, &[]));
    let (port, _) = lab.forward(CLIENT_PORT, conn.client.seg(SYN, 555_000, 0, &[]));
    assert_eq!(port, BACKEND_PORT);
    assert_eq!(lab.engine.flow_count(), 1);
    assert_eq!(
        lab.engine
            .counters()
            .rule(rule_id(&lab, "http"))
            .flows_created,
        2
    );
}

#[test]
fn unknown_flow_policies() {
    let mut lab = Lab::new();
    // drop (default): counted, nothing created.
    let c81 = Tcp::client(81, 41_000);
    assert_eq!(
        lab.send(CLIENT_PORT, c81.seg(ACK, 5, 6, b"x")).0,
        Verdict::Drop(DropReason::NoFlow)
    );
    assert_eq!(lab.engine.flow_count(), 0);

    // reset: an RST goes back to the sender, from the frontend.
    let c82 = Tcp::client(82, 41_001);
    let (port, out) = lab.forward(CLIENT_PORT, c82.seg(ACK | PSH, 5000, 6000, b"data"));
    assert_eq!(port, CLIENT_PORT);
    let rst = seen(&out);
    assert_eq!(
        (rst.src, rst.sport, rst.dst, rst.dport),
        (IpAddr::from(VIP), 82, IpAddr::from(CLIENT), 41_001)
    );
    assert_eq!((rst.tcp_flags & RST, rst.seq), (RST, 6000), "seq = SEG.ACK");
    assert_eq!(lab.engine.flow_count(), 0);
    assert_eq!(
        lab.engine
            .counters()
            .rule(rule_id(&lab, "http-reset-policy"))
            .unknown_flow_resets,
        1
    );
    // ...but an RST is never answered.
    assert_eq!(
        lab.send(CLIENT_PORT, c82.seg(RST, 5000, 0, &[])).0,
        Verdict::Drop(DropReason::NoFlow)
    );

    // pickup: the same deterministic backend as a SYN of that tuple would get.
    let mut fresh = Lab::new();
    let c83 = Tcp::client(83, 41_002);
    let (_, syn_out) = fresh.forward(CLIENT_PORT, c83.seg(SYN, 1, 0, &[]));
    let expected_backend = seen(&syn_out).dst;
    let (port, out) = lab.forward(CLIENT_PORT, c83.seg(ACK | PSH, 100, 200, b"mid-stream"));
    assert_eq!(port, BACKEND_PORT);
    assert_eq!(seen(&out).dst, expected_backend);
    assert_eq!(
        lab.engine
            .counters()
            .rule(rule_id(&lab, "http-pickup"))
            .flows_picked_up,
        1
    );
    let f = lab.engine.flows().next().unwrap();
    assert_eq!(f.tcp_state, Some(TcpState::Established));
}

#[test]
fn inbound_nat_rule_forwards_to_its_member_and_port() {
    let mut lab = Lab::new();
    let client = Tcp::client(2201, 42_000);
    let (port, out) = lab.forward(CLIENT_PORT, client.seg(SYN, 1, 0, &[]));
    assert_eq!(port, BACKEND_PORT);
    let o = seen(&out);
    assert_eq!((o.dst, o.dport), (IpAddr::from(B1), 22));
}

#[test]
fn ipv6_lb_flow_with_reset_on_idle() {
    let mut lab = Lab::new();
    let client = Tcp {
        src: CLIENT6.into(),
        dst: VIP6.into(),
        ..Tcp::client(80, 43_000)
    };
    let (port, out) = lab.forward(CLIENT_PORT, client.seg(SYN, 10, 0, &[]));
    assert_eq!(port, BACKEND_PORT);
    let syn = seen(&out);
    assert_eq!((syn.dst, syn.dport, syn.ttl), (IpAddr::from(B6), 8080, 63));
    let backend = Tcp::reply_to(&syn, B1_MAC, XLB_MAC[1]);
    let (_, out) = lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, 20, 11, &[]));
    assert_eq!(seen(&out).src, IpAddr::from(VIP6));
    lab.forward(CLIENT_PORT, client.seg(ACK, 11, 21, &[]));
    let t = lab.now;
    lab.run_until(t + mins(4) + lab_tick());
    assert_eq!(lab.emitted.len(), 2);
    let to_client = expected_rst(
        (XLB_MAC[0], CLIENT_MAC),
        (VIP6.into(), 80),
        (CLIENT6.into(), 43_000),
        21,
        11,
    );
    assert_eq!(lab.emitted[0].1, to_client);
}

#[test]
fn partial_checksums_from_linux_sockets_are_completed() {
    let mut lab = Lab::new();
    let mut frame = udp(
        CLIENT_MAC,
        XLB_MAC[0],
        CLIENT.into(),
        6000,
        VIP.into(),
        53,
        b"partial please",
    );
    // What a veth peer hands over with CHECKSUM_PARTIAL: only the folded pseudo-header sum.
    let ip_len = 20u32;
    let udp_len = (frame.len() - 14) as u32 - ip_len;
    let mut sum: u32 = 0;
    for pair in [198u32 << 8 | 18, 10, 198 << 8 | 18, 100] {
        sum += pair;
    }
    sum += 17 + udp_len;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&(sum as u16).to_be_bytes());
    let (_, out) = lab.forward(CLIENT_PORT, frame);
    let o = seen(&out); // asserts the full checksum
    assert_eq!(o.payload, b"partial please");
}

#[test]
fn flow_table_full_refuses_new_flows_and_keeps_existing_ones() {
    let cfg = EngineConfig {
        flow_capacity: 2,
        ..EngineConfig::default()
    };
    let mut lab = Lab::with(DEFAULT_CONFIG, cfg);
    let mut a = establish(&mut lab, 80, 44_000);
    establish(&mut lab, 80, 44_001);
    let c = Tcp::client(80, 44_002);
    assert_eq!(
        lab.send(CLIENT_PORT, c.seg(SYN, 1, 0, &[])).0,
        Verdict::Drop(DropReason::FlowTableFull)
    );
    a.client_sends(&mut lab, b"still here");
    assert_eq!(
        lab.engine.counters().drop_count(DropReason::FlowTableFull),
        1
    );
    assert_eq!(
        lab.engine
            .counters()
            .rule(rule_id(&lab, "http"))
            .flow_table_full,
        1
    );
}

#[test]
fn changing_a_rules_timeout_applies_to_existing_flows_without_dropping_them() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 84, 45_000); // http-long: 30 minutes
    conn.client_sends(&mut lab, b"x");
    let t = lab.now;
    // Shorten 30 → 5 minutes while the flow is idle.
    let shorter = DEFAULT_CONFIG.replace(
        "idle_timeout_minutes = 30\ntcp_reset = true",
        "idle_timeout_minutes = 5\ntcp_reset = true",
    );
    assert_ne!(shorter, DEFAULT_CONFIG);
    let prev = lab.engine.rules().clone();
    lab.engine.set_rules(ruleset(&shorter, 2, Some(&prev)));
    assert_eq!(lab.engine.flow_count(), 1, "the change dropped nothing");
    conn.client_sends(&mut lab, b"still flows");
    let last = lab.now;
    lab.run_until(last + mins(5) - 1);
    assert_eq!(lab.engine.flow_count(), 1);
    lab.run_until(last + mins(5) + lab_tick());
    assert_eq!(
        lab.engine.flow_count(),
        0,
        "expired at the new, shorter timeout"
    );
    assert_eq!(lab.emitted.len(), 2);
    assert!(lab.now < t + mins(30));

    // Lengthen 4 → 30 minutes for the "http" rule: an existing flow outlives 4 minutes.
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 80, 45_001);
    conn.client_sends(&mut lab, b"x");
    let longer = DEFAULT_CONFIG.replacen(
        "idle_timeout_minutes = 4\ntcp_reset = true",
        "idle_timeout_minutes = 30\ntcp_reset = true",
        1,
    );
    let prev = lab.engine.rules().clone();
    lab.engine.set_rules(ruleset(&longer, 2, Some(&prev)));
    let last = lab.now;
    lab.run_until(last + mins(10));
    assert_eq!(lab.engine.flow_count(), 1);
    lab.run_until(last + mins(30) + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
}

#[test]
fn shortened_timeout_applies_to_idle_flows_at_their_next_expiry_check() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 84, 45_002); // 30 minutes
    conn.client_sends(&mut lab, b"x");
    let last = lab.now;
    let shorter = DEFAULT_CONFIG.replace(
        "idle_timeout_minutes = 30\ntcp_reset = true",
        "idle_timeout_minutes = 5\ntcp_reset = true",
    );
    let prev = lab.engine.rules().clone();
    lab.engine.set_rules(ruleset(&shorter, 2, Some(&prev)));
    lab.run_until(last + mins(5) + lab_tick());
    assert_eq!(
        lab.engine.flow_count(),
        0,
        "no packet since the change, still expired on time"
    );
}

#[test]
fn tcp_reset_toggled_live_applies_to_existing_flow() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 81, 45_003); // http-silent
    conn.client_sends(&mut lab, b"x");
    let on = DEFAULT_CONFIG.replace(
        "frontend_port = 81\nbackend_pool = \"web\"\nbackend_port = 8080\nidle_timeout_minutes = 4",
        "frontend_port = 81\nbackend_pool = \"web\"\nbackend_port = 8080\nidle_timeout_minutes = 4\ntcp_reset = true",
    );
    assert_ne!(on, DEFAULT_CONFIG);
    let prev = lab.engine.rules().clone();
    lab.engine.set_rules(ruleset(&on, 2, Some(&prev)));
    let t = lab.now;
    lab.run_until(t + mins(4) + lab_tick());
    assert_eq!(lab.emitted.len(), 2);
}

/// Member `B1` opens a TCP connection to the internet host through the outbound rule.
fn snat_syn(lab: &mut Lab, sport: u16) -> (Verdict, Vec<u8>) {
    let member = Tcp {
        src_mac: B1_MAC,
        dst_mac: XLB_MAC[1],
        src: B1.into(),
        dst: REMOTE.into(),
        sport,
        dport: 443,
    };
    lab.send(BACKEND_PORT, member.seg(SYN, 1, 0, &[]))
}

#[test]
fn outbound_rule_snats_and_translates_replies_back() {
    let mut lab = Lab::new();
    let (v, out) = snat_syn(&mut lab, 50_000);
    assert_eq!(
        v,
        Verdict::Tx {
            port: INTERNET_PORT,
            len: out.len() as u16
        }
    );
    let o = seen(&out);
    assert_eq!(o.src, IpAddr::from(SNAT_IP));
    assert_eq!(o.dst_mac, NET_MAC);
    let port = o.sport;
    let rules = lab.engine.rules().clone();
    let (_, blocks) = rules.match_outbound(6, B1.into()).unwrap();
    assert!(
        blocks
            .iter()
            .any(|b| port >= b.first_port && port < b.first_port + b.count),
        "port {port} in the member's block"
    );
    let remote = Tcp::remote_to_snat(port);
    let (p, back) = lab.forward(INTERNET_PORT, remote.seg(SYN | ACK, 77, 2, &[]));
    assert_eq!(p, BACKEND_PORT);
    let b = seen(&back);
    assert_eq!(
        (b.dst, b.dport, b.dst_mac),
        (IpAddr::from(B1), 50_000, B1_MAC)
    );
}

#[test]
fn snat_exhaustion_is_counted_once_per_episode_and_ports_are_released_on_schedule() {
    // A 10-minute outbound idle timeout keeps the other flows (and their ports) alive throughout.
    let toml = DEFAULT_CONFIG.replace(
        "allocated_outbound_ports = 8\nidle_timeout_minutes = 4",
        "allocated_outbound_ports = 8\nidle_timeout_minutes = 10",
    );
    assert_ne!(toml, DEFAULT_CONFIG);
    let mut lab = Lab::with(&toml, EngineConfig::default());
    // 8 ports allocated to the member.
    let mut ports = vec![];
    for i in 0..8 {
        let (v, out) = snat_syn(&mut lab, 50_100 + i);
        assert!(matches!(v, Verdict::Tx { .. }), "{v:?}");
        ports.push(seen(&out).sport);
    }
    for i in 0..3 {
        assert_eq!(
            snat_syn(&mut lab, 50_200 + i).0,
            Verdict::Drop(DropReason::SnatExhausted)
        );
    }
    let egress = rule_id(&lab, "egress");
    assert_eq!(lab.engine.counters().rule(egress).snat_exhausted, 3);
    let mut events = vec![];
    lab.engine.drain_events(|e| events.push(e));
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::SnatExhausted { .. }))
            .count(),
        1,
        "{events:?}"
    );
    assert_eq!(lab.engine.flow_count(), 8, "existing flows untouched");

    // Close one port with FIN both ways (held 240 s), reset another (held 15 s).
    let member = |sport| Tcp {
        src_mac: B1_MAC,
        dst_mac: XLB_MAC[1],
        src: B1.into(),
        dst: REMOTE.into(),
        sport,
        dport: 443,
    };
    let remote = |dport| Tcp {
        src_mac: NET_MAC,
        dst_mac: XLB_MAC[2],
        src: REMOTE.into(),
        dst: SNAT_IP.into(),
        sport: 443,
        dport,
    };
    for (i, &p) in ports.iter().enumerate() {
        lab.forward(INTERNET_PORT, remote(p).seg(SYN | ACK, 500, 2, &[]));
        lab.forward(
            BACKEND_PORT,
            member(50_100 + i as u16).seg(ACK, 2, 501, &[]),
        );
    }
    // Flow 0: FIN both ways.
    lab.forward(BACKEND_PORT, member(50_100).seg(FIN | ACK, 2, 501, &[]));
    lab.forward(INTERNET_PORT, remote(ports[0]).seg(FIN | ACK, 501, 3, &[]));
    // Flow 1: RST, with the sequence number the member expects next.
    lab.forward(INTERNET_PORT, remote(ports[1]).seg(RST, 501, 0, &[]));
    let t = lab.now;
    lab.run_until(t + s(15) - 1);
    assert!(matches!(
        snat_syn(&mut lab, 50_300).0,
        Verdict::Drop(DropReason::SnatExhausted)
    ));
    lab.run_until(t + s(15) + lab_tick());
    let (v, out) = snat_syn(&mut lab, 50_301);
    assert!(
        matches!(v, Verdict::Tx { .. }),
        "RST'd port free after 15 s: {v:?}"
    );
    assert_eq!(seen(&out).sport, ports[1]);
    lab.forward(INTERNET_PORT, remote(ports[1]).seg(SYN | ACK, 900, 2, &[]));
    lab.forward(BACKEND_PORT, member(50_301).seg(ACK, 2, 901, &[]));
    lab.run_until(t + s(240) - 1);
    assert!(matches!(
        snat_syn(&mut lab, 50_302).0,
        Verdict::Drop(DropReason::SnatExhausted)
    ));
    lab.run_until(t + s(240) + lab_tick());
    let (v, out) = snat_syn(&mut lab, 50_303);
    assert!(
        matches!(v, Verdict::Tx { .. }),
        "FIN'd port free after 240 s: {v:?}"
    );
    assert_eq!(seen(&out).sport, ports[0]);
}

#[test]
fn no_rule_and_non_ip_are_counted_drops() {
    let mut lab = Lab::new();
    let stray = udp(
        CLIENT_MAC,
        XLB_MAC[0],
        CLIENT.into(),
        1,
        "198.18.0.77".parse().unwrap(),
        2,
        b"",
    );
    assert_eq!(
        lab.send(CLIENT_PORT, stray).0,
        Verdict::Drop(DropReason::NoRule)
    );
    let mut arp = vec![0xffu8; 14 + 28];
    arp[12] = 0x08;
    arp[13] = 0x06;
    assert!(matches!(
        lab.send(CLIENT_PORT, arp).0,
        Verdict::Drop(DropReason::Parse(_))
    ));
    assert_eq!(lab.engine.counters().total_drops(), 2);
}

#[test]
fn no_neighbor_is_a_counted_drop_and_a_resolution_request() {
    let toml = DEFAULT_CONFIG.replace(
        "members = [{ address = \"198.18.1.11\" }, { address = \"198.18.1.12\" }]",
        "members = [{ address = \"198.18.1.99\" }]",
    );
    let mut lab = Lab::with(&toml, EngineConfig::default());
    let c = Tcp::client(80, 46_000);
    assert_eq!(
        lab.send(CLIENT_PORT, c.seg(SYN, 1, 0, &[])).0,
        Verdict::Drop(DropReason::NoNeighbor)
    );
    let mut misses = vec![];
    lab.engine.next_hops().take_misses(|a| misses.push(a));
    assert_eq!(
        misses,
        vec![xlb_engine::Addr::from(
            "198.18.1.99".parse::<IpAddr>().unwrap()
        )]
    );
}

#[test]
fn source_ip_distribution_keeps_a_client_on_one_backend() {
    let toml = DEFAULT_CONFIG.replacen(
        "tcp_reset = true\n",
        "tcp_reset = true\ndistribution = \"source_ip\"\n",
        1,
    );
    let mut lab = Lab::with(&toml, EngineConfig::default());
    let mut backends = std::collections::HashSet::new();
    for sport in 47_000..47_040 {
        let (_, out) = lab.forward(CLIENT_PORT, Tcp::client(80, sport).seg(SYN, 1, 0, &[]));
        backends.insert(seen(&out).dst);
    }
    assert_eq!(backends.len(), 1);
    // five_tuple spreads the same client over both members.
    let mut lab = Lab::new();
    let mut backends = std::collections::HashSet::new();
    for sport in 47_000..47_040 {
        let (_, out) = lab.forward(CLIENT_PORT, Tcp::client(80, sport).seg(SYN, 1, 0, &[]));
        backends.insert(seen(&out).dst);
    }
    assert_eq!(backends.len(), 2);
}

#[test]
fn expiry_work_is_bounded_per_call() {
    let cfg = EngineConfig {
        flow_capacity: 4096,
        ..EngineConfig::default()
    };
    let mut lab = Lab::with(DEFAULT_CONFIG, cfg);
    for sport in 0..1000u16 {
        lab.forward(
            CLIENT_PORT,
            udp(
                CLIENT_MAC,
                XLB_MAC[0],
                CLIENT.into(),
                10_000 + sport,
                VIP.into(),
                53,
                b"q",
            ),
        );
    }
    let t = lab.now + s(241);
    let mut calls = 0;
    let mut sink = |_: u16, _: &[u8]| {};
    loop {
        let n = lab.engine.expire(t, 64, &mut sink);
        assert!(n <= 64);
        calls += 1;
        if n == 0 {
            break;
        }
    }
    assert_eq!(lab.engine.flow_count(), 0);
    assert!(calls >= 1000 / 64);
}

/// Both directions of every flow kind steer to the same worker.
#[test]
fn both_directions_of_every_flow_steer_to_one_worker() {
    for workers in [2u16, 3, 4, 16] {
        let cfg = EngineConfig {
            workers,
            ..EngineConfig::default()
        };
        let lab = Lab::with(DEFAULT_CONFIG, cfg);
        let mut seen_owners = std::collections::HashSet::new();
        for sport in 30_000..30_200u16 {
            // Load balancing: client → VIP, backend → client.
            let fwd = Tcp::client(80, sport).seg(SYN, 1, 0, &[]);
            let back = Tcp {
                src_mac: B1_MAC,
                dst_mac: XLB_MAC[1],
                src: B1.into(),
                dst: CLIENT.into(),
                sport: 8080,
                dport: sport,
            }
            .seg(SYN | ACK, 1, 2, &[]);
            let owner = lab.engine.owner(&fwd).unwrap();
            assert_eq!(owner, lab.engine.owner(&back).unwrap());
            assert!(owner < workers);
            seen_owners.insert(owner);
            // Outbound: member → remote, remote → SNAT address (any SNAT port).
            let out = Tcp {
                src_mac: B1_MAC,
                dst_mac: XLB_MAC[1],
                src: B1.into(),
                dst: REMOTE.into(),
                sport: 40_000,
                dport: sport,
            }
            .seg(SYN, 1, 0, &[]);
            let reply = Tcp {
                src_mac: NET_MAC,
                dst_mac: XLB_MAC[2],
                src: REMOTE.into(),
                dst: SNAT_IP.into(),
                sport,
                dport: 1024 + sport % 8,
            }
            .seg(SYN | ACK, 1, 2, &[]);
            assert_eq!(lab.engine.owner(&out), lab.engine.owner(&reply));
        }
        assert_eq!(
            seen_owners.len(),
            workers as usize,
            "flows spread over every worker"
        );
    }
}

#[test]
fn two_workers_each_hold_their_own_flows_end_to_end() {
    // Two engines (workers 0 and 1) fed by a steering function, as the daemon does: every frame
    // goes to its owner, and each SNAT worker allocates from its own share of the ports.
    let mk = |w| {
        let cfg = EngineConfig {
            worker: w,
            workers: 2,
            ..EngineConfig::default()
        };
        Lab::with(DEFAULT_CONFIG, cfg)
    };
    let mut labs = [mk(0), mk(1)];
    let mut snat_ports = std::collections::HashSet::new();
    for i in 0..4u16 {
        let member = Tcp {
            src_mac: B1_MAC,
            dst_mac: XLB_MAC[1],
            src: B1.into(),
            dst: REMOTE.into(),
            sport: 50_000 + i,
            dport: 7000 + i,
        };
        let syn = member.seg(SYN, 1, 0, &[]);
        let w = labs[0].engine.owner(&syn).unwrap() as usize;
        let (_, out) = labs[w].forward(BACKEND_PORT, syn);
        let o = seen(&out);
        assert_eq!(o.sport % 2, w as u16, "port from the owner's share");
        assert!(
            snat_ports.insert(o.sport),
            "no two workers pick the same port"
        );
        let reply = Tcp {
            src_mac: NET_MAC,
            dst_mac: XLB_MAC[2],
            src: REMOTE.into(),
            dst: SNAT_IP.into(),
            sport: 7000 + i,
            dport: o.sport,
        }
        .seg(SYN | ACK, 9, 2, &[]);
        let rw = labs[1].engine.owner(&reply).unwrap() as usize;
        assert_eq!(rw, w);
        let (port, _) = labs[rw].forward(INTERNET_PORT, reply);
        assert_eq!(port, BACKEND_PORT);
    }
}

/// The "http-long" rule block of the default configuration (30 minutes, reset on idle).
const HTTP_LONG: &str = "[[load_balancing_rules]]\nname = \"http-long\"\nfrontend = \"web\"\nprotocol = \"TCP\"\nfrontend_port = 84\nbackend_pool = \"web\"\nbackend_port = 8080\nidle_timeout_minutes = 30\ntcp_reset = true\n";

#[test]
fn a_deleted_rules_flows_keep_its_settings_and_a_new_rule_starts_from_zero() {
    let mut lab = Lab::new();
    let mut conn = establish(&mut lab, 84, 46_000); // http-long: 30 minutes, reset on idle
    conn.client_sends(&mut lab, b"x");
    let old_id = rule_id(&lab, "http-long");
    assert_eq!(lab.engine.counters().live_flows(old_id), 1);
    assert!(lab.engine.counters().rule(old_id).flows_created == 1);

    // Delete "http-long" and, in the same generation, add a rule on the same port with other
    // settings (4 minutes, silent): the running flow must not follow the new rule.
    assert!(DEFAULT_CONFIG.contains(HTTP_LONG));
    let replaced = DEFAULT_CONFIG.replace(
        HTTP_LONG,
        "[[load_balancing_rules]]\nname = \"http-short\"\nfrontend = \"web\"\nprotocol = \"TCP\"\nfrontend_port = 84\nbackend_pool = \"web\"\nbackend_port = 8080\nidle_timeout_minutes = 4\n",
    );
    let prev = lab.engine.rules().clone();
    lab.engine.set_rules(ruleset(&replaced, 2, Some(&prev)));
    let new_id = rule_id(&lab, "http-short");
    assert_ne!(new_id, old_id, "a new rule never takes a deleted rule's id");
    assert!(lab.engine.rules().is_retired(old_id));
    assert_eq!(lab.engine.counters().rule(new_id), Default::default());
    assert_eq!(lab.engine.flow_count(), 1, "the change dropped nothing");

    // The old flow's packets still count on the old rule, and it lives on past the new rule's
    // 4 minutes, then is reset at the deleted rule's 30 minutes.
    conn.client_sends(&mut lab, b"y");
    assert_eq!(lab.engine.counters().rule(new_id).packets, [0, 0]);
    let last = lab.now;
    lab.run_until(last + mins(10));
    assert_eq!(
        lab.engine.flow_count(),
        1,
        "not expired at the new rule's 4 minutes"
    );
    lab.run_until(last + mins(30) + lab_tick());
    assert_eq!(lab.engine.flow_count(), 0);
    assert_eq!(
        lab.emitted.len(),
        2,
        "reset on idle as the deleted rule said"
    );
    assert_eq!(lab.engine.counters().live_flows(old_id), 0);
    assert_eq!(lab.engine.counters().rule(new_id).flows_expired_idle, 0);

    // A new connection to port 84 is the new rule's, counted there from zero.
    let _c2 = establish(&mut lab, 84, 46_001);
    assert_eq!(lab.engine.counters().rule(new_id).flows_created, 1);

    // Once released (no flow left), the old id may go to another new rule: that rule starts
    // from zero counters, not the deleted rule's.
    let drained = std::collections::HashSet::from([old_id]);
    let cfg = xlb_engine::Config::from_toml_str(&replaced).unwrap();
    let released = xlb_engine::compile_releasing(
        &cfg,
        Some(lab.engine.rules()),
        &xlb_engine::MemberHealth::default(),
        3,
        &drained,
    )
    .unwrap();
    lab.engine.set_rules(std::sync::Arc::new(released));
    let again = DEFAULT_CONFIG.replace(
        HTTP_LONG,
        &format!(
            "{HTTP_LONG}{}",
            HTTP_LONG.replace("http-long", "reborn").replace("84", "85")
        ),
    );
    let again = again.replace(
        "[[load_balancing_rules]]\nname = \"http-long\"",
        "[[load_balancing_rules]]\nname = \"http-short\"",
    );
    let prev = lab.engine.rules().clone();
    lab.engine.set_rules(ruleset(&again, 4, Some(&prev)));
    let reborn = rule_id(&lab, "reborn");
    assert_eq!(reborn, old_id, "the released id is handed out again");
    assert_eq!(lab.engine.counters().rule(reborn), Default::default());
}

/// A SYN that also carries FIN opens no flow, inbound or outbound (found by fuzzing: it used to
/// create one whose next sequence number left out the FIN, so the reset-on-idle RST toward the
/// backend carried a number one short). A proper SYN on the same tuple then works.
#[test]
fn syn_with_fin_opens_no_flow() {
    let mut lab = Lab::new();
    let client = Tcp::client(80, 40_010);
    let (v, _) = lab.send(CLIENT_PORT, client.seg(SYN | FIN, 1000, 0, b"data"));
    assert_eq!(v, Verdict::Drop(DropReason::BadTcpFlags));
    assert_eq!(lab.engine.flow_count(), 0);

    let member = Tcp::member_to_remote(50_000);
    let (v, _) = lab.send(BACKEND_PORT, member.seg(SYN | FIN, 7, 0, &[]));
    assert_eq!(v, Verdict::Drop(DropReason::BadTcpFlags));
    assert_eq!(lab.engine.flow_count(), 0);

    let mut conn = establish(&mut lab, 80, 40_010);
    conn.client_sends(&mut lab, b"x");
    assert_eq!(lab.engine.flow_count(), 1);
}
