//! The messages that cross between a worker and the control thread, over bounded channels
//! (crossbeam's; a full channel drops the message, never blocks the worker). Counters do not
//! travel here: workers publish them into their cell (`crate::plane::cell`).

use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};
use xlb_api::FlowFilter;
use xlb_engine::{flow::FlowId, Addr, Event, FlowInfo, PortId, RuleSet};

use crate::plane::cell::CellWriter;

/// Control thread → worker. (The kernel's neighbours and routes take the mailbox instead:
/// `EngineHandler::with_kernel`.)
#[derive(Debug, Clone)]
pub enum ToWorker {
    /// A new rule set, swapped at the next batch boundary and acknowledged with an [`Ack`];
    /// with the ports that face its members (when the daemon follows them), set in the same
    /// swap, so that the anti-spoofing checks and the rules never disagree.
    Rules(Arc<RuleSet>, Option<BackendSide>),
    /// The ports that face the members changed with no new rule set (the kernel's routes
    /// moved): set at the next batch boundary.
    BackendSide(BackendSide),
    /// A page of this worker's flows, for the flow listing of the API.
    Flows(FlowQuery),
    /// A data-path self-probe to run through the engine (`crate::selfprobe`).
    Probe(crate::selfprobe::Injection),
    /// The cluster's announcing nodes changed: flows with no packet until `settle` from now
    /// may have moved to another node (`Engine::cluster_changed`).
    ClusterChanged { settle: std::time::Duration },
}

/// Per port, by id: whether it faces the pool members. The engine takes outbound (SNAT) flows
/// only from such ports (`NextHops::set_backend_side`).
pub type BackendSide = Arc<[(PortId, bool)]>;

/// "Worker `worker` now runs generation `generation`": sent right after the swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub worker: usize,
    pub generation: u64,
}

/// Flow-table slots one flow query walks at most. The filter may match few of the flows it
/// passes, so a page may come back short (with a cursor to go on from): this bounds the time a
/// query keeps a worker from its packets to about 16 k filter checks and 256 bitmap words,
/// whatever the table's size.
pub const QUERY_SLOTS: FlowId = 16_384;

/// Up to `limit` flows matching `filter` whose id (flow-table slot) is above `after`, in
/// flow-id order, from at most [`QUERY_SLOTS`] slots.
#[derive(Debug, Clone)]
pub struct FlowQuery {
    pub filter: FlowFilter,
    pub after: Option<FlowId>,
    pub limit: usize,
    pub reply: Sender<FlowAnswer>,
}

impl FlowQuery {
    /// The slots this query walks in a table of `capacity` flows.
    pub fn slots(&self, capacity: FlowId) -> std::ops::Range<FlowId> {
        let start = self.after.map_or(0, |a| a.saturating_add(1)).min(capacity);
        start..start.saturating_add(QUERY_SLOTS).min(capacity)
    }

    /// The answer from `flows`, the live flows of [`slots`](Self::slots) in slot order.
    pub fn answer(
        &self,
        worker: usize,
        flows: impl Iterator<Item = FlowInfo>,
        capacity: FlowId,
        now: u64,
    ) -> FlowAnswer {
        let slots = self.slots(capacity);
        let mut page: Vec<FlowInfo> = Vec::with_capacity(self.limit.min(1024));
        let mut more = None;
        let mut full = false;
        for f in flows.filter(|f| self.filter.matches(f)) {
            if page.len() >= self.limit {
                // One more match than the page holds: go on after the page's last flow.
                more = page.last().map(|p| p.id).or(self.after);
                full = true;
                break;
            }
            page.push(f);
        }
        if !full && slots.end < capacity {
            // The walk stopped at its bound, not at the end of the table.
            more = Some(slots.end - 1);
        }
        FlowAnswer {
            worker,
            flows: page,
            more,
            now,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FlowAnswer {
    pub worker: usize,
    pub flows: Vec<FlowInfo>,
    /// This worker has more flows for the query after this slot (the page is full, or the
    /// walk reached [`QUERY_SLOTS`]); `None`: it has no more.
    pub more: Option<FlowId>,
    /// The worker's clock when it answered, to turn `last_seen` / `deadline` into ages.
    pub now: u64,
}

/// The channels between one worker and the control thread, and its counter cell.
#[derive(Debug)]
pub struct ControlLink {
    pub from_control: Receiver<ToWorker>,
    pub to_control: Sender<FromWorker>,
    pub acks: Sender<Ack>,
    pub counters: CellWriter,
}

/// Worker → control thread.
#[derive(Debug, Clone)]
pub enum FromWorker {
    /// Next hops the engine needed but did not know: the control thread asks the kernel to
    /// resolve them and pushes the result back.
    Misses(Vec<Addr>),
    Event(usize, Event),
    /// The self-probe from `source`:`port` was answered by a member (`ok`), or its SYN was
    /// dropped by the engine (not `ok`).
    ProbeAnswer {
        source: Addr,
        port: u16,
        ok: bool,
    },
}
