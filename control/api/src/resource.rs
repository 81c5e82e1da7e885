//! Every configuration object kind described once: [`Resource`] is [`Object`] (how
//! [`crate::ControlState`] finds, creates, updates and deletes it) plus its proto form and the
//! request and answer messages that carry it. The gRPC service's create / update / delete /
//! get / list methods and `xlbctl`'s per-kind commands are written once over it.
//!
//! (The proto types live in `xlb-proto` and the model in `xlb-engine`: Rust's orphan rule
//! allows no `TryFrom` / `From` impls between two foreign types, so the conversions are the
//! trait's own functions.)

use std::future::Future;
use xlb_engine::config::{
    BackendPool, Frontend, HealthProbe, InboundNatRule, LoadBalancingRule, OutboundRule,
};

use tonic::Status;
use xlb_engine::ValidationErrors;
use xlb_proto::v1 as pb;

use crate::convert;
use crate::server::Client;
use crate::state::Object;

/// A configuration object kind with its proto messages.
pub trait Resource: Object + serde::Serialize {
    /// The object in proto form.
    type Proto: Clone + Default + Send + std::fmt::Debug + 'static;
    type CreateRequest: Send + 'static;
    type UpdateRequest: Send + 'static;
    /// The answer to create, update and get: the object and the generation.
    type Response: Send + 'static;
    type ListResponse: Send + 'static;

    /// The request's field that holds the object (`frontend`, `rule`, …), for error paths.
    const FIELD: &'static str;
    /// The configuration's table of this kind (`frontends`, `load_balancing_rules`, …).
    const TABLE: &'static str;

    /// Proto → model; text and enum values that do not parse name their field.
    fn from_proto(p: Self::Proto) -> Result<Self, ValidationErrors>;
    /// Model → proto, with every default made explicit.
    fn to_proto(&self) -> Self::Proto;

    fn create_request(p: Self::Proto) -> Self::CreateRequest;
    fn update_request(p: Self::Proto) -> Self::UpdateRequest;
    fn created(r: Self::CreateRequest) -> Option<Self::Proto>;
    fn updated(r: Self::UpdateRequest) -> Option<Self::Proto>;
    fn response(p: Option<Self::Proto>, generation: u64) -> Self::Response;
    fn list_response(all: Vec<Self::Proto>, generation: u64) -> Self::ListResponse;
    /// The object and generation of an answer.
    fn answer(r: Self::Response) -> (Option<Self::Proto>, u64);
    fn list_answer(r: Self::ListResponse) -> (Vec<Self::Proto>, u64);
}

macro_rules! resources {
    ($($model:ty => $proto:ty, $field:ident, $list_field:ident, $table:literal,
       $from:path, $to:path, $create:path, $update:path, $response:path, $list:path;)*) => {$(
        impl Resource for $model {
            type Proto = $proto;
            type CreateRequest = $create;
            type UpdateRequest = $update;
            type Response = $response;
            type ListResponse = $list;
            const FIELD: &'static str = stringify!($field);
            const TABLE: &'static str = $table;

            fn from_proto(p: $proto) -> Result<Self, ValidationErrors> {
                $from(p)
            }
            fn to_proto(&self) -> $proto {
                $to(self)
            }
            fn create_request(p: $proto) -> $create {
                $create { $field: Some(p) }
            }
            fn update_request(p: $proto) -> $update {
                $update { $field: Some(p) }
            }
            fn created(r: $create) -> Option<$proto> {
                r.$field
            }
            fn updated(r: $update) -> Option<$proto> {
                r.$field
            }
            fn response($field: Option<$proto>, generation: u64) -> $response {
                $response { $field, generation }
            }
            fn list_response($list_field: Vec<$proto>, generation: u64) -> $list {
                $list { $list_field, generation }
            }
            fn answer(r: $response) -> (Option<$proto>, u64) {
                (r.$field, r.generation)
            }
            fn list_answer(r: $list) -> (Vec<$proto>, u64) {
                (r.$list_field, r.generation)
            }
        }
    )*};
}

// model => proto, its field in requests and answers, in list answers, the configuration table,
// proto → model, model → proto, then the messages.
resources! {
    Frontend => pb::Frontend, frontend, frontends, "frontends",
        convert::frontend_from, convert::frontend_to, pb::CreateFrontendRequest,
        pb::UpdateFrontendRequest, pb::FrontendResponse, pb::ListFrontendsResponse;
    BackendPool => pb::BackendPool, backend_pool, backend_pools, "backend_pools",
        convert::pool_from, convert::pool_to, pb::CreateBackendPoolRequest,
        pb::UpdateBackendPoolRequest, pb::BackendPoolResponse, pb::ListBackendPoolsResponse;
    HealthProbe => pb::HealthProbe, probe, probes, "health_probes",
        convert::probe_from, convert::probe_to, pb::CreateHealthProbeRequest,
        pb::UpdateHealthProbeRequest, pb::HealthProbeResponse, pb::ListHealthProbesResponse;
    LoadBalancingRule => pb::LoadBalancingRule, rule, rules, "load_balancing_rules",
        convert::lb_rule_from, convert::lb_rule_to, pb::CreateLoadBalancingRuleRequest,
        pb::UpdateLoadBalancingRuleRequest, pb::LoadBalancingRuleResponse,
        pb::ListLoadBalancingRulesResponse;
    InboundNatRule => pb::InboundNatRule, rule, rules, "inbound_nat_rules",
        convert::nat_rule_from, convert::nat_rule_to, pb::CreateInboundNatRuleRequest,
        pb::UpdateInboundNatRuleRequest, pb::InboundNatRuleResponse,
        pb::ListInboundNatRulesResponse;
    OutboundRule => pb::OutboundRule, rule, rules, "outbound_rules",
        convert::outbound_rule_from, convert::outbound_rule_to, pb::CreateOutboundRuleRequest,
        pb::UpdateOutboundRuleRequest, pb::OutboundRuleResponse, pb::ListOutboundRulesResponse;
}

/// Calls `$m!` with every kind and its five RPCs (create, update, delete, get, list), then
/// whatever else is given: the one list that the service and the client are written from.
macro_rules! every_kind {
    ($m:ident $($extra:tt)*) => {
        $m! {
            Frontend => create_frontend, update_frontend, delete_frontend, get_frontend,
                list_frontends;
            BackendPool => create_backend_pool, update_backend_pool, delete_backend_pool,
                get_backend_pool, list_backend_pools;
            LoadBalancingRule => create_load_balancing_rule, update_load_balancing_rule,
                delete_load_balancing_rule, get_load_balancing_rule, list_load_balancing_rules;
            InboundNatRule => create_inbound_nat_rule, update_inbound_nat_rule,
                delete_inbound_nat_rule, get_inbound_nat_rule, list_inbound_nat_rules;
            OutboundRule => create_outbound_rule, update_outbound_rule, delete_outbound_rule,
                get_outbound_rule, list_outbound_rules;
            HealthProbe => create_health_probe, update_health_probe, delete_health_probe,
                get_health_probe, list_health_probes;
            $($extra)*
        }
    };
}
pub(crate) use every_kind;

/// The client side of a kind: its five RPCs through the generated client ([`Client`]).
pub trait Remote: Resource {
    fn create(
        c: &mut Client,
        r: Self::CreateRequest,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send;
    fn update(
        c: &mut Client,
        r: Self::UpdateRequest,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send;
    fn delete(
        c: &mut Client,
        name: String,
    ) -> impl Future<Output = Result<pb::DeleteResponse, Status>> + Send;
    fn get(
        c: &mut Client,
        name: String,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send;
    fn list(c: &mut Client) -> impl Future<Output = Result<Self::ListResponse, Status>> + Send;
}

macro_rules! remote {
    ($($kind:ty => $create:ident, $update:ident, $delete:ident, $get:ident, $list:ident;)*) => {$(
        impl Remote for $kind {
            async fn create(
                c: &mut Client,
                r: <$kind as Resource>::CreateRequest,
            ) -> Result<<$kind as Resource>::Response, Status> {
                Ok(c.$create(r).await?.into_inner())
            }
            async fn update(
                c: &mut Client,
                r: <$kind as Resource>::UpdateRequest,
            ) -> Result<<$kind as Resource>::Response, Status> {
                Ok(c.$update(r).await?.into_inner())
            }
            async fn delete(c: &mut Client, name: String) -> Result<pb::DeleteResponse, Status> {
                Ok(c.$delete(pb::DeleteRequest { name }).await?.into_inner())
            }
            async fn get(
                c: &mut Client,
                name: String,
            ) -> Result<<$kind as Resource>::Response, Status> {
                Ok(c.$get(pb::GetRequest { name }).await?.into_inner())
            }
            async fn list(c: &mut Client) -> Result<<$kind as Resource>::ListResponse, Status> {
                Ok(c.$list(pb::ListRequest {}).await?.into_inner())
            }
        }
    )*};
}

every_kind!(remote);
