//! The messages that cross between a worker and the control thread, over bounded channels
//! (crossbeam's; a full channel drops the message, never blocks the worker). Counters do not
//! travel here: workers publish them into their cell (`crate::plane::cell`).

use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};
use xlb_api::FlowFilter;
use xlb_engine::{flow::FlowId, Addr, Event, FlowInfo, RuleSet};

use crate::plane::cell::CellWriter;

/// Control thread → worker. (The kernel's neighbours and routes take the mailbox instead:
/// `EngineHandler::with_kernel`.)
#[derive(Debug, Clone)]
pub enum ToWorker {
    /// A new rule set, swapped at the next batch boundary and acknowledged with an [`Ack`].
    Rules(Arc<RuleSet>),
    /// A page of this worker's flows, for the flow listing of the API.
    Flows(FlowQuery),
    /// A data-path self-probe to run through the engine (`crate::selfprobe`).
    Probe(crate::selfprobe::Injection),
}

/// "Worker `worker` now runs generation `generation`": sent right after the swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub worker: usize,
    pub generation: u64,
}

/// Up to `limit` flows matching `filter` whose id is above `after`, in flow-id order.
#[derive(Debug, Clone)]
pub struct FlowQuery {
    pub filter: FlowFilter,
    pub after: Option<FlowId>,
    pub limit: usize,
    pub reply: Sender<FlowAnswer>,
}

#[derive(Debug, Clone)]
pub struct FlowAnswer {
    pub worker: usize,
    pub flows: Vec<FlowInfo>,
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
