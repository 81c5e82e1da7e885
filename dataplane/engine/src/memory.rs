//! Where an engine's large allocations lie, so that the platform can ask the kernel to back
//! them with huge pages (xlbd's `--huge-pages`). The engine only names the ranges; advising
//! them is a system call, which belongs to the platform crate.

/// One allocation of an engine's tables: `len` bytes from `start`. The address is only
/// reported, never dereferenced; it stays valid while the engine lives and its tables are
/// not reallocated (they are sized once, at start; SNAT port spaces follow the rule set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// What the allocation holds (`flow records`, `flow index`, ...).
    pub what: &'static str,
    pub start: *const u8,
    pub len: usize,
}

impl MemoryRegion {
    /// The memory of `items`, named `what`.
    pub fn of<T>(what: &'static str, items: &[T]) -> MemoryRegion {
        MemoryRegion {
            what,
            start: items.as_ptr().cast(),
            len: std::mem::size_of_val(items),
        }
    }
}
