//! A private PostgreSQL cluster on a free port, for tests that stop and
//! restart the database without disturbing the shared one. Needs the
//! PostgreSQL 15 binaries and root (to run them as the `postgres` user);
//! `start` returns `None` where either is missing, and the test says it is
//! skipped. The benchmark harness includes this file too
//! (`bench/src/main.rs`), for its replica case.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct PrivatePostgres {
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:<port>/postgres` (trust auth).
    pub url: String,
    dir: tempfile::TempDir,
    running: bool,
    /// Extra `-c` settings of the server (e.g. TLS).
    extra_opts: String,
}

/// A certificate and key for the server, and whether it must refuse
/// connections without TLS.
pub struct ServerTls<'a> {
    pub cert_pem: &'a [u8],
    pub key_pem: &'a [u8],
    pub tls_only: bool,
}

fn as_postgres(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("runuser")
}

impl PrivatePostgres {
    pub async fn start() -> Option<PrivatePostgres> {
        Self::start_with(None).await
    }

    /// Like `start`, with `ssl=on` and the given certificate (files owned by
    /// postgres, mode 0600, as the server demands); with `tls_only`, a
    /// `pg_hba` that accepts TCP clients over TLS only.
    pub async fn start_with_tls(tls: ServerTls<'_>) -> Option<PrivatePostgres> {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<ServerTls<'_>>) -> Option<PrivatePostgres> {
        let root = Command::new("id").arg("-u").output().ok().is_some_and(|o| o.stdout.trim_ascii() == b"0");
        let has_user = Command::new("id").arg("postgres").output().is_ok_and(|o| o.status.success());
        if !root || !has_user || !Path::new(BIN).join("pg_ctl").exists() {
            return None;
        }
        let mut p = PrivatePostgres::unstarted();
        if let Some(tls) = tls {
            p.extra_opts = p.write_tls_files(&tls);
        }
        let data = p.data();
        let initdb = format!("{BIN}/initdb");
        let out = tokio::task::spawn_blocking({
            let dir = p.dir.path().to_path_buf();
            move || {
                as_postgres(
                    &dir,
                    &[
                        &initdb,
                        "-D",
                        data.to_str().unwrap(),
                        "-A",
                        "trust",
                        "-U",
                        "postgres",
                        "--no-sync",
                        "-E",
                        "UTF8",
                        "--locale=C",
                    ],
                )
            }
        })
        .await
        .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut p = p;
        p.resume().await;
        Some(p)
    }

    /// A cluster not made yet: a free port and an empty directory the
    /// `postgres` user owns.
    fn unstarted() -> PrivatePostgres {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().expect("temp dir");
        let ok = Command::new("chown").arg("postgres:").arg(dir.path()).status().is_ok_and(|s| s.success());
        assert!(ok, "chown the cluster directory to postgres");
        PrivatePostgres {
            port,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            running: false,
            extra_opts: String::new(),
        }
    }

    /// A streaming replica of `primary` (`pg_basebackup -R`), started on its
    /// own free port; `None` where `start` would be.
    pub async fn replica_of(primary: &PrivatePostgres) -> Option<PrivatePostgres> {
        let mut p = PrivatePostgres::unstarted();
        let (dir, data, source_port) = (p.dir.path().to_path_buf(), p.data(), primary.port.to_string());
        let out = tokio::task::spawn_blocking(move || {
            as_postgres(
                &dir,
                &[
                    &format!("{BIN}/pg_basebackup"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &source_port,
                    "-U",
                    "postgres",
                    "-D",
                    data.to_str().unwrap(),
                    "-R",
                    "-X",
                    "stream",
                    "--no-sync",
                ],
            )
        })
        .await
        .unwrap();
        assert!(out.status.success(), "pg_basebackup failed: {}", String::from_utf8_lossy(&out.stderr));
        p.resume().await;
        Some(p)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The cluster's data directory (`postmaster.pid` names its postmaster).
    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    /// Writes the server's certificate, key (and hba file) into its
    /// directory; returns the `-c` options that use them.
    fn write_tls_files(&self, tls: &ServerTls<'_>) -> String {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir.path();
        let mut files = vec![("server.crt", tls.cert_pem), ("server.key", tls.key_pem)];
        let hba: &[u8] = b"local all all trust\nhostssl all all 127.0.0.1/32 trust\n";
        if tls.tls_only {
            files.push(("hba.conf", hba));
        }
        for (name, content) in &files {
            let path = dir.join(name);
            std::fs::write(&path, content).expect("write a TLS file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 0600");
            let ok = Command::new("chown").arg("postgres:").arg(&path).status().is_ok_and(|s| s.success());
            assert!(ok, "chown {name} to postgres");
        }
        let mut opts = format!(
            " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        );
        if tls.tls_only {
            opts.push_str(&format!(" -c hba_file={}", dir.join("hba.conf").display()));
        }
        opts
    }

    /// Starts the server (again) on the same port and data; returns once it
    /// accepts connections.
    pub async fn resume(&mut self) {
        let dir = self.dir.path().to_path_buf();
        let data = self.data();
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c max_connections=60{}",
            self.port,
            dir.display(),
            self.extra_opts
        );
        let out = tokio::task::spawn_blocking(move || {
            let log = dir.join("postgres.log");
            as_postgres(
                &dir,
                &[
                    &format!("{BIN}/pg_ctl"),
                    "-D",
                    data.to_str().unwrap(),
                    "-l",
                    log.to_str().unwrap(),
                    "-o",
                    &opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            )
        })
        .await
        .unwrap();
        assert!(out.status.success(), "pg_ctl start failed: {}", String::from_utf8_lossy(&out.stdout));
        self.running = true;
    }

    /// Stops the server (`fast`: open connections are dropped); returns once
    /// it is down.
    pub async fn stop(&mut self) {
        self.pg_ctl_stop("fast").await;
    }

    async fn pg_ctl_stop(&mut self, mode: &'static str) {
        if !self.running {
            return;
        }
        let dir = self.dir.path().to_path_buf();
        let data = self.data();
        let out = tokio::task::spawn_blocking(move || {
            as_postgres(&dir, &[&format!("{BIN}/pg_ctl"), "-D", data.to_str().unwrap(), "-m", mode, "-w", "stop"])
        })
        .await
        .unwrap();
        assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
        self.running = false;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let _ = as_postgres(
                self.dir.path(),
                &[&format!("{BIN}/pg_ctl"), "-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"],
            );
        }
    }
}
