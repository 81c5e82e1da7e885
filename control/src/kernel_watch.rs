//! Following the kernel's neighbours and routes for the workers, from its notifications.
//!
//! [`KernelWatch`] (on the control thread) subscribes to the kernel's neighbour, route and
//! link notifications, then reads the tables once; from there on it applies neighbour
//! notifications one by one, re-reads the route table when a route notification says it
//! changed, and the link table when an interface came or went (a VLAN interface maps to a
//! port only while it exists). A netlink socket can lose notifications under a burst: then
//! (`KernelEvent::Overrun`) it reads all three tables again.
//!
//! What the workers get is a [`KernelView`]: the usable neighbours and the routes, versioned,
//! published in a [`KernelMailbox`] that every worker reads at its next loop iteration. The
//! mailbox holds only the latest view, so updates coalesce and none is ever lost: a worker
//! that is slow, or whose control channel is full, takes the newest view when it gets to it.
//! The lock is held only to swap or clone an `Arc`, and a worker takes it only when the
//! version moved (one atomic load per iteration otherwise).

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use xlb_afxdp::netlink::{
    KernelEvent, Neighbour, Netlink, NetlinkEvents, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE,
    RTNLGRP_LINK, RTNLGRP_NEIGH,
};
use xlb_engine::{net::NextHops, Addr, Route};

use crate::kernel::{self, EngineNeighbour, Port, PortMap, PortVlan};

/// What the engines need of the kernel's tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelView {
    /// Moves on with every published change.
    pub version: u64,
    /// Usable neighbours on xlbd's ports and their allowed VLAN interfaces, sorted.
    pub neighbours: Vec<EngineNeighbour>,
    /// Moves on when `routes` changed (a worker copies them only then).
    pub routes_version: u64,
    pub routes: Vec<Route>,
}

/// The latest [`KernelView`], shared by the control thread (which publishes) and every worker
/// (which takes it when its version moved). Newer views replace older ones: coalesced, never
/// dropped.
#[derive(Debug)]
pub struct KernelMailbox {
    version: AtomicU64,
    latest: Mutex<Arc<KernelView>>,
}

impl KernelMailbox {
    pub fn new(view: KernelView) -> KernelMailbox {
        KernelMailbox {
            version: AtomicU64::new(view.version),
            latest: Mutex::new(Arc::new(view)),
        }
    }

    /// Makes `view` the latest.
    pub fn publish(&self, view: KernelView) {
        let version = view.version;
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
        self.version.store(version, Ordering::Release);
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn latest(&self) -> Arc<KernelView> {
        Arc::clone(&self.latest.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The latest view if its version differs from `applied` (the last one a worker took).
    #[inline]
    pub fn newer_than(&self, applied: u64) -> Option<Arc<KernelView>> {
        (self.version() != applied).then(|| self.latest())
    }
}

/// What one worker last took from the mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub routes_version: u64,
}

/// Hands `view` to an engine's next-hop table: neighbours synchronised in place (flows follow
/// a changed MAC; neighbours the kernel dropped go once no flow uses them), routes replaced
/// when they changed (flows then move to the new next hops).
pub fn apply(net: &mut NextHops, view: &KernelView, applied: &mut Applied) {
    net.sync_neighbors(view.neighbours.iter().copied());
    if view.routes_version != applied.routes_version {
        net.set_routes(view.routes.clone());
        applied.routes_version = view.routes_version;
    }
    applied.version = view.version;
}

/// Notification datagrams read per [`KernelWatch::poll`]: bounds the control thread's time
/// under a flood; what is left waits for the next tick (or overflows into a re-read).
const DATAGRAMS_PER_POLL: usize = 256;

/// What [`KernelWatch::poll`] did since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    pub events: u64,
    /// Full re-reads after lost notifications.
    pub resyncs: u64,
    pub route_reads: u64,
    pub published: u64,
}

/// The control thread's copy of the kernel's tables, kept current from notifications.
#[derive(Debug)]
pub struct KernelWatch {
    nl: Netlink,
    events: NetlinkEvents,
    ports: Vec<Port>,
    vlans: Vec<PortVlan>,
    map: PortMap,
    /// Every neighbour entry of the mapped interfaces, usable or not.
    neighbours: HashMap<(u32, IpAddr), Neighbour>,
    routes: Vec<Route>,
    view: KernelView,
    mailbox: Arc<KernelMailbox>,
    stats: WatchStats,
    /// Neighbours that were usable in the last view and are not in the new one.
    gone: Vec<Addr>,
}

/// What notifications asked for, gathered over one poll.
#[derive(Debug, Default)]
struct Pending {
    neighbours_changed: bool,
    read_routes: bool,
    read_links: bool,
    resync: bool,
}

impl KernelWatch {
    /// Subscribes, then reads links, routes and neighbours, and publishes the first view.
    pub fn start(ports: &[Port], vlans: &[PortVlan]) -> io::Result<KernelWatch> {
        // First subscribe, then read: a change between the two is seen twice, never missed.
        let events = NetlinkEvents::subscribe(&[
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_ROUTE,
            RTNLGRP_LINK,
        ])?;
        let nl = Netlink::open()?;
        let mut w = KernelWatch {
            nl,
            events,
            ports: ports.to_vec(),
            vlans: vlans.to_vec(),
            map: PortMap::new(),
            neighbours: HashMap::new(),
            routes: Vec::new(),
            view: KernelView::default(),
            mailbox: Arc::new(KernelMailbox::new(KernelView::default())),
            stats: WatchStats::default(),
            gone: Vec::new(),
        };
        w.read_all()?;
        w.publish_if_changed();
        Ok(w)
    }

    pub fn mailbox(&self) -> Arc<KernelMailbox> {
        Arc::clone(&self.mailbox)
    }

    /// The view as last published.
    pub fn view(&self) -> &KernelView {
        &self.view
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Whether a usable neighbour entry for `addr` is known.
    pub fn knows(&self, addr: Addr) -> bool {
        self.view.neighbours.iter().any(|n| n.0 == addr)
    }

    pub fn stats(&self) -> WatchStats {
        self.stats
    }

    /// Neighbours that left the view (deleted, failed, garbage-collected by the kernel) since
    /// the last call. The kernel collects entries it does not use itself, and xlbd's traffic
    /// bypasses it: the caller asks it to resolve again those the dataplane needs (members,
    /// gateways), before a new flow has to wait for it.
    pub fn take_gone(&mut self) -> Vec<Addr> {
        std::mem::take(&mut self.gone)
    }

    /// Reads the notifications that arrived (without blocking), applies them, and publishes a
    /// new view if what the engines use changed. Returns whether it published.
    pub fn poll(&mut self) -> io::Result<bool> {
        let mut p = Pending::default();
        let (map, neighbours, stats) = (&self.map, &mut self.neighbours, &mut self.stats);
        self.events.drain(DATAGRAMS_PER_POLL, |e| {
            stats.events += 1;
            match e {
                KernelEvent::Neighbour(n) => {
                    if map.contains_key(&n.ifindex) {
                        neighbours.insert((n.ifindex, n.ip), n);
                        p.neighbours_changed = true;
                    }
                }
                KernelEvent::NeighbourGone(n) => {
                    if neighbours.remove(&(n.ifindex, n.ip)).is_some() {
                        p.neighbours_changed = true;
                    }
                }
                KernelEvent::Route(_) | KernelEvent::RouteGone(_) => p.read_routes = true,
                KernelEvent::Link(_) | KernelEvent::LinkGone(_) => p.read_links = true,
                KernelEvent::Overrun => p.resync = true,
            }
        })?;
        if p.resync {
            self.stats.resyncs += 1;
            self.read_all()?;
        } else {
            if p.read_links && self.read_links()? {
                // Interfaces now count (or no longer do): their neighbours and routes too.
                self.read_neighbours()?;
                p.read_routes = true;
            }
            if p.read_routes {
                self.read_routes()?;
            }
        }
        Ok(self.publish_if_changed())
    }

    fn read_all(&mut self) -> io::Result<()> {
        self.read_links()?;
        self.read_routes()?;
        self.read_neighbours()
    }

    /// Re-reads the links; whether the port map changed.
    fn read_links(&mut self) -> io::Result<bool> {
        let links = self.nl.links()?;
        let map = kernel::port_map(&links, &self.ports, &self.vlans);
        let changed = map != self.map;
        self.map = map;
        Ok(changed)
    }

    fn read_routes(&mut self) -> io::Result<()> {
        self.stats.route_reads += 1;
        self.routes = kernel::routes(&mut self.nl, &self.map)?;
        Ok(())
    }

    fn read_neighbours(&mut self) -> io::Result<()> {
        self.neighbours = self
            .nl
            .neighbours()?
            .into_iter()
            .filter(|n| self.map.contains_key(&n.ifindex))
            .map(|n| ((n.ifindex, n.ip), n))
            .collect();
        Ok(())
    }

    fn publish_if_changed(&mut self) -> bool {
        let mut neighbours: Vec<EngineNeighbour> = self
            .neighbours
            .values()
            .filter_map(|n| kernel::engine_neighbour(n, &self.map))
            .collect();
        neighbours.sort_unstable();
        let routes_changed = self.routes != self.view.routes;
        if neighbours == self.view.neighbours && !routes_changed {
            return false;
        }
        self.view.version += 1;
        for n in &self.view.neighbours {
            // Sorted by address first.
            if neighbours.binary_search_by(|m| m.0.cmp(&n.0)).is_err()
                && !self.gone.contains(&n.0)
                && self.gone.len() < 4096
            {
                self.gone.push(n.0);
            }
        }
        self.view.neighbours = neighbours;
        if routes_changed {
            self.view.routes_version += 1;
            self.view.routes = self.routes.clone();
        }
        self.mailbox.publish(self.view.clone());
        self.stats.published += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn view(version: u64, mac: u8, routes_version: u64) -> KernelView {
        KernelView {
            version,
            neighbours: vec![(
                Addr::from_v4_bytes([198, 18, 1, 11]),
                1,
                None,
                [2, 0, 0, 0, 0, mac],
            )],
            routes_version,
            routes: vec![Route::v4(Ipv4Addr::new(198, 18, 1, 0), 24, 1, None)],
        }
    }

    /// Runs `ip -n NS -batch -` with `commands` (one per line); panics if it fails.
    fn ip_batch(ns: &str, commands: &str) {
        use std::io::Write;
        let mut child = std::process::Command::new("ip")
            .args(["-n", ns, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("running ip(8)");
        let stdin = child.stdin.take().unwrap();
        (&stdin).write_all(commands.as_bytes()).unwrap();
        drop(stdin);
        assert!(child.wait().unwrap().success(), "ip -batch: {commands}");
    }

    /// A namespace with one veth pair (`w0` with 198.18.1.1/24, and `w1`), deleted on drop.
    struct Netns(String);

    impl Netns {
        fn new() -> Netns {
            let name = format!("xkw{}", std::process::id());
            let ok = std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip netns add {name}");
            let ns = Netns(name);
            // No IPv6 here: its link-local address and routes appear a while after the link
            // comes up, and their route notifications would land in the middle of the test.
            let ok = std::process::Command::new("ip")
                .args(["netns", "exec", &ns.0, "sysctl", "-qw"])
                .args([
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "sysctl disable_ipv6 in {}", ns.0);
            ip_batch(
                &ns.0,
                "link add w0 type veth peer name w1\nlink set w0 up\nlink set w1 up\n\
                 link set lo up\naddr add 198.18.1.1/24 dev w0\n",
            );
            // The carrier comes up asynchronously; wait for it so that its link notification
            // is not read as part of the test either.
            let up = (0..300).any(|_| {
                let up = std::process::Command::new("ip")
                    .args(["-n", &ns.0, "-o", "link", "show", "w0"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("state UP"));
                if !up {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                up
            });
            assert!(up, "w0 in {} never came up", ns.0);
            ns
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    /// Polls until `done` holds for the published view (3 s at most).
    fn until(w: &mut KernelWatch, what: &str, done: impl Fn(&KernelView) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            w.poll().unwrap();
            if done(w.view()) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("{what}: not seen in 3 s; view {:#?}", w.view());
    }

    #[test]
    fn the_watch_follows_neighbours_and_routes_from_notifications() {
        if !xlb_afxdp::sys::is_root() {
            eprintln!(
                "SKIP the_watch_follows_neighbours_and_routes_from_notifications: needs root"
            );
            return;
        }
        let ns = Netns::new();
        let path = xlb_afxdp::sys::named_netns(&ns.0);
        let name = ns.0.clone();
        std::thread::spawn(move || {
            xlb_afxdp::sys::enter_netns(&path).unwrap();
            let ip = |cmds: &str| ip_batch(&name, cmds);
            let links = Netlink::open().unwrap().links().unwrap();
            let ports = kernel::ports(&links, &["w0".into()]).unwrap();
            let mut w = KernelWatch::start(&ports, &[]).unwrap();
            let reads = w.stats().route_reads;
            let b = Addr::from_v4_bytes([198, 18, 1, 11]);
            let mac = |v: &KernelView| v.neighbours.iter().find(|n| n.0 == b).map(|n| n.3);

            ip("neigh add 198.18.1.11 lladdr 02:00:00:00:0b:01 dev w0 nud permanent");
            until(&mut w, "new neighbour", |v| mac(v) == Some([2, 0, 0, 0, 0xb, 1]));
            ip("neigh replace 198.18.1.11 lladdr 02:00:00:00:0b:02 dev w0 nud permanent");
            until(&mut w, "changed MAC", |v| mac(v) == Some([2, 0, 0, 0, 0xb, 2]));
            // A neighbour on an interface that is not a port does not count.
            ip("neigh add 198.18.9.9 lladdr 02:00:00:00:0b:09 dev w1 nud permanent\n\
                neigh del 198.18.1.11 dev w0");
            until(&mut w, "deleted neighbour", |v| mac(v).is_none());
            assert!(w.view().neighbours.is_empty(), "{:?}", w.view().neighbours);
            assert_eq!(w.take_gone(), vec![b], "to be resolved again if needed");
            assert!(w.take_gone().is_empty());
            assert_eq!(w.stats().route_reads, reads, "no route read for neighbours");

            ip("route add 198.19.0.0/16 via 198.18.1.254");
            let via = Route::v4(
                Ipv4Addr::new(198, 19, 0, 0),
                16,
                0,
                Some(Ipv4Addr::new(198, 18, 1, 254)),
            );
            until(&mut w, "new route", |v| v.routes.contains(&via));
            let rv = w.view().routes_version;
            ip("route del 198.19.0.0/16");
            until(&mut w, "deleted route", |v| !v.routes.contains(&via));
            assert_eq!(w.view().routes_version, rv + 1);

            // Lost notifications: everything read again, nothing wrong afterwards.
            w.events.set_receive_buffer(0).unwrap();
            let burst: String = (1..=200)
                .map(|i| {
                    format!("neigh add 198.18.1.{i} lladdr 02:00:00:00:0c:{i:02x} dev w0 nud permanent\n")
                })
                .collect();
            ip(&(burst + "neigh del 198.18.1.7 dev w0\n"));
            until(&mut w, "all 199 after a resync", |v| v.neighbours.len() == 199);
            assert!(w.stats().resyncs >= 1, "{:?}", w.stats());
            assert!(!w.knows(Addr::from_v4_bytes([198, 18, 1, 7])));
        })
        .join()
        .expect("namespace thread");
        drop(ns);
    }

    #[test]
    fn the_mailbox_keeps_only_the_latest_and_says_when_it_moved() {
        let mb = KernelMailbox::new(view(1, 1, 1));
        assert!(mb.newer_than(1).is_none());
        for v in 2..=50 {
            mb.publish(view(v, v as u8, 1));
        }
        let latest = mb.newer_than(1).expect("moved on");
        assert_eq!(latest.version, 50);
        assert_eq!(latest.neighbours[0].3, [2, 0, 0, 0, 0, 50]);
        assert!(mb.newer_than(50).is_none());
    }

    #[test]
    fn applying_a_view_updates_neighbours_in_place_and_routes_only_when_they_changed() {
        let mut net = NextHops::new(16);
        let mut applied = Applied::default();
        apply(&mut net, &view(1, 1, 1), &mut applied);
        assert_eq!(
            applied,
            Applied {
                version: 1,
                routes_version: 1
            }
        );
        let b = Addr::from_v4_bytes([198, 18, 1, 11]);
        let id = net.resolve(b).unwrap();
        let epoch = net.route_epoch();
        apply(&mut net, &view(2, 9, 1), &mut applied);
        assert_eq!(net.resolve(b), Ok(id), "same entry");
        assert_eq!(net.get(id).dst_mac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(net.route_epoch(), epoch, "routes untouched");
        let mut v = view(3, 9, 2);
        v.routes
            .push(Route::v4(Ipv4Addr::new(198, 19, 0, 0), 16, 1, None));
        apply(&mut net, &v, &mut applied);
        assert_eq!(net.routes().len(), 2);
        assert_ne!(net.route_epoch(), epoch);
        // A view without the neighbour: gone (no flow holds it).
        v.version = 4;
        v.neighbours.clear();
        apply(&mut net, &v, &mut applied);
        assert!(net.is_empty());
    }
}
