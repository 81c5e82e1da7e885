//! `scripts/pktgen`, the driver of the kernel's pktgen for hosts that have it. This kernel has
//! none, so what runs here is its `--dry-run` (the exact commands it would write) and
//! its refusals, which come before anything is touched.

use std::path::PathBuf;
use std::process::{Command, Output};

fn pktgen(args: &[&str]) -> Output {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/pktgen");
    Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("running scripts/pktgen")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn dry_run_writes_the_device_setup_and_a_bounded_start() {
    let out = pktgen(&[
        "--dry-run",
        "--dev",
        "eth1",
        "--dst",
        "198.18.1.11",
        "--dst-mac",
        "02:00:00:00:0b:01",
        "--flows",
        "1000",
        "--size",
        "1500",
        "--count",
        "5000",
        "--rate",
        "200000",
        "--thread",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    let want = [
        "write /proc/net/pktgen/kpktgend_3: rem_device_all",
        "write /proc/net/pktgen/kpktgend_3: add_device eth1",
        "write /proc/net/pktgen/eth1: count 5000",
        "write /proc/net/pktgen/eth1: pkt_size 1496",
        "write /proc/net/pktgen/eth1: dst 198.18.1.11",
        "write /proc/net/pktgen/eth1: dst_mac 02:00:00:00:0b:01",
        "write /proc/net/pktgen/eth1: src_min 198.18.0.10",
        "write /proc/net/pktgen/eth1: src_max 198.18.0.10",
        "write /proc/net/pktgen/eth1: udp_src_min 1024",
        "write /proc/net/pktgen/eth1: udp_src_max 2023",
        "write /proc/net/pktgen/eth1: ratep 200000",
    ];
    for w in want {
        assert!(
            lines.iter().any(|l| l == w),
            "{w:?} in\n{}",
            lines.join("\n")
        );
    }
    // The device is set up before the run starts, and the run is stopped at the duration.
    let last = lines.last().unwrap();
    assert!(
        last.contains("pgctrl: start") && last.contains("stopped after 5s"),
        "{last}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("delay 0")),
        "paced, not flat out"
    );
}

#[test]
fn more_flows_than_ports_spread_over_source_addresses() {
    let out = pktgen(&[
        "--dry-run",
        "--dev",
        "eth1",
        "--dst",
        "198.18.1.11",
        "--dst-mac",
        "02:00:00:00:0b:01",
        "--flows",
        "130000",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("src_max 198.18.0.12"), "{s}");
    assert!(s.contains("udp_src_max 61023"), "{s}");
    assert!(s.contains("delay 0"), "flat out without --rate: {s}");
}

#[test]
fn addresses_outside_the_benchmarking_range_and_bad_input_are_refused() {
    let base = [
        "--dry-run",
        "--dev",
        "eth1",
        "--dst-mac",
        "02:00:00:00:0b:01",
    ];
    for (extra, why) in [
        (vec!["--dst", "203.0.113.7"], "outside 198.18.0.0/15"),
        // 198.19.255.255 + 2 source addresses leaves the /15.
        (
            vec![
                "--dst",
                "198.18.1.11",
                "--src",
                "198.19.255.255",
                "--flows",
                "120000",
            ],
            "leave 198.18.0.0/15",
        ),
        (vec!["--dst", "198.18.1.11", "--size", "32"], "--size 32"),
        (
            vec!["--dst", "198.18.1.11", "--duration", "0"],
            "--duration 0",
        ),
        (
            vec!["--dst", "198.18.1.11", "--count", "x"],
            "not a whole number",
        ),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let out = pktgen(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains(why),
            "{why:?} in {}",
            text(&out.stderr)
        );
        assert!(
            out.stdout.is_empty(),
            "nothing written before refusing: {args:?}"
        );
    }
}
