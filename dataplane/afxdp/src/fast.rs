//! The user-space side of the XDP fast path (`src/bpf/xlb_fast.h`): the shared table
//! `xlb_fast` mapped into this process, the interfaces' fast-path port and flag, the egress
//! devmap `xlb_tx`, and the program's fast-path counters.
//!
//! The table is one `BPF_F_MMAPABLE` array of 64-byte elements, sized before the program is
//! loaded ([`crate::XdpProgram::load_with`]); its layout (header, index, lines) is the
//! engine's, which fills it. Here it is only memory: [`map_fast_table`] maps it once and for
//! the life of the process and hands out the words as atomics.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::AtomicU32,
};

use libbpf_rs::{libbpf_sys, MapCore, MapFlags, MapHandle};

use crate::{
    error::{Error, Result},
    xdp::AttachMode,
};

/// Bytes of one element of `xlb_fast` (the map's value size).
pub const FAST_ELEMENT_BYTES: usize = 64;
/// Reasons in `xlb_fast_stats` (keep in sync with the C).
const FAST_REASONS: u32 = 14;

/// Maps the whole of `xlb_fast` (shared with the program) and leaks the mapping: the table
/// lives as long as the process, one per daemon. Word `i` is bytes `4i..4i+4`.
pub(crate) fn map_fast_table(map: &MapHandle) -> Result<&'static [AtomicU32]> {
    if map.value_size() as usize != FAST_ELEMENT_BYTES {
        return Err(Error::msg("xlb_fast: unexpected element size"));
    }
    let (ptr, bytes) = crate::pinned::map_array(map, "xlb_fast")?;
    // SAFETY: the mapping holds `bytes` bytes, page-aligned (so aligned for u32), readable
    // and writable, and never unmapped (leaked on purpose), hence valid for 'static; the
    // kernel side only accesses it with atomic instructions or single aligned loads and
    // stores, and user space only through these atomics.
    Ok(unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<AtomicU32>(), bytes / 4) })
}

/// The fast-path counters of the program, summed over CPUs: frames forwarded, and frames
/// punted to the dataplane by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastStats {
    pub forwarded: u64,
    /// No published line for the frame's flow (within the probe limit).
    pub miss: u64,
    /// The line is there but not (or no longer) forwardable.
    pub not_fast: u64,
    /// A TCP segment outside the window (the dataplane counts and drops it).
    pub window: u64,
    /// A partial checksum over a message too long to complete in XDP.
    pub checksum_too_long: u64,
    /// No egress interface for the flow's port in `xlb_tx`.
    pub no_tx: u64,
    /// Not a candidate: not IPv4, VLAN, IP options, fragment, TTL, TCP flags, other protocol.
    pub not_eligible: u64,
    /// Arrived on another port than the flow's (anti-spoofing).
    pub wrong_port: u64,
    /// SYNs of new flows XDP forwarded itself (handed to the owning worker's ring).
    pub new_forwarded: u64,
    /// A SYN for no rule whose new flows XDP may open.
    pub new_no_rule: u64,
    /// A SYN for such a rule that arrived on another port than the rule's.
    pub new_wrong_port: u64,
    /// A SYN whose Maglev slot has no member XDP may send to.
    pub new_no_member: u64,
    /// A SYN whose owning worker's ring was full (or lost to other CPUs).
    pub new_ring_full: u64,
    /// A SYN while XDP may not open new flows (the section is being rewritten, or off).
    pub new_off: u64,
}

/// Frames and bytes one direction of one rule forwarded on the fast path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastRuleCount {
    pub rule: u16,
    /// 0: original direction, 1: reply.
    pub dir: u8,
    pub packets: u64,
    pub bytes: u64,
}

/// A handle on the program's fast-path maps for another thread: the interfaces' port and
/// FAST flag, the egress devmap, the counters. Interfaces are named by ifindex; only those the
/// program was attached to when the handle was made are known to it.
///
/// `xlb_tx` resolves an ifindex in the network namespace of the thread that writes it: call
/// [`set_tx_port`](Self::set_tx_port) from a thread inside the interfaces' namespace.
#[derive(Debug)]
pub struct XdpFastControl {
    pub(crate) ifaces: MapHandle,
    pub(crate) tx: MapHandle,
    pub(crate) counts: MapHandle,
    pub(crate) stats: MapHandle,
    pub(crate) modes: HashMap<u32, AttachMode>,
}

impl XdpFastControl {
    /// Gives interface `ifindex` the dataplane port id `port` and turns its fast path on or
    /// off. Returns whether it is on: never on an interface attached generically (the skb's
    /// checksum metadata would go stale under the rewrite).
    pub fn set_fast_port(&self, ifindex: u32, port: u32, fast: bool) -> Result<bool> {
        let mode = *self
            .modes
            .get(&ifindex)
            .ok_or_else(|| Error::msg(format!("not attached to ifindex {ifindex}")))?;
        set_fast_port(&self.ifaces, ifindex, mode, port, fast)
    }

    /// Points dataplane port `port` at interface `ifindex` of the calling thread's namespace.
    pub fn set_tx_port(&self, port: u32, ifindex: u32) -> Result<()> {
        set_tx_port(&self.tx, port, ifindex)
    }

    /// Empties `port`'s devmap entry (its flows are punted); `Ok` also when it was empty.
    pub fn clear_tx_port(&self, port: u32) -> Result<()> {
        clear_tx_port(&self.tx, port)
    }

    /// The per-reason counters summed over CPUs.
    pub fn stats(&self) -> Result<FastStats> {
        read_stats(&self.stats)
    }

    /// The per-rule, per-direction counters summed over CPUs; only those that moved.
    pub fn rule_counts(&self) -> Result<Vec<FastRuleCount>> {
        read_rule_counts(&self.counts)
    }
}

pub(crate) fn set_fast_port(
    ifaces: &MapHandle,
    ifindex: u32,
    mode: AttachMode,
    port: u32,
    fast: bool,
) -> Result<bool> {
    let _serial = crate::xdp::IFACE_WRITES
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut v = crate::xdp::read_iface(ifaces, ifindex)?
        .ok_or_else(|| Error::msg(format!("no xlb_ifaces entry for ifindex {ifindex}")))?;
    let on = fast && mode == AttachMode::Native;
    v.port = port;
    v.flags = (v.flags & !crate::xdp::IFACE_FAST) | if on { crate::xdp::IFACE_FAST } else { 0 };
    crate::xdp::put_iface(ifaces, ifindex, v)?;
    Ok(on)
}

pub(crate) fn set_tx_port(tx: &MapHandle, port: u32, ifindex: u32) -> Result<()> {
    if port >= tx.max_entries() {
        return Err(Error::msg(format!(
            "port {port} beyond xlb_tx's {} entries",
            tx.max_entries()
        )));
    }
    tx.update(&port.to_ne_bytes(), &ifindex.to_ne_bytes(), MapFlags::ANY)
        .map_err(|e| Error::with(format!("xlb_tx[{port}] = ifindex {ifindex}"), e))
}

pub(crate) fn clear_tx_port(tx: &MapHandle, port: u32) -> Result<()> {
    match tx.delete(&port.to_ne_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::with(format!("clearing xlb_tx[{port}]"), e)),
    }
}

pub(crate) fn read_stats(stats: &MapHandle) -> Result<FastStats> {
    let v = sum_percpu_u64(stats, 1)?;
    let at = |i: u32| v.get(i as usize).copied().unwrap_or(0);
    debug_assert_eq!(v.len(), FAST_REASONS as usize);
    Ok(FastStats {
        forwarded: at(0),
        miss: at(1),
        not_fast: at(2),
        window: at(3),
        checksum_too_long: at(4),
        no_tx: at(5),
        not_eligible: at(6),
        wrong_port: at(7),
        new_forwarded: at(8),
        new_no_rule: at(9),
        new_wrong_port: at(10),
        new_no_member: at(11),
        new_ring_full: at(12),
        new_off: at(13),
    })
}

pub(crate) fn read_rule_counts(counts: &MapHandle) -> Result<Vec<FastRuleCount>> {
    let v = sum_percpu_u64(counts, 2)?;
    Ok(v.chunks_exact(2)
        .enumerate()
        .filter_map(|(key, pb)| match *pb {
            [packets, bytes] if packets != 0 || bytes != 0 => Some(FastRuleCount {
                rule: u16::try_from(key / 2).ok()?,
                dir: (key % 2) as u8,
                packets,
                bytes,
            }),
            _ => None,
        })
        .collect())
}

/// Every entry of a per-CPU array whose values are `fields` u64s, summed over CPUs: `fields`
/// u64s per key, in key order. Read in batches (one `bpf()` call per 256 keys).
pub(crate) fn sum_percpu_u64(map: &MapHandle, fields: usize) -> Result<Vec<u64>> {
    const BATCH: u32 = 256;
    let value_size = map.value_size() as usize;
    if value_size != fields * 8 {
        return Err(Error::msg("per-CPU counters: unexpected value size"));
    }
    // SAFETY: no preconditions; it reads /sys once and caches the answer.
    let cpus = usize::try_from(unsafe { libbpf_sys::libbpf_num_possible_cpus() })
        .map_err(|_| Error::msg("counting the possible CPUs"))?;
    let entries = map.max_entries() as usize;
    let mut out = vec![0u64; entries * fields];
    let mut keys = vec![0u32; BATCH as usize];
    // Each CPU's copy of a value is rounded up to 8 bytes: `fields` u64s exactly.
    let mut values = vec![0u64; BATCH as usize * cpus * fields];
    let opts = libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as libbpf_sys::size_t,
        ..Default::default()
    };
    let mut cursor = 0u32;
    let mut first = true;
    loop {
        let mut next = 0u32;
        let mut count = BATCH;
        let in_batch: *mut libc::c_void = if first {
            std::ptr::null_mut()
        } else {
            (&mut cursor as *mut u32).cast()
        };
        // SAFETY: `keys` holds `count` keys of 4 bytes and `values` `count` per-CPU values of
        // `cpus * value_size` bytes; the batch cursors are u32 (an array's key); `opts` is
        // properly sized; all outlive the call.
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                in_batch,
                (&mut next as *mut u32).cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        if rc < 0 && -rc != libc::ENOENT {
            return Err(Error::with(
                format!("reading {}", map.name().to_string_lossy()),
                std::io::Error::from_raw_os_error(-rc),
            ));
        }
        for (k, key) in keys.iter().take(count as usize).enumerate() {
            let key = *key as usize;
            for cpu in 0..cpus {
                for f in 0..fields {
                    let v = values
                        .get((k * cpus + cpu) * fields + f)
                        .copied()
                        .unwrap_or(0);
                    if let Some(o) = out.get_mut(key * fields + f) {
                        *o = o.wrapping_add(v);
                    }
                }
            }
        }
        if rc < 0 || count == 0 {
            return Ok(out);
        }
        cursor = next;
        first = false;
    }
}
