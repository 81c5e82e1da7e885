//! Engine time. The engine never reads a clock: every call takes `now` in nanoseconds on a
//! monotonic time line chosen by the caller (the worker reads the clock once per batch; tests
//! jump virtual time). Lab time scaling happens when a RuleSet is compiled (every duration is
//! divided by the scale), never here.

/// Nanoseconds on the caller's monotonic time line.
pub type Nanos = u64;

pub const NANOS_PER_MILLI: Nanos = 1_000_000;
pub const NANOS_PER_SEC: Nanos = 1_000_000_000;
pub const NANOS_PER_MIN: Nanos = 60 * NANOS_PER_SEC;

/// Whole seconds as engine nanoseconds.
pub const fn secs(s: u64) -> Nanos {
    s * NANOS_PER_SEC
}

/// Whole minutes as engine nanoseconds.
pub const fn mins(m: u64) -> Nanos {
    m * NANOS_PER_MIN
}
