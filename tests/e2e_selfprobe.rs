//! End to end, the data-path self-probe (`control/src/selfprobe.rs`): with xlb healthy every
//! probe is answered (100 %), and while one of two workers is stalled the probes it owns are
//! not, so the availability drops; it answers again once the worker runs. The stall is real:
//! the test stops the worker's thread (and only it) with ptrace, as a long page fault, a
//! preempted core or a bug would. Run as root; otherwise the test says it is skipped.

mod common;

use std::{
    thread,
    time::{Duration, Instant},
};

use common::ops::connect;
use common::stall::{stall, thread_id};
use common::*;
use xlb_api::server::Client;
use xlb_proto::v1 as pb;

/// An address no host of the lab has; the backends route it to the appliance (their default
/// route), like a client's.
const PROBE_SOURCE: &str = "198.18.0.250";

/// (rule, availability, window, answered, failed) per probed rule.
fn datapath(rt: &tokio::runtime::Runtime, c: &mut Client) -> Vec<(String, f64, u32, u64, u64)> {
    rt.block_on(c.get_status(pb::GetStatusRequest {}))
        .expect("status")
        .into_inner()
        .datapath
        .into_iter()
        .map(|d| {
            assert_eq!(d.frontend, "vip");
            (d.rule, d.availability, d.window, d.answered, d.failed)
        })
        .collect()
}

#[test]
fn self_probe_reports_full_availability_and_less_while_a_worker_is_stalled() {
    if !need_root("self_probe_reports_full_availability_and_less_while_a_worker_is_stalled") {
        return;
    }
    let lab = Lab::start_with(
        CONFIG,
        &[
            "--workers",
            "2",
            "--queues",
            "2",
            "--self-probe-source",
            PROBE_SOURCE,
        ],
    );
    assert!(
        lab.log_text().contains("self_probe=198.18.0.250/83ms"),
        "{}",
        lab.log_text()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = rt.block_on(connect(&lab));

    // A 5 s interval at scale 60 is 83 ms: ~18 probes per rule in 1.5 s, over both workers.
    thread::sleep(Duration::from_millis(1500));
    let healthy = datapath(&rt, &mut c);
    let rules: Vec<&str> = healthy.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(rules, ["web", "web-silent"], "the TCP rules; not `dns`");
    for (rule, ratio, window, answered, failed) in &healthy {
        assert_eq!(*ratio, 1.0, "{rule}: {healthy:?}");
        assert!(
            *window >= 8 && *answered >= 8 && *failed == 0,
            "{healthy:?}"
        );
    }
    let m = lab.metrics();
    assert!(
        m.lines()
            .any(|l| l == "xlb_datapath_availability_ratio{frontend=\"vip\",rule=\"web\"} 1"),
        "{m}"
    );
    // Probe flows are real flows through the rule, counted; the RST after each answer leaves
    // no half-open connection on the members (without it, each probe would sit in SYN_RECV
    // for about a minute of SYN-ACK retransmissions).
    assert!(lab.stat("rule.lb.web.flows_created") >= 8);
    for ns in [lab.backend1.clone(), lab.backend2.clone()] {
        // The echo servers listen on `::` (IPv4 clients included): their sockets are in tcp6.
        let syn_recv = in_ns(&ns, || {
            ["tcp", "tcp6"]
                .iter()
                .map(|f| {
                    std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                        .unwrap()
                        .lines()
                        .skip(1)
                        .filter(|l| l.split_whitespace().nth(3) == Some("03"))
                        .count()
                })
                .sum::<usize>()
        });
        assert!(syn_recv <= 2, "{ns}: {syn_recv} connections in SYN_RECV");
    }

    // Stall worker 1 for 1.5 s: the probes it owns go unanswered.
    let tid = thread_id(lab.xlbd_pid().unwrap(), "xlb-worker-1");
    let before: u64 = healthy.iter().map(|d| d.4).sum();
    stall(tid, Duration::from_millis(1500));
    let stalled = datapath(&rt, &mut c);
    let failed: u64 = stalled.iter().map(|d| d.4).sum();
    assert!(
        failed > before,
        "probes failed while a worker was stalled: {stalled:?}"
    );
    for (rule, ratio, ..) in &stalled {
        assert!(*ratio < 1.0, "{rule}: {stalled:?}");
        assert!(*ratio > 0.0, "worker 0 kept answering {rule}: {stalled:?}");
    }

    // Running again: probes are answered again (the window still remembers the stall).
    let answered: u64 = stalled.iter().map(|d| d.3).sum();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let now = datapath(&rt, &mut c);
        let (a, f): (u64, u64) = (now.iter().map(|d| d.3).sum(), now.iter().map(|d| d.4).sum());
        // Only answers, and from both workers' probes: at least a dozen more, no new failure
        // after the first ones the stall left in flight.
        if a >= answered + 12 && f <= failed + 4 {
            break;
        }
        assert!(Instant::now() < end, "{now:?} after {stalled:?}");
        thread::sleep(Duration::from_millis(100));
    }
    // Client traffic was never disturbed by the probes.
    let mut s = lab.client_connect(80);
    assert_eq!(echo(&mut s, b"hello\n"), b"hello\n");
}
