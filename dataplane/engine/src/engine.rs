//! The engine of one worker: frames in, verdicts and frames out, time passed in.
//!
//! Per frame ([`Engine::process`]): parse → look the 5-tuple up in the flow table (either
//! direction) → track TCP → refresh `last_seen` → rewrite in place → say which port it leaves
//! by. A miss goes to the rules: a new flow (SYN / UDP), the unknown-flow policy, or a counted
//! drop. Per loop ([`Engine::expire`]): hand due timers back, re-check them lazily, and expire
//! idle flows, building the two RSTs of "TCP reset on idle" when the rule asks for it.

use std::sync::Arc;

use crate::addr::Addr;
use crate::admission::{self, Admission, AdmissionLimits, EvictReason, Unconfirmed};
use crate::config::DrainAction;
use crate::counters::{Counters, DropReason, RuleCounters};
use crate::drain::{Census, DrainProgress, CENSUS_SLOTS_PER_CALL};
use crate::flow::{Flow, FlowId, FlowTable, InsertError, Nat, Translation};
use crate::hashkey::HashKey;
use crate::late::LateTable;
use crate::natlog::{NatEvent, NatEventKind, NatLog, NatLogMode};
use crate::net::{NextHopError, NextHopId, NextHopStats, NextHops, PortId};
use crate::ratelimit::TokenBucket;
use crate::ruleset::{FlowTuple, RuleId, RuleSet, UnknownFlowPolicy};
use crate::snat::SnatPorts;
use crate::store::{
    Contents, FlowStore, Geometry, Record, Slot, StoreMemory, StoreOutcome, StoreReport,
};
use crate::tcp::{self, Change, Dir, Outcome, Segment, TcpState, TcpTrack, ORIG, REPLY};
use crate::time::{mins, Nanos, NANOS_PER_MILLI};
use crate::timer::TimerWheel;
use crate::wire::tcp_flags::{ACK, RST, SYN};
use crate::wire::{self, proto, Packet, Rewrite, RstSpec, MAX_RST_FRAME};

mod export;
mod fast;
mod fast_new;
mod prefetch;
pub use export::{FlowState, Imported, SyncReason};
pub use fast_new::NF_DRAIN_BUDGET;
pub use prefetch::Lookahead;

/// RSTs per second a worker sends for the `reset` unknown-flow policy unless told otherwise:
/// enough for the clients of a restarted appliance to learn quickly that their connections
/// are gone, too few to make xlb a useful reflector of spoofed segments.
pub const DEFAULT_RESET_RATE: u32 = 1_000;

/// Sizing and identity of one worker's engine.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// This worker's index and the number of workers (SNAT ports are partitioned by it).
    pub worker: u16,
    pub workers: u16,
    /// Flows this worker can hold (memory is allocated up front: ~94 bytes each, see
    /// [`Engine::table_bytes`]).
    pub flow_capacity: u32,
    /// Next-hop entries (neighbours and learned senders).
    pub next_hop_capacity: usize,
    /// Slots of the late-packet table.
    pub late_slots: usize,
    /// Timer tick is `2^tick_shift` ns (20 → ~1.05 ms).
    pub tick_shift: u32,
    /// Secret seed of the flow hash (this worker's own; draw it at random).
    pub hash_seed: u64,
    /// Secret seed of the steering hash: the same on every worker of one daemon (they must
    /// agree on the owner of each flow), drawn at random at start.
    pub steer_seed: u64,
    /// Idle timeout of flows whose rule was deleted (they keep running, silently).
    pub orphan_idle_timeout: Nanos,
    /// Bound of the event queue drained by the worker.
    pub event_capacity: usize,
    /// How often drained members' flows are counted while a drain is open (`crate::drain`).
    pub drain_census_interval: Nanos,
    /// NAT events logged for the daemon's IPFIX export (`crate::natlog`), and the bound of
    /// their queue between two worker iterations.
    pub nat_log: NatLogMode,
    pub nat_log_capacity: usize,
    /// Shares of the flow table that unconfirmed flows may hold (see [`crate::admission`]).
    pub admission: AdmissionLimits,
    /// RSTs per second (and at once) this worker sends under the `reset` unknown-flow policy;
    /// beyond it such segments are dropped (`reset_rate_limited`).
    pub reset_rate: u32,
    /// Cluster pickup: this engine is one of several nodes behind the router's ECMP, which
    /// moves flows between nodes when one is lost or added. Under the `drop` unknown-flow
    /// policy, a mid-flow TCP segment of an inbound rule then re-creates its flow like
    /// `pickup` does (the backend choice is the same on every node), instead of black-holing
    /// a connection that lives on (docs/cluster.md).
    pub cluster_pickup: bool,
    /// How long before its idle deadline a flow forwarded by XDP is withdrawn from it, so
    /// that the grace proving no XDP invocation still updates it ends before the deadline
    /// (real time: graces are not scaled by the lab's time scale). The least: twice the
    /// slowest recent grace when that is longer (`GraceClock::expiry_lead`).
    pub fast_expiry_lead: Nanos,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            worker: 0,
            workers: 1,
            flow_capacity: 1 << 16,
            next_hop_capacity: 4096,
            late_slots: 1 << 14,
            tick_shift: 20,
            hash_seed: 0x5EED_F71B,
            steer_seed: 0x57EE_5EED,
            orphan_idle_timeout: mins(4),
            event_capacity: 1024,
            drain_census_interval: 250 * NANOS_PER_MILLI,
            nat_log: NatLogMode::Off,
            nat_log_capacity: 4096,
            admission: AdmissionLimits::default(),
            reset_rate: DEFAULT_RESET_RATE,
            cluster_pickup: false,
            fast_expiry_lead: 128 * NANOS_PER_MILLI,
        }
    }
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Transmit the first `len` bytes of the (rewritten) frame on `port`.
    Tx { port: PortId, len: u16 },
    /// Drop it; the reason has been counted.
    Drop(DropReason),
}

/// Something the operator should hear about; drained by the worker, bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A TCP flow expired idle and both ends were sent an RST.
    ResetOnIdle {
        rule: RuleId,
        client: (Addr, u16),
        backend: (Addr, u16),
    },
    /// A member ran out of SNAT ports (once per episode: until one of its allocations succeeds).
    SnatExhausted { rule: RuleId, member: Addr },
}

/// A snapshot of one flow, for listings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    pub id: FlowId,
    pub rule: RuleId,
    pub proto: u8,
    pub nat: Nat,
    /// As the original packet arrived.
    pub orig: FlowTuple,
    /// As the original direction leaves.
    pub translated: FlowTuple,
    pub tcp_state: Option<TcpState>,
    pub last_seen: Nanos,
    pub deadline: Nanos,
}

/// The engine of one worker. `Clone` copies its whole state (benchmarks start every batch
/// from one prepared engine).
#[derive(Debug, Clone)]
pub struct Engine {
    cfg: EngineConfig,
    steer_key: HashKey,
    rules: Arc<RuleSet>,
    flows: FlowTable,
    /// The flows not confirmed yet, oldest first: the only ones evicted for new flows.
    unconfirmed: Unconfirmed,
    wheel: TimerWheel,
    net: NextHops,
    snat: SnatPorts,
    late: LateTable,
    counters: Counters,
    events: Vec<Event>,
    exhausted: Vec<Addr>,
    /// Bounds the RSTs of the `reset` unknown-flow policy.
    resets: TokenBucket,
    /// Next flow slot to re-file after a rule change shortened a timeout.
    sweep: Option<u32>,
    /// Drained members' flows: counted, and ended at their deadline.
    census: Census,
    natlog: NatLog,
    /// Next flow slot whose forward hop to re-resolve after the routes changed, and the
    /// [`NextHops::route_epoch`] that re-resolution serves.
    rehome: Option<u32>,
    rehome_epoch: u64,
    /// When the cluster's membership last changed (as told by [`Engine::cluster_changed`]):
    /// a flow with no packet since may have moved to another node, so its idle expiry is
    /// silent (an RST with numbers this node saw last could end a connection that lives on).
    membership_changed_at: Option<Nanos>,
    /// Flows a cluster peer synced here that have seen no packet here yet (`export`).
    standby: export::Standby,
    sync: export::SyncLog,
    scratch: [u8; MAX_RST_FRAME],
    /// Where the flows are written so that they outlive the process (detached: nowhere).
    store: FlowStore,
    /// The XDP fast path's published table (`None`: off).
    fast: Option<Box<fast::FastState>>,
    /// New flows opened by XDP: this worker's ring, worker 0's section writer (`None`: off).
    fast_new: Option<Box<fast_new::NewFlows>>,
}

impl Engine {
    /// An engine running `rules`, whose time line starts at `now`.
    pub fn new(cfg: EngineConfig, rules: Arc<RuleSet>, now: Nanos) -> Engine {
        let mut counters = Counters::default();
        counters
            .rules
            .resize(rules.rule_id_bound(), RuleCounters::default());
        counters.live_flows.resize(rules.rule_id_bound(), 0);
        let mut census = Census::default();
        census.set_drains(rules.drains());
        let mut snat = SnatPorts::new(cfg.worker, cfg.workers);
        snat.prepare(&rules);
        let mut unconfirmed = Unconfirmed::new(cfg.flow_capacity, cfg.admission);
        unconfirmed.reserve_rules(rules.rule_id_bound());
        let mut flows = FlowTable::new(cfg.flow_capacity, cfg.hash_seed);
        flows.reserve_addresses(rules.address_bound());
        Engine {
            flows,
            unconfirmed,
            wheel: TimerWheel::new(cfg.flow_capacity.max(1), cfg.tick_shift, now),
            net: NextHops::new(cfg.next_hop_capacity),
            snat,
            late: LateTable::new(cfg.late_slots),
            counters,
            events: Vec::with_capacity(cfg.event_capacity),
            exhausted: Vec::new(),
            resets: TokenBucket::new(cfg.reset_rate, cfg.reset_rate),
            sweep: None,
            census,
            natlog: NatLog::new(cfg.nat_log, cfg.nat_log_capacity),
            rehome: None,
            rehome_epoch: 0,
            membership_changed_at: None,
            standby: export::Standby::default(),
            sync: export::SyncLog::default(),
            scratch: [0; MAX_RST_FRAME],
            store: FlowStore::default(),
            fast: None,
            fast_new: None,
            steer_key: HashKey::from_seed(cfg.steer_seed),
            rules,
            cfg,
        }
    }

    /// The geometry a flow store of this engine has (see [`crate::store`]).
    pub fn store_geometry(&self) -> Geometry {
        Geometry {
            capacity: self.flows.capacity(),
            late_slots: self.late.slots() as u32,
            worker: self.cfg.worker,
            workers: self.cfg.workers,
        }
    }

    /// Takes `mem` as this engine's flow store: restores the flows it holds (rebuilding the
    /// index, the timer wheel, the admission lists, the SNAT ports and the next hops from
    /// the records) and from then on writes every flow into it. Call it once, after the
    /// ports are told ([`NextHops::set_port`]) and before the first frame.
    ///
    /// A store written by another layout version, for another geometry (flow capacity, late
    /// slots, worker, workers), with another steering seed or for other ports (their MACs in
    /// port order) cannot be trusted: it is wiped and the report says why. A configuration hash that differs from `config_hash` is not
    /// a reason: flows are matched to the rules by kind and name, and those whose rule is
    /// gone are dropped (counted). The late-packet memory is restored when the engine's
    /// flow hash seed is the store's ([`crate::store::stored_seeds`]). A flow whose idle time ran out while no engine ran
    /// expires at the first [`expire`](Self::expire), with its RSTs if its rule says so; one
    /// whose `last_seen` is after `now` (the caller's clock, which must be the one the store
    /// was written on: xlbd's is `CLOCK_MONOTONIC`) is dropped as invalid.
    /// `Err`: the memory is too small (nothing was written).
    pub fn attach_store(
        &mut self,
        now: Nanos,
        mem: Box<dyn StoreMemory>,
        config_hash: u64,
    ) -> Result<StoreReport, String> {
        if !self.flows.is_empty() || self.store.is_attached() {
            return Err("a store is attached before the engine holds flows, once".into());
        }
        let geometry = self.store_geometry();
        let mut store = FlowStore::default();
        let (mem, mut report) = store.open(
            mem,
            geometry,
            config_hash,
            (self.cfg.steer_seed, self.cfg.hash_seed),
            crate::store::ports_identity(self.net.port_macs()),
        )?;
        if report.outcome == StoreOutcome::Restored {
            self.restore(now, mem.bytes(), &mut report);
        }
        store.start(mem, config_hash, self.cfg.hash_seed);
        self.store = store;
        // Rewrite what was restored (rule ids may have been renumbered) and clear the rest.
        self.store.put_rules(&self.rules);
        for id in 0..self.flows.capacity() {
            if self.flows.is_live(id) {
                let f = self.flows.get(id);
                let confirmed = !self.unconfirmed.is_unconfirmed(id);
                let hops = [
                    self.net.get(f.next_hop[ORIG]),
                    self.net.get(f.next_hop[REPLY]),
                ];
                self.store.put(id, &f, confirmed, hops);
                if let Some(seen) = self.standby_seen(id) {
                    self.store.put_standby(id, seen);
                }
            } else {
                self.store.clear(id);
            }
        }
        self.store.put_late_all(&self.late);
        self.counters.flows_restored += u64::from(report.flows);
        self.counters.flows_restore_dropped +=
            u64::from(report.torn + report.invalid + report.rule_gone);
        Ok(report)
    }

    /// Marks the flow store closed at `now` by its owner (a planned stop: the next owner
    /// knows the records are complete) and stops writing it; hands the memory back. Call it
    /// after the last frame.
    pub fn close_store(&mut self, now: Nanos) -> Option<Box<dyn StoreMemory>> {
        self.store.close(now)
    }

    /// Stops writing the flow store without closing it and hands it back: what a process
    /// that is killed leaves behind (for tests and simulations of a crash).
    pub fn abandon_store(&mut self) -> Option<Box<dyn StoreMemory>> {
        self.store.abandon()
    }

    fn restore(&mut self, now: Nanos, bytes: &[u8], report: &mut StoreReport) {
        let contents = Contents::new(bytes, &self.rules);
        for id in 0..contents.capacity().min(self.flows.capacity()) {
            match contents.slot(id) {
                Slot::Free => {}
                Slot::Torn => report.torn += 1,
                Slot::Invalid => report.invalid += 1,
                Slot::RuleGone => report.rule_gone += 1,
                // A time stamp from the future: not written on this boot's clock line.
                Slot::Live(rec) if rec.flow.last_seen > now => report.invalid += 1,
                Slot::Live(mut rec) => {
                    if self.fast.is_some() {
                        // XDP may have forwarded it since the record was written.
                        let standby = rec.standby_seen != 0;
                        self.fast_restoring(now, id, &mut rec.flow, standby);
                    }
                    if self.restore_flow(id, rec) {
                        report.flows += 1;
                        if rec.flow.nat == Nat::Snat {
                            report.snat_ports += 1;
                        }
                    } else {
                        report.invalid += 1;
                    }
                }
            }
        }
        self.flows.finish_restore();
        if !report.late_keyed {
            return;
        }
        for (slot, hash, expired_at, rule) in contents.late() {
            self.late.restore(slot, hash, expired_at, rule);
            report.late += 1;
        }
    }

    /// Puts one stored flow back in slot `id`; false when it cannot be (a port that is not
    /// there, a full next-hop table, a tuple another record holds).
    fn restore_flow(&mut self, id: FlowId, rec: Record) -> bool {
        let mut hops: [NextHopId; 2] = [0; 2];
        for (dir, (port, vlan, mac)) in rec.hops.into_iter().enumerate() {
            let learned = if usize::from(port) < self.net.port_count() {
                self.net.learn(port, mac, vlan).ok()
            } else {
                None
            };
            let Some(hop) = learned else {
                if dir == REPLY {
                    self.net.release_if_unused(hops[ORIG]);
                }
                return false;
            };
            hops[dir] = hop;
        }
        let mut flow = rec.flow;
        flow.next_hop = hops;
        if self.flows.restore_at(id, flow).is_err() {
            for hop in hops {
                self.net.release_if_unused(hop);
            }
            return false;
        }
        // The forward hop is restored as the MAC it had; the first route view re-resolves
        // it (`rehome`), so it follows the kernel's neighbour from then on.
        for hop in hops {
            self.net.acquire(hop);
        }
        if flow.nat == Nat::Snat {
            self.snat.reserve(flow.xlat, flow.proto, flow.xlat_port);
        }
        if !rec.confirmed {
            self.unconfirmed.admit(id, flow.rule, class_of(flow.proto));
        }
        if rec.standby_seen != 0 {
            // Still a cluster peer's flow unless a packet came here since its last sync.
            self.restore_standby(id, rec.standby_seen);
        }
        live_flows(&mut self.counters, flow.rule);
        let deadline = self.deadline(&flow);
        self.wheel.insert(id, deadline);
        true
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    /// Switches to a new rule set (at a batch boundary). Existing flows keep their backend and
    /// translation; their rule's new timeout and reset setting apply from their next packet or
    /// expiry check. If a timeout got shorter, flows are re-filed in the wheel a bounded number
    /// per [`expire`](Self::expire) call so none expires late by more than the sweep.
    ///
    /// An id that now belongs to another rule than before (a deleted rule's id released and
    /// handed to a new rule) starts from zero counters: a new rule never inherits a deleted
    /// one's figures. Flows of a deleted rule keep its last settings (it stays in the set as a
    /// retired rule until no worker holds a flow of it).
    pub fn set_rules(&mut self, rules: Arc<RuleSet>) {
        self.flows.reserve_addresses(rules.address_bound());
        if self.counters.rules.len() < rules.rule_id_bound() {
            self.counters
                .rules
                .resize(rules.rule_id_bound(), RuleCounters::default());
            self.counters.live_flows.resize(rules.rule_id_bound(), 0);
        }
        let mut late_forgotten = false;
        for i in 0..self.counters.rules.len() {
            let id = i as RuleId;
            if self.rules.since(id) != rules.since(id) {
                self.counters.rules[i] = RuleCounters::default();
                self.late.forget_rule(id);
                late_forgotten = true;
            }
        }
        if late_forgotten {
            self.store.put_late_all(&self.late);
        }
        self.store.put_rules(&rules);
        if timeouts_shrank(&self.rules, &rules) {
            self.sweep = Some(0);
        }
        self.census.set_drains(rules.drains());
        self.snat.prepare(&rules);
        self.unconfirmed.reserve_rules(rules.rule_id_bound());
        self.rules = rules;
        // A member down (a UDP flow must move), a rule id past what XDP counts, ...
        self.fast_recheck_all(false);
        // Rules, pools, health: what XDP opens new flows with.
        self.fast_new_changed();
    }

    /// The cluster's membership changed at `at` (a node was lost, added, drained, or this one
    /// withdrew): the router may have moved any flow. Flows with no packet since `at` expire
    /// silently, whatever their rule says about reset on idle; a flow that still sends here
    /// proves it stayed and keeps its exact RSTs. The caller passes the earliest moment the
    /// change can have taken effect (its detection delay subtracted).
    pub fn cluster_changed(&mut self, at: Nanos) {
        self.membership_changed_at = Some(self.membership_changed_at.map_or(at, |t| t.max(at)));
    }

    /// A cluster node's own SNAT addresses: outbound flows take ports only on these (the
    /// addresses this node announces, so that answers reach it); `None`: every address of
    /// the rule. See docs/cluster.md, "SNAT across nodes".
    pub fn set_snat_addresses(&mut self, only: Option<Vec<Addr>>) {
        self.snat.restrict_to(only);
        self.snat.prepare(&self.rules);
    }

    /// Flows whose idle expiry is silent because the cluster changed since their last packet.
    fn may_have_moved(&self, f: &Flow) -> bool {
        self.membership_changed_at.is_some_and(|t| f.last_seen <= t)
    }

    pub fn next_hops(&mut self) -> &mut NextHops {
        &mut self.net
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Next-hop entries in use, reclaimed and refused.
    pub fn next_hop_stats(&self) -> NextHopStats {
        self.net.stats()
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn flow_capacity(&self) -> u32 {
        self.flows.capacity()
    }

    /// Bytes held for the flow capacity: flow records and index, timer links, admission
    /// links (a flow store, when attached, is the caller's memory and not counted).
    pub fn table_bytes(&self) -> usize {
        self.flows.memory_bytes() + self.wheel.memory_bytes() + self.unconfirmed.memory_bytes()
    }

    /// The engine's large allocations (flow records, index and bitmap, timer links,
    /// admission links and flags, SNAT port bitmaps), for the platform to back with huge
    /// pages. Valid while the engine lives; the SNAT bitmaps follow the rule set.
    pub fn memory_regions(&self) -> impl Iterator<Item = crate::MemoryRegion> + '_ {
        (self.flows.memory_regions().into_iter())
            .chain(self.wheel.memory_regions())
            .chain(self.unconfirmed.memory_regions())
            .chain(self.snat.memory_regions())
    }

    /// SNAT ports of `member`'s blocks in use on this worker for `proto`, and this worker's
    /// share of them.
    pub fn snat_usage(&self, blocks: &[crate::ruleset::PortBlock], proto: u8) -> (u32, u32) {
        (self.snat.used_in(blocks, proto), self.snat.share_of(blocks))
    }

    /// Drains queued events.
    pub fn drain_events(&mut self, mut f: impl FnMut(Event)) {
        for e in self.events.drain(..) {
            f(e);
        }
    }

    /// What this worker knows of every drain of its rule set, in the rule set's order.
    pub fn drain_progress(&self) -> &[DrainProgress] {
        &self.census.progress
    }

    /// Hands over the NAT events logged since the last call, oldest first.
    pub fn drain_nat_events(&mut self, mut f: impl FnMut(NatEvent)) {
        self.natlog.drain(&mut f);
    }

    /// NAT events dropped because the queue was full between two calls of
    /// [`drain_nat_events`](Self::drain_nat_events).
    pub fn nat_events_lost(&self) -> u64 {
        self.natlog.lost
    }

    /// Snapshot of the live flows.
    pub fn flows(&self) -> impl Iterator<Item = FlowInfo> + '_ {
        self.flows_in(0..self.flows.capacity())
    }

    /// Snapshot of the live flows whose slot (`FlowInfo::id`) is in `slots`, in slot order: a
    /// page of a flow listing, whose cursor is the slot to go on from. A flow keeps its slot
    /// for life, so a walk by slot sees every flow that lives through it exactly once; the
    /// cost is the flows returned plus one bitmap word per 64 slots of the range.
    pub fn flows_in(&self, slots: std::ops::Range<FlowId>) -> impl Iterator<Item = FlowInfo> + '_ {
        self.flows.iter_range(slots).map(|(id, f)| {
            let f = &self.fast_view(id, &f);
            FlowInfo {
                id,
                rule: f.rule,
                proto: f.proto,
                nat: f.nat,
                orig: f.key(ORIG),
                translated: f.translated(ORIG),
                tcp_state: (f.proto == proto::TCP).then_some(f.tcp.state),
                last_seen: f.last_seen,
                deadline: self.deadline(f),
            }
        })
    }

    /// The earliest time at which [`expire`](Self::expire) has work, for the worker's sleep.
    pub fn next_deadline(&self) -> Option<Nanos> {
        if self.sweep.is_some()
            || self.rehome.is_some()
            || self.net.route_epoch() != self.rehome_epoch
            || self.fast_waits_for_left()
            || self.fast_has_work()
            || self.fast_new_waiting()
        {
            return Some(0);
        }
        let wheel = self.wheel.next_deadline();
        let wheel = match (wheel, self.fast_new_section_due()) {
            (Some(w), Some(s)) => Some(w.min(s)),
            (w, s) => w.or(s),
        };
        match self.census.next_due(self.rules.drains()) {
            Some(c) => Some(wheel.map_or(c, |w| w.min(c))),
            None => wheel,
        }
    }

    /// The worker that owns the flow `frame` belongs to (in both directions), or `None` when
    /// the frame does not parse (any worker may count the drop).
    ///
    /// Steering hashes the endpoint that is not xlb's: for a packet addressed to a frontend, its
    /// source (a client, or the remote host answering an SNAT flow); otherwise its destination
    /// (the client a backend answers, or the remote host a member connects to). Both directions
    /// of every flow kind — load balancing, inbound NAT, floating IP, outbound SNAT — hash the
    /// same endpoint, so they land on the same worker whatever queue the NIC picked. SNAT ports
    /// are still partitioned between workers so that two workers never pick the same port.
    /// The hash is keyed (`EngineConfig::steer_seed`), so a sender cannot aim at one worker.
    pub fn owner(&self, frame: &[u8]) -> Option<u16> {
        owner(&self.rules, frame, self.cfg.workers, &self.steer_key)
    }

    /// Memory that `process` will read for `frame`'s flow, for the caller to prefetch a few
    /// frames ahead (the engine itself has no prefetch: it stays free of `unsafe`). Stage 0:
    /// the flow index slot; stage 1: the flow entry the index names (read from the index, so
    /// run stage 0 on the frame some time before), or, when the index shows the frame has no
    /// flow and an inbound rule would create one, the index slot of that flow's reply key
    /// (`prefetch.rs`). `None` when there is nothing to fetch (not TCP/UDP, unparsable, no
    /// entry). Worth it only once the table outgrows the caches.
    #[inline]
    pub fn prefetch_addr(&self, frame: &[u8], stage: u8) -> Option<*const u8> {
        self.lookahead_addr(&self.lookahead(frame)?, stage)
    }

    /// Processes one received frame in place. A frame that must leave with a VLAN tag it
    /// arrived without needs room to grow: see [`process_buf`](Self::process_buf).
    #[inline]
    pub fn process(&mut self, now: Nanos, ingress: PortId, frame: &mut [u8]) -> Verdict {
        let len = frame.len();
        self.process_buf(now, ingress, frame, len)
    }

    /// Processes the frame `buf[..len]` received on `ingress`, in place; the rest of `buf` is
    /// room it may grow into (4 bytes are enough: a VLAN tag), so `Verdict::Tx` may say
    /// more than `len` bytes.
    ///
    /// A tagged frame is dropped as `vlan_tag` unless its VLAN is allowed on `ingress`
    /// ([`NextHops::allow_vlan`]). A forwarded frame always leaves with the tag of its next
    /// hop: the sender's own tag back to a sender (learned with it), the neighbour's toward a
    /// destination (none unless the neighbour sits on a VLAN).
    #[inline]
    pub fn process_buf(
        &mut self,
        now: Nanos,
        ingress: PortId,
        buf: &mut [u8],
        len: usize,
    ) -> Verdict {
        self.process_hinted(now, ingress, buf, len, None)
    }

    /// [`process_buf`](Self::process_buf) for a frame the look-ahead read as `hint`
    /// ([`lookahead`](Self::lookahead), by this engine): the frame is parsed as any other,
    /// and its key's hash taken from the hint when the parsed key is the hint's (else
    /// computed: a hint read from another frame costs a hash, never a wrong lookup).
    #[inline]
    pub fn process_hinted(
        &mut self,
        now: Nanos,
        ingress: PortId,
        buf: &mut [u8],
        len: usize,
        hint: Option<&Lookahead>,
    ) -> Verdict {
        self.counters.rx_packets += 1;
        let len = len.min(buf.len());
        let pkt = match wire::parse(&buf[..len]) {
            Ok(p) => p,
            Err(e) => return self.drop(DropReason::Parse(e)),
        };
        if let Some(vlan) = pkt.vlan {
            if !self.net.vlan_allowed(ingress, vlan) {
                return self.drop(DropReason::VlanTag);
            }
        }
        if pkt.proto != proto::TCP && pkt.proto != proto::UDP {
            return self.drop(DropReason::Unsupported);
        }
        // Checked before any lookup, so that such a packet neither creates nor changes a flow
        // (nor takes a SNAT port): it would never reach the other end.
        if pkt.hop_limit <= 1 {
            return self.drop(DropReason::HopLimit);
        }
        if pkt.proto == proto::TCP && !tcp::valid_flags(pkt.tcp_flags) {
            return self.drop(DropReason::BadTcpFlags);
        }
        let tuple = FlowTuple {
            proto: pkt.proto,
            src: pkt.src,
            src_port: pkt.src_port,
            dst: pkt.dst,
            dst_port: pkt.dst_port,
        };
        let hash = self.hash_hinted(&tuple, hint);
        // SYNs XDP forwarded by itself came before this segment, and their flows may still
        // wait in the ring. A SYN — one XDP punted (its ring was full), which must not
        // overtake the records of its tuple, or a SYN-ACK answering one, possibly on the tuple
        // of an older flow that SYN reopened — and a segment that finds no flow install what
        // waits first, so that they find what the worker would have. Only those: the other
        // segments (the ACKs and data of flows being confirmed) must not wait behind a ring
        // of installs while a flood keeps the ring full.
        let is_tcp = pkt.proto == proto::TCP;
        if is_tcp && pkt.tcp_flags & SYN != 0 && self.fast_new_waiting() {
            self.fast_new_drain_waiting(now);
        }
        let mut found = self.flows.lookup(&tuple, hash);
        if found.is_none() && is_tcp && self.fast_new_waiting() {
            self.fast_new_drain_waiting(now);
            found = self.flows.lookup(&tuple, hash);
        }
        if let Some((id, dir)) = found {
            if let Some(reason) = self.wrong_port(id, dir, ingress) {
                let rule = self.flows.rule(id);
                return self.drop_for(rule, reason);
            }
            if self.fast.is_some() {
                self.fast_pull(now, id);
            }
            if pkt.proto == proto::TCP {
                let seg = Segment::of(&pkt);
                if self.flows.track(id).tcp.reopens(dir, &seg) {
                    // A new connection reusing the tuple of one that is over (or of a
                    // handshake that this SYN is not part of).
                    self.remove_flow(now, id);
                    return self.miss(now, ingress, buf, len, &pkt, &tuple, hash);
                }
                match self.track(now, id, dir, &seg) {
                    Outcome::Tracked(_) => {
                        // The original sender acknowledges the reply side's next byte: it
                        // receives the replies, so the flow is confirmed (never evicted).
                        if dir == ORIG
                            && pkt.tcp_flags & (ACK | SYN | RST) == ACK
                            && self.unconfirmed.is_unconfirmed(id)
                        {
                            self.confirm_tcp(id, pkt.ack);
                        }
                    }
                    Outcome::Passed => return self.emit(id, dir, buf, len, &pkt),
                    Outcome::OutOfWindow => {
                        let rule = self.flows.rule(id);
                        return self.drop_for(rule, DropReason::OutOfWindow);
                    }
                }
            } else if dir == ORIG {
                let f = self.flows.get(id);
                if f.nat != Nat::Snat && self.rules.backend_down(f.rule, f.xlat) {
                    return self.move_udp(now, id, ingress, buf, len, &pkt, &tuple, hash);
                }
            } else if self.unconfirmed.is_unconfirmed(id) {
                // A UDP reply: the flow is confirmed.
                let rule = self.flows.rule(id);
                self.unconfirmed.forget(id, rule, admission::UDP);
                self.store.put_confirmed(id);
            }
            self.flows.get_mut(id).last_seen = now;
            if self.fast.is_some() {
                self.fast_after_packet(now, id, dir);
            }
            return self.emit(id, dir, buf, len, &pkt);
        }
        self.miss(now, ingress, buf, len, &pkt, &tuple, hash)
    }

    /// Health: a UDP flow whose backend went down (probe or admin state) moves, at its next
    /// client packet, to the member the rule's distribution picks now; with no member left it
    /// ends, and the packet is dropped and counted `no_backend`. The old flow is removed
    /// without counting an expiry (it did not idle out); the new one counts as created and as
    /// `flows_moved`. Only the original direction moves a flow: a reply the old backend still
    /// sends before that is forwarded as before.
    #[allow(clippy::too_many_arguments)]
    #[cold]
    fn move_udp(
        &mut self,
        now: Nanos,
        id: FlowId,
        ingress: PortId,
        buf: &mut [u8],
        len: usize,
        pkt: &Packet,
        tuple: &FlowTuple,
        hash: u64,
    ) -> Verdict {
        let rule = self.flows.rule(id);
        self.remove_flow(now, id);
        let verdict = self.miss(now, ingress, buf, len, pkt, tuple, hash);
        if matches!(verdict, Verdict::Tx { .. }) {
            rule_counters(&mut self.counters, rule).flows_moved += 1;
        }
        verdict
    }

    /// Expires at most `budget` due flows, emitting RST frames through `emit(port, frame)`,
    /// and installs at most [`NF_DRAIN_BUDGET`] flows of SYNs XDP forwarded. Returns the
    /// number of timer entries handled and records taken.
    pub fn expire(
        &mut self,
        now: Nanos,
        budget: usize,
        emit: &mut dyn FnMut(PortId, &[u8]),
    ) -> usize {
        self.fast_housekeeping();
        self.fast_new_tick(now);
        // The records have a budget of their own: taken from the timers' budget, a steady
        // stream of SYNs through XDP would leave no due flow expired.
        let installed = self.fast_new_drain(now, NF_DRAIN_BUDGET);
        let mut done = 0;
        while done < budget {
            let Some(id) = self.wheel.poll(now) else {
                break;
            };
            done += 1;
            if self.fast_pair(id).is_some() {
                match self.fast_expiry_step(now, id) {
                    fast::FastExpiry::Filed => {}
                    fast::FastExpiry::Expire => self.expire_flow(now, id, emit),
                    fast::FastExpiry::DrainEnd => self.drain_end_flow(now, id, emit),
                }
                continue;
            }
            let deadline = self.deadline(&self.flows.get(id));
            if deadline > now {
                // Lazy re-check: a packet or a longer timeout moved the deadline.
                self.wheel.insert(id, deadline);
                continue;
            }
            self.expire_flow(now, id, emit);
        }
        if let Some(cursor) = self.sweep {
            let end = (cursor as usize + budget.saturating_sub(done).max(1))
                .min(self.flows.capacity() as usize);
            for id in cursor..end as u32 {
                if self.flows.is_live(id) {
                    let d = self.deadline(&self.flows.get(id));
                    self.wheel.insert(id, self.fast_filing(id, d));
                }
                done += 1;
            }
            self.sweep = (end < self.flows.capacity() as usize).then_some(end as u32);
        }
        let epoch = self.net.route_epoch();
        if epoch != self.rehome_epoch {
            // Routes changed (again): every flow's forward hop is looked up anew.
            self.rehome_epoch = epoch;
            self.rehome = Some(0);
        }
        match self.rehome {
            Some(cursor) if done < budget => {
                let end = (cursor as usize + (budget - done)).min(self.flows.capacity() as usize);
                for id in cursor..end as u32 {
                    if self.flows.is_live(id) {
                        self.rehome_flow(id);
                    }
                    done += 1;
                }
                self.rehome = (end < self.flows.capacity() as usize).then_some(end as u32);
            }
            _ => {}
        }
        done += self.fast_recheck_step(budget.saturating_sub(done).max(1));
        installed + done + self.census_step(now, emit)
    }

    /// One step of the drain census (`crate::drain`): at most [`CENSUS_SLOTS_PER_CALL`] flow
    /// slots; returns 1 when it did work, so that the worker comes back for the rest.
    fn census_step(&mut self, now: Nanos, emit: &mut dyn FnMut(PortId, &[u8])) -> usize {
        let rules = Arc::clone(&self.rules);
        let drains = rules.drains();
        self.census.maybe_start(now, drains);
        let Some(cursor) = self.census.cursor else {
            return 0;
        };
        let capacity = self.flows.capacity();
        let end = cursor.saturating_add(CENSUS_SLOTS_PER_CALL).min(capacity);
        for id in cursor..end {
            if !self.flows.is_live(id) {
                continue;
            }
            if self.fast_is_ending(id) {
                // Ended already, once the fast path's grace has passed.
                continue;
            }
            // No read of what XDP recorded here: nothing below depends on it (the TCP state is
            // the worker's alone), and a published flow that ends is read after its grace.
            let f = self.flows.get(id);
            if f.nat == Nat::Snat {
                continue;
            }
            let Some(i) = drains.iter().position(|d| d.covers(f.rule, f.xlat)) else {
                continue;
            };
            let tcp_open = f.proto == proto::TCP && !f.tcp.state.is_closed();
            if tcp_open && self.census.ends_flows(drains, i) {
                if f.tcp.can_reset() && self.fast_begin_drain_end(now, id) {
                    // XDP may still advance its sequence numbers: its RSTs wait for a grace.
                    self.census.ending += 1;
                } else {
                    self.drain_end(now, id, i, emit);
                }
                continue;
            }
            self.census.counting[i] += 1;
        }
        if end >= capacity {
            self.census
                .finish_round(drains, self.cfg.drain_census_interval);
        } else {
            self.census.cursor = Some(end);
        }
        1
    }

    /// Ends flow `id` (open TCP, of drain `i`) at its drain's deadline: the two RSTs of reset
    /// on idle when it is established (from its state as it stands: a published flow comes
    /// here only after its grace, with what XDP recorded read in), silently otherwise.
    fn drain_end(&mut self, now: Nanos, id: FlowId, i: usize, emit: &mut dyn FnMut(PortId, &[u8])) {
        let f = self.flows.get(id);
        let Some(progress) = self.census.progress.get_mut(i) else {
            return;
        };
        if f.tcp.can_reset() {
            progress.flows_reset += 1;
            self.send_idle_rsts(&f, emit);
        } else {
            progress.flows_ended += 1;
        }
        for dir in [ORIG, REPLY] {
            let h = self.flows.hash(&f.key(dir));
            self.late.record(h, now, f.rule);
        }
        self.remove_flow(now, id);
    }

    /// A published flow a census round handed to the fast path's grace
    /// ([`fast_begin_drain_end`](Self::fast_begin_drain_end)), back from the wheel with its
    /// state read a last time: ended as the round would have, unless its drain no longer ends
    /// flows (undrained, or its deadline moved) or it closed meanwhile (left to its linger).
    fn drain_end_flow(&mut self, now: Nanos, id: FlowId, emit: &mut dyn FnMut(PortId, &[u8])) {
        let rules = Arc::clone(&self.rules);
        let drains = rules.drains();
        let f = self.flows.get(id);
        let open = f.proto == proto::TCP && !f.tcp.state.is_closed();
        let drain = drains.iter().position(|d| {
            d.covers(f.rule, f.xlat)
                && d.action == DrainAction::Reset
                && d.deadline.is_some_and(|t| t <= now)
        });
        match drain {
            // (`remove_flow` counts it off the census.)
            Some(i) if open => self.drain_end(now, id, i, emit),
            _ => {
                self.fast_cancel_drain_end(id);
                self.census.ended_one(drains);
            }
        }
    }

    /// Points flow `id`'s forward hop where the routes lead now. A flow whose new neighbour
    /// is not known yet keeps its old hop until it is (the miss was queued for resolution).
    fn rehome_flow(&mut self, id: FlowId) {
        let f = self.flows.get(id);
        let toward = match f.nat {
            Nat::Snat => f.orig_dst,
            Nat::Dnat | Nat::None => f.xlat,
        };
        let old = f.next_hop[ORIG];
        match self.net.resolve(toward) {
            Ok(new) if new != old => {
                self.fast_withdraw(id);
                self.net.acquire(new);
                self.net.release(old);
                self.flows.get_mut(id).next_hop[ORIG] = new;
                self.store.put_hop(id, ORIG, self.net.get(new));
            }
            Ok(_) => {}
            Err(NextHopError::NoNeighbor) => self.net.rehome_incomplete(),
            Err(_) => {}
        }
    }

    fn expire_flow(&mut self, now: Nanos, id: FlowId, emit: &mut dyn FnMut(PortId, &[u8])) {
        let f = self.flows.get(id);
        let closed = f.proto == proto::TCP && f.tcp.state.is_closed();
        if !closed {
            let moved = self.may_have_moved(&f) || self.is_standby(id, &f);
            let params = self.rules.rule(f.rule);
            let counters = rule_counters(&mut self.counters, f.rule);
            counters.flows_expired_idle += 1;
            if f.proto == proto::TCP {
                let reset = params.is_some_and(|p| p.tcp_reset) && f.tcp.can_reset();
                let moved = reset && moved;
                if moved {
                    counters.flows_reset_withheld += 1;
                }
                if reset && !moved {
                    counters.flows_reset_on_idle += 1;
                    self.send_idle_rsts(&f, emit);
                    self.push_event(Event::ResetOnIdle {
                        rule: f.rule,
                        client: (f.orig_src, f.orig_sport),
                        backend: match f.nat {
                            Nat::Snat => (f.orig_dst, f.orig_dport),
                            _ => (f.xlat, f.xlat_port),
                        },
                    });
                }
                let (h0, h1) = (
                    self.flows.hash(&f.key(ORIG)),
                    self.flows.hash(&f.key(REPLY)),
                );
                self.late.record(h0, now, f.rule);
                self.late.record(h1, now, f.rule);
                self.store.put_late(&self.late, self.late.slot_of(h0));
                self.store.put_late(&self.late, self.late.slot_of(h1));
            }
        }
        self.remove_flow(now, id);
    }

    /// The two RSTs of "TCP reset on idle": to the client as if from the frontend (a reply
    /// direction packet), to the backend as if from the translated client (an original direction
    /// packet), each with the sequence number its receiver expects next.
    fn send_idle_rsts(&mut self, f: &Flow, emit: &mut dyn FnMut(PortId, &[u8])) {
        for dir in [REPLY, ORIG] {
            let t = f.translated(dir);
            let hop = *self.net.get(f.next_hop[dir]);
            let spec = RstSpec {
                src_mac: hop.src_mac,
                dst_mac: hop.dst_mac,
                vlan: hop.vlan,
                src: t.src,
                dst: t.dst,
                src_port: t.src_port,
                dst_port: t.dst_port,
                seq: f.tcp.next_seq(dir),
                ack: Some(f.tcp.next_seq(1 - dir)),
            };
            if let Some(len) = wire::build_tcp_rst(&mut self.scratch, &spec) {
                self.counters.rsts_sent += 1;
                self.counters.tx_packets += 1;
                emit(hop.port, &self.scratch[..len]);
            }
        }
    }

    /// Anti-spoofing for a packet of flow `id`, direction `dir`, received on `ingress`: a reply
    /// must come from the port the flow sends its original direction to (where the backend or
    /// the remote host is), and the original direction of an outbound flow from a port that
    /// faces the members. Checked before anything else, so a spoofed packet changes nothing.
    #[inline]
    fn wrong_port(&self, id: FlowId, dir: Dir, ingress: PortId) -> Option<DropReason> {
        if dir == REPLY {
            let hop = self.flows.track(id).next_hop[ORIG];
            (self.net.get(hop).port != ingress).then_some(DropReason::WrongSide)
        } else {
            (self.flows.nat(id) == Nat::Snat && !self.net.is_backend_side(ingress))
                .then_some(DropReason::SpoofedSource)
        }
    }

    /// A TCP flow is confirmed when its original sender acknowledges exactly the next
    /// sequence number of the reply direction: it receives what the other end sends, which
    /// a sender of spoofed segments does not (see [`crate::admission`]).
    #[cold]
    fn confirm_tcp(&mut self, id: FlowId, ack: u32) {
        let f = self.flows.get(id);
        if f.tcp.seen(REPLY) && !f.tcp.state.is_closed() && ack == f.tcp.next_seq(REPLY) {
            let rule = f.rule;
            self.unconfirmed.forget(id, rule, admission::TCP);
            self.store.put_confirmed(id);
        }
    }

    /// Evicts unconfirmed flow `id` to admit a new one.
    fn evict(&mut self, now: Nanos, id: FlowId, reason: EvictReason) {
        let rule = self.flows.rule(id);
        self.counters.evictions[reason.index()] += 1;
        rule_counters(&mut self.counters, rule).flows_evicted += 1;
        self.remove_flow(now, id);
    }

    fn remove_flow(&mut self, now: Nanos, id: FlowId) {
        if self.fast_is_ending(id) {
            // A drain was ending it (whatever removes it): the census waits for one less.
            let rules = Arc::clone(&self.rules);
            self.census.ended_one(rules.drains());
        }
        self.fast_remove(id);
        let f = self.flows.get(id);
        self.natlog.note(&f, NatEventKind::Delete, now);
        if f.nat == Nat::Snat {
            self.snat.release(f.xlat, f.proto, f.xlat_port);
        }
        for hop in f.next_hop {
            self.net.release(hop);
        }
        self.unconfirmed.forget(id, f.rule, class_of(f.proto));
        self.wheel.remove(id);
        self.flows.remove(id);
        self.store.clear(id);
        if let Some(n) = self.counters.live_flows.get_mut(usize::from(f.rule)) {
            *n = n.saturating_sub(1);
        }
    }

    /// The time at which flow `f` expires, from its state and its rule's current settings.
    fn deadline(&self, f: &Flow) -> Nanos {
        let timers = self.rules.timers();
        let timeout = if f.proto == proto::UDP {
            timers.udp_idle
        } else {
            match (f.tcp.state, f.nat) {
                (TcpState::SynSent | TcpState::SynReceived, _) => timers.tcp_half_open,
                (TcpState::Established | TcpState::Closing, _) => self
                    .rules
                    .rule(f.rule)
                    .map_or(self.cfg.orphan_idle_timeout, |r| r.idle_timeout),
                (TcpState::Closed, Nat::Snat) => timers.snat_fin_release,
                (TcpState::Reset, Nat::Snat) => timers.snat_rst_release,
                (TcpState::Closed | TcpState::Reset, _) => timers.tcp_close_linger,
            }
        };
        f.last_seen.saturating_add(timeout)
    }

    /// Checks a segment of flow `id` against the window and tracks it (see `tcp`).
    fn track(&mut self, now: Nanos, id: FlowId, dir: Dir, seg: &Segment) -> Outcome {
        let rule = self.flows.rule(id);
        let outcome = self.flows.get_mut(id).tcp.on_segment(dir, seg);
        if outcome != Outcome::OutOfWindow && seg.is_pure_syn() {
            rule_counters(&mut self.counters, rule).syns += 1;
        }
        let Outcome::Tracked(change) = outcome else {
            return outcome;
        };
        if change != Change::None {
            self.sync_note(id);
        }
        if matches!(change, Change::Closed | Change::Reset) {
            rule_counters(&mut self.counters, rule).flows_closed += 1;
            // The linger is shorter than the idle timeout the wheel holds: re-file now.
            self.flows.get_mut(id).last_seen = now;
            let d = self.deadline(&self.flows.get(id));
            self.wheel.insert(id, self.fast_filing(id, d));
        }
        outcome
    }

    /// Rewrites a packet of flow `id`, direction `dir` (the frame `buf[..len]`), and addresses
    /// it to its next hop, with that hop's VLAN tag.
    #[inline]
    fn emit(&mut self, id: FlowId, dir: Dir, buf: &mut [u8], len: usize, pkt: &Packet) -> Verdict {
        let frame = &mut buf[..len];
        if !wire::decrement_hop_limit(frame, pkt) {
            return self.drop(DropReason::HopLimit);
        }
        let track = self.flows.track(id);
        self.store.put_live(id, track);
        let hop = track.next_hop[dir];
        let rw = match self.flows.translation(id, dir) {
            Translation::Dst(addr, port) => Rewrite {
                dst: Some(addr),
                dst_port: Some(port),
                ..Rewrite::default()
            },
            Translation::Src(addr, port) => Rewrite {
                src: Some(addr),
                src_port: Some(port),
                ..Rewrite::default()
            },
            Translation::None => Rewrite::default(),
        };
        let rule = self.flows.rule(id);
        wire::rewrite(frame, pkt, &rw);
        let hop = *self.net.get(hop);
        // Last: the tag moves the IP header, which `pkt`'s offsets describe.
        let Some(len) = wire::retag(buf, len, pkt.vlan, hop.vlan) else {
            // No room to add the tag (a caller without room in its buffers).
            return self.drop(DropReason::VlanTag);
        };
        buf[0..6].copy_from_slice(&hop.dst_mac);
        buf[6..12].copy_from_slice(&hop.src_mac);
        let c = rule_counters(&mut self.counters, rule);
        c.packets[dir] += 1;
        c.bytes[dir] += len as u64;
        self.counters.tx_packets += 1;
        Verdict::Tx {
            port: hop.port,
            len: len as u16,
        }
    }

    /// A packet without a flow.
    #[allow(clippy::too_many_arguments)]
    fn miss(
        &mut self,
        now: Nanos,
        ingress: PortId,
        buf: &mut [u8],
        len: usize,
        pkt: &Packet,
        tuple: &FlowTuple,
        hash: u64,
    ) -> Verdict {
        let is_tcp = pkt.proto == proto::TCP;
        let seg = Segment::of(pkt);
        let is_syn = seg.is_pure_syn();
        if let Some(rule) = self.rules.match_inbound(pkt.proto, pkt.dst, pkt.dst_port) {
            let Some((unknown_flow, floating)) = self
                .rules
                .rule(rule)
                .map(|p| (p.unknown_flow, p.floating_ip))
            else {
                return self.drop(DropReason::NoRule);
            };
            let mut track = if is_tcp {
                TcpTrack::from_syn(&seg)
            } else {
                TcpTrack::NONE
            };
            if is_tcp && !is_syn {
                self.count_late(hash, now);
                let unknown_flow = match unknown_flow {
                    UnknownFlowPolicy::Drop if self.cfg.cluster_pickup => UnknownFlowPolicy::Pickup,
                    policy => policy,
                };
                match unknown_flow {
                    UnknownFlowPolicy::Drop => return self.drop_for(rule, DropReason::NoFlow),
                    UnknownFlowPolicy::Reset => {
                        return self.answer_rst(now, rule, ingress, &mut buf[..len], pkt)
                    }
                    // Only what looks like a segment of a live connection creates state: ACK
                    // set, no SYN, no RST (a bare FIN, a SYN-ACK or an RST without a flow is
                    // not picked up).
                    UnknownFlowPolicy::Pickup if pkt.tcp_flags & (ACK | SYN | RST) != ACK => {
                        return self.drop_for(rule, DropReason::NoFlow)
                    }
                    UnknownFlowPolicy::Pickup => {
                        track = TcpTrack::picked_up(&seg);
                        rule_counters(&mut self.counters, rule).flows_picked_up += 1;
                    }
                }
            }
            // The member XDP already sent this SYN to, when it is one XDP forwarded.
            let forced = self.fast_new_forced();
            let Some(backend) = forced.or_else(|| self.rules.select_backend(rule, tuple)) else {
                return self.drop_for(rule, DropReason::NoBackend);
            };
            let flow = Flow {
                orig_src: pkt.src,
                orig_dst: pkt.dst,
                xlat: backend.addr,
                orig_sport: pkt.src_port,
                orig_dport: pkt.dst_port,
                xlat_port: if floating { pkt.dst_port } else { backend.port },
                proto: pkt.proto,
                nat: if floating { Nat::None } else { Nat::Dnat },
                rule,
                next_hop: [0; 2],
                tcp: track,
                last_seen: now,
            };
            return self.create(ingress, buf, len, pkt, flow, backend.addr, hash);
        }
        if let Some((rule, blocks)) = self.rules.match_outbound(pkt.proto, pkt.src) {
            if !self.net.is_backend_side(ingress) {
                // A member's address from outside: taking SNAT ports for it would let anyone
                // exhaust the member's ports or send as the appliance.
                return self.drop_for(rule, DropReason::SpoofedSource);
            }
            if is_tcp && !is_syn {
                self.count_late(hash, now);
                return self.drop_for(rule, DropReason::NoFlow);
            }
            let Some((addr, port)) = self.snat.allocate(blocks, pkt.proto, hash) else {
                if !self.exhausted.contains(&pkt.src) {
                    self.exhausted.push(pkt.src);
                    self.push_event(Event::SnatExhausted {
                        rule,
                        member: pkt.src,
                    });
                }
                return self.drop_for(rule, DropReason::SnatExhausted);
            };
            self.exhausted.retain(|&m| m != pkt.src);
            let flow = Flow {
                orig_src: pkt.src,
                orig_dst: pkt.dst,
                xlat: addr,
                orig_sport: pkt.src_port,
                orig_dport: pkt.dst_port,
                xlat_port: port,
                proto: pkt.proto,
                nat: Nat::Snat,
                rule,
                next_hop: [0; 2],
                tcp: if is_tcp {
                    TcpTrack::from_syn(&seg)
                } else {
                    TcpTrack::NONE
                },
                last_seen: now,
            };
            return self.create(ingress, buf, len, pkt, flow, pkt.dst, hash);
        }
        if is_tcp && self.count_late(hash, now) {
            return self.drop(DropReason::NoFlow);
        }
        self.drop(DropReason::NoRule)
    }

    /// Inserts a new flow and forwards its first packet toward `toward`. An outbound flow's
    /// SNAT port (allocated by the caller) is released exactly once if the flow does not come
    /// to be: here when it is refused, by `remove_flow` once it exists.
    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        ingress: PortId,
        buf: &mut [u8],
        len: usize,
        pkt: &Packet,
        flow: Flow,
        toward: Addr,
        hash: u64,
    ) -> Verdict {
        let rule = flow.rule;
        let id = match self.insert_flow(ingress, buf, pkt, flow, toward, hash) {
            Ok(id) => id,
            Err(reason) => {
                if flow.nat == Nat::Snat {
                    self.snat.release(flow.xlat, flow.proto, flow.xlat_port);
                }
                return self.drop_for(rule, reason);
            }
        };
        let verdict = self.emit(id, ORIG, buf, len, pkt);
        if matches!(verdict, Verdict::Drop(_)) {
            // A flow never outlives a first packet that did not leave (the hop limit, the only
            // reason `emit` refuses, is checked before any flow is created).
            self.remove_flow(flow.last_seen, id);
            return verdict;
        }
        let c = rule_counters(&mut self.counters, rule);
        c.flows_created += 1;
        if pkt.proto == proto::TCP && pkt.tcp_flags & (SYN | ACK) == SYN {
            c.syns += 1;
        }
        verdict
    }

    /// Resolves both next hops of `flow`, inserts it and takes its references on them.
    fn insert_flow(
        &mut self,
        ingress: PortId,
        frame: &[u8],
        pkt: &Packet,
        mut flow: Flow,
        toward: Addr,
        hash: u64,
    ) -> Result<FlowId, DropReason> {
        // Admission first (it may evict an unconfirmed flow, releasing that flow's hops),
        // then this flow's hops, so that no reference taken here is released by an eviction.
        let rule = flow.rule;
        let class = class_of(flow.proto);
        let full = self.flows.len() >= self.flows.capacity() as usize;
        match self.unconfirmed.decide(rule, class, full) {
            Admission::Admit => {}
            Admission::Evict(victim, reason) => self.evict(flow.last_seen, victim, reason),
            Admission::Refuse => return Err(DropReason::FlowTableFull),
        }
        let forward = self.net.resolve(toward).map_err(hop_error)?;
        let mut src_mac = [0u8; 6];
        src_mac.copy_from_slice(&frame[6..12]);
        let back: NextHopId = self
            .net
            .learn(ingress, src_mac, pkt.vlan)
            .map_err(hop_error)?;
        flow.next_hop = [forward, back];
        let id = match self.flows.insert_new(flow, hash) {
            Ok(id) => id,
            Err(e) => {
                // A sender learned for this flow alone goes with it.
                self.net.release_if_unused(back);
                return Err(match e {
                    InsertError::Full => DropReason::FlowTableFull,
                    InsertError::Conflict => DropReason::TupleConflict,
                });
            }
        };
        self.net.acquire(forward);
        self.net.acquire(back);
        self.unconfirmed.admit(id, rule, class);
        if self.late.forget(hash) {
            self.store.put_late(&self.late, self.late.slot_of(hash));
        }
        self.natlog
            .note(&self.flows.get(id), NatEventKind::Create, flow.last_seen);
        live_flows(&mut self.counters, rule);
        self.sync_note(id);
        let deadline = self.deadline(&self.flows.get(id));
        self.wheel.insert(id, deadline);
        let hops = [self.net.get(forward), self.net.get(back)];
        self.store.put(id, &self.flows.get(id), false, hops);
        Ok(id)
    }

    /// The `reset` unknown-flow policy: answer the segment with an RST back where it came from.
    fn answer_rst(
        &mut self,
        now: Nanos,
        rule: RuleId,
        ingress: PortId,
        frame: &mut [u8],
        pkt: &Packet,
    ) -> Verdict {
        if pkt.tcp_flags & RST != 0 {
            // Never answer an RST with an RST.
            return self.drop_for(rule, DropReason::NoFlow);
        }
        if !self.resets.take(now) {
            return self.drop_for(rule, DropReason::ResetRateLimited);
        }
        let len = wire::reply_rst_in_place(frame, pkt);
        if len == 0 {
            // The builder refuses input it cannot answer (it re-checks what `pkt` says).
            return self.drop_for(rule, DropReason::NoFlow);
        }
        rule_counters(&mut self.counters, rule).unknown_flow_resets += 1;
        self.counters.tx_packets += 1;
        Verdict::Tx {
            port: ingress,
            len: len as u16,
        }
    }

    /// Counts a late packet if `hash` is the key of a flow that expired idle recently.
    fn count_late(&mut self, hash: u64, now: Nanos) -> bool {
        let window = self.rules.timers().late_window;
        match self.late.check(hash, now, window) {
            Some(rule) => {
                rule_counters(&mut self.counters, rule).late_packets += 1;
                true
            }
            None => false,
        }
    }

    fn push_event(&mut self, e: Event) {
        if self.events.len() < self.cfg.event_capacity {
            self.events.push(e);
        } else {
            self.counters.events_dropped += 1;
        }
    }

    fn drop(&mut self, reason: DropReason) -> Verdict {
        self.counters.drops[reason.index()] += 1;
        Verdict::Drop(reason)
    }

    fn drop_for(&mut self, rule: RuleId, reason: DropReason) -> Verdict {
        let c = rule_counters(&mut self.counters, rule);
        match reason {
            DropReason::NoFlow => c.no_flow += 1,
            DropReason::NoBackend => c.no_backend += 1,
            DropReason::SnatExhausted => c.snat_exhausted += 1,
            DropReason::FlowTableFull => c.flow_table_full += 1,
            DropReason::OutOfWindow => c.out_of_window += 1,
            DropReason::ResetRateLimited => c.reset_rate_limited += 1,
            DropReason::SpoofedSource => c.spoofed_source += 1,
            DropReason::WrongSide => c.wrong_side += 1,
            _ => {}
        }
        self.drop(reason)
    }
}

/// The worker among `workers` that owns the flow of `frame` under `rules` with steering key
/// `key` (see [`Engine::owner`]); `None` for a frame that does not parse. For callers without
/// an engine at hand (the daemon's self-probe picks the worker to inject a probe at: it must
/// use the key its workers were given).
pub fn owner(rules: &RuleSet, frame: &[u8], workers: u16, key: &HashKey) -> Option<u16> {
    if workers <= 1 {
        return Some(0);
    }
    let pkt = wire::parse(frame).ok()?;
    let (addr, port) = if rules.is_frontend(pkt.dst) {
        (pkt.src, pkt.src_port)
    } else {
        (pkt.dst, pkt.dst_port)
    };
    Some(steer(key, addr, port, workers))
}

/// The worker of endpoint `addr`:`port` among `workers`: the same on every worker that holds
/// the same key.
pub fn steer(key: &HashKey, addr: Addr, port: u16, workers: u16) -> u16 {
    let h = key.endpoint(addr, port);
    ((u128::from(h) * u128::from(workers.max(1))) >> 64) as u16
}

fn rule_counters(c: &mut Counters, rule: RuleId) -> &mut RuleCounters {
    let i = rule as usize;
    if c.rules.len() <= i {
        // Only reached for a rule id beyond the set's bound (never in practice: set_rules sizes
        // the array); keeps the hot path free of a panic.
        c.rules.resize(i + 1, RuleCounters::default());
    }
    &mut c.rules[i]
}

/// Counts a new flow of `rule` in the live-flow gauge.
fn live_flows(c: &mut Counters, rule: RuleId) {
    let i = usize::from(rule);
    if c.live_flows.len() <= i {
        c.live_flows.resize(i + 1, 0);
    }
    c.live_flows[i] += 1;
}

/// The admission class of a flow of IP protocol `proto`.
fn class_of(proto: u8) -> admission::Class {
    if proto == proto::UDP {
        admission::UDP
    } else {
        admission::TCP
    }
}

fn hop_error(e: NextHopError) -> DropReason {
    match e {
        NextHopError::NoRoute => DropReason::NoRoute,
        NextHopError::NoNeighbor => DropReason::NoNeighbor,
        NextHopError::TableFull => DropReason::NextHopTableFull,
    }
}

/// Whether any timeout got shorter between two rule sets (existing flows must be re-filed).
fn timeouts_shrank(old: &RuleSet, new: &RuleSet) -> bool {
    let (a, b) = (old.timers(), new.timers());
    if b.udp_idle < a.udp_idle
        || b.tcp_close_linger < a.tcp_close_linger
        || b.tcp_half_open < a.tcp_half_open
        || b.snat_fin_release < a.snat_fin_release
        || b.snat_rst_release < a.snat_rst_release
    {
        return true;
    }
    (0..old.rule_id_bound().min(new.rule_id_bound())).any(|i| {
        let id = i as RuleId;
        matches!((old.rule(id), new.rule(id)), (Some(o), Some(n)) if n.idle_timeout < o.idle_timeout)
    }) || (0..old.rule_id_bound()).any(|i| {
        // An id no longer in use: its flows (if any were left) fall back to the orphan timeout,
        // which may be shorter.
        let id = i as RuleId;
        old.rule(id).is_some() && new.rule(id).is_none()
    })
}
