//! End to end, the cluster (docs/cluster.md): `scripts/lab-cluster` with the binaries under
//! test — three xlbd nodes behind a router running BIRD with ECMP over BGP sessions (BFD) to
//! each node's own BIRD, a client holding long-lived connections through a node freezing,
//! the node coming back, a fourth node added and a node drained, the nodes syncing their flow
//! states. Every connection must live through all of it — load-balanced ones and outbound ones
//! through the lost node's SNAT address included: the other nodes hold the lost node's flows
//! already (backend, SNAT port, sequence numbers), and one of them announces its SNAT address.
//! Run as root with BIRD 2 installed (scripts/test installs `bird2`); otherwise the test says
//! it is skipped.

mod common;

use std::{path::Path, process::Command};

use common::*;

#[test]
fn cluster_lab_loses_no_connection_on_node_loss_add_and_drain() {
    if !need_root("cluster_lab_loses_no_connection_on_node_loss_add_and_drain") {
        return;
    }
    let xlbd = Path::new(xlbd_bin());
    let xlbctl = xlbd.with_file_name("xlbctl");
    assert!(
        xlbctl.exists(),
        "{} is missing: build it first (cargo build -p xlbctl; `cargo test --workspace` does)",
        xlbctl.display()
    );
    let has_bird = Command::new("sh")
        .args(["-c", "command -v bird && command -v birdc"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_bird,
        "BIRD 2 is missing: apt-get install bird2 (scripts/test does)"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lab-cluster");
    // Bounded: the lab's own waits are bounded, and `timeout` ends it whatever happens.
    let out = Command::new("timeout")
        .args(["-s", "TERM", "-k", "10", "240"])
        .arg(&script)
        .args(["--no-build", "--connections", "40", "--phase-seconds", "3"])
        .args(["--fast-path", if fast_path_on() { "on" } else { "off" }])
        .env("XLBD", xlbd)
        .env("XLBCTL", &xlbctl)
        .output()
        .expect("run scripts/lab-cluster");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "lab-cluster failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("cluster: "))
        .unwrap_or_else(|| panic!("no final line:\n{stdout}\n{stderr}"));
    let field = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    assert_eq!(field(last, "nodes"), 4, "{stdout}");
    // 40 over IPv4, 10 over IPv6.
    assert_eq!(field(last, "connections"), 50, "{stdout}");
    assert_eq!(field(last, "lost_on_node_loss"), 0, "{stdout}");
    assert_eq!(field(last, "lost_on_node_add"), 0, "{stdout}");
    let drain = stdout
        .lines()
        .find(|l| l.contains("phase drain"))
        .unwrap_or_else(|| panic!("no drain phase:\n{stdout}"));
    assert_eq!(field(drain, "lost"), 0, "{stdout}");
    // Outbound connections through per-node SNAT addresses, 10 of them through the node that
    // is lost: none lost either.
    let outbound = stdout
        .lines()
        .find(|l| l.contains("outbound (SNAT"))
        .unwrap_or_else(|| panic!("no outbound line:\n{stdout}"));
    assert_eq!(field(outbound, "connections"), 30, "{stdout}");
    assert_eq!(field(outbound, "lost"), 0, "{stdout}");
    assert!(
        stdout.contains("SNAT 198.18.200.2/32 taken over by node1"),
        "{stdout}"
    );
    // Every node imported its peers' flows, none was lost or refused on the way, and the lag
    // was measured.
    let syncs: Vec<&str> = stdout.lines().filter(|l| l.contains(" sync: ")).collect();
    assert_eq!(syncs.len(), 4, "{stdout}");
    for l in syncs {
        assert!(field(l, "records_imported") > 0, "{l}");
        assert!(field(l, "lag_count") > 0, "{l}");
        assert_eq!(field(l, "records_dropped"), 0, "{l}");
        assert_eq!(field(l, "datagrams_malformed"), 0, "{l}");
    }
    // The same choice on every node, compared through each daemon's API: every connection
    // listed by several nodes (old flow and picked-up flow) goes to one backend.
    let same = stdout
        .lines()
        .find(|l| l.contains("same backend on every node"))
        .unwrap_or_else(|| panic!("no comparison:\n{stdout}"));
    assert!(
        field(same, "nodes") > 0,
        "no connection on two nodes: {same}"
    );
    assert_eq!(field(same, "disagree"), 0, "{stdout}");
    // The frozen node was withdrawn through BFD, and node 4 and the drained node through BGP.
    assert!(stdout.contains("the router dropped node2"), "{stdout}");
    assert!(stdout.contains("node1 withdrawn"), "{stdout}");
}
