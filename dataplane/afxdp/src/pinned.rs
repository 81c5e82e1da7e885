//! What outlives xlbd, pinned in bpffs under one state directory:
//!
//! - one flow store per worker: a BPF array created with `BPF_F_MMAPABLE`
//!   (`flows-<worker>`), mapped into the process and read and written with plain loads and
//!   stores ([`MappedStore`]). The kernel keeps the array while it is pinned, whatever
//!   happens to the process, and an XDP program can later read the same memory as a map of
//!   [`STORE_RECORD`]-byte values;
//! - the XDP attachment of each interface: its BPF link (`xdp-<ifindex>-<mode>`), which
//!   keeps the program attached while no xlbd runs ([`crate::XdpProgram::attach_pinned`]).
//!
//! [`remove_state`] unpins everything: XDP is detached and the memory freed.

use std::{
    ffi::CString,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    ptr::NonNull,
};

use libbpf_rs::{libbpf_sys, MapCore, MapHandle, MapType};

use crate::error::{Error, Result};

/// Bytes per element of a flow store's BPF array (one flow record).
pub const STORE_RECORD: u32 = 128;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Bytes of a memory page: what the kernel rounds an mmapable array's memory up to.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096)
}

/// What [`take_pinned_array`] found pinned.
#[derive(Debug)]
pub(crate) enum PinnedArray {
    /// Nothing.
    Absent,
    /// An mmapable array of the size asked for: taken over, with its content.
    Found(MapHandle),
    /// A map of another kind or size, `bytes` of values: unpinned.
    Replaced { bytes: usize },
}

/// Opens the BPF array pinned at `path` when it is mmapable and holds `entries` values of
/// `value_size` bytes; a map of any other kind or size pinned there is unpinned (it lives
/// on while something still holds it).
pub(crate) fn take_pinned_array(path: &Path, value_size: u32, entries: u32) -> Result<PinnedArray> {
    if !path.exists() {
        return Ok(PinnedArray::Absent);
    }
    let map = MapHandle::from_pinned_path(path)
        .map_err(|e| Error::with(format!("opening {}", path.display()), e))?;
    let info = map
        .info()
        .map_err(|e| Error::with(format!("reading {}", path.display()), e))?
        .info;
    if info.type_ == libbpf_sys::BPF_MAP_TYPE_ARRAY
        && info.map_flags & libbpf_sys::BPF_F_MMAPABLE != 0
        && info.value_size == value_size
        && info.max_entries == entries
    {
        return Ok(PinnedArray::Found(map));
    }
    std::fs::remove_file(path)
        .map_err(|e| Error::with(format!("unpinning {}", path.display()), e))?;
    Ok(PinnedArray::Replaced {
        bytes: info.max_entries as usize * info.value_size as usize,
    })
}

/// Maps the values of mmapable array `map` (`what` in errors) into this process, shared and
/// writable: their address and length (`max_entries × value_size` bytes; the mapping itself
/// is rounded up to whole pages, as munmap rounds the same length).
pub(crate) fn map_array(map: &MapHandle, what: &str) -> Result<(NonNull<u8>, usize)> {
    let bytes = (map.max_entries() as usize)
        .checked_mul(map.value_size() as usize)
        .ok_or_else(|| Error::msg(format!("{what}: size overflows")))?;
    let page = page_size();
    let len = bytes.div_ceil(page) * page;
    // SAFETY: a fresh shared mapping of a BPF map fd at offset 0, of the map's page-rounded
    // size (what the kernel allocated for it), at an address the kernel chooses; nothing
    // else is touched. Checked for failure below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            map.as_fd().as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Error::with(
            format!("mapping {what}"),
            std::io::Error::last_os_error(),
        ));
    }
    let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| Error::msg("mmap gave null"))?;
    Ok((ptr, bytes))
}

/// Whether `path` (or its nearest existing ancestor) is on a bpffs.
fn on_bpffs(path: &Path) -> bool {
    let mut p = Some(path);
    while let Some(dir) = p {
        if dir.exists() {
            let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
                return false;
            };
            let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
            // SAFETY: `c` is a NUL-terminated path and `st` a writable statfs buffer.
            let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
            if rc != 0 {
                return false;
            }
            // SAFETY: statfs succeeded, so it filled `st`.
            let st = unsafe { st.assume_init() };
            // `f_type`'s type differs between architectures (i64 here, u32 or i32 elsewhere).
            #[allow(clippy::unnecessary_cast)]
            return st.f_type as i64 == BPF_FS_MAGIC;
        }
        p = dir.parent();
    }
    false
}

/// Makes `dir` a directory on a bpffs, mounting bpffs on `/sys/fs/bpf` first when `dir` is
/// under it and nothing is mounted there.
pub fn prepare_state_dir(dir: &Path) -> Result<()> {
    let bpf_root = Path::new("/sys/fs/bpf");
    if !on_bpffs(dir) && dir.starts_with(bpf_root) && !on_bpffs(bpf_root) {
        let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: three NUL-terminated strings and no data: mount(2) of a bpffs.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(Error::with(
                "mounting bpffs on /sys/fs/bpf",
                std::io::Error::last_os_error(),
            ));
        }
    }
    if !on_bpffs(dir) {
        return Err(Error::msg(format!(
            "{} is not on a bpffs (mount one: mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::with(format!("creating {}", dir.display()), e))
}

/// Takes the state directory `dir` for this process (an exclusive `flock` on it, held as
/// long as the returned fd, so until the process exits): two xlbd writing one set of flow
/// stores would corrupt each other's flows. Fails at once if another process holds it.
pub fn lock_state_dir(dir: &Path) -> Result<OwnedFd> {
    let f = std::fs::File::open(dir)
        .map_err(|e| Error::with(format!("opening {}", dir.display()), e))?;
    // SAFETY: `f` is an open file descriptor for the call's duration.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
            Error::msg(format!(
                "{} is in use by another xlbd (stop it first, or start this one with \
                 --takeover PID)",
                dir.display()
            ))
        } else {
            Error::with(format!("locking {}", dir.display()), e)
        });
    }
    Ok(OwnedFd::from(f))
}

/// Removes everything xlbd pinned in `dir`: XDP links (the program is detached from their
/// interfaces unless a running xlbd still holds them), flow stores, the fast path's table,
/// and the directory.
/// Returns the names removed.
pub fn remove_state(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::with(format!("reading {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("xdp-") {
            // Detached now, so that XDP is gone when this returns; a pin that will not detach
            // (not a link) is still removed below and the kernel frees it on its own time.
            let _ = crate::xdp::detach_pinned_link(&entry.path());
        }
        if name.starts_with("xdp-") || name.starts_with("flows-") || name == FAST_TABLE_PIN {
            std::fs::remove_file(entry.path())
                .map_err(|e| Error::with(format!("unpinning {}", entry.path().display()), e))?;
            removed.push(name);
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// The name of the XDP fast path's table in a state directory.
pub const FAST_TABLE_PIN: &str = "fast-table";

/// The pin of the XDP fast path's table in `dir`: it outlives xlbd with the flows, and holds
/// what XDP recorded of them while no xlbd ran.
pub fn fast_table_path(dir: &Path) -> PathBuf {
    dir.join(FAST_TABLE_PIN)
}

/// The pin of worker `worker`'s flow store in `dir`.
pub fn store_path(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("flows-{worker}"))
}

/// A flow store: a pinned, mmapable BPF array mapped into this process.
#[derive(Debug)]
pub struct MappedStore {
    ptr: NonNull<u8>,
    len: usize,
    _map: MapHandle,
}

// SAFETY: the mapping is plain shared memory owned by this value alone; moving it to another
// thread moves the only handle on it.
unsafe impl Send for MappedStore {}

/// How a store was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOrigin {
    /// Pinned by an earlier xlbd: its content is what that one left.
    Found,
    /// Created now (none was pinned).
    Created,
    /// One was pinned with another size (another flow capacity): replaced by an empty one.
    Replaced { bytes: usize },
}

impl MappedStore {
    /// Opens the store pinned at `path`, or creates and pins one of at least `bytes` bytes.
    pub fn open_or_create(path: &Path, bytes: usize) -> Result<(MappedStore, StoreOrigin)> {
        let page = page_size();
        let entries = bytes.div_ceil(page) * (page / STORE_RECORD as usize).max(1);
        let entries = u32::try_from(entries)
            .map_err(|_| Error::msg(format!("flow store of {bytes} bytes is too large")))?;
        let origin = match take_pinned_array(path, STORE_RECORD, entries)? {
            PinnedArray::Found(map) => return Ok((Self::map(map, path)?, StoreOrigin::Found)),
            PinnedArray::Absent => StoreOrigin::Created,
            PinnedArray::Replaced { bytes } => StoreOrigin::Replaced { bytes },
        };
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as libbpf_sys::size_t,
            map_flags: libbpf_sys::BPF_F_MMAPABLE,
            ..Default::default()
        };
        let mut map = MapHandle::create(
            MapType::Array,
            Some("xlb_flows"),
            4,
            STORE_RECORD,
            entries,
            &opts,
        )
        .map_err(|e| Error::with("creating a flow store (BPF array, mmapable)", e))?;
        map.pin(path)
            .map_err(|e| Error::with(format!("pinning {}", path.display()), e))?;
        Ok((Self::map(map, path)?, origin))
    }

    fn map(map: MapHandle, path: &Path) -> Result<MappedStore> {
        let (ptr, len) = map_array(&map, &path.display().to_string())?;
        Ok(MappedStore {
            ptr,
            len,
            _map: map,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is a live shared mapping owned by `self` (unmapped only in
        // Drop); nothing else in this process aliases it mutably while `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MappedStore {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
