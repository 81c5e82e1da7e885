//! `xlbctl`: the command-line client of xlbd's gRPC API.
//!
//! Every RPC is a subcommand. Output is an aligned table by default and JSON with `--json`
//! (configuration objects in the same shape as the TOML file). Exit codes: 0 success, 2
//! invalid input (refused by the server's validation or by argument parsing), 1 any other
//! failure, 3 `keepalive-check` found settings that do not keep connections alive.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::{Code, Status};
use xlb_api::convert;
use xlb_api::keepalive;
use xlb_api::server::{self, BearerToken, Client, ClientTls, Listen};
use xlb_api::status::validation_failure;
use xlb_proto::v1 as pb;

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
struct Cli {
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
    /// The whole configuration (as the TOML file would hold it).
    Config,
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

/// create / update / delete / get / list of one object kind.
#[derive(Subcommand, Debug)]
enum Crud<A: Args> {
    /// Create; fields marked "required" must be given.
    Create(A),
    /// Change the given fields; the others keep their values.
    Update(A),
    /// Delete (refused while a rule references it).
    Delete { name: String },
    /// Show one.
    Get { name: String },
    /// Show all.
    List,
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
    },
    /// Remove a member from a pool.
    Remove { pool: String, address: String },
    /// Change a member's weight and/or admin state.
    Set {
        pool: String,
        address: String,
        /// Share of new flows, 1–1000.
        #[arg(long)]
        weight: Option<u32>,
        /// none: probes decide; up: always eligible; down: no new flows (drain).
        #[arg(long, value_enum)]
        admin_state: Option<AdminArg>,
    },
}

#[derive(Args, Debug)]
struct FrontendArgs {
    /// Frontend name (unique among frontends).
    name: String,
    /// IPv4 or IPv6 address (required).
    #[arg(long)]
    address: Option<String>,
    /// public or internal (required; HA ports need internal).
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
}

#[derive(Args, Debug)]
struct PoolArgs {
    /// Pool name (unique among pools).
    name: String,
    /// A member: ADDRESS[,weight=N][,admin=none|up|down]; repeat for more. On update, the
    /// given members replace the pool's members.
    #[arg(long = "member", value_name = "MEMBER")]
    members: Vec<String>,
}

#[derive(Args, Debug)]
struct LbRuleArgs {
    /// Rule name (unique among load-balancing rules).
    name: String,
    /// Frontend name (required).
    #[arg(long)]
    frontend: Option<String>,
    /// tcp, udp or all (required).
    #[arg(long, value_enum)]
    protocol: Option<ProtoArg>,
    /// 1–65535; 0 with protocol all on an internal frontend = HA ports (required).
    #[arg(long)]
    frontend_port: Option<u32>,
    /// Backend pool name (required).
    #[arg(long)]
    pool: Option<String>,
    /// 1–65535; 0 for HA ports (required).
    #[arg(long)]
    backend_port: Option<u32>,
    /// TCP idle timeout in minutes, 4–30 (default 4).
    #[arg(long)]
    idle_timeout: Option<u32>,
    /// Send RSTs to both ends when an established flow times out idle (default false).
    #[arg(long)]
    tcp_reset: Option<bool>,
    /// Floating IP / direct server return (default false).
    #[arg(long)]
    floating_ip: Option<bool>,
    /// How a new flow picks its member (default five-tuple; source-ip: a client sticks to
    /// one member).
    #[arg(long, value_enum)]
    distribution: Option<DistArg>,
    /// Health probe name ("" removes it).
    #[arg(long)]
    probe: Option<String>,
    /// TCP packets without a flow: drop (default), reset or pickup.
    #[arg(long, value_enum)]
    unknown_flow: Option<UnknownArg>,
}

#[derive(Args, Debug)]
struct NatRuleArgs {
    /// Rule name (unique among inbound NAT rules).
    name: String,
    /// Frontend name (required).
    #[arg(long)]
    frontend: Option<String>,
    /// tcp or udp (required).
    #[arg(long, value_enum)]
    protocol: Option<ProtoArg>,
    /// Single form: the frontend port (with --target).
    #[arg(long)]
    frontend_port: Option<u32>,
    /// Range form: START-END, port START+i forwards to member i of --pool.
    #[arg(long, value_name = "START-END")]
    frontend_port_range: Option<String>,
    /// Single form: the address to forward to.
    #[arg(long)]
    target: Option<String>,
    /// Backend pool ("" removes it).
    #[arg(long)]
    pool: Option<String>,
    /// 1–65535 (required).
    #[arg(long)]
    backend_port: Option<u32>,
    /// TCP idle timeout in minutes, 4–30 (default 4).
    #[arg(long)]
    idle_timeout: Option<u32>,
    #[arg(long)]
    tcp_reset: Option<bool>,
    #[arg(long)]
    floating_ip: Option<bool>,
    #[arg(long, value_enum)]
    unknown_flow: Option<UnknownArg>,
}

#[derive(Args, Debug)]
struct OutboundRuleArgs {
    /// Rule name (unique among outbound rules).
    name: String,
    /// Frontend names whose IPs members' connections leave with (repeat; required).
    #[arg(long = "frontend")]
    frontends: Vec<String>,
    /// Backend pool whose members are SNATed (required).
    #[arg(long)]
    pool: Option<String>,
    /// tcp, udp or all (required).
    #[arg(long, value_enum)]
    protocol: Option<ProtoArg>,
    /// SNAT ports per member, a multiple of 8 (default: by pool size; 0 resets to default).
    #[arg(long)]
    ports: Option<u32>,
    /// TCP idle timeout in minutes, 4–100 (default 4).
    #[arg(long)]
    idle_timeout: Option<u32>,
    #[arg(long)]
    tcp_reset: Option<bool>,
    #[arg(long, value_enum)]
    unknown_flow: Option<UnknownArg>,
}

#[derive(Args, Debug)]
struct ProbeArgs {
    /// Probe name (unique among probes).
    name: String,
    /// tcp or http (required).
    #[arg(long, value_enum)]
    protocol: Option<ProbeProtoArg>,
    /// 1–65535 (required).
    #[arg(long)]
    port: Option<u32>,
    /// HTTP path, starting with '/' ("" removes it).
    #[arg(long)]
    path: Option<String>,
    /// Seconds between probes, 1–3600 (default 5).
    #[arg(long)]
    interval: Option<u32>,
    /// Consecutive failures before a member is drained, 1–100 (default 2).
    #[arg(long)]
    threshold: Option<u32>,
}

#[derive(Args, Debug)]
struct FlowsArgs {
    #[arg(long)]
    rule: Option<String>,
    /// The address that opened the flow.
    #[arg(long)]
    client: Option<String>,
    /// The member the flow goes to (inbound) or comes from (outbound).
    #[arg(long)]
    backend: Option<String>,
    #[arg(long, value_enum)]
    protocol: Option<ProtoArg>,
    /// syn_sent, syn_received, established, closing, closed, reset, or udp.
    #[arg(long)]
    state: Option<String>,
    /// Flows per page (default 100, at most 1000).
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// Continue from a previous page.
    #[arg(long)]
    page_token: Option<String>,
    /// Fetch every page.
    #[arg(long)]
    all: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KindArg {
    Public,
    Internal,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProtoArg {
    Tcp,
    Udp,
    All,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProbeProtoArg {
    Tcp,
    Http,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
enum AdminArg {
    None,
    Up,
    Down,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
enum DistArg {
    FiveTuple,
    SourceIp,
    SourceIpProtocol,
}
#[derive(Clone, Copy, Debug, ValueEnum)]
enum UnknownArg {
    Drop,
    Reset,
    Pickup,
}

impl ProtoArg {
    fn pb(self) -> i32 {
        (match self {
            ProtoArg::Tcp => pb::Protocol::Tcp,
            ProtoArg::Udp => pb::Protocol::Udp,
            ProtoArg::All => pb::Protocol::All,
        }) as i32
    }
}
impl AdminArg {
    fn pb(self) -> i32 {
        (match self {
            AdminArg::None => pb::AdminState::None,
            AdminArg::Up => pb::AdminState::Up,
            AdminArg::Down => pb::AdminState::Down,
        }) as i32
    }
}
impl UnknownArg {
    fn pb(self) -> i32 {
        (match self {
            UnknownArg::Drop => pb::UnknownFlowPolicy::Drop,
            UnknownArg::Reset => pb::UnknownFlowPolicy::Reset,
            UnknownArg::Pickup => pb::UnknownFlowPolicy::Pickup,
        }) as i32
    }
}

/// Why the command failed, and so its exit code.
enum Failure {
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

fn invalid(msg: impl Into<String>) -> Failure {
    Failure::Invalid(vec![msg.into()])
}

type Res<T = ()> = Result<T, Failure>;

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

/// The bearer token: `--token-file`, else `XLB_TOKEN`; `--token` is refused.
fn token(cli: &Cli) -> Res<Option<String>> {
    if cli.token.is_some() {
        return Err(invalid(
            "--token is refused: a token on the command line is visible to every user in `ps`. \
             Put it in a file only you can read and pass --token-file FILE, or set XLB_TOKEN",
        ));
    }
    if let Some(path) = &cli.token_file {
        let t = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("--token-file {}: {e}", path.display())))?;
        let t = t.trim();
        if t.is_empty() {
            return Err(invalid(format!(
                "--token-file {}: the file is empty",
                path.display()
            )));
        }
        return Ok(Some(t.to_string()));
    }
    Ok(std::env::var("XLB_TOKEN").ok().filter(|t| !t.is_empty()))
}

fn read_pem(flag: &str, path: &Path) -> Res<Vec<u8>> {
    std::fs::read(path).map_err(|e| invalid(format!("{flag} {}: {e}", path.display())))
}

/// TLS settings when any is given (`None`: no --tls-* option).
fn client_tls(cli: &Cli) -> Res<Option<ClientTls>> {
    if cli.tls_ca.is_none() && cli.tls_cert.is_none() && cli.tls_server_name.is_none() {
        return Ok(None);
    }
    let identity = match (&cli.tls_cert, &cli.tls_key) {
        (Some(c), Some(k)) => Some((read_pem("--tls-cert", c)?, read_pem("--tls-key", k)?)),
        _ => None,
    };
    Ok(Some(ClientTls {
        ca_pem: cli
            .tls_ca
            .as_deref()
            .map(|p| read_pem("--tls-ca", p))
            .transpose()?,
        identity,
        server_name: cli.tls_server_name.clone(),
    }))
}

async fn connect(cli: &Cli) -> Res<Client> {
    let token =
        BearerToken::new(token(cli)?.as_deref()).map_err(|s| invalid(s.message().to_string()))?;
    let tls = client_tls(cli)?;
    let channel = match &cli.addr {
        None => {
            if tls.is_some() {
                return Err(invalid(
                    "the --tls-* options need a TCP daemon (--addr https://HOST:PORT); the Unix \
                     socket has no TLS",
                ));
            }
            let p = &cli.socket;
            server::channel(&Listen::Unix(p.clone()))
                .await
                .map_err(|e| {
                    Failure::Other(format!("cannot connect to xlbd at {}: {e}", p.display()))
                })?
        }
        Some(a) => {
            let (tls_scheme, hostport) = if let Some(rest) = a.strip_prefix("https://") {
                (true, rest)
            } else if let Some(rest) = a.strip_prefix("http://") {
                if tls.is_some() {
                    return Err(invalid(format!(
                        "--addr {a:?} is plaintext but --tls-* options were given; use https://"
                    )));
                }
                (false, rest)
            } else {
                (false, a.as_str())
            };
            let hostport = hostport.trim_end_matches('/');
            if tls_scheme || tls.is_some() {
                let uri = format!("https://{hostport}");
                server::channel_tls(&uri, &tls.unwrap_or_default())
                    .await
                    .map_err(|e| {
                        Failure::Other(format!(
                            "cannot connect to xlbd at {uri}: {}",
                            server::error_chain(&e)
                        ))
                    })?
            } else {
                let addr: SocketAddr = tokio::net::lookup_host(hostport)
                    .await
                    .ok()
                    .and_then(|mut i| i.next())
                    .ok_or_else(|| {
                        invalid(format!("--addr = {a:?}: not a host:port that resolves"))
                    })?;
                server::channel(&Listen::Tcp(addr))
                    .await
                    .map_err(|e| Failure::Other(format!("cannot connect to xlbd at {addr}: {e}")))?
            }
        }
    };
    Ok(server::client(channel, token))
}

async fn run(cli: Cli) -> Res {
    let mut c = connect(&cli).await?;
    let json = cli.json;
    match cli.command {
        Command::Frontend(cmd) => frontend(&mut c, cmd, json).await,
        Command::Pool(cmd) => pool(&mut c, cmd, json).await,
        Command::Member(cmd) => member(&mut c, cmd, json).await,
        Command::LbRule(cmd) => lb_rule(&mut c, cmd, json).await,
        Command::NatRule(cmd) => nat_rule(&mut c, cmd, json).await,
        Command::OutboundRule(cmd) => outbound_rule(&mut c, cmd, json).await,
        Command::Probe(cmd) => probe(&mut c, cmd, json).await,
        Command::Config => {
            let cfg = c.get_config(pb::GetConfigRequest {}).await?.into_inner();
            let generation = cfg.generation;
            let model = convert::config_from(cfg)?;
            if json {
                print_json(&json!({"generation": generation, "config": model}));
            } else {
                let text = model
                    .to_toml_string()
                    .map_err(|e| Failure::Other(e.to_string()))?;
                println!("# generation {generation}\n{text}");
            }
            Ok(())
        }
        Command::Counters { rule, per_worker } => counters(&mut c, rule, per_worker, json).await,
        Command::Flows(args) => flows(&mut c, args, json).await,
        Command::Events { count } => events(&mut c, count, json).await,
        Command::Status => status(&mut c, json).await,
        Command::KeepaliveCheck { rule, sysctl_dir } => {
            keepalive_check(&mut c, &rule, &sysctl_dir, json).await
        }
    }
}

// ---------------------------------------------------------------------------------------
// Output.

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows as columns aligned on the widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn changed(verb: &str, kind: &str, name: &str, generation: u64) {
    println!("{verb} {kind} {name:?} (generation {generation})");
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), ToString::to_string)
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// `""` given for an optional text field clears it.
fn clear_empty(v: String) -> Option<String> {
    (!v.is_empty()).then_some(v)
}

// ---------------------------------------------------------------------------------------
// Frontends.

fn frontend_rows(items: &[xlb_engine::config::Frontend]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|f| {
            vec![
                f.name.clone(),
                f.address.to_string(),
                to_json(&f.kind).as_str().unwrap_or("").to_string(),
            ]
        })
        .collect()
}

fn show_frontends(
    items: Vec<pb::Frontend>,
    generation: u64,
    json: bool,
    verb: Option<&str>,
) -> Res {
    let model = items
        .into_iter()
        .map(convert::frontend_from)
        .collect::<Result<Vec<_>, _>>()?;
    if json {
        print_json(&json!({"generation": generation, "frontends": model}));
        return Ok(());
    }
    if let (Some(verb), Some(f)) = (verb, model.first()) {
        changed(verb, "frontend", &f.name, generation);
    }
    table(&["NAME", "ADDRESS", "KIND"], &frontend_rows(&model));
    Ok(())
}

async fn frontend(c: &mut Client, cmd: Crud<FrontendArgs>, json: bool) -> Res {
    let apply = |mut f: pb::Frontend, a: &FrontendArgs| {
        if let Some(v) = &a.address {
            f.address = v.clone();
        }
        if let Some(k) = a.kind {
            f.kind = match k {
                KindArg::Public => pb::FrontendKind::Public,
                KindArg::Internal => pb::FrontendKind::Internal,
            } as i32;
        }
        f
    };
    match cmd {
        Crud::Create(a) => {
            let f = apply(
                pb::Frontend {
                    name: a.name.clone(),
                    ..Default::default()
                },
                &a,
            );
            let r = c
                .create_frontend(pb::CreateFrontendRequest { frontend: Some(f) })
                .await?
                .into_inner();
            show_frontends(
                r.frontend.into_iter().collect(),
                r.generation,
                json,
                Some("created"),
            )
        }
        Crud::Update(a) => {
            let cur = c
                .get_frontend(pb::GetRequest {
                    name: a.name.clone(),
                })
                .await?
                .into_inner();
            let f = apply(cur.frontend.unwrap_or_default(), &a);
            let r = c
                .update_frontend(pb::UpdateFrontendRequest { frontend: Some(f) })
                .await?
                .into_inner();
            show_frontends(
                r.frontend.into_iter().collect(),
                r.generation,
                json,
                Some("updated"),
            )
        }
        Crud::Delete { name } => {
            let r = c
                .delete_frontend(pb::DeleteRequest { name: name.clone() })
                .await?
                .into_inner();
            deleted("frontend", &name, r.generation, json);
            Ok(())
        }
        Crud::Get { name } => {
            let r = c.get_frontend(pb::GetRequest { name }).await?.into_inner();
            show_frontends(r.frontend.into_iter().collect(), r.generation, json, None)
        }
        Crud::List => {
            let r = c.list_frontends(pb::ListRequest {}).await?.into_inner();
            show_frontends(r.frontends, r.generation, json, None)
        }
    }
}

fn deleted(kind: &str, name: &str, generation: u64, json: bool) {
    if json {
        print_json(&json!({"generation": generation, "deleted": name}));
    } else {
        changed("deleted", kind, name, generation);
    }
}

// ---------------------------------------------------------------------------------------
// Pools and members.

fn parse_member(text: &str) -> Res<pb::Member> {
    let mut parts = text.split(',');
    let address = parts.next().unwrap_or_default().trim().to_string();
    let mut m = pb::Member {
        address,
        ..Default::default()
    };
    for p in parts {
        match p.trim().split_once('=') {
            Some(("weight", w)) => {
                m.weight = Some(w.parse().map_err(|_| {
                    invalid(format!("--member = {text:?}: weight must be a whole number (allowed: 1–1000)"))
                })?)
            }
            Some(("admin", a)) => {
                m.admin_state = match a {
                    "none" => pb::AdminState::None,
                    "up" => pb::AdminState::Up,
                    "down" => pb::AdminState::Down,
                    _ => {
                        return Err(invalid(format!(
                            "--member = {text:?}: unknown admin state (allowed: none, up, down)"
                        )))
                    }
                } as i32
            }
            _ => {
                return Err(invalid(format!(
                    "--member = {text:?}: expected ADDRESS[,weight=N][,admin=none|up|down] (allowed: weight, admin)"
                )))
            }
        }
    }
    Ok(m)
}

fn show_pools(items: Vec<pb::BackendPool>, generation: u64, json: bool, verb: Option<&str>) -> Res {
    let model = items
        .into_iter()
        .map(convert::pool_from)
        .collect::<Result<Vec<_>, _>>()?;
    if json {
        print_json(&json!({"generation": generation, "backend_pools": model}));
        return Ok(());
    }
    if let (Some(verb), Some(p)) = (verb, model.first()) {
        changed(verb, "backend pool", &p.name, generation);
    }
    let mut rows = Vec::new();
    for p in &model {
        if p.members.is_empty() {
            rows.push(vec![p.name.clone(), "-".into(), "-".into(), "-".into()]);
        }
        for m in &p.members {
            rows.push(vec![
                p.name.clone(),
                m.address.to_string(),
                m.weight.to_string(),
                to_json(&m.admin_state).as_str().unwrap_or("").to_string(),
            ]);
        }
    }
    table(&["POOL", "MEMBER", "WEIGHT", "ADMIN"], &rows);
    Ok(())
}

async fn pool(c: &mut Client, cmd: Crud<PoolArgs>, json: bool) -> Res {
    match cmd {
        Crud::Create(a) => {
            let members = a
                .members
                .iter()
                .map(|m| parse_member(m))
                .collect::<Res<Vec<_>>>()?;
            let p = pb::BackendPool {
                name: a.name,
                members,
            };
            let r = c
                .create_backend_pool(pb::CreateBackendPoolRequest {
                    backend_pool: Some(p),
                })
                .await?
                .into_inner();
            show_pools(
                r.backend_pool.into_iter().collect(),
                r.generation,
                json,
                Some("created"),
            )
        }
        Crud::Update(a) => {
            let members = a
                .members
                .iter()
                .map(|m| parse_member(m))
                .collect::<Res<Vec<_>>>()?;
            let p = pb::BackendPool {
                name: a.name,
                members,
            };
            let r = c
                .update_backend_pool(pb::UpdateBackendPoolRequest {
                    backend_pool: Some(p),
                })
                .await?
                .into_inner();
            show_pools(
                r.backend_pool.into_iter().collect(),
                r.generation,
                json,
                Some("updated"),
            )
        }
        Crud::Delete { name } => {
            let r = c
                .delete_backend_pool(pb::DeleteRequest { name: name.clone() })
                .await?
                .into_inner();
            deleted("backend pool", &name, r.generation, json);
            Ok(())
        }
        Crud::Get { name } => {
            let r = c
                .get_backend_pool(pb::GetRequest { name })
                .await?
                .into_inner();
            show_pools(
                r.backend_pool.into_iter().collect(),
                r.generation,
                json,
                None,
            )
        }
        Crud::List => {
            let r = c.list_backend_pools(pb::ListRequest {}).await?.into_inner();
            show_pools(r.backend_pools, r.generation, json, None)
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
        } => {
            let m = pb::Member {
                address,
                weight,
                admin_state: admin_state.map_or(0, AdminArg::pb),
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
        } => {
            if weight.is_none() && admin_state.is_none() {
                return Err(invalid("member set: give --weight and/or --admin-state"));
            }
            c.set_pool_member(pb::SetPoolMemberRequest {
                backend_pool: pool,
                address,
                weight,
                admin_state: admin_state.map(AdminArg::pb),
            })
            .await?
        }
    }
    .into_inner();
    show_pools(
        r.backend_pool.into_iter().collect(),
        r.generation,
        json,
        Some("updated"),
    )
}

// ---------------------------------------------------------------------------------------
// Load-balancing rules.

fn apply_lb(mut r: pb::LoadBalancingRule, a: &LbRuleArgs) -> pb::LoadBalancingRule {
    if let Some(v) = &a.frontend {
        r.frontend = v.clone();
    }
    if let Some(v) = a.protocol {
        r.protocol = v.pb();
    }
    if let Some(v) = a.frontend_port {
        r.frontend_port = v;
    }
    if let Some(v) = &a.pool {
        r.backend_pool = v.clone();
    }
    if let Some(v) = a.backend_port {
        r.backend_port = v;
    }
    if let Some(v) = a.idle_timeout {
        r.idle_timeout_minutes = Some(v);
    }
    if let Some(v) = a.tcp_reset {
        r.tcp_reset = v;
    }
    if let Some(v) = a.floating_ip {
        r.floating_ip = v;
    }
    if let Some(v) = a.distribution {
        r.distribution = (match v {
            DistArg::FiveTuple => pb::Distribution::FiveTuple,
            DistArg::SourceIp => pb::Distribution::SourceIp,
            DistArg::SourceIpProtocol => pb::Distribution::SourceIpProtocol,
        }) as i32;
    }
    if let Some(v) = &a.probe {
        r.health_probe = clear_empty(v.clone());
    }
    if let Some(v) = a.unknown_flow {
        r.unknown_flow = v.pb();
    }
    r
}

fn s<T: serde::Serialize>(v: &T) -> String {
    match to_json(v) {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn show_lb(
    items: Vec<pb::LoadBalancingRule>,
    generation: u64,
    json: bool,
    verb: Option<&str>,
) -> Res {
    let model = items
        .into_iter()
        .map(convert::lb_rule_from)
        .collect::<Result<Vec<_>, _>>()?;
    if json {
        print_json(&json!({"generation": generation, "load_balancing_rules": model}));
        return Ok(());
    }
    if let (Some(verb), Some(r)) = (verb, model.first()) {
        changed(verb, "load-balancing rule", &r.name, generation);
    }
    let rows: Vec<Vec<String>> = model
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.frontend.clone(),
                s(&r.protocol),
                r.frontend_port.to_string(),
                r.backend_pool.clone(),
                r.backend_port.to_string(),
                format!("{}m", r.idle_timeout_minutes),
                yes(r.tcp_reset),
                yes(r.floating_ip),
                s(&r.distribution),
                opt(&r.health_probe),
                s(&r.unknown_flow),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "FRONTEND",
            "PROTO",
            "PORT",
            "POOL",
            "BACKEND_PORT",
            "IDLE",
            "TCP_RESET",
            "FLOATING_IP",
            "DISTRIBUTION",
            "PROBE",
            "UNKNOWN_FLOW",
        ],
        &rows,
    );
    Ok(())
}

async fn lb_rule(c: &mut Client, cmd: Crud<LbRuleArgs>, json: bool) -> Res {
    match cmd {
        Crud::Create(a) => {
            let rule = apply_lb(
                pb::LoadBalancingRule {
                    name: a.name.clone(),
                    ..Default::default()
                },
                &a,
            );
            let r = c
                .create_load_balancing_rule(pb::CreateLoadBalancingRuleRequest { rule: Some(rule) })
                .await?
                .into_inner();
            show_lb(
                r.rule.into_iter().collect(),
                r.generation,
                json,
                Some("created"),
            )
        }
        Crud::Update(a) => {
            let cur = c
                .get_load_balancing_rule(pb::GetRequest {
                    name: a.name.clone(),
                })
                .await?
                .into_inner();
            let rule = apply_lb(cur.rule.unwrap_or_default(), &a);
            let r = c
                .update_load_balancing_rule(pb::UpdateLoadBalancingRuleRequest { rule: Some(rule) })
                .await?
                .into_inner();
            show_lb(
                r.rule.into_iter().collect(),
                r.generation,
                json,
                Some("updated"),
            )
        }
        Crud::Delete { name } => {
            let r = c
                .delete_load_balancing_rule(pb::DeleteRequest { name: name.clone() })
                .await?
                .into_inner();
            deleted("load-balancing rule", &name, r.generation, json);
            Ok(())
        }
        Crud::Get { name } => {
            let r = c
                .get_load_balancing_rule(pb::GetRequest { name })
                .await?
                .into_inner();
            show_lb(r.rule.into_iter().collect(), r.generation, json, None)
        }
        Crud::List => {
            let r = c
                .list_load_balancing_rules(pb::ListRequest {})
                .await?
                .into_inner();
            show_lb(r.rules, r.generation, json, None)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Inbound NAT rules.

fn apply_nat(mut r: pb::InboundNatRule, a: &NatRuleArgs) -> Res<pb::InboundNatRule> {
    if let Some(v) = &a.frontend {
        r.frontend = v.clone();
    }
    if let Some(v) = a.protocol {
        r.protocol = v.pb();
    }
    if let Some(v) = a.frontend_port {
        r.frontend_port = Some(v);
        r.frontend_port_range = None;
    }
    if let Some(v) = &a.frontend_port_range {
        let (start, end) = v
            .split_once('-')
            .and_then(|(s, e)| Some((s.trim().parse().ok()?, e.trim().parse().ok()?)))
            .ok_or_else(|| {
                invalid(format!(
                    "--frontend-port-range = {v:?}: expected START-END (allowed: 1–65535 each)"
                ))
            })?;
        r.frontend_port_range = Some(pb::PortRange { start, end });
        r.frontend_port = None;
        r.target = None;
    }
    if let Some(v) = &a.target {
        r.target = clear_empty(v.clone());
    }
    if let Some(v) = &a.pool {
        r.backend_pool = clear_empty(v.clone());
    }
    if let Some(v) = a.backend_port {
        r.backend_port = v;
    }
    if let Some(v) = a.idle_timeout {
        r.idle_timeout_minutes = Some(v);
    }
    if let Some(v) = a.tcp_reset {
        r.tcp_reset = v;
    }
    if let Some(v) = a.floating_ip {
        r.floating_ip = v;
    }
    if let Some(v) = a.unknown_flow {
        r.unknown_flow = v.pb();
    }
    Ok(r)
}

fn show_nat(
    items: Vec<pb::InboundNatRule>,
    generation: u64,
    json: bool,
    verb: Option<&str>,
) -> Res {
    let model = items
        .into_iter()
        .map(convert::nat_rule_from)
        .collect::<Result<Vec<_>, _>>()?;
    if json {
        print_json(&json!({"generation": generation, "inbound_nat_rules": model}));
        return Ok(());
    }
    if let (Some(verb), Some(r)) = (verb, model.first()) {
        changed(verb, "inbound NAT rule", &r.name, generation);
    }
    let rows: Vec<Vec<String>> = model
        .iter()
        .map(|r| {
            let ports = match (r.frontend_port, r.frontend_port_range) {
                (Some(p), _) => p.to_string(),
                (None, Some(range)) => format!("{}-{}", range.start, range.end),
                (None, None) => "-".into(),
            };
            vec![
                r.name.clone(),
                r.frontend.clone(),
                s(&r.protocol),
                ports,
                opt(&r.target),
                opt(&r.backend_pool),
                r.backend_port.to_string(),
                format!("{}m", r.idle_timeout_minutes),
                yes(r.tcp_reset),
                yes(r.floating_ip),
                s(&r.unknown_flow),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "FRONTEND",
            "PROTO",
            "PORTS",
            "TARGET",
            "POOL",
            "BACKEND_PORT",
            "IDLE",
            "TCP_RESET",
            "FLOATING_IP",
            "UNKNOWN_FLOW",
        ],
        &rows,
    );
    Ok(())
}

async fn nat_rule(c: &mut Client, cmd: Crud<NatRuleArgs>, json: bool) -> Res {
    match cmd {
        Crud::Create(a) => {
            let rule = apply_nat(
                pb::InboundNatRule {
                    name: a.name.clone(),
                    ..Default::default()
                },
                &a,
            )?;
            let r = c
                .create_inbound_nat_rule(pb::CreateInboundNatRuleRequest { rule: Some(rule) })
                .await?
                .into_inner();
            show_nat(
                r.rule.into_iter().collect(),
                r.generation,
                json,
                Some("created"),
            )
        }
        Crud::Update(a) => {
            let cur = c
                .get_inbound_nat_rule(pb::GetRequest {
                    name: a.name.clone(),
                })
                .await?
                .into_inner();
            let rule = apply_nat(cur.rule.unwrap_or_default(), &a)?;
            let r = c
                .update_inbound_nat_rule(pb::UpdateInboundNatRuleRequest { rule: Some(rule) })
                .await?
                .into_inner();
            show_nat(
                r.rule.into_iter().collect(),
                r.generation,
                json,
                Some("updated"),
            )
        }
        Crud::Delete { name } => {
            let r = c
                .delete_inbound_nat_rule(pb::DeleteRequest { name: name.clone() })
                .await?
                .into_inner();
            deleted("inbound NAT rule", &name, r.generation, json);
            Ok(())
        }
        Crud::Get { name } => {
            let r = c
                .get_inbound_nat_rule(pb::GetRequest { name })
                .await?
                .into_inner();
            show_nat(r.rule.into_iter().collect(), r.generation, json, None)
        }
        Crud::List => {
            let r = c
                .list_inbound_nat_rules(pb::ListRequest {})
                .await?
                .into_inner();
            show_nat(r.rules, r.generation, json, None)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Outbound rules.

fn apply_out(mut r: pb::OutboundRule, a: &OutboundRuleArgs) -> pb::OutboundRule {
    if !a.frontends.is_empty() {
        r.frontends = a.frontends.clone();
    }
    if let Some(v) = &a.pool {
        r.backend_pool = v.clone();
    }
    if let Some(v) = a.protocol {
        r.protocol = v.pb();
    }
    if let Some(v) = a.ports {
        r.allocated_outbound_ports = (v != 0).then_some(v);
    }
    if let Some(v) = a.idle_timeout {
        r.idle_timeout_minutes = Some(v);
    }
    if let Some(v) = a.tcp_reset {
        r.tcp_reset = v;
    }
    if let Some(v) = a.unknown_flow {
        r.unknown_flow = v.pb();
    }
    r
}

fn show_out(items: Vec<pb::OutboundRule>, generation: u64, json: bool, verb: Option<&str>) -> Res {
    let model = items
        .into_iter()
        .map(convert::outbound_rule_from)
        .collect::<Result<Vec<_>, _>>()?;
    if json {
        print_json(&json!({"generation": generation, "outbound_rules": model}));
        return Ok(());
    }
    if let (Some(verb), Some(r)) = (verb, model.first()) {
        changed(verb, "outbound rule", &r.name, generation);
    }
    let rows: Vec<Vec<String>> = model
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.frontends.join(","),
                r.backend_pool.clone(),
                s(&r.protocol),
                r.allocated_outbound_ports
                    .map_or_else(|| "default".to_string(), |p| p.to_string()),
                format!("{}m", r.idle_timeout_minutes),
                yes(r.tcp_reset),
                s(&r.unknown_flow),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "FRONTENDS",
            "POOL",
            "PROTO",
            "PORTS/MEMBER",
            "IDLE",
            "TCP_RESET",
            "UNKNOWN_FLOW",
        ],
        &rows,
    );
    Ok(())
}

async fn outbound_rule(c: &mut Client, cmd: Crud<OutboundRuleArgs>, json: bool) -> Res {
    match cmd {
        Crud::Create(a) => {
            let rule = apply_out(
                pb::OutboundRule {
                    name: a.name.clone(),
                    ..Default::default()
                },
                &a,
            );
            let r = c
                .create_outbound_rule(pb::CreateOutboundRuleRequest { rule: Some(rule) })
                .await?
                .into_inner();
            show_out(
                r.rule.into_iter().collect(),
                r.generation,
                json,
                Some("created"),
            )
        }
        Crud::Update(a) => {
            let cur = c
                .get_outbound_rule(pb::GetRequest {
                    name: a.name.clone(),
                })
                .await?
                .into_inner();
            let rule = apply_out(cur.rule.unwrap_or_default(), &a);
            let r = c
                .update_outbound_rule(pb::UpdateOutboundRuleRequest { rule: Some(rule) })
                .await?
                .into_inner();
            show_out(
                r.rule.into_iter().collect(),
                r.generation,
                json,
                Some("updated"),
            )
        }
        Crud::Delete { name } => {
            let r = c
                .delete_outbound_rule(pb::DeleteRequest { name: name.clone() })
                .await?
                .into_inner();
            deleted("outbound rule", &name, r.generation, json);
            Ok(())
        }
        Crud::Get { name } => {
            let r = c
                .get_outbound_rule(pb::GetRequest { name })
                .await?
                .into_inner();
            show_out(r.rule.into_iter().collect(), r.generation, json, None)
        }
        Crud::List => {
            let r = c
                .list_outbound_rules(pb::ListRequest {})
                .await?
                .into_inner();
            show_out(r.rules, r.generation, json, None)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Health probes.

fn apply_probe(mut p: pb::HealthProbe, a: &ProbeArgs) -> pb::HealthProbe {
    if let Some(v) = a.protocol {
        p.protocol = (match v {
            ProbeProtoArg::Tcp => pb::ProbeProtocol::Tcp,
            ProbeProtoArg::Http => pb::ProbeProtocol::Http,
        }) as i32;
    }
    if let Some(v) = a.port {
        p.port = v;
    }
    if let Some(v) = &a.path {
        p.path = clear_empty(v.clone());
    }
    if let Some(v) = a.interval {
        p.interval_seconds = Some(v);
    }
    if let Some(v) = a.threshold {
        p.threshold = Some(v);
    }
    p
}

fn show_probes(
    items: Vec<pb::HealthProbe>,
    generation: u64,
    json: bool,
    verb: Option<&str>,
) -> Res {
    let model = items
        .into_iter()
        .map(convert::probe_from)
        .collect::<Result<Vec<_>, _>>()?;
    if json {
        print_json(&json!({"generation": generation, "health_probes": model}));
        return Ok(());
    }
    if let (Some(verb), Some(p)) = (verb, model.first()) {
        changed(verb, "health probe", &p.name, generation);
    }
    let rows: Vec<Vec<String>> = model
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                s(&p.protocol),
                p.port.to_string(),
                opt(&p.path),
                format!("{}s", p.interval_seconds),
                p.threshold.to_string(),
            ]
        })
        .collect();
    table(
        &["NAME", "PROTO", "PORT", "PATH", "INTERVAL", "THRESHOLD"],
        &rows,
    );
    Ok(())
}

async fn probe(c: &mut Client, cmd: Crud<ProbeArgs>, json: bool) -> Res {
    match cmd {
        Crud::Create(a) => {
            let p = apply_probe(
                pb::HealthProbe {
                    name: a.name.clone(),
                    ..Default::default()
                },
                &a,
            );
            let r = c
                .create_health_probe(pb::CreateHealthProbeRequest { probe: Some(p) })
                .await?
                .into_inner();
            show_probes(
                r.probe.into_iter().collect(),
                r.generation,
                json,
                Some("created"),
            )
        }
        Crud::Update(a) => {
            let cur = c
                .get_health_probe(pb::GetRequest {
                    name: a.name.clone(),
                })
                .await?
                .into_inner();
            let p = apply_probe(cur.probe.unwrap_or_default(), &a);
            let r = c
                .update_health_probe(pb::UpdateHealthProbeRequest { probe: Some(p) })
                .await?
                .into_inner();
            show_probes(
                r.probe.into_iter().collect(),
                r.generation,
                json,
                Some("updated"),
            )
        }
        Crud::Delete { name } => {
            let r = c
                .delete_health_probe(pb::DeleteRequest { name: name.clone() })
                .await?
                .into_inner();
            deleted("health probe", &name, r.generation, json);
            Ok(())
        }
        Crud::Get { name } => {
            let r = c
                .get_health_probe(pb::GetRequest { name })
                .await?
                .into_inner();
            show_probes(r.probe.into_iter().collect(), r.generation, json, None)
        }
        Crud::List => {
            let r = c.list_health_probes(pb::ListRequest {}).await?.into_inner();
            show_probes(r.probes, r.generation, json, None)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Counters, flows, events, status.

fn proto_name(p: i32) -> &'static str {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Tcp) => "TCP",
        Ok(pb::Protocol::Udp) => "UDP",
        Ok(pb::Protocol::All) => "ALL",
        _ => "-",
    }
}

fn kind_name(k: i32) -> &'static str {
    match pb::RuleKind::try_from(k) {
        Ok(pb::RuleKind::LoadBalancing) => "lb",
        Ok(pb::RuleKind::InboundNat) => "nat",
        Ok(pb::RuleKind::Outbound) => "outbound",
        _ => "-",
    }
}

fn rule_json(r: &pb::RuleCounters) -> Value {
    json!({
        "rule": r.rule, "kind": kind_name(r.kind), "rule_id": r.rule_id,
        "flows_created": r.flows_created, "flows_expired_idle": r.flows_expired_idle,
        "flows_reset_on_idle": r.flows_reset_on_idle, "flows_closed": r.flows_closed,
        "flows_picked_up": r.flows_picked_up, "packets_original": r.packets_original,
        "packets_reply": r.packets_reply, "bytes_original": r.bytes_original,
        "bytes_reply": r.bytes_reply, "syns": r.syns, "late_packets": r.late_packets,
        "unknown_flow_resets": r.unknown_flow_resets, "drops_no_flow": r.drops_no_flow,
        "drops_no_backend": r.drops_no_backend, "drops_snat_exhausted": r.drops_snat_exhausted,
        "drops_flow_table_full": r.drops_flow_table_full, "flows_moved": r.flows_moved,
        "drops_out_of_window": r.drops_out_of_window,
        "flows_evicted": r.flows_evicted, "drops_reset_rate_limited": r.drops_reset_rate_limited,
        "drops_spoofed_source": r.drops_spoofed_source, "drops_wrong_side": r.drops_wrong_side,
    })
}

fn drops_json(d: &[pb::DropCount]) -> Value {
    Value::Object(
        d.iter()
            .map(|d| (d.reason.clone(), json!(d.count)))
            .collect(),
    )
}

fn worker_json(w: &pb::WorkerCounters) -> Value {
    json!({
        "worker": w.worker, "rx_packets": w.rx_packets, "tx_packets": w.tx_packets,
        "rsts_sent": w.rsts_sent, "events_dropped": w.events_dropped, "flows": w.flows,
        "flow_capacity": w.flow_capacity, "drops": drops_json(&w.drops),
        "evictions": drops_json(&w.evictions),
        "rules": w.rules.iter().map(rule_json).collect::<Vec<_>>(),
    })
}

fn rule_rows(rules: &[pb::RuleCounters], worker: Option<u32>) -> Vec<Vec<String>> {
    rules
        .iter()
        .map(|r| {
            let mut row = vec![
                r.rule.clone(),
                kind_name(r.kind).to_string(),
                r.flows_created.to_string(),
                r.flows_expired_idle.to_string(),
                r.flows_reset_on_idle.to_string(),
                r.flows_closed.to_string(),
                (r.packets_original + r.packets_reply).to_string(),
                (r.bytes_original + r.bytes_reply).to_string(),
                r.syns.to_string(),
                r.late_packets.to_string(),
                (r.drops_no_flow
                    + r.drops_no_backend
                    + r.drops_snat_exhausted
                    + r.drops_flow_table_full
                    + r.drops_out_of_window
                    + r.drops_reset_rate_limited
                    + r.drops_spoofed_source
                    + r.drops_wrong_side)
                    .to_string(),
            ];
            if let Some(w) = worker {
                row.insert(0, w.to_string());
            }
            row
        })
        .collect()
}

const RULE_HEADERS: [&str; 11] = [
    "RULE",
    "KIND",
    "CREATED",
    "EXPIRED_IDLE",
    "RESET_IDLE",
    "CLOSED",
    "PACKETS",
    "BYTES",
    "SYNS",
    "LATE",
    "DROPS",
];

async fn counters(c: &mut Client, rule: Option<String>, per_worker: bool, json: bool) -> Res {
    let r = c
        .get_counters(pb::GetCountersRequest {
            rule: rule.unwrap_or_default(),
            per_worker,
        })
        .await?
        .into_inner();
    let total = r.total.clone().unwrap_or_default();
    if json {
        print_json(&json!({
            "generation": r.generation,
            "rules": r.rules.iter().map(rule_json).collect::<Vec<_>>(),
            "drops": drops_json(&r.drops),
            "evictions": drops_json(&r.evictions),
            "total": worker_json(&total),
            "workers": r.workers.iter().map(worker_json).collect::<Vec<_>>(),
            "snat": r.snat.iter().map(|s| json!({
                "rule": s.rule, "protocol": proto_name(s.protocol), "member": s.member,
                "ports_allocated": s.ports_allocated, "ports_used": s.ports_used,
            })).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    println!(
        "generation {}  workers {}  rx {}  tx {}  rsts_sent {}  flows {}/{}",
        r.generation,
        total.worker,
        total.rx_packets,
        total.tx_packets,
        total.rsts_sent,
        total.flows,
        total.flow_capacity
    );
    println!();
    table(&RULE_HEADERS, &rule_rows(&r.rules, None));
    let nonzero: Vec<Vec<String>> = r
        .drops
        .iter()
        .filter(|d| d.count > 0)
        .map(|d| vec![d.reason.clone(), d.count.to_string()])
        .collect();
    if !nonzero.is_empty() {
        println!();
        table(&["DROP_REASON", "COUNT"], &nonzero);
    }
    let evicted: Vec<Vec<String>> = r
        .evictions
        .iter()
        .filter(|e| e.count > 0)
        .map(|e| vec![e.reason.clone(), e.count.to_string()])
        .collect();
    if !evicted.is_empty() {
        println!();
        table(&["EVICTION_REASON", "COUNT"], &evicted);
    }
    if !r.snat.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = r
            .snat
            .iter()
            .map(|s| {
                vec![
                    s.rule.clone(),
                    proto_name(s.protocol).to_string(),
                    s.member.clone(),
                    s.ports_allocated.to_string(),
                    s.ports_used.to_string(),
                ]
            })
            .collect();
        table(
            &["RULE", "PROTO", "MEMBER", "PORTS_ALLOCATED", "PORTS_USED"],
            &rows,
        );
    }
    if per_worker {
        println!();
        let mut headers = vec!["WORKER"];
        headers.extend(RULE_HEADERS);
        let rows: Vec<Vec<String>> = r
            .workers
            .iter()
            .flat_map(|w| rule_rows(&w.rules, Some(w.worker)))
            .collect();
        table(&headers, &rows);
    }
    Ok(())
}

fn ep(e: &Option<pb::Endpoint>) -> String {
    match e {
        Some(e) if e.address.contains(':') => format!("[{}]:{}", e.address, e.port),
        Some(e) => format!("{}:{}", e.address, e.port),
        None => "-".into(),
    }
}

async fn flows(c: &mut Client, a: FlowsArgs, json: bool) -> Res {
    let mut req = pb::ListFlowsRequest {
        rule: a.rule.unwrap_or_default(),
        client_address: a.client.unwrap_or_default(),
        backend_address: a.backend.unwrap_or_default(),
        protocol: a.protocol.map_or(0, ProtoArg::pb),
        state: a.state.unwrap_or_default(),
        page_size: a.page_size,
        page_token: a.page_token.unwrap_or_default(),
    };
    let mut all = Vec::new();
    let next = loop {
        let r = c.list_flows(req.clone()).await?.into_inner();
        all.extend(r.flows);
        if !a.all || r.next_page_token.is_empty() {
            break r.next_page_token;
        }
        req.page_token = r.next_page_token;
    };
    if json {
        let flows: Vec<Value> = all
            .iter()
            .map(|f| {
                json!({
                    "worker": f.worker, "flow_id": f.flow_id, "rule": f.rule, "kind": kind_name(f.kind),
                    "protocol": proto_name(f.protocol), "nat": f.nat, "client": ep(&f.client),
                    "frontend": ep(&f.frontend), "translated_source": ep(&f.translated_source),
                    "translated_destination": ep(&f.translated_destination), "state": f.state,
                    "idle_ms": f.idle_ms, "expires_in_ms": f.expires_in_ms,
                })
            })
            .collect();
        print_json(&json!({"flows": flows, "next_page_token": next}));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|f| {
            vec![
                f.worker.to_string(),
                f.rule.clone(),
                proto_name(f.protocol).to_string(),
                ep(&f.client),
                ep(&f.frontend),
                ep(&f.translated_source),
                ep(&f.translated_destination),
                f.state.clone(),
                format!("{:.1}s", f.idle_ms as f64 / 1000.0),
                format!("{:.1}s", f.expires_in_ms as f64 / 1000.0),
            ]
        })
        .collect();
    table(
        &[
            "WORKER",
            "RULE",
            "PROTO",
            "CLIENT",
            "FRONTEND",
            "XLATED_SRC",
            "XLATED_DST",
            "STATE",
            "IDLE",
            "EXPIRES_IN",
        ],
        &rows,
    );
    if !next.is_empty() {
        println!("more: --page-token {next}");
    }
    Ok(())
}

fn event_json(e: &pb::Event) -> Value {
    use pb::event::Kind as K;
    let (kind, body) = match &e.kind {
        Some(K::ResetOnIdle(r)) => (
            "reset_on_idle",
            json!({"worker": r.worker, "rule": r.rule, "client": ep(&r.client), "backend": ep(&r.backend)}),
        ),
        Some(K::SnatExhausted(s)) => (
            "snat_exhausted",
            json!({"worker": s.worker, "rule": s.rule, "member": s.member}),
        ),
        Some(K::ProbeStateChanged(p)) => (
            "probe_state_changed",
            json!({"probe": p.probe, "backend_pool": p.backend_pool, "member": p.member, "healthy": p.healthy}),
        ),
        Some(K::GenerationApplied(g)) => {
            ("generation_applied", json!({"generation": g.generation}))
        }
        Some(K::EventsLost(l)) => ("events_lost", json!({"count": l.count})),
        None => ("unknown", json!({})),
    };
    json!({"unix_time_ms": e.unix_time_ms, "kind": kind, "event": body})
}

async fn events(c: &mut Client, count: Option<usize>, json: bool) -> Res {
    let mut stream = c
        .watch_events(pb::WatchEventsRequest {})
        .await?
        .into_inner();
    let mut seen = 0;
    while count.is_none_or(|n| seen < n) {
        let Some(e) = stream.next().await else { break };
        let e = e?;
        let v = event_json(&e);
        if json {
            println!("{v}");
        } else {
            let body = v["event"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            format!(
                                "{k}={}",
                                v.as_str().map_or_else(|| v.to_string(), str::to_string)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            println!(
                "{} {} {body}",
                e.unix_time_ms,
                v["kind"].as_str().unwrap_or("")
            );
        }
        seen += 1;
    }
    Ok(())
}

async fn status(c: &mut Client, json: bool) -> Res {
    let s = c.get_status(pb::GetStatusRequest {}).await?.into_inner();
    if json {
        print_json(&json!({
            "generation": s.generation, "poll_mode": s.poll_mode, "lab_time_scale": s.lab_time_scale,
            "uptime_seconds": s.uptime_seconds, "version": s.version, "degraded": s.degraded,
            "workers": s.workers.iter().map(|w| json!({
                "worker": w.worker, "interface": w.interface, "queue": w.queue,
                "core": (w.core >= 0).then_some(w.core), "generation": w.generation,
                "flows": w.flows, "flow_capacity": w.flow_capacity,
            })).collect::<Vec<_>>(),
            "datapath": s.datapath.iter().map(|d| json!({
                "frontend": d.frontend, "rule": d.rule, "availability": d.availability,
                "window": d.window, "answered": d.answered, "failed": d.failed,
            })).collect::<Vec<_>>(),
            "members": s.members.iter().map(|m| json!({
                "backend_pool": m.backend_pool, "address": m.address, "weight": m.weight,
                "admin_state": admin_name(m.admin_state), "probed": m.probed,
                "probe_healthy": m.probe_healthy, "eligible": m.eligible,
            })).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    println!(
        "xlbd {}  generation {}  uptime {}s  poll mode {}",
        s.version, s.generation, s.uptime_seconds, s.poll_mode
    );
    if s.lab_time_scale > 1 {
        println!(
            "LAB TIME: every timer runs {}x faster (4 min idle timeout lasts {} s)",
            s.lab_time_scale,
            240 / s.lab_time_scale.max(1)
        );
    }
    if !s.degraded.is_empty() {
        println!("DEGRADED: {}", s.degraded);
    }
    let rows: Vec<Vec<String>> = s
        .workers
        .iter()
        .map(|w| {
            vec![
                w.worker.to_string(),
                w.interface.clone(),
                w.queue.to_string(),
                if w.core >= 0 {
                    w.core.to_string()
                } else {
                    "-".into()
                },
                w.generation.to_string(),
                format!("{}/{}", w.flows, w.flow_capacity),
            ]
        })
        .collect();
    table(
        &[
            "WORKER",
            "INTERFACE",
            "QUEUE",
            "CORE",
            "GENERATION",
            "FLOWS",
        ],
        &rows,
    );
    if !s.datapath.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .datapath
            .iter()
            .map(|d| {
                vec![
                    d.frontend.clone(),
                    d.rule.clone(),
                    format!("{:.1}%", d.availability * 100.0),
                    d.window.to_string(),
                    d.answered.to_string(),
                    d.failed.to_string(),
                ]
            })
            .collect();
        table(
            &[
                "FRONTEND",
                "RULE",
                "DATA PATH",
                "WINDOW",
                "ANSWERED",
                "FAILED",
            ],
            &rows,
        );
    }
    if !s.members.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .members
            .iter()
            .map(|m| {
                vec![
                    m.backend_pool.clone(),
                    m.address.clone(),
                    m.weight.to_string(),
                    admin_name(m.admin_state).to_string(),
                    match (m.probed, m.probe_healthy) {
                        (false, _) => "-".into(),
                        (true, true) => "healthy".into(),
                        (true, false) => "failing".into(),
                    },
                    if m.eligible { "yes" } else { "no" }.to_string(),
                ]
            })
            .collect();
        table(
            &["POOL", "MEMBER", "WEIGHT", "ADMIN", "PROBE", "NEW FLOWS"],
            &rows,
        );
    }
    Ok(())
}

fn admin_name(v: i32) -> &'static str {
    match pb::AdminState::try_from(v) {
        Ok(pb::AdminState::Up) => "up",
        Ok(pb::AdminState::Down) => "down",
        _ => "none",
    }
}

async fn keepalive_check(c: &mut Client, rule: &str, dir: &std::path::Path, json: bool) -> Res {
    let k = keepalive::read(dir).map_err(Failure::Other)?;
    let cfg = c.get_config(pb::GetConfigRequest {}).await?.into_inner();
    let scale = c
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner()
        .lab_time_scale;
    let mut found: Vec<(&str, u32)> = Vec::new();
    for r in cfg.load_balancing_rules.iter().filter(|r| r.name == rule) {
        found.push(("load-balancing rule", r.idle_timeout_minutes.unwrap_or(4)));
    }
    for r in cfg.inbound_nat_rules.iter().filter(|r| r.name == rule) {
        found.push(("inbound NAT rule", r.idle_timeout_minutes.unwrap_or(4)));
    }
    for r in cfg.outbound_rules.iter().filter(|r| r.name == rule) {
        found.push(("outbound rule", r.idle_timeout_minutes.unwrap_or(4)));
    }
    if found.is_empty() {
        return Err(Failure::Other(format!(
            "NotFound: no rule is named {rule:?}"
        )));
    }
    let reports: Vec<(&str, keepalive::Report)> = found
        .iter()
        .map(|(kind, idle)| (*kind, keepalive::check(k, rule, kind, *idle, scale)))
        .collect();
    let ok = reports.iter().all(|(_, r)| r.ok);
    if json {
        print_json(&json!({
            "ok": ok,
            "tcp_keepalive_time": k.time, "tcp_keepalive_intvl": k.intvl, "tcp_keepalive_probes": k.probes,
            "lab_time_scale": scale,
            "rules": reports.iter().map(|(kind, r)| json!({
                "rule": rule, "kind": kind, "idle_timeout_seconds": r.idle_seconds, "ok": r.ok, "report": r.text,
            })).collect::<Vec<_>>(),
        }));
    } else {
        for (_, r) in &reports {
            print!("{}", r.text);
        }
    }
    if ok {
        Ok(())
    } else {
        Err(Failure::CheckFailed)
    }
}
