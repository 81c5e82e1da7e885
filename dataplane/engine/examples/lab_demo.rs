//! The engine in a virtual lab: idle timeout and TCP reset on idle, shown in seconds.
//!
//! A client, two backends and the default rules; virtual time runs at the lab time scale (60×:
//! four minutes last four seconds of engine time, and the demo jumps from deadline to
//! deadline, so it takes milliseconds). It shows:
//! - a connection reset on idle: both RSTs, with the sequence numbers each end expects;
//! - a connection kept alive by TCP keepalives (probe every 2 lab-minutes);
//! - a silent expiry, and the late packet that the silent default hides;
//! - a UDP flow expiring at the UDP timeout, not the rule's TCP timeout.
//!
//! `cargo run -p xlb-engine --example lab_demo` (add `-- --json` for one JSON object per event).

use std::net::Ipv4Addr;
use std::sync::Arc;

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use xlb_engine::config::{Config, MemberHealth};
use xlb_engine::time::{secs, Nanos};
use xlb_engine::{compile, Engine, EngineConfig, Route, Verdict};

const SCALE: u64 = 60;
const CONFIG: &str = r#"
[settings]
lab_time_scale = 60

[[frontends]]
name = "web"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }]

[[load_balancing_rules]]
name = "web-reset"
frontend = "web"
protocol = "TCP"
frontend_port = 80
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 4
tcp_reset = true

[[load_balancing_rules]]
name = "web-silent"
frontend = "web"
protocol = "TCP"
frontend_port = 81
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 4

[[load_balancing_rules]]
name = "dns"
frontend = "web"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 53
idle_timeout_minutes = 30
"#;

const XLB: [u8; 6] = [2, 0, 0, 0, 0xa0, 0];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0xc1, 1];
const T0: Nanos = 1_000_000_000;

struct Demo {
    e: Engine,
    now: Nanos,
    json: bool,
}

impl Demo {
    /// Lab minutes since the start, as the operator reads them.
    fn lab_time(&self) -> String {
        let lab_s = (self.now - T0) as f64 * SCALE as f64 / 1e9;
        format!("{:>2}m{:04.1}s", (lab_s / 60.0) as u64, lab_s % 60.0)
    }

    fn say(&self, what: &str, detail: &str) {
        if self.json {
            println!(
                "{{\"lab_time_s\":{:.1},\"event\":\"{what}\",\"detail\":\"{detail}\"}}",
                (self.now - T0) as f64 * SCALE as f64 / 1e9
            );
        } else {
            println!("[lab {}] {what:<18} {detail}", self.lab_time());
        }
    }

    fn send(&mut self, port: u16, mut frame: Vec<u8>) -> Option<Vec<u8>> {
        match self.e.process(self.now, port, &mut frame) {
            Verdict::Tx { len, .. } => {
                frame.truncate(len as usize);
                Some(frame)
            }
            Verdict::Drop(reason) => {
                self.say("dropped", &format!("{} (counted)", reason.as_str()));
                None
            }
        }
    }

    /// Advances lab time by `lab_s` seconds, running expiry at every deadline on the way.
    fn wait(&mut self, lab_s: u64) {
        let until = self.now + secs(lab_s) / SCALE;
        loop {
            let next = self.e.next_deadline().unwrap_or(until).max(self.now);
            self.now = next.min(until);
            let mut rsts = vec![];
            let before = self.e.counters().clone();
            self.e
                .expire(self.now, 4096, &mut |port, f| rsts.push((port, f.to_vec())));
            let rules = self.e.rules().clone();
            for (id, (was, is)) in before
                .rules
                .iter()
                .zip(&self.e.counters().rules)
                .enumerate()
            {
                let silent = (is.flows_expired_idle - was.flows_expired_idle)
                    - (is.flows_reset_on_idle - was.flows_reset_on_idle);
                if silent > 0 {
                    let name = rules
                        .rule(id as u16)
                        .map(|r| r.name.to_string())
                        .unwrap_or_default();
                    self.say(
                        "expired silently",
                        &format!("{silent} flow(s) of rule {name}: nothing sent"),
                    );
                }
            }
            for (port, f) in rsts {
                let p = SlicedPacket::from_ethernet(&f).unwrap();
                if let (Some(etherparse::NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(t))) =
                    (&p.net, &p.transport)
                {
                    let (h, t) = (ip.header(), t.to_header());
                    let detail = format!(
                        "port {port}: {}:{} -> {}:{} RST seq={} ack={}",
                        Ipv4Addr::from(h.source()),
                        t.source_port,
                        Ipv4Addr::from(h.destination()),
                        t.destination_port,
                        t.sequence_number,
                        t.acknowledgment_number
                    );
                    self.say("RST sent", &detail);
                }
            }
            if self.now >= until {
                break;
            }
        }
    }
}

fn tcp(
    sport: u16,
    dport: u16,
    flags: &str,
    seq: u32,
    ack: u32,
    from_backend: Option<[u8; 4]>,
) -> Vec<u8> {
    let (smac, src, dst, sp, dp) = match from_backend {
        None => (
            CLIENT_MAC,
            [198, 18, 0, 10],
            [198, 18, 0, 100],
            sport,
            dport,
        ),
        Some(b) => ([2, 0, 0, 0, 0xb0, b[3]], b, [198, 18, 0, 10], 8080, sport),
    };
    let mut b = PacketBuilder::ethernet2(smac, XLB)
        .ipv4(src, dst, 64)
        .tcp(sp, dp, seq, 64000);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(ack);
    }
    let mut v = vec![];
    b.write(&mut v, &[]).unwrap();
    v
}

fn connect(d: &mut Demo, sport: u16, dport: u16) -> [u8; 4] {
    let out = d
        .send(0, tcp(sport, dport, "S", 100, 0, None))
        .expect("SYN forwarded");
    let backend = [out[30], out[31], out[32], out[33]];
    d.send(1, tcp(sport, dport, "SA", 900, 101, Some(backend)));
    d.send(0, tcp(sport, dport, "A", 101, 901, None));
    d.say(
        "connected",
        &format!(
            "198.18.0.10:{sport} -> 198.18.0.100:{dport} -> {}:8080",
            Ipv4Addr::from(backend)
        ),
    );
    backend
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("lab_demo: xlb's engine in virtual lab time (60x). Options: --json");
        return;
    }
    let cfg = Config::from_toml_str(CONFIG).expect("demo config");
    let rules =
        Arc::new(compile(&cfg, None, &MemberHealth::default(), 1).expect("demo config compiles"));
    let mut e = Engine::new(EngineConfig::default(), rules, T0);
    let net = e.next_hops();
    net.set_port(0, XLB);
    net.set_port(1, XLB);
    net.set_routes(vec![
        Route::v4(Ipv4Addr::new(198, 18, 0, 0), 24, 0, None),
        Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None),
    ]);
    for b in [11, 12] {
        net.set_neighbor(
            Ipv4Addr::new(198, 18, 1, b).into(),
            1,
            [2, 0, 0, 0, 0xb0, b],
        )
        .unwrap();
    }
    let mut d = Demo { e, now: T0, json };
    d.say("lab time scale", "60x: 4 minutes last 4 seconds");

    let _reset = connect(&mut d, 40_000, 80);
    let keep = connect(&mut d, 40_001, 80);
    let _silent = connect(&mut d, 40_002, 81);
    d.send(0, {
        let b = PacketBuilder::ethernet2(CLIENT_MAC, XLB)
            .ipv4([198, 18, 0, 10], [198, 18, 0, 100], 64)
            .udp(5353, 53);
        let mut v = vec![];
        b.write(&mut v, b"query").unwrap();
        v
    });
    d.say(
        "udp flow",
        "198.18.0.10:5353 -> 198.18.0.100:53 (rule says 30 min; UDP uses 4 min)",
    );

    // Keepalive: Linux sends its first probe after tcp_keepalive_time (120 s), seq = SND.NXT-1.
    for round in 1..=4 {
        d.wait(120);
        d.send(0, tcp(40_001, 80, "A", 100, 901, None));
        d.send(1, tcp(40_001, 80, "A", 901, 101, Some(keep)));
        d.say(
            "keepalive",
            "198.18.0.10:40001 probe + ACK: idle timer refreshed",
        );
        if round == 2 {
            // The silently expired connection's client speaks again: nobody answers.
            d.wait(10);
            d.say(
                "client sends",
                "198.18.0.10:40002 -> :81 after its flow expired silently",
            );
            let late = d.send(0, tcp(40_002, 81, "A", 101, 901, None));
            assert!(late.is_none());
        }
    }
    let c = d.e.counters().clone();
    let names = ["web-reset", "web-silent", "dns"];
    if !json {
        println!("\nrule         created  expired_idle  reset_on_idle  late_packets");
    }
    let rules = d.e.rules().clone();
    for name in names {
        let id = (0..rules.rule_id_bound() as u16)
            .find(|&i| rules.rule(i).is_some_and(|p| &*p.name == name));
        let r = id.map(|i| c.rule(i)).unwrap_or_default();
        if json {
            println!(
                "{{\"rule\":\"{name}\",\"flows_created\":{},\"flows_expired_idle\":{},\"flows_reset_on_idle\":{},\"late_packets\":{}}}",
                r.flows_created, r.flows_expired_idle, r.flows_reset_on_idle, r.late_packets
            );
        } else {
            println!(
                "{name:<12} {:>7}  {:>12}  {:>13}  {:>12}",
                r.flows_created, r.flows_expired_idle, r.flows_reset_on_idle, r.late_packets
            );
        }
    }
    let alive = d.e.flows().count();
    d.say(
        "flows alive",
        &format!("{alive} (the keepalive connection)"),
    );
}
