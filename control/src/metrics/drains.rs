//! Drains and the NAT event export in the exposition: flows left per drained member, resets
//! at its deadline and the time to it; IPFIX records sent and lost.

use super::{Families, Sources, COUNTER, GAUGE};

/// Drains: flows left per drained member, resets at the deadline, time to the deadline.
pub(super) fn drains(o: &mut Families, src: &Sources) {
    let drains = src.shared.drains();
    o.family(
        "xlb_member_drain_flows",
        GAUGE,
        "Flows a drained member (admin state down) still has on every worker (absent until \
         every worker counted them).",
    );
    for d in &drains {
        if let Some(n) = d.flows_left {
            let member = d.member.to_string();
            o.sample(&[("pool", &d.pool), ("member", &member)], n as f64);
        }
    }
    o.family(
        "xlb_member_drain_reset_flows_total",
        COUNTER,
        "TCP flows of a drained member ended at its drain deadline with an RST to both ends.",
    );
    for d in &drains {
        let member = d.member.to_string();
        o.sample(
            &[("pool", &d.pool), ("member", &member)],
            d.flows_reset as f64,
        );
    }
    o.family(
        "xlb_member_drain_deadline_seconds",
        GAUGE,
        "Seconds until a drained member's deadline (negative once passed; absent without a \
         deadline), on the workers' (lab-scaled) time.",
    );
    let now = src.state.now();
    for m in src.state.snapshot().members() {
        if let Some(deadline) = m.drain.and_then(|d| d.deadline) {
            let ms = xlb_api::service::ms_between(now, deadline);
            let member = m.address.to_string();
            o.sample(
                &[("pool", &m.pool), ("member", &member)],
                ms as f64 / 1000.0,
            );
        }
    }
}

/// The NAT event export (IPFIX), when it runs.
pub(super) fn nat_log(o: &mut Families, src: &Sources) {
    let Some(n) = src.shared.nat_log_status() else {
        return;
    };
    o.family(
        "xlb_nat_log_records_total",
        COUNTER,
        "NAT event records (IPFIX) sent to the collector, and lost (queues full, failed sends).",
    );
    for (result, v) in [("sent", n.records_sent), ("lost", n.records_lost)] {
        o.sample(&[("collector", &n.collector), ("result", result)], v as f64);
    }
    o.family(
        "xlb_nat_log_messages_total",
        COUNTER,
        "IPFIX messages sent to the collector.",
    );
    o.sample(&[("collector", &n.collector)], n.messages_sent as f64);
}
