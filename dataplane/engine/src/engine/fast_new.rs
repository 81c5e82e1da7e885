//! The engine's side of new flows opened by XDP (`crate::fast_new`): installing the flows of
//! the SYNs XDP forwarded by itself, and (worker 0) writing the section XDP chooses from.
//!
//! Installing: each record of this worker's ring is a SYN XDP already sent to a member. The
//! engine rebuilds its frame (the Ethernet addresses it arrived with, the IP and TCP headers
//! as received) and runs its ordinary path for it with the member forced to XDP's choice and
//! nothing sent: the flow comes to be exactly as if the worker had forwarded the SYN
//! (admission, next hops, TCP state with window scale and next sequence numbers, timers,
//! per-rule counters, NAT log, store, cluster sync). A retransmitted SYN of a flow that
//! exists goes the same way (the same member: tracked as the worker would); one XDP sent to
//! another member than the flow's (the table changed between the two SYNs) leaves the flow
//! as it is (`fast_new_conflict`); a record whose rule or member is gone, or whose flow
//! cannot be admitted, is refused (`fast_new_refused`): the member got a SYN that leads
//! nowhere, its SYN-ACK is dropped like any segment without a flow, and the client retries.
//!
//! No SYN-ACK is lost for want of its flow: before its lookup, a SYN, a SYN-ACK or a TCP
//! segment without a flow installs the records waiting when it arrives (the SYNs came first;
//! this also makes a segment of a connection whose tuple a new SYN reopened find the new
//! flow); records XDP adds meanwhile wait for the next segment, so that a stream of SYNs
//! cannot hold the worker in one. While records wait, `next_deadline` is now, so the worker
//! runs the expiry pass at every loop iteration, idle or not, and that pass takes records on
//! a budget of its own (records never use up the timers' budget). Records are taken in order; one a producer is still writing
//! (microseconds) holds back the ones behind it until the next try.
//!
//! Writing the section (worker 0 only): whenever what it depends on changes (the rules, with
//! their pools' tables and health; the next hops; which ports XDP may use) the section is
//! switched off (`NF_ENABLED` 0), a grace is asked for, and once two grace rounds have passed
//! (no XDP invocation still reads the old section) it is rewritten from scratch and switched
//! on again, from [`Engine::expire`]: nothing waits in the packet path.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use super::Engine;
use crate::counters::Counters;
use crate::fast::{FastLayout, GraceClock};
use crate::fast_new::{
    mapped, ring_pending, set_nf_enabled, write_section, write_steer_keys, NfMember, NfPool,
    NfRecord, NfRule, NfSection, RingDrain, FLAG_DNAT_ADDR, FLAG_DNAT_PORT, RECORD_HEADERS,
};
use crate::net::PortId;
use crate::ruleset::{Backend, Selector};
use crate::tcp::{Segment, ORIG};
use crate::time::Nanos;
use crate::wire::{self, proto};
use crate::{Addr, Verdict};

/// Records taken per expiry pass ([`Engine::expire`]).
pub const NF_DRAIN_BUDGET: usize = 256;

/// What became of one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    Installed,
    Conflict,
    Refused,
}

/// This engine's ring and, on worker 0, the section writer's state.
#[derive(Clone)]
pub(super) struct NewFlows {
    mem: &'static [AtomicU32],
    layout: FastLayout,
    worker: u16,
    grace: Arc<GraceClock>,
    /// A record is being installed (a drain does not start another from inside it).
    draining: bool,
    /// The member XDP chose, for the record being installed.
    pub(super) forced: Option<Backend>,
    writer: Option<Writer>,
}

impl std::fmt::Debug for NewFlows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewFlows")
            .field("worker", &self.worker)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

/// Worker 0's section writer.
#[derive(Clone, Copy, Debug)]
struct Writer {
    /// What the section depends on changed since it was last written.
    dirty: bool,
    /// The section is off and waits for the grace that started at this epoch.
    fence: Option<u64>,
    /// While waiting for the grace: when to look again (a tick later).
    retry_at: Nanos,
    /// The next hops' generation and route epoch the section was built from.
    seen: (u64, u64),
    steer: [u64; 4],
}

impl Engine {
    /// Sets up new flows opened by XDP on the table just attached: this worker's ring, and on
    /// worker 0 the section writer (the section is written once a grace has passed).
    pub(super) fn attach_fast_new(&mut self) {
        let Some(t) = self.fast_table() else {
            return;
        };
        let (mem, layout, grace) = (t.memory(), *t.layout(), Arc::clone(t.grace()));
        let writer = (self.cfg.worker == 0).then(|| Writer {
            dirty: true,
            fence: None,
            retry_at: 0,
            seen: (0, 0),
            steer: self.steer_key.words(),
        });
        self.fast_new = Some(Box::new(NewFlows {
            mem,
            layout,
            worker: self.cfg.worker,
            grace,
            draining: false,
            forced: None,
            writer,
        }));
    }

    /// Whether this worker's ring holds records not taken yet.
    #[inline]
    pub(super) fn fast_new_waiting(&self) -> bool {
        self.fast_new
            .as_deref()
            .is_some_and(|n| !n.draining && ring_pending(n.mem, &n.layout, n.worker))
    }

    /// When worker 0's section needs the next [`expire`](Self::expire): at once when it must
    /// be switched off, a tick after the last look while it waits for its grace.
    pub(super) fn fast_new_section_due(&self) -> Option<Nanos> {
        let w = self.fast_new.as_deref()?.writer?;
        match w.fence {
            Some(_) => Some(w.retry_at),
            None if w.dirty => Some(0),
            None => None,
        }
    }

    /// Something the section depends on changed (rules, health, ports).
    pub(super) fn fast_new_changed(&mut self) {
        if let Some(w) = self.fast_new.as_deref_mut().and_then(|n| n.writer.as_mut()) {
            w.dirty = true;
        }
    }

    /// Installs the flows of at most `budget` records of this worker's ring, at `now`.
    /// Returns the records taken. The worker calls it at every loop iteration.
    pub fn fast_new_drain(&mut self, now: Nanos, budget: usize) -> usize {
        let Some(n) = self.fast_new.as_deref_mut() else {
            return 0;
        };
        if n.draining {
            return 0;
        }
        n.draining = true;
        // One pass: PROD read once here, CONS stored once at the end.
        let mem = n.mem;
        let mut ring = RingDrain::begin(mem, &n.layout, n.worker);
        let mut rec = NfRecord::EMPTY;
        let mut done = 0;
        while done < budget && ring.next(mem, &mut rec) {
            done += 1;
            match self.fast_new_apply(now, &rec) {
                Applied::Installed => self.counters.fast_new_installed += 1,
                Applied::Conflict => self.counters.fast_new_conflict += 1,
                Applied::Refused => self.counters.fast_new_refused += 1,
            }
        }
        ring.end(mem);
        if let Some(n) = self.fast_new.as_deref_mut() {
            n.draining = false;
            n.forced = None;
        }
        done
    }

    /// Installs the records this worker's ring holds now: those reserved before the call.
    /// Records XDP adds meanwhile wait for the next call (a pass stops at the `PROD` it read
    /// when it began), so that a steady stream of SYNs cannot keep the worker here (at most a
    /// ring's worth per call).
    pub(super) fn fast_new_drain_waiting(&mut self, now: Nanos) -> usize {
        self.fast_new_drain(now, usize::MAX)
    }

    /// The flow of one record (see the module notes).
    fn fast_new_apply(&mut self, now: Nanos, rec: &NfRecord) -> Applied {
        let len = rec.len as usize;
        // A port this process does not have (a record its predecessor left, with other
        // interfaces): the flow's way back would lead nowhere.
        if !(40..=RECORD_HEADERS).contains(&len)
            || rec.ingress_port > u32::from(PortId::MAX)
            || rec.ingress_port as usize >= self.net.port_count()
        {
            return Applied::Refused;
        }
        let ingress = rec.ingress_port as PortId;
        let mut frame = [0u8; 14 + RECORD_HEADERS];
        frame[..12].copy_from_slice(&rec.macs);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14..14 + len].copy_from_slice(&rec.headers[..len]);
        let flen = 14 + len;
        let Ok(pkt) = wire::parse(&frame[..flen]) else {
            return Applied::Refused;
        };
        let seg = Segment::of(&pkt);
        if pkt.proto != proto::TCP || pkt.is_v6 || pkt.vlan.is_some() || !seg.is_pure_syn() {
            return Applied::Refused;
        }
        let backend = Backend {
            addr: mapped(rec.addr),
            port: rec.port,
        };
        let tuple = crate::ruleset::FlowTuple {
            proto: pkt.proto,
            src: pkt.src,
            src_port: pkt.src_port,
            dst: pkt.dst,
            dst_port: pkt.dst_port,
        };
        let hash = self.flows.hash(&tuple);
        if let Some((id, dir)) = self.flows.lookup(&tuple, hash) {
            let f = self.flows.get(id);
            // A new connection on the tuple of one that is over (or of a handshake this SYN
            // is not part of): the ordinary path below ends the old flow and creates the new
            // one, with the member forced.
            if !f.tcp.reopens(dir, &seg) {
                if dir == ORIG && f.xlat == backend.addr && f.xlat_port == backend.port {
                    // A retransmitted SYN XDP sent where the flow goes: as the worker would.
                    self.process_quiet(now, ingress, &mut frame, flen);
                    return Applied::Installed;
                }
                return Applied::Conflict;
            }
        }
        let Some(rule) = self.rules.match_inbound(pkt.proto, pkt.dst, pkt.dst_port) else {
            return Applied::Refused;
        };
        if u32::from(rule) != rec.rule || !self.rules.lb_choice_valid(rule, backend, pkt.dst_port) {
            return Applied::Refused;
        }
        if let Some(n) = self.fast_new.as_deref_mut() {
            n.forced = Some(backend);
        }
        let verdict = self.process_quiet(now, ingress, &mut frame, flen);
        if let Some(n) = self.fast_new.as_deref_mut() {
            n.forced = None;
        }
        match verdict {
            Verdict::Tx { .. } => Applied::Installed,
            Verdict::Drop(_) => Applied::Refused,
        }
    }

    /// Runs the ordinary path on a frame XDP already sent: the worker neither received nor
    /// sends it, so its frame counters are left as they were (the rule's are counted).
    fn process_quiet(
        &mut self,
        now: Nanos,
        ingress: PortId,
        frame: &mut [u8],
        len: usize,
    ) -> Verdict {
        let (rx, tx) = (self.counters.rx_packets, self.counters.tx_packets);
        let verdict = self.process_buf(now, ingress, frame, len);
        self.counters.rx_packets = rx;
        self.counters.tx_packets = tx;
        verdict
    }

    /// The member forced for the flow being installed, if any (taken: used once).
    #[inline]
    pub(super) fn fast_new_forced(&mut self) -> Option<Backend> {
        self.fast_new.as_deref_mut().and_then(|n| n.forced.take())
    }

    /// Worker 0, once per [`expire`](Self::expire): notices next-hop changes, switches the
    /// section off when it must change, and rewrites it once the grace has passed.
    pub(super) fn fast_new_tick(&mut self, now: Nanos) {
        let seen_now = (self.net.generation(), self.net.route_epoch());
        let retry_at = now.saturating_add(self.wheel.tick());
        let Some(n) = self.fast_new.as_deref_mut() else {
            return;
        };
        let Some(w) = n.writer.as_mut() else {
            return;
        };
        if w.seen != seen_now {
            w.seen = seen_now;
            w.dirty = true;
        }
        if w.fence.is_none() {
            if !w.dirty {
                return;
            }
            set_nf_enabled(n.mem, false);
            w.fence = Some(n.grace.epoch());
            w.retry_at = retry_at;
            n.grace.want();
            return;
        }
        let since = w.fence.unwrap_or(0);
        if !n.grace.passed(since) {
            w.retry_at = retry_at;
            n.grace.want();
            return;
        }
        w.dirty = false;
        w.fence = None;
        let steer = w.steer;
        let (mem, layout) = (n.mem, n.layout);
        let section = self.fast_new_section();
        // Building the section may have resolved next hops (and queued misses): not a
        // change to act on.
        let seen_now = (self.net.generation(), self.net.route_epoch());
        if let Some(w) = self.fast_new.as_deref_mut().and_then(|n| n.writer.as_mut()) {
            w.seen = seen_now;
        }
        write_steer_keys(mem, steer);
        let written = write_section(mem, &layout, &section);
        let c: &mut Counters = &mut self.counters;
        c.fast_new_rules = u64::from(written.rules);
        c.fast_new_rules_left_out = u64::from(written.left_out);
        if written.rules > 0 {
            set_nf_enabled(mem, true);
        }
    }

    /// The port a rule's SYNs arrive on, as XDP checks it: the first port XDP may use that
    /// does not face the members, else the first port XDP may use. SYNs arriving elsewhere
    /// are punted (the worker takes them as ever).
    fn fast_new_ingress(&self) -> Option<PortId> {
        let table = self.fast_table()?;
        let ports = (0..self.net.port_count()).filter_map(|p| PortId::try_from(p).ok());
        let usable: Vec<PortId> = ports.filter(|&p| table.port_ok(p)).collect();
        usable
            .iter()
            .copied()
            .find(|&p| !self.net.is_backend_side(p))
            .or_else(|| usable.first().copied())
    }

    /// The section as the rules, next hops and ports stand: every rule XDP can open flows of
    /// exactly as this engine would. That is a load-balancing rule with a specific TCP port
    /// on an IPv4 frontend (HA-ports rules are looked up by address alone: not in the
    /// index), whose pool has IPv4 members only and a table with at least one member in it;
    /// DNAT or floating IP. Nothing else the engine does to the SYN of such a rule needs the
    /// worker first: its admission, next hops and timers are done when the record is
    /// installed (a flow refused then is counted).
    fn fast_new_section(&mut self) -> NfSection {
        let mut section = NfSection::default();
        let Some(ingress) = self.fast_new_ingress() else {
            return section;
        };
        let rules = Arc::clone(&self.rules);
        let mut pools: Vec<*const crate::select::PoolTable> = Vec::new();
        for fe in rules.tcp_frontends() {
            let Some(rule) = rules
                .rules
                .get(usize::from(fe.rule))
                .and_then(Option::as_ref)
            else {
                continue;
            };
            let Selector::LoadBalancing {
                pool,
                distribution,
                backend_port: Some(backend_port),
            } = &rule.selector
            else {
                continue;
            };
            if rule.retired
                || !fe.addr.is_v4()
                || pool.table.is_empty()
                || !pool.members.iter().all(|m| m.is_v4())
            {
                continue;
            }
            let key = Arc::as_ptr(pool);
            let i = match pools.iter().position(|&p| p == key) {
                Some(i) => i,
                None => {
                    let members = pool.members.iter().map(|&m| self.nf_member(m)).collect();
                    section.pools.push(NfPool {
                        table: pool.table.to_vec(),
                        members,
                    });
                    pools.push(key);
                    pools.len() - 1
                }
            };
            let floating = rule.params.floating_ip;
            section.rules.push(NfRule {
                vip: fe.addr.v4_bytes(),
                vport: fe.port,
                rule: fe.rule,
                ingress_port: ingress,
                flags: if floating {
                    0
                } else {
                    FLAG_DNAT_ADDR | FLAG_DNAT_PORT
                },
                backend_port: if floating { fe.port } else { *backend_port },
                dist: *distribution,
                pool: i,
            });
        }
        section
    }

    /// A pool member as XDP sends to it: valid when its next hop is resolved, untagged, and
    /// on a port XDP may send from.
    fn nf_member(&mut self, addr: Addr) -> NfMember {
        let mut m = NfMember {
            valid: false,
            addr: addr.v4_bytes(),
            tx_port: 0,
            macs: [0; 12],
        };
        let Ok(id) = self.net.resolve(addr) else {
            return m;
        };
        let hop = *self.net.get(id);
        let port_ok = self.fast_table().is_some_and(|t| t.port_ok(hop.port));
        m.valid = hop.vlan.is_none() && port_ok;
        m.tx_port = hop.port;
        m.macs[..6].copy_from_slice(&hop.dst_mac);
        m.macs[6..].copy_from_slice(&hop.src_mac);
        m
    }
}
