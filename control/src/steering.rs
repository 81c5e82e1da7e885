//! Both directions of a flow on one worker: a frame that arrives on a queue of the wrong
//! worker is handed to the worker that owns its flow (`Engine::owner`) over that worker's
//! bounded inbox; the owner processes it at its next loop iteration and transmits the result
//! from its own sockets.

use crossbeam::channel::{Receiver, Sender};
use xlb_afxdp::PortId;

/// A frame on its way to the worker that owns its flow.
#[derive(Debug)]
pub struct Handoff {
    /// The worker that passed it on, which gets the buffer back once the frame is sent.
    pub from: usize,
    pub ingress: PortId,
    pub frame: Vec<u8>,
}

/// The hand-off channels of one worker, the others' indexed by worker id (its own
/// included, unused). Frame buffers travel back to the worker that filled them, so that
/// steady-state hand-offs allocate nothing and the buffers in flight stay bounded by the
/// channels' capacities.
#[derive(Debug)]
pub struct Steering {
    pub inbox: Receiver<Handoff>,
    pub peers: Vec<Sender<Handoff>>,
    /// Buffers this worker filled, coming back.
    pub recycled: Receiver<Vec<u8>>,
    pub returns: Vec<Sender<Vec<u8>>>,
}

impl Steering {
    /// The steering channels of `workers` workers, in worker order.
    pub fn mesh(workers: usize, capacity: usize) -> Vec<Steering> {
        let (inbox_tx, inbox_rx): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| crossbeam::channel::bounded(capacity))
            .unzip();
        let (ret_tx, ret_rx): (Vec<_>, Vec<_>) = (0..workers)
            .map(|_| crossbeam::channel::bounded(capacity))
            .unzip();
        inbox_rx
            .into_iter()
            .zip(ret_rx)
            .map(|(inbox, recycled)| Steering {
                inbox,
                peers: inbox_tx.clone(),
                recycled,
                returns: ret_tx.clone(),
            })
            .collect()
    }
}
