#!/usr/bin/env python3
"""Raft commit latency beside etcd's put, on this machine, interleaved (issue #15).

Each round runs, one after the other on the same loopback and disk:
  - etcd (Debian's etcd-server): a 1-member and a 3-member cluster, each in fresh data
    directories; W sequential puts sent to the leader through etcd's JSON gateway
    (POST /v3/kv/put over one keep-alive HTTP connection), after 20 warm-up puts;
  - this project's Raft (`cargo bench -p orch-coordinator --bench raft_commit`): W sequential
    writes to the leader, each waiting for commit and apply, with 1 and 3 coordinators.
Both fsync every commit to their log on the same disk. The clients differ (HTTP/JSON from
Python for etcd, the in-process Rust client over gRPC for the coordinators), which favours
neither much at these latencies; the figures say so next to them.

    apt-get install etcd-server            # etcd 3.4 on Debian 12
    deploy/bench/etcd/compare.py [--writes 500] [--rounds 3]

Everything it starts is stopped on exit.
"""

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
procs = []


def stop_all():
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    procs.clear()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(conn, path, body):
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"{path}: HTTP {r.status}: {data[:200]!r}")
    return json.loads(data or b"{}")


def etcd_cluster(n, work):
    """Starts an n-member etcd cluster; returns the client ports."""
    names = [f"e{i}" for i in range(n)]
    client = [free_port() for _ in names]
    peer = [free_port() for _ in names]
    initial = ",".join(f"{m}=http://127.0.0.1:{p}" for m, p in zip(names, peer))
    for m, c, p in zip(names, client, peer):
        log = open(os.path.join(work, f"{m}.log"), "w")
        procs.append(subprocess.Popen([
            "etcd", "--name", m, "--data-dir", os.path.join(work, m),
            "--listen-client-urls", f"http://127.0.0.1:{c}",
            "--advertise-client-urls", f"http://127.0.0.1:{c}",
            "--listen-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", "bench", "--logger", "zap", "--log-level", "error",
        ], stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            for c in client:
                conn = http.client.HTTPConnection("127.0.0.1", c, timeout=2)
                st = post(conn, "/v3/maintenance/status", {})
                if int(st.get("leader", "0")) == 0:
                    raise RuntimeError("no leader yet")
                if int(st["header"]["member_id"]) == int(st["leader"]):
                    return c
        except (OSError, RuntimeError, KeyError, ValueError):
            time.sleep(0.2)
    raise RuntimeError(f"etcd ({n} members) did not elect a leader within 30 s; logs in {work}")


def etcd_puts(n, writes):
    work = tempfile.mkdtemp(prefix=f"etcd-bench-{n}-")
    try:
        leader = etcd_cluster(n, work)
        conn = http.client.HTTPConnection("127.0.0.1", leader, timeout=10)
        b64 = lambda s: base64.b64encode(s.encode()).decode()
        for i in range(20):
            post(conn, "/v3/kv/put", {"key": b64(f"warm{i}"), "value": b64("x")})
        lat = []
        for i in range(writes):
            t = time.perf_counter()
            post(conn, "/v3/kv/put", {"key": b64(f"node{i}"), "value": b64("10.0.0.1:7001")})
            lat.append(time.perf_counter() - t)
        return lat
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)


def raft_bench_binary():
    out = subprocess.run(
        ["cargo", "bench", "-p", "orch-coordinator", "--bench", "raft_commit", "--no-run",
         "--message-format=json"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "raft_commit" \
                and m.get("executable"):
            return m["executable"]
    sys.exit("could not find the raft_commit benchmark binary in cargo's output")


def raft_commits(binary, writes):
    env = dict(os.environ, RAFT_BENCH_WRITES=str(writes), RAFT_BENCH_FAILOVERS="0")
    out = subprocess.run([binary, "--bench"], env=env, check=True, capture_output=True,
                         text=True).stdout
    res = {}
    for m in re.finditer(r"(\d) coordinator\(s\), \d+ sequential writes: median ([\d.]+) ms, p99 ([\d.]+) ms", out):
        res[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    if set(res) != {1, 3}:
        sys.exit(f"unexpected raft_commit output:\n{out}")
    return res


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * p))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writes", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if not shutil.which("etcd"):
        sys.exit("etcd is not installed: apt-get install etcd-server")
    signal.signal(signal.SIGTERM, lambda *_: (stop_all(), sys.exit(1)))
    binary = raft_bench_binary()
    ver = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"{ver}; {os.cpu_count()} CPUs; {a.writes} sequential writes per run; {a.rounds} rounds")
    rows = []
    try:
        for r in range(1, a.rounds + 1):
            ours = raft_commits(binary, a.writes)
            for n in (1, 3):
                lat = etcd_puts(n, a.writes)
                e = (statistics.median(lat) * 1e3, pct(lat, 0.99) * 1e3)
                rows.append((r, n, ours[n], e))
                print(f"round {r}, {n} member(s): ours median {ours[n][0]:.2f} ms p99 {ours[n][1]:.2f} ms;"
                      f" etcd put median {e[0]:.2f} ms p99 {e[1]:.2f} ms", flush=True)
    finally:
        stop_all()
    print("\n| round | members | orchestrator Raft commit median / p99 (ms) | etcd put median / p99 (ms) | median ratio (etcd / ours) |")
    print("|---|---|---|---|---|")
    for r, n, o, e in rows:
        print(f"| {r} | {n} | {o[0]:.2f} / {o[1]:.2f} | {e[0]:.2f} / {e[1]:.2f} | {e[0] / o[0]:.2f} |")


if __name__ == "__main__":
    main()
