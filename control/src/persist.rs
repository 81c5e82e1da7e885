//! What outlives xlbd when it runs with `--state-dir` (docs/xlbd.md, "Restarts, upgrades
//! and crashes"): each worker's flow store, a BPF array pinned in the state directory and
//! mapped into the process (`xlb_afxdp::pinned`), which the engine writes every flow into
//! (`xlb_engine::store`); and the XDP attachment, a pinned BPF link (`crate::startup`).
//! A new xlbd attaches both: the flows go on, the program is replaced in place.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use xlb_afxdp::pinned::{self, MappedStore, StoreOrigin};
use xlb_engine::{
    store::{stored_seeds, Geometry},
    Config, EngineConfig, StoreMemory, StoreOutcome, StoreReport,
};

use crate::{
    options::{Failure, Options},
    report,
};

/// A pinned flow store as the engine's memory.
#[derive(Debug)]
pub struct PinnedMemory(MappedStore);

impl StoreMemory for PinnedMemory {
    fn bytes(&self) -> &[u8] {
        self.0.as_slice()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
}

/// One worker's store, opened before its engine exists.
#[derive(Debug)]
pub struct WorkerStore {
    pub mem: Box<dyn StoreMemory>,
    /// The flow hash seed the store was written with (it keys the late-packet memory).
    pub flow_seed: Option<u64>,
}

/// Every worker's store, and the steering seed their flows were placed with.
#[derive(Debug)]
pub struct Stores {
    pub workers: Vec<WorkerStore>,
    pub steer_seed: Option<u64>,
}

/// The engine configuration of worker `w` as far as its store's geometry goes.
fn geometry(opts: &Options, w: usize) -> Geometry {
    Geometry::of(&EngineConfig {
        worker: w as u16,
        workers: opts.workers as u16,
        flow_capacity: opts.flow_capacity,
        ..EngineConfig::default()
    })
}

/// Opens (or creates) the flow store of every worker in `dir`, mounting bpffs if needed.
pub fn open_stores(opts: &Options, dir: &Path) -> Result<Stores, Failure> {
    pinned::prepare_state_dir(dir).map_err(|e| Failure::runtime(format!("--state-dir: {e}")))?;
    let lock =
        pinned::lock_state_dir(dir).map_err(|e| Failure::runtime(format!("--state-dir: {e}")))?;
    // Held until the process exits, whatever way it does.
    std::mem::forget(lock);
    let mut workers = Vec::new();
    let mut steer_seed = None;
    for w in 0..opts.workers {
        let g = geometry(opts, w);
        let path = pinned::store_path(dir, w);
        let (store, origin) = MappedStore::open_or_create(&path, g.bytes())
            .map_err(|e| Failure::runtime(format!("flow store of worker {w}: {e}")))?;
        if let StoreOrigin::Replaced { bytes } = origin {
            report::line(&format!(
                "xlbd state worker={w}: {} held {bytes} bytes, {} needed (another \
                 --flow-capacity): replaced by an empty store",
                path.display(),
                g.bytes()
            ));
        }
        let seeds = stored_seeds(store.as_slice(), g);
        if w == 0 {
            steer_seed = seeds.map(|(steer, _)| steer);
        }
        workers.push(WorkerStore {
            mem: Box::new(PinnedMemory(store)),
            flow_seed: seeds.map(|(_, flow)| flow),
        });
    }
    Ok(Stores {
        workers,
        steer_seed,
    })
}

/// A hash of the configuration, recorded in the stores: a restart with another one is
/// reported (flows then follow their rules by kind and name).
pub fn config_hash(config: &Config) -> u64 {
    let text = format!("{config:?}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `xlbd state worker=W …`: what attaching worker `w`'s store did. `now`: the monotonic
/// clock, for the time since a planned stop.
pub fn report_line(w: usize, r: &StoreReport, now: u64) -> String {
    match &r.outcome {
        StoreOutcome::Fresh => format!("xlbd state worker={w} fresh"),
        StoreOutcome::Discarded(why) => {
            format!("xlbd state worker={w} discarded: {why}; starting without flows")
        }
        StoreOutcome::Restored => {
            let previous = match r.closed_at {
                Some(at) => format!(
                    "stopped {}ms ago",
                    Duration::from_nanos(now.saturating_sub(at)).as_millis()
                ),
                None if r.unclean => "crashed".to_string(),
                None => "unknown".to_string(),
            };
            let mut line = format!(
                "xlbd state worker={w} restored flows={} snat_ports={} late={} previous={previous}",
                r.flows, r.snat_ports, r.late
            );
            for (what, n) in [
                ("torn", r.torn),
                ("invalid", r.invalid),
                ("rule_gone", r.rule_gone),
            ] {
                if n > 0 {
                    line.push_str(&format!(" dropped_{what}={n}"));
                }
            }
            if r.config_changed {
                line.push_str(" config=changed (flows matched to rules by kind and name)");
            }
            line
        }
    }
}

/// `xlbd --cleanup --state-dir DIR`: unpins everything (XDP detached, flows freed).
pub fn cleanup(dir: &Path) -> Result<(), Failure> {
    // Not under a running xlbd's feet: its lock says it runs.
    let _lock = match pinned::lock_state_dir(dir) {
        Ok(lock) => Some(lock),
        Err(_) if !dir.exists() => None,
        Err(e) => return Err(Failure::runtime(format!("--cleanup: {e}"))),
    };
    let removed =
        pinned::remove_state(dir).map_err(|e| Failure::runtime(format!("--cleanup: {e}")))?;
    report::line(&format!(
        "xlbd cleanup: removed {} from {} ({})",
        removed.len(),
        dir.display(),
        if removed.is_empty() {
            "nothing was pinned".to_string()
        } else {
            removed.join(",")
        }
    ));
    Ok(())
}

/// `--takeover PID`: asks the running xlbd to stop (SIGTERM: it closes its flow stores and
/// leaves XDP attached, holding frames) and waits until it is gone. Returns when it asked.
pub fn take_over(pid: u32) -> Result<Instant, Failure> {
    // Never signal a process that is not an xlbd (a mistyped PID).
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_err(|e| Failure::usage(format!("--takeover {pid}: no such process ({e})")))?;
    if !comm.trim().starts_with("xlbd") {
        return Err(Failure::usage(format!(
            "--takeover {pid}: process {pid} is {:?}, not an xlbd",
            comm.trim()
        )));
    }
    let asked = Instant::now();
    xlb_afxdp::sys::signal_process(pid, xlb_afxdp::sys::SIGTERM)
        .map_err(|e| Failure::runtime(format!("--takeover {pid}: {e}")))?;
    let deadline = asked + Duration::from_secs(30);
    while running(pid) {
        if Instant::now() > deadline {
            return Err(Failure::runtime(format!(
                "--takeover {pid}: still running 30 s after SIGTERM"
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(asked)
}

/// Whether process `pid` is alive (a zombie has exited: it holds nothing any more).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
