//! What the kernel of the appliance knows, translated for the engine: routes and neighbours
//! by port number (the order of `--interface`), and a way to make the kernel resolve a
//! neighbour the engine is missing.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use xlb_afxdp::{
    netlink::{Link, Netlink, RTN_UNICAST, RT_TABLE_MAIN},
    PortId,
};
use xlb_engine::{Addr, Route};

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

fn port_of(ports: &[Port], ifindex: u32) -> Option<PortId> {
    ports.iter().find(|p| p.ifindex == ifindex).map(|p| p.id)
}

/// The main table's unicast routes that leave through one of `ports`.
pub fn routes(nl: &mut Netlink, ports: &[Port]) -> io::Result<Vec<Route>> {
    let mut out = Vec::new();
    for r in nl.routes()? {
        if r.table != RT_TABLE_MAIN || r.kind != RTN_UNICAST {
            continue;
        }
        // ECMP: the engine keeps one next hop per prefix; the first through our ports wins.
        let Some((port, gw)) = r
            .nexthops
            .iter()
            .find_map(|nh| Some((port_of(ports, nh.ifindex?)?, nh.gateway)))
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
    Ok(out)
}

/// Usable neighbour entries on `ports`.
pub fn neighbours(nl: &mut Netlink, ports: &[Port]) -> io::Result<Vec<(Addr, PortId, [u8; 6])>> {
    Ok(nl
        .neighbours()?
        .into_iter()
        .filter(|n| n.state.is_usable())
        .filter_map(|n| Some((Addr::from(n.ip), port_of(ports, n.ifindex)?, n.mac?)))
        .collect())
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
}

impl Resolver {
    pub fn new(min_gap: Duration) -> Self {
        Self {
            v4: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok(),
            v6: UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).ok(),
            last: HashMap::new(),
            min_gap,
        }
    }

    /// Returns whether a probe was sent.
    pub fn probe(&mut self, addr: Addr) -> bool {
        let now = Instant::now();
        if self
            .last
            .get(&addr)
            .is_some_and(|t| now.duration_since(*t) < self.min_gap)
        {
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
        }];
        let err = ports(&links, &["nope".into()]).unwrap_err();
        assert!(err.contains("\"nope\"") && err.contains("eth0"), "{err}");
        let p = ports(&links, &["eth0".into()]).unwrap();
        assert_eq!((p[0].id, p[0].ifindex), (0, 2));
    }
}
