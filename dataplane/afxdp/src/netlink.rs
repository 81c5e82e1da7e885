//! Reading the kernel's links, addresses, neighbours and routes over rtnetlink, and following
//! their changes ([`NetlinkEvents`]: a socket subscribed to the kernel's notifications).
//!
//! Why raw `libc` netlink rather than `netlink-packet-route` + `netlink-sys`: we need four
//! dump requests and a handful of attributes, synchronously, from a worker-adjacent thread.
//! The parsing is ~200 lines of safe slice code that we test byte for byte below; the
//! crates would add six dependencies (with their own `bitflags`/`thiserror` majors and a
//! message model that changes every minor release) to what must stay a small, auditable
//! unsafe edge. The only unsafe here is four syscalls on a socket we own.
//!
//! Everything works inside a network namespace: a netlink socket answers for the namespace
//! of the thread that created it (unlike `/sys/class/net`, which keeps showing the mount
//! namespace's view after `setns()`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

// rtnetlink constants (include/uapi/linux/rtnetlink.h, neighbour.h, if_link.h, if_addr.h).
// Spelled out rather than taken from `libc` because several are missing there.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VLAN_ID: u16 = 1;
const IFLA_VLAN_PROTOCOL: u16 = 5;
const ETH_P_8021Q: u16 = 0x8100;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;

const NLA_TYPE_MASK: u16 = 0x3fff;

/// `RT_TABLE_MAIN`: the table `ip route` shows by default.
pub const RT_TABLE_MAIN: u32 = 254;
/// `RTN_UNICAST`: a route to a gateway or a directly connected network.
pub const RTN_UNICAST: u8 = 1;
/// `RTN_LOCAL`: one of the host's own addresses.
pub const RTN_LOCAL: u8 = 2;

/// Multicast groups of rtnetlink notifications (`RTNLGRP_*`), for [`NetlinkEvents`].
pub const RTNLGRP_LINK: u32 = 1;
pub const RTNLGRP_NEIGH: u32 = 3;
pub const RTNLGRP_IPV4_ROUTE: u32 = 7;
pub const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// One network interface (RTM_NEWLINK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// `None` for links without an Ethernet address (loopback has all zeroes, tunnels none).
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// `IFF_*` flags (`IFF_UP` = 1).
    pub flags: u32,
    /// The interface this one is stacked on (`IFLA_LINK`: a VLAN interface's parent).
    pub parent: Option<u32>,
    /// For an 802.1Q VLAN interface (`ip link add link eth0 name eth0.100 type vlan id
    /// 100`), its VLAN id; `None` for anything else, 802.1ad (QinQ) interfaces included.
    pub vlan: Option<u16>,
}

/// One address configured on an interface (RTM_NEWADDR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// Neighbour cache states (`NUD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeighState(pub u16);

impl NeighState {
    pub const INCOMPLETE: u16 = 0x01;
    pub const REACHABLE: u16 = 0x02;
    pub const STALE: u16 = 0x04;
    pub const DELAY: u16 = 0x08;
    pub const PROBE: u16 = 0x10;
    pub const FAILED: u16 = 0x20;
    pub const NOARP: u16 = 0x40;
    pub const PERMANENT: u16 = 0x80;

    /// Whether the MAC can be used to send: STALE, DELAY and PROBE entries still hold the
    /// last known address (the kernel would use them too while it re-validates).
    pub fn is_usable(self) -> bool {
        self.0 & (Self::REACHABLE | Self::STALE | Self::DELAY | Self::PROBE | Self::PERMANENT) != 0
    }
}

/// One neighbour cache entry (RTM_NEWNEIGH): IPv4 ARP or IPv6 ND.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    /// Absent while INCOMPLETE or FAILED.
    pub mac: Option<[u8; 6]>,
    pub state: NeighState,
}

/// One next hop of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: Option<u32>,
    pub gateway: Option<IpAddr>,
}

/// One route (RTM_NEWROUTE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix_len: u8,
    pub table: u32,
    /// `RTN_*` (unicast, local, broadcast, ...).
    pub kind: u8,
    pub priority: u32,
    /// One entry for an ordinary route, several for ECMP (`RTA_MULTIPATH`).
    pub nexthops: Vec<NextHop>,
}

impl Route {
    /// Whether `ip` falls inside this route's prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.dst, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_match(&net.octets(), &ip.octets(), self.prefix_len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_match(&net.octets(), &ip.octets(), self.prefix_len)
            }
            _ => false,
        }
    }
}

fn prefix_match(net: &[u8], ip: &[u8], len: u8) -> bool {
    let len = usize::from(len).min(net.len() * 8);
    let full = len / 8;
    if net[..full] != ip[..full] {
        return false;
    }
    let rest = len % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    net[full] & mask == ip[full] & mask
}

/// The route the kernel would pick for `dst` among unicast routes of the main table:
/// longest prefix first, then the lowest metric. Policy routing is out of scope.
pub fn lookup_route(routes: &[Route], dst: IpAddr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| r.table == RT_TABLE_MAIN && r.kind == RTN_UNICAST && r.contains(dst))
        .min_by(|a, b| {
            b.prefix_len
                .cmp(&a.prefix_len)
                .then(a.priority.cmp(&b.priority))
        })
}

/// An rtnetlink socket in the calling thread's network namespace.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

/// Dumps are retried this many times when the kernel flags them inconsistent
/// (`NLM_F_DUMP_INTR`: the table changed while it was being walked).
const DUMP_ATTEMPTS: usize = 5;

impl Netlink {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A dump that never finishes must not hang the caller forever.
        let tv = libc::timeval {
            tv_sec: Duration::from_secs(5).as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval and its size is passed alongside.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            seq: 1,
            buf: vec![0; 64 * 1024],
        })
    }

    /// All interfaces of the namespace.
    pub fn links(&mut self) -> io::Result<Vec<Link>> {
        let mut out = Vec::new();
        // struct ifinfomsg: family, pad, type, index, flags, change
        let hdr = [0u8; 16];
        self.dump(RTM_GETLINK, &hdr, |ty, payload| {
            if ty == RTM_NEWLINK {
                out.extend(parse_link(payload));
            }
        })?;
        Ok(out)
    }

    pub fn link_by_name(&mut self, name: &str) -> io::Result<Link> {
        self.links()?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no interface named {name}"),
                )
            })
    }

    pub fn link_by_index(&mut self, ifindex: u32) -> io::Result<Link> {
        self.links()?
            .into_iter()
            .find(|l| l.ifindex == ifindex)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no interface {ifindex}"))
            })
    }

    /// All IPv4 and IPv6 addresses of the namespace.
    pub fn addresses(&mut self) -> io::Result<Vec<IfAddr>> {
        let mut out = Vec::new();
        // struct ifaddrmsg: family, prefixlen, flags, scope, index
        let hdr = [0u8; 8];
        self.dump(RTM_GETADDR, &hdr, |ty, payload| {
            if ty == RTM_NEWADDR {
                out.extend(parse_addr(payload));
            }
        })?;
        Ok(out)
    }

    /// The IPv4 (ARP) and IPv6 (ND) neighbour caches.
    pub fn neighbours(&mut self) -> io::Result<Vec<Neighbour>> {
        let mut out = Vec::new();
        // One dump per family: AF_UNSPEC would also walk the bridge FDB.
        for family in [AF_INET, AF_INET6] {
            // struct ndmsg: family, pad1, pad2, ifindex, state, flags, type
            let mut hdr = [0u8; 12];
            hdr[0] = family;
            self.dump(RTM_GETNEIGH, &hdr, |ty, payload| {
                if ty == RTM_NEWNEIGH {
                    out.extend(parse_neigh(payload));
                }
            })?;
        }
        Ok(out)
    }

    /// IPv4 and IPv6 routes of every table.
    pub fn routes(&mut self) -> io::Result<Vec<Route>> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
            let mut hdr = [0u8; 12];
            hdr[0] = family;
            self.dump(RTM_GETROUTE, &hdr, |ty, payload| {
                if ty == RTM_NEWROUTE {
                    out.extend(parse_route(payload));
                }
            })?;
        }
        Ok(out)
    }

    fn dump(
        &mut self,
        msg_type: u16,
        family_hdr: &[u8],
        mut on_msg: impl FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        let mut collected: Vec<(u16, Vec<u8>)> = Vec::new();
        for _ in 0..DUMP_ATTEMPTS {
            collected.clear();
            if !self.dump_once(msg_type, family_hdr, &mut collected)? {
                for (ty, payload) in &collected {
                    on_msg(*ty, payload);
                }
                return Ok(());
            }
        }
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "netlink dump kept changing under us",
        ))
    }

    /// One dump request; `Ok(true)` when the kernel reported it interrupted.
    fn dump_once(
        &mut self,
        msg_type: u16,
        family_hdr: &[u8],
        out: &mut Vec<(u16, Vec<u8>)>,
    ) -> io::Result<bool> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let req = encode_request(msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, family_hdr);
        // SAFETY: `req` is a valid buffer of `req.len()` bytes; a null address sends to
        // the kernel, the peer of an unconnected netlink socket.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut interrupted = false;
        loop {
            // SAFETY: `self.buf` is a valid writable buffer of the length passed.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = n as usize;
            if n > self.buf.len() {
                // MSG_TRUNC reports the real size: grow and redo the whole dump.
                self.buf.resize(n.next_power_of_two(), 0);
                return Ok(true);
            }
            for msg in Messages::new(&self.buf[..n]) {
                let msg = msg?;
                if msg.seq != seq {
                    continue; // a late answer to an earlier request
                }
                if msg.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match msg.ty {
                    NLMSG_DONE => return Ok(interrupted),
                    NLMSG_ERROR => {
                        let code = msg
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EPROTO);
                        if code == 0 {
                            return Ok(interrupted); // an ACK
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    ty => out.push((ty, msg.payload.to_vec())),
                }
                if msg.flags & NLM_F_MULTI == 0 {
                    return Ok(interrupted);
                }
            }
        }
    }
}

/// `nlmsghdr` + family header, as a dump request.
pub(crate) fn encode_request(msg_type: u16, flags: u16, seq: u32, family_hdr: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + family_hdr.len();
    let mut v = Vec::with_capacity(align4(len));
    v.extend_from_slice(&(len as u32).to_ne_bytes());
    v.extend_from_slice(&msg_type.to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills ours in
    v.extend_from_slice(family_hdr);
    v.resize(align4(len), 0);
    v
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink message inside a receive buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// Iterator over the messages of one datagram; yields an error on a malformed header.
pub(crate) struct Messages<'a> {
    buf: &'a [u8],
}

impl<'a> Messages<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = io::Result<Message<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32_at(self.buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > self.buf.len() {
            self.buf = &[];
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("netlink message length {len} out of bounds"),
            )));
        }
        let msg = Message {
            ty: u16_at(self.buf, 4),
            flags: u16_at(self.buf, 6),
            seq: u32_at(self.buf, 8),
            payload: &self.buf[NLMSG_HDRLEN..len],
        };
        self.buf = &self.buf[align4(len).min(self.buf.len())..];
        Some(Ok(msg))
    }
}

/// Iterator over the `rtattr`s of a payload; stops at the first malformed one.
pub(crate) struct Attrs<'a> {
    buf: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16_at(self.buf, 0));
        if len < 4 || len > self.buf.len() {
            self.buf = &[];
            return None;
        }
        let item = (u16_at(self.buf, 2) & NLA_TYPE_MASK, &self.buf[4..len]);
        self.buf = &self.buf[align4(len).min(self.buf.len())..];
        Some(item)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn attr_u32(v: &[u8]) -> Option<u32> {
    (v.len() >= 4).then(|| u32_at(v, 0))
}

fn attr_ip(family: u8, v: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => {
            let o: [u8; 4] = v.get(..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(o)))
        }
        AF_INET6 => {
            let o: [u8; 16] = v.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

fn attr_mac(v: &[u8]) -> Option<[u8; 6]> {
    if v.len() != 6 {
        return None;
    }
    v.try_into().ok()
}

fn unspecified(family: u8) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => None,
    }
}

/// Payload of RTM_NEWLINK: `ifinfomsg` (16 bytes) + attributes.
pub(crate) fn parse_link(p: &[u8]) -> Option<Link> {
    if p.len() < 16 {
        return None;
    }
    let mut link = Link {
        ifindex: u32_at(p, 4),
        name: String::new(),
        mac: None,
        mtu: 0,
        flags: u32_at(p, 8),
        parent: None,
        vlan: None,
    };
    for (ty, v) in Attrs::new(&p[16..]) {
        match ty {
            IFLA_IFNAME => {
                let v = v.split(|&b| b == 0).next().unwrap_or(v);
                link.name = String::from_utf8_lossy(v).into_owned();
            }
            IFLA_ADDRESS => link.mac = attr_mac(v),
            IFLA_MTU => link.mtu = attr_u32(v).unwrap_or(0),
            IFLA_LINK => link.parent = attr_u32(v).filter(|&i| i != 0),
            IFLA_LINKINFO => link.vlan = parse_vlan_info(v),
            _ => {}
        }
    }
    Some(link)
}

/// `IFLA_LINKINFO` of a link: its 802.1Q VLAN id if it is a VLAN interface of that protocol.
fn parse_vlan_info(v: &[u8]) -> Option<u16> {
    let mut is_vlan = false;
    let (mut id, mut protocol) = (None, ETH_P_8021Q);
    for (ty, a) in Attrs::new(v) {
        match ty {
            IFLA_INFO_KIND => is_vlan = a.split(|&b| b == 0).next() == Some(b"vlan"),
            IFLA_INFO_DATA => {
                for (ty, d) in Attrs::new(a) {
                    match ty {
                        IFLA_VLAN_ID if d.len() >= 2 => id = Some(u16_at(d, 0) & 0x0fff),
                        // Network byte order (`__be16`).
                        IFLA_VLAN_PROTOCOL if d.len() >= 2 => {
                            protocol = u16::from_be_bytes([d[0], d[1]]);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if is_vlan && protocol == ETH_P_8021Q {
        id
    } else {
        None
    }
}

/// Payload of RTM_NEWADDR: `ifaddrmsg` (8 bytes) + attributes.
pub(crate) fn parse_addr(p: &[u8]) -> Option<IfAddr> {
    if p.len() < 8 {
        return None;
    }
    let family = p[0];
    let prefix_len = p[1];
    let ifindex = u32_at(p, 4);
    let (mut local, mut address) = (None, None);
    for (ty, v) in Attrs::new(&p[8..]) {
        match ty {
            IFA_LOCAL => local = attr_ip(family, v),
            IFA_ADDRESS => address = attr_ip(family, v),
            _ => {}
        }
    }
    // On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is always ours.
    Some(IfAddr {
        ifindex,
        addr: local.or(address)?,
        prefix_len,
    })
}

/// Payload of RTM_NEWNEIGH: `ndmsg` (12 bytes) + attributes.
pub(crate) fn parse_neigh(p: &[u8]) -> Option<Neighbour> {
    if p.len() < 12 {
        return None;
    }
    let family = p[0];
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let ifindex = u32_at(p, 4);
    let state = NeighState(u16_at(p, 8));
    let (mut ip, mut mac) = (None, None);
    for (ty, v) in Attrs::new(&p[12..]) {
        match ty {
            NDA_DST => ip = attr_ip(family, v),
            NDA_LLADDR => mac = attr_mac(v),
            _ => {}
        }
    }
    Some(Neighbour {
        ifindex,
        ip: ip?,
        mac,
        state,
    })
}

/// Payload of RTM_NEWROUTE: `rtmsg` (12 bytes) + attributes.
pub(crate) fn parse_route(p: &[u8]) -> Option<Route> {
    if p.len() < 12 {
        return None;
    }
    let family = p[0];
    let mut route = Route {
        dst: unspecified(family)?,
        prefix_len: p[1],
        table: u32::from(p[4]),
        kind: p[7],
        priority: 0,
        nexthops: Vec::new(),
    };
    let mut single = NextHop {
        ifindex: None,
        gateway: None,
    };
    for (ty, v) in Attrs::new(&p[12..]) {
        match ty {
            RTA_DST => route.dst = attr_ip(family, v)?,
            RTA_OIF => single.ifindex = attr_u32(v),
            RTA_GATEWAY => single.gateway = attr_ip(family, v),
            RTA_PRIORITY => route.priority = attr_u32(v).unwrap_or(0),
            // rtm_table is 8 bits; ids above 255 only travel in RTA_TABLE
            RTA_TABLE => route.table = attr_u32(v).unwrap_or(route.table),
            RTA_MULTIPATH => route.nexthops.extend(parse_multipath(family, v)),
            _ => {}
        }
    }
    if route.nexthops.is_empty() {
        route.nexthops.push(single);
    }
    Some(route)
}

/// RTA_MULTIPATH: a list of `rtnexthop` (len u16, flags u8, hops u8, ifindex i32) each
/// followed by its own attributes.
fn parse_multipath(family: u8, mut v: &[u8]) -> Vec<NextHop> {
    let mut out = Vec::new();
    while v.len() >= 8 {
        let len = usize::from(u16_at(v, 0));
        if len < 8 || len > v.len() {
            break;
        }
        let mut nh = NextHop {
            ifindex: Some(u32_at(v, 4)),
            gateway: None,
        };
        for (ty, a) in Attrs::new(&v[8..len]) {
            if ty == RTA_GATEWAY {
                nh.gateway = attr_ip(family, a);
            }
        }
        out.push(nh);
        v = &v[align4(len).min(v.len())..];
    }
    out
}

/// One change the kernel announced on a [`NetlinkEvents`] socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    /// A neighbour entry was created or changed (state, MAC): RTM_NEWNEIGH.
    Neighbour(Neighbour),
    /// A neighbour entry was deleted: RTM_DELNEIGH.
    NeighbourGone(Neighbour),
    Route(Route),
    RouteGone(Route),
    Link(Link),
    LinkGone(Link),
    /// Notifications were lost (the socket's receive buffer overflowed, `ENOBUFS`, or a
    /// datagram did not fit): what the caller knows may be stale; it should read the tables
    /// again.
    Overrun,
}

/// The event a notification message carries, if it is one of ours.
pub(crate) fn parse_event(ty: u16, payload: &[u8]) -> Option<KernelEvent> {
    Some(match ty {
        RTM_NEWNEIGH => KernelEvent::Neighbour(parse_neigh(payload)?),
        RTM_DELNEIGH => KernelEvent::NeighbourGone(parse_neigh(payload)?),
        RTM_NEWROUTE => KernelEvent::Route(parse_route(payload)?),
        RTM_DELROUTE => KernelEvent::RouteGone(parse_route(payload)?),
        RTM_NEWLINK => KernelEvent::Link(parse_link(payload)?),
        RTM_DELLINK => KernelEvent::LinkGone(parse_link(payload)?),
        _ => return None,
    })
}

/// A non-blocking rtnetlink socket subscribed to notification groups (`RTNLGRP_*`) of the
/// calling thread's network namespace.
///
/// Subscribe *before* reading the tables with [`Netlink`]: a change made between the dump
/// and the subscription would otherwise be missed. A netlink socket can lose notifications
/// (a burst larger than its receive buffer): that is reported as [`KernelEvent::Overrun`],
/// after which the caller reads the tables again.
#[derive(Debug)]
pub struct NetlinkEvents {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// Receive buffer asked for by [`NetlinkEvents::subscribe`]: room for tens of thousands of
/// notifications between two reads.
const EVENTS_RCVBUF: usize = 4 << 20;

impl NetlinkEvents {
    pub fn subscribe(groups: &[u32]) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Bound explicitly, with a port id the kernel picks: an unbound socket has port id 0,
        // the kernel's own, and would not be sent the kernel's notifications.
        // SAFETY: sockaddr_nl is plain old data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and its size is passed alongside.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        for &group in groups {
            let g = group as libc::c_int;
            // SAFETY: `g` is a valid c_int and its size is passed alongside.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_NETLINK,
                    libc::NETLINK_ADD_MEMBERSHIP,
                    (&g as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let events = Self {
            fd,
            buf: vec![0; 64 * 1024],
        };
        events.set_receive_buffer(EVENTS_RCVBUF)?;
        Ok(events)
    }

    /// Sets the socket's receive buffer: beyond the system's limit when the process may
    /// (CAP_NET_ADMIN), else as far as that limit allows. Smaller means overruns sooner.
    pub fn set_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        let v = bytes.min(libc::c_int::MAX as usize / 2) as libc::c_int;
        let set = |opt| {
            // SAFETY: `v` is a valid c_int and its size is passed alongside.
            unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(libc::SO_RCVBUFFORCE) == 0 || set(libc::SO_RCVBUF) == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Reads what has arrived, without blocking, at most `max_datagrams` datagrams (each
    /// holds one or more notifications), and hands every event to `f` in the kernel's
    /// order. Returns the number of datagrams read: `max_datagrams` means more may wait.
    pub fn drain(
        &mut self,
        max_datagrams: usize,
        mut f: impl FnMut(KernelEvent),
    ) -> io::Result<usize> {
        let mut read = 0;
        while read < max_datagrams {
            // SAFETY: `self.buf` is a valid writable buffer of the length passed.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => break,
                    // Reported once per overflow; the socket goes on receiving.
                    Some(libc::ENOBUFS) => {
                        f(KernelEvent::Overrun);
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            read += 1;
            let n = n as usize;
            if n > self.buf.len() {
                // Cut off: its events are lost. Make room for the next one that big.
                self.buf.resize(n.next_power_of_two(), 0);
                f(KernelEvent::Overrun);
                continue;
            }
            for msg in Messages::new(&self.buf[..n]) {
                let Ok(msg) = msg else {
                    f(KernelEvent::Overrun);
                    break;
                };
                if let Some(ev) = parse_event(msg.ty, msg.payload) {
                    f(ev);
                }
            }
        }
        Ok(read)
    }
}

impl AsRawFd for NetlinkEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, v: &[u8]) -> Vec<u8> {
        let len = 4 + v.len();
        let mut out = Vec::new();
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(v);
        out.resize(align4(len), 0);
        out
    }

    fn msg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = encode_request(ty, flags, seq, payload);
        m.truncate(NLMSG_HDRLEN + payload.len());
        m.resize(align4(m.len()), 0);
        m
    }

    #[test]
    fn request_header_layout() {
        let r = encode_request(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 7, &[AF_INET; 12]);
        assert_eq!(r.len(), 28);
        assert_eq!(u32_at(&r, 0), 28);
        assert_eq!(u16_at(&r, 4), RTM_GETNEIGH);
        assert_eq!(u16_at(&r, 6), 0x301);
        assert_eq!(u32_at(&r, 8), 7);
        assert_eq!(u32_at(&r, 12), 0);
    }

    #[test]
    fn messages_walk_and_reject_bad_length() {
        let mut buf = msg(RTM_NEWNEIGH, NLM_F_MULTI, 3, &[1, 2, 3]);
        buf.extend(msg(NLMSG_DONE, NLM_F_MULTI, 3, &[0; 4]));
        let all: Vec<_> = Messages::new(&buf).map(|m| m.unwrap()).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].ty, RTM_NEWNEIGH);
        assert_eq!(all[0].payload, &[1, 2, 3]);
        assert_eq!(all[1].ty, NLMSG_DONE);

        let mut bad = msg(RTM_NEWNEIGH, 0, 1, &[0; 8]);
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        let mut it = Messages::new(&bad);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }

    #[test]
    fn attrs_stop_on_truncation() {
        let mut b = attr(1, &[9, 9, 9, 9]);
        b.extend(attr(2, &[1, 2, 3, 4, 5, 6]));
        let all: Vec<_> = Attrs::new(&b).collect();
        assert_eq!(
            all,
            vec![(1, &[9u8, 9, 9, 9][..]), (2, &[1u8, 2, 3, 4, 5, 6][..])]
        );
        let cut = &b[..b.len() - 4];
        assert_eq!(Attrs::new(cut).count(), 1);
        // nested flag bits are masked off
        let nested = attr(0x8000 | 9, &[]);
        assert_eq!(Attrs::new(&nested).next().unwrap().0, 9);
    }

    #[test]
    fn neighbour_ipv4_and_ipv6() {
        let mut p = vec![AF_INET, 0, 0, 0];
        p.extend_from_slice(&5u32.to_ne_bytes());
        p.extend_from_slice(&NeighState::PERMANENT.to_ne_bytes());
        p.extend_from_slice(&[0, 1]);
        p.extend(attr(NDA_DST, &[198, 18, 1, 2]));
        p.extend(attr(NDA_LLADDR, &[2, 0, 0, 0, 0, 7]));
        let n = parse_neigh(&p).unwrap();
        assert_eq!(n.ifindex, 5);
        assert_eq!(n.ip, "198.18.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 7]));
        assert!(n.state.is_usable());

        let ip6: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let mut p = vec![AF_INET6, 0, 0, 0];
        p.extend_from_slice(&9u32.to_ne_bytes());
        p.extend_from_slice(&NeighState::INCOMPLETE.to_ne_bytes());
        p.extend_from_slice(&[0, 1]);
        p.extend(attr(NDA_DST, &ip6.octets()));
        let n = parse_neigh(&p).unwrap();
        assert_eq!(n.ip, IpAddr::V6(ip6));
        assert_eq!(n.mac, None);
        assert!(!n.state.is_usable());

        // bridge FDB entries (AF_BRIDGE = 7) are not neighbours
        let mut p = vec![7, 0, 0, 0];
        p.extend_from_slice(&[0; 8]);
        assert!(parse_neigh(&p).is_none());
        assert!(parse_neigh(&[AF_INET; 4]).is_none());
    }

    #[test]
    fn link_attributes() {
        let mut p = vec![0, 0, 1, 0];
        p.extend_from_slice(&3u32.to_ne_bytes());
        p.extend_from_slice(&1u32.to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes());
        p.extend(attr(IFLA_IFNAME, b"veth0\0"));
        p.extend(attr(IFLA_ADDRESS, &[2, 1, 2, 3, 4, 5]));
        p.extend(attr(IFLA_MTU, &1500u32.to_ne_bytes()));
        let l = parse_link(&p).unwrap();
        assert_eq!(
            l,
            Link {
                ifindex: 3,
                name: "veth0".into(),
                mac: Some([2, 1, 2, 3, 4, 5]),
                mtu: 1500,
                flags: 1,
                parent: None,
                vlan: None,
            }
        );
    }

    fn link_payload(ifindex: u32, name: &[u8], extra: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 0, 1, 0];
        p.extend_from_slice(&ifindex.to_ne_bytes());
        p.extend_from_slice(&1u32.to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes());
        p.extend(attr(IFLA_IFNAME, name));
        p.extend(attr(IFLA_ADDRESS, &[2, 1, 2, 3, 4, 5]));
        p.extend_from_slice(extra);
        p
    }

    fn linkinfo(kind: &[u8], id: u16, protocol: Option<u16>) -> Vec<u8> {
        let mut data = attr(IFLA_VLAN_ID, &id.to_ne_bytes());
        if let Some(proto) = protocol {
            data.extend(attr(IFLA_VLAN_PROTOCOL, &proto.to_be_bytes()));
        }
        let mut info = attr(IFLA_INFO_KIND, kind);
        info.extend(attr(0x8000 | IFLA_INFO_DATA, &data));
        attr(0x8000 | IFLA_LINKINFO, &info)
    }

    #[test]
    fn vlan_interfaces_name_their_parent_and_id() {
        let mut extra = attr(IFLA_LINK, &3u32.to_ne_bytes());
        extra.extend(linkinfo(b"vlan\0", 100, Some(0x8100)));
        let l = parse_link(&link_payload(9, b"veth0.100\0", &extra)).unwrap();
        assert_eq!((l.parent, l.vlan), (Some(3), Some(100)));
        // Without a protocol attribute: 802.1Q.
        let l = parse_link(&link_payload(9, b"v\0", &linkinfo(b"vlan\0", 7, None))).unwrap();
        assert_eq!(l.vlan, Some(7));
        // 802.1ad (QinQ) and other kinds are not 802.1Q VLANs.
        let l = parse_link(&link_payload(
            9,
            b"v\0",
            &linkinfo(b"vlan\0", 7, Some(0x88a8)),
        ))
        .unwrap();
        assert_eq!(l.vlan, None);
        let l = parse_link(&link_payload(9, b"v\0", &linkinfo(b"vxlan\0", 7, None))).unwrap();
        assert_eq!(l.vlan, None);
        // A veth names its peer's index in IFLA_LINK too; 0 means none.
        let extra = attr(IFLA_LINK, &0u32.to_ne_bytes());
        let l = parse_link(&link_payload(9, b"v\0", &extra)).unwrap();
        assert_eq!((l.parent, l.vlan), (None, None));
    }

    #[test]
    fn notifications_become_events() {
        let mut neigh = vec![AF_INET, 0, 0, 0];
        neigh.extend_from_slice(&5u32.to_ne_bytes());
        neigh.extend_from_slice(&NeighState::STALE.to_ne_bytes());
        neigh.extend_from_slice(&[0, 1]);
        neigh.extend(attr(NDA_DST, &[198, 18, 1, 2]));
        neigh.extend(attr(NDA_LLADDR, &[2, 0, 0, 0, 0, 7]));
        let n = parse_neigh(&neigh).unwrap();
        assert_eq!(
            parse_event(RTM_NEWNEIGH, &neigh),
            Some(KernelEvent::Neighbour(n.clone()))
        );
        assert_eq!(
            parse_event(RTM_DELNEIGH, &neigh),
            Some(KernelEvent::NeighbourGone(n))
        );
        let route = route_payload(Some([198, 18, 2, 0]), 24, None, 3);
        let r = parse_route(&route).unwrap();
        assert_eq!(
            parse_event(RTM_NEWROUTE, &route),
            Some(KernelEvent::Route(r.clone()))
        );
        assert_eq!(
            parse_event(RTM_DELROUTE, &route),
            Some(KernelEvent::RouteGone(r))
        );
        let link = link_payload(4, b"eth0\0", &[]);
        assert!(matches!(
            parse_event(RTM_DELLINK, &link),
            Some(KernelEvent::LinkGone(Link { ifindex: 4, .. }))
        ));
        assert_eq!(parse_event(RTM_NEWADDR, &[0; 8]), None);
        assert_eq!(parse_event(RTM_NEWNEIGH, &[0; 3]), None, "short payload");
    }

    #[test]
    fn address_prefers_local() {
        let mut p = vec![AF_INET, 24, 0, 0];
        p.extend_from_slice(&4u32.to_ne_bytes());
        p.extend(attr(IFA_ADDRESS, &[198, 18, 9, 9]));
        p.extend(attr(IFA_LOCAL, &[198, 18, 1, 1]));
        let a = parse_addr(&p).unwrap();
        assert_eq!(a.addr, "198.18.1.1".parse::<IpAddr>().unwrap());
        assert_eq!((a.prefix_len, a.ifindex), (24, 4));
    }

    fn route_payload(dst: Option<[u8; 4]>, len: u8, gw: Option<[u8; 4]>, oif: u32) -> Vec<u8> {
        let mut p = vec![AF_INET, len, 0, 0, RT_TABLE_MAIN as u8, 4, 0, RTN_UNICAST];
        p.extend_from_slice(&0u32.to_ne_bytes());
        if let Some(d) = dst {
            p.extend(attr(RTA_DST, &d));
        }
        if let Some(g) = gw {
            p.extend(attr(RTA_GATEWAY, &g));
        }
        p.extend(attr(RTA_OIF, &oif.to_ne_bytes()));
        p
    }

    #[test]
    fn routes_parse_and_lookup() {
        let default = parse_route(&route_payload(None, 0, Some([198, 18, 1, 254]), 2)).unwrap();
        assert_eq!(default.dst, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(
            default.nexthops,
            vec![NextHop {
                ifindex: Some(2),
                gateway: Some("198.18.1.254".parse().unwrap())
            }]
        );
        let net = parse_route(&route_payload(Some([198, 18, 2, 0]), 24, None, 3)).unwrap();
        let host = parse_route(&route_payload(Some([198, 18, 2, 7]), 32, None, 4)).unwrap();
        let mut local = net.clone();
        local.kind = RTN_LOCAL;
        local.prefix_len = 32;
        let routes = vec![default.clone(), net.clone(), host.clone(), local];
        let pick = |s: &str| lookup_route(&routes, s.parse().unwrap()).cloned();
        assert_eq!(pick("198.18.2.7"), Some(host));
        assert_eq!(pick("198.18.2.8"), Some(net));
        assert_eq!(pick("198.19.0.1"), Some(default));
        assert_eq!(pick("2001:db8::1"), None);
    }

    #[test]
    fn route_table_attribute_and_multipath() {
        let mut p = vec![AF_INET6, 64, 0, 0, 252, 4, 0, RTN_UNICAST];
        p.extend_from_slice(&0u32.to_ne_bytes());
        let dst: Ipv6Addr = "2001:db8:5::".parse().unwrap();
        p.extend(attr(RTA_DST, &dst.octets()));
        p.extend(attr(RTA_TABLE, &1000u32.to_ne_bytes()));
        p.extend(attr(RTA_PRIORITY, &1024u32.to_ne_bytes()));
        let gw1: Ipv6Addr = "2001:db8::a".parse().unwrap();
        let gw2: Ipv6Addr = "2001:db8::b".parse().unwrap();
        let mut mp = Vec::new();
        for (gw, ifindex) in [(gw1, 7u32), (gw2, 8u32)] {
            let a = attr(RTA_GATEWAY, &gw.octets());
            let len = 8 + a.len();
            mp.extend_from_slice(&(len as u16).to_ne_bytes());
            mp.extend_from_slice(&[0, 0]);
            mp.extend_from_slice(&ifindex.to_ne_bytes());
            mp.extend(a);
        }
        p.extend(attr(RTA_MULTIPATH, &mp));
        let r = parse_route(&p).unwrap();
        assert_eq!(r.table, 1000);
        assert_eq!(r.priority, 1024);
        assert_eq!(r.prefix_len, 64);
        assert_eq!(r.dst, IpAddr::V6(dst));
        assert_eq!(r.nexthops.len(), 2);
        assert_eq!(r.nexthops[1].ifindex, Some(8));
        assert_eq!(r.nexthops[1].gateway, Some(IpAddr::V6(gw2)));
        assert!(r.contains("2001:db8:5::99".parse().unwrap()));
        assert!(!r.contains("2001:db8:6::99".parse().unwrap()));
    }

    #[test]
    fn prefix_match_edges() {
        assert!(prefix_match(&[198, 18, 0, 0], &[203, 0, 113, 3], 0));
        assert!(prefix_match(&[198, 18, 0, 0], &[198, 19, 255, 1], 15));
        assert!(!prefix_match(&[198, 18, 0, 0], &[198, 20, 0, 1], 15));
        assert!(prefix_match(&[1, 2, 3, 4], &[1, 2, 3, 4], 32));
        assert!(!prefix_match(&[1, 2, 3, 4], &[1, 2, 3, 5], 32));
        // a bogus prefix length is clamped rather than indexing out of bounds
        assert!(prefix_match(&[1, 2, 3, 4], &[1, 2, 3, 4], 200));
    }
}
