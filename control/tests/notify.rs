//! xlbd's messages to the service manager, as a listener on `NOTIFY_SOCKET` receives them:
//! each state's datagram, and descriptors handed to the file-descriptor store. (The daemon's
//! use of them is tested end to end in tests/e2e_reload.rs.)

use std::{
    io::{Read, Seek, Write},
    os::{
        fd::{AsFd, FromRawFd, OwnedFd},
        unix::net::UnixDatagram,
    },
    time::Duration,
};

use sendfd::RecvWithFd;
use xlb_control::sd_notify::Notifier;

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = sock.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

// One test: NOTIFY_SOCKET is the process's environment.
#[test]
fn every_state_arrives_as_one_datagram_and_fds_reach_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    // Without NOTIFY_SOCKET nothing is sent, and nothing fails.
    std::env::remove_var("NOTIFY_SOCKET");
    let off = Notifier::from_env();
    assert!(!off.enabled());
    off.ready("x");
    off.store_fds("state", &[]).unwrap();

    std::env::set_var("NOTIFY_SOCKET", &path);
    let n = Notifier::from_env();
    assert!(n.enabled());
    n.ready("generation 1, 0 flows, 1/1 workers running");
    assert_eq!(
        recv(&sock),
        "READY=1\nSTATUS=generation 1, 0 flows, 1/1 workers running\n"
    );
    n.reloading();
    let m = recv(&sock);
    let lines: Vec<&str> = m.lines().collect();
    assert_eq!(lines[0], "RELOADING=1");
    let usec: u64 = lines[1]
        .strip_prefix("MONOTONIC_USEC=")
        .expect("MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(usec > 0);
    n.watchdog();
    assert_eq!(recv(&sock), "WATCHDOG=1\n");
    n.status("stuck: worker 1 for 1.2 s");
    assert_eq!(recv(&sock), "STATUS=stuck: worker 1 for 1.2 s\n");
    n.stopping();
    assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=stopping\n");

    // A descriptor for the store: the listener gets the same open file.
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(b"flows").unwrap();
    n.store_fds("flow-state", &[file.as_fd()]).unwrap();
    let mut buf = [0u8; 256];
    let mut fds = [-1; 2];
    let (len, nfds) = sock.recv_with_fd(&mut buf, &mut fds).unwrap();
    assert_eq!(&buf[..len], b"FDSTORE=1\nFDNAME=flow-state\n");
    assert_eq!(nfds, 1);
    // SAFETY: recv_with_fd returned a descriptor that this test now owns.
    let mut got = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fds[0]) });
    got.rewind().unwrap();
    let mut text = String::new();
    got.read_to_string(&mut text).unwrap();
    assert_eq!(text, "flows");
    std::env::remove_var("NOTIFY_SOCKET");
}
