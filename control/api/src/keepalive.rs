//! `xlbctl keepalive-check` (docs/behaviour.md, "Keepalive"): do this host's TCP keepalive settings keep idle
//! connections alive through a rule's idle timeout?
//!
//! A keepalive probe is a packet like any other and refreshes the flow's idle timer, so the
//! question is only whether the first probe comes before the timeout:
//! `tcp_keepalive_time < idle timeout`. Later probes come every `tcp_keepalive_intvl`, also
//! below the timeout when the recommended values are used. The sysctls are only defaults for
//! sockets that enable `SO_KEEPALIVE`; an application that does not enable it sends nothing.

use std::fmt::Write as _;
use std::path::Path;

/// Where Linux keeps the three sysctls.
pub const DEFAULT_SYSCTL_DIR: &str = "/proc/sys/net/ipv4";

/// The usual recommendation for hosts behind a NAT with idle timeouts.
pub const RECOMMENDED: Keepalive = Keepalive {
    time: 120,
    intvl: 30,
    probes: 8,
};

/// The host's keepalive settings, in seconds (probes: a count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub time: u64,
    pub intvl: u64,
    pub probes: u64,
}

/// Reads `tcp_keepalive_{time,intvl,probes}` from `dir`.
pub fn read(dir: &Path) -> Result<Keepalive, String> {
    let one = |name: &str| -> Result<u64, String> {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        text.trim()
            .parse()
            .map_err(|_| format!("{}: not a number: {:?}", path.display(), text.trim()))
    };
    Ok(Keepalive {
        time: one("tcp_keepalive_time")?,
        intvl: one("tcp_keepalive_intvl")?,
        probes: one("tcp_keepalive_probes")?,
    })
}

/// The verdict for one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub ok: bool,
    /// Effective idle timeout in seconds (lab time scale applied).
    pub idle_seconds: u64,
    /// Human-readable explanation, including the fix when not OK.
    pub text: String,
}

/// Checks `k` against a rule's idle timeout. `lab_time_scale` > 1 shortens the timeout (lab
/// time divides every timer) while the host's keepalive timers stay real.
pub fn check(
    k: Keepalive,
    rule: &str,
    kind: &str,
    idle_minutes: u32,
    lab_time_scale: u32,
) -> Report {
    let scale = u64::from(lab_time_scale.max(1));
    let idle_seconds = u64::from(idle_minutes) * 60 / scale;
    let ok = k.time < idle_seconds;
    let mut t = String::new();
    let scaled = if scale > 1 {
        format!(" (lab time scale {scale}: {idle_minutes} min lasts {idle_seconds} s)")
    } else {
        String::new()
    };
    let _ = writeln!(
        t,
        "{kind} {rule:?}: idle timeout {idle_minutes} min = {idle_seconds} s{scaled}"
    );
    let _ = writeln!(
        t,
        "host: tcp_keepalive_time = {} s, tcp_keepalive_intvl = {} s, tcp_keepalive_probes = {}",
        k.time, k.intvl, k.probes
    );
    if ok {
        explain_ok(&mut t, k, idle_seconds);
    } else {
        explain_fix(&mut t, k, idle_seconds);
    }
    Report {
        ok,
        idle_seconds,
        text: t,
    }
}

fn explain_ok(t: &mut String, k: Keepalive, idle_seconds: u64) {
    let _ = writeln!(
        t,
        "OK: the first keepalive probe comes after {} s idle, before the {idle_seconds} s idle timeout, so idle connections with SO_KEEPALIVE enabled survive.",
        k.time
    );
    if k.intvl >= idle_seconds {
        let _ = writeln!(
            t,
            "note: tcp_keepalive_intvl ({} s) is not below the idle timeout; if a probe is lost before reaching xlb, the next one comes too late.",
            k.intvl
        );
    }
    let _ = writeln!(
        t,
        "note: applications must enable SO_KEEPALIVE on their sockets; the sysctls only set its timing."
    );
}

fn explain_fix(t: &mut String, k: Keepalive, idle_seconds: u64) {
    // The recommended values when they fit; under lab time (seconds-long timeouts) scaled down.
    let fix = if RECOMMENDED.time < idle_seconds {
        RECOMMENDED
    } else {
        Keepalive {
            time: (idle_seconds / 2).max(1),
            intvl: (idle_seconds / 4).max(1),
            probes: RECOMMENDED.probes,
        }
    };
    let _ = writeln!(
        t,
        "NOT OK: the first keepalive probe would come after {} s idle, but the flow expires after {idle_seconds} s: idle connections through this rule are dropped{}.",
        k.time,
        if k.time == 7200 { " (7200 s is the Linux default)" } else { "" }
    );
    if fix.time >= idle_seconds {
        let _ = writeln!(
            t,
            "The idle timeout is too short for any keepalive timing (at least 1 s is needed); raise the rule's idle_timeout_minutes."
        );
        return;
    }
    let _ = writeln!(t, "Fix on this host (as root):");
    let _ = writeln!(t, "  sysctl -w net.ipv4.tcp_keepalive_time={}", fix.time);
    let _ = writeln!(t, "  sysctl -w net.ipv4.tcp_keepalive_intvl={}", fix.intvl);
    let _ = writeln!(
        t,
        "  sysctl -w net.ipv4.tcp_keepalive_probes={}",
        fix.probes
    );
    let _ = writeln!(
        t,
        "and to keep it across reboots, in /etc/sysctl.d/60-keepalive.conf:"
    );
    let _ = writeln!(t, "  net.ipv4.tcp_keepalive_time = {}", fix.time);
    let _ = writeln!(t, "  net.ipv4.tcp_keepalive_intvl = {}", fix.intvl);
    let _ = writeln!(t, "  net.ipv4.tcp_keepalive_probes = {}", fix.probes);
    let _ = writeln!(
        t,
        "Or per socket, without changing the host: setsockopt SO_KEEPALIVE=1, TCP_KEEPIDLE={}, TCP_KEEPINTVL={}, TCP_KEEPCNT={}.",
        fix.time, fix.intvl, fix.probes
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_values_pass_a_four_minute_rule_and_the_linux_default_fails() {
        assert!(check(RECOMMENDED, "web", "load-balancing rule", 4, 1).ok);
        let linux = Keepalive {
            time: 7200,
            intvl: 75,
            probes: 9,
        };
        let r = check(linux, "web", "load-balancing rule", 4, 1);
        assert!(!r.ok);
        assert!(r.text.contains("sysctl -w net.ipv4.tcp_keepalive_time=120"));
        assert!(r.text.contains("TCP_KEEPIDLE=120"));
    }

    #[test]
    fn bound_is_strict_and_lab_time_scales_the_timeout() {
        let k = |time| Keepalive {
            time,
            intvl: 30,
            probes: 8,
        };
        assert!(!check(k(240), "r", "rule", 4, 1).ok);
        assert!(check(k(239), "r", "rule", 4, 1).ok);
        // 4 min at 60× lasts 4 s: 120 s keepalive is far too late; the fix is scaled.
        let r = check(k(120), "r", "rule", 4, 60);
        assert!(!r.ok);
        assert_eq!(r.idle_seconds, 4);
        assert!(r.text.contains("tcp_keepalive_time=2"));
    }
}
