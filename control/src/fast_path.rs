//! The XDP fast path on the daemon's side (docs/xlbd.md, "The XDP fast path"): the size of
//! the published table, its hash keys, and the XDP program's counters as the API, the stats
//! file and Prometheus show them. The table's memory, the transmit map and the grace thread
//! come from `xlb-afxdp`; each worker's engine gets its part of the table
//! (`crate::workers`).

use std::{
    collections::HashMap,
    sync::{atomic::AtomicU32, Arc, Mutex, PoisonError},
};

use xlb_afxdp::{GraceService, XdpFastControl, XdpProgram};
use xlb_api::{FastPathCounters, FastRuleCounters, FAST_PUNT_REASONS};
use xlb_engine::{fast::FAST_RULES, FastLayout, FastTable, GraceClock, RuleId, RuleSet};

use crate::{kernel::Port, options::Failure};

/// Flows (pairs of lines) the published table may hold in all: 2^26 flows take 8 GiB of
/// lines and 1 GiB of index. More flows than that stay with the workers.
pub const MAX_FAST_FLOWS: u64 = 1 << 26;

/// The table's layout: one pair of lines per flow a worker holds (`--flow-capacity`), for
/// every worker.
pub fn layout(flow_capacity: u32, workers: usize) -> Result<FastLayout, Failure> {
    // The table's publication order (a line's words, then its FAST bit) relies on x86-64
    // keeping stores and loads in order; the BPF side has no acquire/release loads to say it
    // on weaker architectures.
    if !cfg!(target_arch = "x86_64") {
        return Err(Failure::usage(
            "--fast-path on: the XDP fast path is built for x86-64 only; run with --fast-path off",
        ));
    }
    let total = u64::from(flow_capacity) * workers as u64;
    if total > MAX_FAST_FLOWS {
        return Err(Failure::usage(format!(
            "--fast-path on: {flow_capacity} flows per worker x {workers} workers = {total} \
             flows, more than the fast path's table holds ({MAX_FAST_FLOWS}); lower \
             --flow-capacity or run with --fast-path off"
        )));
    }
    let workers = u16::try_from(workers).map_err(|_| Failure::usage("--workers: too many"))?;
    Ok(FastLayout::new(flow_capacity, workers))
}

/// Four random hash keys (the second and fourth odd, never 0: they multiply).
pub fn random_keys() -> Result<[u64; 4], Failure> {
    let mut keys = [0u64; 4];
    for k in &mut keys {
        *k = crate::workers::random_seed()?;
    }
    keys[1] |= 1;
    keys[3] |= 1;
    Ok(keys)
}

/// The fast path of a running xlbd: the table every worker publishes into, which ports XDP
/// forwards on, and the grace clock the engines share with the grace thread.
pub struct FastPath {
    pub mem: &'static [AtomicU32],
    pub layout: FastLayout,
    pub grace: Arc<GraceClock>,
    /// Per port, in `--interface` order: XDP forwards frames arriving and leaving there
    /// (attached natively, in the transmit map).
    pub port_ok: Vec<bool>,
    /// The table is the one a previous xlbd left (`--state-dir`), with what XDP recorded.
    pub resumed: bool,
    /// The grace thread, once started (after the workers).
    service: Option<GraceService>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("layout", &self.layout)
            .field("port_ok", &self.port_ok)
            .field("enabled", &xlb_engine::fast::is_enabled(self.mem))
            .finish_non_exhaustive()
    }
}

impl FastPath {
    /// Sets the fast path up on a program loaded with room for `layout` and attached to
    /// `ports`: the table's header (new keys; kept when the table is `found`, one a previous
    /// xlbd of the same layout left), every port's id and FAST flag (only where attached
    /// natively), the transmit map (from this thread: xlbd runs in its interfaces' namespace,
    /// where the devmap resolves the ifindexes), and the switch. The steering key (of
    /// `steer_seed`) goes in the new-flow section's header: XDP hands each SYN it forwards
    /// to the worker that owns its flow. XDP opens no flow before worker 0 wrote that section.
    pub fn set_up(
        xdp: &mut XdpProgram,
        layout: FastLayout,
        ports: &[Port],
        found: bool,
        steer_seed: u64,
    ) -> Result<FastPath, Failure> {
        let failed = |what: &str, e: xlb_afxdp::Error| {
            Failure::runtime(format!("setting up the XDP fast path: {what}: {e}"))
        };
        let mem = xdp
            .fast_table()
            .map_err(|e| failed("mapping its table", e))?;
        let resumed = found && xlb_engine::fast::header_matches(mem, &layout);
        let steer = xlb_engine::hashkey::HashKey::from_seed(steer_seed).words();
        if resumed {
            // Not before worker 0 rewrote the section for this process's rules.
            xlb_engine::fast_new::set_nf_enabled(mem, false);
            xlb_engine::fast_new::write_steer_keys(mem, steer);
        } else {
            xlb_engine::fast::reset_table(mem, &layout, random_keys()?, steer);
        }
        let mut port_ok = Vec::with_capacity(ports.len());
        for p in ports {
            let on = (xdp.set_fast_port(p.ifindex, u32::from(p.id), true))
                .map_err(|e| failed(&p.name, e))?;
            if on {
                (xdp.set_tx_port(u32::from(p.id), p.ifindex)).map_err(|e| failed(&p.name, e))?;
            }
            port_ok.push(on);
        }
        xlb_engine::fast::set_enabled(mem, true);
        Ok(FastPath {
            mem,
            layout,
            grace: Arc::new(GraceClock::default()),
            port_ok,
            resumed,
            service: None,
        })
    }

    /// Worker `w`'s part of the table, told which ports XDP forwards on; of a resumed table,
    /// with the flows the previous xlbd's worker `w` left in it (withdrawn from XDP, read
    /// back into the flows restored from the worker's store).
    pub fn table(&self, w: usize, ports: &[Port]) -> Result<FastTable, Failure> {
        let grace = Arc::clone(&self.grace);
        let mut t = if self.resumed {
            FastTable::resume(self.mem, self.layout, w as u16, grace)
                .map_err(|e| Failure::runtime(format!("worker {w}: the fast path's table: {e}")))?
        } else {
            FastTable::new(self.mem, self.layout, w as u16, grace)
        };
        for (p, ok) in ports.iter().zip(&self.port_ok) {
            t.set_port_ok(p.id, *ok);
        }
        Ok(t)
    }

    /// Starts the grace thread on the engines' clock.
    pub fn start_grace(&mut self) -> Result<(), Failure> {
        let service = GraceService::spawn(Arc::clone(&self.grace)).map_err(|e| {
            Failure::runtime(format!(
                "the XDP fast path: {e}; run with --fast-path off on this kernel"
            ))
        })?;
        self.service = Some(service);
        Ok(())
    }

    /// Turns XDP's forwarding off (every frame goes to the dataplane again): at shutdown,
    /// so that an attachment kept for the next xlbd (`--state-dir`) forwards nothing that no
    /// worker follows.
    pub fn switch_off(&self) {
        xlb_engine::fast_new::set_nf_enabled(self.mem, false);
        xlb_engine::fast::set_enabled(self.mem, false);
    }

    /// Stops and joins the grace thread (after the workers: they no longer wait for one).
    pub fn stop_grace(&mut self) {
        if let Some(mut s) = self.service.take() {
            s.stop();
        }
    }
}

/// Header words the engine leaves spare, where the daemon notes how the pairs are split
/// between workers (a resumed table must be split the same way).
/// The program's fast-path counters (also with the fast path off: they then show that XDP
/// forwarded nothing).
pub fn counters(
    xdp: &XdpProgram,
    enabled: bool,
    grace: Option<Arc<GraceClock>>,
) -> Result<Arc<FastCounters>, Failure> {
    let control = xdp
        .fast_control()
        .map_err(|e| Failure::runtime(format!("reading the XDP fast path's counters: {e}")))?;
    let mut c = FastCounters::new(enabled, read_from(control));
    c.grace = grace;
    Ok(Arc::new(c))
}

/// Reads the program's counters through `control` (a handle of its own, behind a lock: the
/// API, the metrics and the control loop read from their threads).
fn read_from(control: XdpFastControl) -> ReadFast {
    let control = Mutex::new(control);
    Box::new(move |ids: &[RuleId]| {
        let c = control.lock().unwrap_or_else(PoisonError::into_inner);
        let s = c.stats().map_err(|e| e.to_string())?;
        let counts = c.rule_counts().map_err(|e| e.to_string())?;
        let mut rules: Vec<FastRuleCounters> = ids
            .iter()
            .map(|id| FastRuleCounters {
                rule: *id,
                ..FastRuleCounters::default()
            })
            .collect();
        for n in counts {
            if let Some(r) = rules.iter_mut().find(|r| r.rule == n.rule) {
                let d = usize::from(n.dir.min(1));
                r.packets[d] += n.packets;
                r.bytes[d] += n.bytes;
            }
        }
        Ok(RawFastCounters {
            stats: [
                s.forwarded,
                s.new_forwarded,
                s.miss,
                s.not_fast,
                s.window,
                s.checksum_too_long,
                s.no_tx,
                s.not_eligible,
                s.wrong_port,
                s.new_no_rule,
                s.new_wrong_port,
                s.new_no_member,
                s.new_ring_full,
                s.new_off,
            ],
            rules,
        })
    })
}

/// The XDP program's fast-path counters as read from its maps (summed over CPUs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RawFastCounters {
    /// Forwarded, new flows forwarded, then the punt reasons ([`FAST_PUNT_REASONS`]).
    pub stats: [u64; 2 + FAST_PUNT_REASONS.len()],
    /// Per rule id asked for: packets and bytes per direction (original, reply).
    pub rules: Vec<FastRuleCounters>,
}

/// Reads the program's counters for these rule ids.
pub type ReadFast = Box<dyn Fn(&[RuleId]) -> Result<RawFastCounters, String> + Send + Sync>;

/// The XDP program's counters, with each rule's figures counted from the rule's creation: a
/// rule id that a deleted rule held starts again from what the program had counted for it
/// by the time this reader first saw the new rule.
pub struct FastCounters {
    enabled: bool,
    read: ReadFast,
    /// The engines' grace clock, for how long the slowest recent grace took.
    grace: Option<Arc<GraceClock>>,
    /// Per rule id: the generation that created the rule holding it, and what the program
    /// had counted for the id before (packets, bytes).
    baselines: Mutex<HashMap<RuleId, (u64, FastRuleCounters)>>,
}

impl std::fmt::Debug for FastCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastCounters")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl FastCounters {
    pub fn new(enabled: bool, read: ReadFast) -> FastCounters {
        FastCounters {
            enabled,
            read,
            grace: None,
            baselines: Mutex::new(HashMap::new()),
        }
    }

    /// The counters for the rules of `rules` (live and retired) that XDP can count (ids
    /// below 4096); `None` when the maps cannot be read (said once per call by the caller's
    /// absence of figures, never an error: counters are not worth failing a read for).
    pub fn read(&self, rules: &RuleSet) -> Option<FastPathCounters> {
        let ids: Vec<RuleId> = (0..rules.rule_id_bound())
            .filter_map(|i| RuleId::try_from(i).ok())
            .filter(|id| *id < FAST_RULES && rules.since(*id).is_some())
            .collect();
        let raw = (self.read)(&ids).ok()?;
        let mut baselines = self
            .baselines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut out = FastPathCounters {
            enabled: self.enabled,
            forwarded: raw.stats[0],
            new_forwarded: raw.stats[1],
            punts: [0; FAST_PUNT_REASONS.len()],
            rules: Vec::with_capacity(raw.rules.len()),
            grace_slowest_ns: self.grace.as_ref().map_or(0, |g| {
                g.slowest_ns.load(std::sync::atomic::Ordering::Relaxed)
            }),
        };
        out.punts.copy_from_slice(&raw.stats[2..]);
        for r in &raw.rules {
            let Some(since) = rules.since(r.rule) else {
                continue;
            };
            let (base, counted) = since_creation(baselines.get(&r.rule).copied(), since, r);
            baselines.insert(r.rule, (since, base));
            out.rules.push(counted);
        }
        Some(out)
    }
}

/// What the program counted for `raw`'s rule id since the rule holding it now (created in
/// generation `since`) appeared, given the id's baseline so far; and the baseline to keep.
fn since_creation(
    baseline: Option<(u64, FastRuleCounters)>,
    since: u64,
    raw: &FastRuleCounters,
) -> (FastRuleCounters, FastRuleCounters) {
    let base = match baseline {
        Some((s, b)) if s == since => b,
        // First seen: a rule of the start-up configuration (the maps are new) or a new rule
        // on an id no rule used while this reader ran.
        None => FastRuleCounters {
            rule: raw.rule,
            ..FastRuleCounters::default()
        },
        // Another rule on an id a deleted rule held: it starts from here.
        Some(_) => *raw,
    };
    let mut counted = FastRuleCounters {
        rule: raw.rule,
        ..FastRuleCounters::default()
    };
    for d in 0..2 {
        counted.packets[d] = raw.packets[d].saturating_sub(base.packets[d]);
        counted.bytes[d] = raw.bytes[d].saturating_sub(base.bytes[d]);
    }
    (base, counted)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn the_layout_holds_every_workers_flows_and_refuses_what_does_not_fit() {
        let l = layout(1000, 3).unwrap();
        assert_eq!(l.pairs_per_worker, 1000);
        assert_eq!(l.workers, 3);
        assert_eq!(l.lines, 6000);
        let e = layout(1 << 24, 64).unwrap_err();
        assert_eq!(e.code, crate::options::EXIT_USAGE);
        assert!(e.message.contains("--fast-path off"), "{}", e.message);
    }

    #[test]
    fn a_table_is_taken_over_only_when_split_the_same_way() {
        use xlb_engine::fast::{header_matches, reset_table};
        let layout = layout(100, 2).unwrap();
        let mem: Vec<AtomicU32> = (0..layout.words()).map(|_| AtomicU32::new(7)).collect();
        assert!(!header_matches(&mem, &layout), "garbage is no table");
        reset_table(&mem, &layout, [1, 3, 5, 7], [2, 4, 6, 8]);
        // Past the header, the new-flow header and the steering keys: all cleared.
        assert!(mem[48..]
            .iter()
            .all(|w| w.load(std::sync::atomic::Ordering::Relaxed) == 0));
        assert!(!xlb_engine::fast::is_enabled(&mem));
        assert_eq!(xlb_engine::fast::header_keys(&mem), [1, 3, 5, 7]);
        assert!(header_matches(&mem, &layout));
        // The same number of lines split another way (200 flows on one worker) is not it.
        let other = FastLayout::new(200, 1);
        assert_eq!(other.lines, layout.lines);
        assert!(!header_matches(&mem, &other));
        // Nor does a worker take it over.
        let grace = Arc::new(GraceClock::default());
        let mem: &'static [AtomicU32] = Box::leak(mem.into_boxed_slice());
        assert!(FastTable::resume(mem, other, 0, Arc::clone(&grace)).is_err());
        assert!(FastTable::resume(mem, layout, 0, grace).is_ok());
    }

    #[test]
    fn keys_are_random_and_the_multipliers_odd() {
        let (a, b) = (random_keys().unwrap(), random_keys().unwrap());
        assert_ne!(a, b);
        assert_eq!(a[1] & 1, 1);
        assert_eq!(a[3] & 1, 1);
    }

    fn rules_of(toml: &str, generation: u64, prev: Option<&RuleSet>) -> RuleSet {
        let config = xlb_engine::Config::from_toml_str(toml).unwrap();
        xlb_engine::compile(
            &config,
            prev,
            &xlb_engine::MemberHealth::default(),
            generation,
        )
        .unwrap()
    }

    const ONE: &str = r#"
[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }]

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
"#;

    #[test]
    fn a_rule_counts_what_xdp_forwarded_for_it_from_its_creation() {
        let raw = Arc::new(Mutex::new(RawFastCounters::default()));
        let source = Arc::clone(&raw);
        let fast = FastCounters::new(
            true,
            Box::new(move |ids: &[RuleId]| {
                let r = source.lock().unwrap().clone();
                Ok(RawFastCounters {
                    stats: r.stats,
                    rules: r
                        .rules
                        .into_iter()
                        .filter(|c| ids.contains(&c.rule))
                        .collect(),
                })
            }),
        );
        let rules = rules_of(ONE, 1, None);
        let (id, _) = rules.rules().next().unwrap();
        let counted = |p: u64| FastRuleCounters {
            rule: id,
            packets: [p, p + 1],
            bytes: [p * 100, p * 100 + 100],
        };
        *raw.lock().unwrap() = RawFastCounters {
            stats: [7, 9, 1, 2, 3, 4, 5, 6, 8, 10, 11, 12, 13, 14],
            rules: vec![counted(10)],
        };
        let c = fast.read(&rules).unwrap();
        assert!(c.enabled);
        assert_eq!(c.forwarded, 7);
        assert_eq!(c.new_forwarded, 9);
        assert_eq!(c.punts, [1, 2, 3, 4, 5, 6, 8, 10, 11, 12, 13, 14]);
        assert_eq!(c.rules, vec![counted(10)]);

        // More frames: counted.
        raw.lock().unwrap().rules = vec![counted(12)];
        assert_eq!(fast.read(&rules).unwrap().rules, vec![counted(12)]);
    }

    #[test]
    fn a_rule_on_a_reused_id_starts_from_what_the_id_had_counted() {
        let at = |p: u64| FastRuleCounters {
            rule: 5,
            packets: [p, p],
            bytes: [p * 10, p * 10],
        };
        // The first rule on id 5 (generation 1) counts from zero.
        let (base, c) = since_creation(None, 1, &at(4));
        assert_eq!(c, at(4));
        let (base, c) = since_creation(Some((1, base)), 1, &at(6));
        assert_eq!(c, at(6));
        // A rule created in generation 7 takes the id: it starts from what was counted.
        let (base, c) = since_creation(Some((1, base)), 7, &at(6));
        assert_eq!(c, at(0));
        let (_, c) = since_creation(Some((7, base)), 7, &at(9));
        assert_eq!(c, at(3));
    }
}
