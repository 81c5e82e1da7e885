//! `xlbd`: start-up ([`crate::startup`], in phases), the services on the one tokio runtime,
//! the control loop ([`crate::control_loop`]), and the shutdown order, all in one place here.

use std::{
    path::PathBuf,
    sync::{atomic::AtomicBool, atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{runtime::Runtime, sync::watch, task::JoinHandle};
use xlb_afxdp::XdpProgram;
use xlb_api::{Bound, ControlState, Listen, StateOptions, Telemetry};
use xlb_engine::Config;

use crate::{
    cluster::{sync::FlowSync, Cluster},
    control_loop::{ControlLoop, LiveAddresses, Parts},
    ipfix, metrics,
    options::{describe_listen, Failure, Options},
    persist,
    plane::{publisher::WorkerPublisher, telemetry::DaemonTelemetry, Shared},
    preflight::{self, SelfProbe},
    probes::Probes,
    reload, report,
    sd_notify::{self, Notifier, Supervisor},
    startup::{self, Attached, Endpoints, Kernel},
    stats,
    workers::{self, Workers},
};

pub use crate::options::{parse_api, EXIT_FAILURE, EXIT_USAGE};

/// The API, metrics and probes on the runtime, and how to stop them.
#[derive(Debug)]
struct Services {
    stop: watch::Sender<bool>,
    api: Option<JoinHandle<Result<(), String>>>,
    metrics: Option<JoinHandle<std::io::Result<()>>>,
    probes: Probes,
}

/// Everything a running xlbd holds.
#[derive(Debug)]
struct Running {
    runtime: Runtime,
    signalled: Arc<AtomicBool>,
    config: Config,
    state: Arc<ControlState>,
    shared: Arc<Shared>,
    kernel: Kernel,
    attached: Attached,
    workers: Workers,
    services: Services,
    self_probe: Option<SelfProbe>,
    cluster: Option<Cluster>,
    /// The NAT event export, when it is on.
    exporter: Option<ipfix::Exporter>,
    /// SIGHUP, listened to from start-up on; reloads begin once xlbd is ready.
    hangups: Option<reload::Hangups>,
}

/// Runs the daemon until SIGINT/SIGTERM (or `--max-runtime`).
pub fn run(opts: Options) -> Result<(), Failure> {
    report::init_logging(opts.quiet);
    let mut running = start(&opts)?;
    let mut supervisor = ready(&opts, &mut running);
    let notifier = supervisor.notifier().clone();
    let parts = Parts {
        state: &running.state,
        shared: &running.shared,
        kernel: &mut running.kernel,
        live: LiveAddresses {
            plane: Arc::clone(&running.attached.plane),
            routes: Arc::clone(&running.attached.routes),
        },
        workers: &running.workers,
        signalled: &running.signalled,
        self_probe: running.self_probe.as_mut(),
        cluster: running.cluster.as_mut(),
        supervisor: &mut supervisor,
    };
    let result = ControlLoop::new(&opts, parts).run();
    notifier.stopping();
    shutdown(running, &opts, result)
}

/// Tells the service manager that xlbd is ready (once every worker runs its loop), and
/// reloads at SIGHUP from then on.
fn ready(opts: &Options, running: &mut Running) -> Supervisor {
    let up_ns = xlb_afxdp::sys::monotonic_ns();
    let heartbeats = running.workers.heartbeats.clone();
    let supervisor = Supervisor::new(Notifier::from_env(), heartbeats.clone());
    let status = sd_notify::status_text(&running.state, &running.shared, &heartbeats);
    supervisor.ready(up_ns, Duration::from_secs(2), &status);
    if let Some(hangups) = running.hangups.take() {
        let reloader = reload::Reloader {
            opts: opts.clone(),
            state: Arc::clone(&running.state),
            shared: Arc::clone(&running.shared),
            heartbeats,
            notifier: supervisor.notifier().clone(),
        };
        reload::spawn(&running.runtime, hangups, reloader);
    }
    supervisor
}

fn start(opts: &Options) -> Result<Running, Failure> {
    let (config, rules, health) = startup::configure(opts)?;
    // A cluster node's own SNAT addresses, checked before anything is attached.
    let snat_only = match &opts.cluster {
        Some(c) if !c.snat_frontends.is_empty() => Some(
            crate::cluster::snat_addresses(&config, &c.snat_frontends)
                .map_err(Failure::usage)?
                .into_iter()
                .map(xlb_engine::Addr::from)
                .collect(),
        ),
        _ => None,
    };
    if let Some(pid) = opts.takeover {
        // The configuration is valid: now the running xlbd may go.
        let asked = persist::take_over(pid)?;
        report::line(&format!(
            "xlbd takeover: xlbd {pid} stopped in {}ms",
            asked.elapsed().as_millis()
        ));
    }
    // The state directory before XDP, which pins its links there.
    let stores = match &opts.state_dir {
        Some(dir) => Some(persist::open_stores(opts, dir)?),
        None => None,
    };
    let (runtime, signalled) = startup::runtime()?;
    let hangups = Some(reload::listen(&runtime)?);
    let endpoints = startup::bind_endpoints(&runtime, opts)?;
    let mut kernel = startup::read_kernel(opts, &config)?;
    let mut self_probe =
        preflight::self_probe(opts, &config, &kernel.ports, kernel.watch.routes())?;
    // One steering key for every worker, and for the self-probe, which picks the worker it
    // injects at, and for XDP, which picks the worker of the new flows it opens; the one the
    // stored flows were placed with, if any.
    let steer_seed = match stores.as_ref().and_then(|s| s.steer_seed) {
        Some(seed) => seed,
        None => workers::random_seed()?,
    };
    let attached = startup::attach_xdp(opts, &kernel, &rules, steer_seed)?;
    startup::settle_neighbours(&mut kernel)?;
    let nat_log = (opts.ipfix.as_ref())
        .map(|o| {
            ipfix::Bound::bind(o.export.clone()).map_err(|e| {
                Failure::usage(format!(
                    "--ipfix-collector {}: {e} (is there a route to it?)",
                    o.export.collector
                ))
            })
        })
        .transpose()?;
    if let Some(p) = self_probe.as_mut() {
        p.prober
            .set_steer_key(xlb_engine::hashkey::HashKey::from_seed(steer_seed));
    }
    // The flow-state sync binds its port before the workers start (they take its ends).
    let (sync, sync_ends) = match opts
        .cluster
        .as_ref()
        .and_then(|c| Some((c, c.sync.as_ref()?)))
    {
        Some((c, so)) => {
            let listen = c
                .listen
                .map(|l| l.ip())
                .ok_or_else(|| Failure::usage("--cluster-sync-port needs --cluster-listen"))?;
            let (sync, ends) = FlowSync::start(
                so,
                listen,
                &c.peers,
                xlb_engine::hashkey::HashKey::from_seed(steer_seed),
                opts.workers,
            )
            .map_err(|e| Failure::usage(format!("--cluster-sync-port {}: {e}", so.port)))?;
            (Some(sync), ends.into_iter().map(Some).collect())
        }
        None => (None, Vec::new()),
    };
    let mut workers = workers::spawn_all(
        &workers::Start {
            opts,
            xdp: &attached.xdp,
            ports: &kernel.ports,
            port_vlans: &kernel.port_vlans,
            kernel: kernel.watch.mailbox(),
            backend_side: &kernel.backend_side,
            steer_seed,
            snat_only,
            rules: &rules,
            queues: kernel.queues,
            probe_sources: self_probe
                .as_ref()
                .map(|p| p.prober.sources())
                .unwrap_or_default(),
            config_hash: persist::config_hash(&config),
            nat_events: nat_log.as_ref().map(ipfix::Bound::sender),
            sync: std::sync::Mutex::new(sync_ends),
            fast: attached.fast.as_ref(),
        },
        stores,
    )?;
    tracing::info!("{}", workers.huge_pages.line());
    let mut attached = attached;
    if let Some(fast) = attached.fast.as_mut() {
        fast.start_grace()?;
    }
    let shared = Shared::new(
        std::mem::take(&mut workers.cells),
        workers.port_stats.clone(),
        rules.generation(),
    );
    shared.set_fast(Arc::clone(&attached.fast_counters));
    shared.set_huge_pages(workers.huge_pages.clone());
    let exporter = nat_log
        .map(|b| b.start(Arc::clone(&shared), xlb_afxdp::sys::monotonic_ns))
        .transpose()
        .map_err(|e| Failure::runtime(format!("starting the NAT event export: {e}")))?;
    let acks = (workers.acks.take()).ok_or_else(|| Failure::runtime("no ack channel"))?;
    let publisher = WorkerPublisher::new(workers.senders(), acks, Arc::clone(&shared))
        .with_addresses(Arc::clone(&attached.plane));
    let state = Arc::new(ControlState::new(
        config.clone(),
        Arc::clone(&rules),
        health,
        Arc::new(publisher),
        // Drains are stamped, and their deadlines fall, on the workers' clock.
        StateOptions {
            clock: xlb_afxdp::sys::monotonic_ns,
            ..StateOptions::default()
        },
    ));
    let (services, listening) =
        start_services(&runtime, opts, endpoints, &state, &shared, &workers)?;
    // Announces nothing until the first tick finds the node fit.
    let cluster = (opts.cluster.clone())
        .map(Cluster::start)
        .transpose()
        .map_err(Failure::usage)?
        .map(|c| c.with_sync(sync));
    let running = Running {
        runtime,
        signalled,
        config,
        state,
        shared,
        kernel,
        attached,
        workers,
        services,
        self_probe,
        cluster,
        exporter,
        hangups,
    };
    report::line(&ready_line(opts, &running, &listening));
    Ok(running)
}

/// Starts the API, the metrics endpoint and the health probes on the runtime; returns them
/// and what the ready line says of them.
fn start_services(
    runtime: &Runtime,
    opts: &Options,
    endpoints: Endpoints,
    state: &Arc<ControlState>,
    shared: &Arc<Shared>,
    workers: &Workers,
) -> Result<(Services, String), Failure> {
    let (stop, stopping) = watch::channel(false);
    let mut listening = String::new();
    // Health probes publish through the same state as the API (docs/xlbd.md, "Health probes
    // and drain").
    let probes = Probes::spawn(
        runtime.handle(),
        Arc::clone(state),
        Arc::clone(shared),
        opts.quiet,
    )
    .map_err(|e| Failure::runtime(format!("starting the health probes: {e}")))?;
    let telemetry = Arc::new(
        DaemonTelemetry::new(
            workers.senders(),
            Arc::clone(shared),
            workers.placement.clone(),
            opts.poll_name(),
        )
        .with_rules(Arc::clone(state)),
    );
    let api = endpoints.api.map(|bound| {
        if let Some(l) = &opts.api {
            listening.push_str(&format!(" api={}", describe_listen(l)));
        }
        let socket = match &opts.api {
            Some(Listen::Unix(p)) => Some(p.clone()),
            _ => None,
        };
        runtime.spawn(serve_api(
            bound,
            Arc::clone(state),
            telemetry,
            stopping.clone(),
            socket,
        ))
    });
    let metrics = endpoints.metrics.map(|listener| {
        if let Ok(local) = listener.local_addr() {
            listening.push_str(&format!(" metrics=http://{local}/metrics"));
        }
        let sources = metrics::Sources {
            state: Arc::clone(state),
            shared: Arc::clone(shared),
            interfaces: opts.interfaces.clone(),
            lab_time_scale: state.snapshot().config.settings.lab_time_scale.max(1),
        };
        runtime.spawn(metrics::serve(listener, sources, stopping.clone()))
    });
    let services = Services {
        stop,
        api,
        metrics,
        probes,
    };
    Ok((services, listening))
}

/// The API until `stop`: in-flight calls get 2 s, a client that keeps a stream open does not
/// hold xlbd. The server removes its socket after a graceful stop; after a cut-short one,
/// xlbd does (the path is its own: it bound it at start).
async fn serve_api(
    bound: Bound,
    state: Arc<ControlState>,
    telemetry: Arc<dyn Telemetry>,
    stop: watch::Receiver<bool>,
    socket: Option<PathBuf>,
) -> Result<(), String> {
    let (mut graceful, mut cut_short) = (stop.clone(), stop);
    let shutdown = async move {
        let _ = graceful.wait_for(|s| *s).await;
    };
    let result = tokio::select! {
        r = bound.run(state, telemetry, shutdown) => r.map_err(|e| e.to_string()),
        _ = async move {
            let _ = cut_short.wait_for(|s| *s).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        } => Ok(()),
    };
    if let Some(p) = socket {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// `xlbd ready …`: always printed, even with `--quiet` (scripts wait for it).
fn ready_line(opts: &Options, r: &Running, listening: &str) -> String {
    let rules = r.state.snapshot().rules.clone();
    let mut line = format!(
        "xlbd ready interfaces={} workers={} queues={} poll={} afxdp={} frontends={} \
         rules={} neighbours={}{}{listening}",
        r.attached.described.join(","),
        opts.workers,
        r.kernel.queues,
        opts.poll_name(),
        report::afxdp_mode(&r.workers.sockets),
        r.config.frontends.len(),
        rules.rules().count(),
        r.kernel.watch.view().neighbours.len(),
        vlans(opts),
    );
    if let Some(p) = &r.self_probe {
        let sources: Vec<String> = p
            .prober
            .sources()
            .iter()
            .map(|a| a.to_ip().to_string())
            .collect();
        line.push_str(&format!(
            " self_probe={}/{}ms",
            sources.join(","),
            p.prober.interval().as_millis()
        ));
    }
    if let Some(c) = &opts.cluster {
        line.push_str(&format!(
            " cluster={} announcer={} peers={}",
            c.node,
            c.bird
                .as_ref()
                .map_or_else(|| "none".to_string(), |b| b.describe()),
            c.peers.len()
        ));
    }
    if let Some(o) = &opts.ipfix {
        line.push_str(&o.describe());
    }
    line.push_str(if opts.fast_path {
        " fast_path=on"
    } else {
        " fast_path=off"
    });
    let scale = r.config.settings.lab_time_scale.max(1);
    if scale != 1 {
        line.push_str(&format!(" lab_time_scale={scale}"));
    }
    line
}

/// ` vlans=IFACE:ID+ID,…` when `--vlan` is given.
fn vlans(opts: &Options) -> String {
    if opts.vlans.is_empty() {
        return String::new();
    }
    let vlans: Vec<String> = (opts.vlans.iter())
        .map(|(i, ids)| {
            let ids: Vec<String> = ids.iter().map(u16::to_string).collect();
            format!("{i}:{}", ids.join("+"))
        })
        .collect();
    format!(" vlans={}", vlans.join(","))
}

/// The shutdown order: the API first (no change may be in flight while the workers stop),
/// then the probes (which publish too) and the metrics, then the workers, their final
/// counters, and last the XDP program (dropping it closes its BPF links: XDP is detached,
/// which also happens if xlbd crashes, since the links die with the process).
fn shutdown(r: Running, opts: &Options, result: Result<(), String>) -> Result<(), Failure> {
    let mut failed = result.err();
    let Running {
        runtime,
        state,
        shared,
        attached,
        workers,
        services,
        config,
        cluster,
        exporter,
        ..
    } = r;
    // A cluster node withdraws first and keeps forwarding while the router moves its flows.
    if let Some(line) = cluster.and_then(Cluster::stop) {
        report::line(&line);
    }
    let _ = services.stop.send(true);
    if let Some(api) = services.api {
        match runtime.block_on(api) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failed.get_or_insert(format!("API: {e}"));
            }
            Err(_) => {
                failed.get_or_insert("API: the API task panicked".to_string());
            }
        }
    }
    services.probes.stop();
    if let Some(m) = services.metrics {
        let _ = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(2), m).await });
    }
    let mut attached = attached;
    // Without a state directory XDP forwards nothing from here on that no worker would
    // follow (and is detached below). With one, XDP goes on forwarding the published flows
    // while no xlbd runs, into the table the next xlbd takes over with the flows.
    if let (Some(f), None) = (&attached.fast, &opts.state_dir) {
        f.switch_off();
    }
    workers.stop.store(true, Ordering::Relaxed);
    for (w, h) in workers.handles.into_iter().enumerate() {
        match h.join.join() {
            Ok(mut exit) => {
                if let Err(e) = exit.result {
                    failed.get_or_insert(format!("worker {w}: {e}"));
                }
                // NAT events of the last iteration go to the exporter too.
                exit.handler.pass_nat_events();
                exit.handler.publish_counters();
                exit.handler.close_store();
            }
            Err(_) => {
                failed.get_or_insert(format!("worker {w} panicked"));
            }
        }
    }
    if let Some(x) = exporter {
        x.stop();
    }
    if let Some(f) = attached.fast.as_mut() {
        f.stop_grace();
    }
    final_counters(opts, &state, &shared, config.settings.lab_time_scale.max(1));
    runtime.shutdown_timeout(Duration::from_millis(500));
    drop::<XdpProgram>(attached.xdp);
    match &opts.state_dir {
        Some(dir) => report::line(&format!(
            "xlbd stopped: flows and XDP kept in {} for the next xlbd (frames for the \
             dataplane are held meanwhile; xlbd --cleanup --state-dir {} removes them)",
            dir.display(),
            dir.display()
        )),
        None => report::line(&format!(
            "xlbd stopped: XDP detached from {}",
            opts.interfaces.join(",")
        )),
    }
    match failed {
        Some(e) => Err(Failure::runtime(e)),
        None => Ok(()),
    }
}

/// `xlbd final …` and the last stats file, from the workers' last counters.
fn final_counters(opts: &Options, state: &ControlState, shared: &Shared, scale: u32) {
    let rules = state.snapshot().rules.clone();
    let sum = shared.sum(&rules);
    let ops = shared.operations();
    report::line(&format!(
        "xlbd final {}{}",
        stats::status_line(&sum, &rules, scale),
        ops.status_line()
    ));
    if let Some(path) = &opts.stats_file {
        let kv = stats::to_kv(&sum, &rules, scale) + &ops.to_kv();
        let _ = stats::write_atomic(path, &kv);
    }
}
