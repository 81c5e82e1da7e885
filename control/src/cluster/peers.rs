//! Heartbeats between the nodes of a cluster: one small UDP datagram per interval to every
//! peer, saying who sends it, the fingerprint of its configuration and whether it announces
//! its frontends. From them each node knows which peers are alive, whether their
//! configuration is the same as its own, and when the set of announcing nodes — what the
//! router spreads flows over — changed.
//!
//! The datagram is one line of text: `xlb-cluster 1 node=NAME fp=HEX announcing=0|1`.
//! Datagrams from addresses that are not configured peers are ignored (counted).

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

/// What one heartbeat says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    pub node: String,
    pub fingerprint: String,
    pub announcing: bool,
}

impl Beat {
    pub fn encode(&self) -> String {
        format!(
            "xlb-cluster 1 node={} fp={} announcing={}\n",
            self.node,
            self.fingerprint,
            u8::from(self.announcing)
        )
    }

    /// Parses a heartbeat; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Beat> {
        let text = std::str::from_utf8(bytes).ok()?.trim_end();
        let mut words = text.split(' ');
        if words.next()? != "xlb-cluster" || words.next()? != "1" {
            return None;
        }
        let (mut node, mut fp, mut announcing) = (None, None, None);
        for w in words {
            match w.split_once('=')? {
                ("node", v) if !v.is_empty() && v.len() <= 64 => node = Some(v.to_string()),
                ("fp", v) if v.len() <= 32 => fp = Some(v.to_string()),
                ("announcing", "0") => announcing = Some(false),
                ("announcing", "1") => announcing = Some(true),
                _ => return None,
            }
        }
        Some(Beat {
            node: node?,
            fingerprint: fp?,
            announcing: announcing?,
        })
    }
}

/// A configured peer and what was last heard from it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub last: Option<(Instant, Beat)>,
}

impl Peer {
    pub fn alive(&self, now: Instant, dead_after: Duration) -> bool {
        self.last
            .as_ref()
            .is_some_and(|(t, _)| now.duration_since(*t) < dead_after)
    }
}

/// The heartbeat socket and the peers.
#[derive(Debug)]
pub struct Peers {
    socket: UdpSocket,
    pub peers: Vec<Peer>,
    pub strangers: u64,
    next_send: Instant,
    interval: Duration,
}

impl Peers {
    pub fn bind(
        listen: SocketAddr,
        peers: &[SocketAddr],
        interval: Duration,
    ) -> std::io::Result<Peers> {
        let socket = UdpSocket::bind(listen)?;
        socket.set_nonblocking(true)?;
        Ok(Peers {
            socket,
            peers: peers
                .iter()
                .map(|&addr| Peer { addr, last: None })
                .collect(),
            strangers: 0,
            next_send: Instant::now(),
            interval,
        })
    }

    /// Reads what arrived (bounded), and sends our heartbeat when it is due.
    pub fn poll(&mut self, now: Instant, me: &Beat) {
        let mut buf = [0u8; 256];
        for _ in 0..256 {
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let Some(beat) = Beat::decode(&buf[..n]) else {
                        self.strangers += 1;
                        continue;
                    };
                    match self.peers.iter_mut().find(|p| p.addr.ip() == from.ip()) {
                        Some(p) => p.last = Some((now, beat)),
                        None => self.strangers += 1,
                    }
                }
                Err(_) => break,
            }
        }
        if now >= self.next_send {
            self.next_send = now + self.interval;
            let line = me.encode();
            for p in &self.peers {
                // A peer that is down refuses or drops it: that is what the heartbeat finds out.
                let _ = self.socket.send_to(line.as_bytes(), p.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_round_trip_and_garbage_is_refused() {
        let b = Beat {
            node: "n1".into(),
            fingerprint: "00ff00ff00ff00ff".into(),
            announcing: true,
        };
        assert_eq!(Beat::decode(b.encode().as_bytes()), Some(b));
        for bad in [
            &b"xlb-cluster 2 node=a fp=1 announcing=1"[..],
            b"xlb-cluster 1 node=a fp=1 announcing=2",
            b"xlb-cluster 1 node= fp=1 announcing=1",
            b"xlb-cluster 1 node=a announcing=1",
            b"hello",
            b"\xff\xfe",
        ] {
            assert_eq!(Beat::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn peers_hear_each_other_over_loopback() {
        let a_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let probe = UdpSocket::bind(a_addr).unwrap();
        let b_addr = probe.local_addr().unwrap();
        drop(probe);
        let mut a = Peers::bind(
            "127.0.0.1:0".parse().unwrap(),
            &[b_addr],
            Duration::from_millis(10),
        )
        .unwrap();
        let a_local = a.socket.local_addr().unwrap();
        let mut b = Peers::bind(b_addr, &[a_local], Duration::from_millis(10)).unwrap();
        let beat = |n: &str| Beat {
            node: n.into(),
            fingerprint: "ab".into(),
            announcing: n == "a",
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            let now = Instant::now();
            a.poll(now, &beat("a"));
            b.poll(now, &beat("b"));
            if a.peers[0].last.is_some() && b.peers[0].last.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            a.peers[0].last.as_ref().map(|(_, b)| b.node.as_str()),
            Some("b")
        );
        let heard = &b.peers[0].last.as_ref().unwrap().1;
        assert!(heard.announcing);
        assert!(b.peers[0].alive(Instant::now(), Duration::from_secs(1)));
    }
}
