//! One TCP connection through the lab's engine: both endpoints' builders, their next sequence
//! numbers, and the exact RSTs that reset on idle must send to each end.

use std::net::IpAddr;

use super::flags::*;
use super::*;

/// A connection through the engine: both endpoints' builders and next sequence numbers.
pub struct Conn {
    pub client: Tcp,
    pub backend: Tcp,
    /// Next sequence number each side will send.
    pub c_seq: u32,
    pub s_seq: u32,
    /// Where the SYN went: the backend's address (the frontend's with floating IP) and MAC.
    pub backend_ip: IpAddr,
    pub backend_mac: [u8; 6],
}

/// The MAC address of the lab's backend at `ip` (B1 or B2).
pub fn backend_mac(ip: IpAddr) -> [u8; 6] {
    if ip == IpAddr::from(B1) {
        B1_MAC
    } else {
        B2_MAC
    }
}

impl Conn {
    /// Three-way handshake from `client` (initial sequence numbers 1000 and 70 000); checks
    /// that each segment goes where it should and that the SYN-ACK comes from the frontend.
    pub fn open(lab: &mut Lab, client: Tcp) -> Conn {
        Conn::open_with(lab, client, 1000, 70_000)
    }

    /// As [`Conn::open`], with initial sequence numbers `c_isn` and `s_isn`.
    pub fn open_with(lab: &mut Lab, client: Tcp, c_isn: u32, s_isn: u32) -> Conn {
        let (port, syn_out) = lab.forward(CLIENT_PORT, client.seg(SYN, c_isn, 0, &[]));
        assert_eq!(port, BACKEND_PORT);
        let syn = seen(&syn_out);
        let backend = Tcp::reply_to(&syn, syn.dst_mac, XLB_MAC[1]);
        let c_next = c_isn.wrapping_add(1);
        let s_next = s_isn.wrapping_add(1);
        let (port, synack_out) =
            lab.forward(BACKEND_PORT, backend.seg(SYN | ACK, s_isn, c_next, &[]));
        assert_eq!(port, CLIENT_PORT);
        let synack = seen(&synack_out);
        assert_eq!((synack.src, synack.sport), (client.dst, client.dport));
        let (port, _) = lab.forward(CLIENT_PORT, client.seg(ACK, c_next, s_next, &[]));
        assert_eq!(port, BACKEND_PORT);
        Conn {
            client,
            backend,
            c_seq: c_next,
            s_seq: s_next,
            backend_ip: syn.dst,
            backend_mac: syn.dst_mac,
        }
    }

    /// The client sends `data`; returns what the backend receives.
    pub fn client_sends(&mut self, lab: &mut Lab, data: &[u8]) -> Seen {
        let (port, out) = lab.forward(
            CLIENT_PORT,
            self.client.seg(ACK | PSH, self.c_seq, self.s_seq, data),
        );
        assert_eq!(port, BACKEND_PORT);
        self.c_seq = self.c_seq.wrapping_add(data.len() as u32);
        seen(&out)
    }

    /// The backend sends `data`; returns what the client receives.
    pub fn backend_sends(&mut self, lab: &mut Lab, data: &[u8]) -> Seen {
        let (port, out) = lab.forward(
            BACKEND_PORT,
            self.backend.seg(ACK | PSH, self.s_seq, self.c_seq, data),
        );
        assert_eq!(port, CLIENT_PORT);
        self.s_seq = self.s_seq.wrapping_add(data.len() as u32);
        seen(&out)
    }

    /// The RSTs reset on idle must send, built independently of the engine: to the client as
    /// if from `from` (the frontend), to the backend as if from the client, each with the
    /// sequence number its receiver expects.
    pub fn expected_rsts(&self, from: (IpAddr, u16), to_backend: (IpAddr, u16)) -> [Vec<u8>; 2] {
        [
            expected_rst(
                (XLB_MAC[0], CLIENT_MAC),
                from,
                (self.client.src, self.client.sport),
                self.s_seq,
                self.c_seq,
            ),
            expected_rst(
                (XLB_MAC[1], self.backend_mac),
                (self.client.src, self.client.sport),
                to_backend,
                self.c_seq,
                self.s_seq,
            ),
        ]
    }

    /// [`Conn::expected_rsts`] for a flow from VIP:`dport` to the backend's port 8080, with
    /// the port each goes out of.
    pub fn expected_idle_rsts(&self, dport: u16) -> [(PortId, Vec<u8>); 2] {
        let [to_client, to_backend] =
            self.expected_rsts((VIP.into(), dport), (self.backend_ip, 8080));
        [(CLIENT_PORT, to_client), (BACKEND_PORT, to_backend)]
    }
}

/// Three-way handshake from the client's port `sport` to VIP:`dport`.
pub fn establish(lab: &mut Lab, dport: u16, sport: u16) -> Conn {
    Conn::open(lab, Tcp::client(dport, sport))
}
