//! Drains and the NAT event log as the API reports them: a drained member's progress summed
//! over the workers ([`sum_drains`]), the drain events the daemon's drain watcher sends, and
//! the NAT event export's figures.

use std::net::IpAddr;

/// What a drain reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainPhase {
    /// The member's admin state became `down`.
    Started,
    /// Its flow count changed.
    Progress,
    /// Its deadline passed and its action ran on every worker.
    Deadline,
    /// No flow of it is left on any worker.
    Completed,
}

impl DrainPhase {
    pub const fn as_str(self) -> &'static str {
        match self {
            DrainPhase::Started => "started",
            DrainPhase::Progress => "progress",
            DrainPhase::Deadline => "deadline",
            DrainPhase::Completed => "completed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainEvent {
    pub pool: String,
    pub member: IpAddr,
    pub phase: DrainPhase,
    /// Summed over workers; `None` until every worker counted.
    pub flows_left: Option<u64>,
    pub flows_reset: u64,
    /// Milliseconds to the deadline (negative once passed); `None` without a deadline.
    pub deadline_in_ms: Option<i64>,
    pub action: xlb_engine::config::DrainAction,
}

/// One drained member's progress, summed over workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainStatus {
    pub pool: String,
    pub member: IpAddr,
    /// Its flows on every worker; `None` until every worker has counted them once.
    pub flows_left: Option<u64>,
    /// TCP flows reset at the deadline (RSTs to both ends).
    pub flows_reset: u64,
    /// TCP flows ended at the deadline without RSTs (not established).
    pub flows_ended: u64,
    /// Every worker ran the deadline's action.
    pub deadline_done: bool,
}

/// Sums the drain progress of every worker (each a list in its rule set's order; a worker
/// that has not reported yet gives an empty list): per (pool, member), in the order first
/// seen. A drain that some worker does not report yet (it runs an older rule set) is not
/// counted yet: `flows_left` is `None` and its deadline not done.
pub fn sum_drains(workers: &[&[xlb_engine::drain::DrainProgress]]) -> Vec<DrainStatus> {
    let mut out: Vec<(DrainStatus, usize)> = Vec::new();
    for list in workers {
        for p in *list {
            let member = p.member.to_ip();
            let i = match out
                .iter()
                .position(|(d, _)| d.pool == *p.pool && d.member == member)
            {
                Some(i) => i,
                None => {
                    out.push((
                        DrainStatus {
                            pool: p.pool.to_string(),
                            member,
                            flows_left: Some(0),
                            flows_reset: 0,
                            flows_ended: 0,
                            deadline_done: true,
                        },
                        0,
                    ));
                    out.len() - 1
                }
            };
            let (d, reported) = &mut out[i];
            *reported += 1;
            d.flows_left = match (d.flows_left, p.flows_left) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            };
            d.flows_reset += p.flows_reset;
            d.flows_ended += p.flows_ended;
            d.deadline_done &= p.deadline_done;
        }
    }
    out.into_iter()
        .map(|(mut d, reported)| {
            if reported < workers.len() {
                d.flows_left = None;
                d.deadline_done = false;
            }
            d
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use xlb_engine::drain::DrainProgress;
    use xlb_engine::Addr;

    use super::sum_drains;

    fn p(member: u8, left: Option<u64>, reset: u64, done: bool) -> DrainProgress {
        DrainProgress {
            pool: Arc::from("web"),
            member: Addr::from_v4_bytes([198, 18, 1, member]),
            flows_left: left,
            flows_reset: reset,
            flows_ended: 0,
            deadline_done: done,
        }
    }

    #[test]
    fn drains_are_summed_only_once_every_worker_counted_them() {
        let w0 = [p(11, Some(2), 1, true), p(12, Some(0), 0, false)];
        let w1 = [p(11, Some(3), 2, true)];
        let s = sum_drains(&[&w0, &w1]);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].flows_left, s[0].flows_reset, s[0].deadline_done),
            (Some(5), 3, true)
        );
        assert_eq!(
            (s[1].flows_left, s[1].deadline_done),
            (None, false),
            "worker 1 does not run that drain yet"
        );
        let w1 = [p(11, None, 0, false)];
        assert_eq!(
            sum_drains(&[&w0, &w1])[0].flows_left,
            None,
            "not counted yet"
        );
        assert_eq!(
            sum_drains(&[&w0, &[]])[0].flows_left,
            None,
            "no snapshot yet"
        );
    }
}

/// The NAT event log's figures since start (IPFIX export, docs/xlbd.md).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatLogStatus {
    /// Where records go.
    pub collector: String,
    /// Records and IPFIX messages sent.
    pub records_sent: u64,
    pub messages_sent: u64,
    /// Records lost: queues full (engine, worker → exporter), sends that failed.
    pub records_lost: u64,
}
