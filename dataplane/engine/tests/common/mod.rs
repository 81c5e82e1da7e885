//! A virtual lab for engine tests: three ports (clients, backends, internet), a default rule
//! set, frame builders, and checks of what comes out.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use etherparse::{
    Ipv4Header, Ipv6Header, NetHeaders, PacketBuilder, SlicedPacket, TcpHeader, TransportSlice,
};
use xlb_engine::config::Config;
use xlb_engine::time::{secs, Nanos};
use xlb_engine::{Engine, EngineConfig, PortId, Route, RuleSet, Verdict};

pub mod conn;
#[allow(unused_imports)]
pub use conn::{backend_mac, establish, Conn};

pub const CLIENT_PORT: PortId = 0;
pub const BACKEND_PORT: PortId = 1;
pub const INTERNET_PORT: PortId = 2;
pub const XLB_MAC: [[u8; 6]; 3] = [
    [0x02, 0, 0, 0, 0xa0, 0x00],
    [0x02, 0, 0, 0, 0xa0, 0x01],
    [0x02, 0, 0, 0, 0xa0, 0x02],
];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xc1, 0x01];
pub const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb1, 0x01];
pub const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb2, 0x02];
pub const NET_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 0x01];

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const ILB_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 200);
pub const B1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
pub const B2: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
pub const SNAT_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 50);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
pub const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x11);

/// Start of virtual time in tests (not zero, to catch code that assumes it).
pub const T0: Nanos = 1_000 * 1_000_000_000;

pub const DEFAULT_CONFIG: &str = r#"
[settings]
lab_time_scale = 1

[[frontends]]
name = "web"
address = "198.18.0.100"
kind = "public"

[[frontends]]
name = "web6"
address = "2001:db8::100"
kind = "public"

[[frontends]]
name = "ilb"
address = "198.18.1.200"
kind = "internal"

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
name = "http-silent"
frontend = "web"
protocol = "TCP"
frontend_port = 81
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 4

[[load_balancing_rules]]
name = "http-reset-policy"
frontend = "web"
protocol = "TCP"
frontend_port = 82
backend_pool = "web"
backend_port = 8080
unknown_flow = "reset"

[[load_balancing_rules]]
name = "http-pickup"
frontend = "web"
protocol = "TCP"
frontend_port = 83
backend_pool = "web"
backend_port = 8080
tcp_reset = true
unknown_flow = "pickup"

[[load_balancing_rules]]
name = "http-long"
frontend = "web"
protocol = "TCP"
frontend_port = 84
backend_pool = "web"
backend_port = 8080
idle_timeout_minutes = 30
tcp_reset = true

[[load_balancing_rules]]
name = "dns"
frontend = "web"
protocol = "UDP"
frontend_port = 53
backend_pool = "web"
backend_port = 5353
idle_timeout_minutes = 30

[[load_balancing_rules]]
name = "ha"
frontend = "ilb"
protocol = "ALL"
frontend_port = 0
backend_pool = "web"
backend_port = 0

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

[[outbound_rules]]
name = "egress"
frontends = ["egress"]
backend_pool = "web"
protocol = "ALL"
allocated_outbound_ports = 8
idle_timeout_minutes = 4
tcp_reset = true
"#;

pub fn ruleset(toml: &str, generation: u64, previous: Option<&RuleSet>) -> Arc<RuleSet> {
    let config = Config::from_toml_str(toml).expect("test config parses");
    let health = xlb_engine::config::MemberHealth::default();
    Arc::new(
        xlb_engine::compile(&config, previous, &health, generation).expect("test config compiles"),
    )
}

pub struct Lab {
    pub engine: Engine,
    pub now: Nanos,
    /// RST frames emitted by `expire`, with their port.
    pub emitted: Vec<(PortId, Vec<u8>)>,
}

impl Lab {
    pub fn new() -> Lab {
        Lab::with(DEFAULT_CONFIG, EngineConfig::default())
    }

    pub fn with(toml: &str, cfg: EngineConfig) -> Lab {
        let mut engine = Engine::new(cfg, ruleset(toml, 1, None), T0);
        let net = engine.next_hops();
        for (i, mac) in XLB_MAC.iter().enumerate() {
            net.set_port(i as PortId, *mac);
        }
        net.set_backend_side(BACKEND_PORT, true);
        net.set_routes(vec![
            Route::v4(Ipv4Addr::new(198, 18, 0, 0), 24, CLIENT_PORT, None),
            Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, BACKEND_PORT, None),
            Route::v4(Ipv4Addr::new(198, 19, 0, 0), 24, INTERNET_PORT, None),
            Route::v6("2001:db8::".parse().unwrap(), 64, CLIENT_PORT, None),
            Route::v6("2001:db8:1::".parse().unwrap(), 64, BACKEND_PORT, None),
        ]);
        net.set_neighbor(B1.into(), BACKEND_PORT, B1_MAC).unwrap();
        net.set_neighbor(B2.into(), BACKEND_PORT, B2_MAC).unwrap();
        net.set_neighbor(B6.into(), BACKEND_PORT, B1_MAC).unwrap();
        net.set_neighbor(REMOTE.into(), INTERNET_PORT, NET_MAC)
            .unwrap();
        net.set_neighbor(CLIENT.into(), CLIENT_PORT, CLIENT_MAC)
            .unwrap();
        Lab {
            engine,
            now: T0,
            emitted: vec![],
        }
    }

    pub fn send(&mut self, port: PortId, mut frame: Vec<u8>) -> (Verdict, Vec<u8>) {
        let v = self.engine.process(self.now, port, &mut frame);
        if let Verdict::Tx { len, .. } = v {
            frame.truncate(len as usize);
        }
        (v, frame)
    }

    /// Sends and expects a transmit; returns the port and the frame.
    pub fn forward(&mut self, port: PortId, frame: Vec<u8>) -> (PortId, Vec<u8>) {
        match self.send(port, frame) {
            (Verdict::Tx { port, .. }, f) => (port, f),
            (v, _) => panic!("expected a transmit, got {v:?}"),
        }
    }

    /// Advances virtual time to `t` and runs expiry with an ample budget.
    pub fn advance_to(&mut self, t: Nanos) {
        assert!(t >= self.now);
        self.now = t;
        let emitted = &mut self.emitted;
        while self
            .engine
            .expire(t, 1024, &mut |port, f| emitted.push((port, f.to_vec())))
            > 0
        {}
    }

    pub fn advance(&mut self, d: Nanos) {
        self.advance_to(self.now + d);
    }

    /// Jumps from deadline to deadline (as a worker sleeping in poll would) until `t`.
    pub fn run_until(&mut self, t: Nanos) {
        while let Some(d) = self.engine.next_deadline() {
            if d > t {
                break;
            }
            self.advance_to(d.max(self.now));
        }
        self.advance_to(t);
    }
}

impl Default for Lab {
    fn default() -> Lab {
        Lab::new()
    }
}

/// A TCP segment builder for one endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Tcp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

impl Tcp {
    pub fn client(dport: u16, sport: u16) -> Tcp {
        Tcp {
            src_mac: CLIENT_MAC,
            dst_mac: XLB_MAC[0],
            src: CLIENT.into(),
            dst: VIP.into(),
            sport,
            dport,
        }
    }

    /// Member B1's side of an outbound connection from its port `sport` to REMOTE:443.
    pub fn member_to_remote(sport: u16) -> Tcp {
        Tcp {
            src_mac: B1_MAC,
            dst_mac: XLB_MAC[1],
            src: B1.into(),
            dst: REMOTE.into(),
            sport,
            dport: 443,
        }
    }

    /// The remote host's side of an outbound connection: from REMOTE:443 to the SNAT
    /// address's port `port`.
    pub fn remote_to_snat(port: u16) -> Tcp {
        Tcp {
            src_mac: NET_MAC,
            dst_mac: XLB_MAC[2],
            src: REMOTE.into(),
            dst: SNAT_IP.into(),
            sport: 443,
            dport: port,
        }
    }

    /// The backend's side of a flow that reached it as `seen` (a parsed output frame).
    pub fn reply_to(seen: &Seen, mac: [u8; 6], ingress_mac: [u8; 6]) -> Tcp {
        Tcp {
            src_mac: mac,
            dst_mac: ingress_mac,
            src: seen.dst,
            dst: seen.src,
            sport: seen.dport,
            dport: seen.sport,
        }
    }

    pub fn seg(&self, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
        self.seg_win(flags, seq, ack, 64240, None, payload)
    }

    /// A segment with window field `window` and, when `wscale` is given, a window-scale option.
    pub fn seg_win(
        &self,
        flags: u8,
        seq: u32,
        ack: u32,
        window: u16,
        wscale: Option<u8>,
        payload: &[u8],
    ) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let b = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s.octets(), d.octets(), 64),
            _ => panic!("mixed families"),
        };
        let mut b = b.tcp(self.sport, self.dport, seq, window);
        if flags & flags::SYN != 0 {
            b = b.syn();
        }
        if flags & flags::FIN != 0 {
            b = b.fin();
        }
        if flags & flags::RST != 0 {
            b = b.rst();
        }
        if flags & flags::PSH != 0 {
            b = b.psh();
        }
        if flags & flags::ACK != 0 {
            b = b.ack(ack);
        }
        if let Some(shift) = wscale {
            b = b
                .options(&[
                    etherparse::TcpOptionElement::Noop,
                    etherparse::TcpOptionElement::WindowScale(shift),
                ])
                .unwrap();
        }
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).unwrap();
        out
    }
}

pub fn udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac);
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let b = b.udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

/// What a frame that left the engine says, with its checksums verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
}

/// Parses an output frame and asserts that every checksum in it is valid.
pub fn seen(frame: &[u8]) -> Seen {
    let p = SlicedPacket::from_ethernet(frame).expect("engine output parses");
    let eth = p
        .link
        .as_ref()
        .and_then(|l| l.to_header())
        .expect("ethernet");
    let eth = match eth {
        etherparse::LinkHeader::Ethernet2(e) => e,
        other => panic!("unexpected link {other:?}"),
    };
    let (src, dst, ttl): (IpAddr, IpAddr, u8) = match p.net.as_ref().expect("ip") {
        etherparse::NetSlice::Ipv4(v4) => {
            let h = v4.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "IPv4 header checksum"
            );
            (
                IpAddr::V4(h.source.into()),
                IpAddr::V4(h.destination.into()),
                h.time_to_live,
            )
        }
        etherparse::NetSlice::Ipv6(v6) => {
            let h = v6.header().to_header();
            (
                IpAddr::V6(h.source.into()),
                IpAddr::V6(h.destination.into()),
                h.hop_limit,
            )
        }
        _ => panic!("not ip"),
    };
    let net_headers: NetHeaders = match p.net.as_ref().unwrap() {
        etherparse::NetSlice::Ipv4(v4) => {
            NetHeaders::Ipv4(v4.header().to_header(), Default::default())
        }
        etherparse::NetSlice::Ipv6(v6) => {
            NetHeaders::Ipv6(v6.header().to_header(), Default::default())
        }
        _ => unreachable!(),
    };
    match p.transport.as_ref().expect("transport") {
        TransportSlice::Tcp(t) => {
            let h = t.to_header();
            let want = match &net_headers {
                NetHeaders::Ipv4(ip, _) => h.calc_checksum_ipv4(ip, t.payload()).unwrap(),
                NetHeaders::Ipv6(ip, _) => h.calc_checksum_ipv6(ip, t.payload()).unwrap(),
                _ => unreachable!(),
            };
            assert_eq!(h.checksum, want, "TCP checksum");
            Seen {
                src_mac: eth.source,
                dst_mac: eth.destination,
                src,
                dst,
                sport: h.source_port,
                dport: h.destination_port,
                ttl,
                tcp_flags: tcp_flag_byte(&h),
                seq: h.sequence_number,
                ack: h.acknowledgment_number,
                payload: t.payload().to_vec(),
            }
        }
        TransportSlice::Udp(u) => {
            let h = u.to_header();
            let want = match &net_headers {
                NetHeaders::Ipv4(ip, _) => h.calc_checksum_ipv4(ip, u.payload()).unwrap(),
                NetHeaders::Ipv6(ip, _) => h.calc_checksum_ipv6(ip, u.payload()).unwrap(),
                _ => unreachable!(),
            };
            assert_eq!(h.checksum, want, "UDP checksum");
            Seen {
                src_mac: eth.source,
                dst_mac: eth.destination,
                src,
                dst,
                sport: h.source_port,
                dport: h.destination_port,
                ttl,
                tcp_flags: 0,
                seq: 0,
                ack: 0,
                payload: u.payload().to_vec(),
            }
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

pub fn tcp_flag_byte(h: &TcpHeader) -> u8 {
    (h.fin as u8)
        | (h.syn as u8) << 1
        | (h.rst as u8) << 2
        | (h.psh as u8) << 3
        | (h.ack as u8) << 4
}

/// The exact RST frame a stock stack must accept, built independently of the engine.
pub fn expected_rst(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, sport): (IpAddr, u16),
    (dst, dport): (IpAddr, u16),
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    let mut tcp = TcpHeader::new(sport, dport, seq, 0);
    tcp.rst = true;
    tcp.ack = true;
    tcp.acknowledgment_number = ack;
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip =
                Ipv4Header::new(20, 64, etherparse::IpNumber::TCP, s.octets(), d.octets()).unwrap();
            ip.dont_fragment = true;
            ip.identification = 0;
            ip.header_checksum = ip.calc_header_checksum();
            tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).unwrap();
            out.extend_from_slice(&dst_mac);
            out.extend_from_slice(&src_mac);
            out.extend_from_slice(&[0x08, 0x00]);
            ip.write(&mut out).unwrap();
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: 20,
                next_header: etherparse::IpNumber::TCP,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            };
            tcp.checksum = tcp.calc_checksum_ipv6(&ip, &[]).unwrap();
            out.extend_from_slice(&dst_mac);
            out.extend_from_slice(&src_mac);
            out.extend_from_slice(&[0x86, 0xdd]);
            ip.write(&mut out).unwrap();
        }
        _ => panic!("mixed families"),
    }
    tcp.write(&mut out).unwrap();
    out
}

/// `frame` with its IPv4 TTL or IPv6 hop limit set to `ttl` (IPv4 header checksum updated).
pub fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    match frame[12..14] {
        [0x08, 0x00] => {
            frame[14 + 8] = ttl;
            let mut h = Ipv4Header::from_slice(&frame[14..]).unwrap().0;
            h.header_checksum = h.calc_header_checksum();
            frame[14 + 10..14 + 12].copy_from_slice(&h.header_checksum.to_be_bytes());
        }
        [0x86, 0xdd] => frame[14 + 7] = ttl,
        _ => panic!("not IP"),
    }
    frame
}

pub fn secs_f(s: f64) -> Nanos {
    (s * 1e9) as Nanos
}

pub const fn s(n: u64) -> Nanos {
    secs(n)
}
