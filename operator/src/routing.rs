//! The least-connections routing table, owned by the operator: which
//! gateway pods belong in it (ready, not terminating, not draining), scored
//! by the online count each reports in its lease, written to Redis in one
//! atomic replace so a route lookup never sees it half written, with the
//! entries of pods that are gone simply absent.

use std::collections::HashMap;

use parley_redis::Lease;
use parley_redis::RedisState;

use crate::scaling::PodLoad;

/// A gateway pod as the API server shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPod {
    pub name: String,
    pub ready: bool,
    pub terminating: bool,
    /// The operator is draining it.
    pub draining: bool,
}

/// Joins the pods with their leases: what scaling and status work from.
/// A pod without a live lease has reported no count.
pub fn loads(pods: &[GatewayPod], leases: &[Lease]) -> Vec<(PodLoad, Option<String>)> {
    let by_name: HashMap<&str, &Lease> = leases.iter().map(|l| (l.gateway.as_str(), l)).collect();
    pods.iter()
        .map(|p| {
            let lease = by_name.get(p.name.as_str());
            (
                PodLoad {
                    name: p.name.clone(),
                    connections: lease.map(|l| l.connections),
                    ready: p.ready,
                    draining: p.draining,
                    terminating: p.terminating,
                },
                lease.map(|l| l.address.clone()),
            )
        })
        .collect()
}

/// The routing table's entries: ready pods that stay, with a live lease,
/// scored by their connections; sorted for a stable write.
pub fn entries(loads: &[(PodLoad, Option<String>)]) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = loads
        .iter()
        .filter(|(p, _)| p.ready && !p.draining && !p.terminating)
        .filter_map(|(p, addr)| Some((addr.clone()?, p.connections?)))
        .collect();
    out.sort();
    out
}

/// The same pods with the addresses clients outside the cluster use: a pod
/// without one yet (a load balancer still being made) has none, and stays
/// out of the table until it has.
pub fn published(
    loads: &[(PodLoad, Option<String>)],
    public: &std::collections::BTreeMap<String, String>,
) -> Vec<(PodLoad, Option<String>)> {
    loads
        .iter()
        .map(|(p, _)| (p.clone(), public.get(&p.name).cloned()))
        .collect()
}

/// (public address, the pod's own) for each published pod with a lease.
pub fn via(
    loads: &[(PodLoad, Option<String>)],
    public: &std::collections::BTreeMap<String, String>,
) -> Vec<(String, String)> {
    loads
        .iter()
        .filter_map(|(p, own)| Some((public.get(&p.name)?.clone(), own.clone()?)))
        .collect()
}

/// Reads the pods' leases and writes the table; returns its entries.
pub async fn sync(
    redis: &RedisState,
    pods: &[GatewayPod],
) -> Result<Vec<(String, u64)>, parley_core::ChatError> {
    let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    let leases = redis.leases(&names).await?;
    let table = entries(&loads(pods, &leases));
    redis.replace_routes(&table, &[]).await?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use parley_redis::testing::TestRedis;

    use super::*;

    fn pod(name: &str) -> GatewayPod {
        GatewayPod {
            name: name.into(),
            ready: true,
            terminating: false,
            draining: false,
        }
    }

    #[tokio::test]
    async fn the_table_holds_ready_staying_pods_by_connections_and_nothing_else() {
        let t = TestRedis::new();
        let redis = RedisState::new(&t.url, &t.prefix).unwrap();
        let ttl = Duration::from_secs(30);
        // Gateways under the operator write only their leases.
        for (g, addr, n) in [
            ("gw-a", "10.0.0.1:7400", 30),
            ("gw-b", "10.0.0.2:7400", 10),
            ("gw-c", "10.0.0.3:7400", 5),
            ("gw-d", "10.0.0.4:7400", 1),
        ] {
            redis.announce(g, addr, n, ttl, false, true).await.unwrap();
        }
        assert!(
            redis.routes().await.unwrap().is_empty(),
            "gateways left the table alone"
        );
        // An entry of a pod long gone.
        redis
            .replace_routes(&[("10.9.9.9:7400".into(), 0)], &[])
            .await
            .unwrap();

        let mut draining = pod("gw-c");
        draining.draining = true;
        let mut leaving = pod("gw-d");
        leaving.terminating = true;
        let mut unready = pod("gw-e");
        unready.ready = false;
        let pods = [
            pod("gw-a"),
            pod("gw-b"),
            draining,
            leaving,
            unready,
            pod("gw-no-lease"),
        ];
        let table = sync(&redis, &pods).await.unwrap();
        assert_eq!(
            table,
            vec![
                ("10.0.0.1:7400".to_owned(), 30),
                ("10.0.0.2:7400".to_owned(), 10)
            ]
        );
        let written = redis.routes().await.unwrap();
        assert_eq!(
            written,
            vec![
                ("10.0.0.2:7400".to_owned(), 10.0),
                ("10.0.0.1:7400".to_owned(), 30.0)
            ]
        );
        // The gateways' route lookup reads what the operator wrote.
        assert_eq!(
            redis.route(&[]).await.unwrap().first().map(String::as_str),
            Some("10.0.0.2:7400")
        );
        // A draining gateway under the operator still takes itself out.
        redis
            .announce("gw-b", "10.0.0.2:7400", 10, ttl, true, true)
            .await
            .unwrap();
        let left: Vec<String> = redis
            .routes()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(left, vec!["10.0.0.1:7400"]);
        // No pods: an empty table.
        assert!(sync(&redis, &[]).await.unwrap().is_empty());
        assert!(redis.routes().await.unwrap().is_empty());
    }

    #[test]
    fn loads_carry_counts_only_from_live_leases() {
        let leases = [Lease {
            gateway: "a".into(),
            address: "x:1".into(),
            connections: 7,
        }];
        let l = loads(&[pod("a"), pod("b")], &leases);
        assert_eq!(l[0].0.connections, Some(7));
        assert_eq!(l[1].0.connections, None);
        assert_eq!(entries(&l), vec![("x:1".to_owned(), 7)]);
    }
}
