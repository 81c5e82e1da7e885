//! Validation of the configuration: every rule at each bound (below, at, above), and error messages
//! that name the field, the value and the allowed range.

use std::net::IpAddr;

use xlb_engine::config::{
    default_outbound_ports, validate, AdminState, BackendPool, Config, ConfigError, DrainAction,
    Frontend, FrontendKind, HealthProbe, InboundNatRule, LoadBalancingRule, Member, MinutesRange,
    OutboundRule, PortRange, ProbeProtocol, Protocol,
};
use xlb_engine::ValidationError;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn members(prefix: &str, n: usize) -> Vec<Member> {
    (1..=n)
        .map(|i| Member::new(ip(&format!("{prefix}{i}"))))
        .collect()
}

fn many_members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| Member::new(ip(&format!("198.19.{}.{}", (i / 256) % 256, i % 256))))
        .collect()
}

fn lb(name: &str, frontend: &str, protocol: Protocol, port: u32) -> LoadBalancingRule {
    LoadBalancingRule {
        name: name.into(),
        frontend: frontend.into(),
        protocol,
        frontend_port: port,
        backend_pool: "web".into(),
        backend_port: if port == 0 { 0 } else { 8080 },
        idle_timeout_minutes: 4,
        tcp_reset: false,
        floating_ip: false,
        distribution: Default::default(),
        health_probe: None,
        unknown_flow: Default::default(),
    }
}

fn nat(name: &str, port: u32) -> InboundNatRule {
    InboundNatRule {
        name: name.into(),
        frontend: "vip".into(),
        protocol: Protocol::Tcp,
        frontend_port: Some(port),
        frontend_port_range: None,
        target: Some(ip("198.18.2.1")),
        backend_pool: None,
        backend_port: 22,
        idle_timeout_minutes: 4,
        tcp_reset: false,
        floating_ip: false,
        unknown_flow: Default::default(),
    }
}

fn out(name: &str, frontends: &[&str], pool: &str, protocol: Protocol) -> OutboundRule {
    OutboundRule {
        name: name.into(),
        frontends: frontends.iter().map(|s| s.to_string()).collect(),
        backend_pool: pool.into(),
        protocol,
        allocated_outbound_ports: None,
        idle_timeout_minutes: 4,
        tcp_reset: false,
        unknown_flow: Default::default(),
    }
}

/// A valid configuration with one object of every kind.
fn base() -> Config {
    Config {
        frontends: vec![
            Frontend {
                name: "vip".into(),
                address: ip("198.18.0.10"),
                kind: FrontendKind::Public,
            },
            Frontend {
                name: "ilb".into(),
                address: ip("198.18.4.100"),
                kind: FrontendKind::Internal,
            },
            Frontend {
                name: "snat1".into(),
                address: ip("198.18.0.11"),
                kind: FrontendKind::Public,
            },
            Frontend {
                name: "snat2".into(),
                address: ip("198.18.0.12"),
                kind: FrontendKind::Public,
            },
            Frontend {
                name: "vip6".into(),
                address: ip("2001:db8::10"),
                kind: FrontendKind::Public,
            },
        ],
        backend_pools: vec![
            BackendPool {
                name: "web".into(),
                members: members("198.18.2.", 3),
            },
            BackendPool {
                name: "web6".into(),
                members: members("2001:db8::", 2),
            },
        ],
        health_probes: vec![HealthProbe {
            name: "http".into(),
            protocol: ProbeProtocol::Http,
            port: 80,
            path: Some("/healthz".into()),
            interval_seconds: 5,
            threshold: 2,
            timeout_seconds: None,
            tls_verify: false,
            tls_server_name: None,
            tls_ca_file: None,
            http_status: None,
        }],
        load_balancing_rules: vec![lb("web", "vip", Protocol::Tcp, 80)],
        inbound_nat_rules: vec![nat("ssh", 2201)],
        outbound_rules: vec![out("out", &["snat1"], "web", Protocol::All)],
        ..Config::default()
    }
}

fn errors(c: &Config) -> Vec<ValidationError> {
    match validate(c) {
        Ok(()) => Vec::new(),
        Err(e) => e.0,
    }
}

#[track_caller]
fn ok(c: &Config) {
    let e = errors(c);
    assert!(e.is_empty(), "expected valid, got: {e:#?}");
}

/// Exactly one error, at `path`; returns it.
#[track_caller]
fn only_error(c: &Config, path: &str) -> ValidationError {
    let e = errors(c);
    assert_eq!(e.len(), 1, "expected one error at {path}, got: {e:#?}");
    assert_eq!(e[0].path, path, "{e:#?}");
    e.into_iter().next().unwrap()
}

/// The error's text names the field, the value and the allowed range.
#[track_caller]
fn says(e: &ValidationError, value: &str, allowed: &str) {
    let text = e.to_string();
    assert_eq!(e.value, value, "{text}");
    assert!(e.allowed.contains(allowed), "{text}");
    assert!(
        text.contains(&e.path) && text.contains(value) && text.contains(allowed),
        "{text}"
    );
}

#[test]
fn base_config_is_valid() {
    ok(&base());
    ok(&Config::default());
}

#[test]
fn lb_idle_timeout_bounds_4_to_30() {
    for (v, valid) in [(3, false), (4, true), (30, true), (31, false)] {
        let mut c = base();
        c.load_balancing_rules[0].idle_timeout_minutes = v;
        if valid {
            ok(&c);
        } else {
            let e = only_error(&c, "load_balancing_rules[web].idle_timeout_minutes");
            says(&e, &v.to_string(), "4–30");
            assert!(e.message.contains("inbound_idle_timeout_bounds"), "{e}");
        }
    }
}

#[test]
fn nat_idle_timeout_bounds_4_to_30() {
    for (v, valid) in [(3, false), (4, true), (30, true), (31, false)] {
        let mut c = base();
        c.inbound_nat_rules[0].idle_timeout_minutes = v;
        if valid {
            ok(&c);
        } else {
            let e = only_error(&c, "inbound_nat_rules[ssh].idle_timeout_minutes");
            says(&e, &v.to_string(), "4–30");
        }
    }
}

#[test]
fn outbound_idle_timeout_bounds_4_to_100() {
    for (v, valid) in [(3, false), (4, true), (100, true), (101, false)] {
        let mut c = base();
        c.outbound_rules[0].idle_timeout_minutes = v;
        if valid {
            ok(&c);
        } else {
            let e = only_error(&c, "outbound_rules[out].idle_timeout_minutes");
            says(&e, &v.to_string(), "4–100");
        }
    }
}

#[test]
fn idle_timeout_defaults_to_4_minutes() {
    let c = Config::from_toml_str(
        r#"
        [[frontends]]
        name = "vip"
        address = "198.18.0.10"
        kind = "public"
        [[backend_pools]]
        name = "web"
        members = [{ address = "198.18.2.1" }]
        [[load_balancing_rules]]
        name = "web"
        frontend = "vip"
        protocol = "TCP"
        frontend_port = 80
        backend_pool = "web"
        backend_port = 80
        "#,
    )
    .unwrap();
    let r = &c.load_balancing_rules[0];
    assert_eq!(r.idle_timeout_minutes, 4);
    assert!(!r.tcp_reset && !r.floating_ip);
    assert_eq!(c.backend_pools[0].members[0].weight, 1);
    assert_eq!(c.backend_pools[0].members[0].admin_state, AdminState::None);
    assert_eq!(c.settings.udp_idle_timeout_seconds, 240);
    assert_eq!(c.settings.lab_time_scale, 1);
}

#[test]
fn settings_widen_idle_bounds() {
    let mut c = base();
    c.settings.inbound_idle_timeout_bounds = Some(MinutesRange {
        min_minutes: 1,
        max_minutes: 100,
    });
    c.settings.outbound_idle_timeout_bounds = Some(MinutesRange {
        min_minutes: 4,
        max_minutes: 120,
    });
    for (v, valid) in [(0, false), (1, true), (100, true), (101, false)] {
        c.load_balancing_rules[0].idle_timeout_minutes = v;
        if valid {
            ok(&c);
        } else {
            let e = only_error(&c, "load_balancing_rules[web].idle_timeout_minutes");
            says(&e, &v.to_string(), "1–100");
        }
    }
    c.load_balancing_rules[0].idle_timeout_minutes = 4;
    c.outbound_rules[0].idle_timeout_minutes = 120;
    ok(&c);
    c.outbound_rules[0].idle_timeout_minutes = 121;
    says(
        &only_error(&c, "outbound_rules[out].idle_timeout_minutes"),
        "121",
        "4–120",
    );
}

#[test]
fn idle_bound_overrides_only_widen() {
    let cases = [
        ((0, 30), Some(("min_minutes", "0", "1–4"))),
        ((1, 30), None),
        ((4, 30), None),
        ((5, 30), Some(("min_minutes", "5", "1–4"))),
        ((4, 29), Some(("max_minutes", "29", "30–1440"))),
        ((4, 1440), None),
        ((4, 1441), Some(("max_minutes", "1441", "30–1440"))),
    ];
    for ((min, max), expect) in cases {
        let mut c = base();
        c.settings.inbound_idle_timeout_bounds = Some(MinutesRange {
            min_minutes: min,
            max_minutes: max,
        });
        match expect {
            None => ok(&c),
            Some((field, value, allowed)) => {
                let e = only_error(&c, &format!("settings.inbound_idle_timeout_bounds.{field}"));
                says(&e, value, allowed);
            }
        }
    }
    let mut c = base();
    c.settings.outbound_idle_timeout_bounds = Some(MinutesRange {
        min_minutes: 4,
        max_minutes: 99,
    });
    says(
        &only_error(&c, "settings.outbound_idle_timeout_bounds.max_minutes"),
        "99",
        "100–1440",
    );
}

#[test]
fn lab_time_scale_bounds() {
    for (v, valid) in [(0, false), (1, true), (3600, true), (3601, false)] {
        let mut c = base();
        c.settings.lab_time_scale = v;
        if valid {
            ok(&c);
        } else {
            says(
                &only_error(&c, "settings.lab_time_scale"),
                &v.to_string(),
                "1–3600",
            );
        }
    }
}

#[test]
fn udp_idle_timeout_bounds() {
    for (v, valid) in [(0, false), (1, true), (6000, true), (6001, false)] {
        let mut c = base();
        c.settings.udp_idle_timeout_seconds = v;
        if valid {
            ok(&c);
        } else {
            says(
                &only_error(&c, "settings.udp_idle_timeout_seconds"),
                &v.to_string(),
                "1–6000",
            );
        }
    }
}

#[test]
fn lb_ports_1_to_65535() {
    for (v, valid) in [(0, false), (1, true), (65535, true), (65536, false)] {
        let mut c = base();
        c.load_balancing_rules[0].frontend_port = v;
        if valid {
            ok(&c);
        } else {
            let e = only_error(&c, "load_balancing_rules[web].frontend_port");
            says(&e, &v.to_string(), "1–65535");
        }
        let mut c = base();
        c.load_balancing_rules[0].backend_port = v;
        if valid {
            ok(&c);
        } else {
            let e = only_error(&c, "load_balancing_rules[web].backend_port");
            says(&e, &v.to_string(), "1–65535");
        }
    }
}

#[test]
fn nat_and_probe_ports_1_to_65535() {
    for (v, valid) in [(0, false), (1, true), (65535, true), (65536, false)] {
        let mut c = base();
        c.inbound_nat_rules[0].frontend_port = Some(v);
        if valid {
            ok(&c);
        } else {
            says(
                &only_error(&c, "inbound_nat_rules[ssh].frontend_port"),
                &v.to_string(),
                "1–65535",
            );
        }
        let mut c = base();
        c.inbound_nat_rules[0].backend_port = v;
        if valid {
            ok(&c);
        } else {
            says(
                &only_error(&c, "inbound_nat_rules[ssh].backend_port"),
                &v.to_string(),
                "1–65535",
            );
        }
        let mut c = base();
        c.health_probes[0].port = v;
        if valid {
            ok(&c);
        } else {
            says(
                &only_error(&c, "health_probes[http].port"),
                &v.to_string(),
                "1–65535",
            );
        }
    }
}

#[test]
fn ha_ports_only_all_on_internal_frontends() {
    let mut c = base();
    c.load_balancing_rules
        .push(lb("ha", "ilb", Protocol::All, 0));
    ok(&c);

    let mut c = base();
    c.load_balancing_rules
        .push(lb("ha", "vip", Protocol::All, 0));
    let e = only_error(&c, "load_balancing_rules[ha].frontend_port");
    assert!(
        e.message.contains("internal") && e.message.contains("public"),
        "{e}"
    );

    let mut c = base();
    c.load_balancing_rules.push(LoadBalancingRule {
        backend_port: 8080,
        ..lb("ha", "ilb", Protocol::Tcp, 0)
    });
    let e = only_error(&c, "load_balancing_rules[ha].frontend_port");
    assert!(e.message.contains("ALL"), "{e}");

    let mut c = base();
    let mut r = lb("ha", "ilb", Protocol::All, 0);
    r.backend_port = 80;
    c.load_balancing_rules.push(r);
    says(
        &only_error(&c, "load_balancing_rules[ha].backend_port"),
        "80",
        "0 for HA ports",
    );
}

#[test]
fn one_ha_ports_rule_per_frontend() {
    let mut c = base();
    c.load_balancing_rules
        .push(lb("ha1", "ilb", Protocol::All, 0));
    c.load_balancing_rules
        .push(lb("ha2", "ilb", Protocol::All, 0));
    let e = only_error(&c, "load_balancing_rules[ha2].frontend_port");
    assert!(e.message.contains("load_balancing_rules[ha1]"), "{e}");
}

#[test]
fn floating_ip_needs_backend_port_equal_frontend_port() {
    let mut c = base();
    c.load_balancing_rules[0].floating_ip = true;
    says(
        &only_error(&c, "load_balancing_rules[web].backend_port"),
        "8080",
        "80",
    );
    c.load_balancing_rules[0].backend_port = 80;
    ok(&c);

    let mut c = base();
    c.inbound_nat_rules[0].floating_ip = true;
    only_error(&c, "inbound_nat_rules[ssh].backend_port");
    c.inbound_nat_rules[0].backend_port = 2201;
    ok(&c);
}

#[test]
fn names_unique_per_kind() {
    let mut c = base();
    c.frontends[1].name = "vip".into();
    c.load_balancing_rules.clear();
    c.inbound_nat_rules.clear();
    says(
        &only_error(&c, "frontends[vip].name"),
        "\"vip\"",
        "not used",
    );

    let mut c = base();
    c.backend_pools.push(BackendPool {
        name: "web".into(),
        members: vec![],
    });
    only_error(&c, "backend_pools[web].name");

    let mut c = base();
    c.health_probes.push(c.health_probes[0].clone());
    only_error(&c, "health_probes[http].name");

    let mut c = base();
    c.load_balancing_rules
        .push(lb("web", "vip", Protocol::Tcp, 81));
    only_error(&c, "load_balancing_rules[web].name");

    let mut c = base();
    c.inbound_nat_rules.push(nat("ssh", 2202));
    only_error(&c, "inbound_nat_rules[ssh].name");

    let mut c = base();
    let mut o = out("out", &["snat2"], "web6", Protocol::All);
    o.frontends = vec!["vip6".into()];
    c.outbound_rules.push(o);
    only_error(&c, "outbound_rules[out].name");

    // The same name in different kinds is fine.
    let mut c = base();
    c.inbound_nat_rules[0].name = "web".into();
    c.outbound_rules[0].name = "web".into();
    ok(&c);
}

#[test]
fn names_are_well_formed() {
    let mut c = base();
    c.health_probes[0].name = String::new();
    c.load_balancing_rules[0].health_probe = None;
    only_error(&c, "health_probes[#0].name");

    let mut c = base();
    c.inbound_nat_rules[0].name = "has space".into();
    only_error(&c, "inbound_nat_rules[has space].name");

    let mut c = base();
    c.inbound_nat_rules[0].name = "a".repeat(80);
    ok(&c);
    c.inbound_nat_rules[0].name = "a".repeat(81);
    assert_eq!(errors(&c).len(), 1);
}

#[test]
fn references_resolve() {
    let mut c = base();
    c.load_balancing_rules[0].frontend = "nope".into();
    let e = only_error(&c, "load_balancing_rules[web].frontend");
    says(&e, "\"nope\"", "\"vip\"");

    let mut c = base();
    c.load_balancing_rules[0].backend_pool = "nope".into();
    says(
        &only_error(&c, "load_balancing_rules[web].backend_pool"),
        "\"nope\"",
        "\"web\"",
    );

    let mut c = base();
    c.load_balancing_rules[0].health_probe = Some("nope".into());
    says(
        &only_error(&c, "load_balancing_rules[web].health_probe"),
        "\"nope\"",
        "\"http\"",
    );
    c.load_balancing_rules[0].health_probe = Some("http".into());
    ok(&c);

    let mut c = base();
    c.inbound_nat_rules[0].frontend = "nope".into();
    only_error(&c, "inbound_nat_rules[ssh].frontend");

    let mut c = base();
    c.outbound_rules[0].frontends = vec!["snat1".into(), "nope".into()];
    only_error(&c, "outbound_rules[out].frontends");

    let mut c = base();
    c.outbound_rules[0].backend_pool = "nope".into();
    only_error(&c, "outbound_rules[out].backend_pool");
}

#[test]
fn nat_target_is_any_address_or_a_member_of_its_pool() {
    let mut c = base();
    c.inbound_nat_rules[0].target = Some(ip("198.18.9.9"));
    ok(&c);
    c.inbound_nat_rules[0].backend_pool = Some("web".into());
    says(
        &only_error(&c, "inbound_nat_rules[ssh].target"),
        "198.18.9.9",
        "a member of pool \"web\"",
    );
    c.inbound_nat_rules[0].target = Some(ip("198.18.2.2"));
    ok(&c);
    c.inbound_nat_rules[0].target = None;
    only_error(&c, "inbound_nat_rules[ssh].target");
}

#[test]
fn nat_protocol_is_tcp_or_udp() {
    let mut c = base();
    c.inbound_nat_rules[0].protocol = Protocol::All;
    says(
        &only_error(&c, "inbound_nat_rules[ssh].protocol"),
        "\"ALL\"",
        "\"TCP\" or \"UDP\"",
    );
    c.inbound_nat_rules[0].protocol = Protocol::Udp;
    ok(&c);
}

fn range_rule(start: u32, end: u32) -> InboundNatRule {
    InboundNatRule {
        frontend_port: None,
        frontend_port_range: Some(PortRange { start, end }),
        target: None,
        backend_pool: Some("web".into()),
        ..nat("range", 0)
    }
}

#[test]
fn nat_port_range_needs_at_least_one_port_per_member() {
    // Pool "web" has 3 members.
    for (end, valid) in [(50001, false), (50002, true), (50003, true)] {
        let mut c = base();
        c.inbound_nat_rules.push(range_rule(50000, end));
        if valid {
            ok(&c);
        } else {
            let e = only_error(&c, "inbound_nat_rules[range].frontend_port_range");
            says(&e, "50000..=50001 (2 ports)", "at least 3 ports");
        }
    }
}

#[test]
fn nat_port_range_shape() {
    let mut c = base();
    c.inbound_nat_rules.push(range_rule(50010, 50000));
    only_error(&c, "inbound_nat_rules[range].frontend_port_range.end");

    let mut c = base();
    c.inbound_nat_rules.push(range_rule(0, 10));
    says(
        &only_error(&c, "inbound_nat_rules[range].frontend_port_range.start"),
        "0",
        "1–65535",
    );

    let mut c = base();
    c.inbound_nat_rules.push(range_rule(65533, 65536));
    only_error(&c, "inbound_nat_rules[range].frontend_port_range.end");

    let mut c = base();
    c.inbound_nat_rules.push(range_rule(65533, 65535));
    ok(&c);

    let mut c = base();
    let mut r = range_rule(50000, 50010);
    r.target = Some(ip("198.18.2.1"));
    c.inbound_nat_rules.push(r);
    only_error(&c, "inbound_nat_rules[range].target");

    let mut c = base();
    let mut r = range_rule(50000, 50010);
    r.backend_pool = None;
    c.inbound_nat_rules.push(r);
    only_error(&c, "inbound_nat_rules[range].backend_pool");

    let mut c = base();
    let mut r = range_rule(50000, 50010);
    r.floating_ip = true;
    c.inbound_nat_rules.push(r);
    only_error(&c, "inbound_nat_rules[range].floating_ip");

    let mut c = base();
    let mut r = range_rule(50000, 50010);
    r.frontend_port = Some(50000);
    c.inbound_nat_rules.push(r);
    only_error(&c, "inbound_nat_rules[range].frontend_port_range");

    let mut c = base();
    c.inbound_nat_rules[0].frontend_port = None;
    only_error(&c, "inbound_nat_rules[ssh].frontend_port");
}

#[test]
fn weights_1_to_1000() {
    for (v, valid) in [(0, false), (1, true), (1000, true), (1001, false)] {
        let mut c = base();
        c.backend_pools[0].members[1].weight = v;
        if valid {
            ok(&c);
        } else {
            let e = only_error(&c, "backend_pools[web].members[198.18.2.2].weight");
            says(&e, &v.to_string(), "1–1000");
        }
    }
}

#[test]
fn probe_interval_threshold_and_path() {
    for (v, valid) in [(0, false), (1, true), (3600, true), (3601, false)] {
        let mut c = base();
        c.health_probes[0].interval_seconds = v;
        if valid {
            ok(&c);
        } else {
            says(
                &only_error(&c, "health_probes[http].interval_seconds"),
                &v.to_string(),
                "1–3600",
            );
        }
    }
    for (v, valid) in [(0, false), (1, true), (100, true), (101, false)] {
        let mut c = base();
        c.health_probes[0].threshold = v;
        if valid {
            ok(&c);
        } else {
            says(
                &only_error(&c, "health_probes[http].threshold"),
                &v.to_string(),
                "1–100",
            );
        }
    }
    let mut c = base();
    c.health_probes[0].path = Some("healthz".into());
    says(
        &only_error(&c, "health_probes[http].path"),
        "\"healthz\"",
        "starting with '/'",
    );
    c.health_probes[0].path = Some("/".into());
    ok(&c);
    c.health_probes[0].path = None;
    only_error(&c, "health_probes[http].path");
    c.health_probes[0].protocol = ProbeProtocol::Tcp;
    ok(&c);
    c.health_probes[0].path = Some("/x".into());
    only_error(&c, "health_probes[http].path");
}

#[test]
fn address_families_consistent() {
    let mut c = base();
    c.backend_pools[0]
        .members
        .push(Member::new(ip("2001:db8::99")));
    // "web" is used by the IPv4 LB rule and the IPv4 outbound rule.
    let e = errors(&c);
    let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "load_balancing_rules[web].backend_pool",
            "outbound_rules[out].backend_pool"
        ],
        "{e:#?}"
    );
    assert!(e[0].message.contains("2001:db8::99"), "{}", e[0]);

    let mut c = base();
    c.load_balancing_rules.push(LoadBalancingRule {
        backend_pool: "web6".into(),
        ..lb("v6", "vip6", Protocol::Tcp, 443)
    });
    ok(&c);
    c.load_balancing_rules[1].frontend = "vip".into();
    only_error(&c, "load_balancing_rules[v6].backend_pool");

    let mut c = base();
    c.inbound_nat_rules[0].target = Some(ip("2001:db8::1"));
    says(
        &only_error(&c, "inbound_nat_rules[ssh].target"),
        "2001:db8::1",
        "IPv4",
    );

    let mut c = base();
    c.outbound_rules[0].frontends = vec!["snat1".into(), "vip6".into()];
    only_error(&c, "outbound_rules[out].frontends");
}

#[test]
fn frontend_addresses_unique_and_unicast() {
    let mut c = base();
    c.frontends[3].address = c.frontends[2].address;
    only_error(&c, "frontends[snat2].address");

    let mut c = base();
    c.frontends[3].address = ip("0.0.0.0");
    only_error(&c, "frontends[snat2].address");

    let mut c = base();
    c.backend_pools[0].members[2].address = ip("198.18.2.1");
    only_error(&c, "backend_pools[web].members[198.18.2.1].address");
}

#[test]
fn allocated_ports_multiple_of_8() {
    for (v, valid) in [(0, false), (8, true), (12, false), (16, true)] {
        let mut c = base();
        c.outbound_rules[0].allocated_outbound_ports = Some(v);
        if valid {
            ok(&c);
        } else {
            let e = only_error(&c, "outbound_rules[out].allocated_outbound_ports");
            says(&e, &v.to_string(), "a multiple of 8");
        }
    }
}

#[test]
fn allocated_ports_sum_fits_frontend_ips() {
    // 3 members, 1 IP: 3 × 21,328 = 63,984 ≤ 64,000 < 3 × 21,336.
    let mut c = base();
    c.outbound_rules[0].allocated_outbound_ports = Some(21_328);
    ok(&c);
    c.outbound_rules[0].allocated_outbound_ports = Some(21_336);
    let e = only_error(&c, "outbound_rules[out].allocated_outbound_ports");
    says(&e, "21336", "from 8 to 21328");
    assert!(e.message.contains("64000"), "{e}");

    // A second frontend IP doubles the room.
    c.outbound_rules[0].frontends.push("snat2".into());
    ok(&c);
    c.outbound_rules[0].allocated_outbound_ports = Some(42_664);
    ok(&c);
    c.outbound_rules[0].allocated_outbound_ports = Some(42_672);
    says(
        &only_error(&c, "outbound_rules[out].allocated_outbound_ports"),
        "42672",
        "from 8 to 42664",
    );
}

#[test]
fn default_allocation_by_pool_size() {
    let table = [
        (1, Some(1024)),
        (50, Some(1024)),
        (51, Some(512)),
        (100, Some(512)),
        (101, Some(256)),
        (200, Some(256)),
        (201, Some(128)),
        (400, Some(128)),
        (401, Some(64)),
        (800, Some(64)),
        (801, Some(32)),
        (1000, Some(32)),
        (1001, None),
    ];
    for (n, want) in table {
        assert_eq!(default_outbound_ports(n), want, "{n} members");
    }

    let mut c = base();
    c.backend_pools.push(BackendPool {
        name: "big".into(),
        members: many_members(1000),
    });
    c.outbound_rules
        .push(out("big", &["snat2"], "big", Protocol::All));
    ok(&c);
    c.backend_pools[2].members = many_members(1001);
    let e = only_error(&c, "outbound_rules[big].allocated_outbound_ports");
    says(&e, "(default)", "1–1000");
    c.outbound_rules[1].allocated_outbound_ports = Some(56);
    ok(&c);
    c.outbound_rules[1].allocated_outbound_ports = Some(64);
    only_error(&c, "outbound_rules[big].allocated_outbound_ports");
}

#[test]
fn outbound_membership_and_frontends_per_protocol() {
    // The same pool SNATed for TCP and for UDP by two rules on the same IP: fine.
    let mut c = base();
    c.outbound_rules[0].protocol = Protocol::Tcp;
    c.outbound_rules
        .push(out("udp", &["snat1"], "web", Protocol::Udp));
    ok(&c);

    // Twice for TCP: the member and the frontend are both claimed twice.
    c.outbound_rules[1].protocol = Protocol::All;
    let e = errors(&c);
    let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "outbound_rules[udp].backend_pool",
            "outbound_rules[udp].frontends"
        ],
        "{e:#?}"
    );
    assert!(e[0].message.contains("198.18.2.1") && e[0].message.contains("outbound_rules[out]"));

    // Another IP fixes the frontend clash but not the member clash.
    c.outbound_rules[1].frontends = vec!["snat2".into()];
    only_error(&c, "outbound_rules[udp].backend_pool");

    let mut c = base();
    c.outbound_rules[0].frontends = vec![];
    only_error(&c, "outbound_rules[out].frontends");
    c.outbound_rules[0].frontends = vec!["snat1".into(), "snat1".into()];
    only_error(&c, "outbound_rules[out].frontends");
}

#[test]
fn no_two_rules_serve_the_same_frontend_protocol_port() {
    let mut c = base();
    c.load_balancing_rules
        .push(lb("web2", "vip", Protocol::Tcp, 80));
    let e = only_error(&c, "load_balancing_rules[web2].frontend_port");
    says(&e, "80", "no other rule");
    assert!(e.message.contains("load_balancing_rules[web]"), "{e}");

    // ALL overlaps TCP.
    let mut c = base();
    c.load_balancing_rules
        .push(lb("web2", "vip", Protocol::All, 80));
    only_error(&c, "load_balancing_rules[web2].frontend_port");

    // UDP does not overlap TCP; another frontend does not overlap either.
    let mut c = base();
    c.load_balancing_rules
        .push(lb("web2", "vip", Protocol::Udp, 80));
    c.load_balancing_rules
        .push(lb("web3", "ilb", Protocol::All, 80));
    ok(&c);

    // A NAT rule on an LB port, and a NAT range across a NAT port: reported once per pair.
    let mut c = base();
    c.inbound_nat_rules[0].frontend_port = Some(80);
    let e = only_error(&c, "inbound_nat_rules[ssh].frontend_port");
    assert!(e.message.contains("load_balancing_rules[web]"), "{e}");

    let mut c = base();
    c.inbound_nat_rules.push(range_rule(2200, 2300));
    let e = only_error(&c, "inbound_nat_rules[range].frontend_port_range");
    says(&e, "2201", "no other rule");

    // A specific port next to an HA-ports rule on the same frontend is fine: it wins.
    let mut c = base();
    c.load_balancing_rules
        .push(lb("ha", "ilb", Protocol::All, 0));
    c.load_balancing_rules
        .push(lb("dns", "ilb", Protocol::All, 53));
    ok(&c);
}

#[test]
fn all_errors_reported_at_once() {
    let mut c = base();
    c.load_balancing_rules[0].idle_timeout_minutes = 31;
    c.inbound_nat_rules[0].backend_port = 0;
    c.outbound_rules[0].allocated_outbound_ports = Some(12);
    c.backend_pools[0].members[0].weight = 0;
    let e = validate(&c).unwrap_err();
    let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "backend_pools[web].members[198.18.2.1].weight",
            "load_balancing_rules[web].idle_timeout_minutes",
            "inbound_nat_rules[ssh].backend_port",
            "outbound_rules[out].allocated_outbound_ports",
        ]
    );
    let text = e.to_string();
    assert!(
        text.starts_with("invalid configuration (4 errors):"),
        "{text}"
    );
    assert!(
        text.contains("load_balancing_rules[web].idle_timeout_minutes = 31:")
            && text.contains("(allowed: 4–30)"),
        "{text}"
    );
}

#[test]
fn toml_errors_are_parse_errors() {
    let unknown = "[settings]\nlab_time_scal = 60\n";
    assert!(
        matches!(Config::from_toml_str(unknown), Err(ConfigError::Parse(m)) if m.contains("lab_time_scal"))
    );
    let bad_enum = "[[frontends]]\nname = \"a\"\naddress = \"198.18.0.1\"\nkind = \"outside\"\n";
    assert!(matches!(
        Config::from_toml_str(bad_enum),
        Err(ConfigError::Parse(_))
    ));
    let invalid = "[settings]\nlab_time_scale = 0\n";
    match Config::from_toml_str(invalid) {
        Err(ConfigError::Invalid(e)) => assert_eq!(e.0[0].path, "settings.lab_time_scale"),
        other => panic!("{other:?}"),
    }
    // Lower-case protocols are accepted.
    let c =
        Config::from_toml_str("[[health_probes]]\nname = \"p\"\nprotocol = \"tcp\"\nport = 22\n")
            .unwrap();
    assert_eq!(c.health_probes[0].protocol, ProbeProtocol::Tcp);
    assert_eq!(c.health_probes[0].interval_seconds, 5);
    assert_eq!(c.health_probes[0].threshold, 2);
}

#[test]
fn admin_state_parses() {
    let c = Config::from_toml_str(
        "[[backend_pools]]\nname = \"p\"\nmembers = [{ address = \"198.18.2.1\", admin_state = \"down\" }, { address = \"198.18.2.2\", admin_state = \"up\", weight = 5 }]\n",
    )
    .unwrap();
    assert_eq!(c.backend_pools[0].members[0].admin_state, AdminState::Down);
    assert_eq!(c.backend_pools[0].members[1].admin_state, AdminState::Up);
    assert_eq!(c.backend_pools[0].members[1].weight, 5);
}

#[test]
fn drain_deadlines_parse_and_are_bounded() {
    let c = Config::from_toml_str(
        "[[backend_pools]]\nname = \"p\"\nmembers = [{ address = \"198.18.2.1\", admin_state = \"down\", drain_timeout_seconds = 300, drain_action = \"idle\" }, { address = \"198.18.2.2\" }]\n",
    )
    .unwrap();
    let m = &c.backend_pools[0].members;
    assert_eq!(m[0].drain_timeout_seconds, Some(300));
    assert_eq!(m[0].drain_action, DrainAction::Idle);
    assert_eq!(
        (m[1].drain_timeout_seconds, m[1].drain_action),
        (None, DrainAction::Reset)
    );
    // Written back only when set.
    let text = c.to_toml_string().unwrap();
    assert!(text.contains("drain_action = \"idle\""), "{text}");
    assert_eq!(text.matches("drain_").count(), 2, "{text}");

    let mut c = base();
    c.backend_pools[0].members[0].drain_timeout_seconds = Some(0);
    ok(&c);
    c.backend_pools[0].members[0].drain_timeout_seconds = Some(3_601);
    let e = only_error(
        &c,
        "backend_pools[web].members[198.18.2.1].drain_timeout_seconds",
    );
    says(&e, "3601", "0–3600");
}

#[test]
fn probe_timeouts_and_https_settings() {
    let mut c = base();
    assert_eq!(
        c.health_probes[0].effective_timeout_seconds(),
        5,
        "the interval"
    );
    c.health_probes[0].interval_seconds = 60;
    assert_eq!(
        c.health_probes[0].effective_timeout_seconds(),
        30,
        "at most 30 s"
    );
    c.health_probes[0].timeout_seconds = Some(45);
    ok(&c);
    assert_eq!(c.health_probes[0].effective_timeout_seconds(), 45);
    c.health_probes[0].timeout_seconds = Some(61);
    says(
        &only_error(&c, "health_probes[http].timeout_seconds"),
        "61",
        "1–60",
    );
    c.health_probes[0].timeout_seconds = Some(0);
    only_error(&c, "health_probes[http].timeout_seconds");
    c.health_probes[0].timeout_seconds = None;

    // TLS settings belong to HTTPS probes.
    c.health_probes[0].tls_verify = true;
    only_error(&c, "health_probes[http].tls_verify");
    c.health_probes[0].protocol = ProbeProtocol::Https;
    ok(&c);
    c.health_probes[0].tls_server_name = Some("backend.example".into());
    c.health_probes[0].tls_ca_file = Some("/etc/xlb/ca.pem".into());
    ok(&c);
    c.health_probes[0].tls_server_name = Some("bad name".into());
    only_error(&c, "health_probes[http].tls_server_name");
    c.health_probes[0].tls_server_name = None;
    c.health_probes[0].tls_ca_file = Some("relative.pem".into());
    only_error(&c, "health_probes[http].tls_ca_file");
    c.health_probes[0].tls_ca_file = Some("/etc/xlb/ca.pem".into());
    c.health_probes[0].tls_verify = false;
    only_error(&c, "health_probes[http].tls_ca_file");
    c.health_probes[0].tls_ca_file = None;
    // An HTTPS probe needs a path, as an HTTP one does.
    c.health_probes[0].path = None;
    only_error(&c, "health_probes[http].path");
    let p = Config::from_toml_str(
        "[[health_probes]]\nname = \"p\"\nprotocol = \"HTTPS\"\nport = 443\npath = \"/\"\ntimeout_seconds = 2\n",
    )
    .unwrap();
    assert_eq!(p.health_probes[0].protocol, ProbeProtocol::Https);
    assert!(
        !p.health_probes[0].tls_verify,
        "verification is off by default"
    );
}

#[test]
fn the_accepted_http_status_is_200_unless_a_range_is_given() {
    let mut c = base();
    assert_eq!(c.health_probes[0].accepted_status(), Some((200, 200)));
    for (text, range) in [
        ("204", (204, 204)),
        ("200-399", (200, 399)),
        (" 200 - 299", (200, 299)),
    ] {
        c.health_probes[0].http_status = Some(text.into());
        ok(&c);
        assert_eq!(c.health_probes[0].accepted_status(), Some(range), "{text}");
    }
    for bad in ["", "2xx", "99", "600", "399-200", "200-", "200-300-400"] {
        c.health_probes[0].http_status = Some(bad.into());
        let e = only_error(&c, "health_probes[http].http_status");
        assert!(e.allowed.contains("100–599"), "{bad:?}: {e}");
    }
    // Only HTTP(S) probes have a status.
    c.health_probes[0].http_status = Some("200".into());
    c.health_probes[0].protocol = ProbeProtocol::Tcp;
    c.health_probes[0].path = None;
    only_error(&c, "health_probes[http].http_status");
}
