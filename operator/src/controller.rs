//! The reconciler: one pass turns a ChatCluster and what the cluster looks
//! like into the owned objects, the routing table, the gateway count with
//! its drains, Events and the status.
//!
//! Order within a pass matters:
//! 1. The finalizer is in place before anything is created, so the Redis
//!    keys made for the cluster are removed when it is deleted.
//! 2. Drains advance before the scaling decision, so a pod that was just
//!    released no longer counts, and a pod being drained is never chosen
//!    twice.
//! 3. The routing table is written before a new drain's gateway is asked
//!    to move anyone, and a released pod is marked to go first before the
//!    Deployment's count is lowered, so the Deployment removes exactly it.
//! 4. Objects are applied only when they differ from what the API server
//!    holds (a second pass with nothing changed writes nothing), and the
//!    status only on a meaningful change or at a bounded rate.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::{Resource, ResourceExt};
use parley_redis::RedisState;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::crd::{
    Backend, ChatCluster, ChatClusterStatus, GatewayPodStatus, PodServiceType, PublishMode,
    ScaleDecisionStatus,
};
use crate::desired::{self, MANAGER};
use crate::drains::{self, DrainPolicy, Step};
use crate::metrics::Metrics;
use crate::publish;
use crate::rebalance;
use crate::routing::{self, GatewayPod};
use crate::scaling::{self, History, Policy};
use crate::status::{self, Observed};

/// The finalizer that removes the cluster's Redis keys.
pub const FINALIZER: &str = "parley.dev/cleanup";
/// Marks what the operator last applied, so a removed field is noticed.
pub const APPLIED_HASH: &str = "parley.dev/applied-hash";
/// The pod annotation that makes a ReplicaSet remove a pod first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Between passes: how fresh the routing table's counts are.
pub const EVERY: Duration = Duration::from_secs(5);
/// A cleanup that cannot reach Redis gives up after this long, so a Redis
/// that is gone for good cannot block the deletion forever.
pub const CLEANUP_PATIENCE: Duration = Duration::from_secs(300);

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("redis: {0}")]
    Redis(#[from] parley_core::ChatError),
    #[error("{0}")]
    Config(String),
    #[error("finalizer: {0}")]
    Finalizer(Box<finalizer::Error<Error>>),
    #[error("the pass took longer than {0:?}; it is tried again")]
    Deadline(std::time::Duration),
}

/// The time, from the system or set by a test.
#[derive(Debug, Default)]
pub struct Clock {
    fixed: Mutex<Option<SystemTime>>,
}

impl Clock {
    pub fn at(t: SystemTime) -> Self {
        Self {
            fixed: Mutex::new(Some(t)),
        }
    }

    pub fn now(&self) -> SystemTime {
        self.fixed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(SystemTime::now)
    }

    /// Moves a fixed clock on.
    pub fn advance(&self, by: Duration) {
        if let Some(t) = self
            .fixed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            *t += by;
        }
    }
}

/// What the operator remembers of one ChatCluster between passes. Lost on
/// a restart or a change of leader: the stabilization window then starts
/// over from the count running (`scaling::seed`); drains live in the
/// status.
#[derive(Debug, Default)]
struct Memory {
    history: History,
    /// The status last written, and when.
    status: Option<ChatClusterStatus>,
    written: Option<SystemTime>,
    /// When the last rebalancing round was asked for.
    rebalanced: Option<SystemTime>,
    /// A pass ran in a published mode since per-pod Services were last
    /// cleaned up: a switch back to `Shared` must look for them even when
    /// no pod ever got a public address.
    published: bool,
    /// Passes failed in a row, for the error policy's backoff.
    failures: u32,
}

/// What every pass shares.
pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub clock: Clock,
    /// Between taking a pod out of the routing table and asking it to move.
    pub settle: Duration,
    memory: Mutex<HashMap<String, Memory>>,
    redis: Mutex<HashMap<(String, String), RedisState>>,
}

impl Context {
    pub fn new(client: kube::Client, recorder: Recorder, metrics: Metrics) -> Self {
        Self {
            client,
            recorder,
            metrics,
            clock: Clock::default(),
            settle: Duration::from_secs(5),
            memory: Mutex::default(),
            redis: Mutex::default(),
        }
    }

    fn redis(&self, url: &str, prefix: &str) -> Result<RedisState, Error> {
        let mut cache = self.redis.lock().unwrap_or_else(|e| e.into_inner());
        let key = (url.to_owned(), prefix.to_owned());
        if let Some(r) = cache.get(&key) {
            return Ok(r.clone());
        }
        let r = RedisState::new(url, prefix)?;
        cache.insert(key, r.clone());
        Ok(r)
    }

    fn memory_key(cc: &ChatCluster) -> String {
        format!("{}/{}", cc.namespace().unwrap_or_default(), cc.name_any())
    }

    fn remember<T>(&self, cc: &ChatCluster, f: impl FnOnce(&mut Memory) -> T) -> T {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        f(memory.entry(Self::memory_key(cc)).or_default())
    }

    fn forget(&self, cc: &ChatCluster) {
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&Self::memory_key(cc));
    }

    async fn event(&self, cc: &ChatCluster, kind: EventType, reason: &str, note: String) {
        // A backend's URL in an error may carry its password.
        let note = parley_core::redact_urls(&note);
        tracing::info!(
            cluster = %cc.name_any(),
            namespace = cc.namespace().unwrap_or_default(),
            reason,
            %note,
            "event"
        );
        let ev = KubeEvent {
            type_: kind,
            reason: reason.to_owned(),
            note: Some(note),
            action: reason.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &cc.object_ref(&())).await {
            tracing::warn!(error = %e, "event not recorded");
        }
    }
}

/// One pass over `cc`; the controller calls it on every change and every
/// [`EVERY`].
pub async fn reconcile(
    cc: Arc<ChatCluster>,
    ctx: Arc<Context>,
) -> Result<kube::runtime::controller::Action, Error> {
    let started = Instant::now();
    let ns = cc
        .namespace()
        .ok_or_else(|| Error::Config("a ChatCluster is namespaced".into()))?;
    let api: Api<ChatCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let cc_key = cc.clone();
    let result = finalizer::finalizer(&api, FINALIZER, cc, |event| async {
        match event {
            Finalizer::Apply(cc) => apply(&cc, &ctx).await,
            Finalizer::Cleanup(cc) => cleanup(&cc, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(started.elapsed(), result.is_ok());
    if result.is_ok() {
        ctx.remember(&cc_key, |m| m.failures = 0);
    }
    result
}

/// `d` give or take a tenth, so that passes of many ChatClusters started
/// together do not stay in step.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.9..=1.1))
}

/// What the controller does after a failed pass: try again, after a wait
/// that doubles with each failure of that ChatCluster in a row (5 s up to
/// 5 minutes, with jitter), so that one that keeps failing does not take
/// the operator's time from the others.
pub fn error_policy(
    cc: Arc<ChatCluster>,
    error: &Error,
    ctx: Arc<Context>,
) -> kube::runtime::controller::Action {
    let failures = ctx.remember(&cc, |m| {
        m.failures = m.failures.saturating_add(1);
        m.failures
    });
    let wait = retry_after(failures);
    tracing::warn!(
        cluster = %cc.name_any(),
        error = %parley_core::redact_urls(&error.to_string()),
        failures,
        retry_in_secs = wait.as_secs(),
        "reconcile failed"
    );
    kube::runtime::controller::Action::requeue(wait)
}

/// The wait before the next pass after `failures` failed in a row.
fn retry_after(failures: u32) -> Duration {
    let base = Duration::from_secs(5).saturating_mul(1 << failures.saturating_sub(1).min(6));
    jittered(base.min(Duration::from_secs(300)))
}

/// A backend's URL, from the resource or its Secret.
async fn backend_url(
    client: &kube::Client,
    ns: &str,
    what: &str,
    b: &Backend,
) -> Result<String, Error> {
    match (&b.url, &b.secret_ref) {
        (Some(url), None) => Ok(url.clone()),
        (_, Some(r)) => {
            let secret = Api::<Secret>::namespaced(client.clone(), ns)
                .get_opt(&r.name)
                .await?
                .ok_or_else(|| Error::Config(format!("{what}: Secret {} not found", r.name)))?;
            let bytes = secret
                .data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .ok_or_else(|| {
                    Error::Config(format!("{what}: Secret {} has no key {}", r.name, r.key))
                })?;
            String::from_utf8(bytes.0.clone())
                .map(|s| s.trim().to_owned())
                .map_err(|_| {
                    Error::Config(format!(
                        "{what}: Secret {} key {} is not UTF-8",
                        r.name, r.key
                    ))
                })
        }
        (None, None) => Err(Error::Config(format!("{what}: give url or secretRef"))),
    }
}

/// A stable hash of what is applied (FNV-1a over its JSON).
fn hash_of(v: &Value) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Whether every field of `want` has the same value in `have`. Arrays must
/// match element by element; the API server's defaults and other managers'
/// fields in `have` do not matter.
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| contains(hv, wv))),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(hv, wv)| contains(hv, wv))
        }
        (Value::Number(h), Value::Number(w)) => h.as_f64() == w.as_f64(),
        (h, w) => h == w,
    }
}

/// Applies `object` with server-side apply unless the API server already
/// holds it as desired (same applied hash, every field in place). Returns
/// the object as the API server has it, and whether it was written.
async fn ensure<K>(api: &Api<K>, object: &K) -> Result<(K, bool), Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let have = api.get_opt(&object.name_any()).await?;
    ensure_known(api, object, have).await
}

/// [`ensure`], with the object as the API server has it already read.
async fn ensure_known<K>(api: &Api<K>, object: &K, have: Option<K>) -> Result<(K, bool), Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object.name_any();
    let mut object = object.clone();
    let hash = hash_of(&serde_json::to_value(&object).map_err(kube::Error::SerdeError)?);
    object
        .annotations_mut()
        .insert(APPLIED_HASH.to_owned(), hash.clone());
    let want = serde_json::to_value(&object).map_err(kube::Error::SerdeError)?;
    if let Some(have) = have {
        let same = have.annotations().get(APPLIED_HASH) == Some(&hash)
            && contains(
                &serde_json::to_value(&have).map_err(kube::Error::SerdeError)?,
                &want,
            );
        if same {
            return Ok((have, false));
        }
    }
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
    Ok((applied, true))
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pass proper, with the finalizer in place.
async fn apply(
    cc: &ChatCluster,
    ctx: &Context,
) -> Result<kube::runtime::controller::Action, Error> {
    let now = ctx.clock.now();
    let ns = cc.namespace().unwrap_or_default();
    let client = &ctx.client;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let g = &cc.spec.gateway;

    let old = ctx
        .remember(cc, |m| m.status.clone())
        .or_else(|| cc.status.clone())
        .unwrap_or_default();

    // What runs now.
    let gateway_name = desired::gateway_name(cc);
    let existing = deployments.get_opt(&gateway_name).await?;
    let replicas_now = existing
        .as_ref()
        .and_then(|d| d.spec.as_ref()?.replicas)
        .map(|r| r.max(0) as u32);
    let pods = pods_api
        .list(&ListParams::default().labels(&desired::gateway_selector(cc)))
        .await?
        .items;

    // Where clients outside the cluster reach each pod (published modes).
    let had_public = old.gateway.pods.iter().any(|p| p.public_address.is_some())
        || ctx.remember(cc, |m| m.published);
    let public = publish_pods(cc, ctx, &pods, had_public).await;
    if public.is_ok() {
        let published = cc.spec.gateway.publish.mode != PublishMode::Shared;
        ctx.remember(cc, |m| m.published = published);
    }

    // Counts and addresses from the gateways' leases.
    let redis = match backend_url(client, &ns, "redis", &cc.spec.redis).await {
        Ok(url) => ctx
            .redis(&url, &desired::prefix(cc))
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let names: Vec<&str> = pods
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    let leases = match &redis {
        Ok(r) => r.leases(&names).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    let draining_before: Vec<&str> = old.gateway.drains.iter().map(|d| d.pod.as_str()).collect();
    let observed: Vec<GatewayPod> = pods
        .iter()
        .map(|p| GatewayPod {
            name: p.name_any(),
            ready: ready(p),
            terminating: p.metadata.deletion_timestamp.is_some(),
            draining: draining_before.contains(&p.name_any().as_str()),
        })
        .collect();
    let loads = routing::loads(&observed, leases.as_deref().unwrap_or_default());
    let pod_loads: Vec<scaling::PodLoad> = loads.iter().map(|(l, _)| l.clone()).collect();

    // Drains in progress move on.
    let drain_policy = DrainPolicy {
        settle: ctx.settle,
        rate: g.drain_rate_per_second.max(1) as u32,
        timeout: Duration::from_secs(g.drain_timeout_seconds.max(1) as u64),
        release_grace: Duration::from_secs(60),
    };
    let unreleased_before = drains::unreleased(&old.gateway.drains);
    let (mut drains, steps) = drains::advance(&old.gateway.drains, &pod_loads, &drain_policy, now);

    // How many gateways, and which go.
    let current = replicas_now.map_or(0, |r| r.saturating_sub(unreleased_before));
    let policy = Policy::from(g);
    // The last scale-down the status recorded, for a fresh memory.
    let last_down = old
        .last_scale
        .as_ref()
        .filter(|l| l.to < l.from && l.at.is_some())
        .map(|l| now - status::since(l.at.as_ref(), now));
    let decision = ctx.remember(cc, |m| {
        scaling::seed(&mut m.history, current, last_down, now);
        scaling::decide(&policy, current, &pod_loads, &mut m.history, now)
    });
    let scale_limited = scaling::limited(&policy, &pod_loads);
    let mut last_scale = None;
    if decision.replicas != current {
        let up = decision.replicas > current;
        ctx.metrics.scaled(up);
        last_scale = Some(ScaleDecisionStatus {
            from: current as i32,
            to: decision.replicas as i32,
            reason: decision.reason.clone(),
            at: Some(status::time(now)),
        });
        if replicas_now.is_some() {
            let reason = if up { "ScaleUp" } else { "ScaleDown" };
            let note = if decision.remove.is_empty() {
                decision.reason.clone()
            } else {
                format!(
                    "{}; draining {}",
                    decision.reason,
                    decision.remove.join(", ")
                )
            };
            ctx.event(cc, EventType::Normal, reason, note).await;
        }
    }
    // A scale-up while gateways wait to drain and have not been asked to
    // move their clients yet: those serve again first, each one of the
    // gateways wanted (no new pod for it), and go back in the routing
    // table in this very pass.
    if decision.replicas > current {
        let mut wanted = decision.replicas - current;
        let mut cancelled = Vec::new();
        drains.retain(|d| {
            if wanted > 0 && d.phase == crate::crd::DrainPhase::Unrouted {
                wanted -= 1;
                cancelled.push(d.pod.clone());
                false
            } else {
                true
            }
        });
        if !cancelled.is_empty() {
            ctx.event(
                cc,
                EventType::Normal,
                "DrainCancelled",
                format!("serving again for the scale-up: {}", cancelled.join(", ")),
            )
            .await;
        }
    }
    for pod in &decision.remove {
        let remaining = pod_loads
            .iter()
            .find(|p| &p.name == pod)
            .and_then(|p| p.connections);
        drains.push(drains::start(pod, remaining, now));
    }

    // The routing table: draining pods are out from the first moment.
    let draining_now: Vec<&str> = drains.iter().map(|d| d.pod.as_str()).collect();
    let routed: Vec<(scaling::PodLoad, Option<String>)> = loads
        .iter()
        .cloned()
        .map(|(mut l, a)| {
            l.draining = draining_now.contains(&l.name.as_str());
            (l, a)
        })
        .collect();
    let routing = match (&redis, &leases, &public) {
        (_, _, Err(e)) => Err(format!("gateway addresses not published: {e}")),
        (Ok(r), Ok(_), Ok(public)) => {
            let table = match cc.spec.gateway.publish.mode {
                PublishMode::Shared => routing::entries(&routed),
                _ => routing::entries(&routing::published(&routed, public)),
            };
            let via = routing::via(&routed, public);
            match r.replace_routes(&table, &via).await {
                Ok(()) => {
                    ctx.metrics.routing_written();
                    Ok(table.len() as i32)
                }
                Err(e) => Err(e.to_string()),
            }
        }
        (Err(e), _, _) | (_, Err(e), _) => Err(e.clone()),
    };

    // Drain steps, in order: ask, mark, delete.
    for step in &steps {
        match step {
            Step::Ask { pod, rate, ttl } => {
                let asked = match &redis {
                    Ok(r) => r
                        .request_drain(pod, *rate, *ttl)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.clone()),
                };
                match asked {
                    Ok(()) => {
                        ctx.event(
                            cc,
                            EventType::Normal,
                            "Draining",
                            format!("asked {pod} to move its clients away at {rate}/s"),
                        )
                        .await;
                    }
                    // The gateway reads the request in Redis: the drain
                    // waits in its first step (asked again next pass; its
                    // timeout still runs), and the rest of the pass goes on.
                    Err(e) => {
                        tracing::warn!(
                            cluster = %cc.name_any(),
                            pod,
                            error = %parley_core::redact_urls(&e),
                            "drain not asked for: Redis unreachable; waiting"
                        );
                        if let Some(d) = drains.iter_mut().find(|d| &d.pod == pod) {
                            d.phase = crate::crd::DrainPhase::Unrouted;
                        }
                    }
                }
            }
            Step::Release { pod, timed_out } => {
                let patch =
                    json!({"metadata": {"annotations": {DELETION_COST: i32::MIN.to_string()}}});
                match pods_api
                    .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                ctx.metrics.drained(*timed_out);
                if *timed_out {
                    ctx.event(
                        cc,
                        EventType::Warning,
                        "DrainTimeout",
                        format!(
                            "{pod} still had clients after {}s; removing it anyway",
                            drain_policy.timeout.as_secs()
                        ),
                    )
                    .await;
                } else {
                    ctx.event(
                        cc,
                        EventType::Normal,
                        "Drained",
                        format!("{pod} holds no clients; removing it"),
                    )
                    .await;
                }
            }
            Step::Delete { pod } => {
                match pods_api.delete(pod, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                ctx.event(
                    cc,
                    EventType::Warning,
                    "DrainedPodKept",
                    format!("the Deployment kept drained {pod}; deleting it"),
                )
                .await;
            }
            Step::Done { .. } => {}
        }
    }

    // Rebalancing, while the count holds and nothing drains: the busiest
    // gateways hand clients on to the others.
    if let (Some(spec), Ok(r)) = (&g.rebalance, &redis)
        && drains.is_empty()
        && decision.replicas == current
    {
        let policy = rebalance::Rebalance::from(spec);
        // Only the gateways clients can be sent to take part: in published
        // modes, those with a public address.
        let serving: Vec<scaling::PodLoad> = routed
            .iter()
            .filter(|(l, _)| match (&public, cc.spec.gateway.publish.mode) {
                (_, PublishMode::Shared) => true,
                (Ok(p), _) => p.contains_key(&l.name),
                (Err(_), _) => false,
            })
            .map(|(l, _)| l.clone())
            .collect();
        let last = ctx.remember(cc, |m| m.rebalanced);
        let round = rebalance::plan(&policy, &serving, last, now);
        if !round.is_empty() {
            ctx.remember(cc, |m| m.rebalanced = Some(now));
            for s in &round {
                if let Err(e) = r.request_shed(&s.pod, s.count, s.rate, policy.period).await {
                    tracing::warn!(error = %e, pod = %s.pod, "rebalancing request not written");
                }
            }
            let asked: Vec<String> = round
                .iter()
                .map(|s| format!("{} {} at {}/s", s.pod, s.count, s.rate))
                .collect();
            ctx.event(
                cc,
                EventType::Normal,
                "Rebalancing",
                format!("asked gateways to hand clients on: {}", asked.join(", ")),
            )
            .await;
        }
    }

    // The owned objects, the gateway count including pods still draining.
    let draining = drains::unreleased(&drains) as i32;
    let gateway_replicas = decision.replicas as i32 + draining;
    let applied = apply_objects(cc, ctx, gateway_replicas, draining, existing).await;
    let (gateway_ready, chat, push, apply_error) = match applied {
        Ok((gw, chat, push)) => (ready_replicas(&gw), Some(chat), push, None),
        Err(e) => {
            ctx.event(cc, EventType::Warning, "ApplyFailed", e.to_string())
                .await;
            (0, None, None, Some(e.to_string()))
        }
    };

    // The status.
    let pods_status: Vec<GatewayPodStatus> = routed
        .iter()
        .map(|(l, address)| GatewayPodStatus {
            name: l.name.clone(),
            address: address.clone().unwrap_or_default(),
            public_address: public.as_ref().ok().and_then(|p| p.get(&l.name).cloned()),
            connections: l.connections.unwrap_or(0) as i64,
            ready: l.ready,
            state: status::pod_state(l.terminating, l.draining),
        })
        .collect();
    let seen = Observed {
        generation: cc.metadata.generation,
        gateway_desired: gateway_replicas,
        gateway_ready,
        selector: desired::gateway_selector(cc),
        pods: pods_status,
        drains,
        chat_desired: cc.spec.chat.replicas,
        chat_ready: chat.as_ref().map_or(0, ready_replicas),
        push: cc
            .spec
            .push
            .as_ref()
            .map(|p| (p.replicas, push.as_ref().map_or(0, ready_replicas))),
        routing,
        last_scale,
        apply_error,
        scale_limited,
    };
    let new = status::compute(&old, &seen, now);
    let written = ctx.remember(cc, |m| m.written);
    if status::needs_write(&old, &new, written, now) {
        let api: Api<ChatCluster> = Api::namespaced(client.clone(), &ns);
        let mut body = json!({ "status": new });
        if new.push.is_none() {
            // A merge patch removes a field only when told to.
            body["status"]["push"] = serde_json::Value::Null;
        }
        api.patch_status(&cc.name_any(), &PatchParams::default(), &Patch::Merge(body))
            .await?;
        ctx.remember(cc, |m| {
            m.status = Some(new.clone());
            m.written = Some(now);
        });
    } else {
        ctx.remember(cc, |m| m.status = Some(old.clone()));
    }
    let every = if new.gateway.drains.is_empty() {
        EVERY
    } else {
        Duration::from_secs(2)
    };
    Ok(kube::runtime::controller::Action::requeue(jittered(every)))
}

/// Applies what the publish mode needs (a Service per pod, the label that
/// selects it; Services of pods that are gone deleted) and reads back where
/// each pod is reached from outside the cluster. `Shared` costs no request
/// unless pods had public addresses before (the mode just changed, and
/// their Services go).
async fn publish_pods(
    cc: &ChatCluster,
    ctx: &Context,
    pods: &[Pod],
    had_public: bool,
) -> Result<BTreeMap<String, String>, Error> {
    let p = &cc.spec.gateway.publish;
    if p.mode == PublishMode::Shared && !had_public {
        return Ok(BTreeMap::new());
    }
    let ns = cc.namespace().unwrap_or_default();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let labels = format!(
        "app.kubernetes.io/component={},app.kubernetes.io/instance={}",
        publish::COMPONENT,
        cc.name_any()
    );
    let listed: Vec<Service> = services
        .list(&ListParams::default().labels(&labels))
        .await?
        .items
        .into_iter()
        .filter(|s| publish::is_pod_service(cc, s))
        .collect();
    let names: Vec<&str> = pods
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    for name in publish::stale_services(cc, &listed, &names) {
        match services.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut by_pod: BTreeMap<String, Service> = BTreeMap::new();
    if p.mode == PublishMode::PodService {
        for pod in pods {
            let name = pod.name_any();
            if pod.labels().get(publish::POD_LABEL) != Some(&name) {
                let patch = json!({"metadata": {"labels": {publish::POD_LABEL: &name}}});
                match pods_api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let have = listed.iter().find(|s| s.name_any() == name).cloned();
            let (svc, _) = ensure_known(&services, &publish::pod_service(cc, &name), have).await?;
            by_pod.insert(name, svc);
        }
    }
    let needs_nodes = p.mode == PublishMode::HostPort
        || (p.mode == PublishMode::PodService && p.pod_service_type == PodServiceType::NodePort);
    let nodes: BTreeMap<String, Node> = if needs_nodes {
        Api::<Node>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|n| (n.name_any(), n))
            .collect()
    } else {
        BTreeMap::new()
    };
    Ok(pods
        .iter()
        .filter_map(|pod| {
            let name = pod.name_any();
            let address = publish::public_address(cc, pod, by_pod.get(&name), &nodes)?;
            Some((name, address))
        })
        .collect())
}

fn ready_replicas(d: &Deployment) -> i32 {
    d.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

/// Applies every owned object; returns the gateway, chat and push
/// Deployments (push: while `spec.push` asks for it).
async fn apply_objects(
    cc: &ChatCluster,
    ctx: &Context,
    gateway_replicas: i32,
    gateway_draining: i32,
    gateway_now: Option<Deployment>,
) -> Result<(Deployment, Deployment, Option<Deployment>), Error> {
    let ns = cc.namespace().unwrap_or_default();
    let client = &ctx.client;
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let mut wrote = Vec::new();
    let mut note = |written: bool, what: String| {
        if written {
            wrote.push(what);
        }
    };

    let (_, w) = ensure(&configs, &desired::config_map(cc)).await?;
    note(w, format!("ConfigMap {}", desired::config_name(cc)));
    let (chat, w) = ensure(&deployments, &desired::chat_deployment(cc)).await?;
    note(w, format!("Deployment {}", desired::chat_name(cc)));
    for svc in [desired::chat_service(cc), desired::admin_service(cc)] {
        let (_, w) = ensure(&services, &svc).await?;
        note(w, format!("Service {}", svc.name_any()));
    }
    let gateway = desired::gateway_deployment(cc, gateway_replicas);
    let (gateway, w) = ensure_known(&deployments, &gateway, gateway_now).await?;
    note(w, format!("Deployment {}", desired::gateway_name(cc)));
    let (_, w) = ensure(&services, &desired::gateway_service(cc)).await?;
    note(w, format!("Service {}", desired::gateway_name(cc)));
    for (component, draining) in [("gateway", gateway_draining), ("chat", 0)] {
        let pdb = desired::pdb(cc, component, draining);
        let (_, w) = ensure(&pdbs, &pdb).await?;
        note(w, format!("PodDisruptionBudget {}", pdb.name_any()));
    }
    let push = match desired::push_deployment(cc) {
        Some(push) => {
            let (push, w) = ensure(&deployments, &push).await?;
            note(w, format!("Deployment {}", desired::push_name(cc)));
            Some(push)
        }
        // Asked for before (the status says so), not any more: it goes.
        None if cc.status.as_ref().is_some_and(|s| s.push.is_some()) => {
            match deployments
                .delete(&desired::push_name(cc), &DeleteParams::default())
                .await
            {
                Ok(_) => note(
                    true,
                    format!("Deployment {} deleted", desired::push_name(cc)),
                ),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            None
        }
        None => None,
    };
    if !wrote.is_empty() {
        ctx.metrics.applied(wrote.len() as u64);
        tracing::info!(cluster = %cc.name_any(), objects = ?wrote, "applied");
    }
    Ok((gateway, chat, push))
}

/// The ChatCluster is being deleted: its owned objects go with it (owner
/// references); its Redis keys are removed here.
async fn cleanup(
    cc: &ChatCluster,
    ctx: &Context,
) -> Result<kube::runtime::controller::Action, Error> {
    let ns = cc.namespace().unwrap_or_default();
    let prefix = desired::prefix(cc);
    let result = match backend_url(&ctx.client, &ns, "redis", &cc.spec.redis).await {
        Ok(url) => parley_redis::delete_prefix(&url, &prefix)
            .await
            .map_err(Error::from),
        Err(e) => Err(e),
    };
    ctx.forget(cc);
    match result {
        Ok(n) => {
            tracing::info!(cluster = %cc.name_any(), keys = n, %prefix, "redis keys removed");
            Ok(kube::runtime::controller::Action::await_change())
        }
        Err(e) => {
            let deleting_for =
                status::since(cc.metadata.deletion_timestamp.as_ref(), ctx.clock.now());
            if deleting_for >= CLEANUP_PATIENCE {
                ctx.event(
                    cc,
                    EventType::Warning,
                    "CleanupSkipped",
                    format!(
                        "Redis keys under {prefix} left behind after {}s: {e}",
                        deleting_for.as_secs()
                    ),
                )
                .await;
                Ok(kube::runtime::controller::Action::await_change())
            } else {
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests;
