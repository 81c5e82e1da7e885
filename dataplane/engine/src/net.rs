//! Next hops: where a frame leaves (port, VLAN) and with which L2 addresses.
//!
//! The engine is pure, so the worker feeds it what the kernel knows (interfaces, routes,
//! neighbours over netlink) and the engine only indexes. Flows store a `NextHopId` per direction,
//! resolved once at flow creation; a neighbour's MAC change updates the entry in place, so
//! existing flows follow it without a lookup per packet.
//! - Toward the translated destination: route lookup (longest prefix) → gateway or the
//!   destination itself → neighbour entry. A miss is a counted drop and is queued so that the
//!   worker can ask the kernel to resolve it. When the routes change, the engine re-resolves
//!   the flows' forward hops in a bounded sweep ([`NextHops::route_epoch`]).
//! - Back toward the original sender: learned from the frame that created the flow (ingress
//!   port, VLAN and source MAC), as a router's reply path would be.
//!
//! Entries are reclaimed when nothing uses them: every flow holds a reference on both of its
//! hops ([`NextHops::acquire`] / [`NextHops::release`]); a learned hop goes with its last
//! flow, a neighbour once the kernel no longer lists it and no flow uses it. So source MACs
//! or spoofed ARP senders on a segment occupy the table only while their flows (or the
//! kernel's entries) live, never for good; what was reclaimed and what was refused for lack
//! of room is counted ([`NextHopStats`]).

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
    /// The 802.1Q VLAN id frames to this hop carry; `None`: untagged.
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

/// What the next-hop table holds and did since start, for the operator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopStats {
    /// Entries in use: neighbours and learned senders.
    pub entries: u64,
    /// Entries freed because nothing used them any more.
    pub reclaimed: u64,
    /// Entries that could not be created because the table was full (a flow that needed one
    /// is dropped as `next_hop_table_full`; a kernel neighbour is left out until room frees up
    /// and the kernel's table is handed over again).
    pub refused: u64,
}

/// Who an entry belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Free,
    /// A neighbour of the kernel's table. `in_kernel` is false once the kernel dropped it:
    /// flows that use it keep its last MAC, new flows use it too but ask the kernel to
    /// resolve it again. `seen` is the [`NextHops::sync_neighbors`] round that last listed it.
    Neighbor {
        ip: Addr,
        in_kernel: bool,
        seen: u32,
    },
    /// The sender of a frame that created a flow.
    Learned,
}

#[derive(Clone, Copy, Debug)]
struct Meta {
    /// Flows holding this entry.
    refs: u32,
    owner: Owner,
}

/// VLAN ids a port accepts tagged frames for, one bit per id.
type VlanSet = [u64; 64];

/// Key of a learned hop: (port, VLAN, MAC) packed into one word for the fast hasher.
fn learned_key(port: PortId, vlan: Option<u16>, mac: Mac) -> u128 {
    let mut m = [0u8; 8];
    m[2..].copy_from_slice(&mac);
    let vlan = vlan.map_or(0, |v| u128::from(v & 0x0fff) + 1);
    (u128::from(port) << 80) | (vlan << 64) | u128::from(u64::from_be_bytes(m))
}

/// Bounded next-hop table of one worker.
#[derive(Debug, Clone)]
pub struct NextHops {
    port_macs: Vec<Mac>,
    port_vlans: Vec<VlanSet>,
    /// Per port: it faces the pool members (outbound rules take new flows only from these).
    backend_side: Vec<bool>,
    routes: Vec<Route>,
    hops: Vec<NextHop>,
    meta: Vec<Meta>,
    free: Vec<NextHopId>,
    // The crate's fast hasher, not SipHash: these are looked up twice per new flow (SipHash
    // was a quarter of the cost of creating one), and both are bounded by `capacity` and fed
    // by the kernel's neighbour table or by source MACs of frames on directly attached
    // segments, so a crafted collision can cost at most a probe sequence within that bound.
    // Both are created for twice the capacity: entries come and go, and a map whose
    // tombstones run out rehashes in place (no allocation) only while at most half full.
    by_ip: HashMap<Addr, NextHopId, FastBuild>,
    by_learned: HashMap<u128, NextHopId, FastBuild>,
    capacity: usize,
    misses: Vec<Addr>,
    stats: NextHopStats,
    sync_round: u32,
    route_epoch: u64,
    /// A re-resolution after a route change found a neighbour missing: the next new
    /// neighbour entry starts another one.
    rehome_pending: bool,
    /// Neighbour entries changed in place (MAC, port or VLAN): flows that copied a hop's
    /// addresses elsewhere (the XDP fast path) check theirs when it moves.
    hop_changes: u64,
    /// Neighbour entries added, changed or removed, routes and port addresses changed: what
    /// resolves to what may differ (the XDP fast path's new-flow section is rebuilt).
    generation: u64,
}

const MAX_PENDING_MISSES: usize = 64;

impl NextHops {
    pub fn new(capacity: usize) -> NextHops {
        let capacity = capacity.min(NextHopId::MAX as usize);
        NextHops {
            port_macs: Vec::new(),
            port_vlans: Vec::new(),
            backend_side: Vec::new(),
            routes: Vec::new(),
            hops: Vec::with_capacity(capacity),
            meta: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            by_ip: HashMap::with_capacity_and_hasher(2 * capacity, FastBuild::default()),
            by_learned: HashMap::with_capacity_and_hasher(2 * capacity, FastBuild::default()),
            capacity,
            misses: Vec::with_capacity(MAX_PENDING_MISSES),
            stats: NextHopStats::default(),
            sync_round: 0,
            route_epoch: 0,
            rehome_pending: false,
            hop_changes: 0,
            generation: 0,
        }
    }

    /// Ports told so far ([`set_port`](Self::set_port)).
    pub fn port_count(&self) -> usize {
        self.port_macs.len()
    }

    /// The MAC of every port told so far, by port id.
    pub fn port_macs(&self) -> &[Mac] {
        &self.port_macs
    }

    /// Declares port `port` with its MAC address (ports are numbered densely from 0).
    pub fn set_port(&mut self, port: PortId, mac: Mac) {
        let i = port as usize;
        if self.port_macs.len() <= i {
            self.port_macs.resize(i + 1, [0; 6]);
        }
        self.port_macs[i] = mac;
        self.generation += 1;
    }

    /// Accepts frames tagged with VLAN `vlan` (the 12-bit id) on `port`. Without this, a
    /// tagged frame is dropped as `vlan_tag`: its tag would otherwise be forwarded onto a
    /// segment it does not belong to.
    pub fn allow_vlan(&mut self, port: PortId, vlan: u16) {
        let i = port as usize;
        if self.port_vlans.len() <= i {
            self.port_vlans.resize(i + 1, [0; 64]);
        }
        let v = usize::from(vlan & 0x0fff);
        self.port_vlans[i][v / 64] |= 1 << (v % 64);
    }

    /// Whether tagged frames of `vlan` are accepted on `port`.
    #[inline]
    pub fn vlan_allowed(&self, port: PortId, vlan: u16) -> bool {
        let v = usize::from(vlan & 0x0fff);
        self.port_vlans
            .get(port as usize)
            .is_some_and(|set| set[v / 64] & (1 << (v % 64)) != 0)
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

    /// Replaces the routes. When they differ from the current ones, [`route_epoch`]
    /// (Self::route_epoch) moves on, and the engine re-resolves its flows' forward hops.
    pub fn set_routes(&mut self, mut routes: Vec<Route>) {
        // Longest prefix first: the first match is the best.
        routes.sort_by_key(|r| std::cmp::Reverse(r.len));
        if routes != self.routes {
            self.routes = routes;
            self.route_epoch += 1;
            self.generation += 1;
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Changes whenever flows' forward hops may resolve differently than when they were
    /// created: the routes changed, or a neighbour that a re-resolution missed appeared.
    /// How many times a neighbour entry changed in place (see [`NextHops::set_neighbor`]).
    pub fn hop_changes(&self) -> u64 {
        self.hop_changes
    }

    /// Changes whenever a neighbour entry is added, changed or removed, or the routes or a
    /// port's address change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn route_epoch(&self) -> u64 {
        self.route_epoch
    }

    /// Records (or updates in place) the MAC of neighbour `ip` on `port`, untagged.
    pub fn set_neighbor(
        &mut self,
        ip: Addr,
        port: PortId,
        mac: Mac,
    ) -> Result<NextHopId, NextHopError> {
        self.set_neighbor_vlan(ip, port, None, mac)
    }

    /// Records (or updates in place) neighbour `ip` on `port`, reached with VLAN tag `vlan`
    /// (`None`: untagged), at `mac`.
    pub fn set_neighbor_vlan(
        &mut self,
        ip: Addr,
        port: PortId,
        vlan: Option<u16>,
        mac: Mac,
    ) -> Result<NextHopId, NextHopError> {
        let hop = NextHop {
            port,
            src_mac: self.port_mac(port),
            dst_mac: mac,
            vlan: vlan.map(|v| v & 0x0fff),
        };
        let owner = Owner::Neighbor {
            ip,
            in_kernel: true,
            seen: self.sync_round,
        };
        if let Some(&id) = self.by_ip.get(&ip) {
            if self.hops[id as usize] != hop {
                self.hop_changes += 1;
                self.generation += 1;
            }
            self.hops[id as usize] = hop;
            self.meta[id as usize].owner = owner;
            return Ok(id);
        }
        let id = self.push(hop, owner)?;
        self.by_ip.insert(ip, id);
        self.generation += 1;
        if self.rehome_pending {
            self.rehome_pending = false;
            self.route_epoch += 1;
        }
        Ok(id)
    }

    /// The kernel no longer lists neighbour `ip`: its entry goes when no flow uses it; until
    /// then its flows keep the last MAC, and new flows that need it ask the kernel again.
    pub fn remove_neighbor(&mut self, ip: Addr) {
        let Some(&id) = self.by_ip.get(&ip) else {
            return;
        };
        let m = &mut self.meta[id as usize];
        if let Owner::Neighbor { in_kernel, .. } = &mut m.owner {
            *in_kernel = false;
        }
        if m.refs == 0 {
            self.reclaim(id);
        }
    }

    /// Takes the kernel's whole neighbour table, `(address, port, VLAN, MAC)`: entries are
    /// set in place, and neighbours the table no longer lists are removed as by
    /// [`remove_neighbor`](Self::remove_neighbor). A neighbour refused for lack of room is
    /// counted and tried again at the next call.
    pub fn sync_neighbors(
        &mut self,
        neighbors: impl IntoIterator<Item = (Addr, PortId, Option<u16>, Mac)>,
    ) {
        self.sync_round = self.sync_round.wrapping_add(1);
        let round = self.sync_round;
        for (ip, port, vlan, mac) in neighbors {
            let _ = self.set_neighbor_vlan(ip, port, vlan, mac);
        }
        for i in 0..self.meta.len() {
            if let Owner::Neighbor {
                ip,
                in_kernel: true,
                seen,
            } = self.meta[i].owner
            {
                if seen != round {
                    self.remove_neighbor(ip);
                }
            }
        }
    }

    pub fn get(&self, id: NextHopId) -> &NextHop {
        &self.hops[id as usize]
    }

    /// Entries in use.
    pub fn len(&self) -> usize {
        self.hops.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn stats(&self) -> NextHopStats {
        NextHopStats {
            entries: self.len() as u64,
            ..self.stats
        }
    }

    /// Flows holding entry `id`.
    pub fn refs(&self, id: NextHopId) -> u32 {
        self.meta.get(id as usize).map_or(0, |m| m.refs)
    }

    /// A flow starts using entry `id`.
    pub fn acquire(&mut self, id: NextHopId) {
        if let Some(m) = self.meta.get_mut(id as usize) {
            m.refs = m.refs.saturating_add(1);
        }
    }

    /// A flow stops using entry `id`; the entry goes if nothing else needs it.
    pub fn release(&mut self, id: NextHopId) {
        let Some(m) = self.meta.get_mut(id as usize) else {
            return;
        };
        m.refs = m.refs.saturating_sub(1);
        let unused = m.refs == 0
            && matches!(
                m.owner,
                Owner::Learned
                    | Owner::Neighbor {
                        in_kernel: false,
                        ..
                    }
            );
        if unused {
            self.reclaim(id);
        }
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
            Some(&id) => {
                if matches!(
                    self.meta[id as usize].owner,
                    Owner::Neighbor {
                        in_kernel: false,
                        ..
                    }
                ) {
                    // Usable (its flows use it), but the kernel should confirm it.
                    self.queue_miss(neighbor);
                }
                Ok(id)
            }
            None => {
                self.queue_miss(neighbor);
                Err(NextHopError::NoNeighbor)
            }
        }
    }

    /// A re-resolution of existing flows met a neighbour the table does not know yet (it was
    /// queued for resolution): the entry's arrival starts another re-resolution.
    pub fn rehome_incomplete(&mut self) {
        self.rehome_pending = true;
    }

    /// The next hop back to whoever sent a frame on `port` with VLAN tag `vlan` from `mac`.
    /// The entry lives as long as a flow holds it (see [`acquire`](Self::acquire)); one that
    /// no flow takes is reclaimed by [`release_if_unused`](Self::release_if_unused).
    pub fn learn(
        &mut self,
        port: PortId,
        mac: Mac,
        vlan: Option<u16>,
    ) -> Result<NextHopId, NextHopError> {
        let vlan = vlan.map(|v| v & 0x0fff);
        let key = learned_key(port, vlan, mac);
        if let Some(&id) = self.by_learned.get(&key) {
            return Ok(id);
        }
        let hop = NextHop {
            port,
            src_mac: self.port_mac(port),
            dst_mac: mac,
            vlan,
        };
        let id = self.push(hop, Owner::Learned)?;
        self.by_learned.insert(key, id);
        Ok(id)
    }

    /// Reclaims entry `id` if no flow holds it and nothing else keeps it (a learned hop or a
    /// neighbour the kernel dropped): for an entry taken for a flow that was then not created.
    pub fn release_if_unused(&mut self, id: NextHopId) {
        if self.refs(id) == 0 {
            self.acquire(id);
            self.release(id);
        }
    }

    /// Neighbours that were needed but unknown since the last call; the worker asks the kernel
    /// to resolve them.
    pub fn take_misses(&mut self, mut f: impl FnMut(Addr)) {
        for a in self.misses.drain(..) {
            f(a);
        }
    }

    fn queue_miss(&mut self, a: Addr) {
        if self.misses.len() < MAX_PENDING_MISSES && !self.misses.contains(&a) {
            self.misses.push(a);
        }
    }

    fn port_mac(&self, port: PortId) -> Mac {
        self.port_macs.get(port as usize).copied().unwrap_or([0; 6])
    }

    fn push(&mut self, hop: NextHop, owner: Owner) -> Result<NextHopId, NextHopError> {
        let meta = Meta { refs: 0, owner };
        if let Some(id) = self.free.pop() {
            self.hops[id as usize] = hop;
            self.meta[id as usize] = meta;
            return Ok(id);
        }
        if self.hops.len() >= self.capacity {
            self.stats.refused += 1;
            return Err(NextHopError::TableFull);
        }
        self.hops.push(hop);
        self.meta.push(meta);
        Ok((self.hops.len() - 1) as NextHopId)
    }

    fn reclaim(&mut self, id: NextHopId) {
        let i = id as usize;
        match self.meta[i].owner {
            Owner::Free => return,
            Owner::Neighbor { ip, .. } => {
                self.by_ip.remove(&ip);
                self.generation += 1;
            }
            Owner::Learned => {
                let h = self.hops[i];
                self.by_learned
                    .remove(&learned_key(h.port, h.vlan, h.dst_mac));
            }
        }
        self.meta[i] = Meta {
            refs: 0,
            owner: Owner::Free,
        };
        self.free.push(id);
        self.stats.reclaimed += 1;
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
        assert_eq!(n.stats().refused, 1);
    }

    #[test]
    fn the_vlan_is_part_of_a_learned_hop() {
        let mut n = NextHops::new(8);
        let plain = n.learn(0, [1; 6], None).unwrap();
        let v10 = n.learn(0, [1; 6], Some(10)).unwrap();
        let v11 = n.learn(0, [1; 6], Some(11)).unwrap();
        // Only the 12-bit id counts: priority bits do not make another sender.
        assert_eq!(n.learn(0, [1; 6], Some(0x200a)), Ok(v10));
        assert_ne!(plain, v10);
        assert_ne!(v10, v11);
        assert_eq!(n.get(plain).vlan, None);
        assert_eq!(n.get(v10).vlan, Some(10));
        assert_eq!(n.get(v11).vlan, Some(11));
        // Port 0 VLAN 10 is not port 1 VLAN 10.
        assert_ne!(n.learn(1, [1; 6], Some(10)), Ok(v10));
    }

    #[test]
    fn learned_hops_go_with_their_last_flow() {
        let mut n = NextHops::new(4);
        let a = n.learn(0, [1; 6], None).unwrap();
        n.acquire(a);
        n.acquire(a);
        n.release(a);
        assert_eq!(n.len(), 1, "one flow still holds it");
        n.release(a);
        assert_eq!((n.len(), n.stats().reclaimed), (0, 1));
        // The slot is reused, and the old key no longer finds it.
        let b = n.learn(0, [2; 6], Some(7)).unwrap();
        assert_eq!(b, a);
        assert_eq!(n.get(b).dst_mac, [2; 6]);
        let c = n.learn(0, [1; 6], None).unwrap();
        assert_ne!(c, b);
        // Taken for a flow that was then refused: reclaimed at once.
        n.release_if_unused(c);
        assert_eq!((n.len(), n.stats().reclaimed), (1, 2));
    }

    #[test]
    fn spoofed_senders_cannot_fill_the_table_for_good() {
        let mut n = NextHops::new(64);
        // A segment full of made-up source MACs: each creates a flow that then ends.
        for round in 0..10u8 {
            let mut ids = Vec::new();
            for i in 0..64u8 {
                let id = n.learn(0, [2, 0, 0, round, i, 1], None).unwrap();
                n.acquire(id);
                ids.push(id);
            }
            assert_eq!(
                n.learn(0, [2, 0, 0, round, 200, 1], None),
                Err(NextHopError::TableFull),
                "full while their flows live"
            );
            for id in ids {
                n.release(id);
            }
            assert!(n.is_empty());
        }
        let s = n.stats();
        assert_eq!((s.entries, s.reclaimed, s.refused), (0, 640, 10));
        // Neighbours fit again.
        assert!(n
            .set_neighbor(Addr::from_v4_bytes([198, 18, 1, 1]), 0, [9; 6])
            .is_ok());
    }

    #[test]
    fn neighbours_follow_the_kernel_table_but_never_under_a_flow() {
        let mut n = NextHops::new(8);
        n.set_routes(vec![Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 0, None)]);
        let (a, b, c) = (
            Addr::from_v4_bytes([198, 18, 1, 1]),
            Addr::from_v4_bytes([198, 18, 1, 2]),
            Addr::from_v4_bytes([198, 18, 1, 3]),
        );
        n.sync_neighbors([(a, 0, None, [1; 6]), (b, 0, Some(20), [2; 6])]);
        assert_eq!(n.len(), 2);
        let ha = n.resolve(a).unwrap();
        let hb = n.resolve(b).unwrap();
        assert_eq!(n.get(hb).vlan, Some(20));
        n.acquire(ha);
        // The kernel drops both: b goes, a stays for its flow, with its last MAC.
        n.sync_neighbors([(c, 0, None, [3; 6])]);
        assert_eq!(n.len(), 2, "a (held) and c");
        assert_eq!(n.resolve(b), Err(NextHopError::NoNeighbor));
        assert_eq!(n.resolve(a), Ok(ha), "still usable");
        let mut missed = vec![];
        n.take_misses(|x| missed.push(x));
        assert_eq!(missed, vec![b, a], "both asked again");
        // The kernel lists a again, with a new MAC: updated in place, under its flow.
        n.sync_neighbors([(a, 0, None, [4; 6]), (c, 0, None, [3; 6])]);
        assert_eq!(n.resolve(a), Ok(ha));
        assert_eq!(n.get(ha).dst_mac, [4; 6]);
        // Dropped again, then its flow ends: reclaimed.
        n.remove_neighbor(a);
        assert_eq!(n.len(), 2);
        n.release(ha);
        assert_eq!(n.len(), 1);
        assert_eq!(n.stats().reclaimed, 2);
    }

    #[test]
    fn route_epoch_moves_on_real_changes_and_on_awaited_neighbours() {
        let mut n = NextHops::new(8);
        let r = vec![Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 0, None)];
        n.set_routes(r.clone());
        let e = n.route_epoch();
        n.set_routes(r.clone());
        assert_eq!(n.route_epoch(), e, "same routes: nothing to redo");
        n.set_neighbor(Addr::from_v4_bytes([198, 18, 1, 1]), 0, [1; 6])
            .unwrap();
        assert_eq!(n.route_epoch(), e);
        n.rehome_incomplete();
        n.set_neighbor(Addr::from_v4_bytes([198, 18, 1, 1]), 0, [2; 6])
            .unwrap();
        assert_eq!(n.route_epoch(), e, "an update in place is no new neighbour");
        n.set_neighbor(Addr::from_v4_bytes([198, 18, 1, 2]), 0, [2; 6])
            .unwrap();
        assert_eq!(n.route_epoch(), e + 1);
        n.set_routes(vec![Route::v4(Ipv4Addr::new(198, 18, 0, 0), 16, 0, None)]);
        assert_eq!(n.route_epoch(), e + 2);
    }

    #[test]
    fn vlans_allowed_per_port() {
        let mut n = NextHops::new(2);
        n.allow_vlan(1, 100);
        n.allow_vlan(1, 4094);
        assert!(n.vlan_allowed(1, 100));
        assert!(n.vlan_allowed(1, 0x3000 | 100), "priority bits ignored");
        assert!(n.vlan_allowed(1, 4094));
        assert!(!n.vlan_allowed(1, 101));
        assert!(!n.vlan_allowed(0, 100));
        assert!(!n.vlan_allowed(7, 100), "unknown port");
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
