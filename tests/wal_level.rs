//! `wal_level` other than `logical`: `setup` and `tail` must say how to fix
//! it. Starts a second, throwaway PostgreSQL cluster with
//! `wal_level=replica` on a free loopback port (the binaries come from the
//! environment `tests/env/up` prepared), and removes it afterwards.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::Duration;

use common::*;

fn pg_bin() -> PathBuf {
    PathBuf::from(std::env::var("FACTLIB_ENV_PG_BIN").unwrap_or_else(|_| {
        let env_sh = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/env/env.sh");
        let text = std::fs::read_to_string(&env_sh).expect("run tests/env/up first");
        text.lines()
            .find_map(|l| l.strip_prefix("export FACTLIB_ENV_PG_BIN="))
            .expect("FACTLIB_ENV_PG_BIN in env.sh")
            .trim_matches('\'')
            .to_owned()
    }))
}

fn is_root() -> bool {
    StdCommand::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary as the cluster owner (`postgres` when we are
/// root, since the server refuses to run as root).
fn pg(bin: &str, args: &[&str]) -> std::process::Output {
    let path = pg_bin().join(bin);
    let mut c = if is_root() {
        let mut c = StdCommand::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        StdCommand::new(path)
    };
    c.args(args).output().expect("run a PostgreSQL binary")
}

struct Cluster {
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    fn start() -> Cluster {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("target/env/pg-replica-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            assert!(StdCommand::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status()
                .unwrap()
                .success());
        }
        let data = dir.join("data");
        let init = pg(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let opts = format!(
            "-c wal_level=replica -c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            dir.display()
        );
        let log = dir.join("log");
        let st = pg(
            "pg_ctl",
            &[
                "start",
                "-w",
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
            ],
        );
        assert!(
            st.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        Cluster { dir, port }
    }

    fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = pg(
            "pg_ctl",
            &["stop", "-m", "immediate", "-D", data.to_str().unwrap()],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn wal_level_replica_is_refused_with_the_fix() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();

    let mut c = factlib("factlib", "factlib", "factlib");
    c.env("FACTLIB_DATABASE_URL", cluster.url()).arg("setup");
    let r = run(c, Duration::from_secs(30)).await;
    assert_ne!(r.code, 0, "setup must refuse wal_level=replica");
    assert!(r.stderr.contains("wal_level is 'replica'"), "{}", r.stderr);
    assert!(
        r.stderr.contains("ALTER SYSTEM SET wal_level = logical"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("restart"), "{}", r.stderr);

    // The replication client reports the server's own refusal with its
    // SQLSTATE and the same fix.
    let mut c = factlib("factlib", "factlib", "factlib");
    c.env("FACTLIB_DATABASE_URL", cluster.url())
        .args(["tail", "--limit", "1"]);
    let r = run(c, Duration::from_secs(30)).await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("SQLSTATE"), "{}", r.stderr);
    assert!(r.stderr.contains("wal_level"), "{}", r.stderr);
    drop(cluster);
}
