//! The engine's side of the XDP fast path (`crate::fast`): which flows are published, their
//! pairs of lines, and the expiry protocol that keeps reset on idle exact while XDP forwards.

use super::Engine;
use crate::fast::FastTable;
use crate::flow::FlowId;

/// No pair: the flow is not published.
pub(super) const NO_PAIR: u32 = u32::MAX;

/// The published table of one engine and, per flow slot, what the flow has in it.
#[derive(Debug, Clone)]
#[allow(dead_code)] // filled in by the next commits
pub(super) struct FastState {
    pub(super) table: FastTable,
    /// Per flow slot: its pair, or [`NO_PAIR`].
    pub(super) pairs: Vec<u32>,
    /// Per flow slot: `epoch + 1` read when `FAST` was cleared ahead of its idle deadline,
    /// or 0 (no expiry under way).
    pub(super) fences: Vec<u64>,
    /// Flows with a pair.
    pub(super) published: usize,
}

impl Engine {
    /// Takes `table` as this engine's part of the XDP fast path: from now on eligible flows
    /// are published to it. Flows already in the engine (restored from a store) start
    /// unpublished and are published at their next packet.
    pub fn attach_fast(&mut self, table: FastTable) {
        let n = self.flows.capacity() as usize;
        self.fast = Some(Box::new(FastState {
            table,
            pairs: vec![NO_PAIR; n],
            fences: vec![0; n],
            published: 0,
        }));
    }

    /// Whether flow `id` is published (has a pair in the fast table).
    pub fn is_fast_published(&self, id: FlowId) -> bool {
        self.fast
            .as_ref()
            .is_some_and(|f| f.pairs.get(id as usize).is_some_and(|&p| p != NO_PAIR))
    }
}
