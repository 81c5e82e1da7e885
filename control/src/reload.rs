//! `SIGHUP`: xlbd reads its configuration file again and applies it as one generation, all or
//! nothing, through the same path as an API change ([`ControlState::apply_config`]). Every
//! change is told as an event line; a refused file changes nothing and the event line says
//! why; settings that need a restart are told and keep their running value. The service
//! manager hears `RELOADING=1` before and `READY=1` after.

use std::sync::Arc;

use tokio::{
    runtime::Runtime,
    signal::unix::{signal, Signal, SignalKind},
};
use xlb_api::{config_diff::ConfigDiff, ConfigApplied, ControlState};

use crate::{
    liveness::Heartbeats,
    options::{load_config, Failure, Options},
    plane::Shared,
    report,
    sd_notify::{status_text, Notifier},
};

/// SIGHUP, taken from its default action (which ends the process) as early as possible.
#[derive(Debug)]
pub struct Hangups(Signal);

pub fn listen(runtime: &Runtime) -> Result<Hangups, Failure> {
    let _enter = runtime.enter();
    signal(SignalKind::hangup())
        .map(Hangups)
        .map_err(|e| Failure::runtime(format!("signals: {e}")))
}

/// What a reload works with.
#[derive(Debug, Clone)]
pub struct Reloader {
    pub opts: Options,
    pub state: Arc<ControlState>,
    pub shared: Arc<Shared>,
    pub heartbeats: Heartbeats,
    pub notifier: Notifier,
}

/// Reloads at every SIGHUP, one at a time, until the runtime stops.
pub fn spawn(runtime: &Runtime, hangups: Hangups, r: Reloader) {
    let Hangups(mut hangups) = hangups;
    runtime.spawn(async move {
        while hangups.recv().await.is_some() {
            r.notifier.reloading();
            let job = r.clone();
            let outcome = tokio::task::spawn_blocking(move || job.reload()).await;
            let status = match outcome {
                Ok(Ok(_)) => status_text(&r.state, &r.shared, &r.heartbeats),
                Ok(Err(why)) => format!(
                    "reload refused, {}: {why}",
                    status_text(&r.state, &r.shared, &r.heartbeats)
                ),
                Err(e) => format!("reload failed: {e}"),
            };
            r.notifier.ready(&status);
        }
    });
}

impl Reloader {
    /// Reads the file and applies it; tells what happened. Err: why it was refused.
    pub fn reload(&self) -> Result<ConfigApplied, String> {
        let file = self.opts.config.display().to_string();
        let result = load_config(&self.opts)
            .map_err(|f| f.message)
            .and_then(|c| (self.state.apply_config(c, false)).map_err(|e| e.to_string()));
        let quiet = self.opts.quiet;
        match &result {
            Ok(a) => {
                if !quiet {
                    for l in lines(&file, a) {
                        report::line(&l);
                    }
                }
                for c in a.diff.restart_only() {
                    tracing::warn!(
                        "reload: {} {} changes only when xlbd restarts; the running value is kept",
                        c.section,
                        c.name
                    );
                }
            }
            Err(why) => {
                if quiet {
                    tracing::error!("reload of {file} refused, nothing changed: {why}");
                } else {
                    report::line(&format!(
                        "xlbd event reload_refused file={file} generation={} why={:?}",
                        self.state.generation(),
                        why
                    ));
                }
            }
        }
        result
    }
}

/// The event lines of an accepted reload: one per change, then the outcome.
pub fn lines(file: &str, a: &ConfigApplied) -> Vec<String> {
    let mut out: Vec<String> = a.diff.changes.iter().map(change_line).collect();
    out.push(format!(
        "xlbd event reload file={file} generation={} applied={} changes={} summary={:?}",
        a.generation,
        a.applied,
        a.diff.changes.len(),
        summary(&a.diff)
    ));
    out
}

fn change_line(c: &xlb_api::config_diff::Change) -> String {
    let mut l = format!(
        "xlbd event reload_change op={} section={} name={}",
        c.op.as_str(),
        c.section,
        c.name
    );
    if !c.fields.is_empty() {
        l.push_str(&format!(" fields={:?}", c.fields_text()));
    }
    if c.needs_restart {
        l.push_str(" needs_restart=true");
    }
    l
}

fn summary(d: &ConfigDiff) -> String {
    if d.is_empty() {
        "no change".into()
    } else {
        d.summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xlb_api::config_diff::diff;
    use xlb_engine::Config;

    #[test]
    fn event_lines_name_every_change_and_the_outcome() {
        let old = Config::from_toml_str(
            r#"
[[frontends]]
name = "vip"
address = "198.18.0.100"
kind = "public"
"#,
        )
        .unwrap();
        let mut new = old.clone();
        new.frontends[0].address = "198.18.0.101".parse().unwrap();
        new.settings.lab_time_scale = 60;
        let a = ConfigApplied {
            diff: diff(&old, &new),
            generation: 4,
            applied: true,
        };
        assert_eq!(
            lines("/etc/xlb/xlb.toml", &a),
            [
                "xlbd event reload_change op=changed section=settings name=lab_time_scale \
                 fields=\"lab_time_scale=1->60\" needs_restart=true",
                "xlbd event reload_change op=changed section=frontend name=vip \
                 fields=\"address=198.18.0.100->198.18.0.101\"",
                "xlbd event reload file=/etc/xlb/xlb.toml generation=4 applied=true changes=2 \
                 summary=\"0 added, 0 removed, 2 changed, 1 need a restart\"",
            ]
        );
        let none = ConfigApplied {
            diff: diff(&old, &old),
            generation: 3,
            applied: false,
        };
        assert_eq!(
            lines("x.toml", &none),
            [
                "xlbd event reload file=x.toml generation=3 applied=false changes=0 \
              summary=\"no change\""
            ]
        );
    }
}
