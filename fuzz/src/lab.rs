//! The configuration the stateful harness runs: one of each kind of rule the engine has, small
//! enough that floods fill the table and exhaust SNAT ports in a few operations, and the
//! variants it swaps to.

use std::sync::{Arc, OnceLock};

use xlb_engine::config::{Config, MemberHealth};
use xlb_engine::{compile, RuleSet};

use crate::frames::B1;

/// The base configuration: load balancing (with reset on idle, `pickup`, `reset` policy, UDP,
/// IPv6), inbound NAT and outbound SNAT with 8 ports per member.
pub const BASE: &str = r#"
[[frontends]]
name = "web"
address = "198.18.0.100"
kind = "public"

[[frontends]]
name = "web6"
address = "2001:db8::100"
kind = "public"

[[frontends]]
name = "egress"
address = "198.19.0.1"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[backend_pools]]
name = "web6"
members = [{ address = "2001:db8:1::11" }]

[[load_balancing_rules]]
name = "http"
frontend = "web"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 4
tcp_reset = true

[[load_balancing_rules]]
name = "http-pickup"
frontend = "web"
protocol = "TCP"
frontend_port = 81
backend_pool = "web"
backend_port = 8080
tcp_reset = true
unknown_flow = "pickup"

[[load_balancing_rules]]
name = "http-reset-policy"
frontend = "web"
protocol = "TCP"
frontend_port = 82
backend_pool = "web"
backend_port = 8080
unknown_flow = "reset"

[[load_balancing_rules]]
name = "dns"
frontend = "web"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 5353

[[load_balancing_rules]]
name = "http6"
frontend = "web6"
protocol = "TCP"
frontend_port = 80
backend_pool = "web6"
backend_port = 8080
tcp_reset = true
idle_timeout_minutes = 30

[[inbound_nat_rules]]
name = "ssh-b1"
frontend = "web"
protocol = "TCP"
frontend_port = 2201
target = "198.18.1.11"
backend_port = 22
tcp_reset = true

[[outbound_rules]]
name = "egress"
frontends = ["egress"]
backend_pool = "web"
protocol = "ALL"
allocated_outbound_ports = 8
idle_timeout_minutes = 4
tcp_reset = true
"#;

/// Shorter timers everywhere (lab time), reset on idle off for `http`, a short UDP timeout.
pub const FAST: &str = r#"
[settings]
lab_time_scale = 60
udp_idle_timeout_seconds = 30

[[frontends]]
name = "web"
address = "198.18.0.100"
kind = "public"

[[frontends]]
name = "web6"
address = "2001:db8::100"
kind = "public"

[[frontends]]
name = "egress"
address = "198.19.0.1"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[backend_pools]]
name = "web6"
members = [{ address = "2001:db8:1::11" }]

[[load_balancing_rules]]
name = "http"
frontend = "web"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080

[[load_balancing_rules]]
name = "http-pickup"
frontend = "web"
protocol = "TCP"
frontend_port = 81
backend_pool = "web"
backend_port = 8080
tcp_reset = true
unknown_flow = "pickup"

[[load_balancing_rules]]
name = "http-reset-policy"
frontend = "web"
protocol = "TCP"
frontend_port = 82
backend_pool = "web"
backend_port = 8080
unknown_flow = "reset"

[[load_balancing_rules]]
name = "dns"
frontend = "web"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 5353

[[load_balancing_rules]]
name = "http6"
frontend = "web6"
protocol = "TCP"
frontend_port = 80
backend_pool = "web6"
backend_port = 8080
tcp_reset = true

[[inbound_nat_rules]]
name = "ssh-b1"
frontend = "web"
protocol = "TCP"
frontend_port = 2201
target = "198.18.1.11"
backend_port = 22
tcp_reset = true

[[outbound_rules]]
name = "egress"
frontends = ["egress"]
backend_pool = "web"
protocol = "ALL"
allocated_outbound_ports = 8
idle_timeout_minutes = 4
tcp_reset = true
"#;

/// Rules deleted (`http-pickup`, inbound NAT), a member removed from the pool, SNAT blocks
/// resized, the longest idle timeout.
pub const SHRUNK: &str = r#"
[[frontends]]
name = "web"
address = "198.18.0.100"
kind = "public"

[[frontends]]
name = "web6"
address = "2001:db8::100"
kind = "public"

[[frontends]]
name = "egress"
address = "198.19.0.1"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }]

[[backend_pools]]
name = "web6"
members = [{ address = "2001:db8:1::11" }]

[[load_balancing_rules]]
name = "http"
frontend = "web"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 30
tcp_reset = true

[[load_balancing_rules]]
name = "http-reset-policy"
frontend = "web"
protocol = "TCP"
frontend_port = 82
backend_pool = "web"
backend_port = 8080
unknown_flow = "reset"

[[load_balancing_rules]]
name = "dns"
frontend = "web"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 5353

[[load_balancing_rules]]
name = "http6"
frontend = "web6"
protocol = "TCP"
frontend_port = 80
backend_pool = "web6"
backend_port = 8080
tcp_reset = true

[[outbound_rules]]
name = "egress"
frontends = ["egress"]
backend_pool = "web"
protocol = "ALL"
allocated_outbound_ports = 16
idle_timeout_minutes = 4
tcp_reset = true
"#;

/// Every timeout of any variant is shorter than this, so after it every flow has expired.
pub const LONGEST_TIMEOUT_SECS: u64 = 60 * 60;

/// Number of rule-set variants [`variant`] knows.
pub const VARIANTS: u8 = 4;

fn parsed() -> &'static [Config; 3] {
    static CONFIGS: OnceLock<[Config; 3]> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        [BASE, FAST, SHRUNK].map(|t| Config::from_toml_str(t).expect("harness config is valid"))
    })
}

/// The base rule set (compiled once per process: engines share it through the `Arc`).
pub fn base_rules() -> Arc<RuleSet> {
    static RULES: OnceLock<Arc<RuleSet>> = OnceLock::new();
    RULES
        .get_or_init(|| {
            let c = &parsed()[0];
            Arc::new(compile(c, None, &MemberHealth::all_healthy(), 1).expect("base compiles"))
        })
        .clone()
}

/// Rule-set variant `v` (`0..VARIANTS`: base, fast timers, shrunk, base with member B1 down),
/// compiled once per process against the base rule set. Compiling against whichever variant
/// is running instead (as the control plane does) assigns the same rule ids: the variants only
/// delete rules of the base and add none (a test pins this), so the cached sets are the ones a
/// reload would produce, without the cost of building selection tables on every swap.
pub fn variant(v: u8) -> Arc<RuleSet> {
    static RULES: OnceLock<Vec<Arc<RuleSet>>> = OnceLock::new();
    RULES
        .get_or_init(|| {
            let base = base_rules();
            (0..VARIANTS)
                .map(|v| Arc::new(compile_variant(v, &base, 2 + u64::from(v))))
                .collect()
        })
        .get(usize::from(v % VARIANTS))
        .cloned()
        .unwrap_or_else(base_rules)
}

/// Variant `v` compiled against `previous`.
pub fn compile_variant(v: u8, previous: &RuleSet, generation: u64) -> RuleSet {
    let configs = parsed();
    let mut health = MemberHealth::all_healthy();
    let config = match v % VARIANTS {
        0 => &configs[0],
        1 => &configs[1],
        2 => &configs[2],
        _ => {
            health.set_healthy("web", B1, false);
            &configs[0]
        }
    };
    compile(config, Some(previous), &health, generation).expect("variant compiles")
}
