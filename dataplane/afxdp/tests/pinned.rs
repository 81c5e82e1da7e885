//! State that outlives the process, on a private bpffs: a flow store keeps its bytes across
//! handles (and is replaced when its size changes); a pinned XDP link keeps the program
//! attached after every handle on it is gone, a new program takes it over in place, and
//! with the hold flag a frame for the dataplane whose queue has no socket is dropped, not
//! passed; the fast path's table is taken over by the next program of its size (replaced
//! when the size changes); `remove_state` detaches and removes. Needs root; skips otherwise.

mod common;

use std::{path::PathBuf, process::Command};

use common::*;
use etherparse::PacketBuilder;
use xlb_afxdp::{
    netlink::Netlink,
    pinned::{self, MappedStore, StoreOrigin},
    AddrKind, ModeRequest, XdpProgram,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const OWNED4: [u8; 4] = [198, 18, 100, 1];

/// A bpffs mounted on a temporary directory, unmounted on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new(tag: &str) -> Bpffs {
        let dir = std::env::temp_dir().join(format!("xa{}-{tag}-bpffs", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount bpffs on {}", dir.display());
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = pinned::remove_state(&self.0.join("state"));
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn udp4(dst: [u8; 4]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 1, 2], dst, 64)
        .udp(1000, 2000)
        .write(&mut v, b"x")
        .unwrap();
    v
}

#[test]
fn a_store_keeps_its_bytes_across_handles() {
    if !need_root("a_store_keeps_its_bytes_across_handles") {
        return;
    }
    let fs = Bpffs::new("store");
    let dir = fs.0.join("state");
    pinned::prepare_state_dir(&dir).unwrap();
    let path = pinned::store_path(&dir, 0);
    let (mut s, origin) = MappedStore::open_or_create(&path, 10_000).unwrap();
    assert_eq!(origin, StoreOrigin::Created);
    assert!(s.as_slice().len() >= 10_000);
    assert!(
        s.as_slice().iter().all(|&b| b == 0),
        "a new store is zeroed"
    );
    s.as_mut_slice()[..8].copy_from_slice(b"XLBFLOWS");
    s.as_mut_slice()[9_999] = 7;
    drop(s);
    let (s, origin) = MappedStore::open_or_create(&path, 10_000).unwrap();
    assert_eq!(origin, StoreOrigin::Found);
    assert_eq!(&s.as_slice()[..8], b"XLBFLOWS");
    assert_eq!(s.as_slice()[9_999], 7);
    drop(s);
    let (s, origin) = MappedStore::open_or_create(&path, 100_000).unwrap();
    assert!(matches!(origin, StoreOrigin::Replaced { .. }), "{origin:?}");
    assert!(s.as_slice().iter().all(|&b| b == 0));
    drop(s);
    assert_eq!(pinned::remove_state(&dir).unwrap(), vec!["flows-0"]);
    assert!(!dir.exists());
    // A directory that is not on a bpffs is refused with what to do.
    let e = pinned::prepare_state_dir(&std::env::temp_dir().join("xa-not-bpffs")).unwrap_err();
    assert!(e.to_string().contains("not on a bpffs"), "{e}");
}

#[test]
fn a_pinned_attachment_outlives_its_program_handle_and_holds_frames() {
    if !need_root("a_pinned_attachment_outlives_its_program_handle_and_holds_frames") {
        return;
    }
    let fs = Bpffs::new("link");
    let dir = fs.0.join("state");
    let lab = Lab::new();
    let (f0, fwd) = (lab.f0.clone(), lab.fwd.clone());
    in_netns(&lab.fwd, move || {
        pinned::prepare_state_dir(&dir).unwrap();
        let ifindex = Netlink::open().unwrap().link_by_name(&f0).unwrap().ifindex;
        let load = |hold: bool| {
            let mut xdp = XdpProgram::load().unwrap();
            xdp.add_addr(OWNED4.into(), AddrKind::Owned).unwrap();
            xdp.set_hold_without_socket(hold);
            xdp
        };
        // Without the hold flag, a frame for the dataplane with no socket is passed.
        let mut plain = load(false);
        let (mode, taken) = plain
            .attach_pinned(ifindex, ModeRequest::Auto, false, &dir)
            .unwrap();
        assert!(!taken, "nothing to take over yet");
        assert_eq!(plain.test_run(&udp4(OWNED4), ifindex, 0).unwrap(), XDP_PASS);
        drop(plain);
        let shown = Command::new("ip")
            .args(["-n", &fwd, "link", "show", "dev", &f0])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&shown.stdout).contains("prog/xdp"),
            "still attached once the handle is gone"
        );
        // A new program takes the attachment over, in the mode it had, and holds.
        let mut held = load(true);
        let (mode2, taken) = held
            .attach_pinned(ifindex, ModeRequest::Auto, false, &dir)
            .unwrap();
        assert!(taken);
        assert_eq!(mode2, mode);
        let before = held.counters().unwrap();
        assert_eq!(held.test_run(&udp4(OWNED4), ifindex, 0).unwrap(), XDP_DROP);
        assert_eq!(held.counters().unwrap().no_xsk, before.no_xsk + 1);
        // The host's own traffic still reaches it.
        assert_eq!(
            held.test_run(&udp4([198, 18, 9, 9]), ifindex, 0).unwrap(),
            XDP_PASS
        );
        drop(held);
        let removed = pinned::remove_state(&dir).unwrap();
        assert_eq!(removed.len(), 1, "{removed:?}");
    })
    .join()
    .expect("the test's thread in the namespace");
    assert!(!lab.has_xdp(&lab.fwd, &lab.f0), "detached by remove_state");
}

#[test]
fn a_pinned_fast_table_is_taken_over_by_the_next_program_of_its_size() {
    if !need_root("a_pinned_fast_table_is_taken_over_by_the_next_program_of_its_size") {
        return;
    }
    use std::sync::atomic::Ordering;
    let fs = Bpffs::new("fast");
    let dir = fs.0.join("state");
    pinned::prepare_state_dir(&dir).unwrap();
    let pin = pinned::fast_table_path(&dir);
    let (mut first, found) = XdpProgram::load_with_pinned(40, Some(&pin)).unwrap();
    assert!(!found, "nothing pinned yet");
    assert!(pin.exists(), "pinned");
    let t = first.fast_table().unwrap();
    assert_eq!(t.len(), 40 * 16);
    t[17].store(0xabcd, Ordering::Relaxed);
    t[40 * 16 - 1].store(9, Ordering::Relaxed);
    drop(first);

    // The next program of the same size shares the table, with what was written in it.
    let (mut second, found) = XdpProgram::load_with_pinned(40, Some(&pin)).unwrap();
    assert!(found);
    let t = second.fast_table().unwrap();
    assert_eq!(t[17].load(Ordering::Relaxed), 0xabcd);
    assert_eq!(t[40 * 16 - 1].load(Ordering::Relaxed), 9);
    drop(second);

    // Another size: a new, zeroed table replaces it.
    let (mut third, found) = XdpProgram::load_with_pinned(80, Some(&pin)).unwrap();
    assert!(!found);
    let t = third.fast_table().unwrap();
    assert_eq!(t.len(), 80 * 16);
    assert!(t.iter().all(|w| w.load(Ordering::Relaxed) == 0));
    drop(third);

    // --cleanup removes it with the rest.
    let removed = pinned::remove_state(&dir).unwrap();
    assert!(
        removed.contains(&pinned::FAST_TABLE_PIN.to_string()),
        "{removed:?}"
    );
    assert!(!pin.exists());
}
