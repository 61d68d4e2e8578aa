//! The systemd unit in `deploy/systemd/`: `factlib-relay.service` and its
//! `relay.env.example`.
//!
//! - `systemd-analyze verify` accepts the unit (run on a copy whose
//!   `ExecStart` is the binary cargo built and whose `EnvironmentFile` is the
//!   example, since verify checks that the binary exists). Skipped, with a
//!   note on stderr, when `systemd-analyze` is not on PATH.
//! - Without systemd too: the unit has the settings the relay depends on
//!   (`ExecStart … relay`, `Restart=on-failure`, `KillSignal=SIGTERM`, an
//!   `EnvironmentFile`, a `TimeoutStopSec` above the relay's own shutdown
//!   timeout as `factlib relay --help` reports it, a non-root user, the
//!   hardening), and the example only sets variables the relay knows, with
//!   placeholder passwords.
//!
//! Uses only std: no PostgreSQL or Kafka needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/systemd/factlib-relay.service"
);
const ENV_EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/systemd/relay.env.example"
);
const BIN: &str = env!("CARGO_BIN_EXE_factlib");

/// What systemd needs beyond the relay's own shutdown timeout to see it
/// exit: the final confirm to PostgreSQL and closing the producer.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// A parsed unit file: `(section, key)` -> every value assigned, in order.
struct Unit {
    entries: HashMap<(String, String), Vec<String>>,
}

impl Unit {
    fn parse(text: &str) -> Unit {
        let mut entries: HashMap<(String, String), Vec<String>> = HashMap::new();
        let mut section = String::new();
        let mut logical = String::new();
        for raw in text.lines() {
            let line = raw.trim();
            if logical.is_empty()
                && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
            {
                continue;
            }
            // A trailing backslash continues the line.
            if let Some(head) = line.strip_suffix('\\') {
                logical.push_str(head);
                logical.push(' ');
                continue;
            }
            logical.push_str(line);
            let l = std::mem::take(&mut logical);
            if l.starts_with('[') && l.ends_with(']') {
                section = l[1..l.len() - 1].to_string();
                continue;
            }
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{UNIT}: not `key=value` in [{section}]: {l:?}"));
            entries
                .entry((section.clone(), k.trim().to_string()))
                .or_default()
                .push(v.trim().to_string());
        }
        Unit { entries }
    }

    /// The last value of `key` in `section` (systemd: the last one wins).
    fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.entries
            .get(&(section.to_string(), key.to_string()))
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    fn require(&self, section: &str, key: &str) -> &str {
        self.get(section, key)
            .unwrap_or_else(|| panic!("{UNIT}: [{section}] has no {key}="))
    }
}

/// A systemd time span (`45`, `45s`, `1min 30s`, `2m`, `500ms`); `None` for
/// `infinity` or what this small parser doesn't know.
fn time_span(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits].parse().ok()?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        total += match unit {
            "ms" | "msec" => Duration::from_millis(n),
            "" | "s" | "sec" | "second" | "seconds" => Duration::from_secs(n),
            "m" | "min" | "minute" | "minutes" => Duration::from_secs(60 * n),
            "h" | "hr" | "hour" | "hours" => Duration::from_secs(3600 * n),
            _ => return None,
        };
    }
    Some(total)
}

/// `factlib relay --help`, with a clean environment so no `FACTLIB_*`
/// variable of the caller shows up as a value.
fn relay_help() -> String {
    let out = Command::new(BIN)
        .args(["relay", "--help"])
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN} relay --help: {e}"));
    assert!(
        out.status.success(),
        "{BIN} relay --help failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// The `[default: …]` of option `--name` in clap's long help.
fn help_default(help: &str, name: &str) -> Option<String> {
    let mut lines = help.lines().skip_while(|l| {
        let t = l.trim_start();
        !(t.starts_with(name) && t[name.len()..].starts_with([' ', '=', '<']))
    });
    lines.next()?;
    for l in lines {
        let t = l.trim();
        if t.starts_with('-') {
            return None; // the next option
        }
        if let Some(v) = t
            .strip_prefix("[default: ")
            .and_then(|v| v.strip_suffix(']'))
        {
            return Some(v.to_string());
        }
    }
    None
}

/// Every `FACTLIB_*` variable named in `[env: …]` of the help.
fn help_env_vars(help: &str) -> Vec<String> {
    help.match_indices("[env: ")
        .map(|(i, m)| {
            help[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect()
}

/// The relay's default shutdown timeout, from the built binary.
fn relay_shutdown_timeout(help: &str) -> Duration {
    let v = help_default(help, "--shutdown-timeout-secs")
        .expect("`factlib relay --help` shows a default for --shutdown-timeout-secs");
    Duration::from_secs(
        v.parse()
            .expect("--shutdown-timeout-secs default is whole seconds"),
    )
}

/// The `FACTLIB_*` names of the commented-out `#FACTLIB_…=` lines of the env
/// example.
fn env_example_commented() -> Vec<String> {
    let text = std::fs::read_to_string(ENV_EXAMPLE).expect("read relay.env.example");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| k.starts_with("FACTLIB_") && !k.contains(' '))
        .collect()
}

/// The active `VAR=value` lines of the env example.
fn env_example() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(ENV_EXAMPLE).expect("read relay.env.example");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{ENV_EXAMPLE}: not VAR=value: {l:?}"));
            assert!(
                !k.starts_with("export "),
                "{ENV_EXAMPLE}: systemd's EnvironmentFile has no `export`: {l:?}"
            );
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn the_unit_has_the_settings_the_relay_depends_on() {
    let unit = Unit::parse(&std::fs::read_to_string(UNIT).expect("read the unit"));
    let help = relay_help();

    let exec = unit.require("Service", "ExecStart");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert!(
        argv.first()
            .is_some_and(|p| p.starts_with('/') && p.ends_with("/factlib")),
        "ExecStart must run the factlib binary by absolute path: {exec:?}"
    );
    assert_eq!(
        argv.get(1),
        Some(&"relay"),
        "ExecStart must run `factlib relay`: {exec:?}"
    );

    assert_eq!(unit.require("Service", "Restart"), "on-failure");
    let restart_sec = unit.require("Service", "RestartSec");
    assert!(
        time_span(restart_sec).is_some_and(|d| d >= Duration::from_secs(1)),
        "RestartSec={restart_sec}: restart after a pause, not in a tight loop"
    );
    assert_eq!(unit.require("Service", "KillSignal"), "SIGTERM");
    let env_file = unit.require("Service", "EnvironmentFile");
    assert!(
        env_file.trim_start_matches('-').starts_with('/'),
        "EnvironmentFile must be an absolute path: {env_file:?}"
    );

    let user = unit.require("Service", "User");
    assert!(
        user != "root" && user != "0",
        "the relay must not run as root"
    );

    let after = unit.require("Unit", "After");
    assert!(
        after
            .split_whitespace()
            .any(|u| u == "network-online.target"),
        "After= must include network-online.target: {after:?}"
    );

    for (key, want) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(unit.get("Service", key), Some(want), "[Service] {key}");
    }

    // systemd must not SIGKILL the relay while it still drains in-flight facts:
    // TimeoutStopSec above the relay's shutdown timeout, the built binary's
    // default and whatever the example sets.
    let stop_raw = unit.require("Service", "TimeoutStopSec");
    let stop = time_span(stop_raw)
        .unwrap_or_else(|| panic!("TimeoutStopSec={stop_raw}: not a finite time span"));
    let mut shutdown = relay_shutdown_timeout(&help);
    if let Some((_, v)) = env_example()
        .iter()
        .find(|(k, _)| k == "FACTLIB_SHUTDOWN_TIMEOUT_SECS")
    {
        shutdown = shutdown.max(Duration::from_secs(v.parse().expect("whole seconds")));
    }
    assert!(
        stop >= shutdown + STOP_MARGIN,
        "TimeoutStopSec={stop_raw} must exceed the relay's shutdown timeout ({}s) by at least {}s, \
         or systemd kills it before it confirms what Kafka acknowledged",
        shutdown.as_secs(),
        STOP_MARGIN.as_secs()
    );
    eprintln!(
        "unit: TimeoutStopSec={}s, relay shutdown timeout {}s",
        stop.as_secs(),
        shutdown.as_secs()
    );
}

#[test]
fn the_env_example_sets_only_known_variables_and_placeholder_passwords() {
    let known = help_env_vars(&relay_help());
    assert!(
        known.iter().any(|v| v == "FACTLIB_DATABASE_URL"),
        "`factlib relay --help` lists no [env: FACTLIB_DATABASE_URL]; did its format change?"
    );
    // Commented-out lines document options, some of them newer than this
    // build: only noted.
    for k in env_example_commented() {
        if !known.contains(&k) {
            eprintln!(
                "NOTE: {ENV_EXAMPLE} mentions #{k}, which this build of `factlib relay` lacks"
            );
        }
    }
    let vars = env_example();
    for name in ["FACTLIB_DATABASE_URL", "FACTLIB_BROKERS"] {
        assert!(
            vars.iter().any(|(k, _)| k == name),
            "{ENV_EXAMPLE} sets no {name}"
        );
    }
    for (k, v) in &vars {
        if k.starts_with("FACTLIB_") {
            assert!(
                known.contains(k),
                "{ENV_EXAMPLE}: {k} is not a variable of `factlib relay` (typo?)"
            );
        }
        if k.contains("PASSWORD") {
            assert_eq!(v, "CHANGE-ME", "{ENV_EXAMPLE}: {k} must be a placeholder");
        }
        // postgresql://user:password@host/...: the password a placeholder too
        if let Some(rest) = v.split_once("://").map(|(_, r)| r) {
            let userinfo = rest.split('/').next().unwrap_or("");
            if let Some((cred, _host)) = userinfo.rsplit_once('@') {
                if let Some((_, pw)) = cred.split_once(':') {
                    assert_eq!(
                        pw, "CHANGE-ME",
                        "{ENV_EXAMPLE}: the password in {k} must be a placeholder"
                    );
                }
            }
        }
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let Some(analyze) = on_path("systemd-analyze") else {
        eprintln!(
            "NOTE: systemd-analyze is not on PATH, so the unit was not verified by systemd \
             (only parsed by the other tests here); install the `systemd` package to run it"
        );
        return;
    };

    // verify checks that ExecStart's binary exists: point it at the one cargo
    // built, and the EnvironmentFile at the example.
    let unit = std::fs::read_to_string(UNIT).expect("read the unit");
    assert!(
        !BIN.contains(char::is_whitespace),
        "binary path with spaces: {BIN}"
    );
    let mut rewritten = String::new();
    for line in unit.lines() {
        match line.split_once('=') {
            Some(("ExecStart", v)) => {
                let args = v.trim().split_once(' ').map_or("", |(_, a)| a);
                rewritten.push_str(&format!("ExecStart={BIN} {args}"));
            }
            Some(("EnvironmentFile", _)) => {
                rewritten.push_str(&format!("EnvironmentFile={ENV_EXAMPLE}"))
            }
            _ => rewritten.push_str(line),
        }
        rewritten.push('\n');
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("deploy-verify-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let copy = dir.join("factlib-relay.service");
    std::fs::write(&copy, rewritten).expect("write the unit copy");

    let out = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", analyze.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify prints warnings (unknown keys, bad values) but still exits 0;
    // lines about other units (in a container, say) are not ours to judge.
    let complaints: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("factlib-relay.service") || l.contains(BIN))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify {} complains ({}):\n{text}",
        UNIT,
        out.status
    );
    if !text.trim().is_empty() {
        eprintln!("systemd-analyze verify (about other units, ignored):\n{text}");
    }
    eprintln!("systemd-analyze verify: {UNIT} OK");
}
