//! The `ChatCluster` resource (`parley.dev/v1alpha1`): what a platform team
//! declares, and what the operator reports back. The CRD in `crds/` is
//! generated from these types (`parley-operator crd`), and a test keeps the
//! file equal to them.

// Several `printcolumn(...)` attributes share argument names, which this
// lint mistakes for repeated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Parley instant-messaging cluster: gateways that hold client
/// connections, chat-service replicas, and the least-connections routing
/// table that sends each new client to the least-loaded gateway.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "parley.dev",
    version = "v1alpha1",
    kind = "ChatCluster",
    plural = "chatclusters",
    shortname = "chat",
    category = "parley",
    namespaced,
    status = "ChatClusterStatus",
    derive = "PartialEq",
    doc = "A Parley instant-messaging cluster: gateways, chat services and the routing table that spreads clients over the gateways.",
    scale(
        spec_replicas_path = ".spec.gateway.replicas",
        status_replicas_path = ".status.gateway.readyReplicas",
        label_selector_path = ".status.gateway.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.gateway.ready",
        description = "Ready gateways out of those wanted"
    ),
    printcolumn(
        name = "Online",
        type_ = "integer",
        json_path = ".status.gateway.connections",
        description = "Client connections on all gateways"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterSpec {
    /// Container images of the Parley processes.
    #[serde(default)]
    pub images: Images,
    /// The gateways: client connections, scaled on their online counts.
    #[serde(default)]
    pub gateway: GatewaySpec,
    /// The chat-service replicas.
    #[serde(default)]
    pub chat: ChatServiceSpec,
    /// PostgreSQL, the source of truth (`postgres://...`).
    pub postgres: Backend,
    /// Redis: presence, leases, the routing table, block lists.
    pub redis: Backend,
    /// RabbitMQ: deliveries between the processes, and events.
    pub rabbitmq: Backend,
    /// The secret that signs client tokens (at least 32 bytes); your app's
    /// backend mints tokens with the admin API.
    pub token_secret: SecretKeyRef,
    /// During a rotation of the signing secret, the previous one: tokens it
    /// signed are still accepted, so nobody is logged out. Remove it once
    /// every token it signed has expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_previous: Option<SecretKeyRef>,
    /// The key the admin API requires.
    pub admin_key: SecretKeyRef,
    /// Where photos, voice, video and files live: an S3-compatible bucket
    /// (MinIO, AWS S3, ...) that clients reach through presigned URLs, or
    /// a ReadWriteMany volume the gateways serve. Without it the chat
    /// services store no media and refuse uploads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaSpec>,
    /// Push notifications to users with no device online: the push
    /// senders (`parley-push`) and the providers they send through.
    /// Without it, nobody is woken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushSpec>,
}

/// The push senders and their providers' credentials (each from a Secret).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.apns) || has(self.fcm) || has(self.webhook)").message("push needs at least one of apns, fcm and webhook"))]
pub struct PushSpec {
    /// Sender replicas; they share one queue (default 1).
    #[serde(default = "default_push_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Apple Push Notification service, with a token-signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apns: Option<ApnsSpec>,
    /// Firebase Cloud Messaging (HTTP v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fcm: Option<FcmSpec>,
    /// The app's own push service, behind a signed webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
}

fn default_push_replicas() -> i32 {
    1
}

/// APNs with token-based authentication.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApnsSpec {
    /// The Secret key holding the .p8 key (PKCS#8 PEM) made in the Apple
    /// developer account.
    pub key: SecretKeyRef,
    /// The key's id and the team's id (10 characters each).
    #[schemars(length(min = 10, max = 10))]
    pub key_id: String,
    #[schemars(length(min = 10, max = 10))]
    pub team_id: String,
    /// Apple's development environment (apps built for development)
    /// instead of production.
    #[serde(default)]
    pub sandbox: bool,
}

/// FCM through a service account.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FcmSpec {
    /// The Secret key holding the service account's key file (JSON).
    pub credentials: SecretKeyRef,
}

/// The app's push webhook.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// Where notifications are POSTed.
    #[schemars(regex(pattern = r"^https?://[^\s/]+(/.*)?$"))]
    pub url: String,
    /// The Secret key holding the signing secret (`whsec_` and base64, or
    /// at least 24 bytes).
    pub secret: SecretKeyRef,
}

/// Where uploads live (an S3-compatible bucket, or a volume every chat
/// service and gateway mounts), and the upload rules.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.bucket) != has(self.volume)").message("media go to an S3 bucket or a shared volume: give bucket or volume, not both"))]
#[x_kube(validation = Rule::new("!has(self.bucket) || has(self.credentials)").message("an S3 bucket needs credentials"))]
pub struct MediaSpec {
    /// The S3-compatible bucket; it must exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 63))]
    pub bucket: Option<String>,
    /// The store's endpoint as the chat services reach it, e.g.
    /// `http://minio.minio.svc:9000`; omitted: AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s/]+(/.*)?$"))]
    pub endpoint: Option<String>,
    /// The endpoint clients on the internet reach the same store at, as
    /// presigned URLs name it; omitted: `endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s/]+(/.*)?$"))]
    pub public_endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// The Secret holding the bucket's credentials, under the keys
    /// `accessKey` and `secretKey` (or those named here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<S3Credentials>,
    /// Instead of a bucket: a volume the chat services and gateways all
    /// mount, that the gateways serve on their route port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<MediaVolume>,
    /// Upload rules; each omitted one keeps its default (see
    /// `docs/protocol.md`, "Media").
    #[serde(default, skip_serializing_if = "MediaLimitsSpec::is_empty")]
    pub limits: MediaLimitsSpec,
}

/// Uploads in a shared volume: the chat services check and record them,
/// the gateways take and serve the bytes at the URLs the chat services
/// sign.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaVolume {
    /// A PersistentVolumeClaim in the ChatCluster's namespace, with access
    /// mode ReadWriteMany (NFS, CephFS, EFS, ...).
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// The key URLs are signed with (at least 32 bytes).
    pub signing_key: SecretKeyRef,
    /// Where clients reach the gateways' route port, e.g.
    /// `https://chat.example.com:7404` (the gateway Service's `route`
    /// port): the signed URLs name it.
    #[schemars(regex(pattern = r"^https?://[^\s/]+(/.*)?$"))]
    pub public_url: String,
}

/// Where a shared media volume is mounted in the pods.
pub const MEDIA_MOUNT: &str = "/var/lib/parley/media";

fn default_region() -> String {
    "us-east-1".to_owned()
}

/// Where an S3 store's credentials are.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Credentials {
    #[schemars(length(min = 1))]
    pub secret_name: String,
    #[serde(default = "default_access_key_key")]
    pub access_key_key: String,
    #[serde(default = "default_secret_key_key")]
    pub secret_key_key: String,
}

fn default_access_key_key() -> String {
    "accessKey".to_owned()
}

fn default_secret_key_key() -> String {
    "secretKey".to_owned()
}

/// The upload rules, each as the chat service's flag of the same name.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaLimitsSpec {
    /// Largest image, voice, video and file upload, in MiB (defaults 20,
    /// 20, 500, 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_image_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_voice_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_video_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_file_mb: Option<u64>,
    /// Uploads one user may start in 24 hours, and their MiB (0: no
    /// quota; defaults 1000 and 5120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_uploads: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_mb: Option<u64>,
    /// Hours an upload no message uses is kept (default 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub unused_grace_hours: Option<u64>,
}

impl MediaLimitsSpec {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Each rule set, as the chat service's environment variable and value.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        [
            ("PARLEY_MEDIA_MAX_IMAGE_MB", self.max_image_mb),
            ("PARLEY_MEDIA_MAX_VOICE_MB", self.max_voice_mb),
            ("PARLEY_MEDIA_MAX_VIDEO_MB", self.max_video_mb),
            ("PARLEY_MEDIA_MAX_FILE_MB", self.max_file_mb),
            ("PARLEY_MEDIA_DAILY_UPLOADS", self.daily_uploads),
            ("PARLEY_MEDIA_DAILY_MB", self.daily_mb),
            ("PARLEY_MEDIA_UNUSED_GRACE_HOURS", self.unused_grace_hours),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name, v?.to_string())))
        .collect()
    }
}

/// Container images and how to pull them.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Images {
    #[serde(default = "default_gateway_image")]
    pub gateway: String,
    #[serde(default = "default_chat_image")]
    pub chat: String,
    #[serde(default = "default_push_image")]
    pub push: String,
    #[serde(default)]
    pub pull_policy: PullPolicy,
}

fn default_gateway_image() -> String {
    format!(
        "ghcr.io/parley-im/parley-gateway:{}",
        env!("CARGO_PKG_VERSION")
    )
}

fn default_chat_image() -> String {
    format!(
        "ghcr.io/parley-im/parley-chat:{}",
        env!("CARGO_PKG_VERSION")
    )
}

fn default_push_image() -> String {
    format!(
        "ghcr.io/parley-im/parley-push:{}",
        env!("CARGO_PKG_VERSION")
    )
}

impl Default for Images {
    fn default() -> Self {
        Self {
            gateway: default_gateway_image(),
            chat: default_chat_image(),
            push: default_push_image(),
            pull_policy: PullPolicy::default(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    #[default]
    LoadBalancer,
}

/// How each gateway pod is published to clients outside the cluster: the
/// address the routing table holds for it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishSpec {
    #[serde(default)]
    pub mode: PublishMode,
    /// `PodService`: the type of each pod's Service.
    #[serde(default)]
    pub pod_service_type: PodServiceType,
    /// `PodService`: annotations for each pod's Service (a cloud's load
    /// balancer settings); `{pod}` in a value becomes the pod's name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// `HostPort` and `PodService` with `NodePort`: which of the node's
    /// addresses clients use.
    #[serde(default)]
    pub node_address: NodeAddressType,
}

/// Rebalancing: the gateways more than `tolerancePercent` above the mean
/// hand their surplus on, through the route lookup, at most
/// `clientsPerSecond` together and one round per `periodSeconds`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    #[serde(default = "default_rebalance_rate")]
    #[schemars(range(min = 1))]
    pub clients_per_second: i32,
    #[serde(default = "default_rebalance_tolerance")]
    #[schemars(range(min = 1, max = 100))]
    pub tolerance_percent: i32,
    #[serde(default = "default_rebalance_period")]
    #[schemars(range(min = 5, max = 3600))]
    pub period_seconds: i64,
}

fn default_rebalance_rate() -> i32 {
    100
}
fn default_rebalance_tolerance() -> i32 {
    10
}
fn default_rebalance_period() -> i64 {
    30
}

/// How gateway pods are reached.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PublishMode {
    /// Only through the gateway Service; the routing table holds pod
    /// addresses, for clients inside the cluster.
    #[default]
    Shared,
    /// A Service of its own per pod (a load balancer or a node port),
    /// created with the pod and removed after it.
    PodService,
    /// The client port on the node's own address (`hostPort`): one gateway
    /// per node.
    HostPort,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PodServiceType {
    #[default]
    LoadBalancer,
    NodePort,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NodeAddressType {
    #[default]
    ExternalIP,
    InternalIP,
}

/// The gateways and how they scale.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("gateway.minReplicas must not exceed gateway.maxReplicas"))]
pub struct GatewaySpec {
    /// Set this (or let an HPA or KEDA set it through the scale
    /// subresource) to choose the gateway count yourself, within the
    /// bounds; leave it out and the operator scales on online connections.
    /// Either way the operator picks which pods go, and drains them first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Client connections one gateway pod should carry.
    #[serde(default = "default_target_connections")]
    #[schemars(range(min = 1))]
    pub target_connections: i64,
    /// Headroom over the current load before scaling up, in percent.
    #[serde(default = "default_buffer_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub buffer_percent: i32,
    /// How long load must stay low before a scale-down (the highest
    /// recommendation within this window wins).
    #[serde(default = "default_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i64,
    /// At most this many pods go per scale-down period.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1))]
    pub scale_down_pods_per_period: i32,
    #[serde(default = "default_scale_down_period")]
    #[schemars(range(min = 1, max = 3600))]
    pub scale_down_period_seconds: i64,
    /// Clients a draining gateway moves away per second.
    #[serde(default = "default_drain_rate")]
    #[schemars(range(min = 1))]
    pub drain_rate_per_second: i32,
    /// A drain that takes longer is cut short: the pod goes anyway.
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 10, max = 7200))]
    pub drain_timeout_seconds: i64,
    #[serde(default)]
    pub ports: GatewayPorts,
    /// How clients reach the gateways.
    #[serde(default)]
    pub service_type: ServiceType,
    /// How each gateway is reached on its own, for the route lookup to
    /// hand out (clients outside the cluster cannot use pod addresses).
    #[serde(default)]
    pub publish: PublishSpec,
    /// Hand clients from the busiest gateways on to the others (after a
    /// scale-up, new gateways otherwise fill only as clients reconnect);
    /// off when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceSpec>,
    /// TLS for clients across the internet: a `kubernetes.io/tls` Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Limits against abuse, counted across all gateways; each left out
    /// keeps the gateway's default.
    #[serde(default, skip_serializing_if = "LimitsSpec::is_empty")]
    pub limits: LimitsSpec,
    /// Time a gateway gets to drain when it is stopped.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 5, max = 3600))]
    pub termination_grace_period_seconds: i64,
}

fn default_min_replicas() -> i32 {
    2
}
fn default_max_replicas() -> i32 {
    10
}
fn default_target_connections() -> i64 {
    10_000
}
fn default_buffer_percent() -> i32 {
    10
}
fn default_stabilization() -> i64 {
    300
}
fn default_one() -> i32 {
    1
}
fn default_scale_down_period() -> i64 {
    60
}
fn default_drain_rate() -> i32 {
    500
}
fn default_drain_timeout() -> i64 {
    600
}
fn default_grace() -> i64 {
    60
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            replicas: None,
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_connections: default_target_connections(),
            buffer_percent: default_buffer_percent(),
            scale_down_stabilization_seconds: default_stabilization(),
            scale_down_pods_per_period: default_one(),
            scale_down_period_seconds: default_scale_down_period(),
            drain_rate_per_second: default_drain_rate(),
            drain_timeout_seconds: default_drain_timeout(),
            ports: GatewayPorts::default(),
            service_type: ServiceType::default(),
            publish: PublishSpec::default(),
            rebalance: None,
            tls_secret_name: None,
            resources: None,
            limits: LimitsSpec::default(),
            termination_grace_period_seconds: default_grace(),
        }
    }
}

/// Ports of the gateway Service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPorts {
    /// Length-prefixed frames over TCP.
    #[serde(default = "default_tcp_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub tcp: i32,
    /// WebSocket; none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub websocket: Option<i32>,
    /// TLS (needs `tlsSecretName`).
    #[serde(default = "default_tls_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub tls: i32,
    /// The route lookup, `GET /route` over HTTP: the least-loaded gateways
    /// for a client to connect to.
    #[serde(default = "default_route_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub route: i32,
}

fn default_tcp_port() -> i32 {
    7400
}
fn default_tls_port() -> i32 {
    7443
}
fn default_route_port() -> i32 {
    7404
}

impl Default for GatewayPorts {
    fn default() -> Self {
        Self {
            tcp: default_tcp_port(),
            websocket: None,
            tls: default_tls_port(),
            route: default_route_port(),
        }
    }
}

/// The chat-service replicas.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatServiceSpec {
    #[serde(default = "default_chat_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_chat_replicas() -> i32 {
    2
}

impl Default for ChatServiceSpec {
    fn default() -> Self {
        Self {
            replicas: default_chat_replicas(),
            resources: None,
        }
    }
}

/// Where a backend is: a URL, or a key of a Secret holding the URL (for
/// URLs with passwords).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.secretRef)").message("give either url or secretRef, not both"))]
pub struct Backend {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// The gateways' limits (see `docs/protocol.md`, "Limits a client should
/// know"). Rates are `N/SECONDS` (at most N in any SECONDS, SECONDS up to
/// 86400) or `off`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Logins from one IP address, all users together (default 600/60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^(off|[1-9][0-9]{0,8}/([1-9][0-9]{0,3}|[1-7][0-9]{4}|8[0-5][0-9]{3}|86[0-3][0-9]{2}|86400))$"
    ))]
    pub logins_per_ip: Option<String>,
    /// Logins of one user, all devices together (default 60/60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^(off|[1-9][0-9]{0,8}/([1-9][0-9]{0,3}|[1-7][0-9]{4}|8[0-5][0-9]{3}|86[0-3][0-9]{2}|86400))$"
    ))]
    pub logins_per_user: Option<String>,
    /// Sends of one user (default 1000/10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^(off|[1-9][0-9]{0,8}/([1-9][0-9]{0,3}|[1-7][0-9]{4}|8[0-5][0-9]{3}|86[0-3][0-9]{2}|86400))$"
    ))]
    pub sends_per_user: Option<String>,
    /// History pages, catch-up requests and lists of one user (default 300/10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^(off|[1-9][0-9]{0,8}/([1-9][0-9]{0,3}|[1-7][0-9]{4}|8[0-5][0-9]{3}|86[0-3][0-9]{2}|86400))$"
    ))]
    pub reads_per_user: Option<String>,
    /// Group operations, direct conversations opened, blocks and log-outs
    /// of one user (default 120/60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^(off|[1-9][0-9]{0,8}/([1-9][0-9]{0,3}|[1-7][0-9]{4}|8[0-5][0-9]{3}|86[0-3][0-9]{2}|86400))$"
    ))]
    pub group_ops_per_user: Option<String>,
    /// Upload slots asked for by one user (default 60/60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^(off|[1-9][0-9]{0,8}/([1-9][0-9]{0,3}|[1-7][0-9]{4}|8[0-5][0-9]{3}|86[0-3][0-9]{2}|86400))$"
    ))]
    pub uploads_per_user: Option<String>,
    /// Devices of one user online at once, a number or `off` (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(off|[1-9][0-9]{0,8})$"))]
    pub devices_per_user: Option<String>,
}

impl LimitsSpec {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Each limit set, as the gateway's environment variable and value.
    pub fn env(&self) -> Vec<(&'static str, &str)> {
        [
            ("PARLEY_LIMIT_LOGINS_PER_IP", &self.logins_per_ip),
            ("PARLEY_LIMIT_LOGINS_PER_USER", &self.logins_per_user),
            ("PARLEY_LIMIT_SENDS_PER_USER", &self.sends_per_user),
            ("PARLEY_LIMIT_READS_PER_USER", &self.reads_per_user),
            ("PARLEY_LIMIT_GROUP_OPS_PER_USER", &self.group_ops_per_user),
            ("PARLEY_LIMIT_UPLOADS_PER_USER", &self.uploads_per_user),
            ("PARLEY_LIMIT_DEVICES_PER_USER", &self.devices_per_user),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name, v.as_deref()?)))
        .collect()
    }
}

/// A key of a Secret in the ChatCluster's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub key: String,
}

/// What the operator observed and did.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Running, Scaling or Degraded.
    #[serde(default)]
    pub phase: String,
    /// Ready, Progressing, Degraded, RoutingTableSynced and ScaleLimited,
    /// one each.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub gateway: GatewayStatus,
    #[serde(default)]
    pub chat: ChatStatus,
    /// The push senders, while `spec.push` asks for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<ChatStatus>,
    #[serde(default)]
    pub routing_table: RoutingTableStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleDecisionStatus>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    pub desired_replicas: i32,
    pub ready_replicas: i32,
    /// "ready/desired", for `kubectl get`.
    pub ready: String,
    /// The pods' label selector, for the scale subresource.
    pub selector: String,
    /// Client connections on all gateways.
    pub connections: i64,
    #[serde(default)]
    pub pods: Vec<GatewayPodStatus>,
    #[serde(default)]
    pub drains: Vec<DrainStatus>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPodStatus {
    pub name: String,
    pub address: String,
    /// Where clients outside the cluster reach it (published modes), once
    /// known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_address: Option<String>,
    pub connections: i64,
    pub ready: bool,
    pub state: PodState,
}

/// Where a gateway pod is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PodState {
    #[default]
    Active,
    Draining,
    Terminating,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainStatus {
    pub pod: String,
    pub started: Option<Time>,
    /// Clients still connected.
    pub remaining: i64,
    #[serde(default)]
    pub phase: DrainPhase,
    /// When the pod was handed to the Deployment to remove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Time>,
}

/// Where a drain is: out of the routing table while routes settle, moving
/// its clients away, or released (marked to go first, the replica count
/// lowered) and waiting for the pod to be gone.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DrainPhase {
    #[default]
    Unrouted,
    Moving,
    Released,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatStatus {
    pub desired_replicas: i32,
    pub ready_replicas: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingTableStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_written: Option<Time>,
    pub entries: i32,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDecisionStatus {
    pub from: i32,
    pub to: i32,
    pub reason: String,
    pub at: Option<Time>,
}

/// The CRD as YAML, as `crds/` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let mut out = String::from(
        "# Generated by `parley-operator crd` from operator/src/crd.rs; do not edit.\n",
    );
    out.push_str(&serde_yaml::to_string(&ChatCluster::crd()).expect("a CRD serializes"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crd_files_are_what_the_types_generate() {
        // The plain install and the Helm chart carry the same CRD.
        for file in [
            "crds/chatclusters.parley.dev.yaml",
            "charts/parley-operator/crds/chatclusters.parley.dev.yaml",
        ] {
            let path = format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                text == crd_yaml(),
                "{file} is stale: run `cargo run -p parley-operator -- crd > {file}`"
            );
        }
    }

    #[test]
    fn a_minimal_resource_takes_the_defaults() {
        let yaml = include_str!("../../examples/chatcluster.yaml");
        let c: ChatCluster = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(c.spec.gateway, GatewaySpec::default());
        assert_eq!(c.spec.gateway.service_type, ServiceType::LoadBalancer);
        assert_eq!(c.spec.chat.replicas, 2);
        assert!(c.spec.images.gateway.contains("parley-gateway"));
    }

    #[test]
    fn the_schema_carries_its_validation_rules() {
        let yaml = crd_yaml();
        assert!(yaml.contains("self.minReplicas <= self.maxReplicas"));
        assert!(yaml.contains("has(self.url) != has(self.secretRef)"));
        assert!(yaml.contains("has(self.bucket) != has(self.volume)"));
        assert!(yaml.contains("x-kubernetes-list-map-keys"));
        assert!(yaml.contains("specReplicasPath: .spec.gateway.replicas"));
    }
}
