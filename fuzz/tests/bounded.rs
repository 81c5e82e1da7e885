//! The bounded fuzz run of the test suite: every target replays its seed corpus (the files in
//! `fuzz/corpus/<target>` and the seeds the harness generates), then runs a fixed number of
//! seeded mutations of it. Deterministic: a failure reproduces, and the failing input is
//! written to `target/fuzz-failures/` for `scripts/fuzz --replay`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use xlb_fuzz::mutate::{mutate, Rng};
use xlb_fuzz::seeds::seeds;
use xlb_fuzz::targets::ALL;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let mut inputs: Vec<Vec<u8>> = seeds(name).into_iter().map(|(_, b)| b).collect();
    let dir = root().join("corpus").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    for f in files {
        inputs.push(std::fs::read(&f).expect("corpus file reads"));
    }
    inputs
}

fn run_one(name: &str, target: fn(&[u8]), input: &[u8], what: &str) {
    if catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
        let dir = root().join("../target/fuzz-failures");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{name}-{what}"));
        let _ = std::fs::write(&path, input);
        panic!(
            "{name}: invariant broken by {what}; input saved to {}",
            path.display()
        );
    }
}

/// Replays the corpus, then `iterations` mutations of it.
fn bounded(name: &str, iterations: usize, max_len: usize) {
    let target = ALL
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .expect("target exists");
    let inputs = corpus(name);
    assert!(
        inputs.len() >= 8,
        "{name}: a corpus of {} inputs",
        inputs.len()
    );
    for (i, input) in inputs.iter().enumerate() {
        run_one(name, target, input, &format!("corpus-{i}"));
    }
    let mut rng = Rng::new(0x5eed ^ name.len() as u64);
    for i in 0..iterations {
        let a = &inputs[rng.below(inputs.len())];
        let b = &inputs[rng.below(inputs.len())];
        let m = mutate(a, b, &mut rng, max_len);
        run_one(name, target, &m, &format!("mutation-{i}"));
    }
}

#[test]
fn wire_parse_bounded() {
    bounded("wire_parse", 20_000, 2048);
}

#[test]
fn engine_session_bounded() {
    bounded("engine_session", 1_500, 4096);
}

#[test]
fn config_toml_bounded() {
    bounded("config_toml", 1_500, 16_384);
}

#[test]
fn api_config_bounded() {
    bounded("api_config", 5_000, 4096);
}

/// The harness checks something: an engine that changed a forwarded segment, or a frame that
/// does not parse the way it reads, must fail its invariants.
#[test]
fn harness_rejects_a_broken_rewrite() {
    use xlb_fuzz::verify;
    let seed = &seeds("wire_parse")[1].1;
    let frame = &seed[1..];
    let mut broken = frame.to_vec();
    // Change the destination port without fixing the checksum: the reader must notice.
    let l4 = 14 + 20;
    broken[l4 + 3] ^= 1;
    assert!(verify::read(frame).expect("reads").checksums_ok());
    assert!(!verify::read(&broken).expect("reads").checksums_ok());
}

/// The engine seeds reach what they are named for: established connections reset on idle
/// with exactly checked numbers, a full table, exhausted SNAT ports, the `reset` policy's
/// answers, picked-up flows, quiet periods that empty the table.
#[test]
fn engine_seeds_exercise_every_path() {
    use xlb_fuzz::targets::engine_session::{run_with_stats, Stats};
    let mut total = Stats::default();
    for (name, input) in seeds("engine_session") {
        let s = run_with_stats(&input);
        assert!(s.packets > 0, "{name} sends nothing");
        total.transmitted += s.transmitted;
        total.idle_rsts += s.idle_rsts;
        total.exact_rsts += s.exact_rsts;
        total.flow_table_full += s.flow_table_full;
        total.snat_exhausted += s.snat_exhausted;
        total.reset_policy_answers += s.reset_policy_answers;
        total.picked_up += s.picked_up;
        total.quiet_periods += s.quiet_periods;
    }
    eprintln!("{total:?}");
    assert!(total.transmitted > 50);
    assert!(total.exact_rsts >= 4, "{total:?}");
    assert!(total.idle_rsts >= total.exact_rsts, "{total:?}");
    assert!(total.flow_table_full > 0, "{total:?}");
    assert!(total.snat_exhausted > 0, "{total:?}");
    assert!(total.reset_policy_answers > 0, "{total:?}");
    assert!(total.picked_up > 0, "{total:?}");
    assert!(total.quiet_periods >= 2, "{total:?}");
}

/// The cached rule-set variants the engine target swaps between carry the same rules a reload
/// from any other variant would give. (Their ids may differ: a reload keeps a deleted rule's id
/// retired while its flows may run, so a new rule takes another id. The engine is robust to
/// either; the harness swaps cached sets for speed.)
#[test]
fn cached_variants_match_chained_reloads() {
    use xlb_fuzz::lab;
    let ids = |rs: &xlb_engine::RuleSet| {
        let mut v: Vec<String> = rs.rules().map(|(_, p)| p.name.to_string()).collect();
        v.sort();
        v
    };
    for from in 0..lab::VARIANTS {
        for to in 0..lab::VARIANTS {
            let chained = lab::compile_variant(to, &lab::variant(from), 9);
            assert_eq!(ids(&chained), ids(&lab::variant(to)), "{from} -> {to}");
        }
    }
}
