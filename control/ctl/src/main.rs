//! `xlbctl`: the command-line client of xlbd's gRPC API.
//!
//! Every RPC is a subcommand. Output is an aligned table by default and JSON with `--json`
//! (configuration objects in the same shape as the TOML file). Exit codes: 0 success, 2
//! invalid input (refused by the server's validation or by argument parsing), 1 any other
//! failure, 3 `keepalive-check` found settings that do not keep connections alive.

use std::path::PathBuf;
use std::process::ExitCode;

mod args;
mod config;
mod connect;
mod kinds;
mod output;
mod reads;
mod status;

use clap::{Parser, Subcommand};
use tonic::{Code, Status};
use xlb_api::keepalive;
use xlb_api::server::{self, Client};
use xlb_api::status::validation_failure;
use xlb_engine::config::{
    BackendPool, Frontend, HealthProbe, InboundNatRule, LoadBalancingRule, OutboundRule,
};
use xlb_proto::v1 as pb;

use args::{
    AdminArg, DrainArg, FlowsArgs, FrontendArgs, LbRuleArgs, NatRuleArgs, OutboundRuleArgs,
    PoolArgs, ProbeArgs,
};
use kinds::{crud, show, Crud};

#[derive(Parser, Debug)]
#[command(
    name = "xlbctl",
    version,
    about = "Drive the xlb load balancer / NAT daemon (xlbd) over its gRPC API.",
    long_about = "Drive the xlb load balancer / NAT daemon (xlbd) over its gRPC API.\n\n\
        Objects: frontends (VIPs), backend pools and their members, load-balancing rules, \
        inbound NAT rules, outbound (SNAT) rules, health probes. Every change is validated, \
        compiled and applied to every worker atomically, or not at all.\n\n\
        Exit codes: 0 ok, 1 failure, 2 invalid input, 3 keepalive-check NOT OK."
)]
pub struct Cli {
    /// Unix socket of the daemon.
    #[arg(long, global = true, help_heading = "Connection", value_name = "PATH", default_value = server::DEFAULT_SOCKET, env = "XLB_SOCKET")]
    socket: PathBuf,
    /// TCP address of the daemon instead of the socket: HOST:PORT or http://HOST:PORT
    /// (plaintext), https://HOST:PORT (TLS; also implied by the --tls-* options).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "TARGET",
        env = "XLB_ADDR"
    )]
    addr: Option<String>,
    /// File holding the bearer token (surrounding whitespace trimmed). The token itself may
    /// be given in the environment as XLB_TOKEN instead; never on the command line.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        env = "XLB_TOKEN_FILE"
    )]
    token_file: Option<PathBuf>,
    /// Refused: a token on the command line is visible to every user in `ps`.
    #[arg(long, global = true, hide = true, value_name = "TOKEN")]
    token: Option<String>,
    /// CA certificate (PEM) that signed the daemon's TLS certificate (default with TLS: the
    /// system's trusted roots).
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        env = "XLB_TLS_CA"
    )]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for daemons that require one (mutual TLS); with --tls-key.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        env = "XLB_TLS_CERT",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        env = "XLB_TLS_KEY",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Name to verify the daemon's certificate against (default: the host of --addr).
    #[arg(long, global = true, help_heading = "Connection", value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true, help_heading = "Output")]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Frontends: the addresses clients reach (VIPs) and SNAT addresses.
    #[command(subcommand)]
    Frontend(Crud<FrontendArgs>),
    /// Backend pools (members are changed with `xlbctl member`).
    #[command(subcommand)]
    Pool(Crud<PoolArgs>),
    /// Pool members: add, remove, or set weight / admin state.
    #[command(subcommand)]
    Member(MemberCmd),
    /// Load-balancing rules.
    #[command(subcommand, name = "lb-rule")]
    LbRule(Crud<LbRuleArgs>),
    /// Inbound NAT rules (port forwarding).
    #[command(subcommand, name = "nat-rule")]
    NatRule(Crud<NatRuleArgs>),
    /// Outbound rules (SNAT of members' connections).
    #[command(subcommand, name = "outbound-rule")]
    OutboundRule(Crud<OutboundRuleArgs>),
    /// Health probes.
    #[command(subcommand)]
    Probe(Crud<ProbeArgs>),
    /// The whole configuration: get it (as the TOML file would hold it), or apply a file
    /// as one generation (`apply`, `diff`). Without a subcommand: get.
    Config {
        #[command(subcommand)]
        cmd: Option<config::ConfigCmd>,
    },
    /// Counters per rule, drops by reason, SNAT ports per member.
    Counters {
        /// Only this rule.
        #[arg(long)]
        rule: Option<String>,
        /// Also show each worker's counters.
        #[arg(long)]
        per_worker: bool,
    },
    /// Live flows, filtered.
    Flows(FlowsArgs),
    /// Stream events (reset on idle, SNAT exhaustion, probe changes, generations applied).
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Daemon status: generation, workers, poll mode, lab time scale, uptime, version.
    Status,
    /// Cluster node: withdraw this node's frontends from the router (`on`; existing flows go
    /// on until they end or the deadline) or announce them again when fit (`off`).
    Drain {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// Seconds existing flows may keep the drained node busy (0: no deadline).
        #[arg(long, default_value_t = 0.0)]
        deadline: f64,
    },
    /// Check whether this host's TCP keepalive settings keep idle connections alive through
    /// a rule's idle timeout, and print the fix if not.
    KeepaliveCheck {
        /// The rule (load-balancing, inbound NAT or outbound).
        #[arg(long)]
        rule: String,
        /// Where tcp_keepalive_{time,intvl,probes} are read.
        #[arg(long, value_name = "DIR", default_value = keepalive::DEFAULT_SYSCTL_DIR)]
        sysctl_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum MemberCmd {
    /// Add a member to a pool.
    Add {
        pool: String,
        address: String,
        /// Share of new flows, 1–1000 (default 1).
        #[arg(long)]
        weight: Option<u32>,
        /// none (default): probes decide; up: always eligible; down: no new flows.
        #[arg(long, value_enum)]
        admin_state: Option<AdminArg>,
        /// Drain deadline, 0–3600 s after the admin state becomes down (default: none).
        #[arg(long, value_name = "SECS")]
        drain_timeout: Option<u32>,
        /// What the deadline does to the remaining flows: reset (default) or idle.
        #[arg(long, value_enum)]
        drain_action: Option<DrainArg>,
    },
    /// Remove a member from a pool.
    Remove { pool: String, address: String },
    /// Change a member's weight, admin state and/or drain deadline.
    Set {
        pool: String,
        address: String,
        /// Share of new flows, 1–1000.
        #[arg(long)]
        weight: Option<u32>,
        /// none: probes decide; up: always eligible; down: no new flows (drain).
        #[arg(long, value_enum)]
        admin_state: Option<AdminArg>,
        /// Drain deadline in seconds after the drain began, 0–3600, or "none" (drained until
        /// undrained). Counts from when the admin state became down.
        #[arg(long, value_name = "SECS|none")]
        drain_timeout: Option<String>,
        /// What the deadline does to the remaining flows: reset (RSTs to both ends of every
        /// established TCP flow) or idle (nothing; they run until they close or idle out).
        #[arg(long, value_enum)]
        drain_action: Option<DrainArg>,
    },
}

/// Why the command failed, and so its exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad input (exit 2): each line printed as `error: …`.
    Invalid(Vec<String>),
    /// Anything else (exit 1).
    Other(String),
    /// keepalive-check: NOT OK (exit 3); the report was printed.
    CheckFailed,
}

impl From<Status> for Failure {
    fn from(s: Status) -> Failure {
        if s.code() == Code::InvalidArgument {
            if let Some(v) = validation_failure(&s) {
                return Failure::Invalid(
                    v.violations
                        .iter()
                        .map(|e| {
                            format!(
                                "{} = {}: {} (allowed: {})",
                                e.path, e.value, e.message, e.allowed
                            )
                        })
                        .collect(),
                );
            }
            return Failure::Invalid(vec![s.message().to_string()]);
        }
        // Transport failures (TLS alerts, refused connections) are told in the sources.
        let mut msg = format!("{:?}: {}", s.code(), s.message());
        let mut cur = std::error::Error::source(&s);
        while let Some(c) = cur {
            msg.push_str(&format!(": {c}"));
            cur = c.source();
        }
        Failure::Other(msg)
    }
}

impl From<xlb_engine::ValidationErrors> for Failure {
    fn from(e: xlb_engine::ValidationErrors) -> Failure {
        Failure::Invalid(e.iter().map(ToString::to_string).collect())
    }
}

pub fn invalid(msg: impl Into<String>) -> Failure {
    Failure::Invalid(vec![msg.into()])
}

pub type Res<T = ()> = Result<T, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Invalid(lines)) => {
            for l in lines {
                eprintln!("error: {l}");
            }
            ExitCode::from(2)
        }
        Err(Failure::Other(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
        Err(Failure::CheckFailed) => ExitCode::from(3),
    }
}

async fn run(cli: Cli) -> Res {
    let mut c = connect::connect(&cli).await?;
    let json = cli.json;
    match cli.command {
        Command::Frontend(cmd) => crud::<Frontend>(&mut c, cmd, json).await,
        Command::Pool(cmd) => crud::<BackendPool>(&mut c, cmd, json).await,
        Command::Member(cmd) => member(&mut c, cmd, json).await,
        Command::LbRule(cmd) => crud::<LoadBalancingRule>(&mut c, cmd, json).await,
        Command::NatRule(cmd) => crud::<InboundNatRule>(&mut c, cmd, json).await,
        Command::OutboundRule(cmd) => crud::<OutboundRule>(&mut c, cmd, json).await,
        Command::Probe(cmd) => crud::<HealthProbe>(&mut c, cmd, json).await,
        Command::Config { cmd } => config::config(&mut c, cmd, json).await,
        Command::Counters { rule, per_worker } => {
            reads::counters(&mut c, rule, per_worker, json).await
        }
        Command::Flows(args) => reads::flows(&mut c, args, json).await,
        Command::Events { count } => reads::events(&mut c, count, json).await,
        Command::Status => status::status(&mut c, json).await,
        Command::Drain { state, deadline } => {
            status::drain(&mut c, state == "on", deadline, json).await
        }
        Command::KeepaliveCheck { rule, sysctl_dir } => {
            status::keepalive_check(&mut c, &rule, &sysctl_dir, json).await
        }
    }
}

async fn member(c: &mut Client, cmd: MemberCmd, json: bool) -> Res {
    let r = match cmd {
        MemberCmd::Add {
            pool,
            address,
            weight,
            admin_state,
            drain_timeout,
            drain_action,
        } => {
            let m = pb::Member {
                address,
                weight,
                admin_state: admin_state.map_or(0, AdminArg::pb),
                drain_timeout_seconds: drain_timeout,
                drain_action: drain_action.map_or(0, DrainArg::pb),
            };
            c.add_pool_member(pb::AddPoolMemberRequest {
                backend_pool: pool,
                member: Some(m),
            })
            .await?
        }
        MemberCmd::Remove { pool, address } => {
            c.remove_pool_member(pb::RemovePoolMemberRequest {
                backend_pool: pool,
                address,
            })
            .await?
        }
        MemberCmd::Set {
            pool,
            address,
            weight,
            admin_state,
            drain_timeout,
            drain_action,
        } => {
            if weight.is_none()
                && admin_state.is_none()
                && drain_timeout.is_none()
                && drain_action.is_none()
            {
                return Err(invalid(
                    "member set: give --weight, --admin-state, --drain-timeout and/or \
                     --drain-action",
                ));
            }
            let (drain_timeout_seconds, clear_drain_timeout) = drain_timeout_arg(drain_timeout)?;
            c.set_pool_member(pb::SetPoolMemberRequest {
                backend_pool: pool,
                address,
                weight,
                admin_state: admin_state.map(AdminArg::pb),
                drain_timeout_seconds,
                drain_action: drain_action.map(DrainArg::pb),
                clear_drain_timeout,
            })
            .await?
        }
    }
    .into_inner();
    show::<BackendPool>(
        r.backend_pool.into_iter().collect(),
        r.generation,
        json,
        Some("updated"),
    )
}

/// `--drain-timeout SECS|none`: the deadline to set, or whether to clear it.
fn drain_timeout_arg(v: Option<String>) -> Res<(Option<u32>, bool)> {
    match v.as_deref() {
        None => Ok((None, false)),
        Some("none") => Ok((None, true)),
        Some(t) => t.parse().map(|t| (Some(t), false)).map_err(|_| {
            invalid(format!(
                "drain_timeout_seconds = {t:?}: seconds after the drain began, or none \
                 (allowed: 0–3600, none)"
            ))
        }),
    }
}
