//! How each gateway pod is reached from outside the cluster
//! (`spec.gateway.publish`), as pure functions: the per-pod Services of the
//! `PodService` mode, the public address of each pod in every mode, and the
//! Services left behind by pods that are gone. The controller lists, applies
//! and deletes; the routing table then holds these addresses instead of the
//! pods' own, so what the route lookup answers is something a client on the
//! internet can connect to.
//!
//! - `Shared`: no address of its own; the table holds pod addresses (for
//!   clients inside the cluster) and outside clients use the gateway
//!   Service's load balancer.
//! - `PodService`: a Service per pod, `LoadBalancer` (the load balancer's
//!   address and the client port) or `NodePort` (the pod's node's address
//!   and the node port). Fits tens of gateways on a cloud (each load
//!   balancer costs), or nodes with public addresses.
//! - `HostPort`: the client port bound on the node (`hostPort`), so the
//!   address is the node's and the port the client port. Fits bare metal and
//!   large fleets: nothing per pod to provision; one gateway per node.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceSpec};
use kube::ResourceExt;

use crate::crd::{ChatCluster, NodeAddressType, PodServiceType, PublishMode};
use crate::desired::{self, GATEWAY_TCP, GATEWAY_TLS, GATEWAY_WS};

/// The label that names a gateway pod, for its own Service to select it
/// (a Deployment's pods have no stable label of their own).
pub const POD_LABEL: &str = "parley.dev/gateway-pod";
/// The component label of the per-pod Services.
pub const COMPONENT: &str = "gateway-public";

/// The client port a published gateway is reached on (in the pod), and its
/// number outside (the Service's or the host's): TLS when the gateways have
/// a certificate, else plain TCP.
pub fn client_port(cc: &ChatCluster) -> (&'static str, i32, i32) {
    let g = &cc.spec.gateway;
    if g.tls_secret_name.is_some() {
        ("tls", GATEWAY_TLS, g.ports.tls)
    } else {
        ("tcp", GATEWAY_TCP, g.ports.tcp)
    }
}

/// The Service of one gateway pod (`PodService` mode), named after it.
pub fn pod_service(cc: &ChatCluster, pod: &str) -> Service {
    let g = &cc.spec.gateway;
    let p = &g.publish;
    let (name, target, port) = client_port(cc);
    let mut ports = vec![desired::svc_port(name, port, target)];
    if let Some(ws) = g.ports.websocket {
        ports.push(desired::svc_port("ws", ws, GATEWAY_WS));
    }
    let mut meta = desired::meta(cc, pod.to_owned(), COMPONENT);
    meta.labels
        .get_or_insert_default()
        .insert(POD_LABEL.to_owned(), pod.to_owned());
    if !p.annotations.is_empty() {
        meta.annotations = Some(
            p.annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.replace("{pod}", pod)))
                .collect(),
        );
    }
    let mut selector = desired::gateway_selector_labels(cc);
    selector.insert(POD_LABEL.to_owned(), pod.to_owned());
    let type_ = match p.pod_service_type {
        PodServiceType::LoadBalancer => "LoadBalancer",
        PodServiceType::NodePort => "NodePort",
    };
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(type_.to_owned()),
            selector: Some(selector),
            ports: Some(ports),
            // The client's own address reaches the gateway, and no second
            // hop through another node.
            external_traffic_policy: Some("Local".to_owned()),
            ..ServiceSpec::default()
        }),
        ..Default::default()
    }
}

/// Whether `svc` is one of this cluster's per-pod Services.
pub fn is_pod_service(cc: &ChatCluster, svc: &Service) -> bool {
    let labels = svc.labels();
    labels
        .get("app.kubernetes.io/component")
        .map(String::as_str)
        == Some(COMPONENT)
        && labels.get("app.kubernetes.io/instance") == Some(&cc.name_any())
        && labels.contains_key(POD_LABEL)
}

/// The per-pod Services whose pod is gone, or all of them when the mode is
/// no longer `PodService`: to delete. A pod that is draining or terminating
/// still exists, and keeps its Service until it is gone.
pub fn stale_services<'a>(
    cc: &ChatCluster,
    services: &'a [Service],
    pods: &[&str],
) -> Vec<&'a str> {
    let keep = cc.spec.gateway.publish.mode == PublishMode::PodService;
    services
        .iter()
        .filter(|s| is_pod_service(cc, s))
        .filter(|s| {
            let pod = s.labels().get(POD_LABEL).map(String::as_str).unwrap_or("");
            !keep || !pods.contains(&pod)
        })
        .filter_map(|s| s.metadata.name.as_deref())
        .collect()
}

/// `host:port`, with brackets around an IPv6 host.
fn join(host: &str, port: i32) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The address of a node of the kind the spec asks for.
fn node_address(node: &Node, kind: NodeAddressType) -> Option<&str> {
    let want = match kind {
        NodeAddressType::ExternalIP => "ExternalIP",
        NodeAddressType::InternalIP => "InternalIP",
    };
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == want)
        .map(|a| a.address.as_str())
}

/// Where a client outside the cluster reaches `pod`, once that is known:
/// None in `Shared` mode, before the load balancer has an address, before
/// the pod is scheduled, or when its node has no address of that kind.
pub fn public_address(
    cc: &ChatCluster,
    pod: &Pod,
    service: Option<&Service>,
    nodes: &BTreeMap<String, Node>,
) -> Option<String> {
    let p = &cc.spec.gateway.publish;
    let on_node = || {
        let node = nodes.get(pod.spec.as_ref()?.node_name.as_deref()?)?;
        node_address(node, p.node_address)
    };
    let (port_name, _, port) = client_port(cc);
    match p.mode {
        PublishMode::Shared => None,
        PublishMode::HostPort => Some(join(on_node()?, port)),
        PublishMode::PodService => {
            let svc = service?;
            match p.pod_service_type {
                PodServiceType::LoadBalancer => {
                    let ingress = svc
                        .status
                        .as_ref()?
                        .load_balancer
                        .as_ref()?
                        .ingress
                        .as_ref()?
                        .first()?;
                    let host = ingress.ip.as_deref().or(ingress.hostname.as_deref())?;
                    Some(join(host, port))
                }
                PodServiceType::NodePort => {
                    let node_port = svc
                        .spec
                        .as_ref()?
                        .ports
                        .as_ref()?
                        .iter()
                        .find(|sp| sp.name.as_deref() == Some(port_name))?
                        .node_port?;
                    Some(join(on_node()?, node_port))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, NodeAddress, NodeStatus, PodSpec, ServiceStatus,
    };
    use kube::api::ObjectMeta;

    use super::*;
    use crate::crd::PublishSpec;

    fn cluster(publish: PublishSpec) -> ChatCluster {
        let mut cc: ChatCluster =
            serde_yaml::from_str(include_str!("../../examples/chatcluster.yaml")).unwrap();
        cc.metadata.uid = Some("uid-im".into());
        cc.spec.gateway.publish = publish;
        cc
    }

    fn pod(name: &str, node: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn node(name: &str, external: &str, internal: &str) -> (String, Node) {
        let addr = |t: &str, a: &str| NodeAddress {
            type_: t.into(),
            address: a.into(),
        };
        let n = Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![
                    addr("InternalIP", internal),
                    addr("ExternalIP", external),
                ]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        (name.to_owned(), n)
    }

    #[test]
    fn a_pod_service_selects_its_pod_and_carries_the_annotations() {
        let cc = cluster(PublishSpec {
            mode: PublishMode::PodService,
            annotations: BTreeMap::from([(
                "external-dns.alpha.kubernetes.io/hostname".to_owned(),
                "{pod}.chat.example.com".to_owned(),
            )]),
            ..PublishSpec::default()
        });
        let svc = pod_service(&cc, "im-gateway-7d-x2");
        assert_eq!(svc.name_any(), "im-gateway-7d-x2");
        assert_eq!(
            svc.annotations()["external-dns.alpha.kubernetes.io/hostname"],
            "im-gateway-7d-x2.chat.example.com"
        );
        let spec = svc.spec.clone().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.selector.unwrap()[POD_LABEL], "im-gateway-7d-x2");
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        let ports = spec.ports.unwrap();
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port),
            (Some("tcp"), 7400)
        );
        assert_eq!(
            svc.metadata.owner_references.unwrap()[0].uid,
            "uid-im",
            "owned by the ChatCluster: it goes with it"
        );
        assert!(is_pod_service(&cc, &pod_service(&cc, "p")));
    }

    #[test]
    fn services_of_pods_that_are_gone_are_stale_and_all_are_when_the_mode_changes() {
        let mut cc = cluster(PublishSpec {
            mode: PublishMode::PodService,
            ..PublishSpec::default()
        });
        let services = vec![
            pod_service(&cc, "a"),
            pod_service(&cc, "b"),
            desired::gateway_service(&cc),
        ];
        assert_eq!(stale_services(&cc, &services, &["a"]), vec!["b"]);
        assert!(stale_services(&cc, &services, &["a", "b"]).is_empty());
        cc.spec.gateway.publish.mode = PublishMode::Shared;
        assert_eq!(stale_services(&cc, &services, &["a", "b"]), vec!["a", "b"]);
    }

    #[test]
    fn each_mode_finds_the_address_a_client_outside_can_use() {
        let nodes = BTreeMap::from([node("n1", "198.51.100.7", "10.0.0.7")]);
        let p = pod("a", "n1");

        let shared = cluster(PublishSpec::default());
        assert_eq!(public_address(&shared, &p, None, &nodes), None);

        let mut host = cluster(PublishSpec {
            mode: PublishMode::HostPort,
            ..PublishSpec::default()
        });
        assert_eq!(
            public_address(&host, &p, None, &nodes).as_deref(),
            Some("198.51.100.7:7400")
        );
        host.spec.gateway.publish.node_address = NodeAddressType::InternalIP;
        host.spec.gateway.tls_secret_name = Some("tls".into());
        assert_eq!(
            public_address(&host, &p, None, &nodes).as_deref(),
            Some("10.0.0.7:7443"),
            "the TLS port once there is a certificate"
        );
        assert_eq!(public_address(&host, &pod("b", "gone"), None, &nodes), None);

        let lb = cluster(PublishSpec {
            mode: PublishMode::PodService,
            ..PublishSpec::default()
        });
        let mut svc = pod_service(&lb, "a");
        assert_eq!(
            public_address(&lb, &p, Some(&svc), &nodes),
            None,
            "no address before the load balancer has one"
        );
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("2001:db8::10".into()),
                    ..LoadBalancerIngress::default()
                }]),
            }),
            ..ServiceStatus::default()
        });
        assert_eq!(
            public_address(&lb, &p, Some(&svc), &nodes).as_deref(),
            Some("[2001:db8::10]:7400")
        );

        let np = cluster(PublishSpec {
            mode: PublishMode::PodService,
            pod_service_type: PodServiceType::NodePort,
            ..PublishSpec::default()
        });
        let mut svc = pod_service(&np, "a");
        assert_eq!(public_address(&np, &p, Some(&svc), &nodes), None);
        svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(31001);
        assert_eq!(
            public_address(&np, &p, Some(&svc), &nodes).as_deref(),
            Some("198.51.100.7:31001")
        );
    }
}
