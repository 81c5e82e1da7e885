//! Flows survive xlbd's restarts with real Linux TCP stacks: connections with paced traffic
//! through a load-balancing rule with TCP reset on idle (unknown-flow policy `drop`) and
//! through an outbound (SNAT) rule with reset on idle, while xlbd is (a) killed with SIGKILL
//! and restarted, (b) stopped with SIGTERM and restarted, (c) replaced by a new xlbd that
//! takes over (`--takeover`). Every connection keeps carrying data, none is reset by the
//! restart, the SNAT ports stay (the internet server sees each connection from one port to
//! its end), and later each is reset on idle with both ends seeing ECONNRESET. While no xlbd
//! runs, XDP stays attached and holds the frames: the appliance's kernel, which has the VIP
//! and the SNAT address, would otherwise answer them with RSTs.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use common::*;

/// The lab's rules with a 10-minute idle timeout (10 s at lab time scale 60: longer than any
/// restart), reset on idle on the load-balancing and the outbound rule.
const CONFIG: &str = lab_config!(
    snat,
    r#"
[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 10
tcp_reset = true

[[outbound_rules]]
name = "web-out"
frontends = ["snat"]
backend_pool = "web"
protocol = "ALL"
idle_timeout_minutes = 10
tcp_reset = true
"#
);

const INTERNET_ECHO: u16 = 7070;
const CONNS_PER_RULE: usize = 3;
/// Interval of the paced traffic.
const PACE: Duration = Duration::from_millis(20);

/// A private bpffs for the lab's state directory, unmounted (after `xlbd --cleanup`) on drop.
struct StateFs {
    mount: PathBuf,
}

impl StateFs {
    fn new(prefix: &str) -> StateFs {
        let mount = std::env::temp_dir().join(format!("{prefix}-bpffs"));
        std::fs::create_dir_all(&mount).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mount)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a bpffs on {}", mount.display());
        StateFs { mount }
    }

    fn dir(&self) -> String {
        self.mount.join("xlb").display().to_string()
    }
}

impl Drop for StateFs {
    fn drop(&mut self) {
        let _ = Command::new(xlbd_bin())
            .args(["--cleanup", "--state-dir", &self.dir()])
            .status();
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}

/// One connection's paced traffic: 16 bytes out, their echo back, every `PACE`, until told to
/// stop; then it waits for the reset on idle.
struct Paced {
    stop: Arc<AtomicBool>,
    join: JoinHandle<PacedResult>,
}

#[derive(Debug)]
struct PacedResult {
    rounds: u64,
    rounds_after_mark: u64,
    longest_gap: Duration,
    /// How the connection ended once the traffic stopped.
    end: std::io::Result<usize>,
    /// The error that cut the traffic short, if any.
    failed: Option<String>,
}

impl Paced {
    fn start(ns: &str, to: SocketAddr, mark: Arc<AtomicBool>) -> Paced {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let join = spawn_in_ns(ns, move || {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
            c.set_nodelay(true).unwrap();
            // Longer than any restart, shorter than the idle timeout.
            c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            let mut r = PacedResult {
                rounds: 0,
                rounds_after_mark: 0,
                longest_gap: Duration::ZERO,
                end: Ok(0),
                failed: None,
            };
            let mut last = Instant::now();
            let end = Instant::now() + Duration::from_secs(60);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                let msg = r.rounds.to_be_bytes().repeat(2);
                let mut back = [0u8; 16];
                if let Err(e) = c.write_all(&msg).and_then(|()| c.read_exact(&mut back)) {
                    r.failed = Some(e.to_string());
                    return r;
                }
                if back[..] != msg[..] {
                    r.failed = Some("echo differs".into());
                    return r;
                }
                r.rounds += 1;
                if mark.load(Ordering::Relaxed) {
                    r.rounds_after_mark += 1;
                }
                r.longest_gap = r.longest_gap.max(last.elapsed());
                last = Instant::now();
                thread::sleep(PACE);
            }
            // Idle now: the reset on idle comes within the 10 s timeout (+ a tick).
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = [0u8; 16];
            r.end = c.read(&mut buf);
            r
        });
        Paced { stop, join }
    }

    fn finish(self) -> PacedResult {
        self.stop.store(true, Ordering::Relaxed);
        self.join.join().expect("paced connection thread")
    }
}

/// RSTs the appliance's own TCP stack sent.
fn kernel_rsts(lab: &Lab) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.xlb, "nstat", "-az", "TcpOutRsts"])
        .output()
        .expect("nstat");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("TcpOutRsts"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("nstat prints TcpOutRsts")
}

enum Restart {
    Kill,
    Term,
    Takeover,
}

impl Restart {
    /// The crash runs two workers: their flows must come back to the worker the steering
    /// sends them to.
    fn workers(&self) -> &'static str {
        match self {
            Restart::Kill => "2",
            _ => "1",
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Restart::Kill => "SIGKILL + restart",
            Restart::Term => "SIGTERM + 300 ms + restart",
            Restart::Takeover => "takeover",
        }
    }
}

fn restart_keeps_every_flow(how: Restart) {
    let (lab, _servers, state) = {
        // The state's bpffs outlives the lab (declared first, dropped last).
        let prefix_probe = format!("xr{}", std::process::id() % 100_000);
        let tag = match how {
            Restart::Kill => "kill",
            Restart::Term => "term",
            Restart::Takeover => "takeover",
        };
        let state = StateFs::new(&format!("{prefix_probe}-{tag}"));
        let dir = state.dir();
        let workers = how.workers();
        let (lab, servers) = Lab::start_prepared(
            CONFIG,
            &["--state-dir", &dir, "--workers", workers],
            |lab| lab.start_internet_echo(INTERNET_ECHO),
        );
        (lab, servers, state)
    };
    let mut lab = lab;
    let dir = state.dir();
    assert!(
        lab.log_text().contains("xlbd state worker=0 fresh"),
        "{}",
        lab.log_text()
    );

    let mark = Arc::new(AtomicBool::new(false));
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let internet: SocketAddr = format!("{INTERNET}:{INTERNET_ECHO}").parse().unwrap();
    let mut conns = Vec::new();
    for _ in 0..CONNS_PER_RULE {
        conns.push(("lb", Paced::start(&lab.client, vip, Arc::clone(&mark))));
        conns.push((
            "snat",
            Paced::start(&lab.backend1, internet, Arc::clone(&mark)),
        ));
    }
    thread::sleep(Duration::from_millis(800));

    let old_pid = lab.xlbd_pid().expect("xlbd runs");
    let down = Instant::now();
    let args = ["--state-dir", dir.as_str(), "--workers", how.workers()];
    match how {
        Restart::Kill => {
            // A second xlbd on the same state directory is refused while this one runs.
            let config = lab.api_socket().with_file_name("xlb.toml");
            let mut second = Command::new("ip");
            second
                .args(["netns", "exec", &lab.xlb, xlbd_bin(), "--config"])
                .arg(&config)
                .args(["--api", "none", "--workers", "2", "--state-dir", &dir]);
            for i in &lab.interfaces {
                second.args(["--interface", i]);
            }
            let out = second.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(err.contains("in use by another xlbd"), "{err}");
            xlb_afxdp::sys::signal_process(old_pid, 9).unwrap();
            // Reaps it (the SIGTERM that comes first finds it dead).
            lab.stop_xlbd();
            assert!(
                !lab.xdp_attached().is_empty(),
                "XDP stays attached after a crash"
            );
            lab.start_xlbd(CONFIG, &args);
            assert!(
                lab.log_text().contains("previous=crashed"),
                "{}",
                lab.log_text()
            );
        }
        Restart::Term => {
            // --cleanup does not pull the state from under a running xlbd.
            let out = Command::new(xlbd_bin())
                .args(["--cleanup", "--state-dir", &dir])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{err}");
            assert!(err.contains("in use by another xlbd"), "{err}");
            let st = lab.stop_xlbd().expect("xlbd exit status");
            assert!(st.success(), "{st:?}\n{}", lab.log_text());
            assert_eq!(
                lab.xdp_attached().len(),
                lab.interfaces.len(),
                "XDP stays attached while no xlbd runs"
            );
            // Retransmissions meet the held attachment, not the kernel.
            thread::sleep(Duration::from_millis(300));
            lab.start_xlbd(CONFIG, &args);
            assert!(
                lab.log_text().contains("previous=stopped"),
                "{}",
                lab.log_text()
            );
        }
        Restart::Takeover => {
            let pid = old_pid.to_string();
            let mut with_takeover = args.to_vec();
            with_takeover.extend(["--takeover", pid.as_str()]);
            lab.start_xlbd(CONFIG, &with_takeover);
            assert!(
                lab.log_text()
                    .contains(&format!("xlbd takeover: xlbd {pid} stopped")),
                "{}",
                lab.log_text()
            );
            assert!(
                lab.log_text().contains("previous=stopped"),
                "{}",
                lab.log_text()
            );
        }
    }
    let down = down.elapsed();
    // Every flow and SNAT port restored, over the workers.
    let log = lab.log_text();
    let (mut flows, mut ports) = (0, 0);
    for line in log.lines().filter(|l| l.contains(" restored flows=")) {
        let field = |key: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{key} in {line}"))
        };
        flows += field("flows=");
        ports += field("snat_ports=");
    }
    assert_eq!(
        (flows, ports),
        (2 * CONNS_PER_RULE as u64, CONNS_PER_RULE as u64),
        "{log}"
    );
    // The counters say it too (stats file and Prometheus).
    assert_eq!(
        lab.wait_stat("flows_restored", flows, Duration::from_secs(2)),
        flows
    );
    assert_eq!(lab.stat("flows_restore_dropped"), 0);
    assert!(
        lab.metrics()
            .contains("xlb_worker_flows_restored_total{worker=\"0\"}"),
        "the Prometheus family"
    );
    mark.store(true, Ordering::Relaxed);
    thread::sleep(Duration::from_millis(1500));

    // Every connection goes idle at once.
    for (_, p) in &conns {
        p.stop.store(true, Ordering::Relaxed);
    }
    let results: Vec<(&str, PacedResult)> =
        conns.into_iter().map(|(k, p)| (k, p.finish())).collect();
    let mut longest = Duration::ZERO;
    for (kind, r) in &results {
        assert!(
            r.failed.is_none(),
            "{kind}: traffic cut: {r:?}\n{}",
            lab.log_text()
        );
        assert!(r.rounds_after_mark > 10, "{kind}: {r:?}");
        let reset = matches!(&r.end, Err(e) if e.kind() == ErrorKind::ConnectionReset);
        assert!(reset, "{kind}: reset on idle expected, got {r:?}");
        longest = longest.max(r.longest_gap);
    }
    println!(
        "{}: xlbd replaced in {} ms (from the signal to the new ready line); longest gap a \
         paced stream saw: {} ms",
        how.name(),
        down.as_millis(),
        longest.as_millis()
    );
    // The other ends: every backend and the internet server saw an RST.
    let mut ends = Vec::new();
    while ends.len() < 2 * CONNS_PER_RULE {
        match lab.endings.recv_timeout(Duration::from_secs(5)) {
            Ok(e) => ends.push(e),
            Err(_) => break,
        }
    }
    assert_eq!(ends.len(), 2 * CONNS_PER_RULE, "{ends:?}");
    let mut snat_ports = Vec::new();
    for (name, peer, ending) in &ends {
        assert!(
            matches!(ending, Ending::Reset { .. }),
            "{name} {peer}: {ending:?}"
        );
        if name == "internet" {
            assert_eq!(peer.ip().to_string(), SNAT);
            snat_ports.push(peer.port());
        }
    }
    snat_ports.sort();
    snat_ports.dedup();
    assert_eq!(snat_ports.len(), CONNS_PER_RULE, "{ends:?}");
    assert!(
        lab.wait_stat("rule.lb.web.flows_reset_on_idle", 3, Duration::from_secs(3)) >= 3,
        "{}",
        lab.log_text()
    );
    lab.assert_no_invalid_tcp();
    // The appliance's kernel (which has the VIP and the SNAT address) never saw the flows'
    // frames, during the restart or after: it sent no RST.
    assert_eq!(kernel_rsts(&lab), 0, "{}", lab.log_text());

    // A stop for good: --cleanup detaches XDP and frees the state.
    lab.stop_xlbd();
    assert!(!lab.xdp_attached().is_empty());
    let out = Command::new(xlbd_bin())
        .args(["--cleanup", "--state-dir", &dir])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(lab.xdp_attached().is_empty(), "XDP detached by --cleanup");
    drop(lab);
    drop(state);
}

#[test]
fn flows_survive_sigkill_and_restart() {
    if !need_root("flows_survive_sigkill_and_restart") {
        return;
    }
    restart_keeps_every_flow(Restart::Kill);
}

#[test]
fn flows_survive_sigterm_and_restart() {
    if !need_root("flows_survive_sigterm_and_restart") {
        return;
    }
    restart_keeps_every_flow(Restart::Term);
}

#[test]
fn flows_survive_an_upgrade_takeover() {
    if !need_root("flows_survive_an_upgrade_takeover") {
        return;
    }
    restart_keeps_every_flow(Restart::Takeover);
}
