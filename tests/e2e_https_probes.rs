//! End to end, HTTPS health probes against a TLS server in a backend namespace of the lab
//! (`common/mod.rs`, lab time scale 60; certificate from a CA made by the test): unverified by
//! default, verified against the CA file and the server name on request, status 200 only, a
//! probe timeout.
//!
//! Run as root; otherwise each test says it is skipped.

mod common;

use std::{
    io::{Read, Write},
    net::TcpListener,
    sync::{
        atomic::{AtomicBool, AtomicU16, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::ops::*;
use common::*;
use xlb_proto::v1 as pb;

// ---------------------------------------------------------------------------------------------
// HTTPS probes.

/// `web` on the lab's echo servers (8080), probed over HTTPS on 8443 (TLS servers started
/// by the test), certificate not verified.
const CONFIG_HTTPS: &str = lab_config!(
    r#"
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
"#
);

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
        http_status: None,
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

    // A redirect (301): healthy once the probe accepts 200–399, failing again with the
    // default (200 only).
    status1.store(301, Ordering::Relaxed);
    rt.block_on(c.update_health_probe(pb::UpdateHealthProbeRequest {
        probe: Some(pb::HealthProbe {
            http_status: Some("200-399".into()),
            ..probe("backend.xlb.test", None)
        }),
    }))
    .expect("accept 200-399");
    wait_state(&lab, BACKEND1, "up", INTERVAL * 3 + SLACK);
    rt.block_on(c.update_health_probe(pb::UpdateHealthProbeRequest {
        probe: Some(probe("backend.xlb.test", None)),
    }))
    .expect("200 only");
    wait_state(&lab, BACKEND1, "down", INTERVAL * 3 + SLACK);
    let line = event_lines(&lab, "xlbd event probe_state").pop().unwrap();
    assert!(line.contains("HTTP status 301"), "{line}");
}
