//! `xlbctl config get | apply FILE | diff FILE`: the whole configuration, read, or replaced
//! as one generation with its difference shown.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::{json, Value};
use xlb_api::config_diff::{self, ConfigDiff};
use xlb_api::convert;
use xlb_api::server::Client;
use xlb_engine::config::Config;
use xlb_proto::v1 as pb;

use crate::output::{print_json, table};
use crate::{invalid, Failure, Res};

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Print the running configuration as the TOML file would hold it (--json: JSON). What it
    /// prints applies back with `config apply` as no change.
    Get,
    /// Apply FILE (TOML, or the JSON of `config get --json`; - reads standard input) as one
    /// generation, all or nothing, and print what it added, removed and changed. A refused
    /// file changes nothing. Settings that need a restart of xlbd are shown, not applied.
    Apply {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Show the difference, validate and compile, apply nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The difference FILE would make (`apply --dry-run`).
    Diff {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

pub async fn config(c: &mut Client, cmd: Option<ConfigCmd>, json: bool) -> Res {
    match cmd.unwrap_or(ConfigCmd::Get) {
        ConfigCmd::Get => get(c, json).await,
        ConfigCmd::Apply { file, dry_run } => apply(c, &file, dry_run, json).await,
        ConfigCmd::Diff { file } => apply(c, &file, true, json).await,
    }
}

async fn get(c: &mut Client, json: bool) -> Res {
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

async fn apply(c: &mut Client, file: &Path, dry_run: bool, json: bool) -> Res {
    let config = read(file)?;
    let r = c
        .apply_config(pb::ApplyConfigRequest {
            config: Some(convert::config_to(&config, 0)),
            dry_run,
        })
        .await?
        .into_inner();
    let diff = config_diff::from_proto(r.changes);
    if json {
        print_json(&json!({
            "generation": r.generation,
            "applied": r.applied,
            "dry_run": dry_run,
            "changes": diff.changes,
        }));
        return Ok(());
    }
    print_diff(&diff);
    let outcome = if dry_run {
        format!(
            "dry run: nothing applied ({}; generation {} runs)",
            diff.summary(),
            r.generation
        )
    } else if r.applied {
        format!(
            "applied as generation {} ({})",
            r.generation,
            diff.summary()
        )
    } else if diff.is_empty() {
        format!("no change (generation {} runs)", r.generation)
    } else {
        format!(
            "nothing applied: every change needs a restart (generation {} runs)",
            r.generation
        )
    };
    println!("{outcome}");
    for c in diff.restart_only() {
        println!(
            "note: {} {} takes effect only when xlbd restarts; it keeps its running value",
            c.section, c.name
        );
    }
    Ok(())
}

/// The difference as a table: one row per object, its fields `old -> new`.
fn print_diff(d: &ConfigDiff) {
    if d.is_empty() {
        return;
    }
    let rows: Vec<Vec<String>> = d
        .changes
        .iter()
        .map(|c| {
            let mut what = c
                .fields
                .iter()
                .map(|f| match (&f.old, &f.new) {
                    (None, Some(n)) => format!("{}={n}", f.field),
                    (o, n) => format!(
                        "{}: {} -> {}",
                        f.field,
                        o.as_deref().unwrap_or("-"),
                        n.as_deref().unwrap_or("-")
                    ),
                })
                .collect::<Vec<_>>()
                .join(", ");
            if c.needs_restart {
                what.push_str(" (needs a restart)");
            }
            vec![
                c.op.as_str().to_string(),
                c.section.to_string(),
                c.name.clone(),
                what,
            ]
        })
        .collect();
    table(&["CHANGE", "SECTION", "NAME", "FIELDS"], &rows);
}

/// The file's configuration, parsed but not validated: the daemon validates it and says
/// what is wrong with it.
fn read(file: &Path) -> Res<Config> {
    let name = file.display();
    let text = if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::Other(format!("reading standard input: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|e| Failure::Other(format!("{name}: {e}")))?
    };
    if text.trim_start().starts_with('{') {
        // `config get --json` prints {"generation": N, "config": {...}}; a bare config too.
        let v: Value = serde_json::from_str(&text).map_err(|e| invalid(format!("{name}: {e}")))?;
        let inner = match v.get("config") {
            Some(c) if v.get("generation").is_some() => c.clone(),
            _ => v,
        };
        return serde_json::from_value(inner).map_err(|e| invalid(format!("{name}: {e}")));
    }
    toml::from_str(&text).map_err(|e| invalid(format!("{name}: {e}")))
}
