//! The seed corpus: valid inputs of every shape each target takes, from which the fuzzers start
//! (written to `fuzz/corpus/<target>/` by `cargo run -p xlb-fuzz --bin xlb-fuzz-seeds`, and
//! replayed by the test suite). Frames are the engine tests' fixtures (same lab, same
//! addresses); configurations are the documented example and the harness's lab.

use std::net::{IpAddr, Ipv6Addr};

use prost::Message;
use xlb_api::convert;
use xlb_engine::config::Config;

use crate::frames::{self, flags::*, Endpoints, *};
use crate::input::Output;
use crate::lab;
use crate::targets::engine_session::{op, Kind, TCP_KINDS, UDP_KINDS};

/// The example configuration shipped in the documentation.
pub const EXAMPLE_TOML: &str = include_str!("../../docs/examples/xlb.toml");

/// Seeds of target `name`, each with a file name.
pub fn seeds(name: &str) -> Vec<(String, Vec<u8>)> {
    match name {
        "wire_parse" => wire_parse(),
        "engine_session" => engine_session(),
        "config_toml" => config_toml(),
        "api_config" => api_config(),
        _ => Vec::new(),
    }
}

fn client(dport: u16) -> Endpoints {
    Endpoints {
        src_mac: CLIENT_MAC,
        dst_mac: XLB_MAC[0],
        src: CLIENT.into(),
        sport: 40_000,
        dst: VIP.into(),
        dport,
    }
}

fn with_vlan(frame: &[u8], id: u16) -> Vec<u8> {
    let mut v = frame[..12].to_vec();
    v.extend_from_slice(&[0x81, 0x00]);
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&frame[12..]);
    v
}

fn icmp_echo(v6: bool) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, XLB_MAC[0]);
    let mut out = Vec::new();
    if v6 {
        b.ipv6(CLIENT6.octets(), VIP6.octets(), 64)
            .icmpv6_echo_request(7, 1)
            .write(&mut out, b"ping")
            .expect("builds");
    } else {
        b.ipv4(CLIENT.octets(), VIP.octets(), 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut out, b"ping")
            .expect("builds");
    }
    out
}

fn wire_parse() -> Vec<(String, Vec<u8>)> {
    let c = client(80);
    let c6 = Endpoints {
        src: CLIENT6.into(),
        dst: VIP6.into(),
        ..c
    };
    let tcp = |e: &Endpoints, fl: u8, p: &[u8]| {
        frames::tcp(e, fl, 1000, 5000, WINDOW, p).expect("one family")
    };
    let dns = frames::udp(&client(53), b"query").expect("one family");
    let mut udp_no_csum = dns.clone();
    udp_no_csum[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let mut udp_partial = dns.clone();
    // A checksum field holding only the pseudo-header sum, as a veth peer leaves it.
    let ph = {
        let mut s: u32 = 0;
        for w in [198u32 << 8 | 18, 10, 198 << 8 | 18, 100, 17, 8 + 5] {
            s += w;
        }
        (s & 0xffff) + (s >> 16)
    };
    udp_partial[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&(ph as u16).to_be_bytes());
    let mut fragment = tcp(&c, ACK, b"frag");
    fragment[14 + 6] = 0x20; // more fragments
    let mut options = tcp(&c, SYN, &[]);
    options[14] = 0x46; // IHL 6: one option word (the header is now inconsistent)
    let padded = {
        let mut f = tcp(&c, ACK, &[]);
        f.resize(60, 0);
        f
    };
    let mut out = vec![
        ("tcp4-syn", tcp(&c, SYN, &[])),
        ("tcp4-data", tcp(&c, ACK | PSH, b"payload bytes")),
        ("tcp4-fin", tcp(&c, FIN | ACK, &[])),
        ("tcp4-rst", tcp(&c, RST | ACK, &[])),
        ("tcp4-padded", padded),
        ("tcp6-syn", tcp(&c6, SYN, &[])),
        ("tcp6-data", tcp(&c6, ACK, b"v6 payload")),
        ("tcp4-vlan", with_vlan(&tcp(&c, SYN, &[]), 42)),
        (
            "udp6-vlan",
            with_vlan(&frames::udp(&c6, b"q").expect("v6"), 7),
        ),
        ("udp4", dns),
        ("udp4-no-checksum", udp_no_csum),
        ("udp4-partial-checksum", udp_partial),
        ("icmp4-echo", icmp_echo(false)),
        ("icmp6-echo", icmp_echo(true)),
        ("ipv4-fragment", fragment),
        ("ipv4-options", options),
    ];
    let mapped = Endpoints {
        src: IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0xc612, 0x000a)),
        ..c6
    };
    out.push(("tcp6-v4-mapped", tcp(&mapped, SYN, &[])));
    out.into_iter()
        .enumerate()
        .map(|(i, (name, f))| {
            // The control byte picks the rewrite: a different one per seed.
            let mut d = vec![(i as u8).wrapping_mul(37) | 0x0f];
            d.extend_from_slice(&f);
            (name.to_string(), d)
        })
        .collect()
}

/// Encoder of [`engine_session`](crate::targets::engine_session) programs.
#[derive(Debug, Default)]
struct Program(Output);

/// The session byte selecting (`kind`, `idx`).
fn sess(kinds: &[Kind], kind: Kind, idx: usize) -> u8 {
    (0..=255u8)
        .find(|s| kinds[usize::from(*s) % kinds.len()] == kind && usize::from(s / 8) % 4 == idx)
        .expect("every session has a byte")
}

impl Program {
    fn new(setup: u8) -> Program {
        let mut p = Program::default();
        p.0.u8(setup);
        p
    }
    fn honest(&mut self, kind: Kind, idx: usize, server: bool, action: u8, len: u16) -> &mut Self {
        let isn = 0x1000_0000 * (1 + idx as u32) + 77 * u32::from(server);
        self.0
            .u8(op::HONEST_TCP)
            .u8(sess(&TCP_KINDS, kind, idx))
            .u8(u8::from(server))
            .u8(action)
            .u16(len)
            .u32(isn);
        self
    }
    /// Handshake of session (`kind`, `idx`).
    fn connect(&mut self, kind: Kind, idx: usize) -> &mut Self {
        self.honest(kind, idx, false, 0, 0)
            .honest(kind, idx, true, 0, 0)
            .honest(kind, idx, false, 0, 0)
    }
    #[allow(clippy::too_many_arguments)]
    fn spoof(
        &mut self,
        kind: Kind,
        idx: usize,
        server: bool,
        fl: u8,
        mode: u8,
        seq: u32,
        len: u16,
    ) -> &mut Self {
        self.0
            .u8(op::SPOOF_TCP)
            .u8(sess(&TCP_KINDS, kind, idx))
            .u8(u8::from(server))
            .u8(fl)
            .u8(mode)
            .u32(seq)
            .u32(0)
            .u16(len)
            .u8(0);
        self
    }
    fn udp(&mut self, kind: Kind, idx: usize, server: bool, len: u16) -> &mut Self {
        self.0
            .u8(op::UDP)
            .u8(sess(&UDP_KINDS, kind, idx))
            .u8(u8::from(server))
            .u16(len);
        self
    }
    /// Step `step` of the advance table; `budget` None expires everything due.
    fn advance(&mut self, step: u8, budget: Option<u8>) -> &mut Self {
        let b = budget.map_or(0, |b| 0x80 | (b & 0x0f));
        self.0.u8(op::ADVANCE).u8(step).u8(b).u16(0);
        self
    }
    fn swap(&mut self, v: u8) -> &mut Self {
        self.0.u8(op::SWAP_RULES).u8(v);
        self
    }
    fn raw(&mut self, ingress: u8, frame: &[u8]) -> &mut Self {
        let f = &frame[..frame.len().min(255)];
        self.0.u8(op::RAW).u8(ingress).u8(f.len() as u8).bytes(f);
        self
    }
    fn replay(&mut self, which: u8, flips: &[(u16, u8)]) -> &mut Self {
        self.0
            .u8(op::REPLAY)
            .u8(which)
            .u8(0)
            .u8(0)
            .u8(flips.len() as u8);
        for &(pos, x) in flips {
            self.0.u16(pos).u8(x);
        }
        self
    }
    fn flood(&mut self, kind_index: u8, count: u8) -> &mut Self {
        self.0.u8(op::FLOOD).u8(kind_index).u8(count).u16(1);
        self
    }
    fn quiet(&mut self) -> &mut Self {
        self.0.u8(op::QUIET);
        self
    }
    fn bytes(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0 .0)
    }
}

/// Advance-table steps (see `engine_session`).
const MS: u8 = 0;
const TWO_S: u8 = 3;
const FIFTEEN_S: u8 = 4;
const THIRTY_ONE_S: u8 = 5;
const FOUR_MIN: u8 = 7;
const THIRTY_ONE_MIN: u8 = 9;

fn engine_session() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |name: &str, p: &mut Program| out.push((name.to_string(), p.bytes()));

    // A load-balanced connection: handshake, data both ways, keepalives, idle → reset on idle.
    add(
        "lb-reset-on-idle",
        Program::new(1)
            .connect(Kind::Http, 0)
            .honest(Kind::Http, 0, false, 0, 500)
            .honest(Kind::Http, 0, true, 5, 1400)
            .honest(Kind::Http, 0, false, 2, 1)
            .advance(FOUR_MIN, None),
    );
    // Closed with FIN both ways, lingers, then the tuple is reused.
    add(
        "nat-fin-close-reuse",
        Program::new(1)
            .connect(Kind::Nat, 1)
            .honest(Kind::Nat, 1, false, 0, 100)
            .honest(Kind::Nat, 1, false, 3, 0)
            .honest(Kind::Nat, 1, true, 3, 0)
            .honest(Kind::Nat, 1, false, 1, 0)
            .advance(MS, None)
            .honest(Kind::Nat, 1, false, 3, 0)
            .advance(TWO_S, None),
    );
    // Outbound SNAT, TCP and UDP, then idle expiry and port release.
    add(
        "snat-tcp-udp",
        Program::new(4)
            .connect(Kind::SnatTcp, 0)
            .honest(Kind::SnatTcp, 0, true, 0, 64)
            .udp(Kind::SnatUdp, 1, false, 40)
            .udp(Kind::SnatUdp, 1, true, 400)
            .advance(FOUR_MIN, None)
            .quiet(),
    );
    // `pickup` takes a flow mid-stream; the `reset` policy answers an unknown segment.
    add(
        "pickup-and-reset-policy",
        Program::new(0)
            .spoof(Kind::Pickup, 0, false, ACK, 0, 0, 10)
            .spoof(Kind::Pickup, 0, true, ACK, 0, 0, 0)
            .spoof(Kind::ResetPolicy, 0, false, ACK | PSH, 2, 12345, 5)
            .advance(FOUR_MIN, None),
    );
    // Spoofed RST, FIN and far-ahead data into an open connection, then idle.
    add(
        "spoofed-into-open",
        Program::new(1)
            .connect(Kind::Http, 2)
            .spoof(Kind::Http, 2, false, RST, 1, 0x4000_0000, 0)
            .spoof(Kind::Http, 2, true, FIN | ACK, 1, 0x8000_0000, 0)
            .spoof(Kind::Http, 2, false, ACK, 1, 0x7fff_ffff, 1000)
            .honest(Kind::Http, 2, false, 0, 10)
            .advance(FOUR_MIN, None),
    );
    // A SYN flood fills a small table while a connection is open.
    add(
        "syn-flood-table-full",
        Program::new(0)
            .connect(Kind::Http, 0)
            .flood(0, 20)
            .honest(Kind::Http, 0, false, 0, 20)
            .connect(Kind::Http, 1)
            .advance(THIRTY_ONE_S, None)
            .connect(Kind::Http, 1),
    );
    // A UDP flood and SNAT port exhaustion.
    add(
        "udp-flood-snat-exhaustion",
        Program::new(2)
            .flood(6, 40)
            .flood(5, 20)
            .flood(7, 12)
            .connect(Kind::SnatTcp, 2)
            .advance(FIFTEEN_S, Some(3))
            .quiet(),
    );
    // Rule-set swaps while flows live: timeouts shrink, rules and members go, a member fails.
    add(
        "rule-swaps",
        Program::new(1)
            .connect(Kind::Http, 0)
            .connect(Kind::Pickup, 1)
            .udp(Kind::Dns, 0, false, 30)
            .swap(1)
            .advance(FIFTEEN_S, Some(2))
            .swap(2)
            .udp(Kind::Dns, 0, false, 30)
            .swap(3)
            .udp(Kind::Dns, 0, false, 30)
            .swap(0)
            .advance(FOUR_MIN, None)
            .advance(THIRTY_ONE_MIN, None),
    );
    // IPv6, and half-open expiry.
    add(
        "ipv6-and-half-open",
        Program::new(1)
            .connect(Kind::Http6, 0)
            .honest(Kind::Http6, 0, true, 0, 300)
            .honest(Kind::Http6, 1, false, 0, 0)
            .advance(THIRTY_ONE_S, None)
            .advance(THIRTY_ONE_MIN, None),
    );
    // Replays of recent frames with bytes flipped, and raw frames on every port.
    let dns = frames::udp(&client(53), b"q").expect("v4");
    add(
        "replays-and-raw",
        Program::new(1)
            .connect(Kind::Http, 3)
            .replay(0, &[(14 + 9, 0x0b)])
            .replay(1, &[(14 + 20 + 13, 0x04)])
            .raw(0, &dns)
            .raw(1, &dns[..30])
            .raw(2, &[0xff; 64]),
    );
    // Several sessions on two workers' shares, an RST from the server, a quiet period.
    add(
        "many-sessions",
        Program::new(6)
            .connect(Kind::Http, 0)
            .connect(Kind::Nat, 1)
            .connect(Kind::SnatTcp, 1)
            .honest(Kind::Nat, 1, true, 4, 0)
            .connect(Kind::Http6, 2)
            .advance(FOUR_MIN, Some(1))
            .advance(MS, None)
            .quiet(),
    );
    out
}

fn config_toml() -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("example", EXAMPLE_TOML.to_string()),
        ("lab-base", lab::BASE.to_string()),
        ("lab-fast", lab::FAST.to_string()),
        ("lab-shrunk", lab::SHRUNK.to_string()),
        (
            "invalid-address",
            lab::BASE.replace("198.18.0.100", "198.18.0.300"),
        ),
        (
            "invalid-timeout",
            lab::BASE.replace("idle_timeout_minutes = 4", "idle_timeout_minutes = 31"),
        ),
        (
            "unknown-field",
            lab::BASE.replace("tcp_reset = true", "tcp_reset = true\ncolour = \"red\""),
        ),
        ("empty", String::new()),
    ];
    out.push((
        "ha-ports-floating",
        r#"
[[frontends]]
name = "ilb"
address = "198.18.1.200"
kind = "internal"
[[backend_pools]]
name = "p"
members = [{ address = "198.18.1.11", weight = 3 }, { address = "198.18.1.12", admin_state = "down" }]
[[load_balancing_rules]]
name = "ha"
frontend = "ilb"
protocol = "ALL"
frontend_port = 0
backend_pool = "p"
backend_port = 0
floating_ip = true
"#
        .to_string(),
    ));
    out.into_iter()
        .map(|(n, t)| (n.to_string(), t.into_bytes()))
        .collect()
}

fn api_config() -> Vec<(String, Vec<u8>)> {
    let example = Config::from_toml_str(EXAMPLE_TOML).expect("the example is valid");
    let base = Config::from_toml_str(lab::BASE).expect("the lab config is valid");
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, selector: u8, bytes: Vec<u8>| {
        let mut d = vec![selector];
        d.extend_from_slice(&bytes);
        out.push((name.to_string(), d));
    };
    add(
        "config-example",
        0,
        convert::config_to(&example, 1).encode_to_vec(),
    );
    add(
        "config-lab",
        0,
        convert::config_to(&base, 2).encode_to_vec(),
    );
    let pb = convert::config_to(&example, 1);
    if let Some(f) = pb.frontends.first() {
        add("frontend", 1, f.encode_to_vec());
    }
    if let Some(p) = pb.backend_pools.first() {
        add("pool", 2, p.encode_to_vec());
    }
    for (i, r) in pb.load_balancing_rules.iter().take(2).enumerate() {
        add(&format!("lb-rule-{i}"), 3, r.encode_to_vec());
    }
    for (i, r) in pb.inbound_nat_rules.iter().take(2).enumerate() {
        add(&format!("nat-rule-{i}"), 4, r.encode_to_vec());
    }
    if let Some(r) = pb.outbound_rules.first() {
        add("outbound-rule", 5, r.encode_to_vec());
    }
    if let Some(p) = pb.health_probes.first() {
        add("probe", 6, p.encode_to_vec());
    }
    if let Some(s) = &pb.settings {
        add("settings", 7, s.encode_to_vec());
    }
    let mut bad = pb.clone();
    if let Some(f) = bad.frontends.first_mut() {
        f.address = "not an address".into();
        f.kind = 99;
    }
    add("config-invalid", 0, bad.encode_to_vec());
    out
}
