//! The adapter between the AF_XDP worker loop and the pure engine, and the messages that
//! cross between a worker and the control thread.
//!
//! Each worker owns one [`EngineHandler`]. The control thread talks to it through two bounded
//! channels (rule sets, flow queries and self-probes in; counters, events and neighbour
//! misses out; nothing blocks: a full channel drops the message, the next periodic one
//! supersedes it) and one mailbox: what the kernel knows (neighbours, routes) is the latest
//! [`KernelView`](crate::kernel_watch::KernelView), which the worker takes whenever its
//! version moved, so that no kernel change is ever lost to a full channel.
//!
//! With several workers, a frame that arrives on a queue of the wrong worker is handed to
//! the worker that owns its flow (`Engine::owner`) over that worker's bounded inbox; the owner
//! processes it at its next loop iteration and transmits the result from its own sockets.

use std::sync::Arc;

use crate::kernel_watch::{self, Applied, KernelMailbox};

use crossbeam::channel::{Receiver, Sender};
use hdrhistogram::Histogram;
use xlb_afxdp::{sys, FrameHandler, PortId, Verdict as AfxdpVerdict};
use xlb_api::{FlowFilter, SnatUsage};
use xlb_engine::{
    flow::{Flow, FlowId},
    net::NextHopStats,
    wire, Addr, Counters, Engine, Event, FlowInfo, RuleSet, Verdict,
};

/// Control thread → worker. (The kernel's neighbours and routes take the mailbox instead:
/// [`EngineHandler::with_kernel`].)
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

/// The channels between one worker and the control thread.
#[derive(Debug)]
pub struct ControlLink {
    pub from_control: Receiver<ToWorker>,
    pub to_control: Sender<FromWorker>,
    pub acks: Sender<Ack>,
}

/// Busy loop iterations, in nanoseconds: 1 ns to 10 s at 2 significant digits (about 20 KiB,
/// allocated once; recording never allocates).
pub fn loop_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 2).expect("constant, valid bounds")
}

/// A worker's counters at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub worker: usize,
    pub counters: Counters,
    pub flows: usize,
    pub flow_capacity: u32,
    /// Frames this worker received for a flow another worker owns, and passed on.
    pub handed_off: u64,
    /// Of those, frames lost because the owner's inbox was full.
    pub handoff_dropped: u64,
    /// The rule-set generation the worker runs.
    pub generation: u64,
    /// SNAT ports of every (outbound rule, protocol, member): this worker's share and use.
    pub snat: Vec<SnatUsage>,
    /// Duration of the worker's loop iterations that did work (received frames or ran
    /// timers), since start: how long a frame can wait inside the worker.
    pub loop_latency: Histogram<u64>,
    /// The next-hop table: entries in use, reclaimed and refused.
    pub next_hops: NextHopStats,
}

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

/// Worker → control thread.
#[derive(Debug, Clone)]
pub enum FromWorker {
    /// Boxed: a snapshot is large and travels four times a second, the other kinds often.
    Stats(Box<Snapshot>),
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

/// [`FrameHandler`] for the engine of one worker.
#[derive(Debug)]
pub struct EngineHandler {
    id: usize,
    engine: Engine,
    from_control: Receiver<ToWorker>,
    to_control: Sender<FromWorker>,
    acks: Sender<Ack>,
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
        }
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
    fn inject(&mut self, now_ns: u64, inj: crate::selfprobe::Injection) {
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
            src_mac: crate::selfprobe::PROBE_MAC,
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
                crate::selfprobe::Injection {
                    ingress: port,
                    frame: rst,
                },
            );
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            worker: self.id,
            counters: self.engine.counters().clone(),
            flows: self.engine.flow_count(),
            flow_capacity: self.engine.flow_capacity(),
            handed_off: self.handed_off,
            handoff_dropped: self.handoff_dropped,
            generation: self.engine.rules().generation(),
            snat: self.snat_usage(),
            loop_latency: self.loop_latency.clone(),
            next_hops: self.engine.next_hop_stats(),
        }
    }

    fn snat_usage(&self) -> Vec<SnatUsage> {
        self.engine
            .rules()
            .outbound_allocations()
            .map(|(rule, proto, member, blocks)| {
                let (used, allocated) = self.engine.snat_usage(blocks, proto);
                SnatUsage {
                    rule,
                    proto,
                    member: member.to_ip(),
                    allocated,
                    used,
                }
            })
            .collect()
    }

    /// Answers a flow query: a page of at most `limit` matching flows from at most
    /// [`QUERY_SLOTS`] slots after the cursor (a control query, not the packet path: it
    /// allocates the answer).
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
                if !crate::selfprobe::is_probe_answer(&self.probe_sources, &h.frame) {
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
            ToWorker::Rules(rules) => {
                let generation = rules.generation();
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
        }
    }

    fn report(&mut self) {
        let id = self.id;
        let tx = &self.to_control;
        self.engine.drain_events(|e| {
            let _ = tx.try_send(FromWorker::Event(id, e));
        });
        let _ = self
            .to_control
            .try_send(FromWorker::Stats(Box::new(self.snapshot())));
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
        let len = len.min(buf.len());
        if self.hand_off(ingress, &buf[..len]) {
            return AfxdpVerdict::Drop;
        }
        match self.engine.process_buf(now_ns, ingress, buf, len) {
            Verdict::Tx { port, len } => {
                let out = &buf[..usize::from(len)];
                if crate::selfprobe::is_probe_answer(&self.probe_sources, out) {
                    self.take_probe_answer(now_ns, port, out);
                    return AfxdpVerdict::Drop;
                }
                AfxdpVerdict::Tx { port, len }
            }
            Verdict::Drop(_) => AfxdpVerdict::Drop,
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        if !self.outbox.is_empty() {
            return Some(0);
        }
        self.engine.next_deadline()
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
        let misses = &mut self.misses;
        self.engine.next_hops().take_misses(|a| misses.push(a));
        if !self.misses.is_empty() {
            let list = std::mem::take(&mut self.misses);
            let _ = self.to_control.try_send(FromWorker::Misses(list));
        }
        if now_ns >= self.next_stats {
            self.next_stats = now_ns + self.stats_every_ns;
            self.report();
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

    fn prefetch(&mut self, stage: u8, _ingress: PortId, frame: &[u8]) {
        if let Some(addr) = self.engine.prefetch_addr(frame, stage) {
            sys::prefetch(addr);
            if stage == 1 {
                // a flow entry may straddle two cache lines
                sys::prefetch(addr.wrapping_add(std::mem::size_of::<Flow>() - 1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use etherparse::PacketBuilder;
    use xlb_engine::{compile, Config, MemberHealth};

    use super::*;

    const CONFIG: &str = r#"
[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[frontends]]
name = "snat"
address = "198.19.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "ALL"
frontend_port = 80
backend_pool = "web"
backend_port = 8080

[[outbound_rules]]
name = "out"
frontends = ["snat"]
backend_pool = "web"
protocol = "ALL"
"#;

    fn frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, udp: bool) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(
            src.octets(),
            dst.octets(),
            64,
        );
        let mut out = Vec::new();
        if udp {
            b.udp(sport, dport).write(&mut out, b"x").unwrap();
        } else {
            b.tcp(sport, dport, 1, 1000)
                .syn()
                .write(&mut out, &[])
                .unwrap();
        }
        out
    }

    /// A one-worker handler on `CONFIG` with ports 0 (clients) and 1 (members), both members'
    /// MACs known, taking answers to the self-probe source 198.18.0.250.
    fn probe_handler() -> (EngineHandler, Receiver<FromWorker>) {
        use xlb_engine::{EngineConfig, Route};
        let config = Config::from_toml_str(CONFIG).unwrap();
        let rules = Arc::new(compile(&config, None, &MemberHealth::default(), 1).unwrap());
        let mut engine = Engine::new(EngineConfig::default(), rules, 1);
        let net = engine.next_hops();
        net.set_port(0, [2, 0, 0, 0, 0xa0, 0]);
        net.set_port(1, [2, 0, 0, 0, 0xa0, 1]);
        net.set_routes(vec![
            Route::v4(Ipv4Addr::new(198, 18, 0, 0), 24, 0, None),
            Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None),
        ]);
        for (a, mac) in [([198, 18, 1, 11], 0xb1), ([198, 18, 1, 12], 0xb2)] {
            net.set_neighbor(Addr::from_v4_bytes(a), 1, [2, 0, 0, 0, mac, 1])
                .unwrap();
        }
        let (_to_tx, to_rx) = crossbeam::channel::bounded(8);
        let (from_tx, from_rx) = crossbeam::channel::bounded(8);
        let (ack_tx, _ack_rx) = crossbeam::channel::bounded(8);
        let link = ControlLink {
            from_control: to_rx,
            to_control: from_tx,
            acks: ack_tx,
        };
        let h = EngineHandler::new(0, engine, link, u64::MAX, None)
            .with_probe_sources(vec![Addr::from_v4_bytes([198, 18, 0, 250])]);
        (h, from_rx)
    }

    /// The kernel's view as the control thread would publish it: both members on port 1
    /// with `mac` as their last byte, the lab's routes.
    fn kernel_view(version: u64, mac: u8) -> crate::kernel_watch::KernelView {
        use xlb_engine::Route;
        crate::kernel_watch::KernelView {
            version,
            neighbours: vec![
                (
                    Addr::from_v4_bytes([198, 18, 1, 11]),
                    1,
                    None,
                    [2, 0, 0, 0, 0xb1, mac],
                ),
                (
                    Addr::from_v4_bytes([198, 18, 1, 12]),
                    1,
                    None,
                    [2, 0, 0, 0, 0xb2, mac],
                ),
            ],
            routes_version: 1,
            routes: vec![
                Route::v4(Ipv4Addr::new(198, 18, 0, 0), 24, 0, None),
                Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None),
            ],
        }
    }

    #[test]
    fn kernel_changes_reach_the_engine_even_when_its_control_channel_is_full() {
        use crate::kernel_watch::KernelMailbox;
        use xlb_engine::EngineConfig;
        let config = Config::from_toml_str(CONFIG).unwrap();
        let rules = Arc::new(compile(&config, None, &MemberHealth::default(), 1).unwrap());
        let mut engine = Engine::new(EngineConfig::default(), rules, 1);
        engine.next_hops().set_port(0, [2, 0, 0, 0, 0xa0, 0]);
        engine.next_hops().set_port(1, [2, 0, 0, 0, 0xa0, 1]);
        let (to_tx, to_rx) = crossbeam::channel::bounded(4);
        let (from_tx, _from_rx) = crossbeam::channel::bounded(8);
        let (ack_tx, _ack_rx) = crossbeam::channel::bounded(8);
        let link = ControlLink {
            from_control: to_rx,
            to_control: from_tx,
            acks: ack_tx,
        };
        let mailbox = Arc::new(KernelMailbox::new(kernel_view(1, 1)));
        let mut h =
            EngineHandler::new(0, engine, link, 1 << 50, None).with_kernel(Arc::clone(&mailbox));
        // The view it started with: routes and neighbours, so a client's SYN gets through.
        let client = Ipv4Addr::new(198, 18, 0, 10);
        let vip = Ipv4Addr::new(198, 18, 0, 100);
        let mut syn = frame(client, 40_000, vip, 80, false);
        assert!(matches!(
            h.handle(10, 0, &mut syn),
            AfxdpVerdict::Tx { port: 1, .. }
        ));
        assert_eq!(syn[5], 1, "the member's MAC of view 1");

        // The worker's control channel is full (a slow worker, a burst of queries)...
        let (reply_tx, _reply_rx) = crossbeam::channel::bounded(1);
        let query = FlowQuery {
            filter: FlowFilter::default(),
            after: None,
            limit: 1,
            reply: reply_tx,
        };
        while to_tx.try_send(ToWorker::Flows(query.clone())).is_ok() {}
        // ... while the kernel's neighbours change 100 times.
        for v in 2..=101u64 {
            mailbox.publish(kernel_view(v, v as u8));
        }
        // One loop iteration later the flow follows the latest MAC.
        h.poll_control(20);
        // The client's retransmitted SYN (the handshake has not completed: anything else
        // would be out of window).
        let mut again = frame(client, 40_000, vip, 80, false);
        let v = h.handle(30, 0, &mut again);
        assert!(matches!(v, AfxdpVerdict::Tx { port: 1, .. }), "{v:?}");
        assert_eq!(again[5], 101, "the member's MAC of the last view");
        assert_eq!(h.kernel_applied.version, 101);
    }

    #[test]
    fn a_self_probe_goes_to_a_member_and_its_answer_is_taken_off_and_closed() {
        use crate::selfprobe::{Injection, SelfProber};
        let (mut h, from) = probe_handler();
        let config = Config::from_toml_str(CONFIG).unwrap();
        let source: std::net::IpAddr = "198.18.0.250".parse().unwrap();
        let t0 = std::time::Instant::now();
        let mut prober = SelfProber::new(&[source], std::time::Duration::from_secs(5), t0);
        let rules = Arc::clone(h.engine().rules());
        let round = prober.round(t0, &config, &rules, 1, 0, [2, 0, 0, 0, 0xa0, 0]);
        assert_eq!(round.len(), 1, "rule `web` (ALL, port 80)");
        let (_, inj): (usize, Injection) = round.into_iter().next().unwrap();
        h.apply(ToWorker::Probe(inj), 10);
        // The SYN waits in the outbox, translated toward a member.
        let mut sent = Vec::new();
        h.expire(10, 64, &mut |port, f| sent.push((port, f.to_vec())));
        assert_eq!(sent.len(), 1);
        let (port, syn) = &sent[0];
        let p = wire::parse(syn).unwrap();
        assert_eq!(*port, 1);
        assert_eq!(p.tcp_flags, wire::tcp_flags::SYN);
        assert_eq!((p.src, p.dst_port), (Addr::from(source), 8080));
        let member = p.dst;
        // The member's SYN-ACK arrives: not transmitted, reported, answered with an RST.
        let spec = wire::RstSpec {
            src_mac: syn[0..6].try_into().unwrap(),
            dst_mac: syn[6..12].try_into().unwrap(),
            vlan: None,
            src: member,
            dst: p.src,
            src_port: 8080,
            dst_port: p.src_port,
            seq: 9_000,
            ack: Some(p.seq.wrapping_add(1)),
        };
        let mut synack = vec![0u8; wire::MAX_RST_FRAME];
        let n = wire::build_tcp_segment(&mut synack, &spec, wire::tcp_flags::SYN, 1000).unwrap();
        assert_eq!(h.handle(20, 1, &mut synack[..n]), AfxdpVerdict::Drop);
        match from.try_recv() {
            Ok(FromWorker::ProbeAnswer {
                source: s,
                port,
                ok,
            }) => {
                assert_eq!((s, port, ok), (Addr::from(source), p.src_port, true));
                prober.answered(s, port, ok);
            }
            other => panic!("{other:?}"),
        }
        sent.clear();
        h.expire(20, 64, &mut |port, f| sent.push((port, f.to_vec())));
        assert_eq!(sent.len(), 1, "the RST to the member");
        let rst = wire::parse(&sent[0].1).unwrap();
        assert_eq!(sent[0].0, 1);
        assert_eq!(rst.tcp_flags, wire::tcp_flags::RST);
        assert_eq!((rst.dst, rst.dst_port), (member, 8080));
        assert_eq!(
            rst.seq,
            p.seq.wrapping_add(1),
            "exactly what the member expects"
        );
        assert_eq!(prober.report()[0].window_answered, 1);
        // Frames to other addresses are never taken for probe answers.
        let mut reply = frame(
            Ipv4Addr::new(198, 18, 1, 11),
            8080,
            Ipv4Addr::new(198, 18, 0, 10),
            1234,
            true,
        );
        let _ = h.handle(30, 1, &mut reply);
        assert!(from.try_recv().is_err(), "no probe answer for other frames");
    }
}
