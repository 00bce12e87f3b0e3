#!/usr/bin/env python3
"""End to end against Ansible: `orchestrator rollout` beside an Ansible `serial: 1` playbook.

For each fleet size N (10 and 20 by default) this starts two identical fleets of N local nodes,
each node a root directory with the demo service running release 4.2.1:

- the orchestrator's: `orchestrator demo --nodes N --keep --insecure --no-failure` (3 coordinator
  processes, one agent process per node; the demo installs 4.2.0 and rolls 4.2.1 out, then
  keeps running);
- Ansible's: N node roots laid out the same way, 4.2.1 installed by the same release store
  (`orchestrator node --root-dir ROOT install --package demo-service-4.2.1.zip`, which runs the
  release's activation hook and so starts the service). No agent runs on them.

Each tool upgrades its own fleet, so neither has to understand the other's bookkeeping (the
store's state.json against the playbook's directories) and both always start a step from the
same versions, the same files and the same running services. Then, R rounds (3 by default):
a full package (the demo release plus ~20 MB of fresh incompressible filler, version 4.2.R0)
rolled out by both, then its patch (the same files with one small file changed, 4.2.R1) rolled
out by both. The order alternates every round (orchestrator first in odd rounds, Ansible first
in even ones) so that load on the machine falls on both alike. Each step is timed from the
command's start to its exit; after it, every node's /health must report the new version.

Prints each step's wall time and the ratio ansible / orchestrator, then min / median / max of
the ratio per N and kind; writes the same to WORK/results.json and WORK/results.md.

Needs: target/release/orchestrator (`cargo build --release --bins`; it is not built here),
python3 with venv, unzip and zipinfo (for Ansible's unarchive). ansible-core is installed into
a venv (WORK/../bench-ansible-venv by default, kept between runs). Everything it starts is
stopped at the end, on error and on Ctrl-C / SIGTERM; two runs at once are refused.
"""

import argparse
import fcntl
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
# What `orchestrator demo --no-failure` leaves its nodes on.
BASE_VERSION = "4.2.1"
PACKAGE_NAME = "demo-service"
LOCK_FILE = Path(os.environ.get("TMPDIR", "/tmp")) / "orchestrator-ansible-compare.lock"
DEMO_READY_LINE = "The cluster keeps running"


class Fail(Exception):
    """A step failed: the message says what, where, and what to look at."""


class Interrupted(Exception):
    """SIGTERM or SIGHUP: stop like Ctrl-C does."""


def log(msg=""):
    print(msg, flush=True)


def parse_args():
    p = argparse.ArgumentParser(
        description="Time orchestrator rollouts against an Ansible serial:1 playbook, interleaved.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  cargo build --release --bins && deploy/bench/ansible/compare.py\n"
        "  deploy/bench/ansible/compare.py --quick",
    )
    default_target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    p.add_argument("--bin", type=Path, default=default_target / "release" / "orchestrator",
                   help="the orchestrator binary [default: $CARGO_TARGET_DIR or target/, release/orchestrator]")
    p.add_argument("--work", type=Path, default=REPO / "target" / "bench-ansible",
                   help="working directory: packages, fleets, logs, results [default: target/bench-ansible]")
    p.add_argument("--venv", type=Path, default=None,
                   help="where ansible-core is installed (kept between runs) [default: WORK/../bench-ansible-venv]")
    p.add_argument("--nodes", default="10,20", help="fleet sizes, comma-separated (1 to 20) [default: 10,20]")
    p.add_argument("--rounds", type=int, default=3, help="rounds per fleet size [default: 3]")
    p.add_argument("--filler-mb", type=int, default=20, help="incompressible filler per package, MiB [default: 20]")
    p.add_argument("--coordinators", type=int, default=3, choices=[1, 3, 5], help="[default: 3]")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 3 nodes, 1 round, 4 MiB filler (figures prove it ran, nothing more)")
    p.add_argument("--keep-nodes", action="store_true",
                   help="leave the fleets' node and coordinator directories in WORK (several GB)")
    a = p.parse_args()
    if a.quick:
        a.nodes, a.rounds, a.filler_mb = "3", 1, 4
    try:
        a.sizes = [int(s) for s in a.nodes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--nodes {a.nodes!r}: expected numbers like 10,20")
    if not a.sizes or any(n < 1 or n > 20 for n in a.sizes):
        p.error("--nodes: each size must be 1 to 20 (what `orchestrator demo` supports)")
    if a.rounds < 1 or a.filler_mb < 0:
        p.error("--rounds must be at least 1 and --filler-mb at least 0")
    a.work = a.work.resolve()
    a.venv = (a.venv or a.work.parent / "bench-ansible-venv").resolve()
    a.bin = a.bin.resolve()
    return a


def take_lock():
    """Refuses a second run at once (they would share the CPU and skew each other)."""
    f = open(LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        raise Fail(f"another compare.py run holds {LOCK_FILE} (pid {holder}); "
                   "wait for it to finish or stop it first") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f  # held until this process exits


def check_tools(a):
    if not a.bin.is_file():
        raise Fail(f"{a.bin} not found: build it first (cargo build --release --bins), "
                   "or name another with --bin")
    for tool in ("unzip", "zipinfo"):
        if shutil.which(tool) is None:
            raise Fail(f"`{tool}` is not installed; Ansible's unarchive needs it "
                       "(apt-get install unzip)")


def ensure_ansible(venv: Path) -> Path:
    """ansible-playbook from the venv, installing ansible-core there when missing."""
    playbook = venv / "bin" / "ansible-playbook"
    if playbook.is_file():
        return playbook
    log(f"Installing ansible-core into {venv} (once; kept for later runs)")
    run([sys.executable, "-m", "venv", str(venv)], "create the venv")
    run([str(venv / "bin" / "pip"), "install", "--quiet", "-r", str(HERE / "requirements.txt")],
        "pip install ansible-core (PyPI must be reachable)")
    if not playbook.is_file():
        raise Fail(f"pip installed ansible-core but {playbook} is missing; remove {venv} and retry")
    return playbook


def run(cmd, what, **kw):
    """Runs cmd to completion; a failure raises Fail with its output's tail."""
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr).strip()[-2000:]
        raise Fail(f"{what} failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return r.stdout


def timed(cmd, logf, env=None, stdout=None):
    """Runs cmd in its own process group with output appended to logf (stdout to `stdout` when
    given); returns (exit, seconds). On an interrupt the whole group is killed (ansible-playbook
    forks workers)."""
    logf.write(f"\n$ {' '.join(map(str, cmd))}\n")
    logf.flush()
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout or logf,
                         stderr=subprocess.STDOUT if stdout is None else logf,
                         env=env, start_new_session=True)
    try:
        rc = p.wait()
    except BaseException:
        kill_group(p.pid, signal.SIGKILL)
        p.wait()
        raise
    return rc, time.monotonic() - start


def kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------
# Packages


def extract(zip_path: Path, dest: Path):
    """Unzips with the entries' Unix modes (zipfile alone drops the executable bits)."""
    with zipfile.ZipFile(zip_path) as z:
        for info in z.infolist():
            out = z.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o7777
            if mode:
                os.chmod(out, mode)


def build_packages(a) -> list:
    """[(round, kind, version, zip)]: per round a full package (fresh filler) and its patch."""
    pkgs = a.work / "packages"
    src = a.work / "src"
    for d in (pkgs, src):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    # The demo release directory: what `orchestrator demo package` zips, around a stripped copy
    # of the demo-service binary beside the orchestrator (a release build keeps debug info).
    env = dict(os.environ)
    service = a.bin.parent / "demo-service"
    if service.is_file() and shutil.which("strip"):
        env["ORCH_DEMO_SERVICE_BIN"] = str(src / "demo-service")
        run(["strip", "-o", env["ORCH_DEMO_SERVICE_BIN"], str(service)], "strip demo-service")
    run([str(a.bin), "demo", "package", BASE_VERSION, "--out", str(src)], "build the demo package",
        env=env)
    template = src / "template"
    extract(src / f"{PACKAGE_NAME}-{BASE_VERSION}.zip", template)
    out = []
    for r in range(1, a.rounds + 1):
        d = src / f"round{r}"
        shutil.copytree(template, d, symlinks=True)
        filler = d / "filler"
        filler.mkdir()
        for i in range(a.filler_mb):
            (filler / f"blob-{i:03}.bin").write_bytes(os.urandom(1 << 20))
        # Hot upgrades stay within major.minor: 4.2.R0, then its patch 4.2.R1.
        for kind, version, note in (("full", f"4.2.{r}0", "full"), ("patch", f"4.2.{r}1", "patched")):
            (d / "release.toml").write_text(f'name = "{PACKAGE_NAME}"\nversion = "{version}"\n')
            (d / "notes.txt").write_text(f"round {r}: {note} release {version}\n")
            run([str(a.bin), "package", "build", str(d), "--name", PACKAGE_NAME,
                 "--version", version, "--out", str(pkgs)], f"build package {version}")
            out.append((r, kind, version, pkgs / f"{PACKAGE_NAME}-{version}.zip"))
        shutil.rmtree(d)
    sizes = sorted({round(p.stat().st_size / 1e6, 1) for *_, p in out})
    log(f"Built {len(out)} packages in {pkgs} ({', '.join(map(str, sizes))} MB)")
    return out


# ---------------------------------------------------------------------------------------------
# Fleets


@dataclass
class Fleet:
    name: str
    roots: list = field(default_factory=list)
    ports: list = field(default_factory=list)


def ephemeral_range():
    """The kernel's range for the source ports of outgoing connections (and for bind to port 0)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


class Ports:
    """Ports for the Ansible fleet's services that nothing else on this machine is handed: none
    from the kernel's ephemeral range, which every daemon's outgoing connection draws its source
    port from (and the demo's fleet its ports), each checked free by binding it, and none twice.
    A port picked by binding port 0 and then released could be taken meanwhile; so could a
    demo agent's: `Address already in use` at fleet start (see `start_demo`)."""

    def __init__(self):
        lo, hi = ephemeral_range()
        # Below the ephemeral range when there is room for a fleet, else above it.
        self.candidates = list(range(20000, lo)) if lo - 20000 >= 1000 else list(range(hi + 1, 65536))
        random.shuffle(self.candidates)
        self.given = set()

    def pick(self) -> int:
        while self.candidates:
            port = self.candidates.pop()
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            self.given.add(port)
            return port
        raise Fail("no free loopback port outside the ephemeral range")


def listen_port(root: Path) -> int:
    """The port in ROOT/demo-service.toml (`listen = "127.0.0.1:PORT"`)."""
    conf = root / "demo-service.toml"
    for line in conf.read_text().splitlines():
        if line.strip().startswith("listen"):
            return int(line.split('"')[1].rsplit(":", 1)[1])
    raise Fail(f"no listen address in {conf}")


def health(port: int):
    """(status, version) of the demo service on port, or (None, None) when it does not answer."""
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, json.loads(r.read()).get("version")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError):
        return None, None


def check_fleet(fleet: Fleet, version: str, deadline_s=10.0):
    """Every node's /health reports version (polled up to deadline_s: a swap may be finishing)."""
    deadline = time.monotonic() + deadline_s
    for root, port in zip(fleet.roots, fleet.ports):
        while True:
            status, got = health(port)
            if status == 200 and got == version:
                break
            if time.monotonic() > deadline:
                raise Fail(f"{fleet.name} fleet: node {root.name} (port {port}) reports "
                           f"status {status} version {got}, expected {version}; "
                           f"see {root}/log/demo-service.log")
            time.sleep(0.05)


class Demo:
    """`orchestrator demo --keep`: coordinators, agents and their services. stop() ends all."""

    def __init__(self, a, n: int, d: Path):
        self.dir = d
        self.log_path = d.parent / "orchestrator-demo.log"
        self.bin = a.bin
        self.n = n
        self.logf = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(a.bin), "demo", "--nodes", str(n), "--coordinators", str(a.coordinators),
             "--keep", "--insecure", "--no-failure", "--dir", str(d)],
            stdin=subprocess.DEVNULL, stdout=self.logf, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, timeout_s=600) -> Fleet:
        deadline = time.monotonic() + timeout_s
        while DEMO_READY_LINE not in self.log_path.read_text(errors="replace"):
            # A daemon that could not bind its port: the demo would wait for it in vain.
            if port_taken(self.dir) is not None:
                raise Fail(f"orchestrator demo: a daemon could not bind its port: see {self.dir}")
            if self.proc.poll() is not None:
                raise Fail(f"orchestrator demo exited ({self.proc.returncode}) before it was ready: "
                           f"see {self.log_path}\n{tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise Fail(f"orchestrator demo not ready within {timeout_s} s: see {self.log_path}")
            time.sleep(0.2)
        roots = [self.dir / f"node{i}" for i in range(1, self.n + 1)]
        return Fleet("orchestrator", roots, [listen_port(r) for r in roots])

    def coordinators(self) -> str:
        return (self.dir / "coordinators").read_text().strip()

    def stop(self):
        """SIGTERM: the demo stops its daemons and services; SIGKILL to its group after 30 s;
        then each node's service directly, in case the demo could not."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log("orchestrator demo did not stop within 30 s: killing its process group")
        kill_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.logf.close()
        stop_services(self.bin, [self.dir / f"node{i}" for i in range(1, self.n + 1)])


# What a daemon of the demo says when the port it was given was taken before it could bind it.
PORT_TAKEN = "Address already in use"
DEMO_ATTEMPTS = 3


def start_demo(a, n: int, d: Path, cleanup):
    """The demo's fleet, started again (from scratch) when one of its daemons could not bind the
    port it was given, which another process took in between (the demo holds its ports until
    each daemon starts, but a daemon still binds its port a moment after the demo lets go);
    any other failure is reported at once."""
    for attempt in range(1, DEMO_ATTEMPTS + 1):
        demo = Demo(a, n, d)
        cleanup.append(demo.stop)
        try:
            return demo, demo.wait_ready()
        except Fail:
            taken = port_taken(d)
            if taken is None or attempt == DEMO_ATTEMPTS:
                raise
            log(f"orchestrator demo: {taken}: a port was taken before its daemon bound it; "
                f"starting the fleet again ({attempt + 1} of {DEMO_ATTEMPTS})")
            demo.stop()
            cleanup.remove(demo.stop)
            shutil.rmtree(d, ignore_errors=True)


def port_taken(d: Path):
    """The first daemon log line of the demo in d that reports a port already in use, if any."""
    for f in sorted(d.glob("*.log")) + [d.parent / "orchestrator-demo.log"]:
        try:
            for line in f.read_text(errors="replace").splitlines():
                if PORT_TAKEN in line:
                    return f"{f.name}: {line.strip()[:200]}"
        except OSError:
            pass
    return None


def stop_services(bin_path: Path, roots):
    for root in roots:
        if (root / "run").exists():
            subprocess.run([str(bin_path), "demo-service", "stop", "--root", str(root), "--timeout", "5"],
                           stdin=subprocess.DEVNULL, capture_output=True)


def start_ansible_fleet(a, n: int, d: Path, base_zip: Path, cleanup) -> Fleet:
    """N roots like the demo's, BASE_VERSION installed (and started) by the release store."""
    fleet = Fleet("ansible")
    cleanup.append(lambda: stop_services(a.bin, fleet.roots))
    ports = Ports()
    for i in range(1, n + 1):
        root = d / f"node{i}"
        (root / "releases").mkdir(parents=True)
        port = ports.pick()
        (root / "demo-service.toml").write_text(f'listen = "127.0.0.1:{port}"\n')
        fleet.roots.append(root)
        fleet.ports.append(port)
        run([str(a.bin), "node", "--root-dir", str(root), "install", "--package", str(base_zip)],
            f"install {BASE_VERSION} on Ansible node {root}")
    inv = {"nodes": {
        "hosts": {r.name: {"node_root": str(r), "node_port": p} for r, p in zip(fleet.roots, fleet.ports)},
        "vars": {"ansible_connection": "local",
                 "ansible_python_interpreter": str(a.venv / "bin" / "python")},
    }}
    # JSON is YAML: the inventory plugin reads it as such.
    (d / "inventory.yml").write_text(json.dumps(inv, indent=1))
    return fleet


def prune(fleet: Fleet, keep: set):
    """Untimed, between Ansible steps: drop the releases and packages the orchestrator's
    `--keep-releases 3` (its default, timed on its side) would have dropped, to bound disk use."""
    for root in fleet.roots:
        for e in (root / "releases").iterdir():
            name = e.name
            if e.is_dir() and name[:1].isdigit():
                if name not in keep:
                    shutil.rmtree(e)
            elif name.startswith(PACKAGE_NAME + "-") and ".zip" in name:
                if name[len(PACKAGE_NAME) + 1:].split(".zip")[0] not in keep:
                    e.unlink()


def tail(path: Path, n=20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# The comparison


def orchestrator_step(a, demo: Demo, fleet: Fleet, version, pkg, logf):
    """(seconds, phases): the rollout's wall time, and where it went (see `phases`)."""
    cmd = [str(a.bin), "rollout", version, "--package", str(pkg), "--min-healthy-time", "0s",
           "--insecure", "--coordinator", demo.coordinators(), "--json"]
    out = Path(logf.name).parent / f"rollout-{version}.json"
    started_ms = time.time() * 1000
    with open(out, "w") as status_file:
        rc, took = timed(cmd, logf, stdout=status_file)
    if rc != 0:
        raise Fail(f"orchestrator rollout {version} on {len(fleet.roots)} nodes exited {rc}: "
                   f"see {logf.name} and {out}\n{tail(Path(logf.name))}")
    check_fleet(fleet, version)
    try:
        status = json.loads(out.read_text())
    except ValueError:
        status = {}
    return took, phases(status, started_ms, started_ms + took * 1000)


# Where a rollout's time goes, from the events of its final status (`rollout --json`): each
# phase ends at the first event whose message contains the marker.
PHASE_MARKERS = [("preflight", "preflight passed"), ("staging", "nodes staged"),
                 ("upgrade", "upgraded and healthy"), ("finish", None)]


def phases(status: dict, started_ms: float, ended_ms: float) -> dict:
    """Seconds spent: upload (command start to the rollout's creation: reading, uploading and
    storing the package on every coordinator), preflight, staging (push + unpack on every node),
    upgrade (switch + health gate, node by node), finish (make permanent, prune) and exit (last
    event to the command's exit). Empty when the status cannot be read."""
    events = status.get("events") or []
    created = status.get("created_at_ms")
    if not events or not created:
        return {}
    out = {"upload": created - started_ms}
    prev = created
    for name, marker in PHASE_MARKERS:
        if marker is None:
            at = max(e["at_ms"] for e in events)
        else:
            at = next((e["at_ms"] for e in events if marker in e.get("message", "")), None)
            if at is None:
                return {}
        out[name] = at - prev
        prev = at
    out["exit"] = ended_ms - prev
    return {k: round(v / 1000, 3) for k, v in out.items()}


def ansible_step(a, playbook: Path, inv: Path, fleet: Fleet, version, pkg, logf) -> float:
    env = dict(os.environ)
    home = a.work / "ansible-home"
    env.update(ANSIBLE_CONFIG=str(HERE / "ansible.cfg"), ANSIBLE_HOME=str(home),
               ANSIBLE_LOCAL_TEMP=str(home / "tmp"), ANSIBLE_REMOTE_TEMP=str(home / "tmp"),
               ANSIBLE_NOCOLOR="1")
    extra = json.dumps({"package": str(pkg), "version": version})
    rc, took = timed([str(playbook), "-i", str(inv), str(HERE / "rollout.yml"), "-e", extra], logf, env)
    if rc != 0:
        raise Fail(f"ansible-playbook for {version} on {len(fleet.roots)} nodes exited {rc}: "
                   f"see {logf.name}\n{tail(Path(logf.name))}")
    check_fleet(fleet, version)
    return took


def run_size(a, n: int, packages, playbook: Path, results: list):
    """Both fleets of n nodes, every package rolled out by both tools; stops them on every exit."""
    d = a.work / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    cleanup = []
    try:
        log(f"\n== N = {n}: starting the orchestrator's fleet (orchestrator demo) and Ansible's")
        demo, orch_fleet = start_demo(a, n, d / "orchestrator", cleanup)
        check_fleet(orch_fleet, BASE_VERSION)
        base_zip = d / "orchestrator" / "packages" / f"{PACKAGE_NAME}-{BASE_VERSION}.zip"
        ans_fleet = start_ansible_fleet(a, n, d / "ansible", base_zip, cleanup)
        check_fleet(ans_fleet, BASE_VERSION)
        inv = d / "ansible" / "inventory.yml"
        with open(d / "orchestrator-rollouts.log", "w") as olog, \
                open(d / "ansible-playbook.log", "w") as alog:
            history = [BASE_VERSION]
            for r, kind, version, pkg in packages:
                order = ["orchestrator", "ansible"] if r % 2 == 1 else ["ansible", "orchestrator"]
                took = {}
                for tool in order:
                    if tool == "orchestrator":
                        took[tool], split = orchestrator_step(a, demo, orch_fleet, version, pkg, olog)
                    else:
                        took[tool] = ansible_step(a, playbook, inv, ans_fleet, version, pkg, alog)
                history.append(version)
                prune(ans_fleet, set(history[-3:]))
                record(results, n, r, kind, version, order[0], took, split)
    finally:
        # A second Ctrl-C or SIGTERM must not cut the cleanup short.
        saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        for stop in reversed(cleanup):
            try:
                stop()
            except Exception as e:  # keep stopping the rest
                log(f"cleanup: {e}")
        if not a.keep_nodes:
            for sub in ("orchestrator", "ansible"):
                for e in (d / sub).glob("*"):
                    if e.is_dir() and e.name.startswith(("node", "coordinator")):
                        shutil.rmtree(e, ignore_errors=True)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def record(results, n, r, kind, version, first, took, split):
    ratio = took["ansible"] / took["orchestrator"]
    results.append({"nodes": n, "round": r, "kind": kind, "version": version, "first": first,
                    "orchestrator_s": round(took["orchestrator"], 3),
                    "ansible_s": round(took["ansible"], 3), "ratio": round(ratio, 2),
                    "orchestrator_phases_s": split})
    log(f"N={n:>2} round {r} {kind:<5} {version:<7} orchestrator {took['orchestrator']:7.2f} s"
        f"   ansible {took['ansible']:7.2f} s   ratio {ratio:6.1f}x   ({first} first)")
    if split:
        log("        orchestrator: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))


def summarize(results) -> str:
    lines = ["| N | package | rounds | orchestrator s (median) | ansible s (median) "
             "| ratio min | ratio median | ratio max |", "|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["nodes"] for r in results}):
        for kind in ("full", "patch"):
            rows = [r for r in results if r["nodes"] == n and r["kind"] == kind]
            if not rows:
                continue
            ratios = [r["ratio"] for r in rows]
            lines.append(
                f"| {n} | {kind} | {len(rows)} | {statistics.median(r['orchestrator_s'] for r in rows):.2f} "
                f"| {statistics.median(r['ansible_s'] for r in rows):.2f} | {min(ratios):.1f}x "
                f"| {statistics.median(ratios):.1f}x | {max(ratios):.1f}x |")
    lines += ["", "Where the orchestrator's time went (median seconds per phase):", "",
              "| N | package | upload | preflight | staging | upgrade | finish | exit |",
              "|---|---|---|---|---|---|---|---|"]
    names = ["upload", "preflight", "staging", "upgrade", "finish", "exit"]
    for n in sorted({r["nodes"] for r in results}):
        for kind in ("full", "patch"):
            rows = [r["orchestrator_phases_s"] for r in results
                    if r["nodes"] == n and r["kind"] == kind and r["orchestrator_phases_s"]]
            if rows:
                cells = " | ".join(f"{statistics.median(p[k] for p in rows):.2f}" for k in names)
                lines.append(f"| {n} | {kind} | {cells} |")
    return "\n".join(lines)


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "nproc": len(os.sched_getaffinity(0)), "cpu": model, "kernel": platform.release(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "commit": commit or "unknown"}


def main():
    a = parse_args()

    def on_signal(signum, _frame):
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        a.work.mkdir(parents=True, exist_ok=True)
        lock = take_lock()  # noqa: F841 (held for the process's life)
        check_tools(a)
        playbook = ensure_ansible(a.venv)
        ansible_version = run([str(playbook), "--version"], "ansible-playbook --version").splitlines()[0]
        info = machine()
        log(f"{info['date']}: {info['nproc']} CPUs ({info['cpu']}), load {info['loadavg']}, "
            f"commit {info['commit']}; {ansible_version}")
        log(f"Fleets of {a.nodes} nodes, {a.rounds} rounds, {a.filler_mb} MiB filler, "
            f"{a.coordinators} coordinators; work dir {a.work}")
        packages = build_packages(a)
        results = []
        for n in a.sizes:
            run_size(a, n, packages, playbook, results)
        table = summarize(results)
        info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        log("\nRatio = ansible wall time / orchestrator wall time, per round:\n")
        log(table)
        (a.work / "results.json").write_text(json.dumps(
            {"machine": info, "ansible": ansible_version, "args": sys.argv[1:], "rounds": results},
            indent=1))
        (a.work / "results.md").write_text(table + "\n")
        log(f"\nResults: {a.work}/results.json, {a.work}/results.md; logs in {a.work}/n*/")
        return 0
    except Fail as e:
        log(f"compare.py: {e}")
        return 1
    except (KeyboardInterrupt, Interrupted):
        log("compare.py: interrupted; everything it started was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
