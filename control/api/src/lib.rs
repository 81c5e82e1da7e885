//! xlb's control API.
//!
//! - [`ControlState`]: the typed library API. It owns the configuration and its generation;
//!   every change is validated, compiled and published to the workers (through the daemon's
//!   [`Publisher`]) before it is committed, so nothing is ever partly applied.
//! - [`Telemetry`]: what the daemon reads from its workers (counters, flows, events, status);
//!   [`FakeTelemetry`] for tests.
//! - [`service::XlbService`]: the `xlb.v1.Xlb` gRPC service, a thin translator over the two;
//!   [`serve`] runs it with reflection and health on a Unix socket or TCP (TLS, client
//!   certificates, bearer token).
//! - [`convert`]: proto ↔ `xlb_engine::config`.
//! - [`keepalive`]: the `xlbctl keepalive-check` logic.
//! - [`resource`]: every object kind described once (`Resource`, `Remote`); the service and
//!   `xlbctl` are generic over it.
//! - [`authority`]: the Unix listener's repair of the `:authority` C-core clients send.
//! - [`changes`]: the queue that carries out received changes in order, clients or not.
//! - [`drain`]: drained members' progress summed over the workers, drain events, the NAT
//!   event export's figures.
//! - [`config_diff`]: what a whole new configuration changes (reload, `config apply`).
#![forbid(unsafe_code)]

pub mod authority;
pub mod changes;
pub mod config_diff;
pub mod convert;
pub mod drain;
pub mod keepalive;
pub mod members;
pub mod object;
pub mod resource;
pub mod server;
pub mod service;
pub mod state;
pub mod status;
pub mod telemetry;

pub use drain::{sum_drains, DrainEvent, DrainPhase, DrainStatus, NatLogStatus};
pub use resource::{Remote, Resource};
pub use server::{bind, serve, Bound, Listen, ServeError, ServeOptions, DEFAULT_SOCKET};
pub use state::{
    process_clock, Applied, ConfigApplied, ControlError, ControlState, Kind, MemberChange,
    MemberDrain, MemberStatus, Object, PublishError, Publisher, Snapshot, StateOptions,
};
pub use telemetry::{
    counts_for, sum, CounterSum, FastPathCounters, FastRuleCounters, FAST_PUNT_REASONS,
};
pub use telemetry::{
    ClusterPeer, ClusterStatus, ClusterSync, ControlEvent, CountersSnapshot, DatapathAvailability,
    EventRecord, FakeTelemetry, FlowCursor, FlowEntry, FlowFilter, FlowPage, RuntimeStatus,
    SnatUsage, StateFilter, Telemetry, TelemetryError, WorkerCounters, WorkerStatus,
};
