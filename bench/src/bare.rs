//! The bare forwarder: port 0 ↔ port 1, MACs rewritten from the kernel's neighbour table,
//! TCP/UDP checksums completed. Nothing else: no TTL decrement, no NAT, no flows. It is
//! the benchmark's "AF_XDP copy-mode reference": the worker loop with nothing of xlb's in it.

use std::{collections::HashMap, net::IpAddr};

use xlb_afxdp::{
    csum,
    netlink::{self, Neighbour, Netlink, Route},
    FrameHandler, PortId, Verdict,
};

/// One side of the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarePort {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// Counters of the forwarder's decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BareStats {
    pub forwarded: u64,
    /// Not IPv4/IPv6 (the XDP program passes ARP and friends, so this should stay 0).
    pub not_ip: u64,
    /// No usable neighbour entry for the next hop.
    pub no_neighbour: u64,
    pub checksums_filled: u64,
    pub refreshes: u64,
    pub refresh_errors: u64,
}

/// The kernel tables the forwarder resolves next hops from.
#[derive(Debug, Clone, Default)]
pub struct KernelTables {
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
}

impl KernelTables {
    /// Reads both tables over netlink, in the calling thread's namespace.
    pub fn read(nl: &mut Netlink) -> std::io::Result<Self> {
        Ok(Self {
            routes: nl.routes()?,
            neighbours: nl.neighbours()?,
        })
    }

    /// MAC of the next hop towards `dst` out of `ifindex`: the route's gateway when the
    /// best route has one through that interface, else `dst` itself (on-link).
    pub fn resolve(&self, ifindex: u32, dst: IpAddr) -> Option<[u8; 6]> {
        let hop = netlink::lookup_route(&self.routes, dst)
            .and_then(|r| {
                r.nexthops
                    .iter()
                    .find(|nh| nh.ifindex == Some(ifindex))
                    .and_then(|nh| nh.gateway)
            })
            .unwrap_or(dst);
        self.neighbours
            .iter()
            .find(|n| n.ifindex == ifindex && n.ip == hop && n.state.is_usable())
            .and_then(|n| n.mac)
    }
}

/// Resolved next hops are cached per (egress port, destination); the cache is cleared
/// on every refresh and when it reaches this many entries, so memory stays bounded.
const CACHE_MAX: usize = 65_536;

/// A [`FrameHandler`] that forwards port 0 ↔ port 1.
#[derive(Debug)]
pub struct BareForwarder {
    ports: [BarePort; 2],
    tables: KernelTables,
    cache: HashMap<(PortId, IpAddr), Option<[u8; 6]>>,
    netlink: Option<Netlink>,
    refresh_every_ns: u64,
    next_refresh: Option<u64>,
    stats: BareStats,
}

impl BareForwarder {
    /// `tables` is the initial view. With `netlink`, the tables are re-read every
    /// `refresh_every_ns` from `expire` (the only syscalls this handler makes), so
    /// neighbours learned later are picked up.
    pub fn new(
        ports: [BarePort; 2],
        tables: KernelTables,
        netlink: Option<Netlink>,
        refresh_every_ns: u64,
    ) -> Self {
        let next_refresh = netlink.as_ref().map(|_| 0);
        Self {
            ports,
            tables,
            cache: HashMap::new(),
            netlink,
            refresh_every_ns: refresh_every_ns.max(1),
            next_refresh,
            stats: BareStats::default(),
        }
    }

    pub fn stats(&self) -> BareStats {
        self.stats
    }

    fn next_hop_mac(&mut self, egress: PortId, dst: IpAddr) -> Option<[u8; 6]> {
        if let Some(hit) = self.cache.get(&(egress, dst)) {
            return *hit;
        }
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        let mac = self
            .tables
            .resolve(self.ports[usize::from(egress)].ifindex, dst);
        self.cache.insert((egress, dst), mac);
        mac
    }
}

fn dst_ip(frame: &[u8]) -> Option<IpAddr> {
    let (l3, proto) = csum::l3_offset(frame)?;
    match proto {
        0x0800 => {
            let b: [u8; 4] = frame.get(l3 + 16..l3 + 20)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        0x86dd => {
            let b: [u8; 16] = frame.get(l3 + 24..l3 + 40)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

impl FrameHandler for BareForwarder {
    fn handle(&mut self, _now_ns: u64, ingress: PortId, frame: &mut [u8]) -> Verdict {
        let egress: PortId = if ingress == 0 { 1 } else { 0 };
        let Some(dst) = dst_ip(frame) else {
            self.stats.not_ip += 1;
            return Verdict::Drop;
        };
        let Some(mac) = self.next_hop_mac(egress, dst) else {
            self.stats.no_neighbour += 1;
            return Verdict::Drop;
        };
        frame[0..6].copy_from_slice(&mac);
        frame[6..12].copy_from_slice(&self.ports[usize::from(egress)].mac);
        if csum::fill_l4_checksum(frame) == csum::L4Checksum::Filled {
            self.stats.checksums_filled += 1;
        }
        self.stats.forwarded += 1;
        let len = u16::try_from(frame.len()).unwrap_or(u16::MAX);
        Verdict::Tx { port: egress, len }
    }

    fn next_deadline(&self) -> Option<u64> {
        self.next_refresh
    }

    fn expire(
        &mut self,
        now_ns: u64,
        _budget: usize,
        _emit: &mut dyn FnMut(PortId, &[u8]),
    ) -> usize {
        let Some(nl) = self.netlink.as_mut() else {
            return 0;
        };
        match KernelTables::read(nl) {
            Ok(t) => {
                self.tables = t;
                self.cache.clear();
                self.stats.refreshes += 1;
            }
            Err(_) => self.stats.refresh_errors += 1,
        }
        self.next_refresh = Some(now_ns + self.refresh_every_ns);
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use xlb_afxdp::netlink::{NeighState, NextHop, RTN_UNICAST, RT_TABLE_MAIN};

    const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
    const CLIENT: [u8; 6] = [2, 0, 0, 0, 0, 0xc];
    const SERVER: [u8; 6] = [2, 0, 0, 0, 0, 0xd];
    const GW: [u8; 6] = [2, 0, 0, 0, 0, 0xe];

    fn route(dst: &str, len: u8, ifindex: u32, gw: Option<&str>) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            prefix_len: len,
            table: RT_TABLE_MAIN,
            kind: RTN_UNICAST,
            priority: 0,
            nexthops: vec![NextHop {
                ifindex: Some(ifindex),
                gateway: gw.map(|g| g.parse().unwrap()),
            }],
        }
    }

    fn neigh(ip: &str, ifindex: u32, mac: [u8; 6]) -> Neighbour {
        Neighbour {
            ifindex,
            ip: ip.parse().unwrap(),
            mac: Some(mac),
            state: NeighState(NeighState::PERMANENT),
        }
    }

    fn fwd() -> BareForwarder {
        let tables = KernelTables {
            routes: vec![
                route("198.18.1.0", 24, 10, None),
                route("198.18.2.0", 24, 11, None),
                route("198.19.0.0", 16, 11, Some("198.18.2.254")),
            ],
            neighbours: vec![
                neigh("198.18.1.2", 10, CLIENT),
                neigh("198.18.2.2", 11, SERVER),
                neigh("198.18.2.254", 11, GW),
            ],
        };
        BareForwarder::new(
            [
                BarePort {
                    ifindex: 10,
                    mac: A,
                },
                BarePort {
                    ifindex: 11,
                    mac: B,
                },
            ],
            tables,
            None,
            1,
        )
    }

    fn udp(dst: [u8; 4]) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(CLIENT, A)
            .ipv4([198, 18, 1, 2], dst, 64)
            .udp(1000, 2000)
            .write(&mut v, b"payload")
            .unwrap();
        v
    }

    #[test]
    fn forwards_on_link_and_via_gateway() {
        let mut f = fwd();
        let mut frame = udp([198, 18, 2, 2]);
        let n = frame.len() as u16;
        assert_eq!(f.handle(0, 0, &mut frame), Verdict::Tx { port: 1, len: n });
        assert_eq!(&frame[0..6], &SERVER);
        assert_eq!(&frame[6..12], &B);

        let mut frame = udp([198, 19, 7, 7]);
        assert!(matches!(
            f.handle(0, 0, &mut frame),
            Verdict::Tx { port: 1, .. }
        ));
        assert_eq!(&frame[0..6], &GW);
        assert_eq!(f.stats().forwarded, 2);
        assert_eq!(f.stats().checksums_filled, 2);
    }

    #[test]
    fn drops_unresolved_and_non_ip() {
        let mut f = fwd();
        let mut frame = udp([198, 18, 2, 99]);
        assert_eq!(f.handle(0, 0, &mut frame), Verdict::Drop);
        assert_eq!(f.stats().no_neighbour, 1);
        let mut arp = vec![0u8; 42];
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert_eq!(f.handle(0, 1, &mut arp), Verdict::Drop);
        assert_eq!(f.stats().not_ip, 1);
        // a neighbour that exists only on the other interface does not count
        let mut back = udp([198, 18, 2, 2]);
        assert_eq!(f.handle(0, 1, &mut back), Verdict::Drop);
    }

    #[test]
    fn no_refresh_without_netlink() {
        let mut f = fwd();
        assert_eq!(f.next_deadline(), None);
        assert_eq!(f.expire(5, 10, &mut |_, _| {}), 0);
    }
}
