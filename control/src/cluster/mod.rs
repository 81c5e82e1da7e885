//! xlbd as one node of a cluster behind the router's ECMP (docs/cluster.md).
//!
//! Every control-loop tick, [`Cluster::tick`] decides whether this node is **fit** (every
//! worker runs the committed rule set, rules are loaded, the data-path self-probe passes, its
//! configuration is not a minority among its peers') and not **drained**; the announcer then
//! tells the routing daemon to announce the frontends (a /32 or /128 each), or to withdraw
//! them. Heartbeats ([`peers`]) tell which peers are alive, whether they announce, and their
//! configuration's fingerprint. When the set of announcing nodes changes, the router may move
//! any flow: the workers are told ([`crate::messages::ToWorker::ClusterChanged`]) so that a
//! flow that may now live on another node never gets reset-on-idle RSTs from this one.

pub mod announce;
pub mod peers;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use xlb_api::{ClusterPeer, ClusterStatus};
use xlb_engine::Config;

use announce::{Announcer, BirdTarget};
use peers::{Beat, Peers};

/// `--cluster-*` and `--announce-*`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// This node's name (in heartbeats and the status).
    pub node: String,
    /// Where heartbeats are received (and sent from).
    pub listen: Option<SocketAddr>,
    pub peers: Vec<SocketAddr>,
    pub heartbeat: Duration,
    /// A peer not heard for this long is down.
    pub dead_after: Duration,
    /// How long the router may take to act on a change of the announcing nodes (BGP and
    /// ECMP convergence): flows with no packet until that long after a change expire
    /// without reset-on-idle RSTs. Also how long a stopping node keeps forwarding after it
    /// withdrew.
    pub settle: Duration,
    /// How long this node's configuration may be a minority among its peers' before it
    /// withdraws (a rolling change passes within it).
    pub config_grace: Duration,
    pub bird: Option<BirdTarget>,
    /// This node's own SNAT frontends (`--cluster-snat-frontend`): outbound flows take ports
    /// only on their addresses, and the node announces them with its frontends.
    pub snat_frontends: Vec<String>,
}

/// The fingerprint of a configuration: FNV-1a (64 bits) of its canonical TOML form. The
/// same on every node that holds the same configuration, whatever its generation number.
pub fn fingerprint(config: &Config) -> String {
    let text = config.to_toml_string().unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The host prefixes of the frontends that inbound rules (load balancing, inbound NAT) use:
/// what a fit node announces.
pub fn frontend_prefixes(config: &Config) -> Vec<String> {
    let used: BTreeSet<&str> = (config
        .load_balancing_rules
        .iter()
        .map(|r| r.frontend.as_str()))
    .chain(config.inbound_nat_rules.iter().map(|r| r.frontend.as_str()))
    .collect();
    let mut out: Vec<String> = (config.frontends.iter())
        .filter(|f| used.contains(f.name.as_str()))
        .map(|f| host_prefix(f.address))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn host_prefix(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v) => format!("{v}/32"),
        IpAddr::V6(v) => format!("{v}/128"),
    }
}

/// The addresses of `names` among `config`'s frontends that outbound rules use; an error
/// names one that is not.
pub fn snat_addresses(config: &Config, names: &[String]) -> Result<Vec<IpAddr>, String> {
    names
        .iter()
        .map(|n| {
            let used = (config.outbound_rules.iter()).any(|r| r.frontends.iter().any(|f| f == n));
            match config.frontends.iter().find(|f| &f.name == n) {
                Some(f) if used => Ok(f.address),
                _ => Err(format!(
                    "--cluster-snat-frontend {n}: not a frontend of an outbound rule"
                )),
            }
        })
        .collect()
}

/// What the control loop knows this tick.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub config: &'a Config,
    /// Workers not running the committed generation (empty: all do).
    pub workers_behind: Vec<usize>,
    pub rules: usize,
    /// `Err(why)` when the self-probe does not pass; `Ok` when it passes or is off.
    pub self_probe: Result<(), String>,
    /// Flows in every worker's table.
    pub flows: u64,
}

/// What a tick produced for the control loop.
#[derive(Debug, Default)]
pub struct Tick {
    /// The set of announcing nodes changed: tell the workers.
    pub membership_changed: bool,
    /// Lines for stdout (`xlbd event cluster_…`).
    pub events: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
struct Drain {
    deadline: Option<Instant>,
}

/// The control loop's cluster state.
#[derive(Debug)]
pub struct Cluster {
    opts: ClusterOptions,
    peers: Option<Peers>,
    announcer: Option<Announcer>,
    drain: Option<Drain>,
    wanted: Option<Vec<String>>,
    members: BTreeSet<String>,
    membership_changes: u64,
    minority_since: Option<Instant>,
    unfit_reason: String,
    mismatched: BTreeSet<String>,
    status: ClusterStatus,
}

impl Cluster {
    /// Binds the heartbeat socket and starts the announcer.
    pub fn start(opts: ClusterOptions) -> Result<Cluster, String> {
        let peers = match opts.listen {
            Some(l) => Some(
                Peers::bind(l, &opts.peers, opts.heartbeat)
                    .map_err(|e| format!("--cluster-listen {l}: {e}"))?,
            ),
            None => None,
        };
        let announcer = match &opts.bird {
            Some(t) => Some(
                Announcer::spawn(t.clone()).map_err(|e| format!("starting the announcer: {e}"))?,
            ),
            None => None,
        };
        Ok(Cluster {
            opts,
            peers,
            announcer,
            drain: None,
            wanted: None,
            members: BTreeSet::new(),
            membership_changes: 0,
            minority_since: None,
            unfit_reason: String::new(),
            mismatched: BTreeSet::new(),
            status: ClusterStatus::default(),
        })
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    /// Starts (with an optional deadline) or ends a drain.
    pub fn set_drain(&mut self, drain: bool, deadline: Option<Duration>, now: Instant) {
        self.drain = drain.then(|| Drain {
            deadline: deadline.map(|d| now + d),
        });
    }

    pub fn status(&self) -> &ClusterStatus {
        &self.status
    }

    /// One tick: heartbeats in and out, fitness, what to announce, membership.
    pub fn tick(&mut self, now: Instant, inputs: &Inputs<'_>) -> Tick {
        let mut tick = Tick::default();
        let fp = fingerprint(inputs.config);
        let unfit = self.unfit(now, inputs, &fp);
        let announcing = unfit.is_none() && self.drain.is_none();
        let me = Beat {
            node: self.opts.node.clone(),
            fingerprint: fp.clone(),
            announcing,
        };
        if let Some(p) = self.peers.as_mut() {
            p.poll(now, &me);
        }
        let why = unfit.clone().unwrap_or_default();
        if why != self.unfit_reason {
            tick.events.push(if why.is_empty() {
                format!("xlbd event cluster_fit node={}", self.opts.node)
            } else {
                format!(
                    "xlbd event cluster_unfit node={} why=\"{why}\"",
                    self.opts.node
                )
            });
            self.unfit_reason = why;
        }
        // A drained node keeps its SNAT addresses until the drain is done: its outbound
        // flows' answers can reach no other node.
        let drain_done = self
            .drain
            .is_some_and(|d| inputs.flows == 0 || d.deadline.is_some_and(|t| now >= t));
        let keep_snat = unfit.is_none() && self.drain.is_some() && !drain_done;
        let mut wanted = if announcing {
            frontend_prefixes(inputs.config)
        } else {
            Vec::new()
        };
        if announcing || keep_snat {
            // Names that no longer resolve (a changed configuration) are simply not announced.
            for n in &self.opts.snat_frontends {
                if let Ok(a) = snat_addresses(inputs.config, std::slice::from_ref(n)) {
                    wanted.extend(a.into_iter().map(host_prefix));
                }
            }
            wanted.sort();
            wanted.dedup();
        }
        if self.wanted.as_ref() != Some(&wanted) {
            tick.events.push(format!(
                "xlbd event cluster_announce node={} prefixes={} why=\"{}\"",
                self.opts.node,
                if wanted.is_empty() {
                    "-".to_string()
                } else {
                    wanted.join(",")
                },
                if announcing {
                    "fit"
                } else if self.drain.is_some() {
                    "drained"
                } else {
                    &self.unfit_reason
                }
            ));
            if let Some(a) = &self.announcer {
                a.want(wanted.clone());
            }
            self.wanted = Some(wanted);
        }
        let members = self.members(now, announcing);
        if members != self.members {
            self.membership_changes += 1;
            tick.membership_changed = true;
            tick.events.push(format!(
                "xlbd event cluster_membership node={} announcing={} changes={}",
                self.opts.node,
                if members.is_empty() {
                    "-".to_string()
                } else {
                    members.iter().cloned().collect::<Vec<_>>().join(",")
                },
                self.membership_changes
            ));
            self.members = members;
        }
        let mismatched = self.mismatched_peers(now, &fp);
        for p in mismatched.difference(&self.mismatched) {
            tick.events.push(format!(
                "xlbd event cluster_config_mismatch node={} peer={p}",
                self.opts.node
            ));
        }
        self.mismatched = mismatched;
        self.status = self.status_now(now, inputs, fp);
        tick
    }

    /// Why this node may not announce now (`None`: fit).
    fn unfit(&mut self, now: Instant, inputs: &Inputs<'_>, fp: &str) -> Option<String> {
        if inputs.rules == 0 {
            return Some("no rules loaded".into());
        }
        if !inputs.workers_behind.is_empty() {
            return Some(format!(
                "workers {:?} do not run the committed rule set",
                inputs.workers_behind
            ));
        }
        if let Err(e) = &inputs.self_probe {
            return Some(format!("self-probe: {e}"));
        }
        // Configuration: a strict minority among the live nodes withdraws after the grace.
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        *counts.entry(fp).or_default() += 1;
        if let Some(p) = &self.peers {
            for peer in &p.peers {
                if let (true, Some((_, b))) = (peer.alive(now, self.opts.dead_after), &peer.last) {
                    *counts.entry(b.fingerprint.as_str()).or_default() += 1;
                }
            }
        }
        let mine = counts[fp];
        let best = counts.values().copied().max().unwrap_or(0);
        if best > mine {
            let since = *self.minority_since.get_or_insert(now);
            if now.duration_since(since) >= self.opts.config_grace {
                return Some(format!(
                    "configuration {fp} is held by {mine} node(s), another by {best}"
                ));
            }
        } else {
            self.minority_since = None;
        }
        None
    }

    /// The names of the nodes that announce now, this one included when it does.
    fn members(&self, now: Instant, announcing: bool) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if announcing {
            out.insert(self.opts.node.clone());
        }
        if let Some(p) = &self.peers {
            for peer in &p.peers {
                if let (true, Some((_, b))) = (peer.alive(now, self.opts.dead_after), &peer.last) {
                    if b.announcing {
                        out.insert(b.node.clone());
                    }
                }
            }
        }
        out
    }

    fn mismatched_peers(&self, now: Instant, fp: &str) -> BTreeSet<String> {
        let Some(p) = &self.peers else {
            return BTreeSet::new();
        };
        (p.peers.iter())
            .filter(|peer| peer.alive(now, self.opts.dead_after))
            .filter_map(|peer| peer.last.as_ref())
            .filter(|(_, b)| b.fingerprint != fp)
            .map(|(_, b)| b.node.clone())
            .collect()
    }

    fn status_now(&self, now: Instant, inputs: &Inputs<'_>, fp: String) -> ClusterStatus {
        let applied = self
            .announcer
            .as_ref()
            .map(|a| a.applied())
            .unwrap_or_default();
        let (drain_remaining, deadline_passed) = match self.drain.and_then(|d| d.deadline) {
            Some(d) => (d.saturating_duration_since(now), now >= d),
            None => (Duration::ZERO, false),
        };
        let peers = self
            .peers
            .as_ref()
            .map(|p| {
                (p.peers.iter())
                    .map(|peer| {
                        let last = peer.last.as_ref();
                        ClusterPeer {
                            address: peer.addr.to_string(),
                            node: last.map(|(_, b)| b.node.clone()).unwrap_or_default(),
                            alive: peer.alive(now, self.opts.dead_after),
                            announcing: last.is_some_and(|(_, b)| b.announcing),
                            config_fingerprint: last
                                .map(|(_, b)| b.fingerprint.clone())
                                .unwrap_or_default(),
                            same_config: last.is_some_and(|(_, b)| b.fingerprint == fp),
                            last_heard: last.map(|(t, _)| now.duration_since(*t)),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        ClusterStatus {
            node: self.opts.node.clone(),
            fit: self.unfit_reason.is_empty(),
            unfit_reason: self.unfit_reason.clone(),
            draining: self.drain.is_some(),
            drain_remaining,
            drain_done: self.drain.is_some() && (inputs.flows == 0 || deadline_passed),
            announced: if self.announcer.is_some() {
                applied.prefixes
            } else {
                self.wanted.clone().unwrap_or_default()
            },
            announcer: (self.opts.bird.as_ref())
                .map(BirdTarget::describe)
                .unwrap_or_else(|| "none".into()),
            announce_error: applied.error,
            config_fingerprint: fp,
            peers,
            membership_changes: self.membership_changes,
        }
    }

    /// Withdraws everything (waiting at most 2 s for the routing daemon), then keeps
    /// forwarding for the settle time so that packets the router still sends here are served.
    pub fn stop(mut self) -> Option<String> {
        let announcer = self.announcer.take()?;
        let ok = announcer.withdraw_and_stop(Duration::from_secs(2));
        std::thread::sleep(self.opts.settle.min(Duration::from_secs(5)));
        Some(if ok {
            format!("xlbd event cluster_withdrawn node={}", self.opts.node)
        } else {
            format!(
                "xlbd event cluster_withdraw_failed node={} why=\"the routing daemon did not confirm within 2 s\"",
                self.opts.node
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[[frontends]]
name = "vip"
address = "198.18.100.100"
kind = "public"

[[frontends]]
name = "vip6"
address = "2001:db8:100::100"
kind = "public"

[[frontends]]
name = "snat"
address = "198.18.200.1"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.101" }, { address = "198.18.1.102" }]

[[load_balancing_rules]]
name = "web"
frontend = "vip"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080

[[inbound_nat_rules]]
name = "ssh"
frontend = "vip6"
protocol = "TCP"
frontend_port = 2201
target = "2001:db8:1::101"
backend_port = 22

[[outbound_rules]]
name = "out"
frontends = ["snat"]
backend_pool = "web"
protocol = "ALL"
"#;

    fn config() -> Config {
        Config::from_toml_str(CONFIG).unwrap()
    }

    fn node(name: &str) -> Cluster {
        Cluster::start(ClusterOptions {
            node: name.into(),
            listen: None,
            peers: vec![],
            heartbeat: Duration::from_millis(100),
            dead_after: Duration::from_secs(1),
            settle: Duration::ZERO,
            config_grace: Duration::from_secs(10),
            bird: None,
            snat_frontends: vec!["snat".into()],
        })
        .unwrap()
    }

    fn inputs(c: &Config) -> Inputs<'_> {
        Inputs {
            config: c,
            workers_behind: vec![],
            rules: 2,
            self_probe: Ok(()),
            flows: 3,
        }
    }

    #[test]
    fn fingerprint_is_the_configuration_not_its_text_or_generation() {
        let a = config();
        let b = Config::from_toml_str(&a.to_toml_string().unwrap()).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        let mut c = config();
        c.backend_pools[0].members.pop();
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }

    #[test]
    fn the_frontends_of_inbound_rules_are_announced_as_host_prefixes() {
        assert_eq!(
            frontend_prefixes(&config()),
            vec![
                "198.18.100.100/32".to_string(),
                "2001:db8:100::100/128".into()
            ]
        );
    }

    #[test]
    fn a_fit_node_announces_an_unfit_or_drained_one_withdraws() {
        let c = config();
        let mut n = node("n1");
        let t0 = Instant::now();
        let tick = n.tick(t0, &inputs(&c));
        assert!(
            tick.membership_changed,
            "this node joined the announcing set"
        );
        assert_eq!(
            n.status().announced,
            [
                "198.18.100.100/32",
                "198.18.200.1/32",
                "2001:db8:100::100/128"
            ]
        );
        assert_eq!(
            snat_addresses(&c, &["vip".into()]).unwrap_err(),
            "--cluster-snat-frontend vip: not a frontend of an outbound rule"
        );
        assert!(n.status().fit);

        let mut probe_fails = inputs(&c);
        probe_fails.self_probe = Err("rule web is not answered".into());
        let tick = n.tick(t0, &probe_fails);
        assert!(tick.membership_changed);
        assert!(n.status().announced.is_empty());
        assert_eq!(
            n.status().unfit_reason,
            "self-probe: rule web is not answered"
        );
        assert!(tick.events.iter().any(|e| e.contains("cluster_unfit")));

        let mut behind = inputs(&c);
        behind.workers_behind = vec![1];
        n.tick(t0, &behind);
        assert!(n.status().unfit_reason.contains("workers [1]"));

        n.tick(t0, &inputs(&c));
        assert_eq!(n.status().announced.len(), 3);
        n.set_drain(true, Some(Duration::from_secs(30)), t0);
        let tick = n.tick(t0, &inputs(&c));
        assert!(tick.membership_changed);
        let s = n.status();
        assert!(s.draining && s.fit && !s.drain_done);
        assert_eq!(
            s.announced,
            ["198.18.200.1/32"],
            "SNAT kept while flows drain"
        );
        let mut no_flows = inputs(&c);
        no_flows.flows = 0;
        n.tick(t0, &no_flows);
        assert!(n.status().drain_done, "drained: no flow left");
        assert!(n.status().announced.is_empty());
        n.set_drain(false, None, t0);
        n.tick(t0, &inputs(&c));
        assert_eq!(n.status().announced.len(), 3);
        assert_eq!(n.status().membership_changes, 5);
    }

    #[test]
    fn no_rules_is_unfit() {
        let c = config();
        let mut n = node("n1");
        let mut none = inputs(&c);
        none.rules = 0;
        assert!(!n.tick(Instant::now(), &none).membership_changed);
        assert_eq!(n.status().unfit_reason, "no rules loaded");
    }

    #[test]
    fn a_configuration_in_the_minority_withdraws_after_the_grace() {
        let c = config();
        let mut other = config();
        other.backend_pools[0].members.pop();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let mut n = Cluster::start(ClusterOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            peers: vec![a, b],
            ..node("n1").opts
        })
        .unwrap();
        let t0 = Instant::now();
        let theirs = fingerprint(&other);
        let hear = |n: &mut Cluster, at: Instant, fp: &str| {
            let peers = &mut n.peers.as_mut().unwrap().peers;
            for (i, p) in peers.iter_mut().enumerate() {
                p.last = Some((
                    at,
                    Beat {
                        node: format!("peer{i}"),
                        fingerprint: fp.to_string(),
                        announcing: true,
                    },
                ));
            }
        };
        hear(&mut n, t0, &theirs);
        n.tick(t0, &inputs(&c));
        assert!(n.status().fit, "within the grace");
        assert_eq!(
            n.status().peers.iter().filter(|p| !p.same_config).count(),
            2
        );
        let later = t0 + Duration::from_secs(11);
        hear(&mut n, later, &theirs);
        n.tick(later, &inputs(&c));
        assert!(n
            .status()
            .unfit_reason
            .contains("held by 1 node(s), another by 2"));
        assert!(n.status().announced.is_empty());
        // The peers take this node's configuration: fit again.
        hear(&mut n, later, &fingerprint(&c));
        n.tick(later, &inputs(&c));
        assert!(n.status().fit);
        // Peers not heard within the dead interval do not count.
        let much_later = later + Duration::from_secs(30);
        n.tick(much_later, &inputs(&c));
        assert!(n.status().peers.iter().all(|p| !p.alive));
    }
}
