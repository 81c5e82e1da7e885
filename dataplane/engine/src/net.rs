//! Next hops: where a frame leaves (port) and with which L2 addresses.
//!
//! The engine is pure, so the worker feeds it what the kernel knows (interfaces, routes,
//! neighbours over netlink) and the engine only indexes. Flows store a `NextHopId` per direction,
//! resolved once at flow creation; a neighbour's MAC change updates the entry in place, so
//! existing flows follow it without a lookup per packet.
//! - Toward the translated destination: route lookup (longest prefix) → gateway or the
//!   destination itself → neighbour entry. A miss is a counted drop and is queued so that the
//!   worker can ask the kernel to resolve it.
//! - Back toward the original sender: learned from the frame that created the flow (ingress
//!   port and source MAC), as a router's reply path would be.

use std::collections::HashMap;

use crate::addr::Addr;
use crate::select::FastBuild;

/// Index of an interface in the worker's port list.
pub type PortId = u16;
/// Index of a next hop in [`NextHops`].
pub type NextHopId = u16;

pub type Mac = [u8; 6];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub port: PortId,
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub vlan: Option<u16>,
}

/// A route: destinations in `prefix/len` leave through `port`, via `gateway` when set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub prefix: Addr,
    /// Prefix length in bits of the 128-bit form (IPv4 /24 is 96 + 24).
    pub len: u8,
    pub port: PortId,
    pub gateway: Option<Addr>,
}

impl Route {
    /// An IPv4 route with an IPv4 prefix length.
    pub fn v4(
        prefix: std::net::Ipv4Addr,
        len: u8,
        port: PortId,
        gateway: Option<std::net::Ipv4Addr>,
    ) -> Route {
        Route {
            prefix: prefix.into(),
            len: 96 + len.min(32),
            port,
            gateway: gateway.map(Addr::from),
        }
    }
    /// An IPv6 route.
    pub fn v6(
        prefix: std::net::Ipv6Addr,
        len: u8,
        port: PortId,
        gateway: Option<std::net::Ipv6Addr>,
    ) -> Route {
        Route {
            prefix: prefix.into(),
            len: len.min(128),
            port,
            gateway: gateway.map(Addr::from),
        }
    }
    fn matches(&self, a: Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - self.len as u32)
        };
        (a.0 & mask) == (self.prefix.0 & mask)
    }
}

/// Why no next hop could be found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHopError {
    NoRoute,
    /// The neighbour (gateway or destination) has no MAC yet; it was queued for resolution.
    NoNeighbor,
    /// The next-hop table is full.
    TableFull,
}

/// Bounded next-hop table of one worker.
#[derive(Debug, Clone)]
pub struct NextHops {
    port_macs: Vec<Mac>,
    /// Per port: it faces the pool members (outbound rules take new flows only from these).
    backend_side: Vec<bool>,
    routes: Vec<Route>,
    hops: Vec<NextHop>,
    // The crate's fast hasher, not SipHash: these are looked up twice per new flow (SipHash
    // was a quarter of the cost of creating one), and both are bounded by `capacity` and fed
    // by the kernel's neighbour table or by source MACs of frames on directly attached
    // segments, so a crafted collision can cost at most a probe sequence within that bound.
    by_ip: HashMap<Addr, NextHopId, FastBuild>,
    by_learned: HashMap<(PortId, Mac), NextHopId, FastBuild>,
    capacity: usize,
    misses: Vec<Addr>,
}

const MAX_PENDING_MISSES: usize = 64;

impl NextHops {
    pub fn new(capacity: usize) -> NextHops {
        let capacity = capacity.min(NextHopId::MAX as usize);
        NextHops {
            port_macs: Vec::new(),
            backend_side: Vec::new(),
            routes: Vec::new(),
            hops: Vec::with_capacity(capacity),
            by_ip: HashMap::with_capacity_and_hasher(capacity, FastBuild::default()),
            by_learned: HashMap::with_capacity_and_hasher(capacity, FastBuild::default()),
            capacity,
            misses: Vec::with_capacity(MAX_PENDING_MISSES),
        }
    }

    /// Declares port `port` with its MAC address (ports are numbered densely from 0).
    pub fn set_port(&mut self, port: PortId, mac: Mac) {
        let i = port as usize;
        if self.port_macs.len() <= i {
            self.port_macs.resize(i + 1, [0; 6]);
        }
        self.port_macs[i] = mac;
    }

    /// Declares whether port `port` faces the pool members. Only packets received on such a
    /// port may open an outbound (SNAT) flow or travel its original direction: elsewhere a
    /// member's address is spoofed. Ports not declared are not backend side.
    pub fn set_backend_side(&mut self, port: PortId, backend_side: bool) {
        let i = port as usize;
        if self.backend_side.len() <= i {
            self.backend_side.resize(i + 1, false);
        }
        self.backend_side[i] = backend_side;
    }

    #[inline]
    pub fn is_backend_side(&self, port: PortId) -> bool {
        self.backend_side
            .get(port as usize)
            .copied()
            .unwrap_or(false)
    }

    pub fn set_routes(&mut self, mut routes: Vec<Route>) {
        // Longest prefix first: the first match is the best.
        routes.sort_by_key(|r| std::cmp::Reverse(r.len));
        self.routes = routes;
    }

    /// Records (or updates in place) the MAC of neighbour `ip` on `port`.
    pub fn set_neighbor(
        &mut self,
        ip: Addr,
        port: PortId,
        mac: Mac,
    ) -> Result<NextHopId, NextHopError> {
        let hop = NextHop {
            port,
            src_mac: self.port_mac(port),
            dst_mac: mac,
            vlan: None,
        };
        if let Some(&id) = self.by_ip.get(&ip) {
            self.hops[id as usize] = hop;
            return Ok(id);
        }
        let id = self.push(hop)?;
        self.by_ip.insert(ip, id);
        Ok(id)
    }

    pub fn get(&self, id: NextHopId) -> &NextHop {
        &self.hops[id as usize]
    }

    pub fn len(&self) -> usize {
        self.hops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hops.is_empty()
    }

    /// The next hop toward `dst`: longest-prefix route, then the neighbour entry of its gateway
    /// (or of `dst` on a connected route).
    pub fn resolve(&mut self, dst: Addr) -> Result<NextHopId, NextHopError> {
        let route = self
            .routes
            .iter()
            .find(|r| r.matches(dst))
            .copied()
            .ok_or(NextHopError::NoRoute)?;
        let neighbor = route.gateway.unwrap_or(dst);
        match self.by_ip.get(&neighbor) {
            Some(&id) => Ok(id),
            None => {
                if self.misses.len() < MAX_PENDING_MISSES && !self.misses.contains(&neighbor) {
                    self.misses.push(neighbor);
                }
                Err(NextHopError::NoNeighbor)
            }
        }
    }

    /// The next hop back to whoever sent a frame on `port` from `mac`.
    pub fn learn(
        &mut self,
        port: PortId,
        mac: Mac,
        vlan: Option<u16>,
    ) -> Result<NextHopId, NextHopError> {
        if let Some(&id) = self.by_learned.get(&(port, mac)) {
            return Ok(id);
        }
        let hop = NextHop {
            port,
            src_mac: self.port_mac(port),
            dst_mac: mac,
            vlan,
        };
        let id = self.push(hop)?;
        self.by_learned.insert((port, mac), id);
        Ok(id)
    }

    /// Neighbours that were needed but unknown since the last call; the worker asks the kernel
    /// to resolve them.
    pub fn take_misses(&mut self, mut f: impl FnMut(Addr)) {
        for a in self.misses.drain(..) {
            f(a);
        }
    }

    fn port_mac(&self, port: PortId) -> Mac {
        self.port_macs.get(port as usize).copied().unwrap_or([0; 6])
    }

    fn push(&mut self, hop: NextHop) -> Result<NextHopId, NextHopError> {
        if self.hops.len() >= self.capacity {
            return Err(NextHopError::TableFull);
        }
        self.hops.push(hop);
        Ok((self.hops.len() - 1) as NextHopId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn longest_prefix_and_gateway() {
        let mut n = NextHops::new(16);
        n.set_port(0, [2, 0, 0, 0, 0, 1]);
        n.set_port(1, [2, 0, 0, 0, 0, 2]);
        n.set_routes(vec![
            Route::v4(
                Ipv4Addr::new(0, 0, 0, 0),
                0,
                1,
                Some(Ipv4Addr::new(198, 19, 0, 1)),
            ),
            Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 0, None),
        ]);
        let backend = Addr::from(Ipv4Addr::new(198, 18, 1, 10));
        assert_eq!(n.resolve(backend), Err(NextHopError::NoNeighbor));
        let mut missed = vec![];
        n.take_misses(|a| missed.push(a));
        assert_eq!(missed, vec![backend]);
        let id = n.set_neighbor(backend, 0, [9; 6]).unwrap();
        assert_eq!(n.resolve(backend), Ok(id));
        assert_eq!(n.get(id).src_mac, [2, 0, 0, 0, 0, 1]);
        // Default route via the gateway.
        let far = Addr::from(Ipv4Addr::new(198, 19, 200, 1));
        n.set_neighbor(Ipv4Addr::new(198, 19, 0, 1).into(), 1, [7; 6])
            .unwrap();
        let hop = n.resolve(far).unwrap();
        assert_eq!(n.get(hop).dst_mac, [7; 6]);
        assert_eq!(n.get(hop).port, 1);
        // A MAC change updates the entry in place.
        assert_eq!(n.set_neighbor(backend, 0, [8; 6]), Ok(id));
        assert_eq!(n.get(id).dst_mac, [8; 6]);
    }

    #[test]
    fn learned_hops_and_capacity() {
        let mut n = NextHops::new(2);
        let a = n.learn(0, [1; 6], None).unwrap();
        assert_eq!(n.learn(0, [1; 6], None), Ok(a));
        n.learn(1, [1; 6], Some(5)).unwrap();
        assert_eq!(n.learn(1, [2; 6], None), Err(NextHopError::TableFull));
    }

    #[test]
    fn no_route() {
        let mut n = NextHops::new(2);
        assert_eq!(
            n.resolve(Addr::from(Ipv4Addr::new(198, 18, 0, 1))),
            Err(NextHopError::NoRoute)
        );
    }
}
