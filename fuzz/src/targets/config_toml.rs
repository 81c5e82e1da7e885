//! Target: the start-up configuration file: TOML parse, validation, compilation.
//!
//! Invariants:
//! - parsing and validating any text never panics; a refused file says why (at least one
//!   error, each one printable);
//! - a configuration that validates compiles, on its own and over an existing rule set (the
//!   path a reload takes), with any member marked down;
//! - it round-trips: its TOML reads back to an equal configuration, and so does its gRPC form;
//! - the compiled rule set answers lookups for every frontend and rule.

use xlb_api::convert;
use xlb_engine::config::{Config, ConfigError, MemberHealth};
use xlb_engine::ruleset::FlowTuple;
use xlb_engine::{compile, Addr, RuleSet};

use crate::lab;

/// Runs one input. Panics when an invariant breaks.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml_str(text) {
        Ok(config) => check_valid(&config, data),
        Err(ConfigError::Invalid(errors)) => {
            assert!(!errors.is_empty(), "refused without a reason");
            let _ = errors.to_string();
        }
        Err(ConfigError::Parse(message)) => assert!(!message.is_empty()),
    }
}

/// What must hold for every configuration that validates (shared with the API target).
pub fn check_valid(config: &Config, salt: &[u8]) {
    let rules = compile(config, None, &MemberHealth::all_healthy(), 1)
        .expect("a configuration that validates compiles");
    // A reload over the harness's base rule set, with one member marked down.
    let mut health = MemberHealth::all_healthy();
    if let Some(pool) = config
        .backend_pools
        .get(salt.len() % config.backend_pools.len().max(1))
    {
        if let Some(m) = pool.members.get(salt.len() % pool.members.len().max(1)) {
            health.set_healthy(&pool.name, m.address, false);
        }
    }
    let reloaded = compile(config, Some(&lab::base_rules()), &health, 2)
        .expect("a configuration that validates compiles over a previous rule set");
    let again = compile(config, Some(&reloaded), &health, 3).expect("and again");
    assert_eq!(
        rule_names(&reloaded),
        rule_names(&again),
        "rule ids changed across a reload of the same configuration"
    );
    lookups(config, &rules);

    let toml = config
        .to_toml_string()
        .expect("a valid configuration serializes");
    let back = Config::from_toml_str(&toml).expect("its own TOML reads back");
    assert_eq!(&back, config, "TOML round trip changed the configuration");

    let pb = convert::config_to(config, 7);
    let back = convert::config_from(pb).expect("its gRPC form converts back");
    assert_eq!(&back, config, "gRPC round trip changed the configuration");
}

fn rule_names(rs: &RuleSet) -> Vec<(u16, String)> {
    let mut v: Vec<(u16, String)> = rs.rules().map(|(id, p)| (id, p.name.to_string())).collect();
    v.sort();
    v
}

/// Every frontend and rule port: inbound matching and backend selection answer without
/// panicking, and a selected backend is a member of some pool.
fn lookups(config: &Config, rs: &RuleSet) {
    let ports: Vec<u16> = config
        .load_balancing_rules
        .iter()
        .map(|r| r.frontend_port as u16)
        .chain(
            config
                .inbound_nat_rules
                .iter()
                .filter_map(|r| r.frontend_port.map(|p| p as u16)),
        )
        .chain([0, 1, 65535])
        .collect();
    for fe in &config.frontends {
        let addr = Addr::from(fe.address);
        assert!(rs.is_frontend(addr));
        for &port in &ports {
            for proto in [6u8, 17] {
                if let Some(id) = rs.match_inbound(proto, addr, port) {
                    assert!(rs.rule(id).is_some(), "matched a rule id with no rule");
                    let tuple = FlowTuple {
                        proto,
                        src: Addr::from_v4_bytes([198, 18, 0, 10]),
                        src_port: 40_000,
                        dst: addr,
                        dst_port: port,
                    };
                    if let Some(b) = rs.select_backend(id, &tuple) {
                        let known = config
                            .backend_pools
                            .iter()
                            .any(|p| p.members.iter().any(|m| Addr::from(m.address) == b.addr))
                            || config
                                .inbound_nat_rules
                                .iter()
                                .any(|r| r.target.is_some_and(|t| Addr::from(t) == b.addr));
                        assert!(known, "selected a backend no pool or rule names");
                    }
                }
            }
        }
    }
    for (_, _, member, blocks) in rs.outbound_allocations() {
        let _ = rs.match_outbound(6, member);
        for b in blocks {
            assert!(u32::from(b.first_port) + u32::from(b.count) <= 65_536);
        }
    }
}
