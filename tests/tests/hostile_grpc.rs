//! Hostile input over the gRPC surfaces (issue #5): a real `orchestrator agent` process and a
//! real single coordinator (`--bootstrap`, with one registered agent) on loopback receive
//! fuzz-style generated requests for every request message of proto/agent.proto and
//! proto/control.proto (registration included) and the package push/upload streams:
//!
//! - random bytes as the raw gRPC message body (a raw-bytes codec, so the bytes need not be
//!   valid protobuf), mutations of valid encodings, pathological protobuf (huge length
//!   prefixes, 10-byte varints, deep group nesting);
//! - structurally valid messages with hostile fields: path-like names and node ids ("../x",
//!   "/etc/passwd", "a/b", "", NUL, 10 KB, unicode), invalid and overflowing versions,
//!   extreme sizes/counters/durations, hostile fences and digests, messages near and over the
//!   size limit;
//! - push/upload streams that lie about size or digest, lack the header, or end early (the
//!   client disconnects mid-stream).
//!
//! After each batch: the process still runs, its log has no "panicked", a valid request still
//! gets the same answer as before, and what it keeps on disk is unchanged, except for these
//! allowed exceptions (what a valid request does too):
//! - agent: `agent/audit.log` only grows, by well-formed lines (every mutating call that gets
//!   past decoding is audited, admitted or refused, and no wire value can forge a line or a
//!   field), `agent/fence.json` may record a newer fence (a fence is admitted before the step
//!   runs, so a deposed coordinator stays fenced whatever its request was) and
//!   `agent/cluster.json` may bind the node to the cluster of the first valid fence;
//! - coordinator: the Raft log position (`last_applied`) may advance: a request that the state
//!   machine refuses (e.g. a rollout spec that fails validation) still commits an entry that
//!   applies as a no-op. Nodes, rollouts, members and the blob directory must not change.
//!
//! Each explicitly valid request in the suite (an honestly announced junk push or upload) has
//! its exact expected change checked, then becomes the new baseline.
//!
//! Deterministic: every test prints its seed; `HOSTILE_SEED=N` replays one, `HOSTILE_CASES=N`
//! sets the number of generated cases per method and batch (default 96).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use orch_proto::agent as apb;
use orch_proto::control as cpb;
use orch_tests::cluster::{Cluster, ClusterOpts, V0};
use orch_tests::{AgentProc, PkgSpec, channel, local_ok, rt, sha256_hex};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

const DEFAULT_CASES: usize = 96;
/// How long the on-disk state may take to settle after a batch (an aborted stream's temp
/// file is removed when the server notices the reset).
const SETTLE: Duration = Duration::from_secs(15);

fn seed(default: u64) -> u64 {
    let s = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("hostile_grpc: seed {s} (replay with HOSTILE_SEED={s})");
    s
}

fn cases() -> usize {
    std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

// ---------------------------------------------------------------------------------------------
// A raw-bytes codec: the message body goes on the wire exactly as given.

#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

/// Calls any method of any service with raw message bodies.
struct Wire {
    grpc: tonic::client::Grpc<Channel>,
    /// (method, outcome) -> count, for the printed summary.
    tally: BTreeMap<(String, String), usize>,
}

fn outcome(r: &Result<Vec<u8>, Status>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(s) if s.message().starts_with("failed to decode Protobuf message") => {
            "undecodable".into()
        }
        Err(s) => format!("{:?}", s.code()),
    }
}

impl Wire {
    async fn new(addr: &str) -> Wire {
        Wire {
            grpc: tonic::client::Grpc::new(channel(addr).await).max_decoding_message_size(64 << 20),
            tally: BTreeMap::new(),
        }
    }

    fn count(&mut self, path: &str, r: &Result<Vec<u8>, Status>) {
        let method = path.rsplit('/').next().unwrap_or(path).to_string();
        *self.tally.entry((method, outcome(r))).or_default() += 1;
    }

    async fn unary(&mut self, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let r = self
            .grpc
            .unary(
                tonic::Request::new(body),
                PathAndQuery::from_static(path),
                Raw,
            )
            .await
            .map(|r| r.into_inner());
        self.count(path, &r);
        r
    }

    async fn client_stream(
        &mut self,
        path: &'static str,
        msgs: Vec<Vec<u8>>,
    ) -> Result<Vec<u8>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let r = self
            .grpc
            .client_streaming(
                tonic::Request::new(tonic::codegen::tokio_stream::iter(msgs)),
                PathAndQuery::from_static(path),
                Raw,
            )
            .await
            .map(|r| r.into_inner());
        self.count(path, &r);
        r
    }

    /// A server-streaming call: its first message (or its refusal).
    async fn server_stream_first(
        &mut self,
        path: &'static str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
        let r = async {
            let mut s = self
                .grpc
                .server_streaming(
                    tonic::Request::new(body),
                    PathAndQuery::from_static(path),
                    Raw,
                )
                .await?
                .into_inner();
            s.message()
                .await?
                .ok_or_else(|| Status::unknown("stream ended without a message"))
        }
        .await;
        self.count(path, &r);
        r
    }

    fn summary(&self) -> String {
        let mut s = String::new();
        for ((m, o), n) in &self.tally {
            let _ = writeln!(s, "  {m:<16} {o:<20} {n}");
        }
        s
    }
}

/// Whether a status says the server broke rather than refused. tonic itself answers a body
/// that is not valid protobuf with INTERNAL "failed to decode Protobuf message" before any
/// product code runs: that one is a refusal.
fn is_breakage(s: &Status) -> bool {
    match s.code() {
        Code::Unknown | Code::Ok => true,
        Code::Internal => !s.message().starts_with("failed to decode Protobuf message"),
        _ => false,
    }
}

/// A refusal: any status but the ones that mean the server broke rather than said no.
fn assert_refused(what: &str, r: &Result<Vec<u8>, Status>) {
    match r {
        Ok(_) => panic!("{what}: accepted, expected a refusal"),
        Err(s) => assert!(
            !is_breakage(s),
            "{what}: refused as {:?} ({}), expected a classified refusal",
            s.code(),
            s.message()
        ),
    }
}

/// A step request either refused, or answered "nothing changed".
fn assert_refused_or_unchanged(what: &str, r: &Result<Vec<u8>, Status>) {
    if let Ok(body) = r {
        let reply = apb::StepReply::decode(body.as_slice())
            .unwrap_or_else(|e| panic!("{what}: undecodable StepReply ({e})"));
        assert!(
            !reply.changed,
            "{what}: a hostile request changed the node: {reply:?}"
        );
    } else {
        assert_refused(what, r);
    }
}

// ---------------------------------------------------------------------------------------------
// Generators

/// Path-like, empty, NUL, oversized and unicode strings: never a valid name, id or version.
fn hostile_str(rng: &mut fastrand::Rng) -> String {
    const POOL: &[&str] = &[
        "",
        "../x",
        "../../../../etc/passwd",
        "/etc/passwd",
        "a/b",
        "a\\b",
        "..",
        ".",
        "\0",
        "x\0y",
        "a\nb",
        "r1\n0 unfenced forged",
        " ",
        "-x",
        "_x",
        "émqx",
        "🦀",
        "%2e%2e%2fx",
        "~root",
        "$(reboot)",
        "a b",
        "\u{202e}txt.exe",
    ];
    match rng.u8(..8) {
        0 => "a".repeat(10 * 1024),
        1 => "é".repeat(rng.usize(33..3000)),
        // Random text alone can be a valid name ("a"): the leading '/' keeps it invalid.
        2 => format!("/{}", random_text(rng, 80)),
        3 => format!("{}/{}", random_text(rng, 8), random_text(rng, 8)),
        _ => POOL[rng.usize(..POOL.len())].to_string(),
    }
}

/// Any string, valid or not (for fields whose validity does not matter to the case).
fn any_str(rng: &mut fastrand::Rng) -> String {
    if rng.bool() {
        hostile_str(rng)
    } else {
        random_text(rng, 24)
    }
}

/// Random unicode, heavy on separators, dots, control characters.
fn random_text(rng: &mut fastrand::Rng, max: usize) -> String {
    let n = rng.usize(..=max);
    (0..n)
        .map(|_| match rng.u8(..6) {
            0 => ['/', '.', '\\', '\0', '\n', '-', ':', '%'][rng.usize(..8)],
            1 => char::from_u32(rng.u32(0x80..0x11_0000)).unwrap_or('\u{fffd}'),
            2 => char::from(rng.u8(0..0x20)),
            _ => char::from(rng.u8(0x20..0x7f)),
        })
        .collect()
}

/// Versions that must not parse.
fn invalid_version(rng: &mut fastrand::Rng) -> String {
    const POOL: &[&str] = &[
        "",
        "4.2",
        "4.2.1.0",
        "04.2.1",
        "-1.0.0",
        "4.2.-1",
        "18446744073709551616.0.0",
        "99999999999999999999.0.0",
        "4.2.1 ",
        " 4.2.1",
        "4.2.1\0",
        "4.2.1\n",
        "v4.2.1",
        "4.2.x",
        "１.２.３",
        "4..1",
        "../4.2.1",
        "4.2.1/../..",
        "4.2.1-rc1",
        "+4.2.1",
        "0x4.2.1",
    ];
    match rng.u8(..6) {
        0 => "9".repeat(10 * 1024),
        1 => hostile_str(rng),
        _ => POOL[rng.usize(..POOL.len())].to_string(),
    }
}

/// Versions that parse but that no package on the node has.
fn absent_version(rng: &mut fastrand::Rng) -> String {
    const POOL: &[&str] = &[
        "0.0.0",
        "4.2.99",
        "4.3.0",
        "5.0.0",
        "18446744073709551615.18446744073709551615.18446744073709551615",
    ];
    if rng.bool() {
        POOL[rng.usize(..POOL.len())].to_string()
    } else {
        format!("{}.{}.{}", rng.u64(..), rng.u64(..), rng.u64(..))
    }
}

fn any_version(rng: &mut fastrand::Rng) -> String {
    if rng.bool() {
        invalid_version(rng)
    } else {
        absent_version(rng)
    }
}

fn extreme_u64(rng: &mut fastrand::Rng) -> u64 {
    match rng.u8(..8) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => i64::MAX as u64,
        4 => (i64::MAX as u64) + 1,
        5 => u32::MAX as u64 + 1,
        _ => rng.u64(..),
    }
}

fn extreme_u32(rng: &mut fastrand::Rng) -> u32 {
    match rng.u8(..5) {
        0 => 0,
        1 => u32::MAX,
        2 => i32::MAX as u32 + 1,
        _ => rng.u32(..),
    }
}

fn hostile_digest(rng: &mut fastrand::Rng) -> String {
    match rng.u8(..7) {
        0 => String::new(),
        1 => "g".repeat(64),
        2 => "a".repeat(63),
        3 => "0".repeat(65),
        4 => "f".repeat(10 * 1024),
        5 => format!("../{}", "0".repeat(61)),
        _ => hostile_str(rng),
    }
}

/// A lower-case hex digest of nothing in particular.
fn random_digest(rng: &mut fastrand::Rng) -> String {
    (0..32).map(|_| format!("{:02x}", rng.u8(..))).collect()
}

/// The cluster the hostile suite's valid fences name.
const HOSTILE_CLUSTER: &str = "hostile-cluster";

/// None, or a fence with any mix of valid and hostile fields (cluster id, rollout id, terms,
/// deadlines).
fn agent_fence(rng: &mut fastrand::Rng) -> Option<apb::Fence> {
    (rng.u8(..4) == 0).then(|| apb::Fence {
        term: extreme_u64(rng),
        rollout_id: match rng.u8(..3) {
            0 => any_str(rng),
            1 => format!("r{}", extreme_u64(rng)),
            _ => format!("r{:06}", rng.u32(..1000)),
        },
        step: extreme_u64(rng),
        cluster_id: match rng.u8(..4) {
            0 => hostile_str(rng),
            1 => random_text(rng, 200),
            _ => HOSTILE_CLUSTER.into(),
        },
        deadline_unix_ms: if rng.bool() { 0 } else { extreme_u64(rng) },
    })
}

fn random_bytes(rng: &mut fastrand::Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v);
    v
}

/// A raw message body: random, a mutation of `valid`, or pathological protobuf.
fn raw_body(rng: &mut fastrand::Rng, valid: &[u8]) -> Vec<u8> {
    match rng.u8(..10) {
        0 => Vec::new(),
        1 => {
            let n = rng.usize(1..64);
            random_bytes(rng, n)
        }
        2 => {
            let n = rng.usize(64..8192);
            random_bytes(rng, n)
        }
        3 | 4 => {
            // Flip a few bits of a valid encoding.
            let mut v = valid.to_vec();
            if v.is_empty() {
                v.push(0);
            }
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(..8);
            }
            v
        }
        5 => {
            // Truncated, or with trailing garbage.
            let mut v = valid.to_vec();
            if rng.bool() && !v.is_empty() {
                v.truncate(rng.usize(..v.len()));
            } else {
                let n = rng.usize(1..32);
                v.extend(random_bytes(rng, n));
            }
            v
        }
        6 => {
            // A length-delimited field announcing far more bytes than follow.
            let mut v = vec![(rng.u8(1..16) << 3) | 2];
            v.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
            v.extend(b"short");
            v
        }
        7 => {
            // An 11-byte varint (overflow), then a field number beyond the proto's range.
            let mut v = vec![0x08];
            v.extend([0xff; 10]);
            v.push(0x01);
            v.extend([0xfa, 0xff, 0xff, 0xff, 0x0f, 0x00]);
            v
        }
        8 => {
            // Deeply nested groups (start-group tags), past any recursion limit.
            let depth = rng.usize(50..5000);
            let mut v = Vec::new();
            for _ in 0..depth {
                v.push((rng.u8(1..16) << 3) | 3);
            }
            v
        }
        _ => {
            // Repeated copies of the valid message: fields repeated many times.
            let mut v = Vec::new();
            for _ in 0..rng.usize(2..200) {
                v.extend_from_slice(valid);
            }
            v
        }
    }
}

// ---------------------------------------------------------------------------------------------
// On-disk snapshots

/// Relative path -> "dir" | "file SIZE SHA256" | "link TARGET" | "other".
type Snap = BTreeMap<String, String>;

fn snapshot(root: &Path, skip: &[&str]) -> Snap {
    fn walk(root: &Path, dir: &Path, skip: &[&str], out: &mut Snap) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if skip.contains(&rel.as_str()) {
                continue;
            }
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue; // removed meanwhile: the next poll sees the settled state
            };
            let v = if m.file_type().is_symlink() {
                format!(
                    "link {}",
                    fs::read_link(&p)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default()
                )
            } else if m.is_dir() {
                walk(root, &p, skip, out);
                "dir".into()
            } else if m.is_file() {
                match orch_release::package::sha256_file(&p) {
                    Ok((h, n)) => format!("file {n} {h}"),
                    Err(_) => continue,
                }
            } else {
                "other".into()
            };
            out.insert(rel, v);
        }
    }
    let mut out = Snap::new();
    walk(root, root, skip, &mut out);
    out
}

fn diff(before: &Snap, after: &Snap) -> String {
    let mut s = String::new();
    for (k, v) in before {
        match after.get(k) {
            None => {
                let _ = writeln!(s, "  removed {k} ({v})");
            }
            Some(w) if w != v => {
                let _ = writeln!(s, "  changed {k}: {v} -> {w}");
            }
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            let _ = writeln!(s, "  added {k} ({v})");
        }
    }
    s
}

/// Polls until `snap()` equals `expected` (bounded by [`SETTLE`]); panics with the diff.
fn settle(what: &str, expected: &Snap, mut snap: impl FnMut() -> Snap, extra: impl Fn() -> String) {
    let start = Instant::now();
    loop {
        let now = snap();
        if &now == expected {
            return;
        }
        if start.elapsed() > SETTLE {
            panic!(
                "{what}: the disk changed beyond what valid requests do:\n{}\n{}",
                diff(expected, &now),
                extra()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The agent

const A_NODE_INFO: &str = "/orchestrator.agent.v1.Agent/NodeInfo";
const A_VERSIONS: &str = "/orchestrator.agent.v1.Agent/Versions";
const A_PUSH: &str = "/orchestrator.agent.v1.Agent/PushPackage";
const A_UNPACK: &str = "/orchestrator.agent.v1.Agent/Unpack";
const A_INSTALL: &str = "/orchestrator.agent.v1.Agent/Install";
const A_PERMANENT: &str = "/orchestrator.agent.v1.Agent/Permanent";
const A_DOWNGRADE: &str = "/orchestrator.agent.v1.Agent/Downgrade";
const A_UNINSTALL: &str = "/orchestrator.agent.v1.Agent/Uninstall";
const A_HEALTH: &str = "/orchestrator.agent.v1.Agent/Health";

/// Files the agent may change on any admitted call (see the module doc).
const AGENT_AUDIT: &str = "agent/audit.log";
const AGENT_FENCE: &str = "agent/fence.json";
const AGENT_CLUSTER: &str = "agent/cluster.json";

/// What must hold after every batch.
struct AgentBase {
    disk: Snap,
    audit: String,
    versions: apb::VersionsReply,
}

fn agent_disk(root: &Path) -> Snap {
    snapshot(root, &[AGENT_AUDIT, AGENT_FENCE, AGENT_CLUSTER])
}

/// The kinds a result may name: the agent's (proto/agent.proto) and the role check's.
const AUDIT_KINDS: &[&str] = &[
    "refused",
    "bad-package",
    "bad-request",
    "signature",
    "not-found",
    "activation",
    "busy",
    "stale-fence",
    "other-cluster",
    "held",
    "deadline",
    "forbidden",
    "internal",
    "permission-denied",
    "unauthenticated",
    "cancelled",
];

/// One audit line, strictly: `<RFC 3339 UTC, ms> unauthenticated <fence> | <step> | <result>`
/// with `<fence>` `unfenced` or `cluster=X term=N rollout=X step=N` (X without spaces), the
/// step a known verb and escaped tokens, the result `ok (un)changed` or `refused|failed
/// <kind>: <message>`, and no control character anywhere.
fn assert_audit_line(what: &str, line: &str) {
    let fail = |why: &str| -> ! { panic!("{what}: malformed audit line ({why}): {line:?}") };
    if line.chars().any(char::is_control) {
        fail("control character");
    }
    let (time, rest) = line.split_once(' ').unwrap_or_else(|| fail("no fields"));
    let t = time.as_bytes();
    let digits = |r: std::ops::Range<usize>| t[r].iter().all(u8::is_ascii_digit);
    let time_ok = t.len() == 24
        && digits(0..4)
        && t[4] == b'-'
        && digits(5..7)
        && t[7] == b'-'
        && digits(8..10)
        && t[10] == b'T'
        && digits(11..13)
        && t[13] == b':'
        && digits(14..16)
        && t[16] == b':'
        && digits(17..19)
        && t[19] == b'.'
        && digits(20..23)
        && t[23] == b'Z';
    if !time_ok {
        fail("time");
    }
    let mut parts = rest.splitn(3, " | ");
    let (head, step, result) = match (parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(s), Some(r)) => (h, s, r),
        _ => fail("not three fields"),
    };
    let (caller, fence) = head.split_once(' ').unwrap_or_else(|| fail("caller"));
    if caller != "unauthenticated" {
        fail("caller");
    }
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let fence_ok = fence == "unfenced"
        || match fence.split(' ').collect::<Vec<_>>().as_slice() {
            [c, t, r, s] => {
                c.starts_with("cluster=")
                    && t.strip_prefix("term=").is_some_and(number)
                    && r.starts_with("rollout=")
                    && s.strip_prefix("step=").is_some_and(number)
            }
            _ => false,
        };
    if !fence_ok {
        fail("fence");
    }
    let verbs = [
        "push",
        "unpack",
        "install",
        "permanent",
        "downgrade",
        "uninstall",
        "release",
        "rebind",
        "unbind",
    ];
    let mut words = step.split(' ');
    if !words.next().is_some_and(|v| verbs.contains(&v))
        || step.contains(" | ")
        || !step.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        fail("step");
    }
    let result_ok = result == "ok changed"
        || result == "ok unchanged"
        || ["refused ", "failed "].iter().any(|v| {
            result.strip_prefix(v).is_some_and(|r| {
                r.split_once(": ")
                    .is_some_and(|(kind, msg)| AUDIT_KINDS.contains(&kind) && !msg.is_empty())
            })
        });
    if !result_ok {
        fail("result");
    }
}

async fn agent_versions(w: &mut Wire) -> apb::VersionsReply {
    let body = w
        .unary(A_VERSIONS, apb::VersionsRequest {}.encode_to_vec())
        .await
        .expect("a valid Versions request works");
    apb::VersionsReply::decode(body.as_slice()).expect("VersionsReply")
}

async fn agent_base(agent: &AgentProc, w: &mut Wire) -> AgentBase {
    AgentBase {
        disk: agent_disk(&agent.root),
        audit: fs::read_to_string(agent.root.join(AGENT_AUDIT)).unwrap_or_default(),
        versions: agent_versions(w).await,
    }
}

/// After a batch: alive, no panic, valid requests answered as before, disk unchanged but for
/// the audit log (append-only, well-formed lines) and the fence.
async fn check_agent(what: &str, agent: &AgentProc, w: &mut Wire, base: &AgentBase) {
    let log = || format!("agent log (tail):\n{}", tail(&agent.log(), 30));
    assert_eq!(
        agent.liveness(),
        "running",
        "{what}: the agent died\n{}",
        log()
    );
    assert!(
        !agent.log().contains("panicked"),
        "{what}: the agent panicked\n{}",
        log()
    );
    let info = w
        .unary(A_NODE_INFO, apb::NodeInfoRequest {}.encode_to_vec())
        .await
        .unwrap_or_else(|e| panic!("{what}: a valid NodeInfo failed: {e}\n{}", log()));
    let info = apb::NodeInfoReply::decode(info.as_slice()).expect("NodeInfoReply");
    assert_eq!(info.node_id, agent.node_id, "{what}: NodeInfo");
    assert_eq!(agent_versions(w).await, base.versions, "{what}: Versions");
    let root = agent.root.clone();
    settle(what, &base.disk, || agent_disk(&root), log);
    let audit = fs::read_to_string(agent.root.join(AGENT_AUDIT)).unwrap_or_default();
    let new = audit
        .strip_prefix(base.audit.as_str())
        .unwrap_or_else(|| panic!("{what}: the audit log was rewritten, not appended to"));
    assert!(
        new.is_empty() || new.ends_with('\n'),
        "{what}: the audit log ends mid-line"
    );
    for line in new.lines() {
        assert_audit_line(what, line);
    }
}

/// Hostile typed requests for every unary agent method.
async fn agent_typed_batch(rng: &mut fastrand::Rng, w: &mut Wire, n: usize) {
    for i in 0..n {
        let v = any_version(rng);
        let fence = agent_fence(rng);
        // Unfenced steps are refused while a hostile fence's rollout holds the node, unless
        // forced: both paths are exercised.
        let force = rng.bool();
        let what = |m: &str| format!("case {i}: {m} {:?}", v.chars().take(40).collect::<String>());
        let r = w
            .unary(
                A_UNPACK,
                apb::UnpackRequest {
                    version: v.clone(),
                    fence: fence.clone(),
                    expected_sha256: String::new(),
                    force,
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused_or_unchanged(&what("Unpack"), &r);
        let r = w
            .unary(
                A_INSTALL,
                apb::InstallRequest {
                    version: v.clone(),
                    permanent: rng.bool(),
                    fence: fence.clone(),
                    expected_sha256: String::new(),
                    force,
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused_or_unchanged(&what("Install"), &r);
        for path in [A_PERMANENT, A_DOWNGRADE, A_UNINSTALL] {
            let r = w
                .unary(
                    path,
                    apb::VersionRequest {
                        version: v.clone(),
                        fence: fence.clone(),
                        force,
                    }
                    .encode_to_vec(),
                )
                .await;
            assert_refused_or_unchanged(&what(path), &r);
        }
        // Read-only calls: any answer but a broken one.
        let r = w
            .unary(
                A_HEALTH,
                apb::HealthRequest {
                    expect_version: v.clone(),
                }
                .encode_to_vec(),
            )
            .await;
        if let Err(s) = &r {
            assert_refused(&what("Health"), &Err(s.clone()));
        }
    }
}

/// Random and mutated bodies for every unary agent method.
async fn agent_raw_batch(rng: &mut fastrand::Rng, w: &mut Wire, n: usize) {
    let fence = Some(apb::Fence {
        term: 3,
        rollout_id: "r000001".into(),
        step: 2,
        cluster_id: HOSTILE_CLUSTER.into(),
        deadline_unix_ms: 0,
    });
    // Valid encodings to mutate: each names the installed version, whose steps are no-ops
    // or refusals, and any mutation of it names an absent version.
    let valid: Vec<(&'static str, Vec<u8>)> = vec![
        (A_NODE_INFO, apb::NodeInfoRequest {}.encode_to_vec()),
        (A_VERSIONS, apb::VersionsRequest {}.encode_to_vec()),
        (
            A_UNPACK,
            apb::UnpackRequest {
                version: V0.into(),
                fence: fence.clone(),
                expected_sha256: String::new(),
                force: false,
            }
            .encode_to_vec(),
        ),
        (
            A_INSTALL,
            apb::InstallRequest {
                version: V0.into(),
                permanent: true,
                fence: fence.clone(),
                expected_sha256: String::new(),
                force: false,
            }
            .encode_to_vec(),
        ),
        (
            A_PERMANENT,
            apb::VersionRequest {
                version: V0.into(),
                fence: fence.clone(),
                force: false,
            }
            .encode_to_vec(),
        ),
        (
            A_DOWNGRADE,
            apb::VersionRequest {
                version: V0.into(),
                fence: fence.clone(),
                force: false,
            }
            .encode_to_vec(),
        ),
        (
            A_UNINSTALL,
            apb::VersionRequest {
                version: V0.into(),
                fence,
                force: false,
            }
            .encode_to_vec(),
        ),
        (
            A_HEALTH,
            apb::HealthRequest {
                expect_version: V0.into(),
            }
            .encode_to_vec(),
        ),
    ];
    for _ in 0..n {
        for (path, v) in &valid {
            let body = raw_body(rng, v);
            let r = w.unary(path, body).await;
            if ![A_NODE_INFO, A_VERSIONS, A_HEALTH].contains(path) {
                assert_refused_or_unchanged(&format!("raw {path}"), &r);
            }
        }
    }
}

/// Push streams that lie: no header, hostile header fields, wrong size or digest, random
/// bytes as chunks. Every one must be refused and leave nothing behind.
async fn agent_push_batch(rng: &mut fastrand::Rng, w: &mut Wire, n: usize) {
    for i in 0..n {
        let len = match rng.u8(..4) {
            0 => 0,
            1 => rng.usize(1..64),
            _ => rng.usize(64..300_000),
        };
        let data = random_bytes(rng, len);
        let honest = apb::PackageHeader {
            chunks: Vec::new(),
            sent: Vec::new(),
            peers: Vec::new(),
            signature: Default::default(),
            name: "hostile".into(),
            version: format!("9.9.{}", rng.u32(..1000)),
            sha256: sha256_hex(&data),
            size: data.len() as u64,
            fence: agent_fence(rng),
            force: rng.bool(),
        };
        let mut h = honest.clone();
        let variant = rng.u8(..11);
        let mut header = Some(h.clone());
        match variant {
            0 => header = None,
            1 => h.name = hostile_str(rng),
            2 => h.version = invalid_version(rng),
            3 => h.sha256 = hostile_digest(rng),
            4 => h.sha256 = random_digest(rng),
            5 => h.size = h.size.saturating_sub(rng.u64(1..=h.size.max(1))),
            6 => h.size += rng.u64(1..1000),
            7 => h.size = extreme_u64(rng).max(u64::MAX - rng.u64(..10)),
            8 => {
                // The honest package name of the installed release, other bytes.
                h.name = "emqx".into();
                h.version = V0.into();
                h.sha256 = random_digest(rng);
            }
            _ => {
                // Raw random chunks: not PackageChunk encodings at all.
                let msgs: Vec<Vec<u8>> = (0..rng.usize(0..6))
                    .map(|_| {
                        let n = rng.usize(0..4096);
                        random_bytes(rng, n)
                    })
                    .collect();
                let r = w.client_stream(A_PUSH, msgs).await;
                assert_refused(&format!("push case {i}: raw chunks"), &r);
                continue;
            }
        }
        if variant == 5 && h.size == honest.size {
            // Nothing to lie about with no data: claim one byte more instead.
            h.size += 1;
        }
        if header.is_some() {
            header = Some(h);
        }
        // Chunks of random sizes, including empty ones.
        let mut msgs = Vec::new();
        let mut rest: &[u8] = &data;
        loop {
            let k = rng.usize(0..=rest.len().min(200_000));
            msgs.push(
                apb::PackageChunk {
                    header: header.take(),
                    data: rest[..k].to_vec(),
                }
                .encode_to_vec(),
            );
            rest = &rest[k..];
            if rest.is_empty() && (msgs.len() > 1 || rng.bool()) {
                break;
            }
        }
        if rng.u8(..8) == 0 {
            msgs.clear(); // an empty stream
        }
        let r = w.client_stream(A_PUSH, msgs).await;
        assert_refused(&format!("push case {i}: variant {variant}"), &r);
    }
}

/// A push that stops mid-stream: the client disconnects after the agent has started writing.
async fn agent_push_abandoned(root: &Path, addr: &str) {
    let data = vec![7u8; 100_000];
    let first = apb::PackageChunk {
        header: Some(apb::PackageHeader {
            chunks: Vec::new(),
            sent: Vec::new(),
            peers: Vec::new(),
            signature: Default::default(),
            name: "abandoned".into(),
            version: "1.0.0".into(),
            sha256: sha256_hex(&data),
            size: 10 * data.len() as u64,
            fence: None,
            force: true, // whatever rollout the hostile fences left holding the node
        }),
        data,
    };
    let addr = addr.to_string();
    let call = tokio::spawn(async move {
        let mut c = apb::agent_client::AgentClient::new(channel(&addr).await);
        // The first chunk, then a stream that never ends: only dropping the call ends it.
        let s = tonic::codegen::tokio_stream::StreamExt::chain(
            tonic::codegen::tokio_stream::iter(vec![first]),
            tonic::codegen::tokio_stream::pending(),
        );
        let _ = c.push_package(s).await;
    });
    let releases = root.join("releases");
    let start = Instant::now();
    while !fs::read_dir(&releases)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".incoming-"))
        })
        .unwrap_or(false)
    {
        assert!(
            start.elapsed() < SETTLE,
            "the agent never started writing the abandoned push"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call.abort();
    let _ = call.await;
}

/// Messages near and over the 8 MiB decoding limit.
async fn agent_huge(w: &mut Wire) {
    for size in [7 << 20, 9 << 20] {
        let r = w
            .unary(
                A_UNPACK,
                apb::UnpackRequest {
                    version: "9".repeat(size),
                    fence: None,
                    expected_sha256: String::new(),
                    force: false,
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused(&format!("Unpack with a {size}-byte version"), &r);
        let r = w
            .client_stream(
                A_PUSH,
                vec![
                    apb::PackageChunk {
                        header: Some(apb::PackageHeader {
                            chunks: Vec::new(),
                            sent: Vec::new(),
                            peers: Vec::new(),
                            signature: Default::default(),
                            name: "x".repeat(size),
                            version: "1.0.0".into(),
                            sha256: "0".repeat(64),
                            size: 1,
                            fence: None,
                            force: false,
                        }),
                        data: Vec::new(),
                    }
                    .encode_to_vec(),
                ],
            )
            .await;
        assert_refused(&format!("push with a {size}-byte name"), &r);
        let r = w
            .client_stream(
                A_PUSH,
                vec![
                    apb::PackageChunk {
                        header: Some(apb::PackageHeader {
                            chunks: Vec::new(),
                            sent: Vec::new(),
                            peers: Vec::new(),
                            signature: Default::default(),
                            name: "big".into(),
                            version: "1.0.0".into(),
                            sha256: "0".repeat(64),
                            size: size as u64,
                            fence: None,
                            force: false,
                        }),
                        data: vec![0; size],
                    }
                    .encode_to_vec(),
                ],
            )
            .await;
        assert_refused(&format!("push with a {size}-byte chunk"), &r);
    }
}

#[test]
fn agent_survives_hostile_input() {
    let mut rng = fastrand::Rng::with_seed(seed(0x05_4A47));
    let n = cases();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    // A node on 4.2.0 (no hook): every step on it is a no-op or a refusal.
    let pkg = PkgSpec::emqx(V0)
        .hook(None)
        .build(tmp.path(), &tmp.path().join("pkgs"));
    local_ok(&root, &["install", "--package", &pkg.display().to_string()]);
    let mut agent = AgentProc::start("n1", &root, &[]);

    rt().block_on(async {
        let mut w = Wire::new(&agent.addr).await;
        let mut base = agent_base(&agent, &mut w).await;

        agent_raw_batch(&mut rng, &mut w, n).await;
        check_agent("random and mutated bodies", &agent, &mut w, &base).await;

        agent_typed_batch(&mut rng, &mut w, n).await;
        check_agent("hostile typed requests", &agent, &mut w, &base).await;

        agent_push_batch(&mut rng, &mut w, n).await;
        check_agent("lying push streams", &agent, &mut w, &base).await;

        for _ in 0..3 {
            agent_push_abandoned(&root, &agent.addr).await;
        }
        check_agent("abandoned pushes", &agent, &mut w, &base).await;

        agent_huge(&mut w).await;
        check_agent("oversized messages", &agent, &mut w, &base).await;

        // An honestly announced push of junk is valid: it adds exactly the file and its
        // digest. Unpacking it is then refused as a bad package and changes nothing.
        let junk = random_bytes(&mut rng, 5000);
        let digest = sha256_hex(&junk);
        let r = w
            .client_stream(
                A_PUSH,
                vec![
                    apb::PackageChunk {
                        header: Some(apb::PackageHeader {
                            chunks: Vec::new(),
                            sent: Vec::new(),
                            peers: Vec::new(),
                            signature: Default::default(),
                            name: "junk".into(),
                            version: "1.0.0".into(),
                            sha256: digest.clone(),
                            size: junk.len() as u64,
                            fence: None,
                            force: true,
                        }),
                        data: junk,
                    }
                    .encode_to_vec(),
                ],
            )
            .await;
        assert!(r.is_ok(), "an honest push is accepted: {r:?}");
        let mut expected = base.disk.clone();
        expected.insert(
            "releases/junk-1.0.0.zip".into(),
            format!("file 5000 {digest}"),
        );
        let sidecar = format!("{digest}  junk-1.0.0.zip\n");
        expected.insert(
            "releases/junk-1.0.0.zip.sha256".into(),
            format!("file {} {}", sidecar.len(), sha256_hex(sidecar.as_bytes())),
        );
        // The record that these bytes were verified as they arrived: the digest, then the
        // file's identity (device, inode, size, times), which only the disk knows.
        let evidence = agent.root.join("releases/junk-1.0.0.zip.verified");
        let text = fs::read_to_string(&evidence).unwrap_or_default();
        assert!(text.starts_with(&format!("{digest} ")), "{text:?}");
        expected.insert(
            "releases/junk-1.0.0.zip.verified".into(),
            format!("file {} {}", text.len(), sha256_hex(text.as_bytes())),
        );
        base.disk = expected;
        let r = w
            .unary(
                A_UNPACK,
                apb::UnpackRequest {
                    version: "1.0.0".into(),
                    fence: None,
                    expected_sha256: String::new(),
                    force: true,
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused("unpacking a junk package", &r);
        check_agent(
            "an honest junk push, then its unpack",
            &agent,
            &mut w,
            &base,
        )
        .await;

        eprintln!("agent outcomes:\n{}", w.summary());
    });

    // What the hostile input left (a fence, audit lines) does not stop the agent restarting.
    let status = agent.stop_term();
    assert!(status.success(), "agent exit: {status}\n{}", agent.log());
    drop(agent);
    let agent = AgentProc::start("n1", &root, &[]);
    rt().block_on(async {
        let mut w = Wire::new(&agent.addr).await;
        let v = agent_versions(&mut w).await;
        assert_eq!(
            orch_tests::states(&v.versions),
            vec![(V0.to_string(), "permanent".to_string())]
        );
    });
}

/// Wire values go into the audit log (a fence's ids, a version, a package name, a rebind's
/// cluster id): none may forge a line or a field. Each call adds exactly one well-formed line.
#[test]
fn agent_audit_log_cannot_be_forged_through_wire_values() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let agent = AgentProc::start("n1", &root, &[]);
    let forged =
        "x\n2026-01-01T00:00:00.000Z unauthenticated unfenced | install 6.6.6 | ok changed";
    let fence = |cluster: &str, rollout: &str| {
        Some(apb::Fence {
            term: 1,
            rollout_id: rollout.into(),
            step: 1,
            cluster_id: cluster.into(),
            deadline_unix_ms: 0,
        })
    };
    let unpack = |version: &str, fence: Option<apb::Fence>| {
        apb::UnpackRequest {
            version: version.into(),
            fence,
            expected_sha256: String::new(),
            force: false,
        }
        .encode_to_vec()
    };
    rt().block_on(async {
        let mut w = Wire::new(&agent.addr).await;
        let mut calls = 0;
        for (what, r) in [
            (
                "rollout id",
                w.unary(A_UNPACK, unpack("1.2.3", fence(HOSTILE_CLUSTER, forged)))
                    .await,
            ),
            (
                "cluster id",
                w.unary(A_UNPACK, unpack("1.2.3", fence(forged, "r1")))
                    .await,
            ),
            ("version", w.unary(A_UNPACK, unpack(forged, None)).await),
            (
                "package name",
                w.client_stream(
                    A_PUSH,
                    vec![
                        apb::PackageChunk {
                            header: Some(apb::PackageHeader {
                                chunks: Vec::new(),
                                sent: Vec::new(),
                                peers: Vec::new(),
                                name: forged.into(),
                                version: "1.0.0".into(),
                                sha256: "0".repeat(64),
                                size: 1,
                                ..Default::default()
                            }),
                            data: vec![0],
                        }
                        .encode_to_vec(),
                    ],
                )
                .await,
            ),
            (
                "rebind",
                w.unary(
                    "/orchestrator.agent.v1.Agent/Rebind",
                    apb::RebindRequest {
                        cluster_id: forged.into(),
                    }
                    .encode_to_vec(),
                )
                .await,
            ),
        ] {
            assert_refused(what, &r);
            calls += 1;
        }
        let audit = fs::read_to_string(root.join(AGENT_AUDIT)).unwrap();
        assert_eq!(audit.lines().count(), calls, "one call, one line: {audit}");
        for line in audit.lines() {
            assert_audit_line("forged values", line);
            assert!(!line.contains("install 6.6.6 | ok changed"), "{line:?}");
        }
    });
    assert!(!root.join(AGENT_CLUSTER).exists(), "nothing was bound");
    assert!(!root.join(AGENT_FENCE).exists(), "no fence was recorded");
}

/// Fence refusals name fences and clusters; with huge ids (either one) the answer must still be
/// a readable refusal, not a response whose headers the client cannot take.
#[test]
fn fence_refusals_stay_readable_with_huge_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let agent = AgentProc::start("n1", &root, &[]);
    rt().block_on(async {
        let mut w = Wire::new(&agent.addr).await;
        let unpack = |term: u64, cluster_id: String, rollout_id: String| {
            apb::UnpackRequest {
                version: "1.2.3".into(),
                fence: Some(apb::Fence {
                    term,
                    rollout_id,
                    step: 0,
                    cluster_id,
                    deadline_unix_ms: 0,
                }),
                expected_sha256: String::new(),
                force: false,
            }
            .encode_to_vec()
        };
        // Admitted (then not found): the node is bound, with the highest possible rollout.
        let longest = "c".repeat(128);
        let r = w
            .unary(
                A_UNPACK,
                unpack(5, longest.clone(), format!("r{}", u64::MAX)),
            )
            .await;
        assert_eq!(r.unwrap_err().code(), Code::NotFound);
        for (what, body, code) in [
            (
                "older, huge rollout id",
                unpack(1, longest.clone(), "é".repeat(10_000)),
                Code::InvalidArgument,
            ),
            (
                "newer, huge rollout id",
                unpack(9, longest.clone(), "a".repeat(20_000)),
                Code::InvalidArgument,
            ),
            (
                "huge cluster id",
                unpack(9, "c".repeat(20_000), "r1".into()),
                Code::InvalidArgument,
            ),
            (
                "another cluster, longest ids",
                unpack(9, "d".repeat(128), format!("r{}", u64::MAX)),
                Code::FailedPrecondition,
            ),
            (
                "stale",
                unpack(4, longest.clone(), "r1".into()),
                Code::Aborted,
            ),
        ] {
            let s = w.unary(A_UNPACK, body).await.expect_err(what);
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            assert!(
                s.message().len() < 1024,
                "{what}: {} bytes",
                s.message().len()
            );
        }
    });
    assert!(!agent.log().contains("panicked"));
}

// ---------------------------------------------------------------------------------------------
// The coordinator

const C_UPLOAD: &str = "/orchestrator.control.v1.Control/UploadPackage";
const C_START: &str = "/orchestrator.control.v1.Control/StartRollout";
const C_GET: &str = "/orchestrator.control.v1.Control/GetRollout";
const C_LIST_ROLLOUTS: &str = "/orchestrator.control.v1.Control/ListRollouts";
const C_WATCH: &str = "/orchestrator.control.v1.Control/WatchRollout";
const C_COMMAND: &str = "/orchestrator.control.v1.Control/RolloutCommand";
const C_LIST_NODES: &str = "/orchestrator.control.v1.Control/ListNodes";
const C_CLUSTER: &str = "/orchestrator.control.v1.Control/ClusterStatus";
const C_ADD: &str = "/orchestrator.control.v1.Control/AddMember";
const C_REMOVE: &str = "/orchestrator.control.v1.Control/RemoveMember";
const C_REGISTER: &str = "/orchestrator.control.v1.Control/RegisterNode";

/// The replicated state as the control API shows it, plus the blob directory.
#[derive(Debug, PartialEq, Eq, Clone)]
struct CoordState {
    nodes: String,
    rollouts: String,
    members: String,
    leader: u64,
    blobs: Snap,
}

async fn coord_state(w: &mut Wire, blobs: &Path) -> CoordState {
    let nodes = w
        .unary(
            C_LIST_NODES,
            cpb::ListNodesRequest {
                probe: false,
                ..Default::default()
            }
            .encode_to_vec(),
        )
        .await
        .expect("a valid ListNodes works");
    let rollouts = w
        .unary(
            C_LIST_ROLLOUTS,
            cpb::ListRolloutsRequest {
                all: Default::default(),
            }
            .encode_to_vec(),
        )
        .await
        .expect("a valid ListRollouts works");
    let cluster = w
        .unary(C_CLUSTER, cpb::ClusterStatusRequest {}.encode_to_vec())
        .await
        .expect("a valid ClusterStatus works");
    let mut nodes = cpb::ListNodesReply::decode(nodes.as_slice())
        .expect("ListNodesReply")
        .nodes;
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    for n in &mut nodes {
        // Maps come in any order.
        n.labels = n
            .labels
            .clone()
            .into_iter()
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
    }
    let rollouts = cpb::ListRolloutsReply::decode(rollouts.as_slice()).expect("ListRolloutsReply");
    let cluster = cpb::ClusterStatusReply::decode(cluster.as_slice()).expect("ClusterStatusReply");
    CoordState {
        nodes: format!("{nodes:?}"),
        rollouts: format!("{:?}", rollouts.rollouts),
        members: format!("{:?}", cluster.members),
        leader: cluster.leader_id,
        blobs: snapshot(blobs, &[]),
    }
}

async fn check_coord(what: &str, c: &mut Cluster, w: &mut Wire, base: &CoordState) {
    let blobs = c.coords[0].data_dir.join("blobs");
    assert!(
        c.coords[0].is_running(),
        "{what}: the coordinator died\n{}",
        tail(&c.coords[0].log(), 40)
    );
    for (who, log) in [
        ("coordinator", c.coords[0].log()),
        ("agent", c.nodes[0].agent().log()),
    ] {
        assert!(
            !log.contains("panicked"),
            "{what}: the {who} panicked\n{}",
            tail(&log, 40)
        );
    }
    let start = Instant::now();
    loop {
        let now = coord_state(w, &blobs).await;
        if &now == base {
            return;
        }
        if start.elapsed() > SETTLE {
            panic!(
                "{what}: the coordinator's state changed\nbefore: {base:?}\nafter:  {now:?}\nblobs:\n{}\n{}",
                diff(&base.blobs, &now.blobs),
                tail(&c.coords[0].log(), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A StartRollout request with at least one field that must make it fail.
fn broken_start(rng: &mut fastrand::Rng) -> cpb::StartRolloutRequest {
    let mut r = cpb::StartRolloutRequest {
        version: "4.2.1".into(),
        package_sha256: String::new(),
        nodes: Vec::new(),
        batch_size: extreme_u32(rng),
        canary: if rng.bool() { 0 } else { extreme_u32(rng) },
        no_permanent: rng.bool(),
        min_healthy_time_ms: rng.bool().then(|| extreme_u64(rng)),
        healthy_deadline_ms: rng.bool().then(|| extreme_u64(rng)),
        on_failure: ["", "rollback", "pause"][rng.usize(..3)].into(),
        requested_by: any_str(rng),
        request_id: if rng.bool() {
            any_str(rng)
        } else {
            String::new()
        },
        preflight_timeout_ms: rng.bool().then(|| extreme_u64(rng)),
        failure_threshold: rng.bool().then(|| extreme_u32(rng)),
        // Not drawn from `rng`: the stream (and so every seeded case) stays as it was.
        keep_releases: None,
        bake_ms: None,
        wave_by: String::new(),
        batch_percent: 0,
        selector: Default::default(),
        max_unavailable: String::new(),
        promote_each_wave: false,
        // Later options likewise left at their defaults.
        ..Default::default()
    };
    match rng.u8(..6) {
        0 => r.version = invalid_version(rng),
        1 => {
            r.nodes = (0..rng.usize(1..4)).map(|_| hostile_str(rng)).collect();
            if rng.bool() {
                r.nodes.push("n1".into());
            }
        }
        2 => r.package_sha256 = random_digest(rng),
        3 => r.package_sha256 = hostile_digest(rng).replace('\0', "x") + "x",
        4 => r.on_failure = hostile_str(rng) + "!",
        _ => r.healthy_deadline_ms = Some(0),
    }
    r
}

/// A RegisterNode request with at least one field that must make it fail.
fn broken_register(rng: &mut fastrand::Rng) -> cpb::RegisterNodeRequest {
    let mut r = cpb::RegisterNodeRequest {
        id: format!("h{}", rng.u32(..1000)),
        address: format!("127.0.0.1:{}", rng.u16(1..)),
        labels: (0..rng.usize(0..4))
            .map(|_| (any_str(rng), any_str(rng)))
            .collect(),
        versions: vec![cpb::VersionEntry {
            version: "4.2.0".into(),
            state: "permanent".into(),
        }],
        boot_id: extreme_u64(rng),
        state_rev: extreme_u64(rng),
        activate_timeout_ms: 0,
    };
    match rng.u8(..5) {
        0 => r.id = hostile_str(rng),
        1 => r.address = ["", &"a".repeat(300), &"1".repeat(10 * 1024)][rng.usize(..3)].into(),
        2 => r.versions.push(cpb::VersionEntry {
            version: invalid_version(rng),
            state: "old".into(),
        }),
        3 => r.versions.push(cpb::VersionEntry {
            version: "4.1.0".into(),
            state: any_str(rng) + "?",
        }),
        _ => {
            r.id = "n1".into();
            r.versions[0].version = invalid_version(rng);
        }
    }
    r
}

async fn coord_typed_batch(rng: &mut fastrand::Rng, w: &mut Wire, n: usize) {
    for i in 0..n {
        let r = w.unary(C_START, broken_start(rng).encode_to_vec()).await;
        assert_refused(&format!("case {i}: StartRollout"), &r);
        let id = any_str(rng);
        let r = w
            .unary(
                C_GET,
                cpb::RolloutRef {
                    id: id.clone(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused(&format!("case {i}: GetRollout {id:?}"), &r);
        let r = w
            .server_stream_first(
                C_WATCH,
                cpb::RolloutRef {
                    id: id.clone(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused(&format!("case {i}: WatchRollout {id:?}"), &r);
        let cmd = if rng.bool() {
            ["pause", "resume", "abort", "rollback", "promote"][rng.usize(..5)].to_string()
        } else {
            any_str(rng)
        };
        let r = w
            .unary(
                C_COMMAND,
                cpb::RolloutCommandRequest {
                    id: id.clone(),
                    command: cmd.clone(),
                    requested_by: any_str(rng),
                    request_id: String::new(),
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused(&format!("case {i}: RolloutCommand {id:?} {cmd:?}"), &r);
        let r = w
            .unary(C_REGISTER, broken_register(rng).encode_to_vec())
            .await;
        assert_refused(&format!("case {i}: RegisterNode"), &r);
        // Membership: removing a non-member or the only voter, re-adding coordinator 1 at
        // another address, adding one with no address: all refused.
        let r = w
            .unary(
                C_REMOVE,
                cpb::MemberRequest {
                    id: [0, 1, 2, u64::MAX, rng.u64(2..)][rng.usize(..5)],
                    address: any_str(rng),
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused(&format!("case {i}: RemoveMember"), &r);
        let (id, address) = if rng.bool() {
            (1, hostile_str(rng) + "x")
        } else {
            (extreme_u64(rng), String::new())
        };
        let r = w
            .unary(C_ADD, cpb::MemberRequest { id, address }.encode_to_vec())
            .await;
        assert_refused(&format!("case {i}: AddMember {id}"), &r);
        // Reads: any answer but a broken one.
        for (path, body) in [
            (
                C_LIST_NODES,
                cpb::ListNodesRequest {
                    probe: rng.bool(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                C_LIST_ROLLOUTS,
                cpb::ListRolloutsRequest {
                    all: Default::default(),
                }
                .encode_to_vec(),
            ),
            (C_CLUSTER, cpb::ClusterStatusRequest {}.encode_to_vec()),
        ] {
            let r = w.unary(path, body).await;
            assert!(r.is_ok(), "case {i}: {path}: {r:?}");
        }
    }
}

async fn coord_raw_batch(rng: &mut fastrand::Rng, w: &mut Wire, n: usize) {
    let valid: Vec<(&'static str, Vec<u8>)> = vec![
        (C_START, broken_start(rng).encode_to_vec()),
        (
            C_GET,
            cpb::RolloutRef {
                id: "r000001".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            C_WATCH,
            cpb::RolloutRef {
                id: "r000001".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            C_LIST_ROLLOUTS,
            cpb::ListRolloutsRequest {
                all: Default::default(),
            }
            .encode_to_vec(),
        ),
        (
            C_COMMAND,
            cpb::RolloutCommandRequest {
                id: "r000001".into(),
                command: "pause".into(),
                requested_by: "op".into(),
                request_id: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            C_LIST_NODES,
            cpb::ListNodesRequest {
                probe: true,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (C_CLUSTER, cpb::ClusterStatusRequest {}.encode_to_vec()),
        // No address: a mutation that changes the id still lacks a valid address (a
        // well-formed addition of a dead coordinator would hit the bug named in
        // `add_member_of_an_unreachable_coordinator_does_not_make_it_a_voter`).
        (
            C_ADD,
            cpb::MemberRequest {
                id: 1,
                address: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            C_REMOVE,
            cpb::MemberRequest {
                id: 1,
                address: String::new(),
            }
            .encode_to_vec(),
        ),
        (C_REGISTER, broken_register(rng).encode_to_vec()),
    ];
    for _ in 0..n {
        for (path, v) in &valid {
            let body = raw_body(rng, v);
            let r = if *path == C_WATCH {
                w.server_stream_first(path, body).await
            } else {
                w.unary(path, body).await
            };
            if let Err(s) = &r {
                assert!(
                    !is_breakage(s),
                    "raw {path}: {:?} {}",
                    s.code(),
                    s.message()
                );
            }
        }
    }
}

async fn coord_upload_batch(rng: &mut fastrand::Rng, w: &mut Wire, n: usize) {
    for i in 0..n {
        let len = match rng.u8(..4) {
            0 => 0,
            1 => rng.usize(1..64),
            _ => rng.usize(64..300_000),
        };
        let data = random_bytes(rng, len);
        let mut h = cpb::UploadHeader {
            signature: Default::default(),
            name: "hostile".into(),
            version: format!("9.9.{}", rng.u32(..1000)),
            sha256: sha256_hex(&data),
            size: data.len() as u64,
        };
        let variant = rng.u8(..10);
        let mut with_header = true;
        match variant {
            0 => with_header = false,
            1 => h.name = hostile_str(rng),
            2 => h.version = invalid_version(rng),
            3 => h.sha256 = hostile_digest(rng),
            4 => h.sha256 = random_digest(rng),
            5 => h.size = h.size.saturating_sub(rng.u64(1..=h.size.max(1))),
            6 => h.size += rng.u64(1..1000),
            7 => h.size = u64::MAX - rng.u64(..10),
            _ => {
                let msgs: Vec<Vec<u8>> = (0..rng.usize(0..6))
                    .map(|_| {
                        let n = rng.usize(0..4096);
                        random_bytes(rng, n)
                    })
                    .collect();
                let r = w.client_stream(C_UPLOAD, msgs).await;
                assert_refused(&format!("upload case {i}: raw chunks"), &r);
                continue;
            }
        }
        if variant == 5 && data.is_empty() {
            h.size = 1;
        }
        let mut header = with_header.then_some(h);
        let mut msgs = Vec::new();
        let mut rest: &[u8] = &data;
        loop {
            let k = rng.usize(0..=rest.len().min(200_000));
            msgs.push(
                cpb::UploadChunk {
                    header: header.take(),
                    data: rest[..k].to_vec(),
                }
                .encode_to_vec(),
            );
            rest = &rest[k..];
            if rest.is_empty() && (msgs.len() > 1 || rng.bool()) {
                break;
            }
        }
        if rng.u8(..8) == 0 {
            msgs.clear();
        }
        let r = w.client_stream(C_UPLOAD, msgs).await;
        assert_refused(&format!("upload case {i}: variant {variant}"), &r);
    }
}

/// An upload that stops mid-stream (the client disconnects).
async fn coord_upload_abandoned(blobs: &Path, addr: &str) {
    let data = vec![9u8; 100_000];
    let first = cpb::UploadChunk {
        header: Some(cpb::UploadHeader {
            signature: Default::default(),
            name: "abandoned".into(),
            version: "1.0.0".into(),
            sha256: sha256_hex(&data),
            size: 10 * data.len() as u64,
        }),
        data,
    };
    let addr = addr.to_string();
    let call = tokio::spawn(async move {
        let mut c = cpb::control_client::ControlClient::new(channel(&addr).await);
        let s = tonic::codegen::tokio_stream::StreamExt::chain(
            tonic::codegen::tokio_stream::iter(vec![first]),
            tonic::codegen::tokio_stream::pending(),
        );
        let _ = c.upload_package(s).await;
    });
    let start = Instant::now();
    while !fs::read_dir(blobs)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".incoming-"))
        })
        .unwrap_or(false)
    {
        assert!(
            start.elapsed() < SETTLE,
            "the coordinator never started writing the abandoned upload"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call.abort();
    let _ = call.await;
}

async fn coord_huge(w: &mut Wire) {
    // Refusals that quote a 20 KB field stay readable (a bounded quote, not a giant header).
    let big = "a".repeat(20_000);
    for (path, body) in [
        (
            C_GET,
            cpb::RolloutRef {
                id: big.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            C_COMMAND,
            cpb::RolloutCommandRequest {
                id: String::new(),
                command: big.clone(),
                requested_by: String::new(),
                request_id: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            C_START,
            cpb::StartRolloutRequest {
                version: "4.2.1".into(),
                package_sha256: big.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ] {
        let r = w.unary(path, body).await;
        assert_refused(&format!("{path} quoting a 20 KB field"), &r);
        let msg = r.unwrap_err().message().len();
        assert!(msg < 1024, "{path}: a {msg}-byte refusal");
    }
    for size in [7 << 20, 9 << 20] {
        let r = w
            .unary(
                C_START,
                cpb::StartRolloutRequest {
                    version: "4.2.1".into(),
                    nodes: vec!["n".repeat(size)],
                    ..Default::default()
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused(&format!("StartRollout with a {size}-byte node id"), &r);
        let r = w
            .unary(
                C_REGISTER,
                cpb::RegisterNodeRequest {
                    id: "x".repeat(size),
                    address: "127.0.0.1:1".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused(&format!("RegisterNode with a {size}-byte id"), &r);
        let r = w
            .client_stream(
                C_UPLOAD,
                vec![
                    cpb::UploadChunk {
                        header: Some(cpb::UploadHeader {
                            signature: Default::default(),
                            name: "big".into(),
                            version: "1.0.0".into(),
                            sha256: "0".repeat(64),
                            size: size as u64,
                        }),
                        data: vec![0; size],
                    }
                    .encode_to_vec(),
                ],
            )
            .await;
        assert_refused(&format!("upload with a {size}-byte chunk"), &r);
    }
}

#[test]
fn coordinator_survives_hostile_input() {
    let mut rng = fastrand::Rng::with_seed(seed(0x05_C00D));
    let n = cases();
    let mut c = Cluster::start(ClusterOpts::state_only(1, 1));
    let addr = c.coords[0].addr.clone();
    let blobs = c.coords[0].data_dir.join("blobs");

    rt().block_on(async {
        let mut w = Wire::new(&addr).await;
        let mut base = coord_state(&mut w, &blobs).await;
        assert_eq!(base.leader, 1);
        assert!(
            base.nodes.contains("\"n1\""),
            "n1 is registered: {}",
            base.nodes
        );

        coord_raw_batch(&mut rng, &mut w, n).await;
        check_coord("random and mutated bodies", &mut c, &mut w, &base).await;

        coord_typed_batch(&mut rng, &mut w, n).await;
        check_coord("hostile typed requests", &mut c, &mut w, &base).await;

        coord_upload_batch(&mut rng, &mut w, n).await;
        check_coord("lying upload streams", &mut c, &mut w, &base).await;

        for _ in 0..3 {
            coord_upload_abandoned(&blobs, &addr).await;
        }
        check_coord("abandoned uploads", &mut c, &mut w, &base).await;

        coord_huge(&mut w).await;
        check_coord("oversized messages", &mut c, &mut w, &base).await;

        // An honestly announced upload of junk is valid (the coordinator stores bytes by
        // digest): exactly one blob appears. A rollout naming it with another version is
        // then refused.
        let junk = random_bytes(&mut rng, 5000);
        let digest = sha256_hex(&junk);
        let r = w
            .client_stream(
                C_UPLOAD,
                vec![
                    cpb::UploadChunk {
                        header: Some(cpb::UploadHeader {
                            signature: Default::default(),
                            name: "junk".into(),
                            version: "1.0.0".into(),
                            sha256: digest.clone(),
                            size: junk.len() as u64,
                        }),
                        data: junk,
                    }
                    .encode_to_vec(),
                ],
            )
            .await;
        assert!(r.is_ok(), "an honest upload is accepted: {r:?}");
        base.blobs
            .insert(digest.clone(), format!("file 5000 {digest}"));
        let r = w
            .unary(
                C_START,
                cpb::StartRolloutRequest {
                    version: "4.2.1".into(),
                    package_sha256: digest.clone(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
            .await;
        assert_refused("a rollout of 4.2.1 naming the 1.0.0 package", &r);
        check_coord("an honest junk upload", &mut c, &mut w, &base).await;

        eprintln!("coordinator outcomes:\n{}", w.summary());
    });
}

/// A coordinator address that is not HOST:PORT (a path, NUL, spaces, no port) is refused
/// before it enters the membership, instead of being added as a learner that can never be
/// reached (and holding the membership lock for a minute while it "catches up").
#[test]
fn add_member_refuses_what_is_not_an_address() {
    let c = Cluster::start(ClusterOpts::state_only(1, 0));
    let addr = c.coords[0].addr.clone();
    rt().block_on(async {
        let mut w = Wire::new(&addr).await;
        let blobs = c.coords[0].data_dir.join("blobs");
        let base = coord_state(&mut w, &blobs).await;
        for (id, junk) in [
            (2, "/etc/passwd"),
            (3, "../x"),
            (4, "a/b"),
            (5, "x\0y:1"),
            (0, "127.0.0.1:1"),
            (6, "127.0.0.1"),
            (7, "host name:80"),
            (8, "unix:///tmp/sock"),
            (9, "127.0.0.1:99999"),
            // Coordinator 1's own address for another id.
            (10, addr.as_str()),
        ] {
            let r = tokio::time::timeout(
                Duration::from_secs(20),
                w.unary(
                    C_ADD,
                    cpb::MemberRequest {
                        id,
                        address: junk.into(),
                    }
                    .encode_to_vec(),
                ),
            )
            .await
            .unwrap_or_else(|_| panic!("AddMember {id} {junk:?} hung instead of refusing"));
            let s = r.expect_err("a junk address is refused");
            assert_eq!(s.code(), Code::InvalidArgument, "{junk:?}: {}", s.message());
        }
        assert_eq!(coord_state(&mut w, &blobs).await, base);
    });
}

/// `AddMember` of a coordinator that cannot be reached must not make it a voter. openraft's
/// blocking `add_learner` counts a learner as caught up when the leader's log is shorter than
/// `replication_lag_threshold` (5000 entries), even if it never answered; promoting it would cost
/// a single-coordinator cluster its quorum for good. `add_member` therefore also waits (bounded)
/// until the learner has replicated the entry that added it, and fails otherwise.
#[test]
fn add_member_of_an_unreachable_coordinator_does_not_make_it_a_voter() {
    let c = Cluster::start(ClusterOpts::state_only(1, 0));
    let addr = c.coords[0].addr.clone();
    rt().block_on(async {
        let mut w = Wire::new(&addr).await;
        let blobs = c.coords[0].data_dir.join("blobs");
        let base = coord_state(&mut w, &blobs).await;
        let r = tokio::time::timeout(
            Duration::from_secs(120),
            w.unary(
                C_ADD,
                cpb::MemberRequest {
                    id: 7,
                    address: "127.0.0.1:1".into(),
                }
                .encode_to_vec(),
            ),
        )
        .await
        .expect("AddMember answers within its catch-up bound");
        assert!(r.is_err(), "an unreachable coordinator cannot be added");
        let now = coord_state(&mut w, &blobs).await;
        assert!(
            !now.members
                .contains("id: 7, address: \"127.0.0.1:1\", role: \"voter\""),
            "an unreachable coordinator became a voter: {}",
            now.members
        );
        // The cluster can still commit: a registration goes through.
        let r = w
            .unary(
                C_REGISTER,
                cpb::RegisterNodeRequest {
                    id: "n9".into(),
                    address: "127.0.0.1:9".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
            .await;
        assert!(r.is_ok(), "writes still commit: {r:?}");
        assert_eq!(now.nodes, base.nodes);
    });
}

/// Labels enter the replicated state and every `nodes` answer: a registration cannot bring
/// more than 64, or oversized or control-character keys and values; sane ones go through.
#[test]
fn register_node_bounds_labels() {
    let c = Cluster::start(ClusterOpts::state_only(1, 0));
    let addr = c.coords[0].addr.clone();
    rt().block_on(async {
        let mut w = Wire::new(&addr).await;
        let blobs = c.coords[0].data_dir.join("blobs");
        let base = coord_state(&mut w, &blobs).await;
        let many: Vec<(String, String)> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        let cases: Vec<(&str, Vec<(String, String)>)> = vec![
            ("65 labels", many),
            ("long key", vec![("k".repeat(129), "v".into())]),
            ("empty key", vec![(String::new(), "v".into())]),
            ("long value", vec![("zone".into(), "v".repeat(1025))]),
            ("newline in value", vec![("zone".into(), "eu\nx".into())]),
        ];
        for (what, labels) in cases {
            let r = w
                .unary(
                    C_REGISTER,
                    cpb::RegisterNodeRequest {
                        id: "n9".into(),
                        address: "127.0.0.1:9".into(),
                        labels: labels.into_iter().collect(),
                        ..Default::default()
                    }
                    .encode_to_vec(),
                )
                .await;
            let s = r.expect_err(what);
            assert_eq!(s.code(), Code::InvalidArgument, "{what}: {}", s.message());
            assert!(s.message().len() < 400, "{what}: the refusal stays short");
        }
        assert_eq!(coord_state(&mut w, &blobs).await.nodes, base.nodes);
        let ok = w
            .unary(
                C_REGISTER,
                cpb::RegisterNodeRequest {
                    id: "n9".into(),
                    address: "127.0.0.1:9".into(),
                    labels: [("zone".to_string(), "eu-1".to_string())]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
            .await;
        assert!(ok.is_ok(), "sane labels register: {ok:?}");
    });
}
