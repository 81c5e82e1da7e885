//! Stalling one of xlbd's threads from a test, as a slow or stuck worker would be.

use std::{thread, time::Duration};

/// The thread id of xlbd's thread named `name`.
pub fn thread_id(pid: u32, name: &str) -> i32 {
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("xlbd's threads") {
        let e = e.unwrap();
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return e.file_name().to_string_lossy().parse().unwrap();
        }
    }
    panic!("xlbd {pid} has no thread {name}");
}

/// Stops thread `tid` (only it: ptrace stops one thread, a signal would stop the process),
/// keeps it stopped for `d`, and lets it run again. Every call on this thread, as ptrace
/// requires; if the test dies meanwhile, the kernel detaches and resumes it.
pub fn stall(tid: i32, d: Duration) {
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: PTRACE_SEIZE reads no memory of ours (addr and data are null).
    let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) };
    assert_eq!(
        r,
        0,
        "PTRACE_SEIZE {tid}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above, PTRACE_INTERRUPT takes no pointers.
    let r = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null) };
    assert_eq!(
        r,
        0,
        "PTRACE_INTERRUPT: {}",
        std::io::Error::last_os_error()
    );
    let mut status = 0;
    // SAFETY: `status` is a valid place for waitpid to write the stop status.
    let w = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    assert_eq!(w, tid, "waitpid: {}", std::io::Error::last_os_error());
    thread::sleep(d);
    // SAFETY: the tracee is in a ptrace-stop; data 0 resumes it without a signal.
    let r = unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, null, null) };
    assert_eq!(r, 0, "PTRACE_DETACH: {}", std::io::Error::last_os_error());
}
