//! The agent's audit log, `ROOT/agent/audit.log`: one line per mutating call, admitted or
//! refused (reads are not audited):
//!
//! ```text
//! 2026-12-02T10:11:12.345Z coordinator/1 cluster=3f9a term=2 rollout=r000007 step=14 | install 4.2.1 permanent=false | ok changed
//! 2026-12-02T10:11:13.001Z operator/alice unfenced | downgrade 4.2.0 | refused held: node n1 is held by ...
//! ```
//!
//! Fields: RFC 3339 UTC time; the caller (`<role>/<name>` from its certificate,
//! `unauthenticated` under `--insecure`, `unidentified` for a certificate without a valid
//! role, `agent/<node>` for the agent's own steps); the fence or `unfenced`; ` | `, the step;
//! ` | `, the result (`ok changed`, `ok unchanged`, `ok <word>`, followed by the hooks it ran
//! when one was a drain hook, e.g. `ok changed hooks=pre-switch,activate`; `refused <kind>: <message>`,
//! `failed <kind>: <message>`, the message cut at 200 characters).
//!
//! Values from the wire are escaped (every character but printable ASCII, and `\` and `|`,
//! become `\u{..}`), so they contain no space, no separator and no newline: a request cannot
//! forge a line or a field. The log rotates by size: past [`MAX_BYTES`], `audit.log` becomes
//! `audit.log.1` (`.1` becomes `.2`, ... ; [`KEEP`] rotated files are kept).

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use orch_proto::agent as pb;
use orch_tls::{Identity, Role};

use crate::error::Error;

/// Size past which `audit.log` is rotated.
pub const MAX_BYTES: u64 = 10 << 20;
/// Rotated files kept (`audit.log.1` .. `audit.log.3`).
pub const KEEP: usize = 3;
/// Longest message quoted in a result.
const MAX_MESSAGE_CHARS: usize = 200;
/// Longest wire value quoted (its escaped form may be longer).
const MAX_WIRE_CHARS: usize = 64;

/// Who made a call, as the audit log and error messages name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `--insecure`: nobody is authenticated.
    Unauthenticated,
    /// The identity from the caller's certificate.
    Cert(Identity),
    /// A certificate of our CA without a valid role (the call is refused).
    Unidentified,
    /// The agent itself (reconciling after the service restarted).
    Agent(String),
}

impl Caller {
    /// Whether this caller may send fences (advance the node's fence, release it): only
    /// coordinators, or anyone when nobody is authenticated.
    pub fn may_fence(&self) -> bool {
        match self {
            Caller::Unauthenticated => true,
            Caller::Cert(id) => id.role == Role::Coordinator,
            Caller::Unidentified | Caller::Agent(_) => false,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Unauthenticated => f.write_str("unauthenticated"),
            // Names are validated (the node-id alphabet): safe in a line as they are.
            Caller::Cert(id) => write!(f, "{}/{}", id.role, id.name),
            Caller::Unidentified => f.write_str("unidentified"),
            Caller::Agent(node) => write!(f, "agent/{node}"),
        }
    }
}

/// A value from the wire as a single audit token: at most 64 characters (then `...`), every
/// character but printable ASCII (and `\`, `|`) escaped as `\u{..}`.
pub fn wire(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX_WIRE_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_ascii_graphic() && c != '\\' && c != '|' {
            out.push(c);
        } else {
            out.extend(c.escape_unicode());
        }
    }
    out
}

/// A message in a result: at most 200 characters, control characters escaped (one line).
fn message(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX_MESSAGE_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_control() || c == '\\' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// The fence field: `cluster=.. term=.. rollout=.. step=..`, or `unfenced`.
pub fn fence_field(f: Option<&pb::Fence>) -> String {
    match f {
        None => "unfenced".to_string(),
        Some(f) => format!(
            "cluster={} term={} rollout={} step={}",
            wire(&f.cluster_id),
            f.term,
            wire(&f.rollout_id),
            f.step
        ),
    }
}

/// `ok changed` / `ok unchanged`.
pub fn ok(changed: bool) -> String {
    if changed {
        "ok changed"
    } else {
        "ok unchanged"
    }
    .to_string()
}

/// `ok changed` / `ok unchanged`, then, when a drain hook ran, every hook the step ran in order
/// (`hooks=pre-switch,activate`). Steps without drain hooks keep the plain form.
pub fn ok_with_hooks(changed: bool, hooks: &[&str]) -> String {
    if !hooks
        .iter()
        .any(|h| matches!(*h, "pre-switch" | "post-switch"))
    {
        ok(changed)
    } else {
        format!("{} hooks={}", ok(changed), hooks.join(","))
    }
}

/// `refused <kind>: ...` or `failed <kind>: ...`.
pub fn error(e: &Error) -> String {
    let verdict = if e.is_failure() { "failed" } else { "refused" };
    format!("{verdict} {}: {}", e.kind(), message(&e.message()))
}

/// A status the agent did not make itself (the role check): `refused <kind>: ...`, the kind
/// being its `orch-error` or its code (`permission-denied`, `unauthenticated`, ...).
pub fn status(s: &tonic::Status) -> String {
    let kind = match s.metadata().get("orch-error").and_then(|v| v.to_str().ok()) {
        Some(k) => k.to_string(),
        None => match s.code() {
            tonic::Code::PermissionDenied => "permission-denied".into(),
            tonic::Code::Unauthenticated => "unauthenticated".into(),
            tonic::Code::InvalidArgument => "bad-request".into(),
            tonic::Code::Cancelled => "cancelled".into(),
            _ => "internal".into(),
        },
    };
    format!("refused {kind}: {}", message(s.message()))
}

/// Milliseconds since the Unix epoch now (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds (`2026-12-02T10:11:12.345Z`).
pub fn rfc3339_ms(ms: u64) -> String {
    format_time(ms, true)
}

/// RFC 3339 UTC in whole seconds (`2026-12-02T10:11:12Z`).
pub fn rfc3339_secs(ms: u64) -> String {
    format_time(ms, false)
}

fn format_time(ms: u64, with_ms: bool) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
    let (h, mi, s) = (t.hour(), t.minute(), t.second());
    // Fixed width, so lines sort and align; the `time` crate gives the calendar.
    if with_ms {
        format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
            t.millisecond()
        )
    } else {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
    }
}

/// The append-only, size-rotated audit log.
pub struct AuditLog {
    node: String,
    path: PathBuf,
    limit: u64,
    /// Serializes appends and rotation (steps hold the step lock, but refusals do not).
    lock: std::sync::Mutex<()>,
}

impl AuditLog {
    /// `DIR/audit.log`, rotated past [`MAX_BYTES`].
    pub fn open(dir: &Path, node: &str) -> AuditLog {
        AuditLog::with_limit(dir, node, MAX_BYTES)
    }

    pub fn with_limit(dir: &Path, node: &str, limit: u64) -> AuditLog {
        AuditLog {
            node: node.to_string(),
            path: dir.join("audit.log"),
            limit,
            lock: std::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line. `fence` is [`fence_field`]'s, `step` ours (wire values in it already
    /// escaped with [`wire`]), `result` from [`ok`], [`error`] or [`status`].
    ///
    /// Best effort: losing a line must not fail a step, so I/O errors are logged only.
    pub fn record(&self, caller: &Caller, fence: &str, step: &str, result: &str) {
        let line = format!(
            "{} {caller} {fence} | {step} | {result}\n",
            rfc3339_ms(now_ms())
        );
        tracing::info!(node = %self.node, "audit: {}", line.trim_end());
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let written = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| {
                f.write_all(line.as_bytes())?;
                f.metadata().map(|m| m.len())
            });
        match written {
            Ok(len) if len >= self.limit => self.rotate(),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(node = %self.node, "cannot write {}: {e}", self.path.display())
            }
        }
    }

    /// `audit.log.{KEEP-1}` -> `.{KEEP}` (replacing the oldest), ..., `audit.log` -> `.1`.
    fn rotate(&self) {
        let numbered = |i: usize| PathBuf::from(format!("{}.{i}", self.path.display()));
        for i in (1..KEEP).rev() {
            let from = numbered(i);
            if from.exists() {
                let _ = fs::rename(&from, numbered(i + 1));
            }
        }
        if let Err(e) = fs::rename(&self.path, numbered(1)) {
            tracing::warn!(node = %self.node, "cannot rotate {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operator() -> Caller {
        Caller::Cert(Identity::new(Role::Operator, "alice").unwrap())
    }

    #[test]
    fn drain_hooks_are_named_in_the_result() {
        assert_eq!(ok_with_hooks(true, &["activate"]), "ok changed");
        assert_eq!(
            ok_with_hooks(true, &["pre-switch", "activate"]),
            "ok changed hooks=pre-switch,activate"
        );
        assert_eq!(ok_with_hooks(false, &[]), "ok unchanged");
    }

    #[test]
    fn lines_have_time_caller_fence_step_and_result() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), "n1");
        let f = pb::Fence {
            term: 2,
            rollout_id: "r000007".into(),
            step: 14,
            cluster_id: "3f9a".into(),
            deadline_unix_ms: 0,
        };
        log.record(
            &Caller::Cert(Identity::new(Role::Coordinator, "1").unwrap()),
            &fence_field(Some(&f)),
            "install 4.2.1 permanent=false",
            &ok(true),
        );
        log.record(
            &operator(),
            &fence_field(None),
            "downgrade 4.2.0",
            &error(&Error::Refused("refused to x\nforged line".into())),
        );
        log.record(
            &Caller::Unauthenticated,
            "unfenced",
            "uninstall 4.2.0",
            &ok(false),
        );
        let text = fs::read_to_string(dir.path().join("audit.log")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for l in &lines {
            let (time, rest) = l.split_once(' ').unwrap();
            assert!(
                time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
                    .is_ok(),
                "{time}"
            );
            assert!(time.ends_with('Z') && time.len() == 24, "{time}");
            assert_eq!(rest.matches(" | ").count(), 2, "{l}");
        }
        let tail = |l: &str| l.split_once(' ').unwrap().1.to_string();
        assert_eq!(
            tail(lines[0]),
            "coordinator/1 cluster=3f9a term=2 rollout=r000007 step=14 | install 4.2.1 permanent=false | ok changed"
        );
        assert_eq!(
            tail(lines[1]),
            "operator/alice unfenced | downgrade 4.2.0 | refused refused: refused to x\\u{a}forged line"
        );
        assert_eq!(
            tail(lines[2]),
            "unauthenticated unfenced | uninstall 4.2.0 | ok unchanged"
        );
    }

    #[test]
    fn wire_values_cannot_forge_fields_or_lines() {
        assert_eq!(wire("r1\n0 unfenced"), "r1\\u{a}0\\u{20}unfenced");
        assert_eq!(wire("a|b\\c"), "a\\u{7c}b\\u{5c}c");
        assert_eq!(wire("é"), "\\u{e9}");
        let long = wire(&"x".repeat(10_000));
        assert_eq!(long.len(), 64 + 3);
        let f = pb::Fence {
            term: 1,
            rollout_id: "r1\n2026-01-01T00:00:00.000Z coordinator/1 unfenced | x | ok".into(),
            step: 1,
            cluster_id: "a b".into(),
            deadline_unix_ms: 0,
        };
        let field = fence_field(Some(&f));
        assert!(!field.contains('\n') && !field.contains(" | "), "{field}");
        assert_eq!(field.split(' ').count(), 4, "{field}");
    }

    #[test]
    fn rotates_by_size_keeping_three() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::with_limit(dir.path(), "n1", 300);
        let name = |i: usize| dir.path().join(format!("audit.log.{i}"));
        for i in 0..40 {
            log.record(
                &operator(),
                "unfenced",
                &format!("uninstall 1.0.{i}"),
                &ok(false),
            );
        }
        // ~90 bytes a line: a rotation every 4 lines, 10 rotations; 3 kept.
        assert!(name(1).exists() && name(2).exists() && name(3).exists());
        assert!(!name(4).exists());
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        for i in 1..=3 {
            assert!(size(&name(i)) >= 300, "rotated only when past the limit");
            assert!(size(&name(i)) < 300 + 200, "one line past at most");
        }
        assert!(size(&dir.path().join("audit.log")) < 300);
        // The newest lines are in audit.log then .1, in order; nothing is lost between them.
        let all: Vec<String> = [name(3), name(2), name(1), dir.path().join("audit.log")]
            .iter()
            .flat_map(|p| {
                fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        let last: Vec<&String> = all.iter().rev().take(3).collect();
        assert!(last[0].contains("uninstall 1.0.39"), "{last:?}");
        assert!(last[1].contains("uninstall 1.0.38"), "{last:?}");
        let nums: Vec<u32> = all
            .iter()
            .map(|l| {
                l.split("uninstall 1.0.")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "{nums:?}");
    }
}
