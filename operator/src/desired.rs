//! The objects a ChatCluster owns, as pure functions of the resource: the
//! gateway Deployment and its Service, the chat-service Deployment with a
//! headless Service (gateways balance over its pod addresses) and an admin
//! Service, a ConfigMap of shared settings, and a PodDisruptionBudget for
//! each Deployment. The controller applies them with server-side apply;
//! every object carries an owner reference, so deleting the ChatCluster
//! deletes them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{Backend, ChatCluster, PublishMode, PullPolicy, ServiceType};

/// Ports inside the pods (the Service maps the public ones onto them).
pub const GATEWAY_TCP: i32 = 7400;
pub const GATEWAY_WS: i32 = 7401;
pub const GATEWAY_TLS: i32 = 7443;
pub const GATEWAY_OPS: i32 = 7403;
pub const GATEWAY_ROUTE: i32 = 7404;
pub const CHAT_INTERNAL: i32 = 7500;
pub const CHAT_ADMIN: i32 = 7402;
pub const CHAT_OPS: i32 = 7501;
pub const PUSH_OPS: i32 = 7601;
/// Where the push providers' key files are mounted.
pub const PUSH_SECRETS: &str = "/etc/parley/push";

/// The field manager of every apply.
pub const MANAGER: &str = "parley-operator";

/// Names of the owned objects.
pub fn gateway_name(cc: &ChatCluster) -> String {
    format!("{}-gateway", cc.name_any())
}
pub fn chat_name(cc: &ChatCluster) -> String {
    format!("{}-chat", cc.name_any())
}
pub fn admin_name(cc: &ChatCluster) -> String {
    format!("{}-admin", cc.name_any())
}
pub fn push_name(cc: &ChatCluster) -> String {
    format!("{}-push", cc.name_any())
}
pub fn config_name(cc: &ChatCluster) -> String {
    format!("{}-config", cc.name_any())
}

/// The Redis key prefix and broker-name prefix of a cluster: unique per
/// namespace and name, so clusters can share a Redis and a broker.
pub fn prefix(cc: &ChatCluster) -> String {
    format!(
        "parley.{}.{}",
        cc.meta().namespace.clone().unwrap_or_default(),
        cc.name_any()
    )
}

/// The labels of a component's pods (and its selector).
pub fn labels(cc: &ChatCluster, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "parley".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), cc.name_any()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGER.to_owned(),
        ),
    ])
}

/// The gateway pods' selector as a string, for the scale subresource.
/// The labels that select the gateway pods.
pub fn gateway_selector_labels(cc: &ChatCluster) -> BTreeMap<String, String> {
    selector(cc, "gateway").match_labels.unwrap_or_default()
}

pub fn gateway_selector(cc: &ChatCluster) -> String {
    let l = labels(cc, "gateway");
    [
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/component",
    ]
    .iter()
    .map(|k| format!("{k}={}", l[*k]))
    .collect::<Vec<_>>()
    .join(",")
}

fn selector(cc: &ChatCluster, component: &str) -> LabelSelector {
    let mut l = labels(cc, component);
    l.remove("app.kubernetes.io/managed-by");
    LabelSelector {
        match_labels: Some(l),
        ..LabelSelector::default()
    }
}

pub(crate) fn meta(cc: &ChatCluster, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: cc.meta().namespace.clone(),
        labels: Some(labels(cc, component)),
        owner_references: cc
            .controller_owner_ref(&())
            .map(|o: OwnerReference| vec![o]),
        ..ObjectMeta::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// A backend's URL, inline (in the ConfigMap) or from its Secret.
fn backend_env(name: &str, b: &Backend) -> Option<EnvVar> {
    match (&b.url, &b.secret_ref) {
        (_, Some(s)) => Some(env_secret(name, &s.name, &s.key)),
        (Some(_), None) => None, // in the ConfigMap
        (None, None) => None,
    }
}

fn port(name: &str, p: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: p,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn http_probe(path: &str, port: i32, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

fn pull_policy(p: PullPolicy) -> String {
    match p {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
    .to_owned()
}

/// The annotation on pod templates that names the shared settings they
/// were made with: a change of the ConfigMap (which pods read only when
/// they start) changes it, and so rolls the pods.
pub const CONFIG_HASH: &str = "parley.dev/config-hash";

/// A component's pod template metadata: its labels, and the hash of the
/// ConfigMap's settings.
fn pod_meta(cc: &ChatCluster, component: &str) -> ObjectMeta {
    let data = config_map(cc).data.unwrap_or_default();
    // FNV-1a over the sorted settings: stable across versions of Rust.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in &data {
        for b in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    ObjectMeta {
        labels: Some(labels(cc, component)),
        annotations: Some(BTreeMap::from([(
            CONFIG_HASH.to_owned(),
            format!("{h:016x}"),
        )])),
        ..ObjectMeta::default()
    }
}

/// Settings shared by both components, without secrets.
pub fn config_map(cc: &ChatCluster) -> ConfigMap {
    let mut data = BTreeMap::from([
        ("PARLEY_PREFIX".to_owned(), prefix(cc)),
        ("PARLEY_LOG".to_owned(), "info".to_owned()),
    ]);
    for (name, b) in [
        ("PARLEY_DATABASE_URL", &cc.spec.postgres),
        ("PARLEY_REDIS_URL", &cc.spec.redis),
        ("PARLEY_AMQP_URL", &cc.spec.rabbitmq),
    ] {
        if let (Some(url), None) = (&b.url, &b.secret_ref) {
            data.insert(name.to_owned(), url.clone());
        }
    }
    ConfigMap {
        metadata: meta(cc, config_name(cc), "config"),
        data: Some(data),
        ..ConfigMap::default()
    }
}

fn common_env(cc: &ChatCluster) -> (Vec<EnvFromSource>, Vec<EnvVar>) {
    let from = vec![EnvFromSource {
        config_map_ref: Some(ConfigMapEnvSource {
            name: config_name(cc),
            optional: Some(false),
        }),
        ..EnvFromSource::default()
    }];
    let mut vars = vec![];
    vars.extend(backend_env("PARLEY_REDIS_URL", &cc.spec.redis));
    vars.extend(backend_env("PARLEY_AMQP_URL", &cc.spec.rabbitmq));
    (from, vars)
}

/// The gateway Deployment at `replicas`.
pub fn gateway_deployment(cc: &ChatCluster, replicas: i32) -> Deployment {
    let g = &cc.spec.gateway;
    let (env_from, mut vars) = common_env(cc);
    vars.extend([
        env_field("PARLEY_GATEWAY_ID", "metadata.name"),
        env_field("POD_IP", "status.podIP"),
        env("PARLEY_LISTEN", format!("0.0.0.0:{GATEWAY_TCP}")),
        // The operator writes the routing table from here on.
        env("PARLEY_ROUTING_TABLE", "operator"),
        env("PARLEY_OPS_LISTEN", format!("0.0.0.0:{GATEWAY_OPS}")),
        // The route lookup alone, for the Service to publish.
        env("PARLEY_ROUTE_LISTEN", format!("0.0.0.0:{GATEWAY_ROUTE}")),
        env(
            "PARLEY_CHAT_ADDRS",
            format!(
                "{}.{}.svc:{CHAT_INTERNAL}",
                chat_name(cc),
                cc.meta().namespace.clone().unwrap_or_default()
            ),
        ),
        env(
            "PARLEY_SHUTDOWN_GRACE_SECS",
            (g.termination_grace_period_seconds - 5).max(1).to_string(),
        ),
        env("PARLEY_DRAIN_RATE", g.drain_rate_per_second.to_string()),
    ]);
    vars.extend(g.limits.env().into_iter().map(|(name, v)| env(name, v)));
    let mut ports = vec![
        port("tcp", GATEWAY_TCP),
        port("ops", GATEWAY_OPS),
        port("route", GATEWAY_ROUTE),
    ];
    if g.ports.websocket.is_some() {
        vars.push(env("PARLEY_WS_LISTEN", format!("0.0.0.0:{GATEWAY_WS}")));
        ports.push(port("ws", GATEWAY_WS));
    }
    let mut volumes = None;
    let mut mounts = None;
    match &g.tls_secret_name {
        Some(secret) => {
            vars.extend([
                env("PARLEY_TLS_LISTEN", format!("0.0.0.0:{GATEWAY_TLS}")),
                env("PARLEY_TLS_CERT", "/etc/parley/tls/tls.crt"),
                env("PARLEY_TLS_KEY", "/etc/parley/tls/tls.key"),
                // Clients come over TLS: the routing table names that port.
                env("PARLEY_ADVERTISE", format!("$(POD_IP):{GATEWAY_TLS}")),
            ]);
            ports.push(port("tls", GATEWAY_TLS));
            volumes = Some(vec![Volume {
                name: "tls".to_owned(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.clone()),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            }]);
            mounts = Some(vec![VolumeMount {
                name: "tls".to_owned(),
                mount_path: "/etc/parley/tls".to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]);
        }
        None => vars.push(env("PARLEY_ADVERTISE", format!("$(POD_IP):{GATEWAY_TCP}"))),
    }
    if let Some((volume, mount)) = media_volume(cc) {
        // The media endpoint, on the route port.
        let media = cc.spec.media.as_ref().and_then(|m| m.volume.as_ref());
        vars.extend(media.map(media_volume_env).into_iter().flatten());
        volumes.get_or_insert_with(Vec::new).push(volume);
        mounts.get_or_insert_with(Vec::new).push(mount);
    }
    if g.publish.mode == PublishMode::HostPort {
        // The client port on the node's own address: the table holds it.
        let (name, _, outside) = crate::publish::client_port(cc);
        if let Some(p) = ports.iter_mut().find(|p| p.name.as_deref() == Some(name)) {
            p.host_port = Some(outside);
        }
    }
    let container = Container {
        name: "gateway".to_owned(),
        image: Some(cc.spec.images.gateway.clone()),
        image_pull_policy: Some(pull_policy(cc.spec.images.pull_policy)),
        env: Some(vars),
        env_from: Some(env_from),
        ports: Some(ports),
        readiness_probe: Some(http_probe("/readyz", GATEWAY_OPS, 5)),
        liveness_probe: Some(http_probe("/healthz", GATEWAY_OPS, 10)),
        resources: g.resources.clone(),
        volume_mounts: mounts,
        ..Container::default()
    };
    Deployment {
        metadata: meta(cc, gateway_name(cc), "gateway"),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: selector(cc, "gateway"),
            // New pods first, old ones drained one at a time.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(pod_meta(cc, "gateway")),
                spec: Some(secured(PodSpec {
                    containers: vec![container],
                    termination_grace_period_seconds: Some(g.termination_grace_period_seconds),
                    volumes,
                    ..PodSpec::default()
                })),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The user the images run as (the Dockerfile's `parley`).
pub const RUN_AS: i64 = 10001;

/// What every Parley pod runs under: the `restricted` Pod Security
/// Standard (a non-root user, the runtime's default seccomp profile), its
/// volumes writable by that user, and no service-account token (neither
/// process talks to the Kubernetes API).
fn secured(pod: PodSpec) -> PodSpec {
    PodSpec {
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            fs_group: Some(RUN_AS),
            // Ownership of a shared volume is changed only when its root
            // is not the group's already, not file by file at every start.
            fs_group_change_policy: Some("OnRootMismatch".to_owned()),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: pod
            .containers
            .into_iter()
            .map(|c| Container {
                // No privilege to gain, no capability, nothing written
                // outside the volumes (logs go to stdout).
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    run_as_non_root: Some(true),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".to_owned()]),
                        ..Capabilities::default()
                    }),
                    ..SecurityContext::default()
                }),
                ..c
            })
            .collect(),
        ..pod
    }
}

/// A TCP port of a Service: `port` outside, `target` in the pod.
pub(crate) fn svc_port(name: &str, port: i32, target: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// How clients reach the gateways.
pub fn gateway_service(cc: &ChatCluster) -> Service {
    let g = &cc.spec.gateway;
    let mut ports = vec![
        svc_port("tcp", g.ports.tcp, GATEWAY_TCP),
        svc_port("route", g.ports.route, GATEWAY_ROUTE),
    ];
    if let Some(ws) = g.ports.websocket {
        ports.push(svc_port("ws", ws, GATEWAY_WS));
    }
    if g.tls_secret_name.is_some() {
        ports.push(svc_port("tls", g.ports.tls, GATEWAY_TLS));
    }
    let type_ = match g.service_type {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    Service {
        metadata: meta(cc, gateway_name(cc), "gateway"),
        spec: Some(ServiceSpec {
            type_: Some(type_.to_owned()),
            selector: selector(cc, "gateway").match_labels,
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The chat-service Deployment.
pub fn chat_deployment(cc: &ChatCluster) -> Deployment {
    let (env_from, mut vars) = common_env(cc);
    vars.extend(backend_env("PARLEY_DATABASE_URL", &cc.spec.postgres));
    vars.extend([
        env("PARLEY_INTERNAL_LISTEN", format!("0.0.0.0:{CHAT_INTERNAL}")),
        env("PARLEY_ADMIN_LISTEN", format!("0.0.0.0:{CHAT_ADMIN}")),
        env("PARLEY_OPS_LISTEN", format!("0.0.0.0:{CHAT_OPS}")),
        env_secret(
            "PARLEY_TOKEN_SECRET",
            &cc.spec.token_secret.name,
            &cc.spec.token_secret.key,
        ),
        env_secret(
            "PARLEY_ADMIN_KEY",
            &cc.spec.admin_key.name,
            &cc.spec.admin_key.key,
        ),
    ]);
    if let Some(previous) = &cc.spec.token_secret_previous {
        vars.push(env_secret(
            "PARLEY_TOKEN_SECRET_PREVIOUS",
            &previous.name,
            &previous.key,
        ));
    }
    if let Some(media) = &cc.spec.media {
        vars.extend(media_env(media));
    }
    let container = Container {
        name: "chat".to_owned(),
        image: Some(cc.spec.images.chat.clone()),
        image_pull_policy: Some(pull_policy(cc.spec.images.pull_policy)),
        env: Some(vars),
        env_from: Some(env_from),
        ports: Some(vec![
            port("internal", CHAT_INTERNAL),
            port("admin", CHAT_ADMIN),
            port("ops", CHAT_OPS),
        ]),
        readiness_probe: Some(http_probe("/readyz", CHAT_OPS, 5)),
        liveness_probe: Some(http_probe("/healthz", CHAT_OPS, 10)),
        resources: cc.spec.chat.resources.clone(),
        volume_mounts: media_volume(cc).map(|(_, m)| vec![m]),
        ..Container::default()
    };
    Deployment {
        metadata: meta(cc, chat_name(cc), "chat"),
        spec: Some(DeploymentSpec {
            replicas: Some(cc.spec.chat.replicas),
            selector: selector(cc, "chat"),
            template: PodTemplateSpec {
                metadata: Some(pod_meta(cc, "chat")),
                spec: Some(secured(PodSpec {
                    containers: vec![container],
                    termination_grace_period_seconds: Some(30),
                    volumes: media_volume(cc).map(|(v, _)| vec![v]),
                    ..PodSpec::default()
                })),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The push senders' Deployment, when `spec.push` asks for them: the
/// database, Redis and RabbitMQ as the chat services have them, and each
/// provider's credentials from its Secret (key files mounted read-only,
/// the webhook's secret in the environment).
pub fn push_deployment(cc: &ChatCluster) -> Option<Deployment> {
    let push = cc.spec.push.as_ref()?;
    let (env_from, mut vars) = common_env(cc);
    vars.extend(backend_env("PARLEY_DATABASE_URL", &cc.spec.postgres));
    vars.extend([
        env("PARLEY_OPS_LISTEN", format!("0.0.0.0:{PUSH_OPS}")),
        env_field("PARLEY_PUSH_NAME", "metadata.name"),
    ]);
    let mut files = Vec::new();
    if let Some(apns) = &push.apns {
        files.push((&apns.key, "apns-key.p8"));
        vars.extend([
            env(
                "PARLEY_APNS_KEY_FILE",
                format!("{PUSH_SECRETS}/apns/apns-key.p8"),
            ),
            env("PARLEY_APNS_KEY_ID", apns.key_id.clone()),
            env("PARLEY_APNS_TEAM_ID", apns.team_id.clone()),
            env(
                "PARLEY_APNS_ENDPOINT",
                if apns.sandbox {
                    "sandbox"
                } else {
                    "production"
                },
            ),
        ]);
    }
    if let Some(fcm) = &push.fcm {
        files.push((&fcm.credentials, "fcm-service-account.json"));
        vars.push(env(
            "PARLEY_FCM_CREDENTIALS_FILE",
            format!("{PUSH_SECRETS}/fcm/fcm-service-account.json"),
        ));
    }
    if let Some(webhook) = &push.webhook {
        vars.extend([
            env("PARLEY_PUSH_WEBHOOK_URL", webhook.url.clone()),
            env_secret(
                "PARLEY_PUSH_WEBHOOK_SECRET",
                &webhook.secret.name,
                &webhook.secret.key,
            ),
        ]);
    }
    // One volume per key file, each from its own Secret's key.
    let (volumes, mounts): (Vec<Volume>, Vec<VolumeMount>) = files
        .into_iter()
        .map(|(secret, file)| {
            let dir = file.split('-').next().unwrap_or(file);
            (
                Volume {
                    name: format!("{dir}-secret"),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(secret.name.clone()),
                        items: Some(vec![KeyToPath {
                            key: secret.key.clone(),
                            path: file.to_owned(),
                            mode: None,
                        }]),
                        default_mode: Some(0o440),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                VolumeMount {
                    name: format!("{dir}-secret"),
                    mount_path: format!("{PUSH_SECRETS}/{dir}"),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
            )
        })
        .unzip();
    let container = Container {
        name: "push".to_owned(),
        image: Some(cc.spec.images.push.clone()),
        image_pull_policy: Some(pull_policy(cc.spec.images.pull_policy)),
        env: Some(vars),
        env_from: Some(env_from),
        ports: Some(vec![port("ops", PUSH_OPS)]),
        readiness_probe: Some(http_probe("/readyz", PUSH_OPS, 5)),
        liveness_probe: Some(http_probe("/healthz", PUSH_OPS, 10)),
        resources: push.resources.clone(),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Container::default()
    };
    Some(Deployment {
        metadata: meta(cc, push_name(cc), "push"),
        spec: Some(DeploymentSpec {
            replicas: Some(push.replicas),
            selector: selector(cc, "push"),
            template: PodTemplateSpec {
                metadata: Some(pod_meta(cc, "push")),
                spec: Some(secured(PodSpec {
                    containers: vec![container],
                    // The notifications in hand are finished within 20 s.
                    termination_grace_period_seconds: Some(30),
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..PodSpec::default()
                })),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

/// The chat service's media store and rules; credentials and the signing
/// key from their Secrets.
fn media_env(media: &crate::crd::MediaSpec) -> Vec<EnvVar> {
    let mut vars = Vec::new();
    if let (Some(bucket), Some(credentials)) = (&media.bucket, &media.credentials) {
        vars.extend([
            env("PARLEY_MEDIA_S3_BUCKET", bucket.clone()),
            env("PARLEY_MEDIA_S3_REGION", media.region.clone()),
            env_secret(
                "PARLEY_MEDIA_S3_ACCESS_KEY",
                &credentials.secret_name,
                &credentials.access_key_key,
            ),
            env_secret(
                "PARLEY_MEDIA_S3_SECRET_KEY",
                &credentials.secret_name,
                &credentials.secret_key_key,
            ),
        ]);
        if let Some(e) = &media.endpoint {
            vars.push(env("PARLEY_MEDIA_S3_ENDPOINT", e.clone()));
        }
        if let Some(e) = &media.public_endpoint {
            vars.push(env("PARLEY_MEDIA_S3_PUBLIC_ENDPOINT", e.clone()));
        }
    }
    if let Some(volume) = &media.volume {
        vars.extend(media_volume_env(volume));
        vars.push(env("PARLEY_MEDIA_PUBLIC_URL", volume.public_url.clone()));
    }
    vars.extend(media.limits.env().into_iter().map(|(n, v)| env(n, v)));
    vars
}

/// A shared media volume's directory and signing key, as the chat
/// services and the gateways both take them.
fn media_volume_env(volume: &crate::crd::MediaVolume) -> [EnvVar; 2] {
    [
        env("PARLEY_MEDIA_DIR", crate::crd::MEDIA_MOUNT),
        env_secret(
            "PARLEY_MEDIA_KEY",
            &volume.signing_key.name,
            &volume.signing_key.key,
        ),
    ]
}

/// The shared media volume of `cc`, if any: the pod's volume and the
/// container's mount.
fn media_volume(cc: &ChatCluster) -> Option<(Volume, VolumeMount)> {
    let claim = &cc.spec.media.as_ref()?.volume.as_ref()?.claim_name;
    Some((
        Volume {
            name: "media".to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: "media".to_owned(),
            mount_path: crate::crd::MEDIA_MOUNT.to_owned(),
            ..VolumeMount::default()
        },
    ))
}

/// A Service in front of the chat pods with one port.
fn chat_port_service(
    cc: &ChatCluster,
    name: String,
    headless: bool,
    port_name: &str,
    port: i32,
) -> Service {
    Service {
        metadata: meta(cc, name, "chat"),
        spec: Some(ServiceSpec {
            cluster_ip: headless.then(|| "None".to_owned()),
            type_: Some("ClusterIP".to_owned()),
            selector: selector(cc, "chat").match_labels,
            ports: Some(vec![ServicePort {
                name: Some(port_name.to_owned()),
                port,
                target_port: Some(IntOrString::Int(port)),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Headless: its DNS name resolves to every ready chat pod, which is how
/// gateways find the replicas they balance over.
pub fn chat_service(cc: &ChatCluster) -> Service {
    chat_port_service(cc, chat_name(cc), true, "internal", CHAT_INTERNAL)
}

/// The admin API, for the app's backend inside the cluster.
pub fn admin_service(cc: &ChatCluster) -> Service {
    chat_port_service(cc, admin_name(cc), false, "admin", CHAT_ADMIN)
}

/// At most one pod of `component` down by voluntary disruption at a
/// time, besides the `draining` gateways the operator is taking out (they
/// turn unready on purpose: counted, they would block node drains and the
/// cluster autoscaler for the whole drain).
pub fn pdb(cc: &ChatCluster, component: &str, draining: i32) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(cc, format!("{}-{component}", cc.name_any()), component),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1 + draining.max(0))),
            selector: Some(selector(cc, component)),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// Every owned object as YAML documents, the gateways at `replicas`: what
/// `parley-operator objects` prints for a dry run and for validation.
pub fn manifests(cc: &ChatCluster, replicas: i32) -> String {
    fn doc<T: serde::Serialize>(out: &mut String, object: &T) {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(object).expect("objects serialize"));
    }
    let mut out = String::new();
    doc(&mut out, &config_map(cc));
    doc(&mut out, &chat_deployment(cc));
    doc(&mut out, &chat_service(cc));
    doc(&mut out, &admin_service(cc));
    doc(&mut out, &gateway_deployment(cc, replicas));
    doc(&mut out, &gateway_service(cc));
    doc(&mut out, &pdb(cc, "gateway", 0));
    doc(&mut out, &pdb(cc, "chat", 0));
    if let Some(push) = push_deployment(cc) {
        doc(&mut out, &push);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ChatCluster {
        let mut cc: ChatCluster =
            serde_yaml::from_str(include_str!("../../examples/chatcluster.yaml")).unwrap();
        // As the API server would give it.
        cc.metadata.uid = Some("0b4f5c9e-0000-4000-8000-000000000001".into());
        cc
    }

    /// The literal value of variable `name` (None: unset or from a Secret).
    fn value_of(env: &[EnvVar], name: &str) -> Option<String> {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    fn env_of(d: &Deployment) -> Vec<EnvVar> {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .clone()
            .unwrap()
    }

    #[test]
    fn every_object_is_owned_and_labelled() {
        let cc = cluster();
        let objects: Vec<ObjectMeta> = vec![
            gateway_deployment(&cc, 3).metadata,
            gateway_service(&cc).metadata,
            chat_deployment(&cc).metadata,
            chat_service(&cc).metadata,
            admin_service(&cc).metadata,
            config_map(&cc).metadata,
            pdb(&cc, "gateway", 0).metadata,
            pdb(&cc, "chat", 0).metadata,
        ];
        for m in objects {
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str()),
                ("ChatCluster", "chat")
            );
            assert_eq!(owner.controller, Some(true));
            assert_eq!(m.namespace.as_deref(), Some("im"));
            assert_eq!(
                m.labels.as_ref().unwrap()["app.kubernetes.io/instance"],
                "chat"
            );
        }
    }

    #[test]
    fn gateways_find_the_chat_replicas_and_advertise_their_pod_address() {
        let cc = cluster();
        let d = gateway_deployment(&cc, 4);
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(4));
        let env = env_of(&d);
        let get = |n: &str| env.iter().find(|e| e.name == n).cloned().unwrap();
        assert_eq!(
            get("PARLEY_CHAT_ADDRS").value.as_deref(),
            Some("chat-chat.im.svc:7500")
        );
        assert_eq!(
            get("PARLEY_ADVERTISE").value.as_deref(),
            Some("$(POD_IP):7400")
        );
        // $(POD_IP) expands only if POD_IP comes first.
        let pos = |n: &str| env.iter().position(|e| e.name == n).unwrap();
        assert!(pos("POD_IP") < pos("PARLEY_ADVERTISE"));
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(60));
        let probe = pod.containers[0].readiness_probe.clone().unwrap();
        assert_eq!(probe.http_get.unwrap().path.as_deref(), Some("/readyz"));
    }

    #[test]
    fn secrets_stay_in_secrets_and_urls_go_to_the_config_map() {
        let cc = cluster();
        let data = config_map(&cc).data.unwrap();
        assert_eq!(data["PARLEY_REDIS_URL"], "redis://redis:6379/");
        assert_eq!(data["PARLEY_PREFIX"], "parley.im.chat");
        assert!(
            !data.contains_key("PARLEY_DATABASE_URL"),
            "it is in a Secret"
        );
        let env = env_of(&chat_deployment(&cc));
        let db = env
            .iter()
            .find(|e| e.name == "PARLEY_DATABASE_URL")
            .unwrap();
        let secret = db
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("parley-db", "url")
        );
        assert!(
            env.iter()
                .any(|e| e.name == "PARLEY_TOKEN_SECRET" && e.value.is_none())
        );
    }

    /// The limits set in the spec reach the gateways, the rest keep their
    /// defaults; the previous signing secret reaches the chat services from
    /// its Secret during a rotation.
    #[test]
    fn limits_and_a_previous_signing_secret_reach_the_processes() {
        let mut cc = cluster();
        let names =
            |env: &[EnvVar]| -> Vec<String> { env.iter().map(|e| e.name.clone()).collect() };
        let before = env_of(&gateway_deployment(&cc, 2));
        assert!(
            !names(&before)
                .iter()
                .any(|n| n.starts_with("PARLEY_LIMIT_"))
        );
        assert!(
            !names(&env_of(&chat_deployment(&cc)))
                .contains(&"PARLEY_TOKEN_SECRET_PREVIOUS".to_owned())
        );
        let yaml = "sendsPerUser: 500/10\ndevicesPerUser: 'off'\n";
        cc.spec.gateway.limits = serde_yaml::from_str(yaml).unwrap();
        cc.spec.token_secret_previous = Some(crate::crd::SecretKeyRef {
            name: "parley-token".into(),
            key: "previous".into(),
        });
        let env = env_of(&gateway_deployment(&cc, 2));
        let value = |n: &str| value_of(&env, n);
        assert_eq!(
            value("PARLEY_LIMIT_SENDS_PER_USER").as_deref(),
            Some("500/10")
        );
        assert_eq!(
            value("PARLEY_LIMIT_DEVICES_PER_USER").as_deref(),
            Some("off")
        );
        assert_eq!(value("PARLEY_LIMIT_READS_PER_USER"), None);
        let chat = env_of(&chat_deployment(&cc));
        let previous = chat
            .iter()
            .find(|e| e.name == "PARLEY_TOKEN_SECRET_PREVIOUS")
            .and_then(|e| e.value_from.as_ref()?.secret_key_ref.clone())
            .unwrap();
        assert_eq!(
            (previous.name.as_str(), previous.key.as_str()),
            ("parley-token", "previous")
        );
    }

    /// The media store reaches the chat services, its credentials from
    /// their Secret (never as values), its rules as set.
    #[test]
    fn the_media_store_reaches_the_chat_services() {
        let mut cc = cluster();
        let env = env_of(&chat_deployment(&cc));
        assert!(!env.iter().any(|e| e.name.starts_with("PARLEY_MEDIA_")));
        let yaml = "bucket: chat-media\nendpoint: http://minio.minio:9000\n\
                    publicEndpoint: https://media.example.com\n\
                    credentials: {secretName: minio}\nlimits: {maxVideoMb: 100, dailyMb: 0}\n";
        cc.spec.media = Some(serde_yaml::from_str(yaml).unwrap());
        let env = env_of(&chat_deployment(&cc));
        let value = |n: &str| value_of(&env, n);
        assert_eq!(
            value("PARLEY_MEDIA_S3_BUCKET").as_deref(),
            Some("chat-media")
        );
        assert_eq!(
            value("PARLEY_MEDIA_S3_REGION").as_deref(),
            Some("us-east-1")
        );
        assert_eq!(
            value("PARLEY_MEDIA_S3_PUBLIC_ENDPOINT").as_deref(),
            Some("https://media.example.com")
        );
        assert_eq!(value("PARLEY_MEDIA_MAX_VIDEO_MB").as_deref(), Some("100"));
        assert_eq!(value("PARLEY_MEDIA_DAILY_MB").as_deref(), Some("0"));
        assert_eq!(value("PARLEY_MEDIA_MAX_IMAGE_MB"), None);
        for (name, key) in [
            ("PARLEY_MEDIA_S3_ACCESS_KEY", "accessKey"),
            ("PARLEY_MEDIA_S3_SECRET_KEY", "secretKey"),
        ] {
            let var = env.iter().find(|e| e.name == name).unwrap();
            assert!(var.value.is_none(), "{name} comes from the Secret");
            let from = var
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            assert_eq!((from.name.as_str(), from.key.as_str()), ("minio", key));
        }
        let gateway = env_of(&gateway_deployment(&cc, 2));
        assert!(
            !gateway
                .iter()
                .any(|e| e.name.starts_with("PARLEY_MEDIA_S3_"))
        );
    }

    /// A shared media volume is mounted by the chat services and the
    /// gateways alike, with the signing key from its Secret; the chat
    /// services sign for the public URL, and nothing goes to S3.
    #[test]
    fn a_shared_media_volume_reaches_chat_services_and_gateways() {
        let mut cc = cluster();
        let yaml = "volume:\n  claimName: chat-media\n  signingKey: {name: media-key, key: key}\n  \
                    publicUrl: https://chat.example.com:7404\n";
        cc.spec.media = Some(serde_yaml::from_str(yaml).unwrap());
        let chat = chat_deployment(&cc);
        let gateway = gateway_deployment(&cc, 2);
        for (what, d) in [("chat", &chat), ("gateway", &gateway)] {
            let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
            let volume = pod
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == "media")
                .unwrap_or_else(|| panic!("{what} has no media volume"));
            let claim = volume.persistent_volume_claim.as_ref().unwrap();
            assert_eq!(claim.claim_name, "chat-media", "{what}");
            let mount = pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == "media")
                .unwrap();
            assert_eq!(mount.mount_path, crate::crd::MEDIA_MOUNT, "{what}");
            let env = env_of(d);
            assert_eq!(
                value_of(&env, "PARLEY_MEDIA_DIR").as_deref(),
                Some(crate::crd::MEDIA_MOUNT),
                "{what}"
            );
            let key = env.iter().find(|e| e.name == "PARLEY_MEDIA_KEY").unwrap();
            assert!(key.value.is_none(), "{what}: the key comes from the Secret");
            let from = key.value_from.as_ref().unwrap().secret_key_ref.as_ref();
            assert_eq!(
                from.map(|s| (s.name.as_str(), s.key.as_str())),
                Some(("media-key", "key"))
            );
            assert!(!env.iter().any(|e| e.name.starts_with("PARLEY_MEDIA_S3_")));
        }
        assert_eq!(
            value_of(&env_of(&chat), "PARLEY_MEDIA_PUBLIC_URL").as_deref(),
            Some("https://chat.example.com:7404")
        );
        // The gateways serve it on the route port, which TLS leaves alone.
        cc.spec.gateway.tls_secret_name = Some("chat-tls".into());
        let pod = gateway_deployment(&cc, 2)
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        let names: Vec<_> = pod.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["tls", "media"]);
    }

    /// Why `pod` breaks the `restricted` Pod Security Standard (v1.33:
    /// the baseline checks, then the restricted ones), or ours on top (a
    /// read-only root filesystem, no service-account token).
    fn restricted_violations(pod: &PodSpec) -> Vec<String> {
        let mut why = Vec::new();
        let psc = pod.security_context.clone().unwrap_or_default();
        for (flag, name) in [
            (pod.host_network, "hostNetwork"),
            (pod.host_pid, "hostPID"),
            (pod.host_ipc, "hostIPC"),
        ] {
            if flag == Some(true) {
                why.push(name.to_owned());
            }
        }
        if pod.automount_service_account_token != Some(false) {
            why.push("a service-account token is mounted".into());
        }
        for v in pod.volumes.iter().flatten() {
            let allowed = v.config_map.is_some()
                || v.csi.is_some()
                || v.downward_api.is_some()
                || v.empty_dir.is_some()
                || v.ephemeral.is_some()
                || v.persistent_volume_claim.is_some()
                || v.projected.is_some()
                || v.secret.is_some();
            if !allowed {
                why.push(format!("volume {} is of a kind not allowed", v.name));
            }
        }
        let pod_seccomp = psc.seccomp_profile.as_ref().map(|p| p.type_.clone());
        if psc.run_as_user == Some(0) {
            why.push("the pod runs as root".into());
        }
        for c in &pod.containers {
            let sc = c.security_context.clone().unwrap_or_default();
            let name = &c.name;
            if sc.privileged == Some(true) {
                why.push(format!("{name}: privileged"));
            }
            if sc.allow_privilege_escalation != Some(false) {
                why.push(format!("{name}: allowPrivilegeEscalation is not false"));
            }
            if sc.run_as_non_root.or(psc.run_as_non_root) != Some(true) {
                why.push(format!("{name}: runAsNonRoot is not true"));
            }
            if sc.run_as_user == Some(0) {
                why.push(format!("{name}: runs as root"));
            }
            let seccomp = sc.seccomp_profile.map(|p| p.type_).or(pod_seccomp.clone());
            if !matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")) {
                why.push(format!("{name}: seccomp profile {seccomp:?}"));
            }
            let caps = sc.capabilities.unwrap_or_default();
            if !caps.drop.unwrap_or_default().iter().any(|d| d == "ALL") {
                why.push(format!("{name}: capabilities not all dropped"));
            }
            if caps
                .add
                .unwrap_or_default()
                .iter()
                .any(|a| a != "NET_BIND_SERVICE")
            {
                why.push(format!("{name}: a capability added"));
            }
            if sc.read_only_root_filesystem != Some(true) {
                why.push(format!("{name}: the root filesystem is writable"));
            }
            for p in c.ports.iter().flatten() {
                if p.host_port.unwrap_or(0) != 0 {
                    why.push(format!("{name}: hostPort {}", p.host_port.unwrap_or(0)));
                }
            }
        }
        why
    }

    /// The gateway and chat pods pass the `restricted` Pod Security
    /// Standard in every shape the operator renders them (TLS, WebSocket,
    /// a shared media volume), except the gateway publishing by hostPort,
    /// which only a `privileged` namespace admits (as docs/operations.md
    /// says).
    const PUSH: &str = "replicas: 2\napns:\n  key: {name: apple, key: AuthKey.p8}\n  \
                        keyId: ABCDE12345\n  teamId: TEAM123456\n  sandbox: true\nfcm:\n  \
                        credentials: {name: google, key: sa.json}\nwebhook:\n  \
                        url: https://push.example.com/hook\n  secret: {name: hook, key: secret}\n";

    #[test]
    fn a_change_of_the_shared_settings_rolls_every_pod() {
        let mut cc = cluster();
        cc.spec.push = Some(serde_yaml::from_str(PUSH).unwrap());
        let hashes = |cc: &ChatCluster| {
            [
                gateway_deployment(cc, 2),
                chat_deployment(cc),
                push_deployment(cc).unwrap(),
            ]
            .map(|d| {
                d.spec
                    .unwrap()
                    .template
                    .metadata
                    .unwrap()
                    .annotations
                    .unwrap()[CONFIG_HASH]
                    .clone()
            })
        };
        let before = hashes(&cc);
        assert!(
            before.iter().all(|h| *h == before[0]),
            "one hash of one ConfigMap"
        );
        cc.spec.chat.replicas += 1;
        assert_eq!(
            hashes(&cc),
            before,
            "what is not in the ConfigMap rolls nothing"
        );
        cc.spec.redis.url = Some("redis://other:6379/".into());
        let after = hashes(&cc);
        assert!(
            after.iter().all(|h| *h != before[0]),
            "a new Redis URL rolls them all"
        );
    }

    #[test]
    fn push_senders_take_each_providers_credentials_from_its_secret() {
        let mut cc = cluster();
        assert!(push_deployment(&cc).is_none(), "no spec.push, no senders");
        cc.spec.push = Some(serde_yaml::from_str(PUSH).unwrap());
        let d = push_deployment(&cc).unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("chat-push"));
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        let env: BTreeMap<String, EnvVar> = c
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect();
        let value = |n: &str| env[n].value.clone().unwrap_or_default();
        assert_eq!(
            value("PARLEY_APNS_KEY_FILE"),
            "/etc/parley/push/apns/apns-key.p8"
        );
        assert_eq!(value("PARLEY_APNS_KEY_ID"), "ABCDE12345");
        assert_eq!(value("PARLEY_APNS_ENDPOINT"), "sandbox");
        assert_eq!(
            value("PARLEY_FCM_CREDENTIALS_FILE"),
            "/etc/parley/push/fcm/fcm-service-account.json"
        );
        assert_eq!(
            value("PARLEY_PUSH_WEBHOOK_URL"),
            "https://push.example.com/hook"
        );
        let secret = env["PARLEY_PUSH_WEBHOOK_SECRET"]
            .value_from
            .clone()
            .unwrap()
            .secret_key_ref
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("hook", "secret")
        );
        assert!(
            env["PARLEY_PUSH_WEBHOOK_SECRET"].value.is_none(),
            "never inline"
        );
        let volumes = pod.volumes.unwrap();
        let files: Vec<(String, String, String)> = volumes
            .iter()
            .map(|v| {
                let s = v.secret.clone().unwrap();
                let item = s.items.unwrap()[0].clone();
                (s.secret_name.unwrap(), item.key, item.path)
            })
            .collect();
        assert_eq!(
            files,
            [
                ("apple".into(), "AuthKey.p8".into(), "apns-key.p8".into()),
                (
                    "google".into(),
                    "sa.json".into(),
                    "fcm-service-account.json".into()
                ),
            ]
        );
        let mounts = c.volume_mounts.clone().unwrap();
        assert!(mounts.iter().all(|m| m.read_only == Some(true)));
        assert!(manifests(&cc, 2).contains("name: chat-push"));
    }

    #[test]
    fn pods_pass_the_restricted_pod_security_standard() {
        let mut cc = cluster();
        cc.spec.push = Some(serde_yaml::from_str(PUSH).unwrap());
        let pods = |cc: &ChatCluster| {
            [gateway_deployment(cc, 2), chat_deployment(cc)]
                .map(|d| d.spec.unwrap().template.spec.unwrap())
        };
        let push = push_deployment(&cc)
            .unwrap()
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert_eq!(restricted_violations(&push), Vec::<String>::new());
        for pod in pods(&cc) {
            assert_eq!(restricted_violations(&pod), Vec::<String>::new());
        }
        cc.spec.gateway.tls_secret_name = Some("chat-tls".into());
        cc.spec.gateway.ports.websocket = Some(443);
        let yaml = "volume:\n  claimName: chat-media\n  signingKey: {name: k, key: k}\n  \
                    publicUrl: https://chat.example.com:7404\n";
        cc.spec.media = Some(serde_yaml::from_str(yaml).unwrap());
        for pod in pods(&cc) {
            assert_eq!(restricted_violations(&pod), Vec::<String>::new());
            assert_eq!(
                pod.security_context.unwrap().fs_group,
                Some(RUN_AS),
                "the media volume is writable by the user the pod runs as"
            );
        }
        cc.spec.gateway.publish.mode = PublishMode::HostPort;
        let [gateway, chat] = pods(&cc);
        let why = restricted_violations(&gateway);
        assert!(
            why.len() == 1 && why[0].contains("hostPort"),
            "only the hostPort: {why:?}"
        );
        assert_eq!(restricted_violations(&chat), Vec::<String>::new());
    }

    #[test]
    fn tls_adds_a_port_a_volume_and_advertises_it() {
        let mut cc = cluster();
        cc.spec.gateway.tls_secret_name = Some("chat-tls".into());
        cc.spec.gateway.ports.websocket = Some(443);
        let svc = gateway_service(&cc).spec.unwrap();
        assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
        let names: Vec<String> = svc
            .ports
            .unwrap()
            .into_iter()
            .filter_map(|p| p.name)
            .collect();
        assert_eq!(names, vec!["tcp", "route", "ws", "tls"]);
        let d = gateway_deployment(&cc, 2);
        let env = env_of(&d);
        let adv = env.iter().find(|e| e.name == "PARLEY_ADVERTISE").unwrap();
        assert_eq!(adv.value.as_deref(), Some("$(POD_IP):7443"));
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.volumes.unwrap()[0]
                .secret
                .as_ref()
                .unwrap()
                .secret_name
                .as_deref(),
            Some("chat-tls")
        );
    }

    #[test]
    fn the_chat_service_is_headless_and_the_selector_matches_the_pods() {
        let cc = cluster();
        assert_eq!(
            chat_service(&cc).spec.unwrap().cluster_ip.as_deref(),
            Some("None")
        );
        assert_eq!(
            gateway_selector(&cc),
            "app.kubernetes.io/name=parley,app.kubernetes.io/instance=chat,app.kubernetes.io/component=gateway"
        );
        let d = gateway_deployment(&cc, 1).spec.unwrap();
        let pod_labels = d.template.metadata.unwrap().labels.unwrap();
        for (k, v) in d.selector.match_labels.unwrap() {
            assert_eq!(pod_labels[&k], v);
        }
    }
}
