//! The command line of each object kind and of the reads.

use clap::{Args, ValueEnum};
use xlb_proto::v1 as pb;

#[derive(Args, Debug)]
pub struct FrontendArgs {
    /// Frontend name (unique among frontends).
    pub name: String,
    /// IPv4 or IPv6 address (required).
    #[arg(long)]
    pub address: Option<String>,
    /// public or internal (required; HA ports need internal).
    #[arg(long, value_enum)]
    pub kind: Option<KindArg>,
}

#[derive(Args, Debug)]
pub struct PoolArgs {
    /// Pool name (unique among pools).
    pub name: String,
    /// A member: ADDRESS[,weight=N][,admin=none|up|down][,drain_timeout=SECS]
    /// [,drain_action=reset|idle]; repeat for more. On update, the given members replace the
    /// pool's members.
    #[arg(long = "member", value_name = "MEMBER")]
    pub members: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LbRuleArgs {
    /// Rule name (unique among load-balancing rules).
    pub name: String,
    /// Frontend name (required).
    #[arg(long)]
    pub frontend: Option<String>,
    /// tcp, udp or all (required).
    #[arg(long, value_enum)]
    pub protocol: Option<ProtoArg>,
    /// 1–65535; 0 with protocol all on an internal frontend = HA ports (required).
    #[arg(long)]
    pub frontend_port: Option<u32>,
    /// Backend pool name (required).
    #[arg(long)]
    pub pool: Option<String>,
    /// 1–65535; 0 for HA ports (required).
    #[arg(long)]
    pub backend_port: Option<u32>,
    #[command(flatten)]
    pub flows: FlowArgs,
    /// Floating IP / direct server return (default false).
    #[arg(long)]
    pub floating_ip: Option<bool>,
    /// How a new flow picks its member (default five-tuple; source-ip: a client sticks to
    /// one member).
    #[arg(long, value_enum)]
    pub distribution: Option<DistArg>,
    /// Health probe name ("" removes it).
    #[arg(long)]
    pub probe: Option<String>,
}

#[derive(Args, Debug)]
pub struct NatRuleArgs {
    /// Rule name (unique among inbound NAT rules).
    pub name: String,
    /// Frontend name (required).
    #[arg(long)]
    pub frontend: Option<String>,
    /// tcp or udp (required).
    #[arg(long, value_enum)]
    pub protocol: Option<ProtoArg>,
    /// Single form: the frontend port (with --target).
    #[arg(long)]
    pub frontend_port: Option<u32>,
    /// Range form: START-END, port START+i forwards to member i of --pool.
    #[arg(long, value_name = "START-END")]
    pub frontend_port_range: Option<String>,
    /// Single form: the address to forward to.
    #[arg(long)]
    pub target: Option<String>,
    /// Backend pool ("" removes it).
    #[arg(long)]
    pub pool: Option<String>,
    /// 1–65535 (required).
    #[arg(long)]
    pub backend_port: Option<u32>,
    #[command(flatten)]
    pub flows: FlowArgs,
    /// Floating IP / direct server return (default false).
    #[arg(long)]
    pub floating_ip: Option<bool>,
}

#[derive(Args, Debug)]
pub struct OutboundRuleArgs {
    /// Rule name (unique among outbound rules).
    pub name: String,
    /// Frontend names whose IPs members' connections leave with (repeat; required).
    #[arg(long = "frontend")]
    pub frontends: Vec<String>,
    /// Backend pool whose members are SNATed (required).
    #[arg(long)]
    pub pool: Option<String>,
    /// tcp, udp or all (required).
    #[arg(long, value_enum)]
    pub protocol: Option<ProtoArg>,
    /// SNAT ports per member, a multiple of 8 (default: by pool size; 0 resets to default).
    #[arg(long)]
    pub ports: Option<u32>,
    #[command(flatten)]
    pub flows: FlowArgs,
}

/// What every rule kind says of its flows.
#[derive(Args, Debug)]
pub struct FlowArgs {
    /// TCP idle timeout in minutes: 4–30, outbound rules 4–100 (default 4).
    #[arg(long)]
    pub idle_timeout: Option<u32>,
    /// Send RSTs to both ends when an established flow times out idle (default false).
    #[arg(long)]
    pub tcp_reset: Option<bool>,
    /// TCP packets without a flow: drop (default), reset or pickup.
    #[arg(long, value_enum)]
    pub unknown_flow: Option<UnknownArg>,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Probe name (unique among probes).
    pub name: String,
    /// tcp, http or https (required).
    #[arg(long, value_enum)]
    pub protocol: Option<ProbeProtoArg>,
    /// 1–65535 (required).
    #[arg(long)]
    pub port: Option<u32>,
    /// HTTP path, starting with '/' ("" removes it).
    #[arg(long)]
    pub path: Option<String>,
    /// Seconds between probes, 1–3600 (default 5).
    #[arg(long)]
    pub interval: Option<u32>,
    /// Consecutive failures before a member is drained, 1–100 (default 2).
    #[arg(long)]
    pub threshold: Option<u32>,
    /// Seconds one attempt may take, 1–interval (default: the interval, at most 30; 0 goes
    /// back to the default).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u32>,
    /// HTTPS: check the member's certificate (default false).
    #[arg(long, value_name = "BOOL")]
    pub tls_verify: Option<bool>,
    /// HTTPS: the name sent in SNI and checked against the certificate ("" removes it: the
    /// member's address).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// HTTPS with --tls-verify: a PEM file of trusted CAs on xlbd's host ("" removes it: the
    /// system's trust store).
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<String>,
    /// HTTP(S): the status codes that count as healthy, CODE or LOW-HIGH within 100–599
    /// (default 200; "" goes back to it).
    #[arg(long, value_name = "CODES")]
    pub http_status: Option<String>,
}

#[derive(Args, Debug)]
pub struct FlowsArgs {
    #[arg(long)]
    pub rule: Option<String>,
    /// The address that opened the flow.
    #[arg(long)]
    pub client: Option<String>,
    /// The member the flow goes to (inbound) or comes from (outbound).
    #[arg(long)]
    pub backend: Option<String>,
    #[arg(long, value_enum)]
    pub protocol: Option<ProtoArg>,
    /// syn_sent, syn_received, established, closing, closed, reset, or udp.
    #[arg(long)]
    pub state: Option<String>,
    /// Flows per page (default 100, at most 1000).
    #[arg(long, default_value_t = 100)]
    pub page_size: u32,
    /// Continue from a previous page.
    #[arg(long)]
    pub page_token: Option<String>,
    /// Fetch every page.
    #[arg(long)]
    pub all: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KindArg {
    Public,
    Internal,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
    All,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProbeProtoArg {
    Tcp,
    Http,
    Https,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AdminArg {
    None,
    Up,
    Down,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DrainArg {
    Reset,
    Idle,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DistArg {
    FiveTuple,
    SourceIp,
    SourceIpProtocol,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum UnknownArg {
    Drop,
    Reset,
    Pickup,
}

impl ProtoArg {
    pub fn pb(self) -> i32 {
        (match self {
            ProtoArg::Tcp => pb::Protocol::Tcp,
            ProtoArg::Udp => pb::Protocol::Udp,
            ProtoArg::All => pb::Protocol::All,
        }) as i32
    }
}
impl AdminArg {
    pub fn pb(self) -> i32 {
        (match self {
            AdminArg::None => pb::AdminState::None,
            AdminArg::Up => pb::AdminState::Up,
            AdminArg::Down => pb::AdminState::Down,
        }) as i32
    }
}
impl DrainArg {
    pub fn pb(self) -> i32 {
        (match self {
            DrainArg::Reset => pb::DrainAction::Reset,
            DrainArg::Idle => pb::DrainAction::Idle,
        }) as i32
    }
}
impl UnknownArg {
    pub fn pb(self) -> i32 {
        (match self {
            UnknownArg::Drop => pb::UnknownFlowPolicy::Drop,
            UnknownArg::Reset => pb::UnknownFlowPolicy::Reset,
            UnknownArg::Pickup => pb::UnknownFlowPolicy::Pickup,
        }) as i32
    }
}

impl DistArg {
    pub fn pb(self) -> i32 {
        (match self {
            DistArg::FiveTuple => pb::Distribution::FiveTuple,
            DistArg::SourceIp => pb::Distribution::SourceIp,
            DistArg::SourceIpProtocol => pb::Distribution::SourceIpProtocol,
        }) as i32
    }
}
