//! The web dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! driven over the W3C WebDriver protocol on loopback; skipped loudly when missing): the page
//! follows a rollout live over server-sent events, without reloads, until every node runs the
//! new version and the rollout succeeded; then a broken release rolling back.
//!
//! `ORCH_WRITE_SCREENSHOT=1` also saves a screenshot of the rollout in progress as
//! docs/dashboard.png (off by default, so that CI does not touch the tree).

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use orch_tests::cluster::{Cluster, ClusterOpts};
use orch_tests::http::http_json;
use serde_json::{Value, json};

/// chromedriver on a loopback port, killed (even on panic) when dropped.
struct Driver {
    child: Child,
    addr: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tools_or_skip() -> bool {
    let works = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let ok = works("chromium") && works("chromedriver");
    if !ok {
        eprintln!(
            "!!!!!!!! SKIPPED dashboard browser test: chromium/chromedriver are not installed (apt-get install chromium chromium-driver) !!!!!!!!"
        );
    }
    ok
}

impl Driver {
    fn start() -> Driver {
        let port = orch_tests::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let d = Driver {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        orch_tests::wait_until(Duration::from_secs(20), "chromedriver listening", || {
            TcpStream::connect(&d.addr).is_ok()
        });
        d
    }
}

/// One WebDriver session (a headless Chromium window), ended when dropped.
struct Browser<'a> {
    driver: &'a Driver,
    session: String,
}

impl Browser<'_> {
    fn open(driver: &Driver) -> Browser<'_> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": [
                "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1100"
            ]}
        }}});
        let v = call(driver, "POST", "/session", Some(caps));
        let session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        Browser { driver, session }
    }

    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}/{what}", self.session);
        call(self.driver, method, &path, body)
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "url", Some(json!({"url": url})));
    }

    fn exec(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// The text of the first element matching `css` ("" when none).
    fn text(&self, css: &str) -> String {
        self.exec(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            json!([css]),
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// The text of every row of the table `#id`, cells joined by " | ".
    fn rows(&self, id: &str) -> Vec<String> {
        let v = self.exec(
            "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr')).map(r => Array.from(r.cells).map(c => c.textContent).join(' | '));",
            json!([id]),
        );
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd("GET", "screenshot", None);
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("a base64 PNG"))
            .expect("base64")
    }

    /// Polls the page until `ok` holds (60 s); panics with what the page showed.
    fn until(&self, what: &str, ok: impl Fn(&Browser<'_>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok(self) {
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}: connection {:?}, rollout {:?} {:?}, nodes {:?}, history {:?}",
                self.text("#conn"),
                self.text("#rollout-head"),
                self.rows("rollout-nodes"),
                self.rows("nodes"),
                self.rows("history"),
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let path = format!("/session/{}", self.session);
        let _ = http_json("DELETE", &self.driver.addr, &path, None);
    }
}

/// A WebDriver command; its `value` (panics on a WebDriver error).
fn call(driver: &Driver, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string());
    let (code, text) = http_json(method, &driver.addr, path, body.as_deref());
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {path}: HTTP {code}, not JSON ({e}): {text}"));
    assert_eq!(code, 200, "{method} {path}: {v}");
    v["value"].clone()
}

/// The coordinator's dashboard URL, from the line it logs when the endpoint is up.
fn dashboard_url(c: &Cluster) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = c.coords[0].log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("dashboard and metrics listening"))
            && let Some(at) = line.find("http://")
        {
            let rest = &line[at + "http://".len()..];
            let end = rest.find('/').unwrap_or(rest.len());
            return format!("http://{}/", &rest[..end]);
        }
        assert!(Instant::now() < deadline, "no dashboard URL logged:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn nodes_all_on(b: &Browser<'_>, release: &str) -> bool {
    let n = b.rows("nodes");
    n.len() == 3 && n.iter().all(|r| r.contains(release))
}

#[test]
fn the_dashboard_follows_a_rollout_and_a_rollback_live() {
    if !tools_or_skip() {
        return;
    }
    let c =
        Cluster::start(ClusterOpts::demo(1, 3).coordinator_args(&["--http-listen", "127.0.0.1:0"]));
    let url = dashboard_url(&c);
    let good = c.package("4.2.1", false).display().to_string();
    let broken = c.package("4.2.2", true).display().to_string();
    let driver = Driver::start();
    let b = Browser::open(&driver);
    b.goto(&url);
    b.until("the live connection", |b| b.text("#conn") == "live");
    b.until("three nodes on 4.2.0", |b| {
        nodes_all_on(b, "4.2.0 permanent")
    });

    // A gate long enough to catch the rollout in progress; the page is never reloaded.
    c.cli_ok(&[
        "rollout",
        "4.2.1",
        "--package",
        &good,
        "--min-healthy-time",
        "3s",
        "--detach",
    ]);
    // Nodes are committed together at the end: in progress, one has passed its gate
    // (`upgraded`) while the next is in it.
    b.until(
        "the rollout in progress, a node upgraded and one in its gate",
        |b| {
            let steps = b.rows("rollout-nodes");
            b.text("#rollout-title").contains("r000001")
                && steps.iter().any(|r| r.contains("| upgraded |"))
                && steps.iter().any(|r| r.contains("| verifying |"))
        },
    );
    if std::env::var_os("ORCH_WRITE_SCREENSHOT").is_some_and(|v| v == "1") {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png");
        std::fs::write(&path, b.screenshot()).expect("write docs/dashboard.png");
    }
    b.until("every node committed and the rollout succeeded", |b| {
        let steps = b.rows("rollout-nodes");
        b.text("#rollout-head").starts_with("succeeded")
            && steps.len() == 3
            && steps.iter().all(|r| r.contains("committed"))
    });
    b.until("every node reaching 4.2.1", |b| {
        nodes_all_on(b, "4.2.1 permanent")
    });
    b.until("the rollout in the history", |b| {
        b.rows("history")
            .iter()
            .any(|r| r.starts_with("r000001 | 4.2.1 | succeeded"))
    });

    // A broken release: its health gate fails and the touched node is rolled back.
    c.cli_ok(&[
        "rollout",
        "4.2.2",
        "--package",
        &broken,
        "--min-healthy-time",
        "500ms",
        "--healthy-deadline",
        "2s",
        "--detach",
    ]);
    b.until("the broken rollout rolled back", |b| {
        b.text("#rollout-title").contains("r000002")
            && b.text("#rollout-head").starts_with("rolled_back")
            && b.text("#rollout-error").contains("health gate")
    });
    b.until("every node back on 4.2.1", |b| {
        nodes_all_on(b, "4.2.1 permanent")
            && !b.rows("nodes").iter().any(|r| r.contains("4.2.2 current"))
    });
    b.until("both rollouts in the history", |b| {
        let h = b.rows("history");
        h.iter()
            .any(|r| r.starts_with("r000002 | 4.2.2 | rolled_back"))
            && h.iter()
                .any(|r| r.starts_with("r000001 | 4.2.1 | succeeded"))
    });
}
