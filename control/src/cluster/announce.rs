//! Telling the routing daemon what to announce. xlbd never speaks BGP: it writes the prefixes
//! it wants announced into a file the daemon includes and asks the daemon to reload it,
//! through the daemon's own documented interface. One announcer thread does it, so the
//! control loop never waits for the daemon.
//!
//! BIRD 2: the file defines two static protocols, `xlb_vips4` and `xlb_vips6`, one route per
//! prefix; BIRD's configuration includes it (`include "FILE";`) and exports those protocols'
//! routes to its BGP sessions; `birdc -s SOCKET configure` reloads it (docs/cluster.md).

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender};

/// How to reach BIRD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BirdTarget {
    /// The file BIRD's configuration includes.
    pub include: PathBuf,
    /// BIRD's control socket (`birdc -s`).
    pub socket: PathBuf,
    /// The `birdc` program.
    pub birdc: PathBuf,
}

impl BirdTarget {
    pub fn describe(&self) -> String {
        format!("bird:{}", self.include.display())
    }
}

/// What the announcer last achieved, read by the control loop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The prefixes the daemon was last told to announce (after a successful reload).
    pub prefixes: Vec<String>,
    /// The last failure (empty after a success).
    pub error: String,
    /// Reloads that succeeded.
    pub reloads: u64,
}

/// The BIRD include file for `prefixes` (`198.18.0.100/32`, `2001:db8::100/128`).
pub fn bird_include(prefixes: &[String]) -> String {
    let mut out = String::from(
        "# Written by xlbd: the frontends this node announces while it is fit. Do not edit.\n",
    );
    for (name, channel, v6) in [("xlb_vips4", "ipv4", false), ("xlb_vips6", "ipv6", true)] {
        out.push_str(&format!("protocol static {name} {{\n  {channel};\n"));
        for p in prefixes.iter().filter(|p| p.contains(':') == v6) {
            out.push_str(&format!("  route {p} blackhole;\n"));
        }
        out.push_str("}\n");
    }
    out
}

/// Writes `text` to `path` atomically (a temporary file renamed over it).
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Writes the include file and asks BIRD to reload its configuration.
pub fn apply_bird(target: &BirdTarget, prefixes: &[String]) -> Result<(), String> {
    write_atomic(&target.include, &bird_include(prefixes))
        .map_err(|e| format!("writing {}: {e}", target.include.display()))?;
    let out = Command::new(&target.birdc)
        .arg("-s")
        .arg(&target.socket)
        .arg("configure")
        .output()
        .map_err(|e| format!("running {}: {e}", target.birdc.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // birdc exits 0 even when BIRD refuses the configuration: read what it says.
    if out.status.success()
        && (text.contains("Reconfigured") || text.contains("Reconfiguration in progress"))
    {
        Ok(())
    } else {
        Err(format!(
            "birdc configure: {} {}",
            text.trim().replace('\n', " | "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The announcer thread: applies the latest wanted set, retries a failure every second.
#[derive(Debug)]
pub struct Announcer {
    wanted: Sender<Vec<String>>,
    pub applied: Arc<Mutex<Applied>>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Announcer {
    pub fn spawn(target: BirdTarget) -> std::io::Result<Announcer> {
        let (wanted, rx) = bounded::<Vec<String>>(16);
        let applied = Arc::new(Mutex::new(Applied::default()));
        let out = Arc::clone(&applied);
        let join = std::thread::Builder::new()
            .name("xlbd-announce".into())
            .spawn(move || run(&target, &rx, &out))?;
        Ok(Announcer {
            wanted,
            applied,
            join: Some(join),
        })
    }

    /// Asks for `prefixes` to be announced (and nothing else); the latest request wins.
    pub fn want(&self, prefixes: Vec<String>) {
        let _ = self.wanted.try_send(prefixes);
    }

    pub fn applied(&self) -> Applied {
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Withdraws everything and waits (at most `timeout`) until the daemon took it, then
    /// stops the thread. Returns whether the withdrawal was applied.
    pub fn withdraw_and_stop(mut self, timeout: Duration) -> bool {
        let before = self.applied().reloads;
        let _ = self.wanted.send_timeout(Vec::new(), timeout);
        let deadline = std::time::Instant::now() + timeout;
        let mut done = false;
        while std::time::Instant::now() < deadline {
            let a = self.applied();
            if a.prefixes.is_empty() && a.reloads > before {
                done = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (tx, _) = bounded(1);
        drop(std::mem::replace(&mut self.wanted, tx));
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
        done
    }
}

fn run(target: &BirdTarget, rx: &Receiver<Vec<String>>, out: &Mutex<Applied>) {
    let mut want: Option<Vec<String>> = None;
    let mut pending = false;
    loop {
        let wait = if pending {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(3600)
        };
        match rx.recv_timeout(wait) {
            Ok(w) => {
                want = Some(w);
                // Only the latest request matters.
                while let Ok(w) = rx.try_recv() {
                    want = Some(w);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(w) = want.as_ref() else { continue };
        let result = apply_bird(target, w);
        let mut a = out.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(()) => {
                a.prefixes = w.clone();
                a.error.clear();
                a.reloads += 1;
                pending = false;
            }
            Err(e) => {
                if a.error != e {
                    tracing::warn!("announcing {w:?}: {e}");
                }
                a.error = e;
                pending = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_file_holds_one_static_protocol_per_family() {
        let text = bird_include(&["198.18.0.100/32".into(), "2001:db8::100/128".into()]);
        assert!(text.contains(
            "protocol static xlb_vips4 {\n  ipv4;\n  route 198.18.0.100/32 blackhole;\n}"
        ));
        assert!(text.contains(
            "protocol static xlb_vips6 {\n  ipv6;\n  route 2001:db8::100/128 blackhole;\n}"
        ));
        let empty = bird_include(&[]);
        assert!(empty.contains("protocol static xlb_vips4 {\n  ipv4;\n}"));
    }
}
