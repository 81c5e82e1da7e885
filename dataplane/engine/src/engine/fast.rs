//! The engine's side of the XDP fast path (`crate::fast`): which flows are published, their
//! pairs of lines, and the expiry protocol that keeps reset on idle exact while XDP forwards.
//!
//! A flow is published (a pair of lines written, both keys indexed, then `FAST` set) after a
//! packet the worker processed leaves it eligible: IPv4; TCP established with both directions
//! seen and confirmed, or UDP confirmed; both hops untagged on ports that may carry fast
//! frames; a rule id XDP can count; not a UDP flow whose backend is down (it must move at its
//! next client packet); not a cluster peer's standby copy. It is withdrawn (keys tombstoned,
//! lines cleared, the pair's reuse deferred to after a grace) when any of that stops holding
//! (a FIN or RST tracked, a hop changed, a rule or port change) and when it is removed.
//!
//! The worker reads a published flow's state from its lines before it uses it (a punted
//! packet, an expiry check, a listing, an export) and writes back what it tracked itself;
//! both sides only advance `next_seq` and `last_seen` and only grow `max_win`.
//!
//! Expiry of a published flow: it is filed at `deadline - lead`. When it fires and the flow is
//! due within the lead, `FAST` is cleared (every later packet reaches the worker), the grace
//! clock's epoch is noted and a grace asked for, and the flow is filed at its deadline. Then,
//! once two grace rounds have passed (else one more tick, counted `fast_grace_waits`), no XDP
//! invocation can still be updating the lines: the flow's state is read a last time; if a
//! packet moved its deadline it is fast again, else it expires exactly as a flow that never
//! was fast (its RSTs carry the sequence numbers XDP advanced).
//!
//! A drain's deadline ends a published flow the same way: the census round clears `FAST`,
//! notes the epoch and hands the flow to the wheel (due at once, then a tick at a time); once
//! two grace rounds have passed the flow is read a last time and reset
//! ([`FastExpiry::DrainEnd`]). Meanwhile the flow keeps its pair with `FAST` cleared: its
//! packets reach the worker, which forwards and tracks them but neither sets `FAST` again nor
//! withdraws it. The end is called off when the drain no longer ends flows by then (the
//! member undrained, the deadline moved) or the flow becomes a cluster peer's standby copy.
//!
//! A flow withdrawn while it lives on (no longer eligible) is read back at the withdrawal,
//! without a grace: a segment XDP was forwarding at that very moment may advance the old line
//! after it, and that advance is not seen. The flow's next segment of that direction (now
//! through the worker) is in the window and brings `next_seq` up to date; only a direction
//! that falls silent right then is reset on idle with the number before that segment.

use super::Engine;
use crate::fast::{
    from_stamp, line, ports_word, to_stamp, wire_word, FastTable, FAST_RULES, STATE_FAST,
    STATE_PICKED_UP, STATE_TCP, STATE_WSCALE_SHIFT,
};
use crate::flow::{Flow, FlowId, FlowTrack, Nat};
use crate::net::{NextHop, PortId};
use crate::tcp::{Dir, ORIG, REPLY};
use crate::time::Nanos;
use crate::wire::proto;

/// What the wheel's look at a published flow decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FastExpiry {
    /// Filed again: it lives, or waits for a grace.
    Filed,
    /// It expires idle now (its state read a last time).
    Expire,
    /// A drain's deadline ends it now (its state read a last time).
    DrainEnd,
}

/// No pair: the flow is not published.
pub(super) const NO_PAIR: u32 = u32::MAX;

/// The published table of one engine and, per flow slot, what the flow has in it.
#[derive(Debug, Clone)]
pub(super) struct FastState {
    table: FastTable,
    /// Per flow slot: its pair, or [`NO_PAIR`].
    pairs: Vec<u32>,
    /// Per flow slot: `epoch + 1` read when `FAST` was cleared ahead of its idle deadline,
    /// or 0 (no expiry under way).
    fences: Vec<u64>,
    /// Per flow slot: a drain's deadline is ending the flow ([`Engine::fast_begin_drain_end`]):
    /// `FAST` stays cleared and the pair stays until the flow is reset or the end is called
    /// off, whatever its packets do meanwhile.
    ending: Vec<bool>,
    /// Flows with a pair.
    published: usize,
    /// [`crate::net::NextHops::hop_changes`] as last checked.
    hop_changes: u64,
    /// Restored flows and the pair a previous process left them in ([`FastTable::resume`]),
    /// read back once more when that table frees those pairs.
    resumed: Vec<(FlowId, u32)>,
    /// The walk over the flow slots that withdraws what a rule, port or neighbour change
    /// made stale ([`Engine::fast_recheck_all`]), a bounded number of slots per `expire`.
    recheck: Recheck,
}

/// Where the recheck walk stands.
#[derive(Debug, Clone, Copy, Default)]
struct Recheck {
    /// The next flow slot to look at.
    next: u32,
    /// Slots still to look at; 0: no walk under way.
    left: u32,
    /// Whether the lines are compared with the hops too (a neighbour changed in place).
    lines: bool,
}

impl FastState {
    /// Stops XDP forwarding flow `id` (published in `pair`) and asks for a grace; the flow's
    /// fence remembers the epoch that grace must pass.
    fn fence(&mut self, id: FlowId, pair: u32) {
        self.table.set_fast(pair, false);
        let grace = self.table.grace();
        self.fences[id as usize] = grace.epoch() + 1;
        grace.want();
    }

    /// Whether the grace flow `id`'s fence waits for has passed; when not, asks for it again.
    fn fence_passed(&self, id: FlowId) -> bool {
        let grace = self.table.grace();
        let passed = grace.passed(self.fences[id as usize].saturating_sub(1));
        if !passed {
            grace.want();
        }
        passed
    }

    fn pair(&self, id: FlowId) -> Option<u32> {
        match self.pairs.get(id as usize) {
            Some(&p) if p != NO_PAIR => Some(p),
            _ => None,
        }
    }
}

/// Merges what the lines of `pair` hold into `f`: next sequence numbers and windows (TCP) and
/// the latest `last_seen` of both directions, read in serial order around `near`.
fn merge(table: &FastTable, pair: u32, proto: u8, f: &mut FlowTrack, near: Nanos) {
    for dir in [ORIG, REPLY] {
        let (seq, win, stamp) = table.counters_of(2 * pair + dir as u32);
        if proto == proto::TCP {
            f.tcp.merge(dir, seq, win);
        }
        if stamp != 0 {
            f.last_seen = f.last_seen.max(from_stamp(stamp, near));
        }
    }
}

/// The match words of direction `dir` of (IPv4) flow `f`: its source and destination address
/// and its ports, as XDP reads them from a frame.
fn key_words(f: &Flow, dir: Dir) -> [u32; 3] {
    let k = f.key(dir);
    [
        wire_word(k.src.v4_bytes()),
        wire_word(k.dst.v4_bytes()),
        ports_word(k.src_port, k.dst_port),
    ]
}

/// The line of direction `dir` of flow `f`, whose hops are `hops`, `FAST` set.
fn line_of(f: &Flow, dir: Dir, hops: &[NextHop; 2]) -> [u32; 16] {
    let mut w = [0u32; 16];
    let mut state = STATE_FAST;
    if f.proto == proto::TCP {
        state |= STATE_TCP | (u32::from(f.tcp.window_scale(dir)) << STATE_WSCALE_SHIFT);
        if f.tcp.is_picked_up() {
            state |= STATE_PICKED_UP;
        }
        w[line::NEXT_SEQ] = f.tcp.next_seq(dir);
        w[line::MAX_WIN] = f.tcp.max_window(dir);
    }
    w[line::STATE] = state;
    // A reply comes from where the original direction goes; the original direction from
    // where the flow's first packet came (the hop learned back to its sender).
    w[line::INGRESS_PORT] = u32::from(hops[1 - dir].port);
    w[line::TX_PORT] = u32::from(hops[dir].port);
    w[line::PROTO_RULE] = u32::from(f.proto) | (u32::from(f.rule) << 16);
    w[line::MATCH_SADDR..=line::MATCH_PORTS].copy_from_slice(&key_words(f, dir));
    let t = f.translated(dir);
    w[line::NEW_SADDR] = wire_word(t.src.v4_bytes());
    w[line::NEW_DADDR] = wire_word(t.dst.v4_bytes());
    w[line::NEW_PORTS] = ports_word(t.src_port, t.dst_port);
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&hops[dir].dst_mac);
    macs[6..].copy_from_slice(&hops[dir].src_mac);
    for (i, c) in macs.chunks_exact(4).enumerate() {
        w[line::MACS + i] = wire_word([c[0], c[1], c[2], c[3]]);
    }
    w[line::LAST_SEEN] = to_stamp(f.last_seen);
    w
}

impl Engine {
    /// Takes `table` as this engine's part of the XDP fast path: from now on eligible flows
    /// are published to it after their next packet. Flows the engine holds already start
    /// unpublished.
    ///
    /// Attached before [`attach_store`](Self::attach_store), it also changes how flows are
    /// restored, because the store never hears of the packets XDP forwards (XDP may have
    /// forwarded a flow since its record was last written, and while no worker ran):
    /// - a table made by [`FastTable::resume`] over the memory the previous process used
    ///   holds what XDP recorded: each restored flow it still had published takes its
    ///   `next_seq`, `max_win` and `last_seen` from there, at the restore and once more a
    ///   grace later (when the old pairs are freed; no flow is published before), which is
    ///   exact;
    /// - with a fresh table, a restored flow counts as seen at the restore (`last_seen` = the
    ///   later of the stored one and `now`): its stored time proves nothing about its
    ///   idleness. A flow really idle lives one timeout longer, a flow still in use is not
    ///   reset by mistake; its RSTs are exact once each direction has sent a segment the
    ///   worker saw (a direction XDP forwarded data of while no worker ran, and that is
    ///   silent after the restart, is reset with the stored sequence number).
    pub fn attach_fast(&mut self, table: FastTable) {
        let n = self.flows.capacity() as usize;
        self.fast = Some(Box::new(FastState {
            table,
            pairs: vec![NO_PAIR; n],
            fences: vec![0; n],
            ending: vec![false; n],
            published: 0,
            hop_changes: self.net.hop_changes(),
            resumed: Vec::new(),
            recheck: Recheck::default(),
        }));
        self.attach_fast_new();
    }

    /// The fast table, when one is attached.
    pub fn fast_table(&self) -> Option<&FastTable> {
        self.fast.as_deref().map(|f| &f.table)
    }

    /// Whether flow `id` is published (has a pair in the fast table).
    pub fn is_fast_published(&self, id: FlowId) -> bool {
        self.fast.as_deref().and_then(|f| f.pair(id)).is_some()
    }

    /// The pair of lines flow `id` is published in (lines `2p` and `2p + 1`).
    pub fn fast_pair(&self, id: FlowId) -> Option<u32> {
        self.fast.as_deref().and_then(|f| f.pair(id))
    }

    /// Flows published now.
    pub fn fast_published(&self) -> usize {
        self.fast.as_deref().map_or(0, |f| f.published)
    }

    /// Tells whether frames may arrive and leave on `port` through XDP; flows on a port that
    /// may no longer are withdrawn (over the next [`expire`](Self::expire) calls).
    pub fn set_fast_port(&mut self, port: PortId, ok: bool) {
        let Some(fs) = self.fast.as_deref_mut() else {
            return;
        };
        let was = fs.table.port_ok(port);
        fs.table.set_port_ok(port, ok);
        if was != ok {
            self.fast_new_changed();
        }
        if was && !ok {
            self.fast_recheck_all(false);
        }
    }

    /// Whether flow `id` may be forwarded by XDP now.
    fn fast_eligible(&self, id: FlowId) -> bool {
        let Some(fs) = self.fast.as_deref() else {
            return false;
        };
        if fs.table.has_left() {
            // Its keys may still lead to a pair the previous process left.
            return false;
        }
        let f = self.flows.get(id);
        let state_ok = match f.proto {
            proto::TCP => f.tcp.can_reset(),
            proto::UDP => true,
            _ => false,
        };
        if !state_ok
            || f.rule >= FAST_RULES
            || !(f.orig_src.is_v4() && f.orig_dst.is_v4() && f.xlat.is_v4())
            || self.unconfirmed.is_unconfirmed(id)
        {
            return false;
        }
        let hops_ok = f.next_hop.iter().all(|&h| {
            let hop = self.net.get(h);
            hop.vlan.is_none() && fs.table.port_ok(hop.port)
        });
        if !hops_ok {
            return false;
        }
        if f.proto == proto::UDP && f.nat != Nat::Snat && self.rules.backend_down(f.rule, f.xlat) {
            return false;
        }
        !self.is_standby(id, &f)
    }

    /// Reads what XDP recorded for flow `id` into the flow, around `now`.
    #[inline]
    pub(super) fn fast_pull(&mut self, now: Nanos, id: FlowId) {
        let Some(fs) = self.fast.as_deref() else {
            return;
        };
        if let Some(pair) = fs.pair(id) {
            let proto = self.flows.get(id).proto;
            merge(&fs.table, pair, proto, self.flows.get_mut(id), now);
        }
    }

    /// Flow `id` as it stands with what XDP recorded (for listings and exports, which do not
    /// change the engine).
    pub(super) fn fast_view(&self, id: FlowId, f: &Flow) -> Flow {
        let mut f = *f;
        if let Some(fs) = self.fast.as_deref() {
            if let Some(pair) = fs.pair(id) {
                let mut track = f.track();
                merge(&fs.table, pair, f.proto, &mut track, f.last_seen);
                f.set_track(track);
            }
        }
        f
    }

    /// After the worker processed a packet of flow `id`, direction `dir`, at `now` (tracked,
    /// `last_seen` refreshed): writes what it tracked back into a published flow's line,
    /// withdraws it when its TCP state no longer allows it, publishes it when it has become
    /// eligible.
    ///
    /// A packet changes nothing else [`fast_eligible`](Self::fast_eligible) looks at: the
    /// rule, the ports and the hops change by their own paths, which withdraw the flows they
    /// affect ([`fast_recheck_all`](Self::fast_recheck_all), `rehome_flow`), and a published
    /// flow was confirmed, IPv4, and no standby copy (becoming one withdraws it).
    #[inline]
    pub(super) fn fast_after_packet(&mut self, now: Nanos, id: FlowId, dir: Dir) {
        let Some(fs) = self.fast.as_deref() else {
            return;
        };
        match fs.pair(id) {
            Some(pair) => {
                let f = self.flows.get(id);
                let tcp = f.proto == proto::TCP;
                fs.table.push(
                    2 * pair + dir as u32,
                    tcp.then(|| f.tcp.next_seq(dir)),
                    tcp.then(|| f.tcp.max_window(dir)),
                    to_stamp(now),
                );
                if fs.ending[id as usize] {
                    // A drain is ending it: neither fast again nor withdrawn (its end reads
                    // the pair a last time once the grace has passed).
                    return;
                }
                if tcp && !f.tcp.can_reset() {
                    self.fast_withdraw(id);
                } else if fs.fences[id as usize] != 0 {
                    // Its expiry was under way: this packet moved the deadline, so XDP may
                    // forward it again (setting `FAST` needs no grace).
                    self.fast_revive(id, pair);
                }
            }
            None => {
                if self.fast_eligible(id) {
                    self.fast_publish(id);
                }
            }
        }
    }

    #[cold]
    fn fast_publish(&mut self, id: FlowId) {
        let f = self.flows.get(id);
        let hops = [
            *self.net.get(f.next_hop[ORIG]),
            *self.net.get(f.next_hop[REPLY]),
        ];
        let lines = [line_of(&f, ORIG, &hops), line_of(&f, REPLY, &hops)];
        let Some(fs) = self.fast.as_deref_mut() else {
            return;
        };
        match fs.table.publish(&lines) {
            Ok(pair) => {
                fs.pairs[id as usize] = pair;
                fs.fences[id as usize] = 0;
                fs.published += 1;
                self.counters.fast_published += 1;
                let at = self.fast_filing(id, self.deadline(&f));
                self.wheel.insert(id, at);
            }
            Err(_) => self.counters.fast_publish_failed += 1,
        }
    }

    /// Sets `FAST` again on flow `id` (`pair`) whose expiry was under way and files it anew.
    fn fast_revive(&mut self, id: FlowId, pair: u32) {
        let Some(fs) = self.fast.as_deref_mut() else {
            return;
        };
        fs.table.set_fast(pair, true);
        fs.fences[id as usize] = 0;
        let at = self.fast_filing(id, self.deadline(&self.flows.get(id)));
        self.wheel.insert(id, at);
    }

    /// Withdraws flow `id` from the fast path (what XDP recorded read into it first). A flow
    /// a drain is ending keeps its pair (`FAST` is cleared already) until
    /// [`fast_remove`](Self::fast_remove) or the end is called off.
    pub(super) fn fast_withdraw(&mut self, id: FlowId) {
        let Some(fs) = self.fast.as_deref_mut() else {
            return;
        };
        if fs.ending[id as usize] {
            return;
        }
        let Some(pair) = fs.pair(id) else {
            return;
        };
        let proto = self.flows.get(id).proto;
        let f = self.flows.get_mut(id);
        let near = f.last_seen;
        merge(&fs.table, pair, proto, f, near);
        fs.table.withdraw(pair, true);
        fs.pairs[id as usize] = NO_PAIR;
        fs.fences[id as usize] = 0;
        fs.published -= 1;
        self.counters.fast_unpublished += 1;
    }

    /// Withdraws flow `id`, which is being removed, even when a drain was ending it.
    pub(super) fn fast_remove(&mut self, id: FlowId) {
        if let Some(fs) = self.fast.as_deref_mut() {
            fs.ending[id as usize] = false;
        }
        self.fast_withdraw(id);
    }

    /// Calls off a drain's end of flow `id` (it becomes a standby copy: the peer that owns it
    /// ends it); true when one was under way. The flow keeps its pair until withdrawn.
    pub(super) fn fast_drop_drain_end(&mut self, id: FlowId) -> bool {
        match self.fast.as_deref_mut() {
            Some(fs) if fs.ending[id as usize] => {
                fs.ending[id as usize] = false;
                true
            }
            _ => false,
        }
    }

    /// Whether a drain's deadline is ending flow `id` through the fast path's grace.
    pub(super) fn fast_is_ending(&self, id: FlowId) -> bool {
        self.fast
            .as_deref()
            .is_some_and(|fs| fs.ending[id as usize])
    }

    /// A drain's deadline ends flow `id` at `now` with RSTs: when it is published, `FAST` is
    /// cleared, a grace asked for and the flow handed to the wheel, which ends it
    /// ([`FastExpiry::DrainEnd`]) once no XDP invocation can still advance its lines; its
    /// packets meanwhile reach the worker and do not publish it again. False when the flow is
    /// not published: it can be reset at once.
    pub(super) fn fast_begin_drain_end(&mut self, now: Nanos, id: FlowId) -> bool {
        let Some(fs) = self.fast.as_deref_mut() else {
            return false;
        };
        let Some(pair) = fs.pair(id) else {
            return false;
        };
        fs.fence(id, pair);
        fs.ending[id as usize] = true;
        self.wheel.insert(id, now);
        true
    }

    /// A drain's end of flow `id` is called off (the member is no longer drained, or the flow
    /// closed meanwhile): the flow is withdrawn (published again at its next packet if it is
    /// eligible) and filed at its deadline.
    pub(super) fn fast_cancel_drain_end(&mut self, id: FlowId) {
        if let Some(fs) = self.fast.as_deref_mut() {
            fs.ending[id as usize] = false;
        }
        self.fast_withdraw(id);
        let d = self.deadline(&self.flows.get(id));
        self.wheel.insert(id, d);
    }

    /// When the wheel should look at flow `id`, due at `deadline`: a published flow whose
    /// expiry has not started the lead earlier; a flow a drain is ending at once (it waits
    /// for its grace a tick at a time).
    pub(super) fn fast_filing(&self, id: FlowId, deadline: Nanos) -> Nanos {
        match self.fast.as_deref() {
            Some(fs) if fs.ending[id as usize] => 0,
            Some(fs) if fs.pair(id).is_some() && fs.fences[id as usize] == 0 => {
                deadline.saturating_sub(fs.table.grace().expiry_lead(self.cfg.fast_expiry_lead))
            }
            _ => deadline,
        }
    }

    /// The expiry protocol for a published flow `id` handed out by the wheel at `now`.
    pub(super) fn fast_expiry_step(&mut self, now: Nanos, id: FlowId) -> FastExpiry {
        if self.fast_is_ending(id) {
            return self.fast_drain_end_step(now, id);
        }
        match self.fast_idle_step(now, id) {
            true => FastExpiry::Filed,
            false => FastExpiry::Expire,
        }
    }

    /// A flow a drain is ending, handed out by the wheel at `now`: filed one tick later while
    /// the grace has not passed, else read a last time and handed back for its RSTs.
    fn fast_drain_end_step(&mut self, now: Nanos, id: FlowId) -> FastExpiry {
        let tick = self.wheel.tick();
        let Some(fs) = self.fast.as_deref() else {
            return FastExpiry::DrainEnd;
        };
        if !fs.fence_passed(id) {
            self.counters.fast_grace_waits += 1;
            self.wheel.insert(id, now.saturating_add(tick));
            return FastExpiry::Filed;
        }
        self.fast_pull(now, id);
        FastExpiry::DrainEnd
    }

    /// Idle expiry of a published flow: true when it was filed again (it lives, or waits for
    /// the grace), false when it expires now.
    fn fast_idle_step(&mut self, now: Nanos, id: FlowId) -> bool {
        self.fast_pull(now, id);
        let deadline = self.deadline(&self.flows.get(id));
        let tick = self.wheel.tick();
        let Some(fs) = self.fast.as_deref_mut() else {
            return false;
        };
        let lead = fs.table.grace().expiry_lead(self.cfg.fast_expiry_lead);
        let Some(pair) = fs.pair(id) else {
            return false;
        };
        if fs.fences[id as usize] == 0 {
            if deadline > now.saturating_add(lead) {
                self.wheel.insert(id, deadline - lead);
                return true;
            }
            // Due within the lead: from now on every packet of the flow reaches the worker.
            fs.fence(id, pair);
            self.wheel.insert(id, deadline);
            return true;
        }
        if !fs.fence_passed(id) {
            self.counters.fast_grace_waits += 1;
            self.wheel.insert(id, now.saturating_add(tick));
            return true;
        }
        if deadline > now.saturating_add(lead) {
            // A packet the worker processed since moved the deadline: fast again.
            self.fast_revive(id, pair);
            return true;
        }
        if deadline > now {
            // Handed out before its deadline: a wheel slot of a higher level fires at its
            // start, which may fall between the lead and the deadline. Nothing moved the
            // deadline (a packet would have put it a whole timeout away), and the grace has
            // passed: filed at the deadline, the flow expires then without another grace.
            self.wheel.insert(id, deadline);
            return true;
        }
        false
    }

    /// Withdraws every published flow that is no longer eligible (a rule, port or health
    /// change) or, with `lines`, whose lines no longer say what its hops say (a neighbour
    /// changed in place): starts a walk over every flow slot, which
    /// [`expire`](Self::expire) makes a bounded number of slots per call
    /// ([`fast_recheck_step`](Self::fast_recheck_step)). A walk under way goes on from where
    /// it stands for a full lap, so every flow is looked at after the latest change.
    pub(super) fn fast_recheck_all(&mut self, lines: bool) {
        let capacity = self.flows.capacity();
        let Some(fs) = self.fast.as_deref_mut() else {
            return;
        };
        if fs.published == 0 {
            return;
        }
        fs.recheck.left = capacity;
        fs.recheck.lines |= lines;
    }

    /// Whether a recheck walk is under way.
    fn fast_recheck_pending(&self) -> bool {
        self.fast.as_deref().is_some_and(|fs| fs.recheck.left > 0)
    }

    /// Looks at up to `budget` slots of the recheck walk; returns how many it did.
    pub(super) fn fast_recheck_step(&mut self, budget: usize) -> usize {
        let capacity = self.flows.capacity();
        let Some(fs) = self.fast.as_deref_mut() else {
            return 0;
        };
        let walk = fs.recheck;
        if walk.left == 0 {
            return 0;
        }
        if fs.published == 0 {
            // Nothing left to withdraw.
            fs.recheck = Recheck::default();
            return 0;
        }
        let n = walk.left.min(u32::try_from(budget).unwrap_or(u32::MAX));
        let mut id = walk.next;
        for _ in 0..n {
            self.fast_recheck(id, walk.lines);
            id = if id + 1 == capacity { 0 } else { id + 1 };
        }
        if let Some(fs) = self.fast.as_deref_mut() {
            let left = walk.left - n;
            fs.recheck = Recheck {
                next: id,
                left,
                lines: walk.lines && left > 0,
            };
        }
        n as usize
    }

    /// Withdraws flow `id` when it is published and no longer eligible or, with `lines`, its
    /// lines no longer say what its hops say.
    fn fast_recheck(&mut self, id: FlowId, lines: bool) {
        let Some(pair) = self.fast.as_deref().and_then(|fs| fs.pair(id)) else {
            return;
        };
        let mut stale = !self.fast_eligible(id);
        if !stale && lines {
            let f = self.flows.get(id);
            let hops = [
                *self.net.get(f.next_hop[ORIG]),
                *self.net.get(f.next_hop[REPLY]),
            ];
            let table = &self.fast.as_deref().expect("attached").table;
            stale = [ORIG, REPLY].into_iter().any(|dir| {
                let want = line_of(&f, dir, &hops);
                let have =
                    crate::fast::line_words(table.memory(), table.layout(), 2 * pair + dir as u32);
                want[line::INGRESS_PORT..=line::MACS + 2]
                    != have[line::INGRESS_PORT..=line::MACS + 2]
            });
        }
        if stale {
            self.fast_withdraw(id);
        }
    }

    /// A flow being restored (`f`, to go in slot `id`) at `now`: takes what XDP recorded for
    /// it (see [`attach_fast`](Self::attach_fast)).
    pub(super) fn fast_restoring(&mut self, now: Nanos, id: FlowId, f: &mut Flow, standby: bool) {
        let Some(fs) = self.fast.as_deref_mut() else {
            return;
        };
        if !fs.table.is_resumed() {
            if !standby {
                f.last_seen = f.last_seen.max(now);
            }
            return;
        }
        if !(f.orig_src.is_v4() && f.orig_dst.is_v4() && f.xlat.is_v4()) {
            return;
        }
        let (orig, reply) = (key_words(f, ORIG), key_words(f, REPLY));
        if let Some(pair) = fs.table.left_pair(orig, reply, f.proto) {
            let mut track = f.track();
            merge(&fs.table, pair, f.proto, &mut track, now);
            f.set_track(track);
            fs.resumed.push((id, pair));
        }
    }

    /// Pairs a previous process left wait for their grace ([`expire`](Self::expire) frees
    /// them; no flow is published before).
    pub(super) fn fast_waits_for_left(&self) -> bool {
        self.fast.as_deref().is_some_and(|fs| fs.table.has_left())
    }

    /// A neighbour changed in place since [`fast_housekeeping`](Self::fast_housekeeping) last
    /// looked, while flows are published, or a recheck walk is under way: XDP keeps sending
    /// those flows as before (to the old MAC, on a port it may no longer use...), and the
    /// worker sees none of their packets to notice, so [`expire`](Self::expire) must run now
    /// rather than at the next flow's deadline.
    pub(super) fn fast_has_work(&self) -> bool {
        self.fast_recheck_pending()
            || self
                .fast
                .as_deref()
                .is_some_and(|fs| fs.published > 0 && fs.hop_changes != self.net.hop_changes())
    }

    /// Once per [`expire`](Self::expire): the pairs a previous process left are read back a
    /// last time and freed once a grace has passed; neighbours changed in place since the
    /// last look are checked against the lines that copied them.
    pub(super) fn fast_housekeeping(&mut self) {
        let changes = self.net.hop_changes();
        let Some(fs) = self.fast.as_deref_mut() else {
            return;
        };
        if fs.table.has_left() {
            let (table, resumed, flows) = (&mut fs.table, &fs.resumed, &mut self.flows);
            let done = table.retire_left(|table| {
                for &(id, pair) in resumed {
                    // The slot may hold another flow by now (the restored one ended).
                    let line = crate::fast::line_words(table.memory(), table.layout(), 2 * pair);
                    if flows.is_live(id)
                        && key_words(&flows.get(id), ORIG)[..]
                            == line[line::MATCH_SADDR..=line::MATCH_PORTS]
                    {
                        let proto = flows.get(id).proto;
                        let f = flows.get_mut(id);
                        let near = f.last_seen;
                        merge(table, pair, proto, f, near);
                    }
                }
            });
            if done {
                fs.resumed = Vec::new();
            }
        }
        if fs.hop_changes != changes {
            fs.hop_changes = changes;
            self.fast_recheck_all(true);
        }
    }
}
