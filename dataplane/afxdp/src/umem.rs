//! How many UMEM frames and how large rings a worker gets.
//!
//! The UMEM is pinned memory: without CAP_IPC_LOCK it counts against RLIMIT_MEMLOCK (per
//! user, across processes), and a bind that exceeds it fails with ENOBUFS/ENOMEM long
//! after start-up looked fine. So the size is planned up front from the budget and the
//! rings shrink to fit rather than failing.

use std::fmt;

/// The smallest ring we accept: below this a 64-frame batch cannot even be refilled.
pub const MIN_RING: u32 = 64;
/// xsk-rs and the kernel need a power-of-two chunk between 2 KiB and a page.
pub const MIN_FRAME: u32 = 2048;
pub const MAX_FRAME: u32 = 4096;

/// The sizes one UMEM is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UmemPlan {
    /// Bytes per frame (chunk).
    pub frame_size: u32,
    /// Frames in the UMEM.
    pub frames: u32,
    /// Size of every ring (RX, TX, fill, completion) of every socket on this UMEM.
    pub ring_size: u32,
}

impl UmemPlan {
    pub fn bytes(&self) -> u64 {
        u64::from(self.frames) * u64::from(self.frame_size)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    FrameSize(u32),
    RingSize(u32),
    NoSockets,
    /// Even the smallest rings do not fit in the budget.
    Budget {
        need: u64,
        budget: u64,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::FrameSize(s) => write!(
                f,
                "frame size {s} must be a power of two in {MIN_FRAME}..={MAX_FRAME}"
            ),
            PlanError::RingSize(s) => {
                write!(f, "ring size {s} must be a power of two >= {MIN_RING}")
            }
            PlanError::NoSockets => write!(f, "a UMEM needs at least one socket"),
            PlanError::Budget { need, budget } => write!(
                f,
                "UMEM needs at least {need} bytes of locked memory but RLIMIT_MEMLOCK \
                 leaves {budget}: raise the limit or run with CAP_IPC_LOCK"
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// Frames a UMEM needs so that no socket starves another: each socket can have a full
/// fill ring and a full TX ring outstanding in the kernel at once, plus a few batches of
/// slack for frames being copied between UMEMs or emitted by timers.
pub fn frames_needed(sockets: u32, ring_size: u32, batch: u32) -> u64 {
    u64::from(sockets) * 2 * u64::from(ring_size) + 4 * u64::from(batch)
}

/// Plans one UMEM shared by `sockets` sockets. `budget` is this UMEM's share of locked
/// memory in bytes (`None`: unbounded, e.g. with CAP_IPC_LOCK). Rings are halved until
/// the frames fit; an error names the shortfall when even [`MIN_RING`] does not.
pub fn plan(
    sockets: u32,
    ring_size: u32,
    frame_size: u32,
    batch: u32,
    budget: Option<u64>,
) -> Result<UmemPlan, PlanError> {
    if !frame_size.is_power_of_two() || !(MIN_FRAME..=MAX_FRAME).contains(&frame_size) {
        return Err(PlanError::FrameSize(frame_size));
    }
    if !ring_size.is_power_of_two() || ring_size < MIN_RING {
        return Err(PlanError::RingSize(ring_size));
    }
    if sockets == 0 {
        return Err(PlanError::NoSockets);
    }
    let mut ring = ring_size;
    loop {
        let frames = frames_needed(sockets, ring, batch);
        let bytes = frames * u64::from(frame_size);
        let fits = budget.is_none_or(|b| bytes <= b);
        if fits && frames <= u64::from(u32::MAX) {
            return Ok(UmemPlan {
                frame_size,
                frames: frames as u32,
                ring_size: ring,
            });
        }
        if ring == MIN_RING {
            return Err(PlanError::Budget {
                need: bytes,
                budget: budget.unwrap_or(0),
            });
        }
        ring /= 2;
    }
}

/// What backs a UMEM's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UmemBacking {
    /// Huge pages of the hugetlb pool (`MAP_HUGETLB`), reserved by the operator.
    Hugetlb,
    /// Transparent huge pages (advised and collapsed after the mapping).
    Thp,
    /// Normal pages: huge pages were off, or none could be had.
    Pages,
}

impl UmemBacking {
    pub fn as_str(self) -> &'static str {
        match self {
            UmemBacking::Hugetlb => "hugetlb",
            UmemBacking::Thp => "thp",
            UmemBacking::Pages => "pages",
        }
    }
}

/// One UMEM's memory: its size, backing and how much of it huge pages back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UmemMemory {
    pub backing: UmemBacking,
    pub bytes: u64,
    /// Bytes on huge pages, as `/proc/self/smaps` showed them after the mapping.
    pub huge: u64,
}

/// `plan` with its frames rounded up to whole huge pages of `huge_page` bytes, for a UMEM
/// mapped from the hugetlb pool (whose mappings must be whole huge pages, munmap included).
/// The extra frames are more room for the same rings. `None` when the rounded UMEM would
/// exceed `budget`.
pub fn hugetlb_plan(plan: &UmemPlan, huge_page: u64, budget: Option<u64>) -> Option<UmemPlan> {
    let per_page = (huge_page / u64::from(plan.frame_size)).max(1);
    let frames = u64::from(plan.frames).div_ceil(per_page) * per_page;
    let rounded = UmemPlan {
        frames: u32::try_from(frames).ok()?,
        ..*plan
    };
    budget
        .is_none_or(|b| rounded.bytes() <= b)
        .then_some(rounded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbounded_budget_keeps_requested_rings() {
        let p = plan(4, 1024, 2048, 64, None).unwrap();
        assert_eq!(p.ring_size, 1024);
        assert_eq!(p.frames, 4 * 2 * 1024 + 256);
        assert_eq!(p.bytes(), u64::from(p.frames) * 2048);
    }

    #[test]
    fn shrinks_rings_to_fit_memlock() {
        // 8 MiB, the usual default RLIMIT_MEMLOCK
        let p = plan(4, 2048, 4096, 64, Some(8 << 20)).unwrap();
        assert!(p.bytes() <= 8 << 20);
        assert_eq!(p.ring_size, 128);
        assert!(p.frames as u64 >= frames_needed(4, p.ring_size, 64));
    }

    #[test]
    fn reports_shortfall() {
        let e = plan(2, 256, 2048, 64, Some(64 * 1024)).unwrap_err();
        match e {
            PlanError::Budget { need, budget } => {
                assert_eq!(budget, 64 * 1024);
                assert_eq!(need, frames_needed(2, MIN_RING, 64) * 2048);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("CAP_IPC_LOCK"));
    }

    #[test]
    fn hugetlb_plan_rounds_up_to_whole_huge_pages_within_the_budget() {
        let p = plan(2, 1024, 2048, 64, None).unwrap();
        assert_eq!(p.bytes(), 4352 * 2048); // 8.5 MiB
        let h = hugetlb_plan(&p, 2 << 20, None).unwrap();
        assert_eq!(h.bytes(), 10 << 20);
        assert_eq!((h.ring_size, h.frame_size), (p.ring_size, p.frame_size));
        assert!(h.frames > p.frames);
        // Already whole huge pages: unchanged.
        assert_eq!(hugetlb_plan(&h, 2 << 20, None), Some(h));
        // Rounding up would pass the locked-memory budget.
        assert_eq!(hugetlb_plan(&p, 2 << 20, Some(p.bytes())), None);
        assert_eq!(hugetlb_plan(&p, 2 << 20, Some(10 << 20)), Some(h));
    }

    #[test]
    fn rejects_bad_shapes() {
        assert_eq!(
            plan(1, 1024, 3000, 64, None),
            Err(PlanError::FrameSize(3000))
        );
        assert_eq!(
            plan(1, 1024, 8192, 64, None),
            Err(PlanError::FrameSize(8192))
        );
        assert_eq!(
            plan(1, 1000, 2048, 64, None),
            Err(PlanError::RingSize(1000))
        );
        assert_eq!(plan(1, 32, 2048, 64, None), Err(PlanError::RingSize(32)));
        assert_eq!(plan(0, 1024, 2048, 64, None), Err(PlanError::NoSockets));
    }
}
