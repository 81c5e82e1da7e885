//! End to end, NAT event logging over IPFIX to a real collector (`nfcapd` from nfdump) in the
//! lab of `common/mod.rs` (lab time scale 60): every SNAT allocation the counters show appears
//! as a create record and its release as a delete.
//!
//! Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::*;
use socket2::SockRef;

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
