//! The operator on a real Kubernetes cluster: install it from
//! deploy/parley-operator.yaml, create a ChatCluster with throwaway
//! backends, connect clients through the gateway Service, let load scale
//! the gateways up, drop most clients and watch a gateway drain and go
//! while the rest keep chatting, then delete the ChatCluster.
//!
//! It runs only where `KUBECONFIG` points to a cluster, `kubectl` is on the
//! PATH, and `PARLEY_E2E_IMAGES` names a registry prefix holding
//! `parley-operator`, `parley-gateway` and `parley-chat` (tag
//! `PARLEY_E2E_TAG`, default 0.1.0) built from the Dockerfile. The gateway
//! Service must get a load-balancer address (a cloud, MetalLB, or
//! `minikube tunnel`). Elsewhere it prints that it was skipped, and why.

use std::process::Stdio;
use std::time::{Duration, Instant};

use parley_client::{Admin, ClientConfig};
use parley_e2e::{Recorder, connect};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;

use super::{others, stream, traffic};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

async fn kubectl(args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = Command::new("kubectl");
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(text.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        anyhow::bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn json(args: &[&str]) -> anyhow::Result<Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    Ok(serde_json::from_str(&kubectl(&a, None).await?)?)
}

/// Polls `check` every 2 s until it gives a value, for at most `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            println!("{what}: after {:?}", start.elapsed());
            return v;
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Why the suite cannot run here, if it cannot.
async fn unavailable() -> Option<String> {
    if std::env::var_os("KUBECONFIG").is_none() {
        return Some("KUBECONFIG is not set".into());
    }
    if std::env::var_os("PARLEY_E2E_IMAGES").is_none() {
        return Some(
            "PARLEY_E2E_IMAGES (a registry prefix with the three images) is not set".into(),
        );
    }
    match kubectl(&["version"], None).await {
        Ok(_) => None,
        Err(e) => Some(format!("kubectl cannot reach the cluster: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_install_create_connect_scale_drain_and_delete() {
    if let Some(why) = unavailable().await {
        let msg = format!("SKIPPED the Kubernetes suite: {why}");
        println!("{msg}");
        eprintln!("{msg}");
        return;
    }
    let registry = std::env::var("PARLEY_E2E_IMAGES").unwrap();
    let tag = std::env::var("PARLEY_E2E_TAG").unwrap_or_else(|_| "0.1.0".into());
    let image = |name: &str| format!("{registry}/{name}:{tag}");

    // Install.
    kubectl(
        &[
            "apply",
            "--server-side",
            "-f",
            &format!("{ROOT}/deploy/parley-operator.yaml"),
        ],
        None,
    )
    .await
    .unwrap();
    let operator_image = format!("operator={}", image("parley-operator"));
    kubectl(
        &[
            "-n",
            "parley-system",
            "set",
            "image",
            "deployment/parley-operator",
            &operator_image,
        ],
        None,
    )
    .await
    .unwrap();
    kubectl(
        &[
            "-n",
            "parley-system",
            "rollout",
            "status",
            "deployment/parley-operator",
            "--timeout=300s",
        ],
        None,
    )
    .await
    .unwrap();

    // Backends and Secrets in a namespace of the test's own.
    let ns = format!("parley-e2e-{:08x}", rand::random::<u32>());
    kubectl(&["create", "namespace", &ns], None).await.unwrap();
    kubectl(
        &[
            "-n",
            &ns,
            "apply",
            "-f",
            &format!("{ROOT}/e2e/k8s/backends.yaml"),
        ],
        None,
    )
    .await
    .unwrap();
    for d in ["postgres", "redis", "rabbitmq"] {
        kubectl(
            &[
                "-n",
                &ns,
                "rollout",
                "status",
                &format!("deployment/{d}"),
                "--timeout=300s",
            ],
            None,
        )
        .await
        .unwrap();
    }
    let admin_key = format!("{:032x}", rand::random::<u128>());
    let token_secret = format!("{:064x}", rand::random::<u128>());
    kubectl(
        &[
            "-n",
            &ns,
            "create",
            "secret",
            "generic",
            "parley",
            &format!("--from-literal=token-secret={token_secret}"),
            &format!("--from-literal=admin-key={admin_key}"),
            "--from-literal=db=postgres://postgres:parley@postgres:5432/parley",
        ],
        None,
    )
    .await
    .unwrap();

    // The ChatCluster: small numbers, so a test's load moves it.
    let cc = format!(
        r#"apiVersion: parley.dev/v1alpha1
kind: ChatCluster
metadata: {{name: chat, namespace: {ns}}}
spec:
  images: {{gateway: "{gw}", chat: "{chat}"}}
  gateway:
    minReplicas: 1
    maxReplicas: 3
    targetConnections: 10
    scaleDownStabilizationSeconds: 20
    scaleDownPeriodSeconds: 10
    drainRatePerSecond: 5
    terminationGracePeriodSeconds: 30
  chat: {{replicas: 1}}
  postgres: {{secretRef: {{name: parley, key: db}}}}
  redis: {{url: "redis://redis:6379/"}}
  rabbitmq: {{url: "amqp://guest:guest@rabbitmq:5672/%2f"}}
  tokenSecret: {{name: parley, key: token-secret}}
  adminKey: {{name: parley, key: admin-key}}
"#,
        gw = image("parley-gateway"),
        chat = image("parley-chat"),
    );
    kubectl(&["apply", "-f", "-"], Some(&cc)).await.unwrap();
    kubectl(
        &[
            "-n",
            &ns,
            "wait",
            "--for=condition=Ready",
            "chatcluster/chat",
            "--timeout=300s",
        ],
        None,
    )
    .await
    .unwrap();
    let status = || async {
        json(&["-n", &ns, "get", "chatcluster", "chat"])
            .await
            .ok()
            .map(|v| v["status"].clone())
    };

    // The admin API through a port-forward; clients through the Service.
    let admin_port = parley_e2e::free_port();
    let mut forward = Command::new("kubectl")
        .args([
            "-n",
            &ns,
            "port-forward",
            "svc/chat-admin",
            &format!("{admin_port}:7402"),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(forward.stdout.take().unwrap()).lines();
    let _ = lines.next_line().await; // "Forwarding from ..."
    let gateway = eventually(
        "the gateway Service has an address",
        Duration::from_secs(180),
        || async {
            let svc = json(&["-n", &ns, "get", "svc", "chat-gateway"])
                .await
                .ok()?;
            let ingress = &svc["status"]["loadBalancer"]["ingress"][0];
            let host = ingress["ip"].as_str().or(ingress["hostname"].as_str())?;
            Some(format!("{host}:7400"))
        },
    )
    .await;
    let mut admin = Admin::connect(&format!("http://127.0.0.1:{admin_port}"), &admin_key)
        .await
        .unwrap();

    // 30 devices: the load asks for all 3 gateways.
    let rec = Recorder::default();
    let mut clients = Vec::new();
    let mut devices = Vec::new();
    for u in 0..10 {
        let user = format!("u{u}");
        admin.create_user(&user, "").await.unwrap();
        let token = admin.token(&user, 3600).await.unwrap().token;
        for d in ["phone", "laptop", "tablet"] {
            let name = format!("{user}/{d}");
            let c = connect(
                ClientConfig::new(gateway.clone(), token.clone(), d),
                &rec,
                &name,
            )
            .await
            .unwrap();
            clients.push(c);
            devices.push(name);
        }
    }
    eventually(
        "load scaled the gateways to 3",
        Duration::from_secs(300),
        || async {
            let s = status().await?;
            (s["gateway"]["readyReplicas"] == 3).then_some(())
        },
    )
    .await;

    // Most clients leave; u0 and u1 keep chatting through the scale-down.
    let staying = ["u0/phone", "u0/laptop", "u1/phone", "u1/laptop"];
    let mut kept = Vec::new();
    for (c, name) in clients.into_iter().zip(&devices) {
        if staying.contains(&name.as_str()) {
            kept.push(c);
        } else {
            c.close().await;
        }
    }
    let direct = kept[0].open_direct("u1").await.unwrap().id;
    let streams = vec![tokio::spawn(stream(
        kept[0].clone(),
        direct,
        600,
        Duration::from_millis(200),
        others(&staying, "u0/phone"),
    ))];
    eventually("a gateway drains", Duration::from_secs(180), || async {
        let s = status().await?;
        (!s["gateway"]["drains"].as_array()?.is_empty()).then_some(())
    })
    .await;
    eventually(
        "down to one gateway, drains over",
        Duration::from_secs(600),
        || async {
            let s = status().await?;
            let done = s["gateway"]["desiredReplicas"] == 1
                && s["gateway"]["drains"]
                    .as_array()
                    .is_some_and(|d| d.is_empty());
            done.then_some(())
        },
    )
    .await;
    let ledger = traffic(&rec, streams).await.ledger;
    ledger.print("kubernetes-scale-down");
    assert!(ledger.is_clean(), "{ledger:?}");

    // Delete: the finalizer lets go once the Redis keys are gone.
    kubectl(
        &["-n", &ns, "delete", "chatcluster", "chat", "--timeout=120s"],
        None,
    )
    .await
    .unwrap();
    drop(forward);
    kubectl(&["delete", "namespace", &ns, "--wait=false"], None)
        .await
        .unwrap();
}
