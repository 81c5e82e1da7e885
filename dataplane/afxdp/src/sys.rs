//! Small safe wrappers over the few libc calls the rest of xlb needs from this crate, so
//! that every other crate (and this crate's tests and binary) can stay free of `unsafe`.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

/// Asks the CPU to start loading the cache line at `addr` (any address: a prefetch never
/// faults and reads nothing the program sees). No-op off x86_64.
#[inline(always)]
pub fn prefetch(addr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is an SSE instruction, part of the x86_64 baseline, and does not
    // dereference `addr` in any way the program can observe (no fault, no value).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// CLOCK_MONOTONIC in nanoseconds: the worker's `now`. Read once per loop iteration.
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether the effective user is root (tests that need namespaces skip otherwise).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// RLIMIT_MEMLOCK soft limit in bytes, `None` when unlimited.
pub fn memlock_limit() -> io::Result<Option<u64>> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur))
}

const CAP_IPC_LOCK: u32 = 14;

/// Whether this process holds CAP_IPC_LOCK, which exempts UMEM pages from RLIMIT_MEMLOCK.
pub fn has_cap_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// How many bytes of UMEM this process may lock: `None` when unbounded.
pub fn memlock_budget() -> io::Result<Option<u64>> {
    if has_cap_ipc_lock() {
        return Ok(None);
    }
    memlock_limit()
}

// Capability bits (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The capabilities this process lacks to load XDP programs and open AF_XDP sockets, by
/// name (empty: none missing).
pub fn missing_xdp_capabilities() -> Vec<&'static str> {
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .unwrap_or(0);
    missing_from(caps)
}

fn missing_from(caps: u64) -> Vec<&'static str> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_NET_RAW) {
        missing.push("CAP_NET_RAW");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    missing
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
pub(crate) fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Sends `sig` to process `pid` (only processes the caller started, by their id).
pub fn signal_process(pid: u32, sig: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    if pid <= 0 {
        // 0 and negatives address process groups: never what a caller of this means.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a single pid",
        ));
    }
    // SAFETY: kill(2) with a positive pid only affects that process.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// SIGTERM, re-exported so callers need no libc.
pub const SIGTERM: i32 = libc::SIGTERM;
/// SIGINT, re-exported so callers need no libc.
pub const SIGINT: i32 = libc::SIGINT;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_sig: libc::c_int) {
    // An atomic store is async-signal-safe; the workers poll this flag.
    STOP.store(true, Ordering::SeqCst);
}

/// Installs SIGINT and SIGTERM handlers that set the returned flag, for binaries whose
/// workers run until told to stop.
pub fn stop_flag_on_signals() -> io::Result<&'static AtomicBool> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let handler = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only performs an async-signal-safe atomic store.
        let prev = unsafe { libc::signal(sig, handler) };
        if prev == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(&STOP)
}

/// Moves the calling thread into the network namespace at `path` (e.g.
/// `/run/netns/<name>`). Threads it spawns afterwards start there too; other threads of the
/// process are unaffected.
pub fn enter_netns(path: impl AsRef<Path>) -> io::Result<()> {
    let f = std::fs::File::open(path.as_ref())?;
    setns_fd(f.as_fd())
}

/// The path of a namespace created by `ip netns add <name>`.
pub fn named_netns(name: &str) -> std::path::PathBuf {
    Path::new("/run/netns").join(name)
}

fn setns_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is an open namespace file; CLONE_NEWNET makes the kernel check its type.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_parsing() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        let caps = parse_cap_eff(s).unwrap();
        assert!(caps & (1 << CAP_IPC_LOCK) != 0);
        let s = "CapEff:\t0000000000000000\n";
        assert_eq!(parse_cap_eff(s), Some(0));
        assert_eq!(parse_cap_eff("nothing here"), None);
    }

    #[test]
    fn monotonic_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }

    #[test]
    fn missing_capabilities_are_named() {
        assert!(missing_from(u64::MAX).is_empty());
        assert_eq!(
            missing_from(0),
            ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF (or CAP_SYS_ADMIN)"]
        );
        let admin_raw_sys = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW) | (1 << CAP_SYS_ADMIN);
        assert!(
            missing_from(admin_raw_sys).is_empty(),
            "CAP_SYS_ADMIN covers CAP_BPF"
        );
    }

    #[test]
    fn refuses_group_signals() {
        assert!(signal_process(0, SIGTERM).is_err());
    }
}
