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
        // 96 (record) + 24 (index: 3 slots of 8 bytes) + 8 (timer links) + 16 (admission
        // links) + bitmaps; no rounding of the index up to a power of two.
        assert!(per_flow < 145.0, "{capacity}: {per_flow}");
    }
}
