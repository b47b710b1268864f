//! `parley-operator`: `run` reconciles ChatCluster resources (one active
//! replica, elected on a Lease); `crd` prints the CustomResourceDefinition.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, Predicate as _, WatchStreamExt, predicates, reflector, watcher};
use parley_operator::controller::{self, Context};
use parley_operator::crd::ChatCluster;
use parley_operator::leader::Elector;
use parley_operator::metrics::Metrics;
use parley_ops::{self as ops, Probe, Readiness};
use prometheus_client::registry::Registry;

#[derive(Parser)]
#[command(name = "parley-operator", version, about = "The Parley operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile ChatCluster resources until SIGTERM.
    Run(RunArgs),
    /// Print the ChatCluster CustomResourceDefinition as YAML.
    Crd,
    /// Print the objects the operator applies for a ChatCluster file, the
    /// gateways at their minimum (a dry run, and what CI validates).
    Objects { file: std::path::PathBuf },
    /// Run the operator's scaling, drains and rebalancing over a simulated
    /// day at the scale of docs/capacity.md; print a summary and draw it.
    Simulate {
        /// Where to write the SVG plot.
        #[arg(long, default_value = "docs/simulation.svg")]
        out: std::path::PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Health (/healthz, /readyz) and metrics (/metrics).
    #[arg(long, env = "PARLEY_OPS_LISTEN", default_value = "0.0.0.0:8080")]
    ops_listen: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PARLEY_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// The namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "parley-system")]
    lease_namespace: String,
    #[arg(long, env = "PARLEY_LEASE_NAME", default_value = "parley-operator")]
    lease_name: String,
    /// This replica's name in the Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader that stopped renewing keeps the Lease.
    #[arg(long, env = "PARLEY_LEASE_SECS", default_value_t = 15)]
    lease_secs: u64,
}

struct Node {
    registry: Registry,
}

#[async_trait]
impl Probe for Node {
    /// Standby replicas are ready too: they serve metrics and wait.
    async fn ready(&self) -> Readiness {
        Readiness::default()
    }

    fn metrics(&self) -> String {
        ops::encode(&self.registry)
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Simulate { out } => {
            let setup = parley_operator::simulate::Setup::ten_million_users();
            let report = parley_operator::simulate::run(&setup);
            std::fs::write(&out, parley_operator::simulate::svg(&setup, &report))?;
            println!("{}", parley_operator::simulate::summary(&setup, &report));
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Crd => {
            print!("{}", parley_operator::crd::crd_yaml());
            Ok(())
        }
        Command::Objects { file } => {
            let text = std::fs::read_to_string(&file)?;
            let mut cc: ChatCluster = serde_yaml::from_str(&text)?;
            // Owner references need a uid; the API server gives the real one.
            cc.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
            let replicas = cc.spec.gateway.min_replicas;
            print!("{}", parley_operator::desired::manifests(&cc, replicas));
            Ok(())
        }
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run(args)),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    ops::init_logging();
    let client = kube::Client::try_default().await?;
    check_crd(&client, &args.watch_namespace).await?;
    let metrics = Metrics::default();
    let mut registry = Registry::with_prefix("parley_operator");
    metrics.register(&mut registry);
    let listener = ops::bind(args.ops_listen, "ops").await?;
    let probe: Arc<dyn Probe> = Arc::new(Node { registry });
    tokio::spawn(ops::serve(
        listener,
        ops::router(probe),
        std::future::pending(),
    ));

    let identity = args.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .unwrap_or_else(|_| format!("parley-operator-{}", std::process::id()))
    });
    let elector = Elector::new(
        Api::<Lease>::namespaced(client.clone(), &args.lease_namespace),
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_secs.max(3)),
    );
    // One shutdown for the whole process: a SIGTERM while leading stops
    // the controller, and is still seen if the Lease is lost meanwhile.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        ops::terminated().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Candidate, leader, candidate again when the Lease is lost: the
    // controller stops and the process stays, without a restart.
    loop {
        tracing::info!(%identity, lease = %args.lease_name, "waiting to lead");
        let since = tokio::select! {
            since = elector.acquire() => since,
            () = until_stopped(stopped.clone()) => return Ok(()),
        };
        metrics.leader.set(1);
        tracing::info!(%identity, "leading: reconciling ChatClusters");
        let led = lead(
            &client,
            &args,
            &identity,
            &metrics,
            until_stopped(stopped.clone()),
        );
        tokio::select! {
            () = led => {
                metrics.leader.set(0);
                elector.release().await;
                tracing::info!("stopped");
                return Ok(());
            }
            () = elector.keep(since) => {
                metrics.leader.set(0);
                if *stopped.borrow() {
                    tracing::info!("stopped while losing the Lease");
                    return Ok(());
                }
                tracing::error!("lost the leader Lease: the controller stopped; a candidate again");
            }
        }
    }
}

/// ChatClusters reconciled at once (each pass is mostly waiting on the
/// API server and Redis).
const CONCURRENCY: u16 = 8;

/// Most time one reconcile pass may take: a call that hangs fails the
/// pass (retried with backoff) instead of freezing that ChatCluster.
const PASS_DEADLINE: Duration = Duration::from_secs(60);

/// Reconciles every ChatCluster until `stop`, then lets the passes under
/// way finish.
async fn lead(
    client: &kube::Client,
    args: &RunArgs,
    identity: &str,
    metrics: &Metrics,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let reporter = Reporter {
        controller: "parley-operator".into(),
        instance: Some(identity.to_owned()),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        Recorder::new(client.clone(), reporter),
        metrics.clone(),
    ));
    let clusters: Api<ChatCluster> = match &args.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    fn scoped<K>(client: &kube::Client, ns: &Option<String>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ns = &args.watch_namespace;
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=parley-operator");
    // A ChatCluster's own changes start a pass only when its spec
    // (generation) or finalizers change: the status the operator writes
    // every pass would otherwise start another at once. Owned objects
    // (a Deployment getting ready) and the periodic requeue start the rest.
    let (reader, writer) = reflector::store();
    let changed = watcher(clusters, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation.combine(predicates::finalizers),
            Default::default(),
        );
    Controller::for_stream(changed, reader)
        .with_config(kube::runtime::Config::default().concurrency(CONCURRENCY))
        .owns(scoped::<Deployment>(client, ns), owned.clone())
        .owns(scoped::<Service>(client, ns), owned.clone())
        .owns(scoped::<ConfigMap>(client, ns), owned.clone())
        .owns(scoped::<PodDisruptionBudget>(client, ns), owned)
        .graceful_shutdown_on(stop)
        .run(
            |cc, ctx| async move {
                tokio::time::timeout(PASS_DEADLINE, controller::reconcile(cc, ctx))
                    .await
                    .unwrap_or_else(|_| Err(controller::Error::Deadline(PASS_DEADLINE)))
            },
            controller::error_policy,
            ctx,
        )
        .for_each(|r| async move {
            match r {
                Ok(_) => {}
                // Logged by the error policy already.
                Err(e @ kube::runtime::controller::Error::ReconcilerFailed(..)) => {
                    tracing::debug!(error = %e, "reconcile")
                }
                // A watch or the queue: the controller goes on, but it is
                // worth seeing.
                Err(e) => tracing::warn!(
                    error = %parley_core::redact_urls(&e.to_string()),
                    "controller"
                ),
            }
        })
        .await;
}

/// Fails at once, with what to do, when the ChatCluster CRD is not
/// installed: the watches would only fail over and over.
async fn check_crd(client: &kube::Client, namespace: &Option<String>) -> anyhow::Result<()> {
    let api: Api<ChatCluster> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => anyhow::bail!(
            "the ChatCluster CRD (chatclusters.parley.dev) is not served by this cluster: \
             install it first (kubectl apply --server-side -f crds/)"
        ),
        // The API server may be starting, or RBAC is wrong: the watch
        // says more, and retries.
        Err(e) => {
            tracing::warn!(error = %e, "ChatClusters could not be listed at start");
            Ok(())
        }
    }
}
