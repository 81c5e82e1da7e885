//! The virtual lab the stateful harness runs in, and frame builders. Same shape as the engine's
//! own test lab (dataplane/engine/tests/common): three ports (clients, backends, internet),
//! addresses from the documentation ranges.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::PacketBuilder;
use xlb_engine::PortId;

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
pub const B1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
pub const B2: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 12);
pub const SNAT_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 50);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
pub const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x11);

/// The window every harness segment advertises (no window scaling is negotiated).
pub const WINDOW: u16 = 64_240;

/// One end of a conversation as frames carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl Endpoints {
    /// The other direction (MACs swapped too).
    pub fn reversed(&self) -> Endpoints {
        Endpoints {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// Flag bits, as the engine's `wire::tcp_flags`.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

fn ip(
    e: &Endpoints,
    hop_limit: u8,
) -> Option<etherparse::PacketBuilderStep<etherparse::IpHeaders>> {
    let b = PacketBuilder::ethernet2(e.src_mac, e.dst_mac);
    match (e.src, e.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Some(b.ipv4(s.octets(), d.octets(), hop_limit)),
        (IpAddr::V6(s), IpAddr::V6(d)) => Some(b.ipv6(s.octets(), d.octets(), hop_limit)),
        _ => None,
    }
}

/// A TCP segment with every checksum right; `None` for mixed address families.
pub fn tcp(
    e: &Endpoints,
    flag_bits: u8,
    seq: u32,
    ack: u32,
    window: u16,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let mut b = ip(e, 64)?.tcp(e.sport, e.dport, seq, window);
    if flag_bits & flags::SYN != 0 {
        b = b.syn();
    }
    if flag_bits & flags::FIN != 0 {
        b = b.fin();
    }
    if flag_bits & flags::RST != 0 {
        b = b.rst();
    }
    if flag_bits & flags::PSH != 0 {
        b = b.psh();
    }
    if flag_bits & flags::URG != 0 {
        b = b.urg(0);
    }
    if flag_bits & flags::ACK != 0 {
        b = b.ack(ack);
    }
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).ok()?;
    Some(out)
}

/// A UDP datagram with every checksum right; `None` for mixed address families.
pub fn udp(e: &Endpoints, payload: &[u8]) -> Option<Vec<u8>> {
    let b = ip(e, 64)?.udp(e.sport, e.dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).ok()?;
    Some(out)
}
