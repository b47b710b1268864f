//! The reconciler against a mocked API server (kube's tower-test pattern)
//! and a real Redis. The fake API server keeps the objects it was sent, so
//! a pass sees what the last one left, and logs every request; each test
//! asserts the exact requests of a pass.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::events::Reporter;
use parley_redis::testing::{TestRedis, redis_url};
use serde_json::{Value, json};

use super::*;
use crate::crd::{ChatClusterSpec, DrainPhase, GatewaySpec};

/// A tiny API server: objects by path, and a log of requests.
#[derive(Default)]
struct Fake {
    objects: Mutex<BTreeMap<String, Value>>,
    log: Mutex<Vec<String>>,
    /// Bodies of writes, by log line.
    bodies: Mutex<Vec<(String, Value)>>,
    version: AtomicU64,
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "NotFound", "message": "not found", "code": 404}),
    )
}

impl Fake {
    fn put(&self, path: &str, v: Value) {
        self.objects.lock().unwrap().insert(path.to_owned(), v);
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }

    fn remove(&self, path: &str) {
        self.objects.lock().unwrap().remove(path);
    }

    fn take_log(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clear();
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn body(&self, line: &str) -> Value {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .find(|(l, _)| l == line)
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| panic!("no write {line}"))
    }

    fn stamp(&self, v: &mut Value) {
        let n = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        v["metadata"]["resourceVersion"] = json!(n.to_string());
    }

    fn answer(&self, method: &str, path: &str, content: &str, body: &[u8]) -> (StatusCode, Value) {
        // .../namespaces/<ns>/<plural>[/<name>[/<sub>]], or a cluster-scoped
        // /api/v1/<plural>[/<name>] (nodes)
        let rest = match path.split_once("/namespaces/") {
            Some((_, rest)) => rest.to_owned(),
            None => format!("-/{}", path.trim_start_matches("/api/v1/")),
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let (plural, name, sub) = (
            parts.get(1).copied().unwrap_or(""),
            parts.get(2).copied(),
            parts.get(3).copied(),
        );
        let item = match (name, sub) {
            (Some(_), Some(_)) => path.rsplit_once('/').unwrap().0.to_owned(),
            _ => path.to_owned(),
        };
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body).expect("a JSON body")
        };
        let verb = match (method, content) {
            ("GET", _) if name.is_none() => "LIST",
            ("PATCH", c) if c.contains("apply-patch") => "APPLY",
            ("PATCH", c) if c.contains("merge-patch") => "MERGE",
            ("PATCH", c) if c.contains("json-patch") => "JSONPATCH",
            (m, _) => m,
        };
        let line = match (name, sub) {
            (Some(n), Some(s)) => format!("{verb} {plural}/{n}/{s}"),
            (Some(n), None) => format!("{verb} {plural}/{n}"),
            _ => format!("{verb} {plural}"),
        };
        self.log.lock().unwrap().push(line.clone());
        if !body.is_null() {
            self.bodies.lock().unwrap().push((line, body.clone()));
        }

        let mut objects = self.objects.lock().unwrap();
        match verb {
            "LIST" => {
                let prefix = format!("{path}/");
                let items: Vec<Value> = objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            "GET" => match objects.get(&item) {
                Some(v) => (StatusCode::OK, v.clone()),
                None => not_found(),
            },
            "APPLY" => {
                let mut v = match objects.get(&item) {
                    Some(old) => {
                        let mut merged = old.clone();
                        json_patch::merge(&mut merged, &body);
                        merged
                    }
                    None => body,
                };
                self.stamp(&mut v);
                objects.insert(item, v.clone());
                (StatusCode::OK, v)
            }
            "MERGE" | "JSONPATCH" => {
                let Some(mut v) = objects.get(&item).cloned() else {
                    return not_found();
                };
                if verb == "MERGE" {
                    json_patch::merge(&mut v, &body);
                } else {
                    // Like the API server, a missing path tests equal to null.
                    let ops: Vec<Value> = body
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|op| {
                            !(op["op"] == "test"
                                && op["value"].is_null()
                                && v.pointer(op["path"].as_str().unwrap_or("")).is_none())
                        })
                        .cloned()
                        .collect();
                    let patch: json_patch::Patch =
                        serde_json::from_value(Value::Array(ops)).unwrap();
                    if json_patch::patch(&mut v, &patch).is_err() {
                        return (
                            StatusCode::UNPROCESSABLE_ENTITY,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "Invalid", "message": "test failed", "code": 422}),
                        );
                    }
                }
                self.stamp(&mut v);
                objects.insert(item, v.clone());
                (StatusCode::OK, v)
            }
            "POST" => {
                let mut v = body;
                let name = v["metadata"]["name"].as_str().unwrap_or("x").to_owned();
                self.stamp(&mut v);
                objects.insert(format!("{path}/{name}"), v.clone());
                (StatusCode::CREATED, v)
            }
            "PUT" => {
                let Some(old) = objects.get(&item) else {
                    return not_found();
                };
                if old["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                    return (
                        StatusCode::CONFLICT,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "Conflict", "message": "conflict", "code": 409}),
                    );
                }
                let mut v = body;
                self.stamp(&mut v);
                objects.insert(item, v.clone());
                (StatusCode::OK, v)
            }
            "DELETE" => match objects.remove(&item) {
                Some(v) => (StatusCode::OK, v),
                None => not_found(),
            },
            _ => panic!("unexpected {method} {path}"),
        }
    }
}

/// Serves the fake to a kube client.
fn client(fake: Arc<Fake>) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let content = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let (status, value) =
                fake.answer(parts.method.as_str(), parts.uri.path(), &content, &bytes);
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&value).unwrap()))
                    .unwrap(),
            );
        }
    });
    kube::Client::new(service, "default")
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// A ChatCluster "im" in a namespace of its own, its Redis keys removed
/// when the test ends.
struct Harness {
    fake: Arc<Fake>,
    ctx: Arc<Context>,
    ns: String,
    redis: RedisState,
    _keys: TestRedis,
}

impl Harness {
    fn new(gateway: GatewaySpec) -> Self {
        let ns = parley_core::testing::unique_name("t");
        let mut spec: ChatClusterSpec = serde_json::from_value(json!({
            "postgres": {"url": "postgres://db/parley"},
            "redis": {"url": redis_url()},
            "rabbitmq": {"url": "amqp://mq"},
            "tokenSecret": {"name": "parley", "key": "token-secret"},
            "adminKey": {"name": "parley", "key": "admin-key"},
        }))
        .unwrap();
        spec.gateway = gateway;
        let mut cc = ChatCluster::new("im", spec);
        cc.metadata.namespace = Some(ns.clone());
        cc.metadata.uid = Some("uid-im".into());
        cc.metadata.generation = Some(1);
        let fake = Arc::new(Fake::default());
        let client = client(fake.clone());
        let reporter = Reporter {
            controller: "parley-operator".into(),
            instance: Some("test".into()),
        };
        let mut ctx = Context::new(
            client.clone(),
            Recorder::new(client, reporter),
            Metrics::default(),
        );
        ctx.clock = Clock::at(t0());
        let prefix = desired::prefix(&cc);
        let h = Self {
            redis: RedisState::new(&redis_url(), &prefix).unwrap(),
            _keys: TestRedis {
                url: redis_url(),
                prefix,
            },
            fake,
            ctx: Arc::new(ctx),
            ns,
        };
        h.fake.put(&h.cc_path(), serde_json::to_value(&cc).unwrap());
        h
    }

    fn cc_path(&self) -> String {
        format!(
            "/apis/parley.dev/v1alpha1/namespaces/{}/chatclusters/im",
            self.ns
        )
    }

    fn path(&self, api: &str, plural: &str, name: &str) -> String {
        format!("{api}/namespaces/{}/{plural}/{name}", self.ns)
    }

    fn cc(&self) -> ChatCluster {
        serde_json::from_value(self.fake.get(&self.cc_path()).unwrap()).unwrap()
    }

    /// One pass over the resource as the API server has it; its requests.
    async fn pass(&self) -> Vec<String> {
        self.fake.take_log();
        reconcile(Arc::new(self.cc()), self.ctx.clone())
            .await
            .unwrap_or_else(|e| panic!("reconcile: {e}"));
        self.fake.log.lock().unwrap().clone()
    }

    /// What the Deployment controller and the gateways would do: Deployments
    /// become ready, gateway pods exist and are ready, and each writes its
    /// lease with its count.
    async fn run_pods(&self, counts: &[(&str, u64)]) {
        for name in ["im-gateway", "im-chat"] {
            let path = self.path("/apis/apps/v1", "deployments", name);
            let mut d = self.fake.get(&path).expect("the deployment was applied");
            let replicas = d["spec"]["replicas"].clone();
            d["status"] = json!({"replicas": replicas, "readyReplicas": replicas});
            self.fake.put(&path, d);
        }
        let labels = desired::labels(&self.cc(), "gateway");
        for (i, (name, connections)) in counts.iter().enumerate() {
            let ip = format!("10.0.0.{}", i + 1);
            let path = self.path("/api/v1", "pods", name);
            if self.fake.get(&path).is_none() {
                self.fake.put(
                    &path,
                    json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "namespace": self.ns, "labels": labels},
                        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
                    }),
                );
            }
            self.redis
                .announce(
                    name,
                    &format!("{ip}:7400"),
                    *connections,
                    Duration::from_secs(60),
                    false,
                    true,
                )
                .await
                .unwrap();
        }
    }

    fn status(&self) -> ChatClusterStatus {
        self.cc().status.unwrap_or_default()
    }

    fn later(&self, secs: u64) {
        self.ctx.clock.advance(Duration::from_secs(secs));
    }
}

fn quick_scaling() -> GatewaySpec {
    GatewaySpec {
        min_replicas: 2,
        max_replicas: 5,
        target_connections: 1000,
        scale_down_stabilization_seconds: 0,
        ..GatewaySpec::default()
    }
}

const OBJECTS: [(&str, &str); 8] = [
    ("configmaps", "im-config"),
    ("deployments", "im-chat"),
    ("services", "im-chat"),
    ("services", "im-admin"),
    ("deployments", "im-gateway"),
    ("services", "im-gateway"),
    ("poddisruptionbudgets", "im-gateway"),
    ("poddisruptionbudgets", "im-chat"),
];

/// A pass's requests: every object read (the gateway Deployment first,
/// with the pods), and with `apply` each also written.
fn every_object(apply: bool) -> Vec<String> {
    let mut want = vec![
        "GET deployments/im-gateway".to_owned(),
        "LIST pods".to_owned(),
    ];
    for (plural, name) in OBJECTS {
        if (plural, name) != ("deployments", "im-gateway") {
            want.push(format!("GET {plural}/{name}"));
        }
        if apply {
            want.push(format!("APPLY {plural}/{name}"));
        }
    }
    want
}

/// GET then APPLY for every object, then the first status.
fn creating_everything() -> Vec<String> {
    let mut want = every_object(true);
    want.push("MERGE chatclusters/im/status".to_owned());
    want
}

/// Reads only: the pass of a resource at rest.
fn reading_everything() -> Vec<String> {
    every_object(false)
}

#[tokio::test]
async fn a_new_resource_gets_its_finalizer_then_every_object_and_a_status() {
    let h = Harness::new(GatewaySpec::default());
    assert_eq!(
        h.pass().await,
        vec!["JSONPATCH chatclusters/im"],
        "the finalizer comes first, alone"
    );
    assert_eq!(h.cc().metadata.finalizers, Some(vec![FINALIZER.to_owned()]));

    assert_eq!(h.pass().await, creating_everything());
    let apply = h.fake.body("APPLY deployments/im-gateway");
    assert_eq!(apply["spec"]["replicas"], 2, "the minimum to start with");
    assert_eq!(
        apply["metadata"]["ownerReferences"][0]["uid"], "uid-im",
        "owned by the ChatCluster"
    );
    assert!(apply["metadata"]["annotations"][APPLIED_HASH].is_string());
    let s = h.status();
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(s.gateway.desired_replicas, 2);
    assert_eq!(s.phase, "Pending");
    assert_eq!(s.last_scale.as_ref().map(|l| (l.from, l.to)), Some((0, 2)));
    assert_eq!(s.routing_table.entries, 0);
}

#[tokio::test]
async fn a_resource_at_rest_makes_no_write() {
    let h = Harness::new(GatewaySpec::default());
    h.pass().await;
    h.pass().await;
    h.run_pods(&[("gw-a", 10), ("gw-b", 12)]).await;
    let log = h.pass().await;
    assert!(
        log.contains(&"MERGE chatclusters/im/status".to_owned()),
        "readiness changed: {log:?}"
    );
    let s = h.status();
    assert_eq!(s.phase, "Running");
    assert_eq!(s.gateway.connections, 22);
    assert_eq!(s.routing_table.entries, 2);
    assert_eq!(
        h.redis.routes().await.unwrap(),
        vec![
            ("10.0.0.1:7400".to_owned(), 10.0),
            ("10.0.0.2:7400".to_owned(), 12.0)
        ]
    );

    // Nothing changed: reads only. Counts that move are written at a
    // bounded rate, not on every pass.
    h.later(5);
    assert_eq!(h.pass().await, reading_everything());
    h.run_pods(&[("gw-a", 11), ("gw-b", 12)]).await;
    h.later(5);
    assert_eq!(h.pass().await, reading_everything());
    h.later(status::COUNTS_EVERY.as_secs());
    let mut want = reading_everything();
    want.push("MERGE chatclusters/im/status".to_owned());
    assert_eq!(h.pass().await, want);
    assert_eq!(h.status().gateway.connections, 23);
}

#[tokio::test]
async fn an_owned_object_deleted_or_edited_by_hand_is_put_back() {
    let h = Harness::new(GatewaySpec::default());
    h.pass().await;
    h.pass().await;
    h.run_pods(&[("gw-a", 1), ("gw-b", 1)]).await;
    h.pass().await;

    h.fake.remove(&h.path("/api/v1", "services", "im-gateway"));
    let chat = h.path("/apis/apps/v1", "deployments", "im-chat");
    let mut d = h.fake.get(&chat).unwrap();
    d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("evil:latest");
    h.fake.put(&chat, d);
    h.later(5);
    let mut want = reading_everything();
    let after = |want: &mut Vec<String>, read: &str, write: &str| {
        let i = want.iter().position(|l| l == read).unwrap();
        want.insert(i + 1, write.to_owned());
    };
    after(
        &mut want,
        "GET deployments/im-chat",
        "APPLY deployments/im-chat",
    );
    after(
        &mut want,
        "GET services/im-gateway",
        "APPLY services/im-gateway",
    );
    assert_eq!(h.pass().await, want);
    assert!(
        h.fake
            .get(&h.path("/api/v1", "services", "im-gateway"))
            .is_some()
    );
    assert_ne!(
        h.fake.get(&chat).unwrap()["spec"]["template"]["spec"]["containers"][0]["image"],
        "evil:latest"
    );
    h.later(5);
    assert_eq!(h.pass().await, reading_everything(), "and then at rest");
}

#[tokio::test]
async fn load_scales_the_gateways_up_at_once() {
    let h = Harness::new(quick_scaling());
    h.pass().await;
    h.pass().await;
    h.run_pods(&[("gw-a", 1200), ("gw-b", 1300)]).await;
    h.later(5);
    let log = h.pass().await;
    // 2,500 connections +10% over 1,000 a pod: 3 gateways.
    let mut want = reading_everything();
    want.insert(2, "POST events".to_owned());
    want.insert(
        want.iter()
            .position(|l| l == "GET services/im-gateway")
            .unwrap(),
        "APPLY deployments/im-gateway".to_owned(),
    );
    want.push("MERGE chatclusters/im/status".to_owned());
    assert_eq!(log, want);
    assert_eq!(
        h.fake.body("APPLY deployments/im-gateway")["spec"]["replicas"],
        3
    );
    let event = h.fake.body("POST events");
    assert_eq!(event["reason"], "ScaleUp");
    let s = h.status();
    assert_eq!(s.last_scale.as_ref().map(|l| (l.from, l.to)), Some((2, 3)));
    assert_eq!(s.gateway.desired_replicas, 3);
}

/// Load brings a third gateway (gw-c), then ebbs: after this, the pass
/// that starts gw-c's drain is the next one. (The first step of the
/// scale-down test, shared by the tests of what happens during a drain.)
async fn ebbing_to_two() -> Harness {
    let h = Harness::new(quick_scaling());
    h.pass().await;
    h.pass().await;
    h.run_pods(&[("gw-a", 1200), ("gw-b", 1300)]).await;
    h.later(5);
    h.pass().await;
    h.run_pods(&[("gw-a", 1000), ("gw-b", 900), ("gw-c", 40)])
        .await;
    h.later(5);
    h.pass().await;
    assert_eq!(h.status().phase, "Running");
    h.run_pods(&[("gw-a", 300), ("gw-b", 200), ("gw-c", 40)])
        .await;
    h.later(5);
    h
}

#[tokio::test]
async fn a_scale_down_drains_the_least_loaded_pod_before_it_goes() {
    let h = Harness::new(quick_scaling());
    h.pass().await;
    h.pass().await;
    // Load brings a third gateway; then it ebbs, and two are enough.
    h.run_pods(&[("gw-a", 1200), ("gw-b", 1300)]).await;
    h.later(5);
    h.pass().await;
    h.run_pods(&[("gw-a", 1000), ("gw-b", 900), ("gw-c", 40)])
        .await;
    h.later(5);
    h.pass().await;
    assert_eq!(h.status().phase, "Running");
    h.run_pods(&[("gw-a", 300), ("gw-b", 200), ("gw-c", 40)])
        .await;
    h.later(5);

    // 1. gw-c (least loaded) leaves the routing table; the count stays.
    let log = h.pass().await;
    assert!(
        !log.contains(&"APPLY deployments/im-gateway".to_owned()),
        "{log:?}"
    );
    assert_eq!(h.fake.body("POST events")["reason"], "ScaleDown");
    assert_eq!(
        h.fake.body("APPLY poddisruptionbudgets/im-gateway")["spec"]["maxUnavailable"],
        2,
        "the draining gateway does not use up the budget of node drains"
    );
    let s = h.status();
    assert_eq!(s.gateway.drains.len(), 1);
    assert_eq!(s.gateway.drains[0].pod, "gw-c");
    assert_eq!(s.gateway.drains[0].phase, DrainPhase::Unrouted);
    assert_eq!(s.gateway.desired_replicas, 3);
    let routes: Vec<String> = h
        .redis
        .routes()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(
        routes,
        vec!["10.0.0.2:7400", "10.0.0.1:7400"],
        "gw-c is out"
    );

    // 2. Routes settled: gw-c is asked to move its clients away.
    h.later(5);
    let log = h.pass().await;
    assert!(log.contains(&"POST events".to_owned()));
    assert_eq!(h.fake.body("POST events")["reason"], "Draining");
    let asked = h
        .redis
        .announce(
            "gw-c",
            "10.0.0.3:7400",
            40,
            Duration::from_secs(60),
            false,
            true,
        )
        .await
        .unwrap();
    assert_eq!(asked.drain_rate, Some(500), "the gateway reads the request");
    assert_eq!(h.status().gateway.drains[0].phase, DrainPhase::Moving);

    // 3. While clients move, nothing but the status.
    h.run_pods(&[("gw-a", 320), ("gw-b", 210), ("gw-c", 10)])
        .await;
    h.later(2);
    let log = h.pass().await;
    assert!(
        !log.iter()
            .any(|l| l.starts_with("APPLY") || l.starts_with("POST")),
        "{log:?}"
    );

    // 4. Empty: marked to go first, and only then the count is lowered.
    h.run_pods(&[("gw-a", 330), ("gw-b", 220), ("gw-c", 0)])
        .await;
    h.later(2);
    let log = h.pass().await;
    let mark = log
        .iter()
        .position(|l| l == "MERGE pods/gw-c")
        .expect("gw-c marked");
    let lower = log
        .iter()
        .position(|l| l == "APPLY deployments/im-gateway")
        .expect("count lowered");
    assert!(mark < lower, "{log:?}");
    assert_eq!(
        h.fake.body("MERGE pods/gw-c")["metadata"]["annotations"][DELETION_COST],
        i32::MIN.to_string()
    );
    assert_eq!(
        h.fake.body("APPLY deployments/im-gateway")["spec"]["replicas"],
        2
    );
    assert_eq!(h.fake.body("POST events")["reason"], "Drained");
    assert_eq!(h.status().gateway.drains[0].phase, DrainPhase::Released);
    assert_eq!(
        h.fake.body("APPLY poddisruptionbudgets/im-gateway")["spec"]["maxUnavailable"],
        1,
        "released: the budget is back"
    );

    // 5. The Deployment removed gw-c: the drain is over.
    h.fake.remove(&h.path("/api/v1", "pods", "gw-c"));
    h.run_pods(&[("gw-a", 330), ("gw-b", 220)]).await;
    h.later(2);
    let log = h.pass().await;
    assert!(log.contains(&"MERGE chatclusters/im/status".to_owned()));
    let s = h.status();
    assert!(s.gateway.drains.is_empty());
    assert_eq!(s.gateway.desired_replicas, 2);
    assert_eq!(s.phase, "Running");
}

#[tokio::test]
async fn deleting_the_resource_removes_its_redis_keys_then_the_finalizer() {
    let h = Harness::new(GatewaySpec::default());
    h.pass().await;
    h.pass().await;
    h.run_pods(&[("gw-a", 3), ("gw-b", 4)]).await;
    h.pass().await;
    assert!(!h.redis.routes().await.unwrap().is_empty());

    let mut cc = h.fake.get(&h.cc_path()).unwrap();
    cc["metadata"]["deletionTimestamp"] = json!("2027-01-15T08:00:00Z");
    h.fake.put(&h.cc_path(), cc);
    assert_eq!(h.pass().await, vec!["JSONPATCH chatclusters/im"]);
    assert_eq!(h.cc().metadata.finalizers, Some(vec![]));
    assert!(h.redis.routes().await.unwrap().is_empty());
    assert!(
        h.redis.leases(&["gw-a", "gw-b"]).await.unwrap().is_empty(),
        "every key under the cluster's prefix is gone"
    );
}

#[tokio::test]
async fn one_replica_leads_and_a_silent_leader_is_replaced() {
    let fake = Arc::new(Fake::default());
    let api: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client(fake.clone()), "parley-system");
    let a =
        crate::leader::Elector::new(api.clone(), "parley-operator", "a", Duration::from_secs(15));
    let b = crate::leader::Elector::new(api, "parley-operator", "b", Duration::from_secs(15));
    let now = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap();
    let at = |s: i64| now + k8s_openapi::jiff::SignedDuration::from_secs(s);
    assert!(a.try_lead(at(0)).await.unwrap(), "the first takes it");
    assert!(!b.try_lead(at(1)).await.unwrap(), "the second waits");
    // The leader's clock runs 1,000 s behind: its renewals look long
    // expired by b's clock, yet b judges by how long it has seen the same
    // renewal, not by the time written in it.
    assert!(a.try_lead(at(-995)).await.unwrap(), "the leader renews");
    assert!(
        !b.try_lead(at(19)).await.unwrap(),
        "a renewal just seen is alive, whatever time it names"
    );
    assert!(
        !b.try_lead(at(33)).await.unwrap(),
        "still within the duration since b saw it"
    );
    assert!(
        b.try_lead(at(35)).await.unwrap(),
        "a leader silent for the duration (by b's clock) is replaced"
    );
    assert!(
        !a.try_lead(at(36)).await.unwrap(),
        "and the old one knows it"
    );
    assert_eq!(
        fake.take_log(),
        vec![
            "GET leases/parley-operator",
            "POST leases",
            "GET leases/parley-operator",
            "GET leases/parley-operator",
            "PUT leases/parley-operator",
            "GET leases/parley-operator",
            "GET leases/parley-operator",
            "GET leases/parley-operator",
            "PUT leases/parley-operator",
            "GET leases/parley-operator",
        ]
    );

    // A leader that stops hands the Lease back: the other takes it at
    // once, not a duration later.
    b.release().await;
    assert!(a.try_lead(at(37)).await.unwrap(), "free: taken at once");
    a.release().await;
    a.release().await;
    assert_eq!(
        fake.take_log(),
        vec![
            "GET leases/parley-operator",
            "PUT leases/parley-operator",
            "GET leases/parley-operator",
            "PUT leases/parley-operator",
            "GET leases/parley-operator",
            "PUT leases/parley-operator",
            "GET leases/parley-operator",
        ],
        "the second release finds nothing to hand back"
    );
}

fn published(mode: crate::crd::PublishMode) -> GatewaySpec {
    let mut g = quick_scaling();
    g.publish.mode = mode;
    g
}

/// Puts pod `name` on node `node`, which has the external address `ip`.
fn schedule(h: &Harness, name: &str, node: &str, ip: &str) {
    let path = h.path("/api/v1", "pods", name);
    let mut pod = h.fake.get(&path).unwrap();
    pod["spec"] = json!({"nodeName": node, "containers": []});
    h.fake.put(&path, pod);
    h.fake.put(
        &format!("/api/v1/nodes/{node}"),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
               "status": {"addresses": [{"type": "InternalIP", "address": "10.9.0.1"},
                                        {"type": "ExternalIP", "address": ip}]}}),
    );
}

#[tokio::test]
async fn pod_services_publish_each_gateway_and_go_with_their_pod() {
    let mut spec = published(crate::crd::PublishMode::PodService);
    spec.publish.annotations = BTreeMap::from([(
        "service.beta.kubernetes.io/aws-load-balancer-type".to_owned(),
        "nlb".to_owned(),
    )]);
    let h = Harness::new(spec);
    h.pass().await;
    h.pass().await;
    h.run_pods(&[("gw-a", 10), ("gw-b", 20)]).await;
    let log = h.pass().await;
    for want in [
        "LIST services",
        "MERGE pods/gw-a",
        "APPLY services/gw-a",
        "MERGE pods/gw-b",
        "APPLY services/gw-b",
    ] {
        assert!(log.contains(&want.to_owned()), "{want} in {log:?}");
    }
    let label = h.fake.body("MERGE pods/gw-a");
    assert_eq!(
        label["metadata"]["labels"][crate::publish::POD_LABEL],
        "gw-a"
    );
    let svc = h.fake.body("APPLY services/gw-a");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["selector"][crate::publish::POD_LABEL], "gw-a");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(
        svc["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-type"],
        "nlb"
    );
    assert!(
        h.redis.routes().await.unwrap().is_empty(),
        "no load balancer has an address yet: nothing a client outside could use"
    );

    // gw-a's load balancer gets its address; gw-b's is still on its way.
    let path = h.path("/api/v1", "services", "gw-a");
    let mut svc = h.fake.get(&path).unwrap();
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}});
    h.fake.put(&path, svc);
    let log = h.pass().await;
    assert_eq!(log.last().unwrap(), "MERGE chatclusters/im/status");
    assert_eq!(
        h.redis.routes().await.unwrap(),
        vec![("203.0.113.10:7400".to_owned(), 10.0)]
    );
    assert_eq!(
        h.redis.via("203.0.113.10:7400").await.unwrap().as_deref(),
        Some("10.0.0.1:7400"),
        "the gateway can find its published entry"
    );
    let s = h.status();
    let a = s.gateway.pods.iter().find(|p| p.name == "gw-a").unwrap();
    assert_eq!(a.public_address.as_deref(), Some("203.0.113.10:7400"));
    assert_eq!(
        a.address, "10.0.0.1:7400",
        "the pod's own address stays in view"
    );
    let mut at_rest = reading_everything();
    at_rest.insert(2, "LIST services".to_owned());
    assert_eq!(h.pass().await, at_rest, "a pass at rest only reads");

    // A pod that is gone takes its Service with it.
    h.fake.remove(&h.path("/api/v1", "pods", "gw-b"));
    let log = h.pass().await;
    assert!(log.contains(&"DELETE services/gw-b".to_owned()), "{log:?}");
    assert!(h.fake.get(&h.path("/api/v1", "services", "gw-b")).is_none());
    assert!(
        h.fake
            .get(&h.path("/api/v1", "services", "im-gateway"))
            .is_some()
    );

    // Back to one shared Service: the per-pod ones go.
    let mut cc = h.cc();
    cc.spec.gateway.publish.mode = crate::crd::PublishMode::Shared;
    h.fake.put(&h.cc_path(), serde_json::to_value(&cc).unwrap());
    let log = h.pass().await;
    assert!(log.contains(&"DELETE services/gw-a".to_owned()), "{log:?}");
    assert_eq!(h.redis.routes().await.unwrap()[0].0, "10.0.0.1:7400");
    let log = h.pass().await;
    assert_eq!(log, reading_everything(), "and then nothing more");
}

#[tokio::test]
async fn node_ports_and_host_ports_publish_the_nodes_addresses() {
    let mut spec = published(crate::crd::PublishMode::PodService);
    spec.publish.pod_service_type = crate::crd::PodServiceType::NodePort;
    let h = Harness::new(spec);
    h.pass().await;
    h.pass().await;
    h.run_pods(&[("gw-a", 5)]).await;
    schedule(&h, "gw-a", "n1", "198.51.100.7");
    let log = h.pass().await;
    assert!(log.contains(&"LIST nodes".to_owned()), "{log:?}");
    assert_eq!(
        h.fake.body("APPLY services/gw-a")["spec"]["type"],
        "NodePort"
    );
    // The API server picks the node port.
    let path = h.path("/api/v1", "services", "gw-a");
    let mut svc = h.fake.get(&path).unwrap();
    svc["spec"]["ports"][0]["nodePort"] = json!(31001);
    h.fake.put(&path, svc);
    h.pass().await;
    assert_eq!(
        h.redis.routes().await.unwrap(),
        vec![("198.51.100.7:31001".to_owned(), 5.0)]
    );

    let h = Harness::new(published(crate::crd::PublishMode::HostPort));
    h.pass().await;
    h.pass().await;
    let gateway = h.fake.body("APPLY deployments/im-gateway");
    let ports = &gateway["spec"]["template"]["spec"]["containers"][0]["ports"];
    let tcp = ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "tcp")
        .unwrap();
    assert_eq!(tcp["hostPort"], 7400);
    h.run_pods(&[("gw-a", 5)]).await;
    schedule(&h, "gw-a", "n1", "198.51.100.7");
    let log = h.pass().await;
    assert!(
        !log.iter().any(|l| l.starts_with("APPLY services/gw")),
        "no Service per pod: {log:?}"
    );
    assert_eq!(
        h.redis.routes().await.unwrap(),
        vec![("198.51.100.7:7400".to_owned(), 5.0)]
    );
}

#[tokio::test]
async fn after_a_scale_up_the_busiest_gateways_hand_clients_on_once_per_period() {
    let mut spec = quick_scaling();
    spec.min_replicas = 3;
    spec.target_connections = 10_000;
    spec.rebalance = Some(crate::crd::RebalanceSpec {
        clients_per_second: 20,
        tolerance_percent: 10,
        period_seconds: 30,
    });
    let h = Harness::new(spec);
    h.pass().await;
    h.pass().await;
    // Two full gateways and one that just joined.
    h.run_pods(&[("gw-a", 900), ("gw-b", 900), ("gw-c", 0)])
        .await;
    let log = h.pass().await;
    assert!(log.contains(&"POST events".to_owned()), "{log:?}");
    assert_eq!(h.fake.body("POST events")["reason"], "Rebalancing");
    let ttl = Duration::from_secs(60);
    for gw in ["gw-a", "gw-b"] {
        let asked = h
            .redis
            .announce(gw, "10.0.0.1:7400", 900, ttl, false, true)
            .await
            .unwrap();
        assert_eq!(
            asked.shed,
            Some((300, 10)),
            "{gw}: its surplus over the mean"
        );
        assert_eq!(asked.drain_rate, None, "handing on is no drain");
    }
    let asked = h
        .redis
        .announce("gw-c", "10.0.0.3:7400", 0, ttl, false, true)
        .await
        .unwrap();
    assert_eq!(asked.shed, None, "the new gateway only receives");

    // Within the period nothing more is asked, whatever the counts say.
    h.later(10);
    let log = h.pass().await;
    assert!(!log.contains(&"POST events".to_owned()), "{log:?}");
    // Once evened out, nothing either.
    h.later(30);
    h.run_pods(&[("gw-a", 610), ("gw-b", 600), ("gw-c", 590)])
        .await;
    let log = h.pass().await;
    assert!(!log.contains(&"POST events".to_owned()), "{log:?}");
}

#[tokio::test]
async fn switching_back_to_shared_removes_pod_services_that_never_got_an_address() {
    let h = Harness::new(published(crate::crd::PublishMode::PodService));
    h.pass().await;
    h.pass().await;
    h.run_pods(&[("gw-a", 10)]).await;
    h.pass().await;
    assert!(h.fake.get(&h.path("/api/v1", "services", "gw-a")).is_some());
    // No load balancer ever got an address (a quota, say): back to Shared.
    let mut cc = h.cc();
    cc.spec.gateway.publish.mode = crate::crd::PublishMode::Shared;
    h.fake.put(&h.cc_path(), serde_json::to_value(&cc).unwrap());
    let log = h.pass().await;
    assert!(log.contains(&"DELETE services/gw-a".to_owned()), "{log:?}");
    assert_eq!(
        h.pass().await,
        reading_everything(),
        "and then nothing more"
    );
}

/// `spec.push` brings the push senders' Deployment, its readiness shows in
/// the status, and taking `spec.push` away removes the Deployment.
#[tokio::test]
async fn push_senders_come_and_go_with_spec_push() {
    let h = Harness::new(GatewaySpec::default());
    h.pass().await;
    let mut cc = h.fake.get(&h.cc_path()).unwrap();
    cc["spec"]["push"] = json!({
        "replicas": 2,
        "webhook": {"url": "https://push.example.com/hook", "secret": {"name": "push", "key": "hook"}},
    });
    h.fake.put(&h.cc_path(), cc);
    let log = h.pass().await;
    assert!(
        log.contains(&"APPLY deployments/im-push".to_owned()),
        "{log:?}"
    );
    let apply = h.fake.body("APPLY deployments/im-push");
    assert_eq!(apply["spec"]["replicas"], 2);
    assert_eq!(
        apply["metadata"]["ownerReferences"][0]["uid"], "uid-im",
        "owned by the ChatCluster"
    );
    let push = h.status().push.expect("the senders in the status");
    assert_eq!((push.desired_replicas, push.ready_replicas), (2, 0));

    // Ready, then at rest: read, not written again.
    let path = h.path("/apis/apps/v1", "deployments", "im-push");
    let mut d = h.fake.get(&path).unwrap();
    d["status"] = json!({"replicas": 2, "readyReplicas": 2});
    h.fake.put(&path, d);
    let log = h.pass().await;
    assert!(
        !log.contains(&"APPLY deployments/im-push".to_owned()),
        "{log:?}"
    );
    assert_eq!(h.status().push.map(|p| p.ready_replicas), Some(2));

    // Asked for no more: deleted, and gone from the status.
    let mut cc = h.fake.get(&h.cc_path()).unwrap();
    cc["spec"].as_object_mut().unwrap().remove("push");
    h.fake.put(&h.cc_path(), cc);
    let log = h.pass().await;
    assert!(
        log.contains(&"DELETE deployments/im-push".to_owned()),
        "{log:?}"
    );
    assert!(h.fake.get(&path).is_none());
    assert_eq!(h.status().push, None);
    let log = h.pass().await;
    assert!(
        !log.iter().any(|r| r.contains("im-push")),
        "nothing more to do with it: {log:?}"
    );
}

#[test]
fn a_cluster_that_keeps_failing_waits_longer_each_time() {
    let waits: Vec<u64> = (1..=9)
        .map(|n| super::retry_after(n).as_millis() as u64)
        .collect();
    for (n, (w, base)) in waits
        .iter()
        .zip([5u64, 10, 20, 40, 80, 160, 300, 300, 300])
        .enumerate()
    {
        let base = base * 1000;
        assert!(
            (base * 9 / 10..=base * 11 / 10).contains(w),
            "failure {}: {w} ms, not {base} ms give or take a tenth",
            n + 1
        );
    }
}

/// Load comes back while a gateway waits to drain, before it was asked to
/// move its clients: it serves again (back in the routing table at once)
/// and stands for the gateway the load wants, instead of a new pod coming
/// while it still drains.
#[tokio::test]
async fn a_scale_up_during_a_drain_keeps_the_draining_gateway() {
    let h = Box::pin(ebbing_to_two()).await;
    h.pass().await;
    let s = h.status();
    assert_eq!(s.gateway.drains.len(), 1, "gw-c waits to drain");
    assert_eq!(s.gateway.drains[0].phase, DrainPhase::Unrouted);

    // The load is back: three gateways are wanted again.
    h.run_pods(&[("gw-a", 1200), ("gw-b", 1100), ("gw-c", 40)])
        .await;
    h.later(1);
    let log = h.pass().await;
    assert_eq!(h.fake.body("POST events")["reason"], "DrainCancelled");
    assert!(
        !log.contains(&"APPLY deployments/im-gateway".to_owned()),
        "no fourth pod: {log:?}"
    );
    let s = h.status();
    assert!(s.gateway.drains.is_empty());
    assert_eq!(s.gateway.desired_replicas, 3);
    let routes = h.redis.routes().await.unwrap();
    assert_eq!(routes.len(), 3, "gw-c is routed again: {routes:?}");
}

/// Redis goes away while a gateway waits to be asked to drain: the pass
/// still applies the objects and writes the status (Degraded, saying
/// why), the drain waits in its first step, and it is asked for once
/// Redis is back.
#[tokio::test]
async fn a_drain_waits_for_redis_and_the_pass_goes_on_without_it() {
    let h = Box::pin(ebbing_to_two()).await;
    h.pass().await;
    assert_eq!(h.status().gateway.drains[0].phase, DrainPhase::Unrouted);

    // Redis unreachable, and a spec change to apply meanwhile.
    let mut cc = h.fake.get(&h.cc_path()).unwrap();
    let good = cc["spec"]["redis"]["url"].clone();
    cc["spec"]["redis"]["url"] = json!("redis://127.0.0.1:1/");
    cc["spec"]["chat"]["replicas"] = json!(3);
    h.fake.put(&h.cc_path(), cc);
    h.later(6);
    let log = h.pass().await;
    assert!(
        log.contains(&"APPLY deployments/im-chat".to_owned()),
        "the spec change is applied: {log:?}"
    );
    let s = h.status();
    assert_eq!(
        s.gateway.drains[0].phase,
        DrainPhase::Unrouted,
        "not asked yet"
    );
    let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "RoutingTableFailed");

    // Redis is back: the drain is asked for.
    let mut cc = h.fake.get(&h.cc_path()).unwrap();
    cc["spec"]["redis"]["url"] = good;
    h.fake.put(&h.cc_path(), cc);
    h.later(1);
    h.pass().await;
    assert_eq!(h.status().gateway.drains[0].phase, DrainPhase::Moving);
    assert_eq!(h.fake.body("POST events")["reason"], "Draining");
}
