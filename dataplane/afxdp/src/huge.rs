//! Huge pages for xlbd's big memory: the engines' tables (hundreds of megabytes at a few
//! million flows, every new flow touching random cache lines of them) and the UMEMs.
//!
//! With 4 KiB pages, a table of 150 MB spans 37 000 pages, far more than the TLB holds:
//! nearly every random access also walks the page tables. 2 MiB pages cut that to 75.
//!
//! - Tables: transparent huge pages (THP). In the kernel's `madvise` mode (the common
//!   default) an anonymous range gets huge pages only when advised, so [`advise`] marks the
//!   2 MiB-aligned interior of each range `MADV_HUGEPAGE` (future faults take huge pages) and
//!   asks `MADV_COLLAPSE` to rebuild what is already touched (initialised tables are).
//! - UMEM: `MAP_HUGETLB` when the host has reserved enough huge pages (`vm.nr_hugepages`),
//!   see `worker`; otherwise normal pages.
//!
//! [`backed`] reads `/proc/self/smaps` to tell how much of given ranges the kernel actually
//! backs with huge pages, so that an operator sees the effect, not only the request.

use std::{fmt, io, path::Path};

/// The huge page size THP and the default hugetlb pool use on x86_64 and arm64 (4 KiB base).
pub const HUGE_PAGE: usize = 2 << 20;

/// The kernel's THP mode for anonymous memory (`/sys/kernel/mm/transparent_hugepage/enabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thp {
    /// Every large enough anonymous range may get huge pages.
    Always,
    /// Only ranges advised with `MADV_HUGEPAGE`.
    Madvise,
    /// None (`MADV_COLLAPSE` still works, but advice does nothing).
    Never,
    /// No THP support (the file is missing) or a value not known here.
    Unavailable,
}

impl Thp {
    /// The mode in brackets of the sysfs file's text (`always [madvise] never`).
    pub fn parse(text: &str) -> Thp {
        let chosen = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')));
        match chosen {
            Some("always") => Thp::Always,
            Some("madvise") => Thp::Madvise,
            Some("never") => Thp::Never,
            _ => Thp::Unavailable,
        }
    }

    /// This host's mode.
    pub fn host() -> Thp {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .map_or(Thp::Unavailable, |t| Thp::parse(&t))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Thp::Always => "always",
            Thp::Madvise => "madvise",
            Thp::Never => "never",
            Thp::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for Thp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The 2 MiB-aligned part of `len` bytes from `start`, as `(start, len)`; `None` when the
/// range holds no whole huge page.
pub fn interior(start: usize, len: usize) -> Option<(usize, usize)> {
    let first = start.checked_next_multiple_of(HUGE_PAGE)?;
    let end = start.checked_add(len)? / HUGE_PAGE * HUGE_PAGE;
    (end > first).then(|| (first, end - first))
}

/// What [`advise`] did to one range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Advice {
    /// Bytes advised `MADV_HUGEPAGE` (the range's 2 MiB-aligned interior).
    pub advised: usize,
    /// Whether `MADV_COLLAPSE` rebuilt the whole interior with huge pages now (it refuses
    /// ranges with untouched parts: those take huge pages as they are first touched).
    pub collapsed: bool,
}

fn madvise(start: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: MADV_HUGEPAGE and MADV_COLLAPSE change how the range is backed, never what it
    // holds (a collapse copies the contents into the huge page); an unmapped range is an
    // error (ENOMEM), not undefined behaviour.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks for huge pages on the 2 MiB-aligned interior of `len` bytes from `start` (memory of
/// this process; the contents do not change). An error only when `MADV_HUGEPAGE` is refused
/// (a kernel without THP: EINVAL); a refused collapse is reported as `collapsed: false`.
pub fn advise(start: *const u8, len: usize) -> io::Result<Advice> {
    let Some((first, bytes)) = interior(start as usize, len) else {
        return Ok(Advice::default());
    };
    madvise(first, bytes, libc::MADV_HUGEPAGE)?;
    let collapsed = madvise(first, bytes, libc::MADV_COLLAPSE).is_ok();
    Ok(Advice {
        advised: bytes,
        collapsed,
    })
}

/// Bytes of the given `(start, len)` ranges the kernel backs with huge pages now: the
/// `AnonHugePages`, `ShmemPmdMapped` and hugetlb fields of the mappings of
/// `/proc/self/smaps` that overlap them. A mapping counts once even if several ranges
/// overlap it; advised interiors are mappings of their own (the advice splits them off), so
/// for them the figure is exact.
pub fn backed(ranges: &[(usize, usize)]) -> io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    Ok(backed_in(&smaps, ranges))
}

/// [`backed`] over the text of an smaps file.
pub fn backed_in(smaps: &str, ranges: &[(usize, usize)]) -> u64 {
    let mut total = 0u64;
    let mut current = false;
    for line in smaps.lines() {
        if let Some((start, end)) = mapping_header(line) {
            current = ranges
                .iter()
                .any(|&(s, l)| l > 0 && s < end && start < s.saturating_add(l));
            continue;
        }
        if !current {
            continue;
        }
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        if matches!(
            key,
            "AnonHugePages" | "ShmemPmdMapped" | "Shared_Hugetlb" | "Private_Hugetlb"
        ) {
            total += kib(rest) * 1024;
        }
    }
    total
}

/// `start-end` of an smaps mapping line (`7f..-7f.. rw-p 00000000 00:00 0 ...`).
fn mapping_header(line: &str) -> Option<(usize, usize)> {
    let range = line.split_whitespace().next()?;
    let (s, e) = range.split_once('-')?;
    Some((
        usize::from_str_radix(s, 16).ok()?,
        usize::from_str_radix(e, 16).ok()?,
    ))
}

/// The number of `  1234 kB`.
fn kib(value: &str) -> u64 {
    value
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The process's `AnonHugePages` (`/proc/self/smaps_rollup`): every THP-backed anonymous
/// byte, advised here or not.
pub fn anon_huge_bytes() -> io::Result<u64> {
    field_bytes(Path::new("/proc/self/smaps_rollup"), "AnonHugePages")
}

/// Bytes of free huge pages of the default size in the hugetlb pool (`HugePages_Free` ×
/// `Hugepagesize` of `/proc/meminfo`): what a `MAP_HUGETLB` mapping can take.
pub fn hugetlb_free_bytes() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    Ok(hugetlb_free_in(&text))
}

/// [`hugetlb_free_bytes`] over the text of a meminfo file.
pub fn hugetlb_free_in(meminfo: &str) -> u64 {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(kib))
            .unwrap_or(0)
    };
    // HugePages_Free is a count; Hugepagesize is in kB.
    field("HugePages_Free") * field("Hugepagesize") * 1024
}

fn field_bytes(path: &Path, name: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(kib))
        .unwrap_or(0)
        * 1024)
}

/// What advising a set of ranges (one engine's tables, say) came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    /// Bytes of the ranges.
    pub bytes: u64,
    /// Bytes advised (the ranges' 2 MiB-aligned interiors).
    pub advised: u64,
    /// Bytes of the ranges backed by huge pages when measured (see [`backed`]).
    pub huge: u64,
    /// Ranges the kernel refused to advise.
    pub refused: u32,
}

impl Report {
    pub fn add(&mut self, other: &Report) {
        self.bytes += other.bytes;
        self.advised += other.advised;
        self.huge += other.huge;
        self.refused += other.refused;
    }
}

/// Advises every `(start, len)` range, then measures how much of them huge pages back.
/// The first refusal's error comes back with the report (the others are only counted).
pub fn advise_all(ranges: &[(usize, usize)]) -> (Report, Option<io::Error>) {
    let mut report = Report::default();
    let mut first_error = None;
    let mut interiors = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        report.bytes += len as u64;
        match advise(start as *const u8, len) {
            Ok(a) => {
                report.advised += a.advised as u64;
                if let Some(i) = interior(start, len) {
                    interiors.push(i);
                }
            }
            Err(e) => {
                report.refused += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    match backed(&interiors) {
        Ok(huge) => report.huge = huge,
        Err(e) => {
            first_error.get_or_insert(e);
        }
    }
    (report, first_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interior_is_the_whole_huge_pages_inside() {
        assert_eq!(interior(0, HUGE_PAGE), Some((0, HUGE_PAGE)));
        assert_eq!(interior(4096, HUGE_PAGE), None);
        assert_eq!(
            interior(4096, 3 * HUGE_PAGE),
            Some((HUGE_PAGE, 2 * HUGE_PAGE))
        );
        assert_eq!(
            interior(HUGE_PAGE - 1, 2 * HUGE_PAGE + 1),
            Some((HUGE_PAGE, 2 * HUGE_PAGE))
        );
        assert_eq!(
            interior(HUGE_PAGE - 1, HUGE_PAGE + 1),
            Some((HUGE_PAGE, HUGE_PAGE))
        );
        // Almost two huge pages, straddling a boundary: no whole one.
        assert_eq!(interior(HUGE_PAGE + 1, 2 * HUGE_PAGE - 2), None);
        assert_eq!(interior(0, HUGE_PAGE - 1), None);
        assert_eq!(interior(usize::MAX - 10, 5), None);
    }

    #[test]
    fn thp_mode_is_the_bracketed_word() {
        assert_eq!(Thp::parse("always [madvise] never\n"), Thp::Madvise);
        assert_eq!(Thp::parse("[always] madvise never"), Thp::Always);
        assert_eq!(Thp::parse("always madvise [never]"), Thp::Never);
        assert_eq!(Thp::parse(""), Thp::Unavailable);
    }

    #[test]
    fn smaps_fields_of_overlapping_mappings_are_summed_once() {
        let smaps = "\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
AnonHugePages:      4096 kB
ShmemPmdMapped:        0 kB
7f0000400000-7f0000600000 rw-s 00000000 00:01 12 /dev/zero (deleted)
Size:               2048 kB
AnonHugePages:         0 kB
ShmemPmdMapped:     2048 kB
7f0000600000-7f0000800000 rw-p 00000000 00:00 0
AnonHugePages:      2048 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
";
        let base = 0x7f00_0000_0000usize;
        // Two ranges in the first mapping: counted once.
        let ranges = [(base, 4096), (base + 8192, 4096)];
        assert_eq!(backed_in(smaps, &ranges), 4096 * 1024);
        // The shared mapping's PMD-mapped shmem counts too; the third mapping is not asked.
        let ranges = [(base + 0x40_0000, 0x20_0000)];
        assert_eq!(backed_in(smaps, &ranges), 2048 * 1024);
        // A range ending where a mapping starts does not overlap it.
        assert_eq!(
            backed_in(smaps, &[(base + 0x50_0000, 0x10_0000)]),
            2048 * 1024
        );
        assert_eq!(backed_in(smaps, &[]), 0);
    }

    #[test]
    fn hugetlb_free_is_pages_times_size() {
        let meminfo = "MemTotal: 1000 kB\nHugePages_Total:      8\nHugePages_Free:       6\n\
                       Hugepagesize:       2048 kB\n";
        assert_eq!(hugetlb_free_in(meminfo), 6 * 2048 * 1024);
        assert_eq!(hugetlb_free_in("MemTotal: 1 kB\n"), 0);
    }

    /// Advising a large anonymous region gets it huge pages once touched (THP in `madvise`
    /// or `always` mode, as on this project's hosts). Only a host with THP `never` or without
    /// THP cannot show it; the test says so and checks only that the advice is accepted.
    #[test]
    fn an_advised_region_is_backed_by_huge_pages() {
        let len = 16 * HUGE_PAGE;
        let mut region = vec![0u8; len];
        let (start, _) = interior(region.as_ptr() as usize, len).expect("16 huge pages");
        let advice = advise(region.as_ptr(), len).expect("MADV_HUGEPAGE accepted");
        assert!(advice.advised >= 14 * HUGE_PAGE, "{advice:?}");
        // Touch every page (the zeroed vector came from a fresh mapping, untouched).
        for i in (0..len).step_by(4096) {
            region[i] = 1;
        }
        std::hint::black_box(&region);
        let huge = backed(&[(start, advice.advised)]).unwrap();
        let anon_total = anon_huge_bytes().unwrap();
        let mode = Thp::host();
        println!(
            "THP {mode}: {} of {} advised bytes on huge pages ({anon_total} AnonHugePages \
             in the process), collapsed at once: {}",
            huge, advice.advised, advice.collapsed
        );
        match mode {
            Thp::Madvise | Thp::Always => {
                assert!(huge > 0, "no huge page backs the advised region");
                assert!(anon_total >= huge);
            }
            Thp::Never | Thp::Unavailable => {
                println!("skipped the backing check: THP is {mode} on this host");
            }
        }
    }

    /// A region filled before the advice (as the engine's tables are) is collapsed into
    /// huge pages at once.
    #[test]
    fn a_touched_region_is_collapsed_when_advised() {
        let len = 8 * HUGE_PAGE;
        let region = vec![7u8; len];
        let (start, _) = interior(region.as_ptr() as usize, len).unwrap();
        let (report, err) = advise_all(&[(region.as_ptr() as usize, len)]);
        assert!(err.is_none(), "{err:?}");
        println!("THP {}: {report:?}", Thp::host());
        if matches!(Thp::host(), Thp::Madvise | Thp::Always) {
            assert!(report.huge > 0, "{report:?}");
            assert_eq!(
                report.huge,
                backed(&[(start, report.advised as usize)]).unwrap()
            );
        }
        assert!(region.iter().all(|&b| b == 7), "contents kept");
    }
}
