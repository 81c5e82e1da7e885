//! SNAT port allocation for outbound rules, one allocator per worker.
//!
//! A flow holds its SNAT port for life (and for the release time after FIN/RST, which the flow's
//! linger implements), so the allocator is a bitmap of ports in use per (frontend address,
//! protocol): TCP and UDP have separate port spaces, as on the wire.
//! Ports are partitioned between workers by `port % workers == worker`: the worker that owns a
//! translated port can be computed from the port alone, which is how return traffic finds the
//! worker that holds the flow (docs/architecture.md, "both directions on one worker").

use std::collections::HashMap;

use crate::addr::Addr;
use crate::ruleset::PortBlock;

const WORDS: usize = 65536 / 64;

/// Ports in use per frontend address, for this worker's share of every block.
#[derive(Debug)]
pub struct SnatPorts {
    worker: u16,
    workers: u16,
    in_use: HashMap<(Addr, u8), Box<[u64; WORDS]>>,
}

impl SnatPorts {
    pub fn new(worker: u16, workers: u16) -> SnatPorts {
        SnatPorts {
            worker,
            workers: workers.max(1),
            in_use: HashMap::new(),
        }
    }

    /// The worker that owns SNAT port `port`.
    pub fn owner(port: u16, workers: u16) -> u16 {
        port % workers.max(1)
    }

    /// Takes a free port of this worker's share of `blocks`, starting the search at a point
    /// derived from `hint` so that concurrent connections spread over the block.
    pub fn allocate(&mut self, blocks: &[PortBlock], proto: u8, hint: u64) -> Option<(Addr, u16)> {
        let share = |b: &PortBlock| self.share_len(b);
        let total: u32 = blocks.iter().map(share).sum();
        if total == 0 {
            return None;
        }
        let start = (hint % total as u64) as u32;
        for step in 0..total {
            let mut k = (start + step) % total;
            for b in blocks {
                let n = self.share_len(b);
                if k < n {
                    let port = self.share_port(b, k);
                    let bits = self
                        .in_use
                        .entry((b.addr, proto))
                        .or_insert_with(|| Box::new([0; WORDS]));
                    let (w, m) = (port as usize / 64, 1u64 << (port % 64));
                    if bits[w] & m == 0 {
                        bits[w] |= m;
                        return Some((b.addr, port));
                    }
                    break;
                }
                k -= n;
            }
        }
        None
    }

    /// Marks a port as in use (a flow that already holds it).
    pub fn reserve(&mut self, addr: Addr, proto: u8, port: u16) {
        let bits = self
            .in_use
            .entry((addr, proto))
            .or_insert_with(|| Box::new([0; WORDS]));
        bits[port as usize / 64] |= 1 << (port % 64);
    }

    pub fn release(&mut self, addr: Addr, proto: u8, port: u16) {
        if let Some(bits) = self.in_use.get_mut(&(addr, proto)) {
            bits[port as usize / 64] &= !(1 << (port % 64));
        }
    }

    pub fn is_used(&self, addr: Addr, proto: u8, port: u16) -> bool {
        self.in_use
            .get(&(addr, proto))
            .is_some_and(|b| b[port as usize / 64] & (1 << (port % 64)) != 0)
    }

    /// Ports of `blocks` in use on this worker for `proto`.
    pub fn used_in(&self, blocks: &[PortBlock], proto: u8) -> u32 {
        blocks
            .iter()
            .map(|b| {
                (0..self.share_len(b))
                    .filter(|&k| self.is_used(b.addr, proto, self.share_port(b, k)))
                    .count() as u32
            })
            .sum()
    }

    /// Ports of `blocks` that belong to this worker.
    pub fn share_of(&self, blocks: &[PortBlock]) -> u32 {
        blocks.iter().map(|b| self.share_len(b)).sum()
    }

    /// How many ports of block `b` this worker owns.
    fn share_len(&self, b: &PortBlock) -> u32 {
        let (w, n) = (self.worker as u32, self.workers as u32);
        let first = b.first_port as u32;
        let end = first + b.count as u32;
        // First port >= first with port % n == w.
        let offset = (w + n - first % n) % n;
        let start = first + offset;
        if start >= end {
            0
        } else {
            (end - start).div_ceil(n)
        }
    }

    fn share_port(&self, b: &PortBlock, k: u32) -> u16 {
        let (w, n) = (self.worker as u32, self.workers as u32);
        let first = b.first_port as u32;
        let offset = (w + n - first % n) % n;
        (first + offset + k * n) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn block(first: u16, count: u16) -> PortBlock {
        PortBlock {
            addr: Ipv4Addr::new(198, 18, 100, 1).into(),
            first_port: first,
            count,
        }
    }

    #[test]
    fn allocates_every_port_once_then_exhausts() {
        let mut s = SnatPorts::new(0, 1);
        let b = [block(1024, 16)];
        let mut got: Vec<u16> = (0..16)
            .map(|i| s.allocate(&b, 6, i * 7).unwrap().1)
            .collect();
        got.sort();
        assert_eq!(got, (1024..1040).collect::<Vec<_>>());
        assert_eq!(s.allocate(&b, 6, 3), None);
        assert_eq!(s.used_in(&b, 6), 16);
        assert_eq!(s.used_in(&b, 17), 0, "UDP has its own port space");
        assert!(s.allocate(&b, 17, 0).is_some());
        s.release(b[0].addr, 6, 1030);
        assert_eq!(s.allocate(&b, 6, 0), Some((b[0].addr, 1030)));
    }

    #[test]
    fn workers_partition_ports_by_modulo() {
        let b = [block(1024, 8), block(2048, 8)];
        let mut all = vec![];
        for w in 0..3 {
            let mut s = SnatPorts::new(w, 3);
            while let Some((_, p)) = s.allocate(&b, 6, 0) {
                assert_eq!(SnatPorts::owner(p, 3), w);
                all.push(p);
            }
            assert_eq!(s.used_in(&b, 6), s.share_of(&b));
        }
        all.sort();
        let want: Vec<u16> = (1024..1032).chain(2048..2056).collect();
        assert_eq!(all, want);
    }
}
