//! End to end, health and drain: xlbd's health probes and drain in the namespace lab of
//! `common/mod.rs`, at lab time scale 60, with real Linux TCP/UDP stacks on both sides.
//! - a member whose server stops is marked down within interval × threshold (lab-scaled) and
//!   gets no new flows, while its established TCP connection keeps working; it comes back;
//! - UDP flows move off a member that went down; with every member down UDP flows end, no new
//!   flow is made, and established TCP continues;
//! - HTTP probes: only status 200 is healthy; admin state `up` overrides a failing probe;
//!   verdict flips reach the API's event stream;
//! - drain: admin state `down` set live through the API keeps existing connections and sends
//!   new ones (and UDP flows) elsewhere;
//! - SNAT exhaustion with 8 ports per member: new outbound flows refused and
//!   counted `snat_exhausted`, one event per episode, existing flows untouched, ports free
//!   again after their release timer.
//!
//! Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{atomic::AtomicU16, atomic::Ordering, Arc},
    thread,
    time::{Duration, Instant},
};

use common::ops::{connect, event_lines, runtime, wait_state};
use common::*;
use xlb_api::server::Client;
use xlb_proto::v1 as pb;

/// The slack allowed after a deadline on a loaded machine (as in the other end-to-end tests).
const SLACK: Duration = Duration::from_millis(1500);
/// A 5 s probe interval at lab time scale 60.
const INTERVAL: Duration = Duration::from_millis(83);
const THRESHOLD: u32 = 3;

/// `web` (TCP) and `dns` (UDP) on pool `web`, both probed by `svc`: TCP on the port the `web`
/// rule sends to (8081, served by per-test servers that a test can stop).
const CONFIG_TCP_PROBE: &str = lab_config!(
    r#"
[[health_probes]]
name = "svc"
protocol = "TCP"
port = 8081
interval_seconds = 5
threshold = 3

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8081
health_probe = "svc"
# 30 s of lab time: established connections outlive the tests' waits without keepalives.
idle_timeout_minutes = 30

[[load_balancing_rules]]
name = "dns"
frontend = "vip"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 5353
health_probe = "svc"
"#
);

/// `web` on the lab's echo servers (8080), probed over HTTP on a separate port.
const CONFIG_HTTP_PROBE: &str = lab_config!(
    r#"
[[health_probes]]
name = "healthz"
protocol = "HTTP"
port = 8082
path = "/healthz"
interval_seconds = 5
threshold = 2

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
health_probe = "healthz"
"#
);

fn probe_lines(lab: &Lab) -> Vec<String> {
    event_lines(lab, "xlbd event probe_state")
}

/// A new connection to VIP:`port`: which backend answered `whoami`.
fn new_connection_lands_on(lab: &Lab, port: u16) -> String {
    let mut s = lab.client_connect(port);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    whoami(&mut s)
}

/// UDP client sockets of the `dns` rule, each its own flow, with the backend that answered.
struct UdpFlows {
    socks: Vec<UdpSocket>,
}

impl UdpFlows {
    fn open(lab: &Lab, n: usize) -> UdpFlows {
        let socks = in_ns(&lab.client, move || {
            (0..n)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(800)))
                        .unwrap();
                    s
                })
                .collect()
        });
        UdpFlows { socks }
    }

    /// Asks on flow `i`; the backend that answered, `None` without an answer.
    fn ask(&self, i: usize, q: &str) -> Option<String> {
        let s = &self.socks[i];
        s.send_to(q.as_bytes(), (VIP, 53)).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = recv_from_retrying(s, &mut buf).ok()?;
        assert_eq!(from, SocketAddr::new(VIP.parse().unwrap(), 53));
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        let (who, echoed) = answer.split_once(':').expect("name:payload");
        assert_eq!(echoed, q);
        Some(who.to_string())
    }

    /// How long [`UdpFlows::ask`] waits for an answer.
    fn set_timeout(&self, d: Duration) {
        for s in &self.socks {
            s.set_read_timeout(Some(d)).unwrap();
        }
    }

    fn ask_all(&self, q: &str) -> Vec<Option<String>> {
        (0..self.socks.len()).map(|i| self.ask(i, q)).collect()
    }
}

/// Scrapes the metrics until every line in `want` is there (2 s at most).
fn wait_metrics(lab: &Lab, want: &[&str]) {
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        let m = lab.metrics();
        let missing: Vec<&str> = want
            .iter()
            .copied()
            .filter(|w| !m.lines().any(|l| l == *w))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "missing {missing:?} in:\n{}",
            m.lines()
                .filter(|l| l.starts_with("xlb_snat") || l.starts_with("xlb_member"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn set_admin(rt: &tokio::runtime::Runtime, c: &mut Client, member: &str, state: pb::AdminState) {
    rt.block_on(c.set_pool_member(pb::SetPoolMemberRequest {
        backend_pool: "web".into(),
        address: member.into(),
        weight: None,
        admin_state: Some(state as i32),
        ..Default::default()
    }))
    .unwrap_or_else(|e| panic!("set {member} admin {state:?}: {e}"));
}

/// The members of `GetStatus`: (address, probed, probe_healthy, eligible, admin state).
fn members(rt: &tokio::runtime::Runtime, c: &mut Client) -> Vec<(String, bool, bool, bool, i32)> {
    rt.block_on(c.get_status(pb::GetStatusRequest {}))
        .expect("status")
        .into_inner()
        .members
        .into_iter()
        .map(|m| {
            assert_eq!(m.backend_pool, "web");
            (
                m.address,
                m.probed,
                m.probe_healthy,
                m.eligible,
                m.admin_state,
            )
        })
        .collect()
}

#[test]
fn stopped_server_is_marked_down_in_time_gets_no_new_flows_and_keeps_its_connection() {
    if !need_root(
        "stopped_server_is_marked_down_in_time_gets_no_new_flows_and_keeps_its_connection",
    ) {
        return;
    }
    let (lab, (mut svc1, _svc2)) = Lab::start_prepared(CONFIG_TCP_PROBE, &[], |lab| {
        (
            lab.start_echo_server(1, 8081),
            lab.start_echo_server(2, 8081),
        )
    });
    let (mut on1, mut on2) = one_connection_per_backend(&lab, 80);
    assert_eq!(echo(&mut on1, b"before\n"), b"before\n");
    // Healthy members stay up: no verdict flipped while both servers ran.
    thread::sleep(INTERVAL * 6);
    assert!(probe_lines(&lab).is_empty(), "{:?}", probe_lines(&lab));

    svc1.stop();
    let bound = INTERVAL * THRESHOLD;
    let took = wait_state(&lab, BACKEND1, "down", bound + SLACK);
    assert!(took <= bound + SLACK, "down after {took:?}");
    let line = probe_lines(&lab).pop().unwrap();
    assert!(
        line.contains("probe=svc pool=web") && line.contains("Connection refused"),
        "{line}"
    );

    // No new flows to backend1; its established connection keeps working, as does backend2's.
    for _ in 0..20 {
        assert_eq!(new_connection_lands_on(&lab, 80), "backend2");
    }
    for round in 0..3 {
        let msg = format!("still there {round}\n");
        assert_eq!(echo(&mut on1, msg.as_bytes()), msg.as_bytes());
        assert_eq!(echo(&mut on2, msg.as_bytes()), msg.as_bytes());
        thread::sleep(INTERVAL * 2);
    }

    // The server comes back: one successful probe and backend1 takes new flows again.
    let _svc1 = lab.start_echo_server(1, 8081);
    wait_state(&lab, BACKEND1, "up", INTERVAL * 2 + SLACK);
    let back = (0..40).any(|_| new_connection_lands_on(&lab, 80) == "backend1");
    assert!(back, "backend1 gets new flows after it recovered");
    assert_eq!(echo(&mut on1, b"after\n"), b"after\n");
    assert_eq!(lab.stat("rule.lb.web.no_backend"), 0);
}

#[test]
fn udp_flows_move_off_a_down_member_and_end_when_every_member_is_down() {
    if !need_root("udp_flows_move_off_a_down_member_and_end_when_every_member_is_down") {
        return;
    }
    let (lab, (mut svc1, mut svc2)) = Lab::start_prepared(CONFIG_TCP_PROBE, &[], |lab| {
        (
            lab.start_echo_server(1, 8081),
            lab.start_echo_server(2, 8081),
        )
    });
    let flows = UdpFlows::open(&lab, 12);
    let before: Vec<String> = flows
        .ask_all("q1")
        .into_iter()
        .map(|w| w.expect("an answer while all are up"))
        .collect();
    let on1 = before.iter().filter(|w| *w == "backend1").count() as u64;
    assert!(
        on1 > 0 && on1 < 12,
        "flows on both members (five-tuple): {before:?}"
    );
    let (mut tcp1, _tcp2) = one_connection_per_backend(&lab, 80);

    // backend1 goes down: its UDP flows move to backend2 at their next datagram.
    svc1.stop();
    wait_state(&lab, BACKEND1, "down", INTERVAL * THRESHOLD + SLACK);
    let after = flows.ask_all("q2");
    assert!(
        after.iter().all(|w| w.as_deref() == Some("backend2")),
        "{after:?}"
    );
    assert_eq!(
        lab.wait_stat("rule.lb.dns.flows_moved", on1, Duration::from_secs(2)),
        on1,
        "exactly the flows that were on backend1 moved"
    );
    assert_eq!(flows.ask_all("q3"), after, "they stay where they moved");

    // Every member down: UDP flows end (their datagrams dropped and counted), no new flow of
    // either protocol, the established TCP connection continues.
    svc2.stop();
    wait_state(&lab, BACKEND2, "down", INTERVAL * THRESHOLD + SLACK);
    let dropped_before = lab.stat("rule.lb.dns.no_backend");
    // Waiting for answers that never come: shorter waits.
    flows.set_timeout(Duration::from_millis(300));
    assert_eq!(flows.ask_all("q4"), vec![None; 12], "no UDP answer");
    flows.set_timeout(Duration::from_millis(800));
    let fresh = UdpFlows::open(&lab, 1);
    assert_eq!(fresh.ask(0, "new"), None, "no new UDP flow");
    assert!(
        lab.wait_stat(
            "rule.lb.dns.no_backend",
            dropped_before + 13,
            Duration::from_secs(2)
        ) >= dropped_before + 13,
        "every datagram counted no_backend"
    );
    let refused = in_ns(&lab.client, || {
        TcpStream::connect_timeout(
            &SocketAddr::new(VIP.parse().unwrap(), 80),
            Duration::from_millis(1500),
        )
    });
    assert!(refused.is_err(), "no new TCP flow: {refused:?}");
    assert!(lab.wait_stat("rule.lb.web.no_backend", 1, Duration::from_secs(2)) >= 1);
    assert_eq!(echo(&mut tcp1, b"established\n"), b"established\n");

    // A member back up takes UDP flows again.
    let _svc2 = lab.start_echo_server(2, 8081);
    wait_state(&lab, BACKEND2, "up", INTERVAL * 2 + SLACK);
    assert_eq!(flows.ask(0, "q5").as_deref(), Some("backend2"));
}

#[test]
fn http_probe_wants_status_200_and_admin_up_overrides_it() {
    if !need_root("http_probe_wants_status_200_and_admin_up_overrides_it") {
        return;
    }
    let status1 = Arc::new(AtomicU16::new(200));
    let s1 = Arc::clone(&status1);
    let (lab, _servers) = Lab::start_prepared(CONFIG_HTTP_PROBE, &[], move |lab| {
        (
            lab.start_http_server(1, 8082, s1),
            lab.start_http_server(2, 8082, Arc::new(AtomicU16::new(200))),
        )
    });
    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));
    let mut events = rt
        .block_on(c.watch_events(pb::WatchEventsRequest {}))
        .expect("watch")
        .into_inner();
    thread::sleep(INTERVAL * 4);
    assert!(probe_lines(&lab).is_empty(), "{:?}", probe_lines(&lab));

    // The server answers, but not 200: down (the TCP handshake alone is not enough).
    status1.store(503, Ordering::Relaxed);
    wait_state(&lab, BACKEND1, "down", INTERVAL * 2 + SLACK);
    let line = probe_lines(&lab).pop().unwrap();
    assert!(line.contains("HTTP status 503"), "{line}");
    for _ in 0..20 {
        assert_eq!(new_connection_lands_on(&lab, 80), "backend2");
    }
    let ev = rt
        .block_on(async {
            loop {
                match tokio::time::timeout(Duration::from_secs(3), events.message()).await {
                    Ok(Ok(Some(ev))) => {
                        if let Some(pb::event::Kind::ProbeStateChanged(p)) = ev.kind {
                            return Some(p);
                        }
                    }
                    _ => return None,
                }
            }
        })
        .expect("a probe_state_changed event");
    assert_eq!(
        (
            ev.probe.as_str(),
            ev.backend_pool.as_str(),
            ev.member.as_str()
        ),
        ("healthz", "web", BACKEND1)
    );
    assert!(!ev.healthy);
    // The operator sees it in the status and in Prometheus.
    let none = pb::AdminState::None as i32;
    assert_eq!(
        members(&rt, &mut c),
        [
            (BACKEND1.to_string(), true, false, false, none),
            (BACKEND2.to_string(), true, true, true, none),
        ]
    );
    wait_metrics(
        &lab,
        &[
            "xlb_member_probe_healthy{pool=\"web\",member=\"198.18.1.11\",admin_state=\"none\"} 0",
            "xlb_member_eligible{pool=\"web\",member=\"198.18.1.11\",admin_state=\"none\"} 0",
            "xlb_member_eligible{pool=\"web\",member=\"198.18.1.12\",admin_state=\"none\"} 1",
        ],
    );

    // Admin state `up`: eligible whatever the probe says.
    set_admin(&rt, &mut c, BACKEND1, pb::AdminState::Up);
    assert_eq!(
        members(&rt, &mut c)[0],
        (
            BACKEND1.to_string(),
            true,
            false,
            true,
            pb::AdminState::Up as i32
        )
    );
    assert!(
        (0..40).any(|_| new_connection_lands_on(&lab, 80) == "backend1"),
        "admin up overrides the failing probe"
    );
    // Back to `none`: the probe decides again.
    set_admin(&rt, &mut c, BACKEND1, pb::AdminState::None);
    for _ in 0..20 {
        assert_eq!(new_connection_lands_on(&lab, 80), "backend2");
    }
    // 200 again: up.
    status1.store(200, Ordering::Relaxed);
    wait_state(&lab, BACKEND1, "up", INTERVAL * 2 + SLACK);
    assert!((0..40).any(|_| new_connection_lands_on(&lab, 80) == "backend1"));
}

#[test]
fn drain_with_admin_down_through_the_api_keeps_connections_and_moves_new_flows() {
    if !need_root("drain_with_admin_down_through_the_api_keeps_connections_and_moves_new_flows") {
        return;
    }
    // The lab's default configuration: no probes at all, drain is the operator's.
    let lab = Lab::start(CONFIG);
    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));
    let (mut on1, _on2) = one_connection_per_backend(&lab, 80);
    let flows = UdpFlows::open(&lab, 12);
    let before: Vec<String> = flows
        .ask_all("q1")
        .into_iter()
        .map(Option::unwrap)
        .collect();
    let on1_udp = before.iter().filter(|w| *w == "backend1").count() as u64;
    assert!(on1_udp > 0, "{before:?}");

    // The RPC returns once every worker runs the new rule set.
    set_admin(&rt, &mut c, BACKEND1, pb::AdminState::Down);
    let pool = rt
        .block_on(c.get_backend_pool(pb::GetRequest { name: "web".into() }))
        .unwrap()
        .into_inner()
        .backend_pool
        .unwrap();
    let m1 = pool.members.iter().find(|m| m.address == BACKEND1).unwrap();
    assert_eq!(m1.admin_state, pb::AdminState::Down as i32);
    assert_eq!(
        members(&rt, &mut c)[0],
        (
            BACKEND1.to_string(),
            false,
            true,
            false,
            pb::AdminState::Down as i32
        ),
        "not probed, drained"
    );

    for _ in 0..20 {
        assert_eq!(new_connection_lands_on(&lab, 80), "backend2");
    }
    assert_eq!(echo(&mut on1, b"draining\n"), b"draining\n");
    let after = flows.ask_all("q2");
    assert!(
        after.iter().all(|w| w.as_deref() == Some("backend2")),
        "{after:?}"
    );
    assert_eq!(
        lab.wait_stat("rule.lb.dns.flows_moved", on1_udp, Duration::from_secs(2)),
        on1_udp
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(echo(&mut on1, b"still\n"), b"still\n");

    // Undrain: new flows reach backend1 again; the drained connection was never cut.
    set_admin(&rt, &mut c, BACKEND1, pb::AdminState::None);
    assert!((0..40).any(|_| new_connection_lands_on(&lab, 80) == "backend1"));
    assert_eq!(echo(&mut on1, b"done\n"), b"done\n");
    assert_eq!(lab.stat("rule.lb.web.no_backend"), 0);
}

/// Outbound rule `out` for the pool with 8 TCP ports per member (one worker: all 8 on it).
const CONFIG_SNAT: &str = r#"
[settings]
lab_time_scale = 60

[[frontends]]
name = "snat"
address = "198.19.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[outbound_rules]]
name = "out"
frontends = ["snat"]
backend_pool = "web"
protocol = "TCP"
allocated_outbound_ports = 8
idle_timeout_minutes = 30
"#;

/// A connection from backend `ns` to the internet echo server, or the error.
fn connect_out(ns: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    in_ns(ns, move || {
        let s =
            TcpStream::connect_timeout(&SocketAddr::new(INTERNET.parse().unwrap(), 7000), timeout)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    })
}

#[test]
fn snat_exhaustion_refuses_new_flows_counts_them_once_per_episode_and_frees_ports() {
    if !need_root("snat_exhaustion_refuses_new_flows_counts_them_once_per_episode_and_frees_ports")
    {
        return;
    }
    let (lab, _echo) = Lab::start_prepared(CONFIG_SNAT, &[], |lab| lab.start_internet_echo(7000));
    let b1 = lab.backend1.clone();
    // Eight connections take backend1's eight ports.
    let mut open: Vec<TcpStream> = (0..8)
        .map(|i| {
            let mut s = connect_out(&b1, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connection {i}: {e}; log:\n{}", lab.log_text()));
            assert_eq!(whoami(&mut s), "internet");
            s
        })
        .collect();
    // The ninth is refused (its SYNs dropped); so is a tenth: one episode, one event.
    for _ in 0..2 {
        let r = connect_out(&b1, Duration::from_millis(1500));
        assert!(r.is_err(), "no port left: {r:?}");
    }
    assert!(lab.wait_stat("rule.out.out.snat_exhausted", 2, Duration::from_secs(2)) >= 2);
    assert!(lab.stat("drop.snat_exhausted") >= 2);
    let events = lab
        .log_text()
        .lines()
        .filter(|l| l.contains("snat_exhausted rule=out member=198.18.1.11"))
        .count();
    assert_eq!(events, 1, "one event per episode; log:\n{}", lab.log_text());
    // Existing flows are untouched, and the other member has its own block.
    for (i, s) in open.iter_mut().enumerate() {
        let msg = format!("still {i}\n");
        assert_eq!(echo(s, msg.as_bytes()), msg.as_bytes());
    }
    let mut other = connect_out(&lab.backend2, Duration::from_secs(5)).expect("backend2");
    assert_eq!(whoami(&mut other), "internet");
    // Usage comes from the workers' snapshots (every 250 ms).
    wait_metrics(
        &lab,
        &[
            "xlb_snat_ports_allocated{rule=\"out\",member=\"198.18.1.11\",protocol=\"tcp\"} 8",
            "xlb_snat_ports_used{rule=\"out\",member=\"198.18.1.11\",protocol=\"tcp\"} 8",
            "xlb_snat_ports_used{rule=\"out\",member=\"198.18.1.12\",protocol=\"tcp\"} 1",
        ],
    );

    // Two connections close (FIN both ways): their ports are freed after the FIN release
    // timer (240 s, 4 s here), not before.
    drop(open.drain(..2));
    thread::sleep(Duration::from_millis(500));
    assert!(
        connect_out(&b1, Duration::from_millis(1000)).is_err(),
        "ports held until their release timer"
    );
    thread::sleep(Duration::from_secs(4) + Duration::from_millis(500));
    let mut again = connect_out(&b1, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("a freed port: {e}; log:\n{}", lab.log_text()));
    assert_eq!(whoami(&mut again), "internet");
    for s in open.iter_mut() {
        assert_eq!(echo(s, b"end\n"), b"end\n");
    }
}
