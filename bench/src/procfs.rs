//! What the processes cost, from /proc: resident memory (`VmRSS`, `VmHWM`
//! of /proc/<pid>/status) and CPU time (`utime + stime` of /proc/<pid>/stat),
//! split between the server, this database's Postgres backends, Postgres's
//! shared helpers (WAL writer, checkpointer…), Redis, this harness, and
//! everything else on the machine (other people's builds).

use std::{collections::HashMap, fs, time::Instant};

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// CPU seconds (user + system) of a process, all threads.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the parenthesised command name; utime, stime are 14 and 15
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// CPU seconds of a process and of its direct children together: a
/// PostgreSQL cluster is its postmaster and the backends and helpers it
/// forks.
pub fn tree_cpu_secs(root: u32) -> f64 {
    let mut total = cpu_secs(root).unwrap_or(0.0);
    let Ok(dir) = fs::read_dir("/proc") else { return total };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid = stat.rfind(')').and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(root) {
            total += cpu_secs(pid).unwrap_or(0.0);
        }
    }
    total
}

/// Busy CPU seconds of the whole machine (all cores).
fn machine_busy_secs() -> f64 {
    let Ok(s) = fs::read_to_string("/proc/stat") else { return 0.0 };
    let Some(line) = s.lines().next() else { return 0.0 };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 8 {
        return 0.0;
    }
    // user nice system idle iowait irq softirq steal
    (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / clk_tck()
}

/// Which processes to attribute CPU to.
#[derive(Clone, Debug, Default)]
pub struct Watch {
    pub server: Option<u32>,
    /// The database the server uses (Postgres backends show it in their
    /// process title: `postgres: user db host(port) state`).
    pub pg_db: Option<String>,
    pub redis: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    at: Instant,
    server: f64,
    pg_ours: HashMap<u32, f64>,
    pg_aux: HashMap<u32, f64>,
    redis: f64,
    bench: f64,
    machine: f64,
}

/// Average cores used over an interval, per process group.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub wall: f64,
    pub server: f64,
    pub pg: f64,
    pub pg_aux: f64,
    pub redis: f64,
    pub bench: f64,
    pub others: f64,
    /// CPU seconds (not cores) of the server and of Postgres (ours + aux)
    pub server_secs: f64,
    pub pg_secs: f64,
    pub redis_secs: f64,
}

impl Usage {
    /// The same CPU seconds averaged over `wall` seconds instead (when the
    /// measured window was longer than the activity).
    pub fn over(mut self, wall: f64) -> Usage {
        let k = self.wall / wall.max(1e-9);
        // not `others`: their CPU was not concentrated in our activity
        for v in [&mut self.server, &mut self.pg, &mut self.pg_aux, &mut self.redis, &mut self.bench] {
            *v *= k;
        }
        self.wall = wall;
        self
    }

    /// `server 0.92 · pg 0.61 (+0.05 aux) · redis 0.04 · bench 0.30 · other 0.02`
    pub fn describe(&self) -> String {
        format!(
            "server {:.2} · pg {:.2}+{:.2} · redis {:.2} · bench {:.2} · other {:.2}",
            self.server, self.pg, self.pg_aux, self.redis, self.bench, self.others
        )
    }
}

/// CPU seconds per Postgres process: (this database's backends, shared helpers).
fn postgres_cpu(db: Option<&str>) -> (HashMap<u32, f64>, HashMap<u32, f64>) {
    let (mut ours, mut aux) = (HashMap::new(), HashMap::new());
    let Ok(dir) = fs::read_dir("/proc") else { return (ours, aux) };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) else { continue };
        if comm.trim() != "postgres" {
            continue;
        }
        let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let Some(title) = cmd.strip_prefix("postgres: ") else { continue };
        // Debian prefixes the cluster name: `postgres: 15/main: checkpointer`
        let title = match title.split_once(": ") {
            Some((cluster, rest)) if !cluster.contains(' ') => rest,
            _ => title,
        };
        let words: Vec<&str> = title.split_whitespace().collect();
        // a client backend: `user db host(port) state`
        let is_backend = words.len() >= 3 && words[2].contains('(');
        let cpu = cpu_secs(pid).unwrap_or(0.0);
        if is_backend {
            if db.is_some_and(|d| words[1] == d) {
                ours.insert(pid, cpu);
            }
        } else if !title.starts_with("autovacuum worker") || db.is_some_and(|d| title.contains(d)) {
            aux.insert(pid, cpu);
        }
    }
    (ours, aux)
}

/// CPU used between two per-process maps; a process new in `later` counts
/// whole (processes that came and went in between are not seen).
fn map_delta(before: &HashMap<u32, f64>, later: &HashMap<u32, f64>) -> f64 {
    // `+ 0.0`: an empty sum is -0.0
    later.iter().map(|(pid, v)| (v - before.get(pid).copied().unwrap_or(0.0)).max(0.0)).sum::<f64>() + 0.0
}

impl Watch {
    pub fn snapshot(&self) -> Snapshot {
        let (pg_ours, pg_aux) =
            if self.pg_db.is_some() { postgres_cpu(self.pg_db.as_deref()) } else { Default::default() };
        Snapshot {
            at: Instant::now(),
            server: self.server.and_then(cpu_secs).unwrap_or(0.0),
            pg_ours,
            pg_aux,
            redis: self.redis.and_then(cpu_secs).unwrap_or(0.0),
            bench: cpu_secs(std::process::id()).unwrap_or(0.0),
            machine: machine_busy_secs(),
        }
    }
}

impl Snapshot {
    /// Usage from `self` (earlier) to `later`.
    pub fn usage_until(&self, later: &Snapshot) -> Usage {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let d = |a: f64, b: f64| (b - a).max(0.0);
        let server = d(self.server, later.server);
        let pg = map_delta(&self.pg_ours, &later.pg_ours);
        let pg_aux = map_delta(&self.pg_aux, &later.pg_aux);
        let redis = d(self.redis, later.redis);
        let bench = d(self.bench, later.bench);
        let machine = d(self.machine, later.machine);
        let others = (machine - server - pg - pg_aux - redis - bench).max(0.0);
        Usage {
            wall,
            server: server / wall,
            pg: pg / wall,
            pg_aux: pg_aux / wall,
            redis: redis / wall,
            bench: bench / wall,
            others: others / wall,
            server_secs: server,
            pg_secs: pg + pg_aux,
            redis_secs: redis,
        }
    }
}

/// The pid of the process listening on a loopback TCP port (for servers
/// started through a shell command), from /proc/net/tcp{,6} and fd links.
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = fs::read_to_string(file) else { continue };
        for line in s.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue; // not LISTEN
            }
            let local_port = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.to_str() == Some(i)) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Raises this process's open-file limit to its hard limit (children inherit it).
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        r.rlim_cur
    }
}

/// `1-minute load average` from /proc/loadavg.
pub fn load_avg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_secs(me).is_some());
        let w = Watch::default();
        let a = w.snapshot();
        let b = w.snapshot();
        assert!(a.usage_until(&b).bench >= 0.0);
    }
}
