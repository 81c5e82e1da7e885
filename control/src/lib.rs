//! `xlbd`, xlb's daemon: the configuration, the AF_XDP workers that run the engine, and the
//! control loop between them. See `docs/xlbd.md`.
//!
//! By role: [`options`] and [`preflight`] (what is checked before anything is attached),
//! [`startup`] (the phases), [`workers`], [`control_loop`], [`daemon`] (services and the
//! shutdown order); the worker side: [`handler`] (the engine adapter), [`messages`],
//! [`steering`]; what the control side reads and serves: [`plane`] (counter cells, the
//! publisher, the API's telemetry), [`metrics`], [`stats`], [`report`]; and [`kernel`],
//! [`addresses`], [`probes`], [`selfprobe`], [`limits`], [`huge_pages`]; for the service manager: [`reload`]
//! (SIGHUP), [`sd_notify`] and [`liveness`] (readiness, status, the watchdog).
#![forbid(unsafe_code)]

pub mod addresses;
pub mod cluster;
pub mod control_loop;
pub mod daemon;
pub mod drain;
pub mod fast_path;
pub mod handler;
pub mod huge_pages;
pub mod ipfix;
pub mod kernel;
pub mod kernel_watch;
pub mod limits;
pub mod liveness;
pub mod messages;
pub mod metrics;
pub mod options;
pub mod persist;
pub mod plane;
pub mod preflight;
pub mod probes;
pub mod reload;
pub mod report;
pub mod sd_notify;
pub mod selfprobe;
pub mod startup;
pub mod stats;
pub mod steering;
pub mod workers;
