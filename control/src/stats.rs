//! Counters summed over workers, and the two ways xlbd shows them: a one-line status on
//! stdout and a `key=value` file (one per line) that scripts and tests read.

use std::{fmt::Write as _, io, path::Path};

use xlb_engine::{
    counters::EvictReason, net::NextHopStats, ruleset::RuleKind, Counters, DropReason,
    RuleCounters, RuleSet,
};

use crate::handler::Snapshot;

/// Everything xlbd reports, summed over workers.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub flows: usize,
    pub flow_capacity: u64,
    pub rx: u64,
    pub tx: u64,
    pub rsts_sent: u64,
    pub events_dropped: u64,
    pub handed_off: u64,
    pub handoff_dropped: u64,
    /// Next-hop entries in use, reclaimed and refused (table full), summed over workers.
    pub next_hops: NextHopStats,
    pub drops: Vec<(&'static str, u64)>,
    /// Unconfirmed flows evicted for new ones, by reason.
    pub evictions: Vec<(&'static str, u64)>,
    /// (`lb.<name>` / `nat.<name>` / `out.<name>`, counters), in rule-id order.
    pub rules: Vec<(String, RuleCounters)>,
}

fn kind_prefix(k: RuleKind) -> &'static str {
    match k {
        RuleKind::LoadBalancing => "lb",
        RuleKind::InboundNat => "nat",
        RuleKind::Outbound => "out",
    }
}

impl Totals {
    /// Sums the latest snapshot of every worker; rules are named from `rules`.
    pub fn sum<'a>(snaps: impl IntoIterator<Item = &'a Snapshot>, rules: &RuleSet) -> Totals {
        let snaps: Vec<&Snapshot> = snaps.into_iter().collect();
        let mut t = Totals::default();
        let mut c = Counters::default();
        for s in &snaps {
            t.flows += s.flows;
            t.flow_capacity += u64::from(s.flow_capacity);
            t.handed_off += s.handed_off;
            t.handoff_dropped += s.handoff_dropped;
            t.next_hops.entries += s.next_hops.entries;
            t.next_hops.reclaimed += s.next_hops.reclaimed;
            t.next_hops.refused += s.next_hops.refused;
            c.rx_packets += s.counters.rx_packets;
            c.tx_packets += s.counters.tx_packets;
            c.rsts_sent += s.counters.rsts_sent;
            c.events_dropped += s.counters.events_dropped;
            for (d, x) in c.drops.iter_mut().zip(s.counters.drops.iter()) {
                *d += x;
            }
            for (d, x) in c.evictions.iter_mut().zip(s.counters.evictions.iter()) {
                *d += x;
            }
        }
        t.rx = c.rx_packets;
        t.tx = c.tx_packets;
        t.rsts_sent = c.rsts_sent;
        t.events_dropped = c.events_dropped;
        t.drops = DropReason::all()
            .map(|r| (r.as_str(), c.drop_count(r)))
            .collect();
        t.evictions = EvictReason::ALL
            .iter()
            .map(|&r| (r.as_str(), c.eviction_count(r)))
            .collect();
        t.rules =
            xlb_api::sum_rule_counters(snaps.iter().map(|s| (&s.counters, s.generation)), rules)
                .into_iter()
                .filter_map(|(id, rc)| {
                    let p = rules.rule(id)?;
                    Some((format!("{}.{}", kind_prefix(p.kind), p.name), rc))
                })
                .collect();
        t
    }

    /// One line for humans (after a `xlbd status` / `xlbd final` prefix): totals, non-zero
    /// drops, and each rule that has seen traffic.
    pub fn status_line(&self, lab_time_scale: u32) -> String {
        let mut s = format!(
            "flows={}/{} rx={} tx={} rsts_sent={}",
            self.flows, self.flow_capacity, self.rx, self.tx, self.rsts_sent
        );
        if lab_time_scale != 1 {
            let _ = write!(s, " lab_time_scale={lab_time_scale}");
        }
        if self.handed_off > 0 {
            let _ = write!(
                s,
                " handed_off={} handoff_dropped={}",
                self.handed_off, self.handoff_dropped
            );
        }
        let drops: Vec<String> = self
            .drops
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        if !drops.is_empty() {
            let _ = write!(s, " drops[{}]", drops.join(" "));
        }
        let evicted: Vec<String> = self
            .evictions
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        if !evicted.is_empty() {
            let _ = write!(s, " evicted[{}]", evicted.join(" "));
        }
        for (name, r) in &self.rules {
            if r.flows_created == 0 && r.packets == [0, 0] && r.no_flow == 0 {
                continue;
            }
            let _ = write!(
                s,
                " {name}[created={} expired_idle={} reset_on_idle={} closed={} late={} \
                 no_flow={} pkts={}/{}]",
                r.flows_created,
                r.flows_expired_idle,
                r.flows_reset_on_idle,
                r.flows_closed,
                r.late_packets,
                r.no_flow,
                r.packets[0],
                r.packets[1]
            );
        }
        s
    }

    /// Every counter as `key=value` lines.
    pub fn to_kv(&self, lab_time_scale: u32) -> String {
        let mut s = String::new();
        let mut kv = |k: &str, v: u64| {
            let _ = writeln!(s, "{k}={v}");
        };
        kv("lab_time_scale", u64::from(lab_time_scale));
        kv("flows", self.flows as u64);
        kv("flow_capacity", self.flow_capacity);
        kv("rx_packets", self.rx);
        kv("tx_packets", self.tx);
        kv("rsts_sent", self.rsts_sent);
        kv("events_dropped", self.events_dropped);
        kv("handed_off", self.handed_off);
        kv("handoff_dropped", self.handoff_dropped);
        kv("next_hops", self.next_hops.entries);
        kv("next_hops_reclaimed", self.next_hops.reclaimed);
        kv("next_hops_refused", self.next_hops.refused);
        for (r, n) in &self.drops {
            kv(&format!("drop.{r}"), *n);
        }
        for (r, n) in &self.evictions {
            kv(&format!("evicted.{r}"), *n);
        }
        for (name, r) in &self.rules {
            for (field, v) in r.fields() {
                kv(&format!("rule.{name}.{field}"), v);
            }
        }
        s
    }
}

/// Replaces `path` atomically (write a sibling, rename), so a reader never sees half a file.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use xlb_engine::{compile, Config, MemberHealth};

    use super::*;

    #[test]
    fn totals_sum_workers_and_name_rules_by_kind() {
        let config = Config::from_toml_str(
            r#"
[settings]
lab_time_scale = 60
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
"#,
        )
        .unwrap();
        let rules = compile(&config, None, &MemberHealth::default(), 1).unwrap();
        let id = rules.rules().next().unwrap().0;
        let snap = |flows, created| {
            let mut c = Counters {
                rx_packets: 10,
                ..Counters::default()
            };
            c.drops[DropReason::NoFlow.index()] = 2;
            c.evictions[EvictReason::RuleShare.index()] = 5;
            c.rules.resize(usize::from(id) + 1, RuleCounters::default());
            c.rules[usize::from(id)].flows_created = created;
            Snapshot {
                worker: 0,
                counters: c,
                flows,
                flow_capacity: 100,
                handed_off: 1,
                handoff_dropped: 0,
                generation: 1,
                snat: Vec::new(),
                loop_latency: crate::handler::loop_histogram(),
                next_hops: xlb_engine::net::NextHopStats {
                    entries: flows as u64,
                    reclaimed: 5,
                    refused: created,
                },
            }
        };
        let t = Totals::sum(&[snap(1, 3), snap(2, 4)], &rules);
        assert_eq!(
            (t.flows, t.flow_capacity, t.rx, t.handed_off),
            (3, 200, 20, 2)
        );
        let kv = t.to_kv(60);
        for line in [
            "lab_time_scale=60",
            "drop.no_flow=4",
            "drop.wrong_side=0",
            "evicted.rule_share=10",
            "evicted.table_full=0",
            "rule.lb.web.flows_created=7",
            "rule.lb.web.flows_evicted=0",
            "handed_off=2",
            "next_hops=3",
            "next_hops_reclaimed=10",
            "next_hops_refused=7",
        ] {
            assert!(kv.lines().any(|l| l == line), "{line} in\n{kv}");
        }
        let status = t.status_line(60);
        assert!(status.contains("lab_time_scale=60"), "{status}");
        assert!(status.contains("drops[no_flow=4]"), "{status}");
        assert!(status.contains("evicted[rule_share=10]"), "{status}");
        assert!(status.contains("lb.web[created=7"), "{status}");
        assert!(!t.status_line(1).contains("lab_time_scale"));
    }
}
