//! What the kernel of the appliance knows, translated for the engine: routes and neighbours
//! by port number (the order of `--interface`) and VLAN, and a way to make the kernel resolve
//! a neighbour the engine is missing. `crate::kernel_watch` keeps it up to date.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use xlb_afxdp::{
    netlink::{self, Link, Neighbour, Netlink, RTN_UNICAST, RT_TABLE_MAIN},
    PortId,
};
use xlb_engine::{Addr, Mac, Route};

/// One interface the dataplane drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub id: PortId,
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// Resolves `names` (in port order) against the namespace's links.
pub fn ports(links: &[Link], names: &[String]) -> Result<Vec<Port>, String> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let link = links.iter().find(|l| &l.name == name).ok_or_else(|| {
                let mut known: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
                known.sort_unstable();
                format!(
                    "unknown interface {name:?}: this network namespace has {}; \
                     run xlbd in the namespace of its interfaces (ip netns exec NS xlbd ...)",
                    known.join(", ")
                )
            })?;
            let mac = link
                .mac
                .filter(|m| *m != [0; 6])
                .ok_or_else(|| format!("interface {name} has no Ethernet address"))?;
            Ok(Port {
                id: PortId::try_from(i).map_err(|_| "too many interfaces".to_string())?,
                name: name.clone(),
                ifindex: link.ifindex,
                mac,
            })
        })
        .collect()
}

/// The interfaces whose neighbours and routes the engine uses, by ifindex: xlbd's ports
/// (untagged), and the 802.1Q VLAN interfaces stacked on a port whose VLAN is allowed there
/// (`--vlan`), as (port, VLAN).
pub type PortMap = HashMap<u32, (PortId, Option<u16>)>;

/// A VLAN allowed on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortVlan {
    pub port: PortId,
    pub vlan: u16,
}

/// Parses one `--vlan IFACE:ID[,ID...]`: the interface and its VLAN ids (1–4094; 0 marks
/// priority-tagged frames and 4095 is reserved, 802.1Q).
pub fn parse_vlan_option(v: &str) -> Result<(String, Vec<u16>), String> {
    let bad =
        |why: String| format!("--vlan {v:?}: {why} (expected IFACE:ID[,ID...], e.g. eth0:100,200)");
    let (iface, ids) = v
        .split_once(':')
        .ok_or_else(|| bad("no ':' between interface and VLAN ids".into()))?;
    if iface.is_empty() {
        return Err(bad("no interface".into()));
    }
    let ids =
        ids.split(',')
            .map(|id| {
                let n: u32 = id.trim().parse().map_err(|_| {
                    bad(format!("VLAN id {id:?} is not a number (allowed: 1–4094)"))
                })?;
                u16::try_from(n)
                    .ok()
                    .filter(|n| (1..=4094).contains(n))
                    .ok_or_else(|| bad(format!("VLAN id {n} out of range (allowed: 1–4094)")))
            })
            .collect::<Result<Vec<u16>, String>>()?;
    Ok((iface.to_string(), ids))
}

/// The `--vlan` options against the ports: every interface named must be an `--interface`.
pub fn port_vlans(ports: &[Port], vlans: &[(String, Vec<u16>)]) -> Result<Vec<PortVlan>, String> {
    let mut out = Vec::new();
    for (iface, ids) in vlans {
        let port = ports.iter().find(|p| &p.name == iface).ok_or_else(|| {
            format!("--vlan {iface}:...: {iface} is not one of the --interface names")
        })?;
        for &vlan in ids {
            let pv = PortVlan {
                port: port.id,
                vlan,
            };
            if !out.contains(&pv) {
                out.push(pv);
            }
        }
    }
    Ok(out)
}

pub fn port_map(links: &[Link], ports: &[Port], vlans: &[PortVlan]) -> PortMap {
    let mut map: PortMap = ports.iter().map(|p| (p.ifindex, (p.id, None))).collect();
    for l in links {
        let (Some(parent), Some(vlan)) = (l.parent, l.vlan) else {
            continue;
        };
        let Some(port) = ports.iter().find(|p| p.ifindex == parent) else {
            continue;
        };
        if vlans.contains(&PortVlan {
            port: port.id,
            vlan,
        }) {
            map.insert(l.ifindex, (port.id, Some(vlan)));
        }
    }
    map
}

/// A neighbour the engine can use: (address, port, VLAN, MAC).
pub type EngineNeighbour = (Addr, PortId, Option<u16>, Mac);

/// `n` as the engine sees it, if it is usable (it has a MAC, in a state the kernel would
/// send to) and on one of the mapped interfaces.
pub fn engine_neighbour(n: &Neighbour, map: &PortMap) -> Option<EngineNeighbour> {
    if !n.state.is_usable() {
        return None;
    }
    let &(port, vlan) = map.get(&n.ifindex)?;
    Some((Addr::from(n.ip), port, vlan, n.mac?))
}

/// The main table's unicast routes that leave through one of `ports`.
pub fn routes(nl: &mut Netlink, map: &PortMap) -> io::Result<Vec<Route>> {
    Ok(engine_routes(&nl.routes()?, map))
}

/// The main table's unicast routes among `kernel` that leave through a mapped interface, in
/// the engine's terms.
pub fn engine_routes(kernel: &[netlink::Route], map: &PortMap) -> Vec<Route> {
    let mut out = Vec::new();
    for r in kernel {
        if r.table != RT_TABLE_MAIN || r.kind != RTN_UNICAST {
            continue;
        }
        // ECMP: the engine keeps one next hop per prefix; the first through our ports wins.
        let Some((port, gw)) = r
            .nexthops
            .iter()
            .find_map(|nh| Some((map.get(&nh.ifindex?)?.0, nh.gateway)))
        else {
            continue;
        };
        let route = match (r.dst, gw) {
            (IpAddr::V4(d), None) => Route::v4(d, r.prefix_len, port, None),
            (IpAddr::V4(d), Some(IpAddr::V4(g))) => Route::v4(d, r.prefix_len, port, Some(g)),
            (IpAddr::V6(d), None) => Route::v6(d, r.prefix_len, port, None),
            (IpAddr::V6(d), Some(IpAddr::V6(g))) => Route::v6(d, r.prefix_len, port, Some(g)),
            // IPv4 via an IPv6 gateway (RFC 5549): not for this dataplane.
            _ => continue,
        };
        out.push(route);
    }
    out
}

/// Whether a route through `port` covers `ip` (used to find the backend-facing interfaces).
pub fn routed_via(routes: &[Route], ip: IpAddr, port: PortId) -> bool {
    let a = Addr::from(ip);
    let best = routes
        .iter()
        .filter(|r| {
            let mask = if r.len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(r.len))
            };
            a.0 & mask == r.prefix.0 & mask
        })
        .max_by_key(|r| r.len);
    best.is_some_and(|r| r.port == port)
}

/// Asks the kernel to resolve neighbours, at most once per address per `min_gap`.
///
/// There is no netlink request that makes the kernel start ARP/ND for an address, so we send
/// it an empty UDP datagram to the discard port (9): the kernel resolves the next hop to send
/// it, and the neighbour entry is what we are after. The datagram itself is harmless (a host
/// answers with an ICMP port unreachable, which reaches the appliance's own kernel).
#[derive(Debug)]
pub struct Resolver {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
    last: HashMap<Addr, Instant>,
    min_gap: Duration,
    /// Probes asked for too soon after the last one to the same address, sent once the gap
    /// has passed ([`retry_deferred`](Self::retry_deferred)).
    deferred: Vec<Addr>,
}

/// Most probes waiting for their gap.
const MAX_DEFERRED: usize = 4096;

impl Resolver {
    pub fn new(min_gap: Duration) -> Self {
        Self {
            v4: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok(),
            v6: UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).ok(),
            last: HashMap::new(),
            min_gap,
            deferred: Vec::new(),
        }
    }

    fn too_soon(&self, addr: Addr, now: Instant) -> bool {
        self.last
            .get(&addr)
            .is_some_and(|t| now.duration_since(*t) < self.min_gap)
    }

    /// Like [`probe`](Self::probe), but a probe that comes too soon after the last one to
    /// the same address is not dropped: it waits for [`retry_deferred`](Self::retry_deferred).
    /// For what must be resolved (a member the kernel forgot), not for what recurs anyway.
    pub fn probe_soon(&mut self, addr: Addr) {
        if self.too_soon(addr, Instant::now()) {
            if !self.deferred.contains(&addr) && self.deferred.len() < MAX_DEFERRED {
                self.deferred.push(addr);
            }
            return;
        }
        self.probe(addr);
    }

    /// Sends the deferred probes whose gap has passed.
    pub fn retry_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let now = Instant::now();
        let due: Vec<Addr> = self
            .deferred
            .iter()
            .copied()
            .filter(|a| !self.too_soon(*a, now))
            .collect();
        self.deferred.retain(|a| !due.contains(a));
        for a in due {
            self.probe(a);
        }
    }

    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// Returns whether a probe was sent.
    pub fn probe(&mut self, addr: Addr) -> bool {
        let now = Instant::now();
        if self.too_soon(addr, now) {
            return false;
        }
        // Bounded: forget old entries rather than grow with every address ever missed.
        if self.last.len() > 4096 {
            self.last
                .retain(|_, t| now.duration_since(*t) < self.min_gap);
        }
        self.last.insert(addr, now);
        let ip = addr.to_ip();
        let sock = match ip {
            IpAddr::V4(_) => self.v4.as_ref(),
            IpAddr::V6(_) => self.v6.as_ref(),
        };
        sock.is_some_and(|s| s.send_to(&[], SocketAddr::new(ip, 9)).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_via_takes_the_longest_prefix() {
        let routes = vec![
            Route::v4(
                Ipv4Addr::UNSPECIFIED,
                0,
                2,
                Some(Ipv4Addr::new(198, 19, 0, 50)),
            ),
            Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None),
        ];
        assert!(routed_via(&routes, "198.18.1.11".parse().unwrap(), 1));
        assert!(!routed_via(&routes, "198.18.1.11".parse().unwrap(), 2));
        assert!(routed_via(&routes, "198.18.7.1".parse().unwrap(), 2));
    }

    #[test]
    fn unknown_interface_names_the_known_ones() {
        let links = vec![Link {
            ifindex: 2,
            name: "eth0".into(),
            mac: Some([2, 0, 0, 0, 0, 1]),
            mtu: 1500,
            flags: 1,
            parent: None,
            vlan: None,
        }];
        let err = ports(&links, &["nope".into()]).unwrap_err();
        assert!(err.contains("\"nope\"") && err.contains("eth0"), "{err}");
        let p = ports(&links, &["eth0".into()]).unwrap();
        assert_eq!((p[0].id, p[0].ifindex), (0, 2));
    }

    #[test]
    fn a_probe_asked_for_too_soon_waits_for_its_gap() {
        let mut r = Resolver::new(Duration::from_millis(50));
        let a = Addr::from_v4_bytes([198, 18, 1, 11]);
        assert!(r.probe(a) || r.v4.is_none());
        r.probe_soon(a);
        r.probe_soon(a);
        assert_eq!(r.deferred(), 1, "once");
        r.retry_deferred();
        assert_eq!(r.deferred(), 1, "not yet");
        std::thread::sleep(Duration::from_millis(60));
        r.retry_deferred();
        assert_eq!(r.deferred(), 0);
        assert!(r.too_soon(a, Instant::now()), "sent just now");
    }

    #[test]
    fn vlan_options_parse_and_name_the_range() {
        assert_eq!(
            parse_vlan_option("eth0:100"),
            Ok(("eth0".into(), vec![100]))
        );
        assert_eq!(
            parse_vlan_option("eth0:1,4094, 7"),
            Ok(("eth0".into(), vec![1, 4094, 7]))
        );
        for (bad, says) in [
            ("eth0", "no ':'"),
            (":100", "no interface"),
            ("eth0:0", "VLAN id 0 out of range (allowed: 1–4094)"),
            ("eth0:4095", "VLAN id 4095 out of range"),
            ("eth0:70000", "VLAN id 70000 out of range"),
            ("eth0:x", "VLAN id \"x\" is not a number"),
            ("eth0:", "is not a number"),
        ] {
            let e = parse_vlan_option(bad).unwrap_err();
            assert!(e.contains(says) && e.starts_with("--vlan"), "{bad}: {e}");
        }
        let links = vec![Link {
            ifindex: 2,
            name: "eth0".into(),
            mac: Some([2, 0, 0, 0, 0, 1]),
            mtu: 1500,
            flags: 1,
            parent: None,
            vlan: None,
        }];
        let p = ports(&links, &["eth0".into()]).unwrap();
        let v = port_vlans(&p, &[("eth0".into(), vec![5, 6, 5])]).unwrap();
        assert_eq!(
            v,
            vec![PortVlan { port: 0, vlan: 5 }, PortVlan { port: 0, vlan: 6 }]
        );
        let e = port_vlans(&p, &[("eth1".into(), vec![5])]).unwrap_err();
        assert!(e.contains("not one of the --interface names"), "{e}");
    }

    #[test]
    fn vlan_interfaces_of_allowed_vlans_map_to_their_port() {
        let link = |ifindex, name: &str, parent, vlan| Link {
            ifindex,
            name: name.into(),
            mac: Some([2, 0, 0, 0, 0, ifindex as u8]),
            mtu: 1500,
            flags: 1,
            parent,
            vlan,
        };
        let links = vec![
            link(2, "eth0", None, None),
            link(3, "eth1", None, None),
            link(4, "eth0.100", Some(2), Some(100)),
            link(5, "eth0.200", Some(2), Some(200)),
            link(6, "eth9.100", Some(9), Some(100)),
        ];
        let ports = ports(&links, &["eth0".into(), "eth1".into()]).unwrap();
        let map = port_map(&links, &ports, &[PortVlan { port: 0, vlan: 100 }]);
        assert_eq!(map.get(&2), Some(&(0, None)));
        assert_eq!(map.get(&3), Some(&(1, None)));
        assert_eq!(map.get(&4), Some(&(0, Some(100))));
        assert_eq!(map.get(&5), None, "VLAN 200 is not allowed on eth0");
        assert_eq!(map.get(&6), None, "not on a port");

        let n = |ifindex, state| Neighbour {
            ifindex,
            ip: "198.18.1.7".parse().unwrap(),
            mac: Some([2, 0, 0, 0, 9, 9]),
            state: netlink::NeighState(state),
        };
        use netlink::NeighState as S;
        assert_eq!(
            engine_neighbour(&n(4, S::STALE), &map),
            Some((
                Addr::from_v4_bytes([198, 18, 1, 7]),
                0,
                Some(100),
                [2, 0, 0, 0, 9, 9]
            ))
        );
        assert_eq!(engine_neighbour(&n(5, S::REACHABLE), &map), None);
        assert_eq!(engine_neighbour(&n(2, S::FAILED), &map), None);

        let route = |ifindex| netlink::Route {
            dst: "198.18.7.0".parse().unwrap(),
            prefix_len: 24,
            table: RT_TABLE_MAIN,
            kind: RTN_UNICAST,
            priority: 0,
            nexthops: vec![netlink::NextHop {
                ifindex: Some(ifindex),
                gateway: None,
            }],
        };
        let r = engine_routes(&[route(4), route(5)], &map);
        assert_eq!(
            r,
            vec![Route::v4(Ipv4Addr::new(198, 18, 7, 0), 24, 0, None)]
        );
    }
}
