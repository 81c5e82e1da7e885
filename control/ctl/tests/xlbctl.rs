//! The `xlbctl` binary against an in-process server.

#[path = "../../api/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Harness;

async fn xlbctl(socket: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--socket", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    xlbctl_env(&all, &[]).await
}

/// Runs xlbctl with `args` and only the `env` of its own variables.
async fn xlbctl_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xlbctl"));
    cmd.args(args);
    for v in [
        "XLB_SOCKET",
        "XLB_ADDR",
        "XLB_TOKEN",
        "XLB_TOKEN_FILE",
        "XLB_TLS_CA",
        "XLB_TLS_CERT",
        "XLB_TLS_KEY",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    // The server runs on this test's runtime: wait for the child off it.
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn create_and_list_with_json() {
    let h = Harness::start().await;
    let out = xlbctl(
        &h.socket,
        &[
            "lb-rule",
            "create",
            "api",
            "--frontend",
            "vip",
            "--protocol",
            "tcp",
            "--frontend-port",
            "443",
            "--pool",
            "web",
            "--backend-port",
            "8443",
            "--idle-timeout",
            "10",
            "--tcp-reset",
            "true",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("created load-balancing rule \"api\""));

    let out = xlbctl(&h.socket, &["--json", "lb-rule", "list"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = v["load_balancing_rules"].as_array().unwrap();
    let api = rules.iter().find(|r| r["name"] == "api").unwrap();
    assert_eq!(api["idle_timeout_minutes"], 10);
    assert_eq!(api["tcp_reset"], true);
    assert_eq!(api["protocol"], "TCP");
    assert_eq!(v["generation"], 2);

    // Table output is aligned: every header column starts where its values do.
    let out = xlbctl(&h.socket, &["frontend", "list"]).await;
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    let col = lines[0].find("ADDRESS").unwrap();
    assert!(
        lines[1..].iter().all(|l| l[col..].starts_with("198.18.")),
        "{table}"
    );

    // Members, update of one field, delete.
    let out = xlbctl(
        &h.socket,
        &[
            "member",
            "set",
            "web",
            "198.18.2.1",
            "--admin-state",
            "down",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = xlbctl(
        &h.socket,
        &["lb-rule", "update", "api", "--idle-timeout", "20"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = xlbctl(&h.socket, &["--json", "lb-rule", "get", "api"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["load_balancing_rules"][0]["idle_timeout_minutes"], 20);
    assert_eq!(
        v["load_balancing_rules"][0]["backend_port"], 8443,
        "other fields kept"
    );
    let out = xlbctl(&h.socket, &["--json", "status"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generation"], 4);
    h.stop().await;
}

#[tokio::test]
async fn validation_error_exits_2_naming_the_field() {
    let h = Harness::start().await;
    let out = xlbctl(
        &h.socket,
        &["lb-rule", "update", "web", "--idle-timeout", "31"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("error: load_balancing_rules[web].idle_timeout_minutes = 31:")
            && err.contains("(allowed: 4–30)"),
        "{err}"
    );
    // Not found is another failure: exit 1.
    let out = xlbctl(&h.socket, &["pool", "get", "nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("NotFound"));
    // Referenced pool: exit 1 naming the rule.
    let out = xlbctl(&h.socket, &["pool", "delete", "web"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("load_balancing_rules[web]"));
    // A daemon that is not there: exit 1.
    let out = xlbctl(&h.dir.path().join("absent.sock"), &["status"]).await;
    assert_eq!(out.status.code(), Some(1));
    h.stop().await;
}

fn sysctls(dir: &Path, time: u32, intvl: u32, probes: u32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tcp_keepalive_time"), format!("{time}\n")).unwrap();
    std::fs::write(dir.join("tcp_keepalive_intvl"), format!("{intvl}\n")).unwrap();
    std::fs::write(dir.join("tcp_keepalive_probes"), format!("{probes}\n")).unwrap();
}

#[tokio::test]
async fn keepalive_check_ok_and_not_ok() {
    let h = Harness::start().await;
    let good = h.dir.path().join("good");
    let linux = h.dir.path().join("linux");
    sysctls(&good, 120, 30, 8);
    sysctls(&linux, 7200, 75, 9);
    // The base rule "web" has the default 4-minute idle timeout.
    let out = xlbctl(
        &h.socket,
        &[
            "keepalive-check",
            "--rule",
            "web",
            "--sysctl-dir",
            good.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("OK:"), "{}", text(&out.stdout));

    let out = xlbctl(
        &h.socket,
        &[
            "keepalive-check",
            "--rule",
            "web",
            "--sysctl-dir",
            linux.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(3));
    let report = text(&out.stdout);
    assert!(report.contains("NOT OK"), "{report}");
    assert!(
        report.contains("sysctl -w net.ipv4.tcp_keepalive_time=120"),
        "{report}"
    );
    assert!(
        report.contains("sysctl -w net.ipv4.tcp_keepalive_intvl=30"),
        "{report}"
    );
    assert!(
        report.contains("sysctl -w net.ipv4.tcp_keepalive_probes=8"),
        "{report}"
    );
    assert!(report.contains("TCP_KEEPIDLE=120"), "{report}");

    let out = xlbctl(
        &h.socket,
        &[
            "keepalive-check",
            "--rule",
            "nope",
            "--sysctl-dir",
            good.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    h.stop().await;
}

#[test]
fn help_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_xlbctl"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = text(&out.stdout);
    for cmd in [
        "frontend",
        "pool",
        "member",
        "lb-rule",
        "nat-rule",
        "outbound-rule",
        "probe",
        "counters",
        "flows",
        "events",
        "status",
        "keepalive-check",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from:\n{help}");
    }
    // Bad arguments are invalid input: exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_xlbctl"))
        .args(["frontend", "create"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn status_shows_workers_data_path_and_member_health() {
    use xlb_api::{DatapathAvailability, RuntimeStatus, WorkerStatus};
    let h = Harness::start().await;
    h.telemetry.set_status(RuntimeStatus {
        workers: vec![WorkerStatus {
            worker: 0,
            interface: "veth0,veth1".into(),
            queue: 0,
            core: Some(1),
            generation: 1,
            flows: 3,
            flow_capacity: 100,
        }],
        poll_mode: "wakeup".into(),
        uptime: std::time::Duration::from_secs(7),
        datapath: vec![DatapathAvailability {
            frontend: "vip".into(),
            rule: "web".into(),
            window: 20,
            window_answered: 19,
            answered_total: 50,
            failed_total: 3,
        }],
        cluster: Some(xlb_api::ClusterStatus {
            node: "node1".into(),
            fit: false,
            unfit_reason: "self-probe: rule web is not answered".into(),
            announcer: "bird:/run/xlb/vips.conf".into(),
            config_fingerprint: "00112233deadbeef".into(),
            peers: vec![xlb_api::ClusterPeer {
                address: "198.18.1.2:7946".into(),
                node: "node2".into(),
                alive: true,
                announcing: true,
                config_fingerprint: "ffff".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        drains: vec![xlb_api::DrainStatus {
            pool: "web".into(),
            member: "198.18.2.1".parse().unwrap(),
            flows_left: Some(3),
            flows_reset: 0,
            flows_ended: 0,
            deadline_done: false,
        }],
        nat_log: None,
    });
    // Drain one member through the CLI, with a deadline; the status then shows it admin down,
    // no new flows, its flows left and its deadline.
    let out = xlbctl(
        &h.socket,
        &[
            "member",
            "set",
            "web",
            "198.18.2.1",
            "--admin-state",
            "down",
            "--drain-timeout",
            "30",
            "--drain-action",
            "idle",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = xlbctl(&h.socket, &["status"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("poll mode wakeup"), "{s}");
    let row = |needle: &str| {
        s.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} in\n{s}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("veth0,veth1"),
        ["0", "veth0,veth1", "0", "1", "1", "3/100"]
    );
    assert_eq!(row("95.0%"), ["vip", "web", "95.0%", "20", "50", "3"]);
    let drained = row("198.18.2.1");
    assert_eq!((drained[3], drained[5]), ("down", "no"), "{s}");
    let drain = drained[6..].join(" ");
    assert!(
        drain.starts_with("3 flows left, idle in 2")
            || drain.starts_with("3 flows left, idle in 3"),
        "{s}"
    );

    let other = row("198.18.2.2");
    assert_eq!((other[2], other[3], other[5]), ("2", "none", "yes"), "{s}");

    assert!(
        s.contains("CLUSTER node node1  UNFIT: self-probe: rule web is not answered"),
        "{s}"
    );
    assert!(s.contains("nothing (withdrawn)"), "{s}");
    assert_eq!(
        row("198.18.1.2:7946"),
        [
            "198.18.1.2:7946",
            "node2",
            "alive",
            "yes",
            "DIFFERS",
            "(ffff)"
        ]
    );
    // Not a cluster node behind this API: drain is refused with the reason.
    let out = xlbctl(&h.socket, &["drain", "on"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a cluster node"),
        "{}",
        text(&out.stderr)
    );

    let out = xlbctl(&h.socket, &["--json", "status"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cluster"]["node"], "node1");
    assert_eq!(v["cluster"]["peers"][0]["same_config"], false);
    let m = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["address"] == "198.18.2.1")
        .unwrap();
    assert_eq!(m["admin_state"], "down");
    assert_eq!(m["eligible"], false);
    assert_eq!(m["draining"], true);
    assert_eq!(m["drain_flows_left"], 3);
    assert_eq!(m["drain_timeout_seconds"], 30);
    assert_eq!(m["drain_action"], "idle");
    assert!(m["drain_deadline_in_ms"].as_i64().unwrap() > 20_000, "{m}");
    assert_eq!(v["datapath"][0]["availability"], 0.95);
    assert_eq!(v["workers"][0]["core"], 1);
}

const TOKEN: &str = "xlbctl-test-token-0123456789";

fn tcp_port(h: &Harness) -> u16 {
    match h.listen {
        xlb_api::Listen::Tcp(a) => a.port(),
        xlb_api::Listen::Unix(_) => unreachable!(),
    }
}

#[tokio::test]
async fn token_comes_from_a_file_or_the_environment_never_the_command_line() {
    let h = Harness::start_with(common::BASE, |o| {
        o.listen = xlb_api::Listen::Tcp("127.0.0.1:0".parse().unwrap());
        o.token = Some(TOKEN.into());
    })
    .await;
    let addr = format!("127.0.0.1:{}", tcp_port(&h));
    let file = h.dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let file = file.to_str().unwrap();

    let out = xlbctl_env(
        &["--addr", &addr, "--token", TOKEN, "frontend", "list"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--token-file"),
        "{}",
        text(&out.stderr)
    );

    for (args, env) in [
        (vec!["--addr", &addr, "--token-file", file], vec![]),
        (vec!["--addr", &addr], vec![("XLB_TOKEN_FILE", file)]),
        (vec!["--addr", &addr], vec![("XLB_TOKEN", TOKEN)]),
        (vec![], vec![("XLB_ADDR", &addr[..]), ("XLB_TOKEN", TOKEN)]),
    ] {
        let mut a = args.clone();
        a.extend(["--json", "frontend", "list"]);
        let out = xlbctl_env(&a, &env).await;
        assert!(out.status.success(), "{a:?} {env:?}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("\"vip\""));
    }

    let out = xlbctl_env(&["--addr", &addr, "frontend", "list"], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Unauthenticated"),
        "{}",
        text(&out.stderr)
    );
    let empty = h.dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let out = xlbctl_env(
        &[
            "--addr",
            &addr,
            "--token-file",
            empty.to_str().unwrap(),
            "frontend",
            "list",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("the file is empty"),
        "{}",
        text(&out.stderr)
    );
    h.stop().await;
}

#[tokio::test]
async fn tls_and_client_certificates() {
    let pki = common::pki::Pki::new();
    let tls = pki.server_tls(true);
    let h = Harness::start_with(common::BASE, |o| {
        o.listen = xlb_api::Listen::Tcp("127.0.0.1:0".parse().unwrap());
        o.tls = Some(tls);
    })
    .await;
    let dir = pki.write(&h.dir.path().join("pki"));
    let f = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let (ca, cert, key) = (f("ca.pem"), f("client.pem"), f("client.key"));
    let port = tcp_port(&h);
    let https = format!("https://localhost:{port}");
    let bare = format!("127.0.0.1:{port}");

    // https:// target, or TLS implied by --tls-ca; the certificate from flags or environment.
    for (args, env) in [
        (
            vec![
                "--addr",
                &https,
                "--tls-ca",
                &ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
            vec![],
        ),
        (
            vec![
                "--addr",
                &bare,
                "--tls-ca",
                &ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
            vec![],
        ),
        (
            vec!["--addr", &https],
            vec![
                ("XLB_TLS_CA", &ca[..]),
                ("XLB_TLS_CERT", &cert[..]),
                ("XLB_TLS_KEY", &key[..]),
            ],
        ),
    ] {
        let mut a = args.clone();
        a.extend(["--json", "frontend", "list"]);
        let out = xlbctl_env(&a, &env).await;
        assert!(out.status.success(), "{a:?}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("\"vip\""));
    }

    // No client certificate, another CA's, a server this client does not trust, plaintext.
    // (TLS 1.3: the server judges the client's certificate after the client finished its
    // handshake; the first call then sees the server's alert or the closed connection.)
    let (rogue_cert, rogue_key) = (f("rogue-client.pem"), f("rogue-client.key"));
    let rogue_ca = f("rogue-ca.pem");
    for (args, says) in [
        (vec!["--addr", &https, "--tls-ca", &ca], "error: "),
        (
            vec![
                "--addr",
                &https,
                "--tls-ca",
                &ca,
                "--tls-cert",
                &rogue_cert,
                "--tls-key",
                &rogue_key,
            ],
            "error: ",
        ),
        (
            vec![
                "--addr",
                &https,
                "--tls-ca",
                &rogue_ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
            "invalid peer certificate",
        ),
        (vec!["--addr", &bare], ""),
    ] {
        let mut a = args.clone();
        a.extend(["frontend", "list"]);
        let out = xlbctl_env(&a, &[]).await;
        assert_eq!(out.status.code(), Some(1), "{a:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains(says),
            "{a:?}: {}",
            text(&out.stderr)
        );
    }

    // Contradictions are usage errors.
    let out = xlbctl_env(
        &[
            "--addr",
            &format!("http://{bare}"),
            "--tls-ca",
            &ca,
            "config",
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = xlbctl_env(&["--tls-ca", &ca, "config"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = xlbctl_env(&["--addr", &https, "--tls-cert", &cert, "config"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    h.stop().await;
}
