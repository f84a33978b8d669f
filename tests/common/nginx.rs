//! A real caching reverse proxy: nginx from the distribution (`nginx-light`)
//! with `proxy_cache`, on a free port in front of one upstream, stopped on
//! drop. Self-contained (tokio, reqwest, tempfile) because the benchmark
//! harness includes this file too (`bench/src/nginx.rs`), so the tests and the
//! benchmark measure the same proxy.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct Nginx {
    pub url: String,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Where Debian installs it; `None` when it is not installed.
    pub fn binary() -> Option<PathBuf> {
        ["/usr/sbin/nginx", "/usr/bin/nginx"].iter().map(PathBuf::from).find(|p| p.exists())
    }

    /// Starts one worker in front of `upstream` (`http://host:port`), caching
    /// by URI (so GETs; POSTs pass through) as the upstream's
    /// `Cache-Control` allows, revalidating with `If-None-Match`; returns
    /// once it answers `/healthz`, or an error with its log.
    pub async fn start(bin: &Path, upstream: &str) -> Result<Nginx, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let d = dir.path().display();
        let upstream = upstream.trim_start_matches("http://");
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  proxy_cache_path {d}/cache levels=1 keys_zone=catalog:1m max_size=16m;
  upstream shopgraph {{ server {upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://shopgraph;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_cache catalog;
      proxy_cache_key $scheme$host$request_uri;
      proxy_cache_revalidate on;
      # one request refreshes an expired entry; the others wait for it
      proxy_cache_lock on;
      add_header X-Cache-Status $upstream_cache_status always;
    }}
  }}
}}
"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf"), "-e", &format!("{d}/error.log")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let nginx = Nginx { url: format!("http://127.0.0.1:{port}"), child, dir };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = http.get(format!("{}/healthz", nginx.url)).send().await.is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(nginx);
            }
            let log = nginx.log();
            if log.contains("emerg") || Instant::now() > deadline {
                return Err(format!("nginx did not come up: {log}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
