//! The two ways xlbd shows the sum of its workers' counters (`xlb_api::sum`): a one-line
//! status on stdout and a `key=value` file (one per line) that scripts and tests read; both
//! also show the drains' progress and the NAT event export ([`Operations`]).

use std::{fmt::Write as _, io, path::Path};

use xlb_api::{ClusterSync, CounterSum, DrainStatus, NatLogStatus, FAST_PUNT_REASONS};
use xlb_engine::{counters::EvictReason, DropReason, RuleCounters, RuleSet};

/// The rules of `sum` that `rules` names, as `<kind key>.<name>` (`lb.web`), in rule-id order.
fn named<'a>(
    sum: &'a CounterSum,
    rules: &'a RuleSet,
) -> impl Iterator<Item = (String, &'a RuleCounters)> + 'a {
    sum.rules.iter().filter_map(|(id, rc)| {
        let p = rules.rule(*id)?;
        Some((format!("{}.{}", p.kind.key(), p.name), rc))
    })
}

/// One line for humans (after a `xlbd status` / `xlbd final` prefix): totals, non-zero
/// drops, and each rule that has seen traffic.
pub fn status_line(sum: &CounterSum, rules: &RuleSet, lab_time_scale: u32) -> String {
    let mut s = format!(
        "flows={}/{} rx={} tx={} rsts_sent={}",
        sum.flows, sum.flow_capacity, sum.rx_packets, sum.tx_packets, sum.rsts_sent
    );
    if lab_time_scale != 1 {
        let _ = write!(s, " lab_time_scale={lab_time_scale}");
    }
    if sum.handed_off > 0 {
        let _ = write!(
            s,
            " handed_off={} handoff_dropped={}",
            sum.handed_off, sum.handoff_dropped
        );
    }
    let drops: Vec<String> = DropReason::all()
        .filter(|r| sum.drop_count(*r) > 0)
        .map(|r| format!("{}={}", r.as_str(), sum.drop_count(r)))
        .collect();
    if !drops.is_empty() {
        let _ = write!(s, " drops[{}]", drops.join(" "));
    }
    if let Some(f) = &sum.fast {
        if f.enabled {
            let _ = write!(
                s,
                " fast[forwarded={} published={} unpublished={} new={}/{}]",
                f.forwarded,
                sum.fast_published,
                sum.fast_unpublished,
                sum.fast_new_installed,
                f.new_forwarded
            );
        }
    }
    let evicted: Vec<String> = EvictReason::ALL
        .iter()
        .filter(|r| sum.eviction_count(**r) > 0)
        .map(|r| format!("{}={}", r.as_str(), sum.eviction_count(*r)))
        .collect();
    if !evicted.is_empty() {
        let _ = write!(s, " evicted[{}]", evicted.join(" "));
    }
    for (name, r) in named(sum, rules) {
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

/// Every counter as `key=value` lines (the stats file).
pub fn to_kv(sum: &CounterSum, rules: &RuleSet, lab_time_scale: u32) -> String {
    let mut s = String::new();
    let mut kv = |k: &str, v: u64| {
        let _ = writeln!(s, "{k}={v}");
    };
    kv("lab_time_scale", u64::from(lab_time_scale));
    kv("flows", sum.flows);
    kv("flow_capacity", sum.flow_capacity);
    kv("rx_packets", sum.rx_packets);
    kv("tx_packets", sum.tx_packets);
    kv("rsts_sent", sum.rsts_sent);
    kv("events_dropped", sum.events_dropped);
    kv("flows_restored", sum.flows_restored);
    kv("flows_restore_dropped", sum.flows_restore_dropped);
    kv("handed_off", sum.handed_off);
    kv("handoff_dropped", sum.handoff_dropped);
    kv("next_hops", sum.next_hops.entries);
    kv("next_hops_reclaimed", sum.next_hops.reclaimed);
    kv("next_hops_refused", sum.next_hops.refused);
    for r in DropReason::all() {
        kv(&format!("drop.{}", r.as_str()), sum.drop_count(r));
    }
    for r in EvictReason::ALL {
        kv(&format!("evicted.{}", r.as_str()), sum.eviction_count(r));
    }
    kv("fast.published", sum.fast_published);
    kv("fast.unpublished", sum.fast_unpublished);
    kv("fast.grace_waits", sum.fast_grace_waits);
    kv("fast.publish_failed", sum.fast_publish_failed);
    kv("fast.new_installed", sum.fast_new_installed);
    kv("fast.new_conflict", sum.fast_new_conflict);
    kv("fast.new_refused", sum.fast_new_refused);
    kv("fast.new_rules", sum.fast_new_rules);
    kv("fast.new_rules_left_out", sum.fast_new_rules_left_out);
    if let Some(f) = &sum.fast {
        kv("fast.enabled", u64::from(f.enabled));
        kv("fast.forwarded", f.forwarded);
        kv("fast.new_forwarded", f.new_forwarded);
        kv("fast.grace_slowest_us", f.grace_slowest_ns / 1000);
        for (reason, n) in FAST_PUNT_REASONS.iter().zip(f.punts) {
            kv(&format!("fast.punt.{reason}"), n);
        }
    }
    for (name, r) in named(sum, rules) {
        for (field, v) in r.fields() {
            kv(&format!("rule.{name}.{field}"), v);
        }
    }
    if let Some(f) = &sum.fast {
        for r in &f.rules {
            let Some(p) = rules.rule(r.rule).filter(|_| !rules.is_retired(r.rule)) else {
                continue;
            };
            let name = format!("{}.{}", p.kind.key(), p.name);
            kv(&format!("rule.{name}.fast_packets_orig"), r.packets[0]);
            kv(&format!("rule.{name}.fast_packets_reply"), r.packets[1]);
        }
    }
    s
}

/// What the status line and the stats file show beside the workers' counters.
#[derive(Debug, Default, Clone)]
pub struct Operations {
    /// Every drained member's progress, summed over the workers.
    pub drains: Vec<DrainStatus>,
    /// The NAT event export, when it runs.
    pub nat_log: Option<NatLogStatus>,
    /// The cluster's flow-state sync, when it runs.
    pub cluster_sync: Option<ClusterSync>,
    /// What the big memory runs on, and the process's AnonHugePages now (once the workers
    /// run).
    pub huge_pages: Option<(crate::huge_pages::HugePages, Option<u64>)>,
}

impl Operations {
    /// ` ipfix[…]` when the export runs, and each open drain, for the status line.
    pub fn status_line(&self) -> String {
        let mut s = String::new();
        if let Some(n) = &self.nat_log {
            let _ = write!(
                s,
                " ipfix[sent={} messages={} lost={}]",
                n.records_sent, n.messages_sent, n.records_lost
            );
        }
        if let Some(c) = &self.cluster_sync {
            let _ = write!(
                s,
                " sync[sent={} received={} imported={} dropped={} lag_max_ms={:.1}]",
                c.records_sent,
                c.records_received,
                c.records_imported,
                c.records_dropped,
                c.lag_max.as_secs_f64() * 1e3
            );
        }
        for d in &self.drains {
            let left = d
                .flows_left
                .map_or_else(|| "counting".to_string(), |n| n.to_string());
            let _ = write!(
                s,
                " drain.{}.{}[flows_left={left} reset={}]",
                d.pool, d.member, d.flows_reset
            );
        }
        s
    }

    /// `key=value` lines for the stats file.
    pub fn to_kv(&self) -> String {
        let mut s = String::new();
        let mut kv = |k: &str, v: u64| {
            let _ = writeln!(s, "{k}={v}");
        };
        for d in &self.drains {
            let key = format!("drain.{}.{}", d.pool, d.member);
            if let Some(n) = d.flows_left {
                kv(&format!("{key}.flows_left"), n);
            }
            kv(&format!("{key}.flows_reset"), d.flows_reset);
            kv(&format!("{key}.flows_ended"), d.flows_ended);
            kv(&format!("{key}.deadline_done"), u64::from(d.deadline_done));
        }
        if let Some(n) = &self.nat_log {
            kv("nat_log.records_sent", n.records_sent);
            kv("nat_log.messages_sent", n.messages_sent);
            kv("nat_log.records_lost", n.records_lost);
        }
        if let Some(c) = &self.cluster_sync {
            kv("cluster_sync.records_sent", c.records_sent);
            kv("cluster_sync.records_received", c.records_received);
            kv("cluster_sync.records_imported", c.records_imported);
            kv("cluster_sync.records_refreshed", c.records_refreshed);
            kv("cluster_sync.records_kept", c.records_kept);
            kv("cluster_sync.records_refused", c.records_refused);
            kv("cluster_sync.records_dropped", c.records_dropped);
            kv("cluster_sync.datagrams_malformed", c.datagrams_malformed);
            kv("cluster_sync.datagrams_lost", c.datagrams_lost);
            kv("cluster_sync.lag_count", c.lag_count);
            kv("cluster_sync.lag_mean_us", c.lag_mean.as_micros() as u64);
            kv("cluster_sync.lag_max_us", c.lag_max.as_micros() as u64);
            kv("cluster_sync.snat_taken_over", c.taken_over.len() as u64);
        }
        if let Some((h, anon_huge)) = &self.huge_pages {
            s.push_str(&h.to_kv(*anon_huge));
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
    use xlb_api::WorkerCounters;
    use xlb_engine::{compile, Config, Counters, MemberHealth};

    use super::*;

    #[test]
    fn the_sum_shows_as_status_line_and_stats_file_with_rules_named_by_kind() {
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
        let worker = |flows, created| {
            let mut c = Counters {
                rx_packets: 10,
                ..Counters::default()
            };
            c.drops[DropReason::NoFlow.index()] = 2;
            c.evictions[EvictReason::RuleShare.index()] = 5;
            c.rules.resize(usize::from(id) + 1, RuleCounters::default());
            c.rules[usize::from(id)].flows_created = created;
            WorkerCounters {
                counters: c,
                flows,
                flow_capacity: 100,
                handed_off: 1,
                next_hops: xlb_engine::net::NextHopStats {
                    entries: flows,
                    reclaimed: 5,
                    refused: created,
                },
                generation: 1,
                ..WorkerCounters::default()
            }
        };
        let sum = xlb_api::sum(&[worker(1, 3), worker(2, 4)], &rules);
        assert_eq!(
            (sum.flows, sum.flow_capacity, sum.rx_packets, sum.handed_off),
            (3, 200, 20, 2)
        );
        let kv = to_kv(&sum, &rules, 60);
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
        let status = status_line(&sum, &rules, 60);
        assert!(status.contains("lab_time_scale=60"), "{status}");
        assert!(status.contains("drops[no_flow=4]"), "{status}");
        assert!(status.contains("evicted[rule_share=10]"), "{status}");
        assert!(status.contains("lb.web[created=7"), "{status}");
        assert!(!status_line(&sum, &rules, 1).contains("lab_time_scale"));

        // What XDP forwarded counts in the rule's packets, and the fast path shows beside.
        let mut with_fast = worker(1, 3);
        with_fast.counters.rules[usize::from(id)].packets = [5, 6];
        with_fast.counters.fast_published = 2;
        with_fast.counters.fast_new_installed = 28;
        with_fast.counters.fast_new_refused = 2;
        let mut sum = xlb_api::sum(&[with_fast], &rules);
        sum.add_fast(Some(&xlb_api::FastPathCounters {
            enabled: true,
            forwarded: 90,
            new_forwarded: 30,
            punts: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            rules: vec![xlb_api::FastRuleCounters {
                rule: id,
                packets: [40, 50],
                bytes: [4000, 5000],
            }],
            grace_slowest_ns: 2_250_000_000,
        }));
        let kv = to_kv(&sum, &rules, 60);
        for line in [
            "rule.lb.web.packets_orig=45",
            "rule.lb.web.packets_reply=56",
            "rule.lb.web.bytes_reply=5000",
            "rule.lb.web.fast_packets_orig=40",
            "rule.lb.web.fast_packets_reply=50",
            "fast.enabled=1",
            "fast.forwarded=90",
            "fast.punt.miss=1",
            "fast.punt.wrong_port=7",
            "fast.new_forwarded=30",
            "fast.punt.new_ring_full=11",
            "fast.published=2",
            "fast.grace_waits=0",
            "fast.grace_slowest_us=2250000",
            "fast.new_installed=28",
            "fast.new_conflict=0",
            "fast.new_refused=2",
        ] {
            assert!(kv.lines().any(|l| l == line), "{line} in\n{kv}");
        }
        let status = status_line(&sum, &rules, 60);
        assert!(
            status.contains("fast[forwarded=90 published=2 unpublished=0 new=28/30]"),
            "{status}"
        );
    }

    #[test]
    fn drains_and_the_nat_log_show_beside_the_counters() {
        let ops = Operations {
            drains: vec![DrainStatus {
                pool: "web".into(),
                member: "198.18.1.11".parse().unwrap(),
                flows_left: Some(3),
                flows_reset: 2,
                flows_ended: 0,
                deadline_done: true,
            }],
            cluster_sync: None,
            huge_pages: None,
            nat_log: Some(NatLogStatus {
                collector: "198.18.0.5:4739".into(),
                records_sent: 10,
                messages_sent: 2,
                records_lost: 1,
            }),
        };
        let kv = ops.to_kv();
        for line in [
            "drain.web.198.18.1.11.flows_left=3",
            "drain.web.198.18.1.11.flows_reset=2",
            "drain.web.198.18.1.11.deadline_done=1",
            "nat_log.records_sent=10",
            "nat_log.records_lost=1",
        ] {
            assert!(kv.lines().any(|l| l == line), "{line} in\n{kv}");
        }
        let status = ops.status_line();
        assert!(
            status.contains(" ipfix[sent=10 messages=2 lost=1]"),
            "{status}"
        );
        assert!(
            status.contains(" drain.web.198.18.1.11[flows_left=3 reset=2]"),
            "{status}"
        );
        assert_eq!(Operations::default().status_line(), "");
    }
}
