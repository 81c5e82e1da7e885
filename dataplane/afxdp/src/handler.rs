//! The interface between the worker loop and whatever decides what happens to a frame.
//!
//! Shaped like the pure engine's API (`xlb-engine`) so that an adapter is a few lines:
//! frames in, a verdict out, `now` passed in, timers driven by the caller.

/// Index of an interface in the worker's port list (`WorkerConfig::interfaces`).
pub type PortId = u16;

/// What to do with one received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the first `len` bytes of the (possibly rewritten) frame on `port`.
    /// `len` may be shorter than the received frame; longer only up to the buffer a
    /// [`FrameHandler::handle_in`] call was given.
    Tx {
        port: PortId,
        len: u16,
    },
    Drop,
}

/// Packet processing driven by a worker.
pub trait FrameHandler {
    /// Decides the fate of one frame received on `ingress`, rewriting it in place.
    fn handle(&mut self, now_ns: u64, ingress: PortId, frame: &mut [u8]) -> Verdict;

    /// What the worker calls: the frame is `buf[..len]`, and the rest of `buf` (the UMEM
    /// frame's free room) is the handler's to grow the frame into, e.g. with a VLAN tag, so
    /// `Verdict::Tx` may name up to `buf.len()` bytes. The default hands `buf[..len]` to
    /// [`handle`](Self::handle).
    #[inline]
    fn handle_in(&mut self, now_ns: u64, ingress: PortId, buf: &mut [u8], len: usize) -> Verdict {
        let len = len.min(buf.len());
        self.handle(now_ns, ingress, &mut buf[..len])
    }

    /// The earliest time `expire` has work, if any. Bounds how long a worker in wakeup
    /// mode sleeps.
    fn next_deadline(&self) -> Option<u64>;

    /// Runs at most `budget` units of timer work due at `now_ns`; may emit frames (e.g.
    /// TCP RSTs) through `emit`. Returns the units done: `budget` means "call me again".
    fn expire(&mut self, now_ns: u64, budget: usize, emit: &mut dyn FnMut(PortId, &[u8])) -> usize;

    /// Called once per loop iteration, before the receive batch: where the daemon's
    /// handler drains a bounded number of control messages (new rule sets) from its bounded
    /// channel. The default does nothing.
    fn poll_control(&mut self, _now_ns: u64) {}

    /// Called at the end of a loop iteration that did work (received frames or ran timers),
    /// with the `now_ns` the iteration started with: where a handler measures how long its
    /// frames waited in the worker. Not called for idle iterations. The default does nothing.
    fn end_of_iteration(&mut self, _started_ns: u64) {}

    /// How many look-ahead passes the worker makes over each receive batch before handling
    /// it, calling `prefetch(stage, ..)` for every frame of the batch, stage by stage
    /// (0: none, the default). Asked once per batch, so a handler can turn it on only when
    /// its tables outgrow the caches.
    fn prefetch_stages(&self) -> u8 {
        0
    }

    /// Look-ahead pass `stage` over the frame at position `at` of the batch about to be
    /// handled: where a handler starts the memory loads `handle` will need (see
    /// [`crate::sys::prefetch`]), and may keep what it read of the frame for
    /// [`handle_looked_ahead`](Self::handle_looked_ahead) (by `at`). Must not change state
    /// `handle` depends on. The default does nothing.
    fn prefetch(&mut self, _stage: u8, _at: usize, _ingress: PortId, _frame: &[u8]) {}

    /// What the worker calls instead of [`handle_in`](Self::handle_in) for the frame at
    /// position `at` of a batch the look-ahead passed over, so that a handler can use what
    /// its [`prefetch`](Self::prefetch) read of that frame (it must not rely on it: a frame
    /// that changed, or another frame at `at`, is handled as any other). The default calls
    /// `handle_in`.
    #[inline]
    fn handle_looked_ahead(
        &mut self,
        now_ns: u64,
        ingress: PortId,
        buf: &mut [u8],
        len: usize,
        _at: usize,
    ) -> Verdict {
        self.handle_in(now_ns, ingress, buf, len)
    }
}

impl<T: FrameHandler + ?Sized> FrameHandler for Box<T> {
    fn handle(&mut self, now_ns: u64, ingress: PortId, frame: &mut [u8]) -> Verdict {
        (**self).handle(now_ns, ingress, frame)
    }

    fn handle_in(&mut self, now_ns: u64, ingress: PortId, buf: &mut [u8], len: usize) -> Verdict {
        (**self).handle_in(now_ns, ingress, buf, len)
    }

    fn next_deadline(&self) -> Option<u64> {
        (**self).next_deadline()
    }

    fn expire(&mut self, now_ns: u64, budget: usize, emit: &mut dyn FnMut(PortId, &[u8])) -> usize {
        (**self).expire(now_ns, budget, emit)
    }

    fn poll_control(&mut self, now_ns: u64) {
        (**self).poll_control(now_ns)
    }

    fn end_of_iteration(&mut self, started_ns: u64) {
        (**self).end_of_iteration(started_ns)
    }

    fn prefetch_stages(&self) -> u8 {
        (**self).prefetch_stages()
    }

    fn prefetch(&mut self, stage: u8, at: usize, ingress: PortId, frame: &[u8]) {
        (**self).prefetch(stage, at, ingress, frame)
    }

    fn handle_looked_ahead(
        &mut self,
        now_ns: u64,
        ingress: PortId,
        buf: &mut [u8],
        len: usize,
        at: usize,
    ) -> Verdict {
        (**self).handle_looked_ahead(now_ns, ingress, buf, len, at)
    }
}
