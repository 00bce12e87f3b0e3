//! The coordinator's HTTP endpoint (`--http-listen`): the web dashboard, the JSON API under
//! `/api/v1/` (docs/api.md), its server-sent event stream, `/metrics` and `/healthz`.
//!
//! Every API call goes through the same control service as gRPC, in-process, with the
//! caller's certificate identity attached: the role checks, read gates and audit names are the
//! gRPC ones. Reads are served by whichever coordinator is asked: linearizable on the leader,
//! the local state elsewhere (marked `stale` in `/api/v1/cluster`'s answer by `answered_by`).

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use hyper::{Method, StatusCode};
use orch_http::{Caller, Request, Response, ResponseFuture, Routes, sse};
use orch_proto::control::{self as pb, control_server::Control};
use orch_proto::json::{cluster_json, node_json, status_json};
use serde_json::{Value, json};

use crate::Shared;
use crate::control::ControlService;
use crate::metrics::Metrics;

const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");
const DASHBOARD_JS: &str = include_str!("../assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../assets/dashboard.css");

/// How often the event stream looks for changes when the Raft state has not moved (node
/// liveness and member contact change without log entries).
const EVENTS_TICK: Duration = Duration::from_secs(1);
/// The dashboard's node health: a probe at most this old is shown instead of probing again.
const NODE_PROBE_MAX_AGE_MS: u64 = 5_000;

pub struct CoordinatorRoutes {
    pub shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
    pub data_dir: std::path::PathBuf,
}

impl Routes for CoordinatorRoutes {
    fn route(&self, req: Request, caller: Caller) -> ResponseFuture {
        let svc = ControlService {
            shared: self.shared.clone(),
        };
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let accept = orch_http::accept(&req);
        let shared = self.shared.clone();
        let metrics = self.metrics.clone();
        let data_dir = self.data_dir.clone();
        Box::pin(async move {
            let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
            match (&method, parts.as_slice()) {
                (&Method::GET, [""]) => orch_http::html(DASHBOARD_HTML),
                (&Method::GET, ["assets", "dashboard.js"]) => orch_http::static_asset(
                    DASHBOARD_JS.as_bytes(),
                    "text/javascript; charset=utf-8",
                ),
                (&Method::GET, ["assets", "dashboard.css"]) => {
                    orch_http::static_asset(DASHBOARD_CSS.as_bytes(), "text/css; charset=utf-8")
                }
                (&Method::GET, ["healthz"]) => healthz(&shared),
                (&Method::GET, ["metrics"]) => {
                    refresh_metrics(&shared, &metrics, &data_dir);
                    orch_http::metrics(metrics.registry(), &accept)
                }
                (&Method::GET, ["api", "v1", "whoami"]) => orch_http::json(
                    StatusCode::OK,
                    &json!({"party": caller.party(), "may_operate": caller.may_operate()}),
                ),
                (&Method::GET, ["api", "v1", "cluster"]) => reply(cluster(&svc, &caller).await),
                (&Method::GET, ["api", "v1", "nodes"]) => reply(nodes(&svc, &caller).await),
                (&Method::GET, ["api", "v1", "rollouts"]) => reply(
                    rollouts(
                        &svc,
                        &caller,
                        query.split('&').any(|q| q == "all=1" || q == "all=true"),
                    )
                    .await,
                ),
                (&Method::GET, ["api", "v1", "rollouts", id]) => {
                    reply(rollout(&svc, &caller, id).await)
                }
                (&Method::POST, ["api", "v1", "rollouts", id, command]) => {
                    reply(command_of(&svc, &caller, id, command).await)
                }
                (&Method::GET, ["api", "v1", "events"]) => events(svc, caller),
                (_, ["api", ..]) | (_, ["metrics" | "healthz"]) if method != Method::GET => {
                    orch_http::error(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "method_not_allowed",
                        &format!("{method} {path} is not served (see docs/api.md)"),
                    )
                }
                _ => orch_http::not_found(&path),
            }
        })
    }
}

/// A control request as if it had come over gRPC from `caller`. Reads may be answered from
/// this coordinator's own state when it is not the leader (`orch-stale`).
fn request<T>(msg: T, caller: &Caller) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "orch-stale",
        tonic::metadata::MetadataValue::from_static("1"),
    );
    if let Caller::Authenticated(id) = caller {
        req.extensions_mut()
            .insert(orch_tls::VerifiedCaller(id.clone()));
    }
    req
}

type ApiResult = Result<Value, tonic::Status>;

fn reply(r: ApiResult) -> Response {
    match r {
        Ok(v) => orch_http::json(StatusCode::OK, &v),
        Err(s) => {
            let (status, kind) = match s.code() {
                tonic::Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
                tonic::Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
                tonic::Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
                tonic::Code::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
                tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => {
                    (StatusCode::CONFLICT, "refused")
                }
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "error"),
            };
            orch_http::error(status, kind, s.message())
        }
    }
}

async fn cluster(svc: &ControlService, caller: &Caller) -> ApiResult {
    let r = svc
        .cluster_status(request(pb::ClusterStatusRequest::default(), caller))
        .await?;
    Ok(cluster_json(r.get_ref()))
}

async fn nodes(svc: &ControlService, caller: &Caller) -> ApiResult {
    let r = svc
        .list_nodes(request(
            pb::ListNodesRequest {
                probe: true,
                probe_max_age_ms: NODE_PROBE_MAX_AGE_MS,
            },
            caller,
        ))
        .await?;
    Ok(Value::Array(
        r.get_ref().nodes.iter().map(node_json).collect(),
    ))
}

async fn rollouts(svc: &ControlService, caller: &Caller, all: bool) -> ApiResult {
    let r = svc
        .list_rollouts(request(pb::ListRolloutsRequest { all }, caller))
        .await?;
    Ok(Value::Array(
        r.get_ref().rollouts.iter().map(status_json).collect(),
    ))
}

async fn rollout(svc: &ControlService, caller: &Caller, id: &str) -> ApiResult {
    let id = if id == "latest" { "" } else { id };
    let r = svc
        .get_rollout(request(
            pb::RolloutRef {
                id: id.to_string(),
                ..Default::default()
            },
            caller,
        ))
        .await?;
    Ok(status_json(r.get_ref()))
}

async fn command_of(svc: &ControlService, caller: &Caller, id: &str, command: &str) -> ApiResult {
    if !matches!(
        command,
        "pause" | "resume" | "abort" | "promote" | "rollback"
    ) {
        return Err(tonic::Status::not_found(format!(
            "no such rollout command {command:?}: pause, resume, abort, promote or rollback"
        )));
    }
    if !caller.may_operate() {
        return Err(tonic::Status::permission_denied(format!(
            "{command} needs an operator certificate; {} may only read",
            caller.party()
        )));
    }
    let mut req = request(
        pb::RolloutCommandRequest {
            id: id.to_string(),
            command: command.to_string(),
            requested_by: caller.party(),
            ..Default::default()
        },
        caller,
    );
    // A write goes to the leader's Raft, never answered from a stale view.
    req.metadata_mut().remove("orch-stale");
    let r = svc.rollout_command(req).await?;
    Ok(status_json(r.get_ref()))
}

fn healthz(shared: &Shared) -> Response {
    let m = shared.raft.metrics();
    orch_http::json(
        StatusCode::OK,
        &json!({
            "status": "ok",
            "id": m.id,
            "term": m.term,
            "leader_id": m.leader.as_ref().map(|l| l.0),
        }),
    )
}

fn refresh_metrics(shared: &Shared, metrics: &Metrics, data_dir: &std::path::Path) {
    let raft = shared.raft.metrics();
    let storage = dir_bytes(&data_dir.join("raft"));
    shared.read(|s| metrics.refresh(s, &raft, storage, crate::driver::now_ms()));
}

/// Bytes of the files directly in `dir` (the Raft log and state files).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The event stream: `cluster`, `nodes`, `rollouts` and `rollout` (the latest one, with its
/// events) documents, each sent when it differs from the last one sent. Wakes on every Raft
/// apply and every second.
fn events(svc: ControlService, caller: Caller) -> Response {
    sse::response(event_stream(svc, caller))
}

struct Watcher {
    svc: ControlService,
    caller: Caller,
    applied: tokio::sync::watch::Receiver<u64>,
    /// The last document sent under each name.
    sent: Vec<(&'static str, Value)>,
    /// Changed documents not sent yet.
    queue: std::collections::VecDeque<sse::Event>,
    started: bool,
}

impl Watcher {
    /// Waits for a change (not before the first look), then queues every document that differs
    /// from the one last sent.
    async fn look(&mut self) {
        if self.started {
            let _ = tokio::time::timeout(EVENTS_TICK, self.applied.changed()).await;
        }
        self.started = true;
        let docs: [(&'static str, ApiResult); 4] = [
            ("cluster", cluster(&self.svc, &self.caller).await),
            ("nodes", nodes(&self.svc, &self.caller).await),
            ("rollouts", rollouts(&self.svc, &self.caller, false).await),
            ("rollout", rollout(&self.svc, &self.caller, "").await),
        ];
        for (name, doc) in docs {
            // A refused read (no rollout yet, no leader) sends nothing; the next look retries.
            let Ok(data) = doc else { continue };
            if self.sent.iter().any(|(n, v)| *n == name && *v == data) {
                continue;
            }
            self.sent.retain(|(n, _)| *n != name);
            self.sent.push((name, data.clone()));
            self.queue.push_back(sse::Event { name, data });
        }
    }
}

fn event_stream(svc: ControlService, caller: Caller) -> impl Stream<Item = sse::Event> + Send {
    let applied = svc.shared.raft.applied();
    let watcher = Watcher {
        svc,
        caller,
        applied,
        sent: Vec::new(),
        queue: Default::default(),
        started: false,
    };
    futures::stream::unfold(watcher, |mut w| async move {
        loop {
            if let Some(e) = w.queue.pop_front() {
                return Some((e, w));
            }
            w.look().await;
        }
    })
}
