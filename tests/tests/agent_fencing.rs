//! Issue #10 on a real `orchestrator agent` process (plain text; the mTLS role rules are in
//! security.rs): fences bound to a cluster, numeric rollout order, deadlines, holds and
//! `node rebind`, reads that never write (reconciling at start and when the service's process
//! changes instead), and a push of a package the node already has ending at once.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orch_tests::proto as pb;
use orch_tests::*;
use tonic::Code;

/// A fence of `cluster` (no deadline).
fn fence_of(cluster: &str, term: u64, rollout: &str, step: u64) -> Option<pb::Fence> {
    Some(pb::Fence {
        term,
        rollout_id: rollout.into(),
        step,
        cluster_id: cluster.into(),
        deadline_unix_ms: 0,
    })
}

fn unpack(version: &str, fence: Option<pb::Fence>) -> pb::UnpackRequest {
    pb::UnpackRequest {
        version: version.into(),
        fence,
        expected_sha256: String::new(),
        force: false,
    }
}

fn vreq(version: &str, fence: Option<pb::Fence>) -> pb::VersionRequest {
    pb::VersionRequest {
        version: version.into(),
        fence,
        force: false,
    }
}

/// What a refusal must leave unchanged: the releases and the agent's binding and fence.
#[derive(Debug, PartialEq, Eq)]
struct NodeState {
    versions: Vec<(String, String)>,
    fence: String,
    cluster: String,
}

async fn node_state(c: &mut AgentClient, root: &Path) -> NodeState {
    let v = c
        .versions(pb::VersionsRequest {})
        .await
        .unwrap()
        .into_inner();
    NodeState {
        versions: states(&v.versions),
        fence: read_or_empty(&root.join("agent/fence.json")),
        cluster: read_or_empty(&root.join("agent/cluster.json")),
    }
}

type AgentClient = pb::agent_client::AgentClient<tonic::transport::Channel>;

fn audit(root: &Path) -> String {
    read_or_empty(&root.join("agent/audit.log"))
}

/// A node with 4.2.0 pushed and unpacked (by the operator, unfenced).
fn node_with_package(tmp: &Path) -> (AgentProc, PathBuf) {
    let pkgs = tmp.join("pkgs");
    build_emqx(tmp, &pkgs, &["4.2.0"]);
    let agent = AgentProc::start("n1", &tmp.join("root"), &[]);
    let zip = pkgs.join("emqx-4.2.0.zip");
    agent.node_ok(&["unpack", "--package", zip.to_str().unwrap()]);
    (agent, zip)
}

#[test]
fn the_first_fenced_call_binds_the_node_and_other_clusters_are_refused_until_rebind() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut agent, _) = node_with_package(tmp.path());
    let root = agent.root.clone();
    rt().block_on(async {
        let mut c = agent.client().await;
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.cluster_id, "", "unbound until a coordinator's fence");
        c.unpack(unpack("4.2.0", fence_of("cluster-a", 7, "r000003", 2)))
            .await
            .unwrap();
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.cluster_id, "cluster-a");
        assert_eq!(info.held_by, "r000003");
        let bound: serde_json::Value =
            serde_json::from_str(&read_or_empty(&root.join("agent/cluster.json"))).unwrap();
        assert_eq!(bound["cluster_id"], "cluster-a");
        assert_eq!(bound["by"], "unauthenticated");
        assert!(
            bound["bound_at"].as_str().unwrap().ends_with('Z'),
            "{bound}"
        );

        // Coordinators rebuilt from scratch (terms restart at 1) are another cluster: refused,
        // naming both ids and the remedy, and nothing changes.
        let before = node_state(&mut c, &root).await;
        let e = c
            .install(pb::InstallRequest {
                version: "4.2.0".into(),
                permanent: true,
                fence: fence_of("cluster-b", 1, "r000001", 0),
                expected_sha256: String::new(),
                force: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(error_kind(&e), "other-cluster");
        assert_eq!(
            e.message(),
            "node n1 belongs to cluster cluster-a but this call comes from cluster cluster-b; if \
             the node really moved to the new cluster, run `orchestrator node rebind --agent ADDR \
             --cluster-id cluster-b` (operator), else check which coordinators this node's agent \
             talks to"
        );
        assert_eq!(node_state(&mut c, &root).await, before);
        assert!(
            audit(&root).contains(
                "unauthenticated cluster=cluster-b term=1 rollout=r000001 step=0 | install 4.2.0 \
                 permanent=true | refused other-cluster: node n1 belongs to cluster cluster-a"
            ),
            "{}",
            audit(&root)
        );
    });

    // The binding survives a restart.
    assert!(agent.stop_term().success(), "{}", agent.log());
    let agent = AgentProc::start("n1", &root, &[]);
    rt().block_on(async {
        let mut c = agent.client().await;
        let e = c
            .unpack(unpack("4.2.0", fence_of("cluster-b", 1, "r1", 0)))
            .await
            .unwrap_err();
        assert_eq!(error_kind(&e), "other-cluster", "{e:?}");
    });

    // The operator unbinds the node: the next cluster's term-1 fence binds it.
    assert_eq!(
        agent.node_ok(&["rebind"]),
        "Node n1 unbound from cluster cluster-a: the next coordinator cluster to fence it binds it\n"
    );
    rt().block_on(async {
        let mut c = agent.client().await;
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((info.cluster_id.as_str(), info.held_by.as_str()), ("", ""));
        c.unpack(unpack("4.2.0", fence_of("cluster-b", 1, "r1", 0)))
            .await
            .unwrap();
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.cluster_id, "cluster-b");
        assert_eq!(info.last_fence, fence_of("cluster-b", 1, "r000001", 0));
    });
    // Or moves it to a named cluster: that one's term 1 is accepted, the others' refused.
    assert_eq!(
        agent.node_ok(&["rebind", "--cluster-id", "cluster-c"]),
        "Node n1 moved from cluster cluster-b to cluster cluster-c\n"
    );
    assert_eq!(
        agent.node_ok(&["rebind", "--cluster-id", "cluster-c"]),
        "Node n1 already belongs to cluster cluster-c; nothing to do\n"
    );
    rt().block_on(async {
        let mut c = agent.client().await;
        c.unpack(unpack("4.2.0", fence_of("cluster-c", 1, "r1", 0)))
            .await
            .unwrap();
        for other in ["cluster-a", "cluster-b"] {
            let e = c
                .unpack(unpack("4.2.0", fence_of(other, 99, "r9", 9)))
                .await
                .unwrap_err();
            assert_eq!(error_kind(&e), "other-cluster", "{other}: {e:?}");
        }
    });
    let log = audit(&root);
    for line in [
        "unauthenticated unfenced | unbind | ok changed",
        "unauthenticated unfenced | rebind cluster-c | ok changed",
        "unauthenticated unfenced | rebind cluster-c | ok unchanged",
    ] {
        assert!(log.contains(line), "audit.log lacks {line:?}:\n{log}");
    }
    // Not a cluster id: refused, one line.
    assert_refused(
        &agent.node(&["rebind", "--cluster-id", "a b"]),
        "is not 1-128 printable ASCII characters without spaces",
    );
}

/// Fences compared rollout ids as strings: after r999999 every rollout's fence was stale.
#[test]
fn rollout_ids_compare_by_number_and_malformed_fences_are_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let (agent, _) = node_with_package(tmp.path());
    rt().block_on(async {
        let mut c = agent.client().await;
        c.unpack(unpack("4.2.0", fence(1, "r999999", 5)))
            .await
            .unwrap();
        c.unpack(unpack("4.2.0", fence(1, "r1000000", 0)))
            .await
            .expect("r1000000 comes after r999999");
        let e = c
            .unpack(unpack("4.2.0", fence(1, "r999999", 6)))
            .await
            .unwrap_err();
        assert_eq!(error_kind(&e), "stale-fence", "{e:?}");
        let before = node_state(&mut c, &agent.root).await;
        for (f, needle) in [
            (fence_of("", 9, "r2000000", 0), "the cluster id is empty"),
            (fence(9, "rollout-7", 0), "invalid rollout id \"rollout-7\""),
            (fence(9, &"é".repeat(20_000), 0), "invalid rollout id"),
        ] {
            let e = c.unpack(unpack("4.2.0", f)).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert_eq!(error_kind(&e), "bad-request", "{e:?}");
            assert!(e.message().contains(needle), "{e:?}");
            assert!(
                e.message().len() < 512,
                "bounded: {} bytes",
                e.message().len()
            );
        }
        assert_eq!(node_state(&mut c, &agent.root).await, before);
    });
}

/// A step whose deadline passed is refused, including one that waited in the socket of a
/// frozen (SIGSTOPped) agent: it must not be applied late.
#[test]
fn a_step_whose_deadline_passed_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (agent, _) = node_with_package(tmp.path());
    let root = agent.root.clone();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let install = |deadline_unix_ms| pb::InstallRequest {
        version: "4.2.0".into(),
        permanent: true,
        fence: Some(pb::Fence {
            deadline_unix_ms,
            ..fence(3, "r000004", 1).unwrap()
        }),
        expected_sha256: String::new(),
        force: false,
    };
    // Multi-threaded: the call below must be sent while this thread waits, not only when it
    // is awaited.
    let r = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut c = r.block_on(agent.client());
    let before = r.block_on(node_state(&mut c, &root));
    assert_eq!(
        before.versions,
        vec![("4.2.0".to_string(), "unpacked".to_string())]
    );

    // Already past when it arrives.
    let e = r.block_on(c.install(install(now_ms() - 1000))).unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert_eq!(error_kind(&e), "deadline");
    assert!(
        e.message()
            .starts_with("node n1 refused install 4.2.0 permanent=true: its deadline ")
            && e.message().contains("nothing changed"),
        "{e:?}"
    );
    assert_eq!(r.block_on(node_state(&mut c, &root)), before);

    // Sent in time to a frozen agent, which resumes after the deadline.
    let deadline = now_ms() + 1500;
    // Stopped for sure before the call is sent (the agent was started by this test).
    orch_tests::freeze(agent.pid());
    let call = r.spawn(async move { c.install(install(deadline)).await });
    wait_until(Duration::from_secs(10), "the deadline to pass", || {
        now_ms() > deadline + 200
    });
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGCONT) }, 0);
    let e = r.block_on(call).unwrap().unwrap_err();
    assert_eq!(error_kind(&e), "deadline", "applied late: {e:?}");
    let mut c = r.block_on(agent.client());
    assert_eq!(r.block_on(node_state(&mut c, &root)), before);
    assert_eq!(read_or_empty(&root.join("activations")), "");
    let log = audit(&root);
    assert_eq!(
        log.matches("| install 4.2.0 permanent=true | refused deadline: node n1 refused install")
            .count(),
        2,
        "{log}"
    );
}

/// While a rollout's fence holds the node, the operator's unfenced steps are refused unless
/// forced; a Release of that rollout (not of another, not an older fence) frees the node.
#[test]
fn a_rollout_holds_the_node_until_released() {
    let tmp = tempfile::tempdir().unwrap();
    let (agent, zip) = node_with_package(tmp.path());
    let zip = zip.display().to_string();
    rt().block_on(async {
        let mut c = agent.client().await;
        c.unpack(unpack("4.2.0", fence(2, "r7", 14))).await.unwrap();
    });
    let line = assert_refused(
        &agent.node(&["install", "--package", &zip]),
        "node n1 is held by rollout r000007 of cluster test-cluster (its last step 14 at ",
    );
    assert!(
        line.ends_with(
            "Z): wait for it to end or abort it (`orchestrator abort`), or pass --force\n"
        ),
        "{line:?}"
    );
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n* 4.2.0\tunpacked\n"
    );
    rt().block_on(async {
        let mut c = agent.client().await;
        for (f, why) in [
            (fence(2, "r6", 20), "another rollout"),
            (fence(2, "r7", 13), "an older fence"),
        ] {
            let r = c
                .release(pb::ReleaseRequest { fence: f })
                .await
                .unwrap()
                .into_inner();
            assert!(!r.released, "{why}");
        }
        let e = c
            .release(pb::ReleaseRequest {
                fence: fence_of("elsewhere", 2, "r7", 14),
            })
            .await
            .unwrap_err();
        assert_eq!(error_kind(&e), "other-cluster", "{e:?}");
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.held_by, "r000007");
        let r = c
            .release(pb::ReleaseRequest {
                fence: fence(2, "r7", 14),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.released);
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.held_by, "");
        assert_eq!(info.last_fence, fence(2, "r000007", 14), "still fenced");
        // A deposed coordinator is still fenced after the release.
        let e = c
            .permanent(vreq("4.2.0", fence(2, "r7", 13)))
            .await
            .unwrap_err();
        assert_eq!(error_kind(&e), "stale-fence", "{e:?}");
    });
    assert_eq!(
        agent.node_ok(&["install", "--package", &zip]),
        "Release 4.2.0 is already unpacked, now installing.\n\
         Installed Release: 4.2.0\n\
         Made release permanent: \"4.2.0\"\n"
    );
    let log = audit(&agent.root);
    assert!(
        log.contains("term=2 rollout=r7 step=14 | release | ok changed"),
        "{log}"
    );
}

#[test]
fn rebind_and_force_are_refused_where_they_mean_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let o = orch(&[
        "node",
        "rebind",
        "--cluster-id",
        "x",
        "--root-dir",
        root.to_str().unwrap(),
    ]);
    assert_refused(
        &o,
        "pass --agent ADDR (a local root directory has no agent)",
    );
    let o = local(&root, &["uninstall", "4.2.0", "--force"]);
    assert_refused(&o, "--force overrides a rollout's hold on a node");
    assert!(!root.join("releases").exists(), "nothing was done");
}

// ---- Reads never write ----------------------------------------------------------------------

/// A root with 4.2.0 permanent and 4.2.1 current (hot-switched, not yet committed).
fn switched_root(tmp: &Path) -> PathBuf {
    let pkgs = tmp.join("pkgs");
    build_emqx(tmp, &pkgs, &["4.2.0", "4.2.1"]);
    let root = tmp.join("root");
    let p = |v: &str| pkgs.join(format!("emqx-{v}.zip")).display().to_string();
    local_ok(&root, &["install", "--package", &p("4.2.0")]);
    local_ok(
        &root,
        &["install", "--no-permanent", "--package", &p("4.2.1")],
    );
    root
}

const SWITCHED: &str = "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n";
const RESTARTED: &str = "Installed versions:\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n";

/// `Versions` and `Health` (viewer calls) used to run the reconcile: one probe that saw the
/// permanent version demoted the current release, unfenced and unaudited. Now the store is
/// reconciled at start (audited) instead.
#[test]
fn reads_never_change_the_node_and_the_start_up_reconcile_does() {
    let tmp = tempfile::tempdir().unwrap();
    let root = switched_root(tmp.path());
    let http = HttpServer::start(HttpReply::version("4.2.1"));
    let url = http.url();
    let args = ["--health-url", url.as_str()];
    let mut agent = AgentProc::start("n1", &root, &args);
    assert_eq!(agent.node_ok(&["versions"]), SWITCHED);

    // One probe answers the permanent version (a service without `pid`): reads report it and
    // change nothing.
    http.set(HttpReply::version("4.2.0"));
    rt().block_on(async {
        let mut c = agent.client().await;
        let v = c
            .versions(pb::VersionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.reported_version, "4.2.0");
        assert_eq!(v.running_version, "4.2.1");
        let h = c
            .health(pb::HealthRequest {
                expect_version: "4.2.1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!h.healthy, "{h:?}");
        assert_eq!(h.reported_version, "4.2.0");
    });
    assert_refused(
        &agent.node(&["health", "--expect", "4.2.1"]),
        "service reports version 4.2.0, expected 4.2.1",
    );
    // Without a `pid` the service cannot tell a restart: reconciled only at start.
    assert_eq!(agent.node_ok(&["versions"]), SWITCHED);
    assert!(!audit(&root).contains("reconcile"), "{}", audit(&root));

    // An agent restart reconciles before serving: the service runs the permanent release.
    assert!(agent.stop_term().success(), "{}", agent.log());
    let agent = AgentProc::start("n1", &root, &args);
    assert_eq!(agent.node_ok(&["versions"]), RESTARTED);
    let log = audit(&root);
    assert!(
        log.lines().any(|l| l.ends_with(
            " agent/n1 unfenced | reconcile 4.2.0 (agent start) | ok changed"
        )),
        "{log}"
    );
}

/// With the agent running, the service restarts on its own (a new pid, the permanent
/// version): the agent reconciles within a couple of polls, audited, and bumps the report
/// stamp (which also wakes its registration).
#[test]
fn a_service_restart_seen_by_its_pid_is_reconciled_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let root = switched_root(tmp.path());
    let body = |v: &str, pid: u32| {
        HttpReply::Status(200, format!("{{\"version\":\"{v}\",\"pid\":{pid}}}"))
    };
    let http = HttpServer::start(body("4.2.1", 100));
    let url = http.url();
    let agent = AgentProc::start("n1", &root, &["--health-url", url.as_str()]);
    let r = rt();
    let mut c = r.block_on(agent.client());
    let versions = |c: &mut AgentClient| {
        r.block_on(c.versions(pb::VersionsRequest {}))
            .unwrap()
            .into_inner()
    };
    let v0 = versions(&mut c);
    assert_eq!(
        states(&v0.versions),
        vec![
            ("4.2.1".into(), "current".into()),
            ("4.2.0".into(), "permanent".into())
        ]
    );
    // A hot switch keeps the process: the same pid reporting another version is no restart.
    http.set(body("4.2.0", 100));
    let hits = http.hits();
    wait_until(Duration::from_secs(15), "two polls of the service", || {
        http.hits() >= hits + 2
    });
    assert_eq!(states(&versions(&mut c).versions), states(&v0.versions));

    http.set(body("4.2.0", 200));
    let start = Instant::now();
    wait_until(Duration::from_secs(15), "the reconcile", || {
        states(&versions(&mut c).versions)
            == vec![
                ("4.2.1".to_string(), "unpacked".to_string()),
                ("4.2.0".to_string(), "permanent".to_string()),
            ]
    });
    eprintln!("reconciled {:?} after the restart", start.elapsed());
    let v1 = versions(&mut c);
    assert_eq!(v1.boot_id, v0.boot_id);
    assert_eq!(v1.state_rev, v0.state_rev + 1, "the change is stamped");
    let log = audit(&root);
    assert!(
        log.lines().any(|l| l.ends_with(
            " agent/n1 unfenced | reconcile 4.2.0 pid=200 (service restarted) | ok changed"
        )),
        "{log}"
    );
    assert_eq!(agent.node_ok(&["versions"]), RESTARTED);
}

// ---- Push ---------------------------------------------------------------------------------

/// A push of a package the node already has is answered after the header, without waiting for
/// the rest of the stream (which a failover would otherwise re-send in full).
#[test]
fn a_push_of_a_package_the_node_has_ends_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    // ~3 MB: more than the senders' queues and the HTTP/2 windows hold.
    let mut payload = String::with_capacity(4 << 20);
    while payload.len() < (3 << 20) {
        payload.push_str(&format!("{:016x}\n", fastrand::u64(..)));
    }
    let zip = PkgSpec::emqx("4.2.0")
        .payload(&payload)
        .build(tmp.path(), &tmp.path().join("pkgs"));
    let data = fs::read(&zip).unwrap();
    let agent = AgentProc::start("n1", &tmp.path().join("root"), &[]);
    let r = rt();
    r.block_on(async {
        let mut c = agent.client().await;
        assert!(!push_file(&mut c, &zip, None).await.unwrap().already);
        // The header and one chunk, then a stream that is never closed.
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::PackageChunk>(4);
        let h = header_for("emqx", "4.2.0", &data, None);
        tx.send(chunks_of(Some(h), &data[..65536], 65536).remove(0))
            .await
            .unwrap();
        let reply = tokio::time::timeout(
            Duration::from_secs(20),
            c.push_package(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
                rx,
            )),
        )
        .await
        .expect("the agent answers before the stream ends")
        .unwrap()
        .into_inner();
        assert!(reply.already, "{reply:?}");
        assert_eq!(
            reply.message,
            "Package emqx-4.2.0.zip is already on this node"
        );
        // The request stream is dropped with the answer: a sender's next send fails, which is
        // how the CLI's and the coordinators' readers stop.
        tokio::time::timeout(Duration::from_secs(10), tx.closed())
            .await
            .expect("the request stream is dropped after the answer");
    });
    // The CLI's sender copes with the early answer.
    let o = agent.node_ok(&["unpack", "--package", zip.to_str().unwrap()]);
    assert_eq!(
        o,
        "Release 4.2.0 not found, attempting to unpack releases/emqx-4.2.0.zip\n\
         Unpacked successfully: \"4.2.0\"\n"
    );
    let log = audit(&agent.root);
    assert_eq!(
        log.matches("unfenced | push emqx-4.2.0.zip | ok unchanged")
            .count(),
        2,
        "{log}"
    );
}

// ---- Registration ---------------------------------------------------------------------------

/// A stand-in coordinator that records registrations and answers nothing else.
#[derive(Clone, Default)]
struct Registrations(
    std::sync::Arc<std::sync::Mutex<Vec<orch_proto::control::RegisterNodeRequest>>>,
);

mod fake {
    use orch_proto::control::{self as pb, control_server::Control};
    use std::pin::Pin;
    use tonic::codegen::tokio_stream::Stream;
    use tonic::{Request, Response, Status, Streaming};

    type Res<T> = Result<Response<T>, Status>;

    fn no<T>() -> Res<T> {
        Err(Status::unimplemented("a test stand-in: registrations only"))
    }

    #[tonic::async_trait]
    impl Control for super::Registrations {
        async fn upload_package(
            &self,
            _: Request<Streaming<pb::UploadChunk>>,
        ) -> Res<pb::UploadReply> {
            no()
        }
        async fn missing_package_chunks(
            &self,
            _: Request<pb::MissingPackageChunksRequest>,
        ) -> Res<pb::MissingPackageChunksReply> {
            no()
        }
        async fn upload_package_delta(
            &self,
            _: Request<Streaming<pb::UploadDeltaChunk>>,
        ) -> Res<pb::UploadReply> {
            no()
        }
        async fn start_rollout(
            &self,
            _: Request<pb::StartRolloutRequest>,
        ) -> Res<pb::RolloutStatus> {
            no()
        }
        async fn plan_rollout(&self, _: Request<pb::PlanRolloutRequest>) -> Res<pb::RolloutPlan> {
            no()
        }
        async fn get_rollout(&self, _: Request<pb::RolloutRef>) -> Res<pb::RolloutStatus> {
            no()
        }
        async fn list_rollouts(
            &self,
            _: Request<pb::ListRolloutsRequest>,
        ) -> Res<pb::ListRolloutsReply> {
            no()
        }
        type WatchRolloutStream =
            Pin<Box<dyn Stream<Item = Result<pb::RolloutStatus, Status>> + Send>>;
        async fn watch_rollout(&self, _: Request<pb::RolloutRef>) -> Res<Self::WatchRolloutStream> {
            no()
        }
        async fn rollout_command(
            &self,
            _: Request<pb::RolloutCommandRequest>,
        ) -> Res<pb::RolloutStatus> {
            no()
        }
        async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Res<pb::ListNodesReply> {
            no()
        }
        async fn cluster_status(
            &self,
            _: Request<pb::ClusterStatusRequest>,
        ) -> Res<pb::ClusterStatusReply> {
            no()
        }
        async fn add_member(&self, _: Request<pb::MemberRequest>) -> Res<pb::ClusterStatusReply> {
            no()
        }
        async fn remove_member(
            &self,
            _: Request<pb::MemberRequest>,
        ) -> Res<pb::ClusterStatusReply> {
            no()
        }
        async fn forget_node(&self, _: Request<pb::ForgetNodeRequest>) -> Res<pb::ForgetNodeReply> {
            no()
        }
        async fn register_node(
            &self,
            req: Request<pb::RegisterNodeRequest>,
        ) -> Res<pb::RegisterNodeReply> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(req.into_inner());
            Ok(Response::new(pb::RegisterNodeReply { changed: true }))
        }
    }
}

/// Registrations carry the agent's `--activate-timeout` (coordinators size their calls'
/// deadlines from it), and a reconcile after a service restart reaches the coordinators.
#[test]
fn registration_carries_the_activate_timeout_and_the_reconciled_releases() {
    let tmp = tempfile::tempdir().unwrap();
    let root = switched_root(tmp.path());
    let seen = Registrations::default();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let coordinator = listener.local_addr().unwrap().to_string();
    let svc = orch_proto::control::control_server::ControlServer::new(seen.clone());
    server_rt.spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(orch_tls::incoming(listener)),
    );
    let body = |v: &str, pid: u32| {
        HttpReply::Status(200, format!("{{\"version\":\"{v}\",\"pid\":{pid}}}"))
    };
    let http = HttpServer::start(body("4.2.1", 100));
    let url = http.url();
    let _agent = AgentProc::start(
        "n1",
        &root,
        &[
            "--coordinator",
            coordinator.as_str(),
            "--activate-timeout",
            "75s",
            "--health-url",
            url.as_str(),
        ],
    );
    let last = || {
        seen.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
    };
    let states_of = |r: &orch_proto::control::RegisterNodeRequest| -> Vec<(String, String)> {
        r.versions
            .iter()
            .map(|e| (e.version.clone(), e.state.clone()))
            .collect()
    };
    wait_until(Duration::from_secs(20), "a registration", || {
        last().is_some()
    });
    let first = last().unwrap();
    assert_eq!(first.id, "n1");
    assert_eq!(first.activate_timeout_ms, 75_000);
    assert_eq!(
        states_of(&first),
        vec![
            ("4.2.1".to_string(), "current".to_string()),
            ("4.2.0".to_string(), "permanent".to_string())
        ]
    );
    // The service restarts on its own: the reconciled releases are registered, newer stamped.
    http.set(body("4.2.0", 200));
    wait_until(
        Duration::from_secs(20),
        "the reconciled releases registered",
        || {
            last().is_some_and(|r| {
                states_of(&r)
                    == vec![
                        ("4.2.1".to_string(), "unpacked".to_string()),
                        ("4.2.0".to_string(), "permanent".to_string()),
                    ]
            })
        },
    );
    let after = last().unwrap();
    assert_eq!(after.boot_id, first.boot_id);
    assert!(after.state_rev > first.state_rev, "{after:?}");
}
