//! `xlbctl config get | apply | diff` (the binary) against an in-process server: get's output
//! applies back as no change (TOML and JSON), a changed file shows its difference as a table
//! or JSON and applies as one generation, a dry run applies nothing, a refused file changes
//! nothing and says why.

#[path = "../../api/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Harness;

async fn xlbctl(socket: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xlbctl"));
    cmd.arg("--socket").arg(socket).args(args);
    for v in ["XLB_SOCKET", "XLB_ADDR", "XLB_TOKEN", "XLB_TOKEN_FILE"] {
        cmd.env_remove(v);
    }
    // The server runs on this test's runtime: wait for the child off it.
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[tokio::test]
async fn get_applies_back_as_no_change_in_toml_and_json() {
    let h = Harness::start().await;
    let dir = h.dir.path().to_path_buf();
    for (format, args) in [
        ("toml", vec!["config", "get"]),
        ("json", vec!["--json", "config", "get"]),
    ] {
        let got = ok(&xlbctl(&h.socket, &args).await);
        let file = dir.join(format!("running.{format}"));
        std::fs::write(&file, &got).unwrap();
        let out = ok(&xlbctl(&h.socket, &["config", "apply", file.to_str().unwrap()]).await);
        assert_eq!(out.trim(), "no change (generation 1 runs)", "{format}");
    }
    // `xlbctl config` alone is `get`.
    assert!(ok(&xlbctl(&h.socket, &["config"]).await).starts_with("# generation 1\n"));
    assert_eq!(h.publisher.generations(), [1]);
    h.stop().await;
}

#[tokio::test]
async fn a_changed_file_shows_its_difference_and_applies_as_one_generation() {
    let h = Harness::start().await;
    let running = ok(&xlbctl(&h.socket, &["config", "get"]).await);
    let edited = running.replace("weight = 2", "weight = 5")
        + r#"
[[load_balancing_rules]]
name = "api"
frontend = "vip"
protocol = "TCP"
frontend_port = 443
backend_pool = "web"
backend_port = 8443
"#;
    let file = h.dir.path().join("edited.toml");
    std::fs::write(&file, edited).unwrap();
    let file = file.to_str().unwrap();

    let out = ok(&xlbctl(&h.socket, &["config", "diff", file]).await);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["CHANGE", "SECTION", "NAME", "FIELDS"]
    );
    assert!(
        lines[1].starts_with("changed")
            && lines[1].contains("member")
            && lines[1].contains("web/198.18.2.2")
            && lines[1].contains("weight: 2 -> 5"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("added")
            && lines[2].contains("load_balancing_rule")
            && lines[2].contains("frontend_port=443"),
        "{out}"
    );
    assert!(
        out.contains("dry run: nothing applied (1 added, 0 removed, 1 changed; generation 1 runs)"),
        "{out}"
    );
    assert_eq!(h.publisher.generations(), [1]);

    let out = ok(&xlbctl(&h.socket, &["--json", "config", "apply", file]).await);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["applied"], true);
    assert_eq!(v["generation"], 2);
    let changes = v["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[1]["op"], "added");
    assert_eq!(changes[1]["section"], "load_balancing_rule");
    assert_eq!(changes[1]["name"], "api");
    assert_eq!(h.publisher.generations(), [1, 2]);

    // Applied again: nothing left to change.
    let out = ok(&xlbctl(&h.socket, &["config", "apply", file]).await);
    assert_eq!(out.trim(), "no change (generation 2 runs)");
    h.stop().await;
}

#[tokio::test]
async fn a_refused_file_changes_nothing_and_says_why() {
    let h = Harness::start().await;
    let running = ok(&xlbctl(&h.socket, &["config", "get"]).await);
    // A good change and a bad one.
    let bad = running
        .replace("weight = 2", "weight = 3")
        .replace("port = 80\n", "port = 0\n");
    assert_ne!(bad, running);
    let file = h.dir.path().join("bad.toml");
    std::fs::write(&file, bad).unwrap();
    let out = xlbctl(&h.socket, &["config", "apply", file.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("error: health_probes[tcp80].port = 0"),
        "{err}"
    );
    assert_eq!(h.publisher.generations(), [1]);
    assert_eq!(h.state.generation(), 1);
    // Not TOML at all: refused before it is sent.
    std::fs::write(&file, "this is [not toml").unwrap();
    let out = xlbctl(&h.socket, &["config", "apply", file.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("bad.toml"),
        "{}",
        text(&out.stderr)
    );
    h.stop().await;
}
