//! End to end: xlbd on AF_XDP in a namespace lab, real Linux TCP/UDP stacks on both sides,
//! at lab time scale 60 (a 4-minute idle timeout lasts 4 s). See `common/mod.rs` for the
//! topology. Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use common::*;
use socket2::{SockRef, TcpKeepalive};

/// One timer tick is ~1 ms, but the workers sleep up to 10 ms and loaded CI machines are
/// slow: the slack allowed after a deadline.
const SLACK: Duration = Duration::from_millis(1500);
const IDLE: Duration = Duration::from_secs(4);

#[test]
fn lb_rule_spreads_connections_over_both_backends_bytes_intact() {
    if !need_root("lb_rule_spreads_connections_over_both_backends_bytes_intact") {
        return;
    }
    let mut lab = Lab::start(CONFIG);
    let client = lab.client.clone();
    let (per_backend, intact) = in_ns(&client, || {
        let mut per_backend = std::collections::HashMap::<String, usize>::new();
        let mut intact = 0;
        for i in 0..40usize {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::new(VIP.parse().unwrap(), 80),
                Duration::from_secs(5),
            )
            .expect("connect to the VIP");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            *per_backend.entry(whoami(&mut s)).or_default() += 1;
            // Sizes from one byte to many segments; content that shows any reordering.
            let len = 1 + i * i * 61;
            let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
            if echo(&mut s, &payload) == payload {
                intact += 1;
            }
        }
        (per_backend, intact)
    });
    assert_eq!(intact, 40, "every echo intact; log:\n{}", lab.log_text());
    assert!(
        per_backend.get("backend1").copied().unwrap_or(0) > 0
            && per_backend.get("backend2").copied().unwrap_or(0) > 0,
        "both backends serve: {per_backend:?}"
    );
    assert!(lab.wait_stat("rule.lb.web.flows_created", 40, Duration::from_secs(2)) >= 40);
    lab.assert_no_invalid_tcp();

    // Clean stop: exit 0, no XDP program left behind.
    let status = lab.stop_xlbd().expect("xlbd was running");
    assert!(
        status.success(),
        "xlbd exit: {status}; log:\n{}",
        lab.log_text()
    );
    assert_eq!(lab.xdp_attached(), Vec::<String>::new(), "XDP detached");
    assert!(lab.log_text().contains("xlbd final"), "{}", lab.log_text());
}

#[test]
fn reset_on_idle_gives_client_and_backend_econnreset() {
    if !need_root("reset_on_idle_gives_client_and_backend_econnreset") {
        return;
    }
    let lab = Lab::start(CONFIG);
    let mut s = lab.client_connect(80);
    assert_eq!(echo(&mut s, b"hello\n"), b"hello\n");
    let idle_from = Instant::now();
    // Both ends now block in recv(): the client here, the backend in its server thread.
    client_reset_on_idle(&lab, &mut s, idle_from, IDLE, SLACK);
    let (_, peer) = backend_reset(&lab);
    assert_eq!(peer.ip().to_string(), CLIENT);
    assert_eq!(lab.wait_stat("rsts_sent", 2, Duration::from_secs(2)), 2);
    assert_eq!(lab.stat("rule.lb.web.flows_reset_on_idle"), 1);
    lab.assert_no_invalid_tcp();
}

#[test]
fn keepalive_below_timeout_keeps_connection_past_three_timeouts() {
    if !need_root("keepalive_below_timeout_keeps_connection_past_three_timeouts") {
        return;
    }
    let lab = Lab::start(CONFIG);
    let mut s = lab.client_connect(80);
    SockRef::from(&s)
        .set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(Duration::from_secs(1))
                .with_interval(Duration::from_secs(1)),
        )
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(echo(&mut s, b"hello\n"), b"hello\n");
    thread::sleep(IDLE * 3 + Duration::from_secs(1));
    assert_eq!(
        echo(&mut s, b"still there?\n"),
        b"still there?\n",
        "log:\n{}",
        lab.log_text()
    );
    assert_eq!(lab.stat("rule.lb.web.flows_expired_idle"), 0);
    assert_eq!(lab.stat("rsts_sent"), 0);
    lab.assert_no_invalid_tcp();
}

#[test]
fn silent_expiry_late_send_gets_no_answer_and_is_counted() {
    if !need_root("silent_expiry_late_send_gets_no_answer_and_is_counted") {
        return;
    }
    let lab = Lab::start(CONFIG);
    let mut s = lab.client_connect(81);
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(echo(&mut s, b"hello\n"), b"hello\n");
    // One lab-second after the expiry: inside the late-packet window (120 s / 60).
    thread::sleep(IDLE + Duration::from_secs(1));
    assert_eq!(
        lab.wait_stat(
            "rule.lb.web-silent.flows_expired_idle",
            1,
            Duration::from_secs(1)
        ),
        1
    );
    assert_eq!(lab.stat("rsts_sent"), 0, "silent by default");
    s.write_all(b"anyone?\n").unwrap();
    let mut buf = [0u8; 16];
    match read_within(&mut s, &mut buf, Duration::from_secs(3)) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected no answer, got {other:?}"),
    }
    assert!(lab.wait_stat("rule.lb.web-silent.no_flow", 1, Duration::from_secs(2)) >= 1);
    assert!(lab.stat("rule.lb.web-silent.late_packets") >= 1);
    // Stop the client's retransmissions from outliving the test's interest in them.
    SockRef::from(&s)
        .set_tcp_user_timeout(Some(Duration::from_millis(100)))
        .ok();
    lab.assert_no_invalid_tcp();
}

#[test]
fn udp_flow_expires_at_the_udp_timeout_not_the_rules_tcp_timeout() {
    if !need_root("udp_flow_expires_at_the_udp_timeout_not_the_rules_tcp_timeout") {
        return;
    }
    // The rule says 30 minutes (30 s here); UDP flows use the daemon's 240 s (4 s here).
    let lab = Lab::start(CONFIG);
    let client = lab.client.clone();
    let sock = in_ns(&client, || UdpSocket::bind("0.0.0.0:0").unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let ask = |q: &[u8]| {
        sock.send_to(q, (VIP, 53)).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = recv_from_retrying(&sock, &mut buf).expect("UDP answer");
        assert_eq!(from, SocketAddr::new(VIP.parse().unwrap(), 53));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = ask(b"q1");
    assert!(first.ends_with(":q1"), "{first}");
    assert_eq!(
        lab.wait_stat("rule.lb.dns.flows_created", 1, Duration::from_secs(1)),
        1
    );
    thread::sleep(IDLE + Duration::from_millis(800));
    assert_eq!(
        lab.wait_stat("rule.lb.dns.flows_expired_idle", 1, Duration::from_secs(1)),
        1,
        "the UDP flow expired at the UDP timeout"
    );
    let second = ask(b"q2");
    assert!(second.ends_with(":q2"), "{second}");
    assert_eq!(
        lab.wait_stat("rule.lb.dns.flows_created", 2, Duration::from_secs(1)),
        2,
        "a new flow after expiry"
    );
}

#[test]
fn outbound_rule_translates_members_to_the_snat_address_and_their_port_block() {
    if !need_root("outbound_rule_translates_members_to_the_snat_address_and_their_port_block") {
        return;
    }
    let lab = Lab::start(CONFIG);
    // Members in pool order take 1024-port blocks from port 1024.
    for (ns, block) in [
        (lab.backend1.clone(), 1024..2048u16),
        (lab.backend2.clone(), 2048..3072u16),
    ] {
        let seen = in_ns(&ns, || {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::new(INTERNET.parse().unwrap(), 80),
                Duration::from_secs(5),
            )
            .expect("connect to the internet host");
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut line = String::new();
            s.read_to_string(&mut line).ok();
            line.trim().to_string()
        });
        let addr: SocketAddr = seen
            .parse()
            .unwrap_or_else(|_| panic!("internet said {seen:?}; log:\n{}", lab.log_text()));
        assert_eq!(addr.ip().to_string(), SNAT, "{ns}");
        assert!(
            block.contains(&addr.port()),
            "{ns}: port {} outside {block:?}",
            addr.port()
        );
    }
    assert_eq!(
        lab.wait_stat("rule.out.web-out.flows_created", 2, Duration::from_secs(2)),
        2
    );
    lab.assert_no_invalid_tcp();
}

#[test]
fn two_workers_carry_both_directions_of_every_flow() {
    if !need_root("two_workers_carry_both_directions_of_every_flow") {
        return;
    }
    // veth has no RSS: each direction lands on the queue its sender's stack picked, so a
    // flow's two directions often reach different workers; frames are handed to the owner.
    let lab = Lab::start_with(CONFIG, &["--workers", "2"]);
    assert!(lab.log_text().contains("workers=2"), "{}", lab.log_text());
    let client = lab.client.clone();
    let (per_backend, intact) = in_ns(&client, || {
        let mut per_backend = std::collections::HashMap::<String, usize>::new();
        let mut intact = 0;
        for i in 0..40usize {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::new(VIP.parse().unwrap(), 80),
                Duration::from_secs(5),
            )
            .expect("connect to the VIP");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            *per_backend.entry(whoami(&mut s)).or_default() += 1;
            let payload: Vec<u8> = (0..1 + i * 997).map(|b| (b * 3 + i) as u8).collect();
            if echo(&mut s, &payload) == payload {
                intact += 1;
            }
        }
        (per_backend, intact)
    });
    assert_eq!(intact, 40, "every echo intact; log:\n{}", lab.log_text());
    assert_eq!(per_backend.len(), 2, "{per_backend:?}");
    // Outbound from both members: the return traffic is steered by the SNAT port.
    for ns in [lab.backend1.clone(), lab.backend2.clone()] {
        let seen = in_ns(&ns, || {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::new(INTERNET.parse().unwrap(), 80),
                Duration::from_secs(5),
            )
            .expect("connect to the internet host");
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut line = String::new();
            s.read_to_string(&mut line).ok();
            line
        });
        assert!(seen.starts_with(SNAT), "{ns}: {seen}");
    }
    assert!(
        lab.wait_stat("rule.lb.web.flows_created", 40, Duration::from_secs(2)) >= 40,
        "{}",
        lab.log_text()
    );
    assert!(lab.stat("handed_off") > 0, "some frames crossed workers");
    assert_eq!(lab.stat("handoff_dropped"), 0);
    // One flow reset on idle with two workers: the owner's timer fires.
    let mut s = lab.client_connect(80);
    assert_eq!(echo(&mut s, b"hi\n"), b"hi\n");
    let mut buf = [0u8; 4];
    let r = read_within(&mut s, &mut buf, IDLE + SLACK + Duration::from_secs(5));
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{r:?}"
    );
    lab.assert_no_invalid_tcp();
}

#[test]
fn ipv6_lb_rule_and_reset_on_idle() {
    if !need_root("ipv6_lb_rule_and_reset_on_idle") {
        return;
    }
    let lab = Lab::start(CONFIG6);
    let client = lab.client.clone();
    let vip: SocketAddr = SocketAddr::new(VIP6.parse().unwrap(), 80);
    let per_backend = in_ns(&client, move || {
        let mut per_backend = std::collections::HashMap::<String, usize>::new();
        for i in 0..16usize {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5))
                .expect("connect to the IPv6 VIP");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            *per_backend.entry(whoami(&mut s)).or_default() += 1;
            let payload: Vec<u8> = (0..1 + i * 3001).map(|b| (b ^ i) as u8).collect();
            assert_eq!(echo(&mut s, &payload), payload, "connection {i}");
        }
        per_backend
    });
    assert_eq!(
        per_backend.len(),
        2,
        "{per_backend:?}; log:\n{}",
        lab.log_text()
    );

    let mut s = in_ns(&client, move || {
        TcpStream::connect_timeout(&vip, Duration::from_secs(5)).unwrap()
    });
    assert_eq!(echo(&mut s, b"hello6\n"), b"hello6\n");
    let idle_from = Instant::now();
    let mut buf = [0u8; 8];
    let r = read_within(&mut s, &mut buf, IDLE + SLACK + Duration::from_secs(5));
    let waited = idle_from.elapsed();
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "client: {r:?} after {waited:?}"
    );
    assert!(waited <= IDLE + SLACK, "{waited:?}");
    // The 16 earlier connections closed normally; the reset one is the last to end.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut reset_seen = false;
    while let Ok((_, peer, ending)) = lab
        .endings
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        if matches!(ending, Ending::Reset { .. }) {
            assert_eq!(peer.ip().to_string(), CLIENT6);
            reset_seen = true;
            break;
        }
    }
    assert!(reset_seen, "the backend saw ECONNRESET");
    lab.assert_no_invalid_tcp();
}
