//! A private `redis-server` on a free port, for tests that kill, restart or
//! reconfigure Redis without disturbing anyone else.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct PrivateRedis {
    pub port: u16,
    pub url: String,
    extra: Vec<String>,
    child: Option<Child>,
    /// Set for a TLS-only server: the CA its certificate is signed by.
    ca: Option<shopgraph::redis::client::TrustedCa>,
}

/// A server certificate, its key and the CA that signed it (PEM files).
pub struct TlsFiles<'a> {
    pub cert: &'a std::path::Path,
    pub key: &'a std::path::Path,
    pub ca: &'a std::path::Path,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl PrivateRedis {
    pub async fn start(extra: &[&str]) -> PrivateRedis {
        let port = free_port();
        let mut r = PrivateRedis {
            port,
            url: format!("redis://127.0.0.1:{port}/0"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            ca: None,
        };
        r.restart().await;
        r
    }

    /// A server that speaks TLS only (no plain port, client certificates
    /// not asked for); `url` is `rediss://127.0.0.1:<port>/0`.
    pub async fn start_tls(files: TlsFiles<'_>, extra: &[&str]) -> PrivateRedis {
        let port = free_port();
        let path = |p: &std::path::Path| p.display().to_string();
        let mut args = vec![
            "--tls-cert-file".to_string(),
            path(files.cert),
            "--tls-key-file".into(),
            path(files.key),
            "--tls-ca-cert-file".into(),
            path(files.ca),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut r = PrivateRedis {
            port,
            url: format!("rediss://127.0.0.1:{port}/0"),
            extra: args,
            child: None,
            ca: Some(shopgraph::redis::client::TrustedCa::read(files.ca).expect("the test CA")),
        };
        r.restart().await;
        r
    }

    /// Starts (again, empty) on the same port.
    pub async fn restart(&mut self) {
        let port = self.port.to_string();
        let listen = match self.ca {
            Some(_) => vec!["--port", "0", "--tls-port", &port],
            None => vec!["--port", &port],
        };
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        for _ in 0..200 {
            if self.ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("private redis-server did not start");
    }

    pub async fn ping(&self) -> bool {
        shopgraph::redis::server::ping_with(&self.url, self.ca.as_ref()).await.is_ok()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = shopgraph::redis::client::client(&self.url, self.ca.as_ref()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
