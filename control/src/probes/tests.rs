use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use crossbeam::channel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xlb_api::{ControlEvent, ControlState};

use super::run::{health_loop, reconcile, Msg};
use super::*;
use crate::plane::Shared;

fn run(t: &mut Tracker, threshold: u32, results: &str) -> Vec<Option<bool>> {
    results
        .chars()
        .map(|c| t.record(c == 'o', threshold))
        .collect()
}

#[test]
fn threshold_consecutive_failures_mark_down_and_one_success_recovers() {
    let mut t = Tracker::new();
    assert!(t.healthy());
    // A failure between successes resets the count.
    assert_eq!(run(&mut t, 3, "xxoxx"), [None; 5]);
    assert_eq!(t.record(false, 3), Some(false));
    assert!(!t.healthy());
    assert_eq!(t.record(false, 3), None);
    assert_eq!(t.record(true, 3), Some(true));
    assert!(t.healthy());
}

#[test]
fn threshold_one_flips_on_the_first_failure() {
    let mut t = Tracker::new();
    assert_eq!(t.record(false, 1), Some(false));
}

#[test]
fn flapping_members_need_more_successes_and_are_forgiven() {
    let mut t = Tracker::new();
    assert_eq!(run(&mut t, 2, "xxo"), [None, Some(false), Some(true)]);
    // Down again right after recovering: the next recovery needs 2 successes.
    assert_eq!(run(&mut t, 2, "xx"), [None, Some(false)]);
    assert_eq!(t.rise(), 2);
    assert_eq!(run(&mut t, 2, "oxoo"), [None, None, None, Some(true)]);
    // And again: 4.
    assert_eq!(run(&mut t, 2, "xx"), [None, Some(false)]);
    assert_eq!(t.rise(), 4);
    assert_eq!(run(&mut t, 2, "oooo"), [None, None, None, Some(true)]);
    // Capped at MAX_RISE.
    for _ in 0..5 {
        run(&mut t, 2, "xx");
        run(&mut t, 2, &"o".repeat(MAX_RISE as usize));
    }
    assert_eq!(t.rise(), MAX_RISE);
    assert!(t.healthy());
    // Up for FLAP_WINDOW probes: forgiven.
    run(&mut t, 2, &"o".repeat(FLAP_WINDOW as usize));
    assert_eq!(t.rise(), 1);
    assert_eq!(run(&mut t, 2, "xxo"), [None, Some(false), Some(true)]);
}

#[test]
fn a_relapse_after_the_flap_window_is_not_flapping() {
    let mut t = Tracker::new();
    run(&mut t, 2, "xxo");
    // Down again at the FLAP_WINDOW-th... probe after the recovery (its second failure).
    run(&mut t, 2, &"o".repeat(FLAP_WINDOW as usize - 1));
    assert_eq!(run(&mut t, 2, "xx"), [None, Some(false)]);
    assert_eq!(t.rise(), 1);
}

#[test]
fn status_lines() {
    assert_eq!(http_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
    assert_eq!(
        http_status(b"HTTP/1.0 503 Service Unavailable\r\nx"),
        Some(503)
    );
    assert_eq!(http_status(b"HTTP/1.1 200 OK"), None, "incomplete line");
    assert_eq!(http_status(b"SSH-2.0-OpenSSH\r\n"), None);
    assert_eq!(http_status(b"HTTP/1.1 20 OK\r\n"), None);
}

const CONFIG: &str = r#"
    [settings]
    lab_time_scale = 10
    [[frontends]]
    name = "vip"
    address = "198.18.0.100"
    kind = "public"
    [[backend_pools]]
    name = "web"
    members = [{ address = "198.18.1.11" }, { address = "198.18.1.12", admin_state = "down" }]
    [[backend_pools]]
    name = "other"
    members = [{ address = "198.18.1.13" }]
    [[health_probes]]
    name = "tcp"
    protocol = "TCP"
    port = 8080
    threshold = 3
    [[health_probes]]
    name = "http"
    protocol = "HTTP"
    port = 8081
    path = "/healthz"
    interval_seconds = 1
    [[load_balancing_rules]]
    name = "a"
    frontend = "vip"
    protocol = "TCP"
    frontend_port = 80
    backend_pool = "web"
    backend_port = 8080
    health_probe = "tcp"
    [[load_balancing_rules]]
    name = "b"
    frontend = "vip"
    protocol = "TCP"
    frontend_port = 81
    backend_pool = "web"
    backend_port = 8080
    health_probe = "http"
    [[load_balancing_rules]]
    name = "c"
    frontend = "vip"
    protocol = "TCP"
    frontend_port = 82
    backend_pool = "web"
    backend_port = 8080
    health_probe = "tcp"
    [[load_balancing_rules]]
    name = "no-probe"
    frontend = "vip"
    protocol = "TCP"
    frontend_port = 83
    backend_pool = "other"
    backend_port = 8080
"#;

#[test]
fn targets_are_per_probe_pool_and_member_and_lab_scaled() {
    let config = Config::from_toml_str(CONFIG).unwrap();
    let t = targets(&config);
    let keys: Vec<(&str, &str, String)> = t
        .keys()
        .map(|k| (k.probe.as_str(), k.pool.as_str(), k.member.to_string()))
        .collect();
    assert_eq!(
        keys,
        [
            ("http", "web", "198.18.1.11".to_string()),
            ("http", "web", "198.18.1.12".to_string()),
            ("tcp", "web", "198.18.1.11".to_string()),
            ("tcp", "web", "198.18.1.12".to_string()),
        ],
        "admin-down members are probed too; pools without a probe are not"
    );
    let tcp = t
        .values()
        .find(|s| s.protocol == ProbeProtocol::Tcp)
        .unwrap();
    assert_eq!(tcp.interval, Duration::from_millis(500), "5 s / 10");
    assert_eq!(tcp.timeout, Duration::from_millis(500));
    assert_eq!(tcp.threshold, 3);
    assert_eq!(tcp.path, "/");
    let http = t
        .values()
        .find(|s| s.protocol == ProbeProtocol::Http)
        .unwrap();
    assert_eq!(http.interval, Duration::from_millis(100));
    assert_eq!(http.timeout, MIN_TIMEOUT, "never below the floor");
    assert_eq!(
        (http.port, http.path.as_str(), http.threshold),
        (8081, "/healthz", 2)
    );
}

#[test]
fn a_member_is_healthy_in_a_pool_only_while_every_probe_passes() {
    let m: IpAddr = "198.18.1.11".parse().unwrap();
    let key = |probe: &str| TargetKey {
        probe: probe.into(),
        pool: "web".into(),
        member: m,
    };
    let mut v = Verdicts::default();
    assert!(v.healthy("web", m));
    v.set(key("tcp"), true);
    v.set(key("http"), false);
    assert!(!v.healthy("web", m));
    assert!(v.healthy("other", m), "health is per pool");
    v.set(key("http"), true);
    assert!(v.healthy("web", m));
    v.set(key("tcp"), false);
    v.remove(&key("tcp"));
    assert!(v.healthy("web", m), "a removed probe no longer counts");
}

#[test]
fn reconcile_adds_spreads_keeps_verdicts_and_reports_removals() {
    let config = Config::from_toml_str(CONFIG).unwrap();
    let (tx, rx) = channel::unbounded();
    let mut running = HashMap::new();
    let now = Instant::now();
    reconcile(&mut running, targets(&config), now, &tx);
    assert_eq!(running.len(), 4);
    let starts: BTreeSet<Instant> = running.values().map(|t| t.next_at).collect();
    assert_eq!(starts.len(), 4, "first attempts are spread");
    assert!(running.values().all(|t| t.next_at < now + t.spec.interval));
    // A verdict survives a change of the probe's settings.
    let key = running.keys().find(|k| k.probe == "tcp").unwrap().clone();
    running.get_mut(&key).unwrap().tracker.record(false, 1);
    let mut changed = config.clone();
    changed.health_probes[0].threshold = 5;
    reconcile(&mut running, targets(&changed), now, &tx);
    let t = &running[&key];
    assert!(!t.tracker.healthy());
    assert_eq!((t.spec.threshold, t.epoch), (5, 1));
    assert!(rx.try_recv().is_err(), "nothing removed");
    // Removing rule `b` removes the HTTP targets.
    changed.load_balancing_rules.remove(1);
    reconcile(&mut running, targets(&changed), now, &tx);
    let gone: Vec<String> = rx
        .try_iter()
        .map(|m| match m {
            Msg::Gone(k) => format!("{}/{}", k.probe, k.member),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(gone.len(), 2);
    assert!(gone.iter().all(|g| g.starts_with("http/")), "{gone:?}");
    assert_eq!(running.len(), 2);
}

/// A publisher that records generations and fails when told to.
#[derive(Debug, Default)]
struct Recorder {
    published: std::sync::Mutex<Vec<u64>>,
    fail: AtomicBool,
}

impl xlb_api::Publisher for Recorder {
    fn publish(
        &self,
        rules: Arc<xlb_engine::RuleSet>,
        _: Duration,
    ) -> Result<(), xlb_api::PublishError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(xlb_api::PublishError::Unavailable("test".into()));
        }
        self.published.lock().unwrap().push(rules.generation());
        Ok(())
    }
}

#[test]
fn health_thread_combines_verdicts_publishes_flips_and_retries() {
    let publisher = Arc::new(Recorder::default());
    let state = Arc::new(
        ControlState::start(
            Config::from_toml_str(CONFIG).unwrap(),
            xlb_engine::MemberHealth::all_healthy(),
            publisher.clone(),
            xlb_api::StateOptions::default(),
        )
        .unwrap(),
    );
    let shared = Shared::new(vec![crate::plane::cell::cell(0).1], Vec::new(), 1);
    let mut events = shared.events.subscribe();
    let (tx, rx) = channel::unbounded();
    let thread = {
        let (state, shared) = (Arc::clone(&state), Arc::clone(&shared));
        std::thread::spawn(move || health_loop(&state, &shared, true, &rx))
    };
    let m: IpAddr = "198.18.1.11".parse().unwrap();
    let key = |probe: &str| TargetKey {
        probe: probe.into(),
        pool: "web".into(),
        member: m,
    };
    let flip = |probe: &str, healthy: bool| Msg::Flip {
        key: key(probe),
        healthy,
        why: "test".into(),
    };
    let wait = |want: &dyn Fn(&xlb_api::Snapshot) -> bool| {
        let end = Instant::now() + Duration::from_secs(5);
        while !want(&state.snapshot()) {
            assert!(Instant::now() < end, "{:?}", state.snapshot().members());
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let healthy = |s: &xlb_api::Snapshot| s.health.is_healthy("web", m);

    tx.send(flip("tcp", false)).unwrap();
    wait(&|s| !healthy(s));
    let ev = events.blocking_recv().unwrap();
    assert!(
        matches!(&ev.event, ControlEvent::ProbeStateChanged { probe, healthy: false, .. } if probe == "tcp"),
        "{ev:?}"
    );
    // The HTTP probe fails too, then the TCP one recovers: still down (every probe must
    // pass), and no generation for a flip that changes nothing.
    let published = publisher.published.lock().unwrap().len();
    tx.send(flip("http", false)).unwrap();
    tx.send(flip("tcp", true)).unwrap();
    assert!(events.blocking_recv().is_ok() && events.blocking_recv().is_ok());
    assert!(!healthy(&state.snapshot()));
    assert_eq!(publisher.published.lock().unwrap().len(), published);
    // A failed publish is retried until it succeeds.
    publisher.fail.store(true, Ordering::SeqCst);
    tx.send(flip("http", true)).unwrap();
    assert!(events.blocking_recv().is_ok());
    std::thread::sleep(RETRY_EVERY / 2);
    assert!(
        !healthy(&state.snapshot()),
        "not applied while publishing fails"
    );
    publisher.fail.store(false, Ordering::SeqCst);
    wait(&|s| healthy(s));
    // A member that was down and whose probe is removed is healthy again.
    tx.send(flip("tcp", false)).unwrap();
    wait(&|s| !healthy(s));
    tx.send(Msg::Gone(key("tcp"))).unwrap();
    wait(&|s| healthy(s));
    drop(tx);
    thread.join().unwrap();
}

#[test]
fn probes_against_local_servers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // An HTTP server: 200 on /ok, 503 elsewhere.
        let server = tokio::spawn(async move {
            for _ in 0..4 {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let answer = if req.starts_with("GET /ok HTTP/1.1\r\n") {
                    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                } else {
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                };
                // The TCP probe closes without reading: its answer may not be taken.
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let mut spec = ProbeSpec {
            protocol: ProbeProtocol::Http,
            port,
            path: "/ok".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            threshold: 1,
            tls: None,
            accept: (200, 200),
        };
        assert_eq!(probe_once(&spec, local).await, Ok(()));
        spec.path = "/other".into();
        assert_eq!(
            probe_once(&spec, local).await,
            Err("HTTP status 503".to_string())
        );
        // An accepted range that holds it (`http_status = "200-503"`).
        spec.accept = (200, 503);
        assert_eq!(probe_once(&spec, local).await, Ok(()));
        spec.protocol = ProbeProtocol::Tcp;
        assert_eq!(probe_once(&spec, local).await, Ok(()));
        server.await.unwrap();
        // Nothing listens any more: refused at once.
        let refused = probe_once(&spec, local).await.unwrap_err();
        assert!(refused.starts_with("connect:"), "{refused}");
    });
}

#[test]
fn a_silent_server_times_out_within_the_bound() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Accepts (the kernel completes the handshake) but never answers the request.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spec = ProbeSpec {
            protocol: ProbeProtocol::Http,
            port,
            path: "/".into(),
            interval: Duration::from_millis(300),
            timeout: Duration::from_millis(300),
            threshold: 1,
            tls: None,
            accept: (200, 200),
        };
        let started = Instant::now();
        let r = probe_once(&spec, "127.0.0.1".parse().unwrap()).await;
        let took = started.elapsed();
        assert!(r.unwrap_err().starts_with("no answer within"));
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        drop(listener);
    });
}

/// A TLS server on loopback with a certificate for `backend.xlb.test` issued by a CA of
/// its own: answers every request with 200, `accept` times.
fn tls_server(
    accept: usize,
) -> (
    u16,
    std::path::PathBuf,
    tempfile::TempDir,
    std::thread::JoinHandle<()>,
) {
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
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
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
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let join = std::thread::spawn(move || {
        for _ in 0..accept {
            let Ok((tcp, _)) = listener.accept() else {
                return;
            };
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let conn = rustls::ServerConnection::new(Arc::clone(&config)).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 1024];
            // A refused handshake ends here with an error: the next client is served.
            if std::io::Read::read(&mut tls, &mut buf).unwrap_or(0) > 0 {
                let _ = std::io::Write::write_all(
                    &mut tls,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                );
                tls.conn.send_close_notify();
                let _ = std::io::Write::flush(&mut tls);
            }
        }
    });
    (port, ca_file, dir, join)
}

#[test]
fn https_probes_accept_any_certificate_unless_told_to_verify_it() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (port, ca_file, _dir, server) = tls_server(5);
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let spec = |tls: TlsSpec| ProbeSpec {
        protocol: ProbeProtocol::Https,
        port,
        path: "/healthz".into(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(5),
        threshold: 1,
        tls: Some(tls),
        accept: (200, 200),
    };
    let unverified = TlsSpec {
        verify: false,
        server_name: None,
        ca_file: None,
    };
    let verified = |name: &str| TlsSpec {
        verify: true,
        server_name: Some(name.into()),
        ca_file: Some(ca_file.display().to_string()),
    };
    rt.block_on(async {
        // Off by default: a certificate for another name, from an unknown CA, is fine.
        assert_eq!(probe_once(&spec(unverified), local).await, Ok(()));
        assert_eq!(
            probe_once(&spec(verified("backend.xlb.test")), local).await,
            Ok(())
        );
        let wrong = probe_once(&spec(verified("other.xlb.test")), local)
            .await
            .unwrap_err();
        assert!(
            wrong.starts_with("TLS handshake:") && wrong.contains("certificate"),
            "{wrong}"
        );
        // The system's store does not know this CA.
        let system = probe_once(
            &spec(TlsSpec {
                ca_file: None,
                ..verified("backend.xlb.test")
            }),
            local,
        )
        .await
        .unwrap_err();
        assert!(
            system.starts_with("TLS handshake:") || system.contains("store"),
            "{system}"
        );
        let missing = probe_once(
            &spec(TlsSpec {
                ca_file: Some("/nonexistent/ca.pem".into()),
                ..verified("backend.xlb.test")
            }),
            local,
        )
        .await
        .unwrap_err();
        assert!(
            missing.starts_with("tls_ca_file /nonexistent/ca.pem"),
            "{missing}"
        );
    });
    // The missing CA file fails before connecting: the server took 4 connections.
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    server.join().unwrap();
}
