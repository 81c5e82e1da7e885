//! `xlbd`, xlb's daemon: the configuration, the AF_XDP workers that run the engine, and the
//! control loop between them. See `docs/xlbd.md`.
#![forbid(unsafe_code)]

pub mod addresses;
pub mod daemon;
pub mod handler;
pub mod kernel;
pub mod kernel_watch;
pub mod limits;
pub mod metrics;
pub mod plane;
pub mod probes;
pub mod selfprobe;
pub mod stats;
