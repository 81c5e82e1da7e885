//! End to end, the XDP fast path (docs/xlbd.md, "The XDP fast path"): established flows are
//! forwarded by the XDP program itself, the workers see almost none of their packets, and yet
//! the workers' idle expiry stays exact — reset on idle sends RSTs that both Linux stacks
//! accept, at the idle timeout after the last packet XDP forwarded; a UDP flow expires at the
//! UDP timeout after its last datagram. New TCP connections are opened by XDP itself (their
//! SYN) and installed by the workers. With `--fast-path off` XDP forwards nothing. The
//! traffic of each test lasts longer than the idle timeout, so that a worker that did not
//! read back what XDP recorded would expire the flows in the middle of it.
//!
//! These tests set the fast path themselves (`--fast-path on|off`, whatever
//! `XLB_TEST_FAST_PATH` says). Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use common::*;

const SLACK: Duration = Duration::from_millis(1500);
/// The rule's idle timeout (4 minutes) and the UDP timeout (240 s), at lab time scale 60.
const IDLE: Duration = Duration::from_secs(4);
/// How long each test's traffic lasts: longer than the idle timeout.
const TRAFFIC: Duration = Duration::from_millis(5500);

/// A lab whose xlbd runs with the fast path `on` or off, GRO on for the hosts' veths either
/// way (so that the only difference is the switch).
fn lab(on: bool) -> Lab {
    let lab = Lab::start_with(CONFIG, &["--fast-path", if on { "on" } else { "off" }]);
    let p = lab.prefix.clone();
    for (ns, dev) in [
        (&lab.client, "c"),
        (&lab.internet, "i"),
        (&lab.switch, "sa"),
    ] {
        gro_on(ns, &format!("{p}{dev}"));
    }
    lab
}

/// The stats file after the next two writes (so that the last packets are in).
fn settled(lab: &Lab) -> HashMap<String, u64> {
    thread::sleep(Duration::from_millis(600));
    lab.stats()
}

fn get(s: &HashMap<String, u64>, key: &str) -> u64 {
    s.get(key).copied().unwrap_or(0)
}

/// `key` in `after` minus in `before`.
fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>, key: &str) -> u64 {
    get(after, key).saturating_sub(get(before, key))
}

/// Echo rounds over `s` until `TRAFFIC` has passed (bounded: at most 2000 rounds); returns
/// the rounds and when the last one ended.
fn echo_rounds(s: &mut TcpStream) -> (usize, Instant) {
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < TRAFFIC && rounds < 2000 {
        let payload: Vec<u8> = (0..200).map(|b| (b * 3 + rounds) as u8).collect();
        assert_eq!(echo(s, &payload), payload, "round {rounds} intact");
        rounds += 1;
        thread::sleep(Duration::from_millis(10));
    }
    (rounds, Instant::now())
}

/// The packets of rule `rule` in both directions between `before` and `after`: in all, and
/// those XDP forwarded.
fn rule_packets(
    before: &HashMap<String, u64>,
    after: &HashMap<String, u64>,
    rule: &str,
) -> (u64, u64) {
    let d = |f: &str| delta(before, after, &format!("rule.lb.{rule}.{f}"));
    (
        d("packets_orig") + d("packets_reply"),
        d("fast_packets_orig") + d("fast_packets_reply"),
    )
}

#[test]
fn tcp_through_xdp_then_reset_on_idle_gives_both_ends_econnreset() {
    if !need_root("tcp_through_xdp_then_reset_on_idle_gives_both_ends_econnreset") {
        return;
    }
    let lab = lab(true);
    assert!(
        lab.log_text().contains("fast_path=on") && lab.log_text().contains("ac=native+fast"),
        "{}",
        lab.log_text()
    );
    let mut s = lab.client_connect(80);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The handshake and a first round through the worker, which then publishes the flow.
    for _ in 0..3 {
        assert_eq!(echo(&mut s, b"hello\n"), b"hello\n");
    }
    let before = settled(&lab);
    assert_eq!(get(&before, "fast.enabled"), 1, "{before:?}");
    assert!(get(&before, "fast.published") >= 1, "{before:?}");
    let (rounds, last) = echo_rounds(&mut s);
    let after = settled(&lab);
    let (packets, fast) = rule_packets(&before, &after, "web");
    let forwarded = delta(&before, &after, "fast.forwarded");
    let worker = delta(&before, &after, "rx_packets");
    eprintln!(
        "{rounds} rounds: {packets} packets of the rule, {fast} of them by XDP \
         (fast.forwarded +{forwarded}), the worker took {worker} frames"
    );
    assert!(
        packets >= 2 * rounds as u64,
        "every round's segments counted ({packets} for {rounds} rounds)"
    );
    assert!(
        fast * 10 > packets * 8,
        "more than 80 % of the segments forwarded by XDP: {fast} of {packets}; stats {after:?}"
    );
    assert!(forwarded >= fast, "{forwarded} >= {fast}");
    assert!(
        worker * 5 < packets,
        "the worker saw almost none of them: {worker} of {packets}"
    );
    assert_eq!(
        get(&after, "rule.lb.web.flows_expired_idle"),
        0,
        "no expiry while XDP forwarded: the worker read back the last packet's time"
    );

    // Idle: reset on idle at the idle timeout after the last packet, with RSTs whose sequence
    // numbers come from what XDP recorded; both stacks accept them.
    client_reset_on_idle(&lab, &mut s, last, IDLE, SLACK);
    backend_reset(&lab);
    let end = settled(&lab);
    assert_eq!(get(&end, "rule.lb.web.flows_reset_on_idle"), 1, "{end:?}");
    lab.assert_no_invalid_tcp();
    let metrics = lab.metrics();
    assert!(
        metrics.contains("xlb_fast_path_forwarded_total")
            && metrics.contains("xlb_rule_fast_packets_orig_total"),
        "{metrics}"
    );
}

/// New connections: XDP forwards each SYN itself (the Maglev choice, the rewrite) and hands
/// it to the worker owning the flow, which installs the flow as if it had forwarded the SYN:
/// the connections work, every SYN XDP forwarded is installed, and reset on idle stays exact.
#[test]
fn new_tcp_connections_are_opened_by_xdp_and_installed_by_their_workers() {
    if !need_root("new_tcp_connections_are_opened_by_xdp_and_installed_by_their_workers") {
        return;
    }
    const CONNECTIONS: usize = 20;
    let lab = lab(true);
    // Worker 0 writes the new-flow section once a grace has passed after the start.
    assert!(
        lab.wait_stat("fast.new_rules", 2, Duration::from_secs(5)) >= 2,
        "web and web-silent in the section: {:?}",
        lab.stats()
    );
    let before = settled(&lab);
    let mut streams: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|i| {
            let mut s = lab.client_connect(80);
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let hello = format!("hello {i}\n");
            assert_eq!(echo(&mut s, hello.as_bytes()), hello.as_bytes());
            s
        })
        .collect();
    let mut last = Instant::now();
    for (i, s) in streams.iter_mut().enumerate() {
        let payload: Vec<u8> = (0..300).map(|b| (b + i) as u8).collect();
        assert_eq!(echo(s, &payload), payload, "connection {i} intact");
        last = Instant::now();
    }
    let after = settled(&lab);
    let d = |k: &str| delta(&before, &after, k);
    eprintln!(
        "{CONNECTIONS} connections: new_forwarded +{} installed +{} conflict +{} refused +{} \
         flows_created +{} syns +{} punt.new_* {:?}",
        d("fast.new_forwarded"),
        d("fast.new_installed"),
        d("fast.new_conflict"),
        d("fast.new_refused"),
        d("rule.lb.web.flows_created"),
        d("rule.lb.web.syns"),
        [
            "new_no_rule",
            "new_wrong_port",
            "new_no_member",
            "new_ring_full",
            "new_off"
        ]
        .map(|r| d(&format!("fast.punt.{r}")))
    );
    assert!(
        d("fast.new_forwarded") >= CONNECTIONS as u64,
        "every SYN forwarded by XDP: {after:?}"
    );
    assert_eq!(
        d("fast.new_installed"),
        d("fast.new_forwarded"),
        "every one installed by its worker"
    );
    assert_eq!(d("fast.new_conflict") + d("fast.new_refused"), 0);
    assert_eq!(d("rule.lb.web.flows_created"), CONNECTIONS as u64);
    assert!(d("rule.lb.web.syns") >= CONNECTIONS as u64);

    // Idle: every connection is reset at the idle timeout after its last packet, both ends.
    client_reset_on_idle(&lab, &mut streams[CONNECTIONS - 1], last, IDLE, SLACK);
    for (i, s) in streams.iter_mut().enumerate().take(CONNECTIONS - 1) {
        let mut buf = [0u8; 16];
        let r = read_within(s, &mut buf, Duration::from_secs(2));
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "connection {i}: expected ECONNRESET, got {r:?}"
        );
    }
    for _ in 0..CONNECTIONS {
        backend_reset(&lab);
    }
    let end = settled(&lab);
    assert_eq!(
        get(&end, "rule.lb.web.flows_reset_on_idle"),
        CONNECTIONS as u64,
        "{end:?}"
    );
    lab.assert_no_invalid_tcp();
    let metrics = lab.metrics();
    assert!(
        metrics.contains("xlb_fast_path_new_installed_total"),
        "{metrics}"
    );
}

#[test]
fn udp_through_xdp_then_the_flow_expires_at_the_udp_timeout_after_its_last_datagram() {
    if !need_root(
        "udp_through_xdp_then_the_flow_expires_at_the_udp_timeout_after_its_last_datagram",
    ) {
        return;
    }
    let lab = lab(true);
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
    // The first exchange confirms the flow; the worker publishes it.
    for i in 0..3 {
        assert!(ask(format!("q{i}").as_bytes()).ends_with(&format!(":q{i}")));
    }
    let before = settled(&lab);
    let start = Instant::now();
    let mut asked = 0;
    while start.elapsed() < TRAFFIC && asked < 2000 {
        let q = format!("d{asked}");
        assert!(
            ask(q.as_bytes()).ends_with(&format!(":{q}")),
            "answer {asked}"
        );
        asked += 1;
        thread::sleep(Duration::from_millis(10));
    }
    let last = Instant::now();
    let after = settled(&lab);
    let (packets, fast) = rule_packets(&before, &after, "dns");
    eprintln!("{asked} datagrams each way: {packets} packets of the rule, {fast} by XDP");
    assert!(packets >= 2 * asked as u64, "{packets} for {asked}");
    assert!(
        fast * 10 > packets * 8,
        "more than 80 % of the datagrams forwarded by XDP: {fast} of {packets}"
    );
    assert_eq!(
        get(&after, "rule.lb.dns.flows_created"),
        1,
        "one flow throughout"
    );
    assert_eq!(
        get(&after, "rule.lb.dns.flows_expired_idle"),
        0,
        "not expired while busy"
    );

    // Not before the UDP timeout after the last datagram, and then it does expire.
    thread::sleep(
        (last + IDLE - Duration::from_millis(400)).saturating_duration_since(Instant::now()),
    );
    assert_eq!(
        lab.stat("rule.lb.dns.flows_expired_idle"),
        0,
        "not expired before the UDP timeout after the last datagram"
    );
    assert_eq!(
        lab.wait_stat("rule.lb.dns.flows_expired_idle", 1, IDLE),
        1,
        "expired at the UDP timeout"
    );
    assert!(last.elapsed() <= IDLE + SLACK + Duration::from_millis(600));
    // A new datagram makes a new flow.
    assert!(ask(b"again").ends_with(":again"));
    assert_eq!(
        lab.wait_stat("rule.lb.dns.flows_created", 2, Duration::from_secs(2)),
        2
    );
}

#[test]
fn with_the_fast_path_off_xdp_forwards_nothing_and_the_same_traffic_works() {
    if !need_root("with_the_fast_path_off_xdp_forwards_nothing_and_the_same_traffic_works") {
        return;
    }
    let lab = lab(false);
    assert!(
        lab.log_text().contains("fast_path=off"),
        "{}",
        lab.log_text()
    );
    assert!(!lab.log_text().contains("+fast"), "{}", lab.log_text());
    let mut s = lab.client_connect(80);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(1) && rounds < 500 {
        let payload: Vec<u8> = (0..200).map(|b| (b + rounds) as u8).collect();
        assert_eq!(echo(&mut s, &payload), payload);
        rounds += 1;
    }
    let client = lab.client.clone();
    let sock = in_ns(&client, || UdpSocket::bind("0.0.0.0:0").unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..50 {
        sock.send_to(format!("q{i}").as_bytes(), (VIP, 53)).unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = recv_from_retrying(&sock, &mut buf).expect("UDP answer");
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with(&format!(":q{i}")));
    }
    let stats = settled(&lab);
    assert_eq!(get(&stats, "fast.enabled"), 0, "{stats:?}");
    assert_eq!(get(&stats, "fast.forwarded"), 0, "{stats:?}");
    assert_eq!(get(&stats, "fast.published"), 0, "{stats:?}");
    assert_eq!(get(&stats, "fast.new_forwarded"), 0, "{stats:?}");
    assert_eq!(get(&stats, "fast.new_installed"), 0, "{stats:?}");
    assert_eq!(get(&stats, "fast.new_rules"), 0, "{stats:?}");
    assert_eq!(get(&stats, "rule.lb.web.fast_packets_orig"), 0);
    assert_eq!(get(&stats, "rule.lb.dns.fast_packets_reply"), 0);
    assert!(
        get(&stats, "rule.lb.web.packets_orig") > rounds as u64,
        "{stats:?}"
    );
    assert!(get(&stats, "rule.lb.dns.packets_reply") >= 50, "{stats:?}");
    lab.assert_no_invalid_tcp();
}
