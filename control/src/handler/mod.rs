//! The adapter between the AF_XDP worker loop and the pure engine: each worker owns one
//! [`EngineHandler`]. The control thread talks to it through bounded channels
//! (`crate::messages`: rule sets, flow queries and self-probes in; acks, events and
//! neighbour misses out; nothing blocks) and one mailbox: what the kernel knows (neighbours,
//! routes) is the latest [`KernelView`](crate::kernel_watch::KernelView), which the worker
//! takes whenever its version moved, so that no kernel change is ever lost to a full channel.
//! Counters are published into the worker's cell four times a second, without allocating.
//! Frames of flows another worker owns are handed to it (`crate::steering`).

use std::sync::Arc;

use crossbeam::channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use xlb_afxdp::{sys, FrameHandler, PortId, Verdict as AfxdpVerdict};
use xlb_api::SnatUsage;
use xlb_engine::{flow::Flow, natlog::NatEvent, wire, Addr, Engine, Lookahead, Verdict};

use crate::{
    kernel_watch::{self, Applied, KernelMailbox},
    messages::{Ack, ControlLink, FlowAnswer, FlowQuery, FromWorker, ToWorker},
    plane::cell::{loop_histogram, CellWriter},
    selfprobe::{self, Injection},
    steering::{Handoff, Steering},
};

/// Control messages handled per loop iteration: bounds the time a burst of updates can steal
/// from packet processing.
const CONTROL_BUDGET: usize = 16;
/// Handed-off frames processed per loop iteration (a receive batch's worth).
const HANDOFF_BUDGET: usize = 64;
/// Flows from which the worker prefetches flow-table entries a batch ahead. The index is
/// sized by the flow capacity (4 slots a flow), so even 10 000 flows are spread over tens of
/// MB: measured, the look-ahead already pays at 10 000 flows (user time 162–184 → 116–120 ns
/// a frame) and would cost its second parse at 1 000.
const PREFETCH_MIN_FLOWS: usize = 4_096;
/// Frames of a receive batch whose look-ahead reading is kept for their processing (the
/// worker's batch, `WorkerConfig::batch`); a frame further on in a larger batch is read
/// again where needed.
const LOOKAHEAD_FRAMES: usize = 64;

/// [`FrameHandler`] for the engine of one worker.
#[derive(Debug)]
pub struct EngineHandler {
    id: usize,
    engine: Engine,
    from_control: Receiver<ToWorker>,
    to_control: Sender<FromWorker>,
    acks: Sender<Ack>,
    counters: CellWriter,
    loop_latency: Histogram<u64>,
    stats_every_ns: u64,
    next_stats: u64,
    misses: Vec<Addr>,
    steering: Option<Steering>,
    /// Handed-off frames processed and waiting for `expire`, the only place a handler may
    /// transmit frames it did not receive itself.
    outbox: Vec<(PortId, Handoff)>,
    handed_off: u64,
    handoff_dropped: u64,
    /// Self-probe source addresses: frames to them are probe answers, taken off the wire.
    probe_sources: Vec<Addr>,
    /// Where the latest kernel view waits, and what this worker took of it.
    kernel: Option<Arc<KernelMailbox>>,
    kernel_applied: Applied,
    /// The NAT event exporter's input (`crate::ipfix`), when the export is on.
    nat_events: Option<Sender<NatEvent>>,
    /// NAT events the exporter's full channel did not take.
    nat_events_lost: u64,
    /// Told at every publication: this worker's loop runs (the watchdog's liveness).
    heartbeat: Option<crate::liveness::Heartbeat>,
    /// This worker's end of the cluster's flow-state sync, when it is on.
    sync: Option<crate::cluster::sync::WorkerSync>,
    /// What the look-ahead read of each frame of the batch being handled, by position
    /// (`LOOKAHEAD_FRAMES` of them): the first pass reads it, the second and the frame's
    /// processing use it.
    lookahead: Vec<Option<Lookahead>>,
}

impl EngineHandler {
    pub fn new(
        id: usize,
        engine: Engine,
        link: ControlLink,
        stats_every_ns: u64,
        steering: Option<Steering>,
    ) -> Self {
        Self {
            id,
            engine,
            from_control: link.from_control,
            to_control: link.to_control,
            acks: link.acks,
            counters: link.counters,
            loop_latency: loop_histogram(),
            stats_every_ns: stats_every_ns.max(1),
            next_stats: 0,
            misses: Vec::new(),
            steering: steering.filter(|s| s.peers.len() > 1),
            outbox: Vec::new(),
            handed_off: 0,
            handoff_dropped: 0,
            probe_sources: Vec::new(),
            kernel: None,
            kernel_applied: Applied::default(),
            heartbeat: None,
            sync: None,
            nat_events: None,
            nat_events_lost: 0,
            lookahead: vec![None; LOOKAHEAD_FRAMES],
        }
    }

    /// A received frame (`buf[..len]`, room to grow into after it), `hint` what the
    /// look-ahead read of it.
    #[inline]
    fn handle_frame(
        &mut self,
        now_ns: u64,
        ingress: PortId,
        buf: &mut [u8],
        len: usize,
        hint: Option<&Lookahead>,
    ) -> AfxdpVerdict {
        let len = len.min(buf.len());
        if self.hand_off(ingress, &buf[..len]) {
            return AfxdpVerdict::Drop;
        }
        match self.engine.process_hinted(now_ns, ingress, buf, len, hint) {
            Verdict::Tx { port, len } => {
                let out = &buf[..usize::from(len)];
                if selfprobe::is_probe_answer(&self.probe_sources, out) {
                    self.take_probe_answer(now_ns, port, out);
                    return AfxdpVerdict::Drop;
                }
                AfxdpVerdict::Tx { port, len }
            }
            Verdict::Drop(_) => AfxdpVerdict::Drop,
        }
    }

    /// Hands the engine's NAT events to the exporter at every loop iteration.
    pub fn with_nat_events(mut self, tx: Option<Sender<NatEvent>>) -> Self {
        self.nat_events = tx;
        self
    }

    /// Moves the engine's NAT events into the exporter's channel; a full channel loses them
    /// (counted). Also called once more after the worker stopped.
    pub fn pass_nat_events(&mut self) {
        if let Some(tx) = &self.nat_events {
            let lost = &mut self.nat_events_lost;
            self.engine.drain_nat_events(|e| {
                if tx.try_send(e).is_err() {
                    *lost += 1;
                }
            });
        }
    }

    /// Exports flow states to the cluster's sync and imports the peers' (`crate::cluster::sync`)
    /// at every loop iteration.
    pub fn with_sync(mut self, sync: Option<crate::cluster::sync::WorkerSync>) -> Self {
        self.sync = sync;
        self
    }

    /// Beats `heartbeat` at every publication of the counters.
    pub fn with_heartbeat(mut self, heartbeat: crate::liveness::Heartbeat) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// Follows the kernel's neighbours and routes published in `mailbox`, starting with the
    /// view it holds now.
    pub fn with_kernel(mut self, mailbox: Arc<KernelMailbox>) -> Self {
        self.kernel = Some(mailbox);
        self.take_kernel_view();
        self
    }

    /// Applies the kernel's latest view if it moved since this worker last took it.
    fn take_kernel_view(&mut self) {
        let Some(view) = self
            .kernel
            .as_ref()
            .and_then(|mb| mb.newer_than(self.kernel_applied.version))
        else {
            return;
        };
        kernel_watch::apply(self.engine.next_hops(), &view, &mut self.kernel_applied);
    }

    /// Takes answers to the data-path self-probes from `sources` off the wire.
    pub fn with_probe_sources(mut self, sources: Vec<Addr>) -> Self {
        self.probe_sources = sources;
        self
    }

    /// Runs a self-probe's SYN through the engine like a client's; its verdict is sent on
    /// (with the other frames this worker did not receive itself) or reported dropped.
    fn inject(&mut self, now_ns: u64, inj: Injection) {
        let mut frame = inj.frame;
        let len = frame.len();
        frame.resize(len + wire::VLAN_HLEN, 0);
        match self
            .engine
            .process_buf(now_ns, inj.ingress, &mut frame, len)
        {
            Verdict::Tx { port, len } => {
                frame.truncate(usize::from(len));
                self.outbox.push((
                    port,
                    Handoff {
                        from: self.id,
                        ingress: inj.ingress,
                        frame,
                    },
                ));
            }
            Verdict::Drop(_) => {
                if let Ok(p) = wire::parse(&frame[..len]) {
                    let _ = self.to_control.try_send(FromWorker::ProbeAnswer {
                        source: p.src,
                        port: p.src_port,
                        ok: false,
                    });
                }
            }
        }
    }

    /// A member's answer to a self-probe, translated by the engine and about to leave on
    /// `port`: reported, and a SYN-ACK is closed with an RST (sequence number = what the
    /// member acknowledged) run through the engine toward the member.
    #[cold]
    fn take_probe_answer(&mut self, now_ns: u64, port: PortId, frame: &[u8]) {
        let Ok(p) = wire::parse(frame) else {
            return;
        };
        if p.proto != wire::proto::TCP {
            return;
        }
        let syn_ack = wire::tcp_flags::SYN | wire::tcp_flags::ACK;
        let answered = p.tcp_flags & syn_ack == syn_ack || p.tcp_flags & wire::tcp_flags::RST != 0;
        if !answered {
            return;
        }
        let _ = self.to_control.try_send(FromWorker::ProbeAnswer {
            source: p.dst,
            port: p.dst_port,
            ok: true,
        });
        if p.tcp_flags & wire::tcp_flags::RST != 0 {
            return;
        }
        let mut src_mac = [0u8; 6];
        src_mac.copy_from_slice(&frame[6..12]);
        let spec = wire::RstSpec {
            src_mac: selfprobe::PROBE_MAC,
            dst_mac: src_mac,
            vlan: None,
            src: p.dst,
            dst: p.src,
            src_port: p.dst_port,
            dst_port: p.src_port,
            seq: p.ack,
            ack: None,
        };
        let mut rst = vec![0u8; wire::MAX_RST_FRAME];
        if let Some(len) = wire::build_tcp_rst(&mut rst, &spec) {
            rst.truncate(len);
            self.inject(
                now_ns,
                Injection {
                    ingress: port,
                    frame: rst,
                },
            );
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Marks the engine's flow store closed by a planned stop (after the worker's last
    /// frame): the next xlbd restores it as complete.
    pub fn close_store(&mut self) {
        drop(self.engine.close_store(sys::monotonic_ns()));
    }

    /// Publishes the counters into the worker's cell: copies into the cell's storage, so
    /// nothing is allocated once it has grown to the counters' size.
    pub fn publish_counters(&mut self) {
        let Self {
            id,
            engine,
            counters,
            loop_latency,
            handed_off,
            handoff_dropped,
            nat_events_lost,
            ..
        } = self;
        counters.publish(|s| {
            let c = &mut s.counters;
            c.worker = *id as u16;
            c.counters.clone_from(engine.counters());
            c.flows = engine.flow_count() as u64;
            c.flow_capacity = u64::from(engine.flow_capacity());
            c.handed_off = *handed_off;
            c.handoff_dropped = *handoff_dropped;
            c.next_hops = engine.next_hop_stats();
            c.generation = engine.rules().generation();
            s.snat.clear();
            s.snat.extend(engine.rules().outbound_allocations().map(
                |(rule, proto, member, blocks)| {
                    let (used, allocated) = engine.snat_usage(blocks, proto);
                    SnatUsage {
                        rule,
                        proto,
                        member: member.to_ip(),
                        allocated,
                        used,
                    }
                },
            ));
            s.loop_latency.reset();
            // Same bounds: adding never resizes.
            let _ = s.loop_latency.add(&*loop_latency);
            s.drains.clear();
            s.drains.extend_from_slice(engine.drain_progress());
            s.nat_events_lost = engine.nat_events_lost() + *nat_events_lost;
        });
    }

    /// Answers a flow query: a page of at most `limit` matching flows from at most
    /// [`QUERY_SLOTS`](crate::messages::QUERY_SLOTS) slots after the cursor (a control query,
    /// not the packet path: it allocates the answer).
    fn flows_page(&self, q: &FlowQuery, now_ns: u64) -> FlowAnswer {
        let capacity = self.engine.flow_capacity();
        q.answer(
            self.id,
            self.engine.flows_in(q.slots(capacity)),
            capacity,
            now_ns,
        )
    }

    /// Passes `frame` to its owner if that is another worker; `true` when it did.
    fn hand_off(&mut self, ingress: PortId, frame: &[u8]) -> bool {
        let Some(st) = &self.steering else {
            return false;
        };
        // The engine's steering (`Engine::owner`): both directions of every flow hash the
        // endpoint that is not xlb's, so they name the same worker.
        match self.engine.owner(frame).map(usize::from) {
            Some(w) if w != self.id => {
                self.handed_off += 1;
                let mut buf = st
                    .recycled
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(2048));
                buf.clear();
                buf.extend_from_slice(frame);
                let h = Handoff {
                    from: self.id,
                    ingress,
                    frame: buf,
                };
                if st.peers[w].try_send(h).is_err() {
                    self.handoff_dropped += 1;
                }
                true
            }
            _ => false,
        }
    }

    fn take_handoffs(&mut self, now_ns: u64) {
        for _ in 0..HANDOFF_BUDGET {
            let Some(Ok(mut h)) = self.steering.as_ref().map(|st| st.inbox.try_recv()) else {
                break;
            };
            // Room for a VLAN tag: the buffers are allocated with a frame's capacity.
            let len = h.frame.len();
            h.frame.resize(len + wire::VLAN_HLEN, 0);
            let verdict = self
                .engine
                .process_buf(now_ns, h.ingress, &mut h.frame, len);
            if let Verdict::Tx { port, len } = verdict {
                h.frame.truncate(usize::from(len));
                if !selfprobe::is_probe_answer(&self.probe_sources, &h.frame) {
                    self.outbox.push((port, h));
                    continue;
                }
                self.take_probe_answer(now_ns, port, &h.frame);
            }
            // Dropped, or a probe answer taken off: the buffer goes back to its worker.
            if let Some(st) = &self.steering {
                let _ = st.returns[h.from].try_send(h.frame);
            }
        }
    }

    fn apply(&mut self, msg: ToWorker, now_ns: u64) {
        match msg {
            ToWorker::Rules(rules, backend_side) => {
                let generation = rules.generation();
                if let Some(ports) = backend_side {
                    self.set_backend_side(&ports);
                }
                self.engine.set_rules(rules);
                // The publisher waits for this; a full channel means it gave up already.
                let _ = self.acks.try_send(Ack {
                    worker: self.id,
                    generation,
                });
            }
            ToWorker::Flows(q) => {
                let _ = q.reply.try_send(self.flows_page(&q, now_ns));
            }
            ToWorker::Probe(inj) => self.inject(now_ns, inj),
            ToWorker::ClusterChanged { settle } => {
                let settle_ns = u64::try_from(settle.as_nanos()).unwrap_or(u64::MAX);
                self.engine
                    .cluster_changed(now_ns.saturating_add(settle_ns));
            }
            ToWorker::BackendSide(ports) => self.set_backend_side(&ports),
        }
    }

    fn set_backend_side(&mut self, ports: &[(PortId, bool)]) {
        let net = self.engine.next_hops();
        for (port, backend_side) in ports {
            net.set_backend_side(*port, *backend_side);
        }
    }

    fn report(&mut self) {
        let id = self.id;
        let tx = &self.to_control;
        self.engine.drain_events(|e| {
            let _ = tx.try_send(FromWorker::Event(id, e));
        });
        self.publish_counters();
    }
}

impl FrameHandler for EngineHandler {
    #[inline]
    fn handle(&mut self, now_ns: u64, ingress: PortId, frame: &mut [u8]) -> AfxdpVerdict {
        let len = frame.len();
        self.handle_in(now_ns, ingress, frame, len)
    }

    /// The engine may grow a frame into `buf` (a VLAN tag toward a tagged next hop).
    #[inline]
    fn handle_in(
        &mut self,
        now_ns: u64,
        ingress: PortId,
        buf: &mut [u8],
        len: usize,
    ) -> AfxdpVerdict {
        self.handle_frame(now_ns, ingress, buf, len, None)
    }

    /// With what the look-ahead read of the frame (taken: it serves that frame only).
    #[inline]
    fn handle_looked_ahead(
        &mut self,
        now_ns: u64,
        ingress: PortId,
        buf: &mut [u8],
        len: usize,
        at: usize,
    ) -> AfxdpVerdict {
        let hint = self.lookahead.get_mut(at).and_then(Option::take);
        self.handle_frame(now_ns, ingress, buf, len, hint.as_ref())
    }

    fn next_deadline(&self) -> Option<u64> {
        if !self.outbox.is_empty() {
            return Some(0);
        }
        let engine = self.engine.next_deadline();
        match &self.sync {
            // Records from the peers wait for this worker's next pass.
            Some(s) => Some(engine.map_or(s.next_pass_ns(), |d| d.min(s.next_pass_ns()))),
            None => engine,
        }
    }

    fn expire(&mut self, now_ns: u64, budget: usize, emit: &mut dyn FnMut(PortId, &[u8])) -> usize {
        for (port, h) in self.outbox.drain(..) {
            emit(port, &h.frame);
            if let Some(st) = &self.steering {
                let _ = st.returns[h.from].try_send(h.frame);
            }
        }
        self.engine.expire(now_ns, budget, emit)
    }

    fn poll_control(&mut self, now_ns: u64) {
        self.take_kernel_view();
        for _ in 0..CONTROL_BUDGET {
            match self.from_control.try_recv() {
                Ok(msg) => self.apply(msg, now_ns),
                Err(_) => break,
            }
        }
        self.take_handoffs(now_ns);
        self.pass_nat_events();
        if let Some(sync) = self.sync.as_mut() {
            sync.pass(&mut self.engine, now_ns);
        }
        let misses = &mut self.misses;
        self.engine.next_hops().take_misses(|a| misses.push(a));
        if !self.misses.is_empty() {
            let list = std::mem::take(&mut self.misses);
            let _ = self.to_control.try_send(FromWorker::Misses(list));
        }
        if now_ns >= self.next_stats {
            self.next_stats = now_ns + self.stats_every_ns;
            self.report();
            if let Some(h) = &self.heartbeat {
                h.beat(now_ns);
            }
        }
    }

    fn end_of_iteration(&mut self, started_ns: u64) {
        let took = sys::monotonic_ns().saturating_sub(started_ns).max(1);
        self.loop_latency.saturating_record(took);
    }

    /// Two look-ahead passes (flow index slots, then the flows they name) once the
    /// table holds a few thousand flows (`PREFETCH_MIN_FLOWS`); below that the extra parse
    /// costs more than it saves.
    fn prefetch_stages(&self) -> u8 {
        if self.engine.flow_count() >= PREFETCH_MIN_FLOWS {
            2
        } else {
            0
        }
    }

    /// The first pass reads the frame's key and hash and keeps them by position; the
    /// second pass and the frame's processing take them from there.
    fn prefetch(&mut self, stage: u8, at: usize, _ingress: PortId, frame: &[u8]) {
        let la = match self.lookahead.get_mut(at) {
            Some(kept) if stage > 0 => *kept,
            Some(kept) => {
                *kept = self.engine.lookahead(frame);
                *kept
            }
            None => self.engine.lookahead(frame),
        };
        let Some(la) = la else {
            return;
        };
        if let Some(addr) = self.engine.lookahead_addr(&la, stage) {
            sys::prefetch(addr);
            if stage == 1 {
                // a flow entry may straddle two cache lines
                sys::prefetch(addr.wrapping_add(std::mem::size_of::<Flow>() - 1));
            }
        }
    }
}

#[cfg(test)]
mod tests;
