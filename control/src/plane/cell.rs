//! Per-worker counter cells: a worker publishes its counters into preallocated storage that
//! the control side reads, with no channel, no lock and, once the storage has grown to the
//! counters' size, no allocation on the worker (a triple buffer: the worker copies into the
//! back buffer with `clone_from` and swaps it in; a reader always sees the latest complete
//! copy).

use hdrhistogram::Histogram;
use triple_buffer::{triple_buffer, Input, Output};
use xlb_api::{SnatUsage, WorkerCounters};
use xlb_engine::drain::DrainProgress;

/// Busy loop iterations, in nanoseconds: 1 ns to 10 s at 2 significant digits (about 20 KiB,
/// allocated once; recording never allocates).
pub fn loop_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 2).expect("constant, valid bounds")
}

/// What a worker publishes.
#[derive(Debug, Clone)]
pub struct WorkerSnapshot {
    /// Counters, flows, hand-offs, and the generation they were taken under (0: the worker
    /// has not published yet).
    pub counters: WorkerCounters,
    /// SNAT ports of every (outbound rule, protocol, member): this worker's share and use.
    pub snat: Vec<SnatUsage>,
    /// Duration of the worker's loop iterations that did work (received frames or ran
    /// timers), since start: how long a frame can wait inside the worker.
    pub loop_latency: Histogram<u64>,
    /// What this worker knows of every drain of its rule set (`xlb_engine::drain`).
    pub drains: Vec<DrainProgress>,
    /// NAT events (IPFIX export) this worker lost: its engine's queue or the channel to the
    /// exporter was full.
    pub nat_events_lost: u64,
}

impl WorkerSnapshot {
    /// Nothing published yet by worker `worker`.
    pub fn empty(worker: usize) -> WorkerSnapshot {
        WorkerSnapshot {
            counters: WorkerCounters {
                worker: worker as u16,
                ..WorkerCounters::default()
            },
            snat: Vec::new(),
            loop_latency: loop_histogram(),
            drains: Vec::new(),
            nat_events_lost: 0,
        }
    }

    /// Whether the worker has published.
    pub fn published(&self) -> bool {
        self.counters.generation != 0
    }

    /// Copies `source` into this snapshot's storage (no allocation once it is large enough).
    pub fn copy_from(&mut self, source: &WorkerSnapshot) {
        self.counters.clone_from(&source.counters);
        self.snat.clone_from(&source.snat);
        self.drains.clone_from(&source.drains);
        self.nat_events_lost = source.nat_events_lost;
        self.loop_latency.reset();
        // Same bounds: adding never resizes.
        let _ = self.loop_latency.add(&source.loop_latency);
    }
}

/// The worker's end of its cell.
#[derive(Debug)]
pub struct CellWriter(Input<WorkerSnapshot>);

/// The reading end of a worker's cell.
#[derive(Debug)]
pub struct CellReader(Output<WorkerSnapshot>);

/// A cell for worker `worker`.
pub fn cell(worker: usize) -> (CellWriter, CellReader) {
    let (input, output) = triple_buffer(&WorkerSnapshot::empty(worker));
    (CellWriter(input), CellReader(output))
}

impl CellWriter {
    /// Fills the back buffer with `fill` (which should copy with `clone_from`, `clear` +
    /// `extend` …) and makes it the latest.
    pub fn publish(&mut self, fill: impl FnOnce(&mut WorkerSnapshot)) {
        fill(self.0.input_buffer_mut());
        self.0.publish();
    }
}

impl CellReader {
    /// The latest snapshot the worker published.
    pub fn read(&mut self) -> &WorkerSnapshot {
        self.0.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_sees_the_latest_complete_publication() {
        let (mut w, mut r) = cell(3);
        assert!(!r.read().published());
        for generation in 1..=5u64 {
            w.publish(|s| {
                s.counters.generation = generation;
                s.counters.counters.rx_packets = generation * 10;
            });
        }
        let s = r.read();
        assert_eq!((s.counters.worker, s.counters.generation), (3, 5));
        assert_eq!(s.counters.counters.rx_packets, 50);
    }

    #[test]
    fn copying_keeps_the_storage() {
        let mut src = WorkerSnapshot::empty(0);
        src.counters.counters.rules.resize(8, Default::default());
        src.loop_latency.record(1_000).unwrap();
        let mut dst = WorkerSnapshot::empty(0);
        dst.copy_from(&src);
        let rules = dst.counters.counters.rules.as_ptr();
        src.loop_latency.record(2_000).unwrap();
        dst.copy_from(&src);
        assert_eq!(
            dst.counters.counters.rules.as_ptr(),
            rules,
            "no new allocation"
        );
        assert_eq!(dst.loop_latency.len(), 2);
    }
}
