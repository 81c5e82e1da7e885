//! Bytes per flow of the engine's table, everything allocated for the capacity included
//! (flow records, index, timer links, admission links). Printed with `--nocapture`; the bound
//! keeps a change that grows the table from passing unnoticed.

use std::sync::Arc;

use xlb_engine::ruleset::Timers;
use xlb_engine::{Engine, EngineConfig, RuleSet};

fn bytes_per_flow(capacity: u32) -> f64 {
    let cfg = EngineConfig {
        flow_capacity: capacity,
        ..EngineConfig::default()
    };
    let e = Engine::new(cfg, Arc::new(RuleSet::empty(1, Timers::default())), 0);
    e.table_bytes() as f64 / f64::from(capacity)
}

#[test]
fn bytes_per_flow_include_index_and_links_at_any_capacity() {
    for capacity in [1u32 << 16, 1 << 20, 1_250_000] {
        let per_flow = bytes_per_flow(capacity);
        println!("flow capacity {capacity}: {per_flow:.1} bytes per flow");
        // 64 (record, one cache line) + 12 (index: 3 slots of 4 bytes) + 6 (timer links: two
        // 24-bit ids) + 12 (admission links: four 24-bit ids) + bitmaps; no rounding of the
        // index up to a power of two.
        assert!(per_flow < 96.0, "{capacity}: {per_flow}");
    }
}

/// The regions the platform backs with huge pages are the table's memory: disjoint, and
/// together what `table_bytes` counts less the few fixed heads (timer slots, rule lists).
#[test]
fn memory_regions_cover_the_table_without_overlap() {
    let capacity = 1u32 << 16;
    let cfg = EngineConfig {
        flow_capacity: capacity,
        ..EngineConfig::default()
    };
    let e = Engine::new(cfg, Arc::new(RuleSet::empty(1, Timers::default())), 0);
    let mut regions: Vec<(usize, usize, &str)> = e
        .memory_regions()
        .map(|r| (r.start as usize, r.len, r.what))
        .collect();
    let names: Vec<&str> = regions.iter().map(|r| r.2).collect();
    for what in [
        "flow records",
        "flow index",
        "timer links",
        "admission links",
    ] {
        assert!(names.contains(&what), "{what} missing from {names:?}");
    }
    regions.sort();
    for pair in regions.windows(2) {
        assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:?} overlap");
    }
    let total: usize = regions.iter().map(|r| r.1).sum();
    let table = e.table_bytes();
    assert!(
        total <= table && total + 8192 >= table,
        "{total} of {table}"
    );
    let records = regions.iter().find(|r| r.2 == "flow records").unwrap();
    assert_eq!(records.1, 64 * capacity as usize);
}
