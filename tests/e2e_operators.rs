//! End to end, what operators of other balancers expect, in the namespace lab of
//! `common/mod.rs` at lab time scale 60 with real Linux TCP stacks:
//! - drain with a deadline: a drained member's connection keeps working until the deadline,
//!   then client and member both get ECONNRESET; new connections go to the other member; the
//!   drain's progress shows in the status, events, metrics and stats;
//! - HTTPS health probes against a TLS server in a backend namespace (certificate from a CA
//!   made by the test): unverified by default, verified against the CA file and the server
//!   name on request, status 200 only, a probe timeout;
//! - floating IP: a member holding the VIP on its loopback gets flows addressed to the VIP
//!   and answers from it through xlb; idle timeout, reset on idle (ECONNRESET on both ends)
//!   and keepalive refresh hold for these flows;
//! - NAT event logging over IPFIX to a real collector (`nfcapd` from nfdump): every SNAT
//!   allocation the counters show appears as a create record and its release as a delete.
//!
//! Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU16, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::*;
use socket2::{SockRef, TcpKeepalive};
use xlb_api::{
    server::{channel, client, BearerToken, Client},
    Listen,
};
use xlb_proto::v1 as pb;

/// The slack allowed after a deadline on a loaded machine (as in the other end-to-end tests).
const SLACK: Duration = Duration::from_millis(1500);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(lab: &Lab) -> Client {
    let ch = channel(&Listen::Unix(lab.api_socket()))
        .await
        .expect("connect to xlbd's API socket");
    client(ch, BearerToken::new(None).unwrap())
}

/// Opens connections to VIP:`port` until one lands on each backend (bounded).
fn one_connection_per_backend(lab: &Lab, port: u16) -> (TcpStream, TcpStream) {
    let (mut b1, mut b2) = (None, None);
    for _ in 0..40 {
        let mut s = lab.client_connect(port);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match whoami(&mut s).as_str() {
            "backend1" if b1.is_none() => b1 = Some(s),
            "backend2" if b2.is_none() => b2 = Some(s),
            _ => {}
        }
        if b1.is_some() && b2.is_some() {
            break;
        }
    }
    (
        b1.expect("a connection on backend1 in 40 tries"),
        b2.expect("a connection on backend2 in 40 tries"),
    )
}

/// The backend whose echo server next saw a connection from the client end with ECONNRESET,
/// skipping connections that ended otherwise (closed by the test); `None` after 3 s.
fn reset_ending(lab: &Lab) -> Option<String> {
    let end = Instant::now() + Duration::from_secs(3);
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        let (name, peer, ending) = lab.endings.recv_timeout(left).ok()?;
        match ending {
            Ending::Reset { .. } if peer.ip().to_string() == CLIENT => return Some(name),
            Ending::Closed => continue,
            other => panic!("{name}: {other:?}"),
        }
    }
    None
}

fn event_lines(lab: &Lab, prefix: &str) -> Vec<String> {
    lab.log_text()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Waits (bounded) until xlbd's log has a line starting with `prefix` and containing every
/// one of `parts`; returns it.
fn wait_line(lab: &Lab, prefix: &str, parts: &[&str], timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        if let Some(l) = event_lines(lab, prefix)
            .into_iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return l;
        }
        assert!(
            Instant::now() < end,
            "no line {prefix} … {parts:?} within {timeout:?}; log:\n{}",
            lab.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Drain with a deadline.

/// `web` (TCP, 30 lab-minutes idle: connections outlive the test without keepalives, no reset
/// on idle) and `dns` (UDP) on pool `web`; backend1 drains with a 120 s deadline (2 s here)
/// and the `reset` action when its admin state becomes down.
const CONFIG_DRAIN: &str = r#"
[settings]
lab_time_scale = 60

[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [
    { address = "198.18.1.11", drain_timeout_seconds = 120, drain_action = "reset" },
    { address = "198.18.1.12" },
]

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 30
"#;

/// 120 s at lab time scale 60.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

#[test]
fn a_drained_members_connection_works_until_the_deadline_then_both_ends_are_reset() {
    if !need_root("a_drained_members_connection_works_until_the_deadline_then_both_ends_are_reset")
    {
        return;
    }
    let lab = Lab::start(CONFIG_DRAIN);
    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));
    let (mut on1, mut on2) = one_connection_per_backend(&lab, 80);
    // Drain backend1 through the API, as `xlbctl member set web 198.18.1.11 --admin-state
    // down` does: the deadline (from the configuration) counts from here.
    let drained_at = Instant::now();
    rt.block_on(c.set_pool_member(pb::SetPoolMemberRequest {
        backend_pool: "web".into(),
        address: BACKEND1.into(),
        admin_state: Some(pb::AdminState::Down as i32),
        ..Default::default()
    }))
    .expect("drain backend1");

    // No new flows to backend1 at once; its connection still works both ways.
    for _ in 0..10 {
        let mut s = lab.client_connect(80);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(whoami(&mut s), "backend2");
    }
    assert_eq!(echo(&mut on1, b"draining\n"), b"draining\n");
    // The operator sees it: one flow left, the deadline ahead.
    let status = || {
        rt.block_on(c.clone().get_status(pb::GetStatusRequest {}))
            .unwrap()
            .into_inner()
            .members
            .into_iter()
            .find(|m| m.address == BACKEND1)
            .unwrap()
    };
    // (Connections that `one_connection_per_backend` opened on backend1 and closed may still
    // linger in the first counts.)
    let end = Instant::now() + Duration::from_secs(1);
    let m = loop {
        let m = status();
        if m.drain_flows_left == Some(1) || Instant::now() > end {
            break m;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(m.draining && !m.eligible, "{m:?}");
    assert_eq!(m.drain_flows_left, Some(1), "{m:?}");
    let left = m.drain_deadline_in_ms.expect("a deadline");
    assert!(left > 0 && left <= 2_000, "{left} ms to the deadline");
    wait_line(
        &lab,
        "xlbd event drain",
        &["member=198.18.1.11", "phase=started", "action=reset"],
        Duration::from_secs(1),
    );
    // Still fine shortly before the deadline.
    thread::sleep(DRAIN_DEADLINE.saturating_sub(drained_at.elapsed() + Duration::from_millis(500)));
    assert_eq!(echo(&mut on1, b"still\n"), b"still\n");

    // At the deadline: ECONNRESET on the client…
    let mut buf = [0u8; 16];
    let r = read_within(&mut on1, &mut buf, DRAIN_DEADLINE + SLACK);
    let at = drained_at.elapsed();
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "client: expected ECONNRESET, got {r:?} after {at:?}; log:\n{}",
        lab.log_text()
    );
    assert!(
        at >= DRAIN_DEADLINE - Duration::from_millis(100) && at <= DRAIN_DEADLINE + SLACK,
        "reset {at:?} after the drain began; the deadline is {DRAIN_DEADLINE:?}"
    );
    // … and on backend1 (connections the test closed itself end as `Closed`).
    let reset = reset_ending(&lab).expect("backend1's connection was reset");
    assert_eq!(reset, "backend1");
    // The other member's connection and new connections carry on.
    assert_eq!(echo(&mut on2, b"other\n"), b"other\n");
    let mut s = lab.client_connect(80);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(whoami(&mut s), "backend2");

    // Progress everywhere the operator looks.
    let line = wait_line(
        &lab,
        "xlbd event drain",
        &["member=198.18.1.11", "phase=deadline"],
        Duration::from_secs(2),
    );
    assert!(line.contains("flows_reset=1"), "{line}");
    wait_line(
        &lab,
        "xlbd event drain",
        &["member=198.18.1.11", "phase=completed", "flows_left=0"],
        Duration::from_secs(2),
    );
    assert_eq!(
        lab.wait_stat(
            "drain.web.198.18.1.11.flows_reset",
            1,
            Duration::from_secs(2)
        ),
        1
    );
    // The stats file is written four times a second: wait for the one after the count.
    let end = Instant::now() + Duration::from_secs(2);
    while lab.stat("drain.web.198.18.1.11.flows_left") != 0 && Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lab.stat("drain.web.198.18.1.11.flows_left"), 0);
    assert_eq!(lab.stat("rsts_sent"), 2, "one RST to each end");
    let metrics = lab.metrics();
    for want in [
        "xlb_member_drain_flows{pool=\"web\",member=\"198.18.1.11\"} 0",
        "xlb_member_drain_reset_flows_total{pool=\"web\",member=\"198.18.1.11\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == want), "{want} in:\n{metrics}");
    }
    let m = status();
    assert_eq!((m.drain_flows_left, m.drain_flows_reset), (Some(0), 1));
    assert!(m.drain_deadline_in_ms.unwrap() < 0, "{m:?}");
}

#[test]
fn a_drain_with_the_idle_action_leaves_connections_running_past_the_deadline() {
    if !need_root("a_drain_with_the_idle_action_leaves_connections_running_past_the_deadline") {
        return;
    }
    let lab = Lab::start(CONFIG_DRAIN);
    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));
    let (mut on1, _on2) = one_connection_per_backend(&lab, 80);
    rt.block_on(c.set_pool_member(pb::SetPoolMemberRequest {
        backend_pool: "web".into(),
        address: BACKEND1.into(),
        admin_state: Some(pb::AdminState::Down as i32),
        drain_timeout_seconds: Some(60),
        drain_action: Some(pb::DrainAction::Idle as i32),
        ..Default::default()
    }))
    .expect("drain backend1");
    let line = wait_line(
        &lab,
        "xlbd event drain",
        &["member=198.18.1.11", "phase=deadline"],
        Duration::from_secs(1) + SLACK,
    );
    assert!(
        line.contains("action=idle") && line.contains("flows_left=1"),
        "{line}"
    );
    assert_eq!(
        echo(&mut on1, b"after the deadline\n"),
        b"after the deadline\n"
    );
    assert_eq!(lab.stat("rsts_sent"), 0);
}

// ---------------------------------------------------------------------------------------------
// HTTPS probes.

/// `web` on the lab's echo servers (8080), probed over HTTPS on 8443 (TLS servers started
/// by the test), certificate not verified.
const CONFIG_HTTPS: &str = r#"
[settings]
lab_time_scale = 60

[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[health_probes]]
name = "tls"
protocol = "HTTPS"
port = 8443
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
health_probe = "tls"
"#;

/// A 5 s probe interval at lab time scale 60.
const INTERVAL: Duration = Duration::from_millis(83);

/// A CA and a certificate for `backend.xlb.test` it issued: (CA PEM, server config).
fn tls_material() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["backend.xlb.test".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    (ca_cert.pem(), Arc::new(config))
}

/// An HTTPS server on TCP 8443 of backend `ns`: every request gets the status `status` holds
/// (0: no answer at all, the connection stays open); stops with `stop` (bounded by 120 s).
fn https_server(
    ns: &str,
    config: Arc<rustls::ServerConfig>,
    status: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in_ns(ns, move || {
        let l = TcpListener::bind(("0.0.0.0", 8443)).expect("bind the HTTPS server");
        l.set_nonblocking(true).unwrap();
        let _ = ready_tx.send(());
        let end = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            let Ok((tcp, _)) = l.accept() else {
                thread::sleep(Duration::from_millis(5));
                continue;
            };
            let (config, status) = (Arc::clone(&config), Arc::clone(&status));
            thread::spawn(move || {
                let _ = tcp.set_nonblocking(false);
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 2048];
                if tls.read(&mut buf).unwrap_or(0) == 0 {
                    return; // the handshake failed (a client that refused the certificate)
                }
                let code = status.load(Ordering::Relaxed);
                if code == 0 {
                    thread::sleep(Duration::from_secs(2));
                    return;
                }
                let _ = tls.write_all(
                    format!("HTTP/1.1 {code} Status\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    ready_rx.recv().expect("HTTPS server started");
}

fn probe_state(lab: &Lab, member: &str) -> String {
    let needle = format!(" member={member} ");
    lab.log_text()
        .lines()
        .rfind(|l| l.starts_with("xlbd event probe_state") && l.contains(&needle))
        .and_then(|l| l.split(" state=").nth(1))
        .and_then(|s| s.split(' ').next())
        .unwrap_or("up")
        .to_string()
}

fn wait_state(lab: &Lab, member: &str, state: &str, timeout: Duration) {
    let from = Instant::now();
    while probe_state(lab, member) != state {
        assert!(
            from.elapsed() < timeout,
            "{member} not {state} within {timeout:?}; log:\n{}",
            lab.log_text()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn https_probes_judge_members_over_tls_and_verify_certificates_on_request() {
    if !need_root("https_probes_judge_members_over_tls_and_verify_certificates_on_request") {
        return;
    }
    let (ca_pem, server) = tls_material();
    let status1 = Arc::new(AtomicU16::new(200));
    let stop = Arc::new(AtomicBool::new(false));
    let (lab, ()) = Lab::start_prepared(CONFIG_HTTPS, &[], |lab| {
        https_server(
            &lab.backend1,
            Arc::clone(&server),
            Arc::clone(&status1),
            Arc::clone(&stop),
        );
        https_server(
            &lab.backend2,
            Arc::clone(&server),
            Arc::new(AtomicU16::new(200)),
            Arc::clone(&stop),
        );
    });
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop = StopOnDrop(Arc::clone(&stop));
    let rt = runtime();
    let mut c = rt.block_on(connect(&lab));
    // A certificate from an unknown CA, for another name than the address: healthy (not
    // verified by default).
    thread::sleep(INTERVAL * 6);
    assert!(
        event_lines(&lab, "xlbd event probe_state").is_empty(),
        "{}",
        lab.log_text()
    );
    // Status 503 over TLS: down, and why.
    status1.store(503, Ordering::Relaxed);
    wait_state(&lab, BACKEND1, "down", INTERVAL * 3 + SLACK);
    let line = event_lines(&lab, "xlbd event probe_state").pop().unwrap();
    assert!(
        line.contains("probe=tls") && line.contains("HTTP status 503"),
        "{line}"
    );
    for _ in 0..10 {
        let mut s = lab.client_connect(80);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(whoami(&mut s), "backend2");
    }
    status1.store(200, Ordering::Relaxed);
    wait_state(&lab, BACKEND1, "up", INTERVAL * 2 + SLACK);

    // Verification on, against the test's CA and the certificate's name: still healthy.
    let ca_file = std::env::temp_dir().join(format!("{}-probe-ca.pem", lab.prefix));
    std::fs::write(&ca_file, ca_pem).unwrap();
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _ca = RemoveOnDrop(ca_file.clone());
    let probe = |name: &str, timeout: Option<u32>| pb::HealthProbe {
        name: "tls".into(),
        protocol: pb::ProbeProtocol::Https as i32,
        port: 8443,
        path: Some("/healthz".into()),
        interval_seconds: Some(5),
        threshold: Some(2),
        timeout_seconds: timeout,
        tls_verify: true,
        tls_server_name: Some(name.into()),
        tls_ca_file: Some(ca_file.display().to_string()),
    };
    rt.block_on(c.update_health_probe(pb::UpdateHealthProbeRequest {
        probe: Some(probe("backend.xlb.test", None)),
    }))
    .expect("verify the certificate");
    let flips = event_lines(&lab, "xlbd event probe_state").len();
    thread::sleep(INTERVAL * 6);
    assert_eq!(
        event_lines(&lab, "xlbd event probe_state").len(),
        flips,
        "verified: still healthy; log:\n{}",
        lab.log_text()
    );
    // Another name than the certificate's: both fail the handshake.
    rt.block_on(c.update_health_probe(pb::UpdateHealthProbeRequest {
        probe: Some(probe("other.xlb.test", None)),
    }))
    .expect("a wrong name");
    wait_state(&lab, BACKEND1, "down", INTERVAL * 3 + SLACK);
    wait_state(&lab, BACKEND2, "down", INTERVAL * 3 + SLACK);
    let line = event_lines(&lab, "xlbd event probe_state").pop().unwrap();
    assert!(
        line.contains("TLS handshake") && line.contains("certificate"),
        "{line}"
    );
    // The right name again, and a member that accepts but never answers: the probe timeout
    // (1 s, 17 ms here, never below 250 ms of real time) marks it down.
    rt.block_on(c.update_health_probe(pb::UpdateHealthProbeRequest {
        probe: Some(probe("backend.xlb.test", Some(1))),
    }))
    .expect("the right name");
    wait_state(&lab, BACKEND1, "up", INTERVAL * 3 + SLACK);
    wait_state(&lab, BACKEND2, "up", INTERVAL * 3 + SLACK);
    status1.store(0, Ordering::Relaxed);
    wait_state(
        &lab,
        BACKEND1,
        "down",
        Duration::from_millis(250) * 3 + SLACK,
    );
    let line = event_lines(&lab, "xlbd event probe_state").pop().unwrap();
    assert!(line.contains("no answer within 250ms"), "{line}");
}

// ---------------------------------------------------------------------------------------------
// Floating IP.

/// Floating-IP rules: `float` VIP:8080 → the members' own 8080 (the lab's echo servers, which
/// listen on every address, the VIP on their loopback included), reset on idle after 4 lab
/// minutes; `where` VIP:8090 → a server that tells the address it was reached at.
const CONFIG_FLOATING: &str = r#"
[settings]
lab_time_scale = 60

[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[load_balancing_rules]]
name = "float"
frontend = "vip"
protocol = "TCP"
frontend_port = 8080
backend_pool = "web"
backend_port = 8080
floating_ip = true
idle_timeout_minutes = 4
tcp_reset = true

[[load_balancing_rules]]
name = "where"
frontend = "vip"
protocol = "TCP"
frontend_port = 8090
backend_pool = "web"
backend_port = 8090
floating_ip = true
idle_timeout_minutes = 30
"#;

/// 4 minutes at lab time scale 60.
const IDLE: Duration = Duration::from_secs(4);

/// The backend configuration docs/deployment.md gives for floating IP: the VIP on `lo`, ARP
/// for it neither answered nor announced on the backend's own interface.
fn hold_vip_on_loopback(ns: &str) {
    ip(&["-n", ns, "addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    for (k, v) in [
        ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.all.arp_announce", "2"),
    ] {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw", &format!("{k}={v}")])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "sysctl {k} in {ns}");
    }
}

/// A server on TCP 8090 of `ns` that answers each connection with "<name> <local address>
/// <peer address>\n" and closes it.
fn where_server(ns: &str, name: &'static str, stop: Arc<AtomicBool>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in_ns(ns, move || {
        let l = TcpListener::bind(("0.0.0.0", 8090)).expect("bind");
        l.set_nonblocking(true).unwrap();
        let _ = ready_tx.send(());
        let end = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            match l.accept() {
                Ok((mut s, peer)) => {
                    let local = s.local_addr().unwrap();
                    let _ = s.write_all(format!("{name} {local} {peer}\n").as_bytes());
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    ready_rx.recv().unwrap();
}

#[test]
fn floating_ip_members_get_the_vip_as_destination_and_idle_timeout_reset_and_keepalive_hold() {
    if !need_root(
        "floating_ip_members_get_the_vip_as_destination_and_idle_timeout_reset_and_keepalive_hold",
    ) {
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (lab, ()) = Lab::start_prepared(CONFIG_FLOATING, &[], |lab| {
        for (ns, name) in [(&lab.backend1, "backend1"), (&lab.backend2, "backend2")] {
            hold_vip_on_loopback(ns);
            where_server(ns, name, Arc::clone(&stop));
        }
    });
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop = StopOnDrop(stop);

    // Members are reached at the VIP itself, by the client's own address, and answer from
    // the VIP (the client's socket accepted the answer from VIP:8090).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let mut s = lab.client_connect(8090);
        let mut line = String::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_to_string(&mut line).unwrap();
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(parts.len(), 3, "{line:?}");
        assert_eq!(parts[1], format!("{VIP}:8090"), "destination not rewritten");
        assert_eq!(
            parts[2].split(':').next(),
            Some(CLIENT),
            "the client's own address"
        );
        assert_eq!(
            s.peer_addr().unwrap(),
            SocketAddr::new(VIP.parse().unwrap(), 8090)
        );
        seen.insert(parts[0].to_string());
    }
    assert_eq!(seen.len(), 2, "both members get flows: {seen:?}");

    // Reset on idle: one connection left silent gets ECONNRESET on both ends at the idle
    // timeout; another one, kept alive by TCP keepalives (1 s), outlives it.
    let mut silent = lab.client_connect(8080);
    let mut kept = lab.client_connect(8080);
    SockRef::from(&kept)
        .set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(Duration::from_secs(1))
                .with_interval(Duration::from_secs(1)),
        )
        .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(echo(&mut kept, b"kept\n"), b"kept\n");
    assert_eq!(echo(&mut silent, b"silent\n"), b"silent\n");
    let idle_from = Instant::now();
    let mut buf = [0u8; 16];
    let r = read_within(&mut silent, &mut buf, IDLE + SLACK + Duration::from_secs(3));
    let waited = idle_from.elapsed();
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "client: expected ECONNRESET, got {r:?} after {waited:?}; log:\n{}",
        lab.log_text()
    );
    assert!(
        waited >= IDLE - Duration::from_millis(50) && waited <= IDLE + SLACK,
        "reset {waited:?} after the last packet; the idle timeout is {IDLE:?}"
    );
    reset_ending(&lab).expect("the member's connection was reset");
    assert_eq!(
        lab.wait_stat(
            "rule.lb.float.flows_reset_on_idle",
            1,
            Duration::from_secs(2)
        ),
        1
    );
    // Past twice the idle timeout, the kept connection is alive and was never expired.
    thread::sleep((IDLE * 2 + Duration::from_millis(500)).saturating_sub(idle_from.elapsed()));
    assert_eq!(echo(&mut kept, b"still\n"), b"still\n");
    assert_eq!(
        lab.stat("rule.lb.float.flows_expired_idle"),
        1,
        "only the silent one"
    );
    assert_eq!(lab.stat("rsts_sent"), 2);
}

// ---------------------------------------------------------------------------------------------
// NAT event logging over IPFIX.

/// Outbound rule `out` for the pool (TCP, 64 ports per member) through 198.19.0.100.
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
allocated_outbound_ports = 64
idle_timeout_minutes = 30
"#;

/// Where xlbd sends its IPFIX messages: the internet host, UDP 4739 (IANA's IPFIX port).
const COLLECTOR: &str = "198.19.0.50:4739";
/// nfcapd listens on the internet host's loopback; the test's relay forwards every message.
const NFCAPD_PORT: u16 = 9995;

/// nfcapd (nfdump's collector) in a namespace, stopped by PID on drop.
struct Nfcapd {
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
}

impl Nfcapd {
    fn start(ns: &str, dir: std::path::PathBuf) -> Nfcapd {
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "nfcapd", "-w"])
            .arg(&dir)
            .args([
                "-b",
                "127.0.0.1",
                "-p",
                &NFCAPD_PORT.to_string(),
                "-t",
                "60",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("nfcapd (Debian package nfdump; scripts/test installs it)");
        // Ready once its socket is bound.
        let end = Instant::now() + Duration::from_secs(5);
        let port = format!(":{:04X}", NFCAPD_PORT);
        loop {
            let udp = std::fs::read_to_string(format!("/proc/{}/net/udp", child.id()))
                .unwrap_or_default();
            if udp.lines().any(|l| l.contains(&port)) {
                break;
            }
            assert!(
                Instant::now() < end,
                "nfcapd did not bind UDP {NFCAPD_PORT}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Nfcapd {
            child: Some(child),
            dir,
        }
    }

    /// SIGTERM (nfcapd then writes out its file); the file.
    fn stop_and_dump(&mut self) -> std::path::PathBuf {
        let mut child = self.child.take().expect("running");
        let _ = xlb_afxdp::sys::signal_process(child.id(), xlb_afxdp::sys::SIGTERM);
        let end = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < end, "nfcapd did not stop");
            thread::sleep(Duration::from_millis(20));
        }
        let files: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("nfcapd.2"))
            })
            .collect();
        assert_eq!(files.len(), 1, "one nfcapd file: {files:?}");
        files.into_iter().next().unwrap()
    }
}

/// `nfdump -r file -o raw [filter]`: one block of `name = value` lines per record.
fn nfdump(file: &std::path::Path, filter: Option<&str>) -> String {
    let out = std::process::Command::new("nfdump")
        .arg("-r")
        .arg(file)
        .args(["-o", "raw"])
        .args(filter)
        .output()
        .expect("nfdump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Nfcapd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = xlb_afxdp::sys::signal_process(c.id(), xlb_afxdp::sys::SIGTERM);
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The test's side of the collector: receives xlbd's messages at [`COLLECTOR`], decodes each
/// with xlb's own decoder, and forwards it unchanged to nfcapd.
struct Relay {
    records: Arc<std::sync::Mutex<Vec<xlb_control::ipfix::NatRecord>>>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    templates_seen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(ns: &str) -> Relay {
        let relay = Relay {
            records: Arc::default(),
            errors: Arc::default(),
            templates_seen: Arc::default(),
            stop: Arc::default(),
        };
        let (records, errors, templates, stop) = (
            Arc::clone(&relay.records),
            Arc::clone(&relay.errors),
            Arc::clone(&relay.templates_seen),
            Arc::clone(&relay.stop),
        );
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        spawn_in_ns(ns, move || {
            let s = std::net::UdpSocket::bind(COLLECTOR).expect("bind the collector address");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let _ = ready_tx.send(());
            let end = Instant::now() + Duration::from_secs(120);
            let mut buf = [0u8; 65_536];
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                let Ok((n, _)) = recv_from_retrying(&s, &mut buf) else {
                    continue;
                };
                match xlb_control::ipfix::decode(&buf[..n]) {
                    Ok(d) => {
                        if !d.templates.is_empty() {
                            templates.store(true, Ordering::Relaxed);
                        }
                        records.lock().unwrap().extend(d.records);
                    }
                    Err(e) => errors.lock().unwrap().push(e),
                }
                let _ = s.send_to(&buf[..n], ("127.0.0.1", NFCAPD_PORT));
            }
        });
        ready_rx.recv().unwrap();
        relay
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn every_snat_allocation_and_release_reaches_an_ipfix_collector() {
    if !need_root("every_snat_allocation_and_release_reaches_an_ipfix_collector") {
        return;
    }
    let (lab, (mut nfcapd, relay)) =
        Lab::start_prepared(CONFIG_SNAT, &["--ipfix-collector", COLLECTOR], |lab| {
            let dir = std::env::temp_dir().join(format!("{}-nfcapd", lab.prefix));
            (
                Nfcapd::start(&lab.internet, dir),
                Relay::start(&lab.internet),
            )
        });
    assert!(
        lab.log_text().contains(&format!(" ipfix={COLLECTOR}")),
        "{}",
        lab.log_text()
    );
    // Three connections from each member to the internet host's "who are you" server: each
    // learns its SNAT address and port, then ends with an RST (SO_LINGER 0), so that its
    // port is released 15 s (250 ms here) later.
    let mut allocations = std::collections::BTreeSet::new();
    for ns in [lab.backend1.clone(), lab.backend2.clone()] {
        for _ in 0..3 {
            let (local, seen_as) = in_ns(&ns, || {
                let mut s = TcpStream::connect_timeout(
                    &SocketAddr::new(INTERNET.parse().unwrap(), 80),
                    Duration::from_secs(5),
                )
                .expect("an outbound connection");
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut line = String::new();
                s.read_to_string(&mut line).unwrap();
                SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
                (s.local_addr().unwrap(), line.trim().to_string())
            });
            let seen_as: SocketAddr = seen_as.parse().unwrap();
            assert_eq!(seen_as.ip().to_string(), SNAT);
            allocations.insert((local, seen_as));
        }
    }
    assert_eq!(allocations.len(), 6);
    // The SNAT counters saw six allocations; the export sends a create and a delete for each.
    assert_eq!(
        lab.wait_stat("rule.out.out.flows_created", 6, Duration::from_secs(2)),
        6
    );
    assert_eq!(
        lab.wait_stat("nat_log.records_sent", 12, Duration::from_secs(5)),
        12,
        "log:\n{}",
        lab.log_text()
    );
    assert_eq!(lab.stat("nat_log.records_lost"), 0);

    // Our decoder: templates first, then exactly the six sessions, created and deleted.
    assert!(
        relay.errors.lock().unwrap().is_empty(),
        "{:?}",
        relay.errors
    );
    assert!(relay.templates_seen.load(Ordering::Relaxed));
    let records = relay.records.lock().unwrap().clone();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for event in [
        xlb_control::ipfix::NAT_SESSION_CREATE,
        xlb_control::ipfix::NAT_SESSION_DELETE,
    ] {
        let got: std::collections::BTreeSet<(SocketAddr, SocketAddr)> = records
            .iter()
            .filter(|r| r.event == event)
            .map(|r| {
                assert_eq!(r.proto, 6);
                assert_eq!(r.dst, SocketAddr::new(INTERNET.parse().unwrap(), 80));
                assert_eq!(r.post_dst, r.dst, "SNAT keeps the destination");
                assert!(r.unix_ms <= now_ms && r.unix_ms + 60_000 > now_ms, "{r:?}");
                (r.src, r.post_src)
            })
            .collect();
        assert_eq!(got, allocations, "natEvent {event}: {records:#?}");
    }
    assert_eq!(records.len(), 12);

    // The real collector decoded the same: every allocation, with its member address and
    // port, its translated address and port, and the NAT event.
    let file = nfcapd.stop_and_dump();
    let dump = nfdump(&file, None);
    // `nfdump -o raw` prints one block of `name = value` lines per record.
    let flows: Vec<std::collections::HashMap<String, String>> = dump
        .split("Flow Record:")
        .skip(1)
        .map(|flow| {
            flow.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect()
        })
        .collect();
    assert_eq!(flows.len(), 12, "{dump}");
    for (member, snat) in &allocations {
        for event in ["4", "5"] {
            let found = flows.iter().any(|f| {
                let is = |k: &str, v: String| f.get(k) == Some(&v);
                is("src addr", member.ip().to_string())
                    && is("src port", member.port().to_string())
                    && is("src xlt ip", snat.ip().to_string())
                    && is("src xlt port", snat.port().to_string())
                    && is("dst addr", INTERNET.to_string())
                    && is("dst port", "80".to_string())
                    && is("proto", "6 TCP".to_string())
                    && f.get("nat event")
                        .is_some_and(|v| v.split(':').next() == Some(event))
                    && f.get("Event time").is_some_and(|v| !v.starts_with('0'))
            });
            assert!(
                found,
                "{member} as {snat}, natEvent {event}, not in nfdump's output:\n{dump}"
            );
        }
    }
    // The operator's question, as docs/deployment.md asks it: who held this SNAT port?
    let (member, snat) = allocations.iter().next().unwrap();
    let filter = format!("src xip {} and src xport {}", snat.ip(), snat.port());
    let answer = nfdump(&file, Some(&filter));
    assert_eq!(
        answer.matches("Flow Record:").count(),
        2,
        "{filter}:\n{answer}"
    );
    assert!(answer.contains(&member.ip().to_string()), "{answer}");
}
