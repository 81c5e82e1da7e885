//! End to end, drain with a deadline, floating IP and huge pages, in the namespace lab of
//! `common/mod.rs` at lab time scale 60 with real Linux TCP stacks:
//! - drain with a deadline: a drained member's connection keeps working until the deadline,
//!   then client and member both get ECONNRESET; new connections go to the other member; the
//!   drain's progress shows in the status, events, metrics and stats;
//! - floating IP: a member holding the VIP on its loopback gets flows addressed to the VIP
//!   and answers from it through xlb; idle timeout, reset on idle (ECONNRESET on both ends)
//!   and keepalive refresh hold for these flows;
//! - huge pages: what `--huge-pages` gets shows in the start-up log and the stats file.
//!
//! HTTPS probes are tested in `e2e_https_probes.rs`, the NAT event export in `e2e_ipfix.rs`.
//! Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::ops::*;
use common::*;
use socket2::{SockRef, TcpKeepalive};
use xlb_proto::v1 as pb;

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
    if fast_path_on() {
        // XDP forwarded the connections' segments: their resets are the fast path's case.
        assert!(lab.stat("fast.forwarded") > 0, "nothing went through XDP");
    }
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
// Floating IP.

/// Floating-IP rules: `float` VIP:8080 → the members' own 8080 (the lab's echo servers, which
/// listen on every address, the VIP on their loopback included), reset on idle after 4 lab
/// minutes; `where` VIP:8090 → a server that tells the address it was reached at.
const CONFIG_FLOATING: &str = lab_config!(
    r#"
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
"#
);

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
    client_reset_on_idle(&lab, &mut silent, idle_from, IDLE, SLACK);
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
// Huge pages.

/// With `--huge-pages auto` (the default) the engine's tables are advised and, with THP in
/// `madvise` or `always` mode, backed by huge pages: the start-up log line and the stats file
/// say how much; with `--huge-pages off` nothing is advised.
#[test]
fn huge_pages_for_the_tables_show_in_the_log_and_the_stats_file() {
    if !need_root("huge_pages_for_the_tables_show_in_the_log_and_the_stats_file") {
        return;
    }
    // A million flows: each table's partial 2 MiB at either end (never advised) is then a
    // small part of it. At 262 144 flows the 94-byte layout's tables are 1.5–16 MiB each, and
    // where the allocator placed them decided whether the interiors reached 60 %.
    let capacity = 1u64 << 20;
    let capacity_arg = capacity.to_string();
    let thp = xlb_afxdp::huge::Thp::host();
    {
        let lab = Lab::start_with(CONFIG_DRAIN, &["--flow-capacity", &capacity_arg]);
        lab.wait_stat("huge_pages.tables_bytes", 1, Duration::from_secs(3));
        let stats = lab.stats();
        let stat = |k: &str| stats.get(k).copied().unwrap_or(0);
        let log = lab.log_text();
        println!(
            "THP {thp}: {}",
            log.lines().find(|l| l.contains("huge pages")).unwrap_or("")
        );
        assert!(log.contains("huge pages (THP"), "{log}");
        assert_eq!(stat("huge_pages.enabled"), 1);
        assert!(
            // About 94 bytes per flow slot (docs/architecture.md, flow table layout).
            stat("huge_pages.tables_bytes") >= capacity * 90,
            "{stats:?}"
        );
        assert!(
            // All but the partial huge pages at each table's ends (under a fifth at this size).
            stat("huge_pages.tables_advised_bytes") * 100 >= stat("huge_pages.tables_bytes") * 60,
            "{stats:?}"
        );
        assert_eq!(
            stat("huge_pages.umems_hugetlb")
                + stat("huge_pages.umems_thp")
                + stat("huge_pages.umems_pages"),
            1,
            "one worker, one UMEM: {stats:?}"
        );
        if matches!(
            thp,
            xlb_afxdp::huge::Thp::Madvise | xlb_afxdp::huge::Thp::Always
        ) {
            assert!(stat("huge_pages.tables_huge_bytes") > 0, "{stats:?}");
            assert!(
                stat("huge_pages.anon_huge_bytes") >= stat("huge_pages.tables_huge_bytes"),
                "{stats:?}"
            );
        } else {
            println!("THP is {thp} on this host: no huge page is expected");
        }
    }
    let lab = Lab::start_with(
        CONFIG_DRAIN,
        &["--flow-capacity", &capacity_arg, "--huge-pages", "off"],
    );
    lab.wait_stat("huge_pages.tables_bytes", 1, Duration::from_secs(3));
    assert_eq!(lab.stat("huge_pages.enabled"), 0);
    assert_eq!(lab.stat("huge_pages.tables_advised_bytes"), 0);
    assert_eq!(lab.stat("huge_pages.tables_huge_bytes"), 0);
    assert!(
        lab.log_text().contains("huge pages off"),
        "{}",
        lab.log_text()
    );
}
