use std::net::Ipv4Addr;

use std::sync::Arc;

use etherparse::PacketBuilder;
use xlb_api::FlowFilter;
use xlb_engine::{compile, Config, MemberHealth};

use super::*;

const CONFIG: &str = r#"
[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[frontends]]
name = "snat"
address = "198.19.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "ALL"
frontend_port = 80
backend_pool = "web"
backend_port = 8080

[[outbound_rules]]
name = "out"
frontends = ["snat"]
backend_pool = "web"
protocol = "ALL"
"#;

fn frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, udp: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(
        src.octets(),
        dst.octets(),
        64,
    );
    let mut out = Vec::new();
    if udp {
        b.udp(sport, dport).write(&mut out, b"x").unwrap();
    } else {
        b.tcp(sport, dport, 1, 1000)
            .syn()
            .write(&mut out, &[])
            .unwrap();
    }
    out
}

/// A one-worker handler on `CONFIG` with ports 0 (clients) and 1 (members), both members'
/// MACs known, taking answers to the self-probe source 198.18.0.250.
fn probe_handler() -> (EngineHandler, Receiver<FromWorker>) {
    use xlb_engine::{EngineConfig, Route};
    let config = Config::from_toml_str(CONFIG).unwrap();
    let rules = Arc::new(compile(&config, None, &MemberHealth::default(), 1).unwrap());
    let mut engine = Engine::new(EngineConfig::default(), rules, 1);
    let net = engine.next_hops();
    net.set_port(0, [2, 0, 0, 0, 0xa0, 0]);
    net.set_port(1, [2, 0, 0, 0, 0xa0, 1]);
    net.set_routes(vec![
        Route::v4(Ipv4Addr::new(198, 18, 0, 0), 24, 0, None),
        Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None),
    ]);
    for (a, mac) in [([198, 18, 1, 11], 0xb1), ([198, 18, 1, 12], 0xb2)] {
        net.set_neighbor(Addr::from_v4_bytes(a), 1, [2, 0, 0, 0, mac, 1])
            .unwrap();
    }
    let (_to_tx, to_rx) = crossbeam::channel::bounded(8);
    let (from_tx, from_rx) = crossbeam::channel::bounded(8);
    let (ack_tx, _ack_rx) = crossbeam::channel::bounded(8);
    let link = ControlLink {
        from_control: to_rx,
        to_control: from_tx,
        acks: ack_tx,
        counters: crate::plane::cell::cell(0).0,
    };
    let h = EngineHandler::new(0, engine, link, u64::MAX, None)
        .with_probe_sources(vec![Addr::from_v4_bytes([198, 18, 0, 250])]);
    (h, from_rx)
}

/// The kernel's view as the control thread would publish it: both members on port 1
/// with `mac` as their last byte, the lab's routes.
fn kernel_view(version: u64, mac: u8) -> crate::kernel_watch::KernelView {
    use xlb_engine::Route;
    crate::kernel_watch::KernelView {
        version,
        neighbours: vec![
            (
                Addr::from_v4_bytes([198, 18, 1, 11]),
                1,
                None,
                [2, 0, 0, 0, 0xb1, mac],
            ),
            (
                Addr::from_v4_bytes([198, 18, 1, 12]),
                1,
                None,
                [2, 0, 0, 0, 0xb2, mac],
            ),
        ],
        routes_version: 1,
        routes: vec![
            Route::v4(Ipv4Addr::new(198, 18, 0, 0), 24, 0, None),
            Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None),
        ],
    }
}

#[test]
fn kernel_changes_reach_the_engine_even_when_its_control_channel_is_full() {
    use crate::kernel_watch::KernelMailbox;
    use xlb_engine::EngineConfig;
    let config = Config::from_toml_str(CONFIG).unwrap();
    let rules = Arc::new(compile(&config, None, &MemberHealth::default(), 1).unwrap());
    let mut engine = Engine::new(EngineConfig::default(), rules, 1);
    engine.next_hops().set_port(0, [2, 0, 0, 0, 0xa0, 0]);
    engine.next_hops().set_port(1, [2, 0, 0, 0, 0xa0, 1]);
    let (to_tx, to_rx) = crossbeam::channel::bounded(4);
    let (from_tx, _from_rx) = crossbeam::channel::bounded(8);
    let (ack_tx, _ack_rx) = crossbeam::channel::bounded(8);
    let link = ControlLink {
        from_control: to_rx,
        to_control: from_tx,
        acks: ack_tx,
        counters: crate::plane::cell::cell(0).0,
    };
    let mailbox = Arc::new(KernelMailbox::new(kernel_view(1, 1)));
    let mut h =
        EngineHandler::new(0, engine, link, 1 << 50, None).with_kernel(Arc::clone(&mailbox));
    // The view it started with: routes and neighbours, so a client's SYN gets through.
    let client = Ipv4Addr::new(198, 18, 0, 10);
    let vip = Ipv4Addr::new(198, 18, 0, 100);
    let mut syn = frame(client, 40_000, vip, 80, false);
    assert!(matches!(
        h.handle(10, 0, &mut syn),
        AfxdpVerdict::Tx { port: 1, .. }
    ));
    assert_eq!(syn[5], 1, "the member's MAC of view 1");

    // The worker's control channel is full (a slow worker, a burst of queries)...
    let (reply_tx, _reply_rx) = crossbeam::channel::bounded(1);
    let query = FlowQuery {
        filter: FlowFilter::default(),
        after: None,
        limit: 1,
        reply: reply_tx,
    };
    while to_tx.try_send(ToWorker::Flows(query.clone())).is_ok() {}
    // ... while the kernel's neighbours change 100 times.
    for v in 2..=101u64 {
        mailbox.publish(kernel_view(v, v as u8));
    }
    // One loop iteration later the flow follows the latest MAC.
    h.poll_control(20);
    // The client's retransmitted SYN (the handshake has not completed: anything else
    // would be out of window).
    let mut again = frame(client, 40_000, vip, 80, false);
    let v = h.handle(30, 0, &mut again);
    assert!(matches!(v, AfxdpVerdict::Tx { port: 1, .. }), "{v:?}");
    assert_eq!(again[5], 101, "the member's MAC of the last view");
    assert_eq!(h.kernel_applied.version, 101);
}

#[test]
fn a_self_probe_goes_to_a_member_and_its_answer_is_taken_off_and_closed() {
    use selfprobe::{Injection, SelfProber};
    let (mut h, from) = probe_handler();
    let config = Config::from_toml_str(CONFIG).unwrap();
    let source: std::net::IpAddr = "198.18.0.250".parse().unwrap();
    let t0 = std::time::Instant::now();
    let mut prober = SelfProber::new(&[source], std::time::Duration::from_secs(5), t0);
    let rules = Arc::clone(h.engine().rules());
    let round = prober.round(t0, &config, &rules, 1, 0, [2, 0, 0, 0, 0xa0, 0]);
    assert_eq!(round.len(), 1, "rule `web` (ALL, port 80)");
    let (_, inj): (usize, Injection) = round.into_iter().next().unwrap();
    h.apply(ToWorker::Probe(inj), 10);
    // The SYN waits in the outbox, translated toward a member.
    let mut sent = Vec::new();
    h.expire(10, 64, &mut |port, f| sent.push((port, f.to_vec())));
    assert_eq!(sent.len(), 1);
    let (port, syn) = &sent[0];
    let p = wire::parse(syn).unwrap();
    assert_eq!(*port, 1);
    assert_eq!(p.tcp_flags, wire::tcp_flags::SYN);
    assert_eq!((p.src, p.dst_port), (Addr::from(source), 8080));
    let member = p.dst;
    // The member's SYN-ACK arrives: not transmitted, reported, answered with an RST.
    let spec = wire::RstSpec {
        src_mac: syn[0..6].try_into().unwrap(),
        dst_mac: syn[6..12].try_into().unwrap(),
        vlan: None,
        src: member,
        dst: p.src,
        src_port: 8080,
        dst_port: p.src_port,
        seq: 9_000,
        ack: Some(p.seq.wrapping_add(1)),
    };
    let mut synack = vec![0u8; wire::MAX_RST_FRAME];
    let n = wire::build_tcp_segment(&mut synack, &spec, wire::tcp_flags::SYN, 1000).unwrap();
    assert_eq!(h.handle(20, 1, &mut synack[..n]), AfxdpVerdict::Drop);
    match from.try_recv() {
        Ok(FromWorker::ProbeAnswer {
            source: s,
            port,
            ok,
        }) => {
            assert_eq!((s, port, ok), (Addr::from(source), p.src_port, true));
            prober.answered(s, port, ok);
        }
        other => panic!("{other:?}"),
    }
    sent.clear();
    h.expire(20, 64, &mut |port, f| sent.push((port, f.to_vec())));
    assert_eq!(sent.len(), 1, "the RST to the member");
    let rst = wire::parse(&sent[0].1).unwrap();
    assert_eq!(sent[0].0, 1);
    assert_eq!(rst.tcp_flags, wire::tcp_flags::RST);
    assert_eq!((rst.dst, rst.dst_port), (member, 8080));
    assert_eq!(
        rst.seq,
        p.seq.wrapping_add(1),
        "exactly what the member expects"
    );
    assert_eq!(prober.report()[0].window_answered, 1);
    // Frames to other addresses are never taken for probe answers.
    let mut reply = frame(
        Ipv4Addr::new(198, 18, 1, 11),
        8080,
        Ipv4Addr::new(198, 18, 0, 10),
        1234,
        true,
    );
    let _ = h.handle(30, 1, &mut reply);
    assert!(from.try_recv().is_err(), "no probe answer for other frames");
}

/// The backend-side ports travel with a rule switch, or alone after a route change: a
/// member's outbound connection is taken only from a port marked so, in the same swap.
#[test]
fn backend_side_ports_follow_the_control_thread_with_the_rules_or_alone() {
    use xlb_engine::DropReason;
    let (mut h, _from) = probe_handler();
    let spoofed = |h: &EngineHandler| h.engine().counters().drop_count(DropReason::SpoofedSource);
    let member = Ipv4Addr::new(198, 18, 1, 11);
    let remote = Ipv4Addr::new(198, 18, 0, 10);
    h.engine
        .next_hops()
        .set_neighbor(remote.into(), 0, [2, 0, 0, 0, 0xc1, 0])
        .unwrap();
    let mut syn = frame(member, 40_001, remote, 443, false);
    // Nothing marked yet: a member's address is taken for spoofed, wherever it arrives.
    assert!(!matches!(
        h.handle(10, 1, &mut syn),
        AfxdpVerdict::Tx { .. }
    ));
    assert_eq!(spoofed(&h), 1);

    // A rule switch marks port 1 (say a member was added behind it): from there, the
    // member's SYN opens an outbound flow.
    let rules = Arc::clone(h.engine().rules());
    h.apply(
        ToWorker::Rules(rules, Some(Arc::from([(0, false), (1, true)]))),
        20,
    );
    let mut syn = frame(member, 40_002, remote, 443, false);
    let v = h.handle(30, 1, &mut syn);
    assert!(matches!(v, AfxdpVerdict::Tx { port: 0, .. }), "{v:?}");
    assert_eq!(spoofed(&h), 1);
    // From port 0 it is still spoofed.
    let mut syn = frame(member, 40_003, remote, 443, false);
    assert!(!matches!(
        h.handle(40, 0, &mut syn),
        AfxdpVerdict::Tx { .. }
    ));
    assert_eq!(spoofed(&h), 2);

    // A route change with no rule switch unmarks it.
    h.apply(ToWorker::BackendSide(Arc::from([(1, false)])), 50);
    let mut syn = frame(member, 40_004, remote, 443, false);
    assert!(!matches!(
        h.handle(60, 1, &mut syn),
        AfxdpVerdict::Tx { .. }
    ));
    assert_eq!(spoofed(&h), 3);
}

/// A batch handled after the look-ahead passes (each frame with what the first pass read of
/// it) comes out as without them: the same verdicts and bytes, past the kept readings
/// (`LOOKAHEAD_FRAMES`) too, and when a position holds another frame than the one read there.
#[test]
fn the_look_ahead_reading_changes_no_verdict_even_for_another_frame() {
    let (mut plain, _) = probe_handler();
    let (mut looked, _) = probe_handler();
    let vip = Ipv4Addr::new(198, 18, 0, 100);
    let batch: Vec<Vec<u8>> = (0..LOOKAHEAD_FRAMES as u16 + 6)
        .map(|i| {
            frame(
                Ipv4Addr::new(198, 18, 0, 10),
                40_000 + i,
                vip,
                80,
                i % 3 == 0,
            )
        })
        .collect();
    // Second round: every position holds another frame than the one the look-ahead read.
    for round in 0..2 {
        for stage in 0..2 {
            for (at, f) in batch.iter().enumerate() {
                looked.prefetch(stage, at, 0, f);
            }
        }
        for at in 0..batch.len() {
            let f = &batch[if round == 0 { at } else { batch.len() - 1 - at }];
            let (mut a, mut b) = (f.clone(), f.clone());
            let len = f.len();
            let va = plain.handle_in(10, 0, &mut a, len);
            let vb = looked.handle_looked_ahead(10, 0, &mut b, len, at);
            assert!(matches!(va, AfxdpVerdict::Tx { port: 1, .. }), "{va:?}");
            assert_eq!(va, vb, "round {round}, position {at}");
            assert_eq!(a, b, "round {round}, position {at}");
        }
    }
    assert_eq!(looked.engine().flow_count(), batch.len());
}
