//! End to end, xlbd under a service manager: a Unix datagram socket of the test stands in for
//! systemd's `NOTIFY_SOCKET`. xlbd says READY=1 once its data path runs, feeds the watchdog
//! (`WATCHDOG_USEC`) while its worker loops run and stops feeding it while one is stalled (the
//! test stops the worker's thread with ptrace), reloads its file on SIGHUP between
//! RELOADING=1 and READY=1 (a new rule carries traffic at once; a bad file changes nothing
//! and says why) and says STOPPING=1 on SIGTERM. Run as root; otherwise the tests say they
//! are skipped.

mod common;

use std::{
    os::unix::net::UnixDatagram,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use common::stall::{stall, thread_id};
use common::*;
use xlb_afxdp::sys;
use xlb_api::{
    server::{channel, client, BearerToken},
    Listen,
};
use xlb_proto::v1 as pb;

/// The service manager's end: every datagram xlbd sends, with when it arrived.
struct Manager {
    path: PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
}

impl Manager {
    fn listen(name: &str) -> Manager {
        let path =
            std::env::temp_dir().join(format!("xlb-notify-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (Arc::clone(&got), Arc::clone(&stop));
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Bounded: the lab's xlbd stops after 120 s at the latest.
            let end = Instant::now() + Duration::from_secs(180);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    g.lock().unwrap().push((Instant::now(), msg));
                }
            }
        });
        Manager { path, got, stop }
    }

    fn env(&self) -> String {
        self.path.display().to_string()
    }

    fn messages(&self) -> Vec<(Instant, String)> {
        self.got.lock().unwrap().clone()
    }

    /// Index of the first message from `from` on that has a line `line`, waiting up to
    /// `timeout`.
    fn wait_for(&self, from: usize, line: &str, timeout: Duration) -> Option<usize> {
        let end = Instant::now() + timeout;
        loop {
            let got = self.messages();
            if let Some(i) = (from..got.len()).find(|&i| got[i].1.lines().any(|l| l == line)) {
                return Some(i);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Times of the WATCHDOG=1 messages.
    fn watchdog_times(&self) -> Vec<Instant> {
        self.messages()
            .into_iter()
            .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
            .map(|(t, _)| t)
            .collect()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn wait_log(lab: &Lab, needle: &str, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if lab.log_text().contains(needle) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

fn hangup(lab: &Lab) {
    let pid = lab.xlbd_pid().expect("xlbd runs");
    sys::signal_process(pid, libc::SIGHUP).expect("SIGHUP to xlbd");
}

/// A new rule on port 82, and web-silent's idle timeout changed.
fn reloaded_config() -> String {
    CONFIG.replace(
        "name = \"web-silent\"\nfrontend = \"vip\"\nprotocol = \"TCP\"\nfrontend_port = 81\n\
         backend_pool = \"web\"\nbackend_port = 8080\nidle_timeout_minutes = 4",
        "name = \"web-silent\"\nfrontend = \"vip\"\nprotocol = \"TCP\"\nfrontend_port = 81\n\
         backend_pool = \"web\"\nbackend_port = 8080\nidle_timeout_minutes = 5",
    ) + r#"
[[load_balancing_rules]]
name = "web82"
frontend = "vip"
protocol = "TCP"
frontend_port = 82
backend_pool = "web"
backend_port = 8080
"#
}

#[test]
fn ready_reload_on_sighup_watchdog_and_stopping_through_notify_socket() {
    if !need_root("ready_reload_on_sighup_watchdog_and_stopping_through_notify_socket") {
        return;
    }
    let manager = Manager::listen("reload");
    let notify = manager.env();
    let mut lab = Lab::start_with_env(
        CONFIG,
        &[],
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "1000000")],
    );
    // READY=1 once the data path runs, with a status.
    let ready = manager
        .wait_for(0, "READY=1", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no READY=1: {:?}", manager.messages()));
    let msg = &manager.messages()[ready].1;
    assert!(
        msg.contains("STATUS=generation 1, 0 flows, 1/1 workers running"),
        "{msg}"
    );
    let mut c = lab.client_connect(80);
    assert_eq!(echo(&mut c, b"before"), b"before");

    // The watchdog is fed every quarter of WATCHDOG_USEC.
    thread::sleep(Duration::from_secs(2));
    let fed = manager.watchdog_times();
    assert!(fed.len() >= 4, "{} WATCHDOG=1 in 2 s", fed.len());

    // SIGHUP: the new file applies as one generation, between RELOADING=1 and READY=1.
    std::fs::write(lab.config_path(), reloaded_config()).unwrap();
    let from = manager.messages().len();
    hangup(&lab);
    let reloading = manager
        .wait_for(from, "RELOADING=1", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no RELOADING=1: {:?}", manager.messages()));
    let msg = &manager.messages()[reloading].1;
    assert!(
        msg.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{msg}"
    );
    let ready = manager
        .wait_for(reloading, "READY=1", Duration::from_secs(5))
        .expect("READY=1 after the reload");
    assert!(
        manager.messages()[ready].1.contains("STATUS=generation 2,"),
        "{:?}",
        manager.messages()[ready]
    );
    assert!(
        wait_log(
            &lab,
            "xlbd event reload_change op=added section=load_balancing_rule name=web82",
            Duration::from_secs(2)
        ),
        "{}",
        lab.log_text()
    );
    let log = lab.log_text();
    assert!(
        log.contains(
            "xlbd event reload_change op=changed section=load_balancing_rule name=web-silent \
             fields=\"idle_timeout_minutes=4->5\""
        ),
        "{log}"
    );
    assert!(log.contains("generation=2 applied=true changes=2"), "{log}");
    // The new rule carries traffic; the connection opened before still does.
    let mut c82 = lab.client_connect(82);
    assert_eq!(echo(&mut c82, b"new rule"), b"new rule");
    assert_eq!(echo(&mut c, b"still"), b"still");

    // A bad file changes nothing, says why, and xlbd runs on.
    std::fs::write(
        lab.config_path(),
        reloaded_config().replace("idle_timeout_minutes = 5", "idle_timeout_minutes = 31"),
    )
    .unwrap();
    let from = manager.messages().len();
    hangup(&lab);
    let reloading = manager
        .wait_for(from, "RELOADING=1", Duration::from_secs(5))
        .expect("RELOADING=1");
    let ready = manager
        .wait_for(reloading, "READY=1", Duration::from_secs(5))
        .expect("READY=1 after a refused reload");
    assert!(
        manager.messages()[ready]
            .1
            .contains("STATUS=reload refused, generation 2,"),
        "{:?}",
        manager.messages()[ready]
    );
    assert!(
        wait_log(&lab, "xlbd event reload_refused", Duration::from_secs(2)),
        "{}",
        lab.log_text()
    );
    assert!(
        lab.log_text()
            .contains("load_balancing_rules[web-silent].idle_timeout_minutes"),
        "{}",
        lab.log_text()
    );
    let mut c82 = lab.client_connect(82);
    assert_eq!(echo(&mut c82, b"kept"), b"kept");

    // What the API's GetConfig answers applies back as no change, and a dry run of the
    // start-up file shows what the reload would undo, applying nothing.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = channel(&Listen::Unix(lab.api_socket()))
            .await
            .expect("connect to xlbd's API");
        let mut api = client(ch, BearerToken::new(None).unwrap());
        let got = api
            .get_config(pb::GetConfigRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.generation, 2);
        let r = api
            .apply_config(pb::ApplyConfigRequest {
                config: Some(got),
                dry_run: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.changes.is_empty() && !r.applied, "{r:?}");
        assert_eq!(r.generation, 2);
        let first = xlb_engine::Config::from_toml_str(CONFIG).unwrap();
        let r = api
            .apply_config(pb::ApplyConfigRequest {
                config: Some(xlb_api::convert::config_to(&first, 0)),
                dry_run: true,
            })
            .await
            .unwrap()
            .into_inner();
        let names: Vec<(&str, &str)> = r
            .changes
            .iter()
            .map(|c| (c.section.as_str(), c.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("load_balancing_rule", "web82"),
                ("load_balancing_rule", "web-silent")
            ]
        );
        assert!(!r.applied && r.generation == 2);
    });

    // SIGTERM: STOPPING=1, a clean exit.
    let from = manager.messages().len();
    let status = lab.stop_xlbd().expect("xlbd ran");
    assert!(status.success(), "{status:?}; log:\n{}", lab.log_text());
    assert!(
        manager
            .wait_for(from, "STOPPING=1", Duration::from_secs(1))
            .is_some(),
        "{:?}",
        manager.messages()
    );
}

#[test]
fn a_stalled_worker_stops_the_watchdog_until_it_runs_again() {
    if !need_root("a_stalled_worker_stops_the_watchdog_until_it_runs_again") {
        return;
    }
    let manager = Manager::listen("stall");
    let notify = manager.env();
    let lab = Lab::start_with_env(
        CONFIG,
        &["--workers", "2", "--queues", "2"],
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "1000000")],
    );
    manager
        .wait_for(0, "READY=1", Duration::from_secs(5))
        .expect("READY=1");
    thread::sleep(Duration::from_secs(1));
    let tid = thread_id(lab.xlbd_pid().unwrap(), "xlb-worker-1");
    let stalled = Instant::now();
    stall(tid, Duration::from_secs(3));
    let resumed = Instant::now();
    // Fed again once the worker runs (its next publication, then the next feed).
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end && !manager.watchdog_times().iter().any(|t| *t > resumed) {
        thread::sleep(Duration::from_millis(20));
    }
    let fed = manager.watchdog_times();
    // The worker's last beat was at most 250 ms before the stall; it is stuck once that is
    // older than 1 s (half of nothing shorter than 2 s): from 1.6 s into the stall on, no
    // feed can come, however late the control loop runs.
    let silent = (stalled + Duration::from_millis(1600), resumed);
    let during: Vec<Duration> = fed
        .iter()
        .filter(|t| **t > silent.0 && **t < silent.1)
        .map(|t| t.duration_since(stalled))
        .collect();
    assert!(
        during.is_empty(),
        "fed during the stall at {during:?}; log:\n{}",
        lab.log_text()
    );
    assert!(fed.iter().any(|t| *t < stalled), "fed before the stall");
    assert!(
        fed.iter().any(|t| *t > resumed),
        "not fed again after the stall; log:\n{}",
        lab.log_text()
    );
    let log = lab.log_text();
    assert!(
        log.contains("not feeding the watchdog: no loop iteration of worker 1"),
        "{log}"
    );
    assert!(
        manager
            .messages()
            .iter()
            .any(|(_, m)| m.contains("STATUS=stuck: worker 1")),
        "{:?}",
        manager.messages()
    );
    assert!(log.contains("feeding the watchdog again"), "{log}");
    // The data path works again.
    let mut c = lab.client_connect(80);
    assert_eq!(echo(&mut c, b"after"), b"after");
}
