//! The demo's processes: node roots with the demo service, coordinators and agents started as
//! children of the `orchestrator` binary, all stopped on every exit path.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orch_release::{PackageSource, Store, StoreConfig};
use orch_tls::{Role, Security};
use orch_types::Version;

use crate::{DemoConfig, DemoError, Report, V_BROKEN, V0, V1};

/// A running demo cluster. Dropping it stops everything it started.
pub struct DemoCluster {
    pub(crate) config: DemoConfig,
    /// `certs/` (mutual TLS), or `None` for plain text.
    certs: Option<PathBuf>,
    /// The coordinators' `127.0.0.1:PORT` addresses.
    coordinators: Vec<String>,
    /// Their dashboards' URLs (`--http-listen`).
    dashboards: Vec<String>,
    /// Each node's demo-service address.
    pub(crate) services: Vec<SocketAddr>,
    /// The packages built for the rollouts: [`V1`], then [`V_BROKEN`] when the config asks for
    /// the failing rollout.
    pub(crate) packages: Vec<(Version, PathBuf)>,
    children: Vec<(String, Child)>,
    /// Node roots whose demo service must be stopped.
    roots: Vec<PathBuf>,
    /// Ports picked for the services and daemons, held until each one's user starts.
    ports: Reserved,
}

/// Loopback ports picked for every service and daemon before any is started, each held
/// (bound) until just before the process that listens on it starts. A port picked and released
/// at once could be handed out again meanwhile: to another pick, or as the source port of a
/// connection a daemon started earlier makes (an agent once failed with `Address already in
/// use` at startup). The kernel gives a held port to neither.
#[derive(Default)]
struct Reserved {
    /// Held and not handed out yet.
    free: std::collections::VecDeque<TcpListener>,
    /// Handed out, held until released.
    picked: Vec<(u16, TcpListener)>,
}

impl Reserved {
    fn new(n: usize) -> Result<Reserved, DemoError> {
        let mut free = std::collections::VecDeque::with_capacity(n);
        // Below the kernel's ephemeral range: held or not, no outgoing connection's source port
        // is ever drawn from there (a daemon binds its port a moment after the demo lets go,
        // and under load that moment was long enough for another daemon's connection to take
        // it). Each candidate is bound to check that nothing else listens there.
        let (below, _) = ephemeral_range();
        let low = below.saturating_sub(10_000).max(1024);
        let span = u32::from(below.saturating_sub(low));
        if span >= 1000 {
            // A different start per run, so that two demos at once rarely try the same ports.
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
                ^ std::process::id();
            for i in 0..span {
                if free.len() == n {
                    break;
                }
                let port = low + ((seed.wrapping_add(i) % span) as u16);
                if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
                    free.push_back(l);
                }
            }
        }
        // No room below the range (or every port there taken): the kernel's pick.
        while free.len() < n {
            let l = TcpListener::bind("127.0.0.1:0")
                .map_err(DemoError::io("find a free loopback port"))?;
            free.push_back(l);
        }
        Ok(Reserved {
            free,
            picked: Vec::new(),
        })
    }

    /// A port for one process, still held until [`Reserved::release`].
    fn pick(&mut self) -> Result<u16, DemoError> {
        let io = DemoError::io("find a free loopback port");
        let Some(l) = self.free.pop_front() else {
            return Err(io(std::io::Error::other("every reserved port is in use")));
        };
        let port = match l.local_addr() {
            Ok(a) => a.port(),
            Err(e) => return Err(io(e)),
        };
        self.picked.push((port, l));
        Ok(port)
    }

    /// Stops holding `ports`: their process is about to bind them.
    fn release(&mut self, ports: &[u16]) {
        self.picked.retain(|(p, _)| !ports.contains(p));
    }
}

impl DemoCluster {
    /// Lays out the demo directory and starts every daemon. Returns once they are started, not
    /// once they have formed a cluster ([`DemoCluster::run`] waits for that).
    pub fn start(
        config: &DemoConfig,
        report: &mut dyn FnMut(Report<'_>),
    ) -> Result<DemoCluster, DemoError> {
        config.check()?;
        let base = &config.dir;
        fs::create_dir_all(base).map_err(DemoError::io(format!("create {}", base.display())))?;
        let mut cluster = DemoCluster {
            config: config.clone(),
            certs: None,
            coordinators: Vec::new(),
            dashboards: Vec::new(),
            services: Vec::new(),
            packages: Vec::new(),
            children: Vec::new(),
            roots: Vec::new(),
            // A service per node, a listener and a dashboard per coordinator, an agent per node.
            ports: Reserved::new(2 * (config.nodes + config.coordinators) as usize)?,
        };
        if !config.insecure {
            let dir = demo_certs(base, config.coordinators, config.nodes)?;
            report(Report::Certificates { dir: &dir });
            cluster.certs = Some(dir);
        }
        let initial = cluster.build_packages(report)?;
        cluster.install_nodes(&initial)?;
        report(Report::NodesInstalled {
            nodes: config.nodes,
            version: V0,
        });
        cluster.spawn_coordinators()?;
        cluster.spawn_agents()?;
        report(Report::DaemonsStarted {
            coordinators: config.coordinators,
            nodes: config.nodes,
            logs: base,
        });
        Ok(cluster)
    }

    /// The coordinators' addresses (what `ORCHESTRATOR_COORDINATORS` should hold).
    /// The coordinators' dashboards (HTTPS under mutual TLS: a viewer certificate is needed).
    pub fn dashboard_urls(&self) -> &[String] {
        &self.dashboards
    }

    pub fn coordinator_addrs(&self) -> &[String] {
        &self.coordinators
    }

    /// The operator's certificate folder (what `ORCHESTRATOR_TLS_DIR` should name), or `None`
    /// for a plain-text demo.
    pub fn operator_tls_dir(&self) -> Option<PathBuf> {
        self.certs.as_ref().map(|d| d.join("operator-demo"))
    }

    /// The packages of the versions the demo rolls out, in order.
    pub fn packages(&self) -> &[(Version, PathBuf)] {
        &self.packages
    }

    /// A client for the coordinators, as the demo's operator.
    pub fn client(&self) -> Result<orch_client::Client, DemoError> {
        let security = match self.operator_tls_dir() {
            None => Security::Insecure,
            Some(d) => Security::resolve(false, Some(&d), None, None, None).map_err(|source| {
                DemoError::Tls {
                    dir: d.clone(),
                    source,
                }
            })?,
        };
        Ok(orch_client::Client::new(
            self.coordinators.clone(),
            security,
        ))
    }

    /// Builds the packages: the initial version (returned), the target and, for the failing
    /// rollout, the broken one.
    fn build_packages(&mut self, report: &mut dyn FnMut(Report<'_>)) -> Result<PathBuf, DemoError> {
        let dir = self.config.dir.join("packages");
        fs::create_dir_all(&dir).map_err(DemoError::io(format!("create {}", dir.display())))?;
        let bin = crate::service_binary(&self.config.exe, &dir)?;
        let initial = crate::build_package(&dir, V0, false, &bin)?;
        let mut versions = vec![V0, V1];
        self.packages
            .push((V1, crate::build_package(&dir, V1, false, &bin)?));
        if self.config.failure {
            self.packages
                .push((V_BROKEN, crate::build_package(&dir, V_BROKEN, true, &bin)?));
            versions.push(V_BROKEN);
        }
        report(Report::Packages {
            dir: &dir,
            versions: &versions,
        });
        Ok(initial)
    }

    /// A root per node with `initial` installed (its hook starts the demo service).
    fn install_nodes(&mut self, initial: &Path) -> Result<(), DemoError> {
        for i in 1..=self.config.nodes {
            let root = self.config.dir.join(format!("node{i}"));
            let releases = root.join("releases");
            fs::create_dir_all(&releases)
                .map_err(DemoError::io(format!("create {}", releases.display())))?;
            let svc = SocketAddr::from(([127, 0, 0, 1], self.ports.pick()?));
            let conf = root.join("demo-service.toml");
            fs::write(&conf, format!("listen = \"{svc}\"\n"))
                .map_err(DemoError::io(format!("write {}", conf.display())))?;
            let store = Store::open(StoreConfig::new(&root)).map_err(DemoError::release(
                format!("open the release store of node n{i} in {}", root.display()),
            ))?;
            self.roots.push(root.clone());
            let source = PackageSource::File {
                path: initial.to_path_buf(),
                sha256: None,
            };
            // The install's hook starts the service, which binds it.
            self.ports.release(&[svc.port()]);
            store
                .install(&source, true)
                .map_err(DemoError::release(format!(
                    "install {V0} on node n{i} ({})",
                    root.display()
                )))?;
            self.services.push(svc);
        }
        Ok(())
    }

    fn spawn_coordinators(&mut self) -> Result<(), DemoError> {
        let base = self.config.dir.clone();
        let ports = (0..self.config.coordinators)
            .map(|_| self.ports.pick())
            .collect::<Result<Vec<u16>, _>>()?;
        self.coordinators = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let list = base.join("coordinators");
        fs::write(&list, self.coordinators.join(","))
            .map_err(DemoError::io(format!("write {}", list.display())))?;
        for (i, addr) in self.coordinators.clone().iter().enumerate() {
            let id = i + 1;
            let mut a = vec![
                "coordinator".to_string(),
                "--id".into(),
                id.to_string(),
                "--listen".into(),
                addr.clone(),
                "--data-dir".into(),
                base.join(format!("coordinator{id}")).display().to_string(),
            ];
            a.extend(self.tls_flags(&format!("coordinator-{id}")));
            let http_port = self.ports.pick()?;
            let http = format!("127.0.0.1:{http_port}");
            let scheme = if self.certs.is_some() {
                "https"
            } else {
                "http"
            };
            self.dashboards.push(format!("{scheme}://{http}/"));
            a.push("--http-listen".into());
            a.push(http);
            for (j, peer) in self.coordinators.iter().enumerate() {
                if j != i {
                    a.push("--peer".into());
                    a.push(format!("{}={peer}", j + 1));
                }
            }
            if id == 1 {
                a.push("--bootstrap".into());
            }
            let log = base.join(format!("coordinator{id}.log"));
            self.ports.release(&[ports[i], http_port]);
            self.spawn(&format!("coordinator {id}"), &log, &a)?;
        }
        Ok(())
    }

    fn spawn_agents(&mut self) -> Result<(), DemoError> {
        let base = self.config.dir.clone();
        for (i, svc) in self.services.clone().iter().enumerate() {
            let n = i + 1;
            let port = self.ports.pick()?;
            let mut a = vec![
                "agent".to_string(),
                "--node-id".into(),
                format!("n{n}"),
                "--root-dir".into(),
                base.join(format!("node{n}")).display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--health-url".into(),
                format!("http://{svc}/health"),
            ];
            a.extend(self.tls_flags(&format!("agent-n{n}")));
            for c in &self.coordinators {
                a.push("--coordinator".into());
                a.push(c.clone());
            }
            let log = base.join(format!("agent{n}.log"));
            self.ports.release(&[port]);
            self.spawn(&format!("agent n{n}"), &log, &a)?;
        }
        Ok(())
    }

    /// `--insecure`, or `--tls-dir certs/<party>`.
    fn tls_flags(&self, party: &str) -> Vec<String> {
        match &self.certs {
            None => vec!["--insecure".into()],
            Some(d) => vec!["--tls-dir".into(), d.join(party).display().to_string()],
        }
    }

    /// Starts `exe args...` with stdout and stderr appended to `log`.
    fn spawn(&mut self, name: &str, log: &Path, args: &[String]) -> Result<(), DemoError> {
        let log_file =
            fs::File::create(log).map_err(DemoError::io(format!("create {}", log.display())))?;
        let err_file = log_file
            .try_clone()
            .map_err(DemoError::io(format!("open {}", log.display())))?;
        let child = Command::new(&self.config.exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .map_err(DemoError::io(format!(
                "start {name} ({})",
                self.config.exe.display()
            )))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Stops every daemon (SIGTERM, then SIGKILL after 5 s) and every demo service. Idempotent.
    pub fn stop(&mut self) {
        for (_, c) in &mut self.children {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                // Our own child, not reaped yet: its pid cannot have been reused.
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, c) in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        for r in self.roots.drain(..) {
            let _ = orch_demo_service::stop(&r, Duration::from_secs(5));
        }
    }
}

impl Drop for DemoCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The kernel's range for the source ports of outgoing connections (and for binding port 0).
fn ephemeral_range() -> (u16, u16) {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(lo), Some(hi)) if lo <= hi => (lo, hi),
        _ => (32768, 60999),
    }
}

/// The demo's certificates in `base/certs` (one folder per party, `orchestrator certs init`
/// style); parties missing from an earlier run with the same directory are issued.
fn demo_certs(base: &Path, coordinators: u32, nodes: u32) -> Result<PathBuf, DemoError> {
    let dir = base.join("certs");
    let tls = |source| DemoError::Tls {
        dir: dir.clone(),
        source,
    };
    let agents: Vec<String> = (1..=nodes).map(|n| format!("n{n}")).collect();
    if !dir.join(orch_tls::CA_FOLDER).exists() {
        orch_tls::init(&dir, coordinators, &agents, &["demo".to_string()]).map_err(tls)?;
        return Ok(dir);
    }
    let mut want: Vec<(Role, String)> = (1..=coordinators)
        .map(|i| (Role::Coordinator, i.to_string()))
        .collect();
    want.extend(agents.into_iter().map(|a| (Role::Agent, a)));
    want.push((Role::Operator, "demo".into()));
    for (role, name) in want {
        if !dir.join(orch_tls::party_domain(role, &name)).exists() {
            orch_tls::issue(&dir, role, &name, &[]).map_err(tls)?;
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The port race at fleet start (`Address already in use`): a port the demo picked must
    /// stay its own until the daemon that listens on it starts. Picking by binding port 0 and
    /// letting go at once left it free for anyone in between.
    #[test]
    fn picked_ports_are_distinct_and_held_until_released() {
        let mut ports = Reserved::new(6).unwrap();
        let picked: Vec<u16> = (0..6).map(|_| ports.pick().unwrap()).collect();
        let (lo, _) = ephemeral_range();
        if lo >= 11_024 {
            assert!(
                picked.iter().all(|&p| p < lo),
                "{picked:?}: outside the ephemeral range, where connections draw source ports"
            );
        }
        let distinct: std::collections::BTreeSet<u16> = picked.iter().copied().collect();
        assert_eq!(distinct.len(), 6, "{picked:?}");
        assert!(
            ports.pick().is_err(),
            "only the reserved ports are handed out"
        );
        for &p in &picked {
            assert!(
                TcpListener::bind(("127.0.0.1", p)).is_err(),
                "port {p} is free for anyone before its daemon starts"
            );
        }
        ports.release(&picked[..1]);
        let l = TcpListener::bind(("127.0.0.1", picked[0]));
        assert!(l.is_ok(), "a released port is its daemon's to bind");
        assert!(TcpListener::bind(("127.0.0.1", picked[1])).is_err());
    }
}
