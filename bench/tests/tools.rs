//! The benchmark tools that need no root: the RSS simulation's binary, `scripts/bench`'s
//! refusals (before it touches anything) and `scripts/bench-report`'s rendering of recorded
//! runs: ratios with median, min and max, and a verdict only when the whole interval clears
//! the target.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Output},
};

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Records written as JSON lines into a fresh folder named after `tag`; the file's path.
fn records_file(tag: &str, recs: &[String]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xlb-report-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("r.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for r in recs {
        writeln!(f, "{r}").unwrap();
    }
    path
}

/// `scripts/bench-report` on a records file (with `--json` when asked): what it printed.
fn report(path: &std::path::Path, json: bool) -> String {
    let mut cmd = Command::new("python3");
    cmd.arg(script("bench-report"));
    if json {
        cmd.arg("--json");
    }
    let out = cmd.arg(path).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rss_simulation_prints_its_table_and_refuses_bad_input() {
    let out = Command::new(env!("CARGO_BIN_EXE_xlb-rss-sim"))
        .args([
            "--workers",
            "1,4",
            "--flows",
            "500",
            "--frames",
            "4000",
            "--mix",
            "uniform",
        ])
        .output()
        .expect("running xlb-rss-sim");
    assert!(out.status.success(), "{}", text(&out));
    let t = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = t
        .lines()
        .filter(|l| l.starts_with("| 1 ") || l.starts_with("| 4 "))
        .collect();
    assert_eq!(rows.len(), 2, "{t}");
    assert!(
        rows[0].contains("**0.0 %**"),
        "one worker hands nothing off: {t}"
    );
    let json = Command::new(env!("CARGO_BIN_EXE_xlb-rss-sim"))
        .args([
            "--workers",
            "2",
            "--flows",
            "500",
            "--frames",
            "4000",
            "--mix",
            "zipf",
            "--json",
        ])
        .output()
        .unwrap();
    let j = String::from_utf8_lossy(&json.stdout);
    assert!(
        j.contains("\"handed_off_share\":") && j.contains("\"mix\":\"zipf 1\""),
        "{j}"
    );
    for bad in [
        ["--workers", "0"],
        ["--flows", "0"],
        ["--mix", "pareto"],
        ["--frames", "x"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_xlb-rss-sim"))
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad:?}: {}", text(&o));
    }
}

#[test]
fn bench_refuses_bad_options_before_touching_anything() {
    for (args, want) in [
        (vec!["--pairs", "3"], "--pairs: 5..50"),
        (vec!["--duration", "0.1"], "--duration"),
        (vec!["--only", "pairs,warp"], "unknown phases"),
        (vec!["--frobnicate"], "unknown option"),
        (vec!["--scale-workers", "0,2"], "--scale-workers"),
        (vec!["--scale-workers", "two"], "--scale-workers"),
    ] {
        let o = Command::new("python3")
            .arg(script("bench"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
    }
    let o = Command::new("python3")
        .arg(script("bench"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(text(&o).contains("back-to-back pairs"), "{}", text(&o));
}

/// A recorded run with three ratios: one whose whole interval clears its target, one whose
/// whole interval misses it, one that straddles it.
#[test]
fn report_gives_a_verdict_only_when_the_whole_interval_clears_the_target() {
    let mut recs =
        vec![r#"{"kind": "meta", "date": "2026-12-03 12:00 UTC", "machine": "test"}"#.to_string()];
    let ratio = |name: &str, target: f64, values: &[f64]| {
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            out.push(format!(
                r#"{{"kind": "pair", "ratio": "{name}", "i": {i}, "a": "xlb", "b": "peer", "a_value": {}, "b_value": 1000000, "value": {v}, "load1": 0.5}}"#,
                v * 1e6
            ));
        }
        out.push(format!(
            r#"{{"kind": "ratio", "ratio": "{name}", "a": "xlb", "b": "peer", "target": {target}, "values": {values:?}}}"#
        ));
        out
    };
    recs.extend(ratio("clears", 1.3, &[1.4, 1.5, 1.35, 1.6, 1.45]));
    recs.extend(ratio("misses", 3.0, &[2.1, 2.5, 2.9, 2.2, 2.0]));
    recs.extend(ratio("straddles", 0.9, &[0.85, 0.95, 0.92, 0.88, 0.99]));
    let path = records_file("ratios", &recs);
    let md = report(&path, false);
    let row = |name: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap()
            .to_string()
    };
    assert!(
        row("clears").contains("| 5 | **1.45** | 1.35 | 1.60 |"),
        "{md}"
    );
    assert!(
        row("clears").contains("met: the whole interval clears it"),
        "{md}"
    );
    assert!(row("misses").contains("NOT met"), "{md}");
    assert!(row("straddles").contains("not decided"), "{md}");
    let js = report(&path, true);
    for key in [
        "\"name\": \"clears\"",
        "\"runs\": 5",
        "\"median\": 1.45",
        "\"min\": 1.35",
        "\"max\": 1.6",
    ] {
        assert!(js.contains(key), "{key} missing: {js}");
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Recorded runs of the scale phase: one row per (N, path) with the median of its runs, the
/// ratio to the same path's smallest N, and the hand-off share only where the counts agree.
#[test]
fn report_renders_the_scale_phase_per_worker_count() {
    let run = |gens: u32, path: &str, carried: f64, rx: u64, handed: u64| {
        format!(
            r#"{{"kind": "scale", "path": "{path}", "gens": {gens}, "workers": {gens}, "sent": 1000000, "carried_pps": {carried}, "delivered": 0.5, "worker_rx": {rx}, "handed_off": {handed}, "load1": 0.5}}"#
        )
    };
    let recs = [
        r#"{"kind": "meta", "date": "2026-12-04 18:00 UTC", "machine": "test"}"#.to_string(),
        run(1, "xlb", 1.0e6, 1000, 0),
        run(1, "xlb", 3.0e6, 1000, 0),
        run(1, "xlb", 2.0e6, 1000, 0),
        run(4, "xlb", 5.0e6, 4000, 2000),
        run(4, "xlb-fast", 9.0e6, 10, 500),
    ];
    let path = records_file("scale", &recs);
    let md = report(&path, false);
    let row = |start: &str| {
        md.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no row {start}: {md}"))
            .to_string()
    };
    let one = row("| 1 | xlb (");
    assert!(one.contains("**2.000** (3) | 1.00 |"), "{one}");
    assert!(one.contains("3 000 (0 %)"), "{one}");
    let four = row("| 4 | xlb (");
    assert!(four.contains("**5.000** (1) | 2.50 |"), "{four}");
    assert!(four.contains("4 000 (50 %)"), "{four}");
    // More hand-offs than frames counted: counters read at different moments, no share.
    let fast = row("| 4 | xlb with the XDP fast path");
    assert!(fast.contains("| 10 |"), "{fast}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
