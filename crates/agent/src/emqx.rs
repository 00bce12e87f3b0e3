//! The EMQX 4.x driver: performs each step by calling an existing installation's `emqx`
//! script (`emqx versions`, `emqx unpack V`, `emqx upgrade --no-permanent V`, `emqx install V`,
//! `emqx downgrade V`, `emqx uninstall V`) and parsing its `versions` output.
//!
//! Before calling the script, the step is decided by the same pure rules as the native store
//! over the parsed `versions`: refusals (patch-only hops, uninstall of the running release)
//! happen before anything runs and read the same, and repeated steps report "already".

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use orch_release::rules::{self, Op, Plan, Record, Releases};
use orch_types::{Version, VersionEntry, parse_versions};

use crate::driver::{Driver, StepOutcome};
use crate::error::{Error, Result};

pub struct EmqxDriver {
    bin: PathBuf,
    timeout: Duration,
}

impl EmqxDriver {
    pub fn new(bin: PathBuf, timeout: Duration) -> Self {
        EmqxDriver { bin, timeout }
    }

    fn fail(&self, msg: String) -> Error {
        Error::Driver {
            driver: "emqx",
            msg,
            source: None,
        }
    }

    /// `msg`, caused by an I/O error, for `map_err`.
    fn io_fail(&self, msg: String) -> impl FnOnce(std::io::Error) -> Error {
        move |e| Error::Driver {
            driver: "emqx",
            msg,
            source: Some(e),
        }
    }

    /// Runs `emqx ARGS...`, bounded by the timeout; returns stdout on exit 0.
    fn emqx(&self, args: &[&str]) -> Result<String> {
        let shown = format!("{} {}", self.bin.display(), args.join(" "));
        let mut child = Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(self.io_fail(format!("cannot run {shown}")))?;
        // Read both pipes on threads so a chatty script cannot block on a full pipe.
        let out = child.stdout.take().map(read_all);
        let err = child.stderr.take().map(read_all);
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if start.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(self.fail(format!(
                        "{shown} did not finish within {:?} and was killed",
                        self.timeout
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(self.io_fail(format!("waiting for {shown}"))(e)),
            }
        };
        let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
        if status.success() {
            Ok(stdout)
        } else {
            let text = if stderr.trim().is_empty() {
                &stdout
            } else {
                &stderr
            };
            let tail: Vec<&str> = text.trim().lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(self.fail(format!("{shown} failed ({status}): {}", tail.join(" | "))))
        }
    }

    fn table(&self) -> Result<Releases> {
        let mut t = Releases::default();
        for e in self.versions()? {
            t.releases.insert(
                e.version,
                Record {
                    state: e.state,
                    name: "emqx".into(),
                },
            );
        }
        Ok(t)
    }

    /// Decides with the shared rules, then runs the script for a real change.
    fn step(&self, op: Op, args: &[&str]) -> Result<StepOutcome> {
        let table = self.table()?;
        // The script finds the package itself; the rules only need to know one could exist.
        let switches = matches!(op, Op::Install { .. } | Op::Downgrade(_));
        match rules::plan(&table, op, Some("emqx")).map_err(|r| Error::Refused(r.0))? {
            Plan::Already(msg) => Ok(StepOutcome {
                changed: false,
                messages: vec![msg],
                notes: vec![],
                activation: None,
                hooks: vec![],
            }),
            Plan::Apply(change) => {
                let started = std::time::Instant::now();
                let out = self.emqx(args)?;
                let activation = switches.then(|| started.elapsed());
                let mut messages: Vec<String> = out
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect();
                if messages.is_empty() {
                    messages = change.messages;
                }
                Ok(StepOutcome {
                    changed: true,
                    messages,
                    notes: vec![],
                    activation,
                    hooks: vec![],
                })
            }
        }
    }
}

fn read_all(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

impl Driver for EmqxDriver {
    fn name(&self) -> &'static str {
        "emqx"
    }

    fn versions(&self) -> Result<Vec<VersionEntry>> {
        let out = self.emqx(&["versions"])?;
        parse_versions(&out).map_err(|e| self.fail(format!("cannot parse `emqx versions`: {e}")))
    }

    // `_sha256` (like signatures) is checked by the agent's package gate before the script
    // runs: the script looks the package up itself.
    fn unpack(&self, v: Version, _sha256: Option<&str>) -> Result<StepOutcome> {
        let s = v.to_string();
        self.step(Op::Unpack(v), &["unpack", &s])
    }

    fn install(&self, v: Version, permanent: bool, _sha256: Option<&str>) -> Result<StepOutcome> {
        let s = v.to_string();
        let op = Op::Install {
            version: v,
            permanent,
        };
        if permanent {
            self.step(op, &["install", &s])
        } else {
            self.step(op, &["upgrade", "--no-permanent", &s])
        }
    }

    fn permanent(&self, v: Version) -> Result<StepOutcome> {
        // EMQX has no separate `permanent`: `install` of the current release makes it permanent.
        let s = v.to_string();
        self.step(Op::Permanent(v), &["install", &s])
    }

    fn downgrade(&self, v: Version) -> Result<StepOutcome> {
        let s = v.to_string();
        self.step(Op::Downgrade(v), &["downgrade", &s])
    }

    fn uninstall(&self, v: Version) -> Result<StepOutcome> {
        let s = v.to_string();
        self.step(Op::Uninstall(v), &["uninstall", &s])
    }

    fn reconcile_running(&self, _reported: Version) -> Result<Option<String>> {
        // release_handler inside EMQX already shows a restarted node's state correctly.
        Ok(None)
    }
}
