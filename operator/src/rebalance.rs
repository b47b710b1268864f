//! Rebalancing after a scale-up: which gateways hand how many clients on,
//! at what rate. New gateways take new connections first (the route lookup
//! answers the least loaded), but clients reconnect rarely, so without help
//! a fresh gateway fills over hours. A round asks each gateway more than the
//! tolerance above the mean to hand its surplus on, within a budget of
//! clients per second over the period, split in proportion; the clients
//! come back through the route lookup to the least-loaded gateways. The
//! tolerance keeps a round from starting again over a spread it can leave,
//! and the period keeps rounds apart, so nothing flaps.

use std::time::{Duration, SystemTime};

use crate::crd::RebalanceSpec;
use crate::scaling::PodLoad;

/// The rebalancing settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebalance {
    /// Clients handed on per second, all gateways together.
    pub rate: u32,
    pub tolerance_percent: u32,
    /// At most one round per period.
    pub period: Duration,
}

impl From<&RebalanceSpec> for Rebalance {
    fn from(r: &RebalanceSpec) -> Self {
        Self {
            rate: r.clients_per_second.max(1) as u32,
            tolerance_percent: r.tolerance_percent.clamp(1, 100) as u32,
            period: Duration::from_secs(r.period_seconds.max(1) as u64),
        }
    }
}

/// One gateway asked to hand `count` clients on at `rate` per second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shed {
    pub pod: String,
    pub count: u64,
    pub rate: u32,
}

/// The round to ask for now, if any: nothing within `period` of the last
/// round, with fewer than two gateways in service, or while any of them
/// has not reported its count.
pub fn plan(
    policy: &Rebalance,
    pods: &[PodLoad],
    last: Option<SystemTime>,
    now: SystemTime,
) -> Vec<Shed> {
    if last.is_some_and(|t| now.duration_since(t).unwrap_or_default() < policy.period) {
        return Vec::new();
    }
    let serving: Vec<&PodLoad> = pods
        .iter()
        .filter(|p| p.ready && !p.draining && !p.terminating)
        .collect();
    let Some(counts) = serving
        .iter()
        .map(|p| p.connections)
        .collect::<Option<Vec<u64>>>()
    else {
        return Vec::new();
    };
    if counts.len() < 2 {
        return Vec::new();
    }
    let mean = counts.iter().sum::<u64>() / counts.len() as u64;
    let high = mean * (100 + policy.tolerance_percent as u64) / 100;
    let surplus: Vec<(&str, u64)> = serving
        .iter()
        .zip(&counts)
        .filter(|(_, c)| **c > high)
        .map(|(p, c)| (p.name.as_str(), c - mean))
        .collect();
    let total: u64 = surplus.iter().map(|(_, s)| s).sum();
    let budget = policy.rate as u64 * policy.period.as_secs().max(1);
    let moved = total.min(budget);
    surplus
        .into_iter()
        .filter_map(|(pod, s)| {
            let count = s * moved / total.max(1);
            (count > 0).then(|| Shed {
                pod: pod.to_owned(),
                count,
                rate: ((policy.rate as u64 * count / moved.max(1)) as u32).max(1),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, connections: Option<u64>) -> PodLoad {
        PodLoad {
            name: name.into(),
            connections,
            ready: true,
            draining: false,
            terminating: false,
        }
    }

    fn policy() -> Rebalance {
        Rebalance {
            rate: 100,
            tolerance_percent: 10,
            period: Duration::from_secs(30),
        }
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn a_new_gateway_gets_the_busiest_ones_surplus_within_the_budget() {
        // Two full gateways and a new empty one: mean 600.
        let pods = [pod("a", Some(900)), pod("b", Some(900)), pod("c", Some(0))];
        let round = plan(&policy(), &pods, None, t(0));
        assert_eq!(
            round,
            vec![
                Shed {
                    pod: "a".into(),
                    count: 300,
                    rate: 50
                },
                Shed {
                    pod: "b".into(),
                    count: 300,
                    rate: 50
                },
            ]
        );
        // A tight budget (10/s over 30 s) is split in proportion.
        let slow = Rebalance {
            rate: 10,
            ..policy()
        };
        let round = plan(&slow, &pods, None, t(0));
        assert_eq!(round.iter().map(|s| s.count).sum::<u64>(), 300);
        assert!(round.iter().all(|s| s.rate == 5));
    }

    #[test]
    fn nothing_within_the_tolerance_the_period_or_without_counts() {
        let even = [
            pod("a", Some(650)),
            pod("b", Some(600)),
            pod("c", Some(560)),
        ];
        assert!(
            plan(&policy(), &even, None, t(0)).is_empty(),
            "within 10% of the mean"
        );
        let uneven = [pod("a", Some(900)), pod("c", Some(0))];
        assert!(
            plan(&policy(), &uneven, Some(t(0)), t(29)).is_empty(),
            "inside the period"
        );
        assert!(!plan(&policy(), &uneven, Some(t(0)), t(30)).is_empty());
        let unknown = [pod("a", Some(900)), pod("c", None)];
        assert!(plan(&policy(), &unknown, None, t(0)).is_empty());
        assert!(plan(&policy(), &[pod("a", Some(900))], None, t(0)).is_empty());
        let mut draining = pod("c", Some(0));
        draining.draining = true;
        assert!(
            plan(&policy(), &[pod("a", Some(900)), draining], None, t(0)).is_empty(),
            "a draining gateway is no receiver"
        );
    }
}
