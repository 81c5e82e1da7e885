//! xlbd's refusals: what the operator must fix gets exit code 2 and a message that says what.
//! None of these attach anything.

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
};

static N: AtomicUsize = AtomicUsize::new(0);

const BIN: &str = env!("CARGO_BIN_EXE_xlbd");

fn xlbd(config: &str, args: &[&str]) -> Output {
    let dir = std::env::temp_dir().join(format!(
        "xlbd-cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("c{}.toml", config.len()));
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .args(args)
        .output()
        .expect("running xlbd");
    let _ = std::fs::remove_dir_all(&dir);
    out
}

const VALID: &str = r#"
[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }]

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
"#;

#[test]
fn invalid_config_is_refused_with_the_engines_errors_and_exit_2() {
    let bad = VALID.replace(
        "backend_port = 8080",
        "backend_port = 8080\nidle_timeout_minutes = 31",
    );
    let out = xlbd(&bad, &["--interface", "lo"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("invalid configuration (1 error)"), "{err}");
    assert!(
        err.contains("load_balancing_rules[web].idle_timeout_minutes = 31"),
        "{err}"
    );
}

#[test]
fn unreadable_config_and_bad_lab_scale_exit_2() {
    let out = xlbd("this is = = not toml", &["--interface", "lo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the configuration"));

    let out = xlbd(VALID, &["--interface", "lo", "--lab-time-scale", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--lab-time-scale 0") && err.contains("lab_time_scale"),
        "{err}"
    );
}

/// A namespace of the test's own (a veth pair with 1 queue in it), deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn unknown_interface_and_too_many_workers_are_refused_before_anything_is_attached() {
    if !xlb_afxdp::sys::is_root() {
        eprintln!("SKIP: needs root (the checks run after the privilege check; a namespace)");
        return;
    }
    let out = xlbd(VALID, &["--interface", "xlb-no-such-if0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown interface \"xlb-no-such-if0\""),
        "{err}"
    );

    let out = xlbd(VALID, &["--interface", "lo"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("lo has no Ethernet address"), "{err}");

    let ns = Netns(format!("xc{}", std::process::id()));
    for args in [
        &["netns", "add", &ns.0][..],
        &[
            "-n",
            &ns.0,
            "link",
            "add",
            "d0",
            "numtxqueues",
            "1",
            "numrxqueues",
            "1",
            "type",
            "veth",
            "peer",
            "name",
            "d1",
        ],
    ] {
        assert!(Command::new("ip").args(args).status().unwrap().success());
    }
    let dir = std::env::temp_dir().join(format!("{}-cfg", ns.0));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("xlb.toml");
    std::fs::write(&cfg, VALID).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, BIN, "--config"])
        .arg(&cfg)
        .args(["--interface", "d0", "--workers", "2"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--workers 2: more workers than queues (1)"),
        "{err}"
    );
}

#[test]
fn api_on_tcp_without_authentication_or_off_loopback_in_clear_is_refused_at_start() {
    if !xlb_afxdp::sys::is_root() {
        eprintln!("SKIP: needs root (the API is bound after the privilege check)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("xlbd-cli-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let token = token.to_str().unwrap();
    let refused = |args: &[&str], says: &[&str]| {
        let out = xlbd(VALID, args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for s in says {
            assert!(err.contains(s), "{args:?}: {err}");
        }
    };
    refused(
        &["--interface", "lo", "--api", "tcp:127.0.0.1:0"],
        &["without authentication", "--api-insecure"],
    );
    refused(
        &[
            "--interface",
            "lo",
            "--api",
            "tcp:198.18.0.1:50051",
            "--api-token-file",
            token,
        ],
        &["without TLS", "--api-tls-cert"],
    );
    refused(
        &[
            "--interface",
            "lo",
            "--api",
            "tcp:127.0.0.1:0",
            "--api-token-file",
            token,
            "--api-tls-cert",
            "/nonexistent/xlb/api.pem",
            "--api-tls-key",
            "/nonexistent/xlb/api.key",
        ],
        &["/nonexistent/xlb/api.pem"],
    );
    // The key without the certificate is a usage error of its own.
    refused(
        &["--interface", "lo", "--api-tls-key", token],
        &["--api-tls-cert"],
    );
    // Accepted with a token, or insecure: the start goes on to the interfaces (lo cannot be
    // driven: the next refusal).
    for extra in [&["--api-token-file", token][..], &["--api-insecure"][..]] {
        let mut args = vec!["--interface", "lo", "--api", "tcp:127.0.0.1:0"];
        args.extend_from_slice(extra);
        refused(&args, &["lo has no Ethernet address"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn numeric_options_out_of_range_are_refused_with_flag_value_and_range() {
    for (args, want) in [
        (
            &["--flow-capacity", "4294967295"][..],
            "--flow-capacity 4294967295: out of range (allowed: 16–8388607 flows per worker)",
        ),
        (
            &["--flow-capacity", "0"][..],
            "--flow-capacity 0: out of range",
        ),
        (
            &["--status-interval", "1e300"][..],
            "--status-interval 1e300: out of range",
        ),
        (
            &["--status-interval", "0"][..],
            "--status-interval 0: out of range",
        ),
        (
            &["--max-runtime", "1e19"][..],
            "--max-runtime 1e19: out of range",
        ),
        (
            &["--self-probe-interval", "inf"][..],
            "--self-probe-interval inf: out of range",
        ),
        (
            &["--workers", "1000"][..],
            "--workers 1000: out of range (allowed: 1–64 workers)",
        ),
        (&["--queues", "65"][..], "--queues 65: out of range"),
        (&["--cores", "100000"][..], "--cores 100000: no such core"),
    ] {
        let mut all = vec!["--interface", "lo", "--api", "none"];
        all.extend_from_slice(args);
        let out = xlbd(VALID, &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bad_vlan_options_name_the_value_and_the_range() {
    for (arg, says) in [
        ("lo:0", "VLAN id 0 out of range (allowed: 1–4094)"),
        ("lo:4095", "VLAN id 4095 out of range (allowed: 1–4094)"),
        ("lo", "no ':' between interface and VLAN ids"),
        ("lo:10,x", "VLAN id \"x\" is not a number"),
    ] {
        let out = xlbd(VALID, &["--interface", "lo", "--vlan", arg]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{arg}: {err}");
        assert!(err.contains(says) && err.contains("--vlan"), "{arg}: {err}");
    }
}
