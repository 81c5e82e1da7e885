//! Many workers, simulated: how xlb's flows meet a NIC's receive-side scaling.
//!
//! A NIC spreads frames over its queues with a Toeplitz hash of the 4-tuple (Microsoft's
//! RSS, the standard 40-byte key) and an indirection table; xlb runs one worker per queue,
//! and each worker's engine owns the flows whose client endpoint hashes to it
//! (`Engine::owner`). A frame that arrives on a queue whose worker does not own its flow is
//! handed off. [`simulate`] replays a deterministic mix of flows (uniform, or Zipf-skewed
//! frame counts), both directions (client → VIP, then the backend's answer), through `N` real
//! engines with that RSS, and counts the frames handed off and each worker's load — what
//! decides how xlb scales on a many-queue NIC, which veth (no RSS) cannot show.
//!
//! Pure and deterministic: a seeded generator, no clock, no I/O.

use std::{net::Ipv4Addr, sync::Arc};

use etherparse::PacketBuilder;
use xlb_engine::{
    compile,
    config::{Config, MemberHealth},
    engine, Engine, EngineConfig, Route, RuleSet, Verdict,
};

/// Microsoft's RSS key, the default of most NICs and drivers.
pub const MICROSOFT_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// The Toeplitz hash of `input` under `key` (RSS): for every set bit of the input, XOR in
/// the 32 key bits starting at that bit's position. `key` must be at least 4 bytes longer
/// than `input`.
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    let mut hash = 0u32;
    let mut window = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    for (i, byte) in input.iter().enumerate() {
        let next = key.get(i + 4).copied().unwrap_or(0);
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                hash ^= window;
            }
            window = (window << 1) | u32::from((next >> (7 - bit)) & 1);
        }
    }
    hash
}

/// The RSS hash of an IPv4 TCP/UDP 4-tuple: source address, destination address, source
/// port, destination port, in that order (as the NIC feeds them).
pub fn rss_ipv4(key: &[u8], src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> u32 {
    let mut input = [0u8; 12];
    input[..4].copy_from_slice(&src.octets());
    input[4..8].copy_from_slice(&dst.octets());
    input[8..10].copy_from_slice(&sport.to_be_bytes());
    input[10..].copy_from_slice(&dport.to_be_bytes());
    toeplitz(key, &input)
}

/// A NIC's indirection table: hash → queue by the hash's low bits (`ethtool -x`); the
/// default spreads entries round-robin over the queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indirection(pub Vec<u16>);

impl Indirection {
    /// `entries` (a power of two, 128 on most NICs) round-robin over `queues`.
    pub fn round_robin(entries: usize, queues: u16) -> Self {
        Self(
            (0..entries)
                .map(|i| (i % usize::from(queues)) as u16)
                .collect(),
        )
    }

    pub fn queue(&self, hash: u32) -> u16 {
        self.0[hash as usize & (self.0.len() - 1)]
    }
}

/// How frames are spread over the flows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mix {
    /// Every flow equally likely.
    Uniform,
    /// Flow `k` (from 1) with weight `1 / k^s`.
    Zipf(f64),
}

/// One simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub workers: u16,
    pub flows: u32,
    /// Client → VIP frames; each is answered by its backend (the same count back).
    pub frames: u64,
    pub mix: Mix,
    pub seed: u64,
    pub indirection_entries: usize,
}

/// What one simulation counted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimReport {
    pub workers: u16,
    pub flows: u32,
    pub mix: String,
    /// Frames processed, both directions.
    pub frames: u64,
    /// Client → VIP frames that arrived on a queue of a worker not owning the flow.
    pub handed_off_forward: u64,
    /// Backend → client frames likewise.
    pub handed_off_reply: u64,
    /// Frames each worker's queue received (both directions).
    pub received: Vec<u64>,
    /// Frames each worker processed (it owns their flows).
    pub processed: Vec<u64>,
    /// Flows each worker's engine held at the end.
    pub flows_held: Vec<usize>,
    /// Frames an engine dropped (a reply meeting no flow would land here: none expected).
    pub dropped: u64,
}

impl SimReport {
    /// Share of all frames handed off between workers.
    pub fn handed_off_share(&self) -> f64 {
        ratio(self.handed_off_forward + self.handed_off_reply, self.frames)
    }

    /// Busiest worker's processed frames ÷ the mean (1.0: perfectly even).
    pub fn processed_spread(&self) -> f64 {
        spread(&self.processed)
    }

    /// The same for the frames the queues received.
    pub fn received_spread(&self) -> f64 {
        spread(&self.received)
    }

    pub fn flows_spread(&self) -> f64 {
        let v: Vec<u64> = self.flows_held.iter().map(|&x| x as u64).collect();
        spread(&v)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn spread(v: &[u64]) -> f64 {
    let total: u64 = v.iter().sum();
    if total == 0 || v.is_empty() {
        return 0.0;
    }
    let mean = total as f64 / v.len() as f64;
    *v.iter().max().unwrap_or(&0) as f64 / mean
}

/// splitmix64: small, seeded, deterministic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Draws flow indexes under a [`Mix`]. Zipf by inverting the cumulative weights (a table of
/// `flows` entries; ranks shuffled over the flows so that the heavy ones are not the first
/// clients).
#[derive(Debug)]
pub struct FlowPicker {
    flows: u32,
    cdf: Vec<f64>,
    rank_to_flow: Vec<u32>,
}

impl FlowPicker {
    pub fn new(flows: u32, mix: Mix, rng: &mut Rng) -> Self {
        match mix {
            Mix::Uniform => Self {
                flows,
                cdf: Vec::new(),
                rank_to_flow: Vec::new(),
            },
            Mix::Zipf(s) => {
                let mut cdf = Vec::with_capacity(flows as usize);
                let mut acc = 0.0;
                for k in 1..=flows {
                    acc += 1.0 / f64::from(k).powf(s);
                    cdf.push(acc);
                }
                for c in &mut cdf {
                    *c /= acc;
                }
                let mut rank_to_flow: Vec<u32> = (0..flows).collect();
                for i in (1..rank_to_flow.len()).rev() {
                    let j = rng.below(i as u64 + 1) as usize;
                    rank_to_flow.swap(i, j);
                }
                Self {
                    flows,
                    cdf,
                    rank_to_flow,
                }
            }
        }
    }

    pub fn pick(&self, rng: &mut Rng) -> u32 {
        if self.cdf.is_empty() {
            return rng.below(u64::from(self.flows)) as u32;
        }
        let u = rng.unit();
        let rank = self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1);
        self.rank_to_flow[rank]
    }
}

const SIM_CONFIG: &str = r#"
[settings]
udp_idle_timeout_seconds = 6000

[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"

[[backend_pools]]
name = "web"
members = [{ address = "198.18.1.11" }, { address = "198.18.1.12" }, { address = "198.18.1.13" }, { address = "198.18.1.14" }]

[[load_balancing_rules]]
name = "udp"
frontend = "vip"
protocol = "UDP"
frontend_port = 7000
backend_pool = "web"
backend_port = 8000
"#;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_PORT: u16 = 7000;
const APPLIANCE_MAC: [u8; 6] = [2, 0, 0, 0, 0xa0, 0];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0xc1, 0];
const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 0xb0, 0];
const T0: u64 = 1_000_000_000_000;
/// Client ports per client address.
const PORTS_PER_CLIENT: u32 = 50_000;

/// Client `i`: addresses from 198.18.64.0 on (outside the VIP's and the backends' /24s),
/// ports from 1024.
pub fn client(i: u32) -> (Ipv4Addr, u16) {
    let addr = u32::from(Ipv4Addr::new(198, 18, 64, 0)) + i / PORTS_PER_CLIENT;
    (Ipv4Addr::from(addr), (1024 + i % PORTS_PER_CLIENT) as u16)
}

/// The rules of the simulation: one UDP load-balancing rule, VIP → four backends.
pub fn sim_rules() -> Arc<RuleSet> {
    let cfg = Config::from_toml_str(SIM_CONFIG).expect("the simulation's configuration is valid");
    Arc::new(
        compile(&cfg, None, &MemberHealth::default(), 1)
            .expect("the simulation's configuration compiles"),
    )
}

fn sim_engine(worker: u16, workers: u16, capacity: u32, rules: Arc<RuleSet>) -> Engine {
    let cfg = EngineConfig {
        worker,
        workers,
        flow_capacity: capacity,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg, rules, T0);
    let net = e.next_hops();
    net.set_port(0, APPLIANCE_MAC);
    net.set_port(1, APPLIANCE_MAC);
    net.set_routes(vec![
        Route::v4(Ipv4Addr::new(198, 18, 0, 0), 16, 0, None),
        Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None),
    ]);
    for b in 11..=14u8 {
        // A full next-hop table only costs that neighbour; it has room for four.
        let _ = net.set_neighbor(Ipv4Addr::new(198, 18, 1, b).into(), 1, BACKEND_MAC);
    }
    e
}

fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, src_mac: [u8; 6]) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    PacketBuilder::ethernet2(src_mac, APPLIANCE_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut v, &[0u8; 18])
        .expect("a 60-byte frame is built");
    v
}

fn ipv4_at(frame: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(frame[off], frame[off + 1], frame[off + 2], frame[off + 3])
}

fn port_at(frame: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([frame[off], frame[off + 1]])
}

/// Runs one simulation (see the module documentation).
pub fn simulate(cfg: &SimConfig) -> SimReport {
    let workers = cfg.workers.max(1);
    let n = usize::from(workers);
    let rules = sim_rules();
    let capacity = (cfg.flows / u32::from(workers)).saturating_mul(2).max(4096);
    let mut engines: Vec<Engine> = (0..workers)
        .map(|w| sim_engine(w, workers, capacity, Arc::clone(&rules)))
        .collect();
    let table =
        Indirection::round_robin(cfg.indirection_entries.max(1).next_power_of_two(), workers);
    let mut rng = Rng::new(cfg.seed);
    let picker = FlowPicker::new(cfg.flows.max(1), cfg.mix, &mut rng);
    let mut r = SimReport {
        workers,
        flows: cfg.flows,
        mix: match cfg.mix {
            Mix::Uniform => "uniform".into(),
            Mix::Zipf(s) => format!("zipf {s}"),
        },
        received: vec![0; n],
        processed: vec![0; n],
        ..SimReport::default()
    };
    // The engines' own steering key (every engine here runs the default seed).
    let steer_key =
        xlb_engine::hashkey::HashKey::from_seed(xlb_engine::EngineConfig::default().steer_seed);
    let mut now = T0;
    for _ in 0..cfg.frames {
        now += 100;
        let (caddr, cport) = client(picker.pick(&mut rng));
        // client -> VIP
        let mut f = udp_frame(caddr, VIP, cport, VIP_PORT, CLIENT_MAC);
        let rx = table.queue(rss_ipv4(&MICROSOFT_KEY, caddr, VIP, cport, VIP_PORT));
        let owner = engine::owner(&rules, &f, workers, &steer_key).unwrap_or(0);
        r.frames += 1;
        r.received[usize::from(rx)] += 1;
        r.processed[usize::from(owner)] += 1;
        if rx != owner {
            r.handed_off_forward += 1;
        }
        let len = match engines[usize::from(owner)].process(now, 0, &mut f) {
            Verdict::Tx { len, .. } => usize::from(len),
            Verdict::Drop(_) => {
                r.dropped += 1;
                continue;
            }
        };
        f.truncate(len);
        // the backend answers: addresses and ports swapped
        let (backend, bport) = (ipv4_at(&f, 30), port_at(&f, 36));
        let mut reply = udp_frame(backend, caddr, bport, cport, BACKEND_MAC);
        let rx = table.queue(rss_ipv4(&MICROSOFT_KEY, backend, caddr, bport, cport));
        let owner = engine::owner(&rules, &reply, workers, &steer_key).unwrap_or(0);
        r.frames += 1;
        r.received[usize::from(rx)] += 1;
        r.processed[usize::from(owner)] += 1;
        if rx != owner {
            r.handed_off_reply += 1;
        }
        if let Verdict::Drop(_) = engines[usize::from(owner)].process(now, 1, &mut reply) {
            r.dropped += 1;
        }
    }
    r.flows_held = engines.iter().map(Engine::flow_count).collect();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Microsoft's published RSS verification vectors (IPv4, with and without ports). Hash
    /// inputs only: nothing is sent to these addresses.
    #[test]
    fn toeplitz_matches_the_verification_suite() {
        let cases = [
            (
                "66.9.149.187",
                2794,
                "161.142.100.80",
                1766,
                0x323e_8fc2u32,
                0x51cc_c178u32,
            ),
            (
                "199.92.111.2",
                14230,
                "65.69.140.83",
                4739,
                0xd718_262a,
                0xc626_b0ea,
            ),
            (
                "24.19.198.95",
                12898,
                "12.22.207.184",
                38024,
                0xd2d0_a5de,
                0x5c2b_394a,
            ),
            (
                "38.27.205.30",
                48228,
                "209.142.163.6",
                2217,
                0x8298_9176,
                0xafc7_327f,
            ),
            (
                "153.39.163.191",
                44251,
                "202.188.127.2",
                1303,
                0x5d18_09c5,
                0x10e8_28a2,
            ),
        ];
        for (src, sport, dst, dport, ip_only, with_ports) in cases {
            let (s, d): (Ipv4Addr, Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
            let mut input = Vec::new();
            input.extend_from_slice(&s.octets());
            input.extend_from_slice(&d.octets());
            assert_eq!(toeplitz(&MICROSOFT_KEY, &input), ip_only, "{src} -> {dst}");
            assert_eq!(
                rss_ipv4(&MICROSOFT_KEY, s, d, sport, dport),
                with_ports,
                "{src}:{sport} -> {dst}:{dport}"
            );
        }
    }

    #[test]
    fn indirection_round_robin() {
        let t = Indirection::round_robin(128, 3);
        assert_eq!(t.0.len(), 128);
        assert_eq!(
            (t.queue(0), t.queue(1), t.queue(2), t.queue(3)),
            (0, 1, 2, 0)
        );
        assert_eq!(t.queue(128 + 4), 1);
    }

    #[test]
    fn zipf_is_skewed_and_deterministic() {
        let mut rng = Rng::new(7);
        let p = FlowPicker::new(1000, Mix::Zipf(1.0), &mut rng);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[p.pick(&mut rng) as usize] += 1;
        }
        let max = *counts.iter().max().unwrap();
        // rank 1 of 1 000 under Zipf(1): 1 / H(1000) ≈ 13 % of the frames
        assert!((12_000..14_500).contains(&max), "{max}");
        let mut a = Rng::new(1);
        let mut b = Rng::new(1);
        assert_eq!(a.next_u64(), b.next_u64());
    }

    fn sim(workers: u16, flows: u32, mix: Mix) -> SimReport {
        simulate(&SimConfig {
            workers,
            flows,
            frames: 20_000,
            mix,
            seed: 42,
            indirection_entries: 128,
        })
    }

    #[test]
    fn one_worker_hands_off_nothing() {
        let r = sim(1, 1000, Mix::Uniform);
        assert_eq!(r.frames, 40_000);
        assert_eq!(
            (r.handed_off_forward, r.handed_off_reply, r.dropped),
            (0, 0, 0)
        );
        assert_eq!(r.flows_held, vec![1000]);
    }

    #[test]
    fn every_reply_meets_its_flow_on_the_owner() {
        for workers in [2, 4, 16] {
            for mix in [Mix::Uniform, Mix::Zipf(1.0)] {
                let r = sim(workers, 2000, mix);
                assert_eq!(r.dropped, 0, "{workers} workers {mix:?}");
                assert_eq!(r.processed.iter().sum::<u64>(), r.frames);
                assert_eq!(r.received.iter().sum::<u64>(), r.frames);
                // RSS and xlb's steering are independent hashes: about (N-1)/N crosses
                let share = r.handed_off_share();
                let expect = 1.0 - 1.0 / f64::from(workers);
                assert!(
                    (share - expect).abs() < 0.08,
                    "{workers}: {share} vs {expect}"
                );
            }
        }
        assert_eq!(sim(4, 2000, Mix::Uniform), sim(4, 2000, Mix::Uniform));
    }
}
