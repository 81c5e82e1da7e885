//! What xlbd says. Two channels, on purpose:
//! - **stdout, a contract**: the `xlbd ready …` line (always, even with `--quiet`: scripts
//!   wait for it), `xlbd event …`, `xlbd status …`, `xlbd final …` and `xlbd stopped: …`
//!   lines, one per line, flushed at once; tests and scripts parse them, so their formats stay;
//! - **logs** through `tracing` (warnings and notices, on stderr; only errors with `--quiet`).

use std::{io::Write as _, net::IpAddr};

use xlb_engine::{Addr, Event, RuleSet};

/// One contract line on stdout, flushed (a log file or a pipe sees it at once). Write errors
/// are ignored: a reader that went away must not take the dataplane down with a panic.
pub fn line(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{text}");
    let _ = o.flush();
}

/// Logs on stderr: warnings and notices, errors only when `quiet`.
pub fn init_logging(quiet: bool) {
    let level = if quiet {
        tracing::Level::ERROR
    } else {
        tracing::Level::INFO
    };
    // A second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .try_init();
}

/// `xlbd event worker=W …` for an engine event, rules named from `rules`.
pub fn event_line(worker: usize, e: &Event, rules: &RuleSet) -> String {
    let name = |id| {
        rules
            .rule(id)
            .map(|p| p.name.to_string())
            .unwrap_or_else(|| format!("#{id}"))
    };
    let ep = |(a, p): (Addr, u16)| match a.to_ip() {
        IpAddr::V4(v4) => format!("{v4}:{p}"),
        IpAddr::V6(v6) => format!("[{v6}]:{p}"),
    };
    let what = match *e {
        Event::ResetOnIdle {
            rule,
            client,
            backend,
        } => format!(
            "reset_on_idle rule={} client={} backend={}",
            name(rule),
            ep(client),
            ep(backend)
        ),
        Event::SnatExhausted { rule, member } => format!(
            "snat_exhausted rule={} member={}",
            name(rule),
            member.to_ip()
        ),
    };
    format!("xlbd event worker={worker} {what}")
}

/// The AF_XDP sockets' mode and ring size as the kernel granted them: `copy`, `zero-copy` or
/// `mixed(zero-copy=N/M)`, then `/ring=R` (a range when they differ: rings are shrunk to fit
/// RLIMIT_MEMLOCK without CAP_IPC_LOCK).
pub fn afxdp_mode(sockets: &[xlb_afxdp::worker::SocketInfo]) -> String {
    let zc = sockets.iter().filter(|s| s.zero_copy).count();
    let mode = match zc {
        0 => "copy".to_string(),
        n if n == sockets.len() => "zero-copy".to_string(),
        n => format!("mixed(zero-copy={n}/{})", sockets.len()),
    };
    let lo = sockets.iter().map(|s| s.ring_size).min().unwrap_or(0);
    let hi = sockets.iter().map(|s| s.ring_size).max().unwrap_or(0);
    if lo == hi {
        format!("{mode}/ring={lo}")
    } else {
        format!("{mode}/ring={lo}-{hi}")
    }
}
