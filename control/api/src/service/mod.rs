//! The `xlb.v1.Xlb` gRPC service: a thin translator over [`ControlState`] and [`Telemetry`].
//!
//! Each handler converts the request (bad text and enum values become `INVALID_ARGUMENT`),
//! calls the library, and converts the answer. A publish waits for worker acks and a telemetry
//! read may wait for workers, and neither may stall the async runtime that serves other
//! requests: changes go to the [`ChangeQueue`] (its own thread, in the order received, carried
//! out to the end even when the client hangs up or times out), telemetry reads to the blocking
//! pool.
//!
//! The create / update / delete / get / list methods of every object kind are one generic
//! method each, over [`Resource`]; the reads are in [`reads`], the status in [`status`].

mod reads;
mod status;

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::{watch, Semaphore};
use tonic::{Request, Response, Status};
use xlb_engine::config::{
    BackendPool, Frontend, HealthProbe, InboundNatRule, LoadBalancingRule, OutboundRule,
};
use xlb_engine::ValidationErrors;
use xlb_proto::v1 as pb;
use xlb_proto::v1::xlb_server::Xlb;

use crate::changes::ChangeQueue;
use crate::convert::{self, Errors};
use crate::resource::{every_kind, Resource};
use crate::state::{Applied, ControlError, ControlState, MemberChange};
use crate::telemetry::Telemetry;

pub use reads::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
pub use status::ms_between;

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct XlbService {
    state: Arc<ControlState>,
    telemetry: Arc<dyn Telemetry>,
    /// Bounds concurrent `WatchEvents` streams: they outlive the request and the server's
    /// concurrency limit only counts requests until their answer starts.
    watchers: Arc<Semaphore>,
    /// Every change of every connection goes through this one queue.
    changes: Arc<ChangeQueue>,
    /// Turns true when the server shuts down: event streams end then, otherwise a graceful
    /// shutdown would wait for every watcher to hang up.
    closing: watch::Receiver<bool>,
}

impl std::fmt::Debug for XlbService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlbService")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl XlbService {
    pub fn new(
        state: Arc<ControlState>,
        telemetry: Arc<dyn Telemetry>,
        max_watchers: usize,
    ) -> XlbService {
        XlbService {
            state,
            telemetry,
            watchers: Arc::new(Semaphore::new(max_watchers)),
            changes: Arc::new(ChangeQueue::new()),
            closing: watch::channel(false).1,
        }
    }

    /// Ends `WatchEvents` streams when `closing` turns true.
    pub fn with_closing(mut self, closing: watch::Receiver<bool>) -> XlbService {
        self.closing = closing;
        self
    }

    /// Runs a change through the queue and answers with the object it produced.
    async fn change<T: Resource>(
        &self,
        f: impl FnOnce(&ControlState) -> Result<Applied<T>, ControlError> + Send + 'static,
    ) -> Result<Response<T::Response>, Status> {
        let state = Arc::clone(&self.state);
        let a = self.changes.run(move || Ok(f(&state)?)).await?;
        Ok(Response::new(T::response(
            Some(a.value.to_proto()),
            a.generation,
        )))
    }

    async fn create<T: Resource>(
        &self,
        r: T::CreateRequest,
    ) -> Result<Response<T::Response>, Status> {
        let obj = model::<T>(T::created(r))?;
        self.change(move |s| s.create(obj)).await
    }

    async fn update<T: Resource>(
        &self,
        r: T::UpdateRequest,
    ) -> Result<Response<T::Response>, Status> {
        let obj = model::<T>(T::updated(r))?;
        self.change(move |s| s.update(obj)).await
    }

    async fn delete<T: Resource>(
        &self,
        r: pb::DeleteRequest,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let state = Arc::clone(&self.state);
        let a = (self.changes)
            .run(move || Ok(state.delete::<T>(&r.name)?))
            .await?;
        Ok(Response::new(pb::DeleteResponse {
            generation: a.generation,
        }))
    }

    fn get<T: Resource>(&self, r: pb::GetRequest) -> Result<Response<T::Response>, Status> {
        let (v, generation) = self.state.get::<T>(&r.name)?;
        Ok(Response::new(T::response(Some(v.to_proto()), generation)))
    }

    fn list<T: Resource>(&self) -> Response<T::ListResponse> {
        let (all, generation) = self.state.list::<T>();
        Response::new(T::list_response(
            all.iter().map(T::to_proto).collect(),
            generation,
        ))
    }

    async fn add_member(
        &self,
        r: pb::AddPoolMemberRequest,
    ) -> Result<Response<pb::BackendPoolResponse>, Status> {
        let member = convert::require(r.member, "member").or_invalid()?;
        let member = convert::member_only_from(&r.backend_pool, member).or_invalid()?;
        self.change(move |s| s.add_member(&r.backend_pool, member))
            .await
    }

    async fn remove_member(
        &self,
        r: pb::RemovePoolMemberRequest,
    ) -> Result<Response<pb::BackendPoolResponse>, Status> {
        let addr = parse_addr("address", &r.address)?;
        self.change(move |s| s.remove_member(&r.backend_pool, addr))
            .await
    }

    async fn set_member(
        &self,
        r: pb::SetPoolMemberRequest,
    ) -> Result<Response<pb::BackendPoolResponse>, Status> {
        let addr = parse_addr("address", &r.address)?;
        let mut errs = Errors::default();
        let admin = r
            .admin_state
            .map(|a| convert::admin_from(&mut errs, "admin_state".into(), a));
        let drain_action = r
            .drain_action
            .map(|a| convert::drain_action_from(&mut errs, "drain_action".into(), a));
        if r.clear_drain_timeout && r.drain_timeout_seconds.is_some() {
            errs.push(
                "drain_timeout_seconds".into(),
                format!("{:?}", r.drain_timeout_seconds),
                "(none) with clear_drain_timeout",
                "either set a drain deadline or clear it",
            );
        }
        errs.finish(()).or_invalid()?;
        let change = MemberChange {
            weight: r.weight,
            admin_state: admin,
            drain_timeout_seconds: if r.clear_drain_timeout {
                Some(None)
            } else {
                r.drain_timeout_seconds.map(Some)
            },
            drain_action,
        };
        self.change(move |s| s.change_member(&r.backend_pool, addr, change))
            .await
    }
}

impl XlbService {
    /// A whole configuration, through the change queue like every other change.
    async fn apply_config(
        &self,
        r: pb::ApplyConfigRequest,
    ) -> Result<pb::ApplyConfigResponse, Status> {
        let config = convert::config_from(convert::require(r.config, "config").or_invalid()?)
            .or_invalid()?;
        let state = Arc::clone(&self.state);
        let dry_run = r.dry_run;
        let a = (self.changes)
            .run(move || Ok(state.apply_config(config, dry_run)?))
            .await?;
        Ok(pb::ApplyConfigResponse {
            changes: crate::config_diff::to_proto(&a.diff),
            generation: a.generation,
            applied: a.applied,
        })
    }
}

/// The model of a request's object (required; every bad field named).
fn model<T: Resource>(p: Option<T::Proto>) -> Result<T, Status> {
    T::from_proto(convert::require(p, T::FIELD).or_invalid()?).or_invalid()
}

/// Runs a read `f` on the blocking pool. A panic there becomes `INTERNAL` for this request only.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("request handler failed: {e}")))?
}

trait IntoStatus<T> {
    fn or_invalid(self) -> Result<T, Status>;
}

impl<T> IntoStatus<T> for Result<T, ValidationErrors> {
    fn or_invalid(self) -> Result<T, Status> {
        self.map_err(|e| crate::status::invalid_argument(&e))
    }
}

fn parse_addr(path: &str, text: &str) -> Result<IpAddr, Status> {
    let mut errs = Errors::default();
    let ip = convert::parse_ip(&mut errs, path.to_string(), text);
    errs.finish(ip).or_invalid()
}

/// The `Xlb` impl: the five generic methods for each kind listed, then the others, which
/// delegate to the inherent methods above and in [`reads`].
macro_rules! xlb_service {
    ($($kind:ty => $create:ident, $update:ident, $delete:ident, $get:ident, $list:ident;)*
     { $($rest:tt)* }) => {
        #[tonic::async_trait]
        impl Xlb for XlbService {
            $(
                async fn $create(
                    &self,
                    r: Request<<$kind as Resource>::CreateRequest>,
                ) -> Result<Response<<$kind as Resource>::Response>, Status> {
                    self.create::<$kind>(r.into_inner()).await
                }
                async fn $update(
                    &self,
                    r: Request<<$kind as Resource>::UpdateRequest>,
                ) -> Result<Response<<$kind as Resource>::Response>, Status> {
                    self.update::<$kind>(r.into_inner()).await
                }
                async fn $delete(
                    &self,
                    r: Request<pb::DeleteRequest>,
                ) -> Result<Response<pb::DeleteResponse>, Status> {
                    self.delete::<$kind>(r.into_inner()).await
                }
                async fn $get(
                    &self,
                    r: Request<pb::GetRequest>,
                ) -> Result<Response<<$kind as Resource>::Response>, Status> {
                    self.get::<$kind>(r.into_inner())
                }
                async fn $list(
                    &self,
                    _: Request<pb::ListRequest>,
                ) -> Result<Response<<$kind as Resource>::ListResponse>, Status> {
                    Ok(self.list::<$kind>())
                }
            )*
            $($rest)*
        }
    };
}

every_kind! {
    xlb_service
    {
        async fn add_pool_member(
            &self,
            r: Request<pb::AddPoolMemberRequest>,
        ) -> Result<Response<pb::BackendPoolResponse>, Status> {
            self.add_member(r.into_inner()).await
        }
        async fn remove_pool_member(
            &self,
            r: Request<pb::RemovePoolMemberRequest>,
        ) -> Result<Response<pb::BackendPoolResponse>, Status> {
            self.remove_member(r.into_inner()).await
        }
        async fn set_pool_member(
            &self,
            r: Request<pb::SetPoolMemberRequest>,
        ) -> Result<Response<pb::BackendPoolResponse>, Status> {
            self.set_member(r.into_inner()).await
        }
        async fn get_config(
            &self,
            _: Request<pb::GetConfigRequest>,
        ) -> Result<Response<pb::Config>, Status> {
            let s = self.state.snapshot();
            Ok(Response::new(convert::config_to(&s.config, s.generation)))
        }
        async fn apply_config(
            &self,
            r: Request<pb::ApplyConfigRequest>,
        ) -> Result<Response<pb::ApplyConfigResponse>, Status> {
            self.apply_config(r.into_inner()).await.map(Response::new)
        }
        async fn get_counters(
            &self,
            r: Request<pb::GetCountersRequest>,
        ) -> Result<Response<pb::GetCountersResponse>, Status> {
            self.counters(r.into_inner()).await.map(Response::new)
        }
        async fn list_flows(
            &self,
            r: Request<pb::ListFlowsRequest>,
        ) -> Result<Response<pb::ListFlowsResponse>, Status> {
            self.flows(r.into_inner()).await.map(Response::new)
        }

        type WatchEventsStream = reads::EventStream;

        async fn watch_events(
            &self,
            _: Request<pb::WatchEventsRequest>,
        ) -> Result<Response<reads::EventStream>, Status> {
            self.events().map(Response::new)
        }
        async fn get_status(
            &self,
            _: Request<pb::GetStatusRequest>,
        ) -> Result<Response<pb::GetStatusResponse>, Status> {
            self.status().await.map(Response::new)
        }
        async fn set_drain(
            &self,
            r: Request<pb::SetDrainRequest>,
        ) -> Result<Response<pb::ClusterStatus>, Status> {
            self.set_drain(r.into_inner()).await.map(Response::new)
        }
    }
}
