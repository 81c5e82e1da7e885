//! Helpers of the operators' end-to-end tests (drain, HTTPS probes, floating IP, IPFIX):
//! the API client, xlbd's event lines.

use std::{
    thread,
    time::{Duration, Instant},
};

use xlb_api::{
    server::{channel, client, BearerToken, Client},
    Listen,
};

use super::Lab;

/// The slack allowed after a deadline on a loaded machine (as in the other end-to-end tests).
pub const SLACK: Duration = Duration::from_millis(1500);

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub async fn connect(lab: &Lab) -> Client {
    let ch = channel(&Listen::Unix(lab.api_socket()))
        .await
        .expect("connect to xlbd's API socket");
    client(ch, BearerToken::new(None).unwrap())
}

pub fn event_lines(lab: &Lab, prefix: &str) -> Vec<String> {
    lab.log_text()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Waits (bounded) until xlbd's log has a line starting with `prefix` and containing every
/// one of `parts`; returns it.
pub fn wait_line(lab: &Lab, prefix: &str, parts: &[&str], timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        if let Some(l) = event_lines(lab, prefix)
            .into_iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return l;
        }
        assert!(
            Instant::now() < end,
            "no line {prefix} … {parts:?} within {timeout:?}; log:\n{}",
            lab.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The state (`up`/`down`) the last `probe_state` line of xlbd's log gives `member`; `up`
/// when there is none (members start healthy).
pub fn probe_state(lab: &Lab, member: &str) -> String {
    let needle = format!(" member={member} ");
    lab.log_text()
        .lines()
        .rfind(|l| l.starts_with("xlbd event probe_state") && l.contains(&needle))
        .and_then(|l| l.split(" state=").nth(1))
        .and_then(|s| s.split(' ').next())
        .unwrap_or("up")
        .to_string()
}

/// Waits (bounded) until `member`'s probe state is `state`; how long that took.
pub fn wait_state(lab: &Lab, member: &str, state: &str, timeout: Duration) -> Duration {
    let from = Instant::now();
    while probe_state(lab, member) != state {
        assert!(
            from.elapsed() < timeout,
            "{member} not {state} within {timeout:?}; log:\n{}",
            lab.log_text()
        );
        thread::sleep(Duration::from_millis(10));
    }
    from.elapsed()
}
