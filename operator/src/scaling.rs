//! How many gateways, and which ones go: pure functions of what the
//! operator observed, so every case is a unit test.
//!
//! The count follows total online connections over the target per pod plus
//! a buffer, within the bounds. Up is immediate. Down waits until the
//! highest recommendation of the stabilization window is below the current
//! count (so a dip does not flap), and then removes at most a bounded number
//! of pods per period. Pods that go are the least loaded ready ones, in the
//! order they will really go: the controller drains them in that order and
//! marks them with the lowest pod-deletion-cost, so the Deployment removes
//! exactly those.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use crate::crd::GatewaySpec;

/// The scaling settings of a ChatCluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    pub target_per_pod: u64,
    pub buffer_percent: u32,
    pub stabilization: Duration,
    pub down_per_period: u32,
    pub down_period: Duration,
    /// A count set through the scale subresource (an HPA, KEDA, a person).
    pub manual: Option<u32>,
}

impl From<&GatewaySpec> for Policy {
    fn from(g: &GatewaySpec) -> Self {
        let min = g.min_replicas.max(1) as u32;
        Self {
            min,
            max: (g.max_replicas.max(1) as u32).max(min),
            target_per_pod: g.target_connections.max(1) as u64,
            buffer_percent: g.buffer_percent.clamp(0, 100) as u32,
            stabilization: Duration::from_secs(g.scale_down_stabilization_seconds.max(0) as u64),
            down_per_period: g.scale_down_pods_per_period.max(1) as u32,
            down_period: Duration::from_secs(g.scale_down_period_seconds.max(1) as u64),
            manual: g.replicas.map(|r| r.max(0) as u32),
        }
    }
}

/// One gateway pod as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLoad {
    pub name: String,
    /// Online connections, when the pod reported them.
    pub connections: Option<u64>,
    pub ready: bool,
    /// Being drained by the operator.
    pub draining: bool,
    /// Deleted, on its way out.
    pub terminating: bool,
}

impl PodLoad {
    /// Counts toward capacity: ready and staying.
    fn serving(&self) -> bool {
        self.ready && !self.draining && !self.terminating
    }
}

/// What the operator remembers between reconciles.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// (when, recommended count), oldest first, within the window.
    pub recommendations: VecDeque<(SystemTime, u32)>,
    pub last_scale_down: Option<SystemTime>,
}

/// Starts a fresh memory (an operator restarted, or a new leader) as the
/// HPA does: the window holds the count running now, so that no
/// scale-down comes before a whole window has shown the load lower, and a
/// scale-down the status recorded at `last_down` still counts against
/// the period. A memory that is not fresh is left alone.
pub fn seed(history: &mut History, current: u32, last_down: Option<SystemTime>, now: SystemTime) {
    if !history.recommendations.is_empty() || history.last_scale_down.is_some() {
        return;
    }
    history.recommendations.push_back((now, current));
    history.last_scale_down = last_down;
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The gateway count to run.
    pub replicas: u32,
    /// Pods to drain and remove, in the order they go.
    pub remove: Vec<String>,
    pub reason: String,
}

/// The count the load alone asks for, within the bounds.
pub fn recommend(policy: &Policy, total_connections: u64) -> u32 {
    unbounded(policy, total_connections).clamp(policy.min, policy.max)
}

/// The count the load asks for, bounds aside.
fn unbounded(policy: &Policy, total_connections: u64) -> u32 {
    let wanted = total_connections.saturating_mul(100 + policy.buffer_percent as u64);
    let per_pod = policy.target_per_pod.saturating_mul(100);
    wanted.div_ceil(per_pod).min(u32::MAX as u64) as u32
}

/// Connections of every pod still holding clients, draining ones too:
/// their clients are moving to the others.
pub fn total_connections(pods: &[PodLoad]) -> u64 {
    pods.iter()
        .filter(|p| !p.terminating)
        .filter_map(|p| p.connections)
        .sum()
}

/// Why the count asked for (through the scale subresource, or by the load)
/// is not the count run, when a bound holds it: for the `ScaleLimited`
/// condition. None when nothing is held back.
pub fn limited(policy: &Policy, pods: &[PodLoad]) -> Option<String> {
    let (asked, by) = match policy.manual {
        Some(n) => (
            n,
            "spec.gateway.replicas (the scale subresource) asks for".to_owned(),
        ),
        None => {
            let total = total_connections(pods);
            (
                unbounded(policy, total),
                format!("{total} connections ask for"),
            )
        }
    };
    if asked > policy.max {
        Some(format!(
            "{by} {asked} gateways; maxReplicas holds it at {}",
            policy.max
        ))
    } else if asked < policy.min && policy.manual.is_some() {
        Some(format!(
            "{by} {asked} gateways; minReplicas holds it at {}",
            policy.min
        ))
    } else {
        None
    }
}

/// Decides the gateway count from `current` (the Deployment's replicas)
/// and the pods, updating `history`.
pub fn decide(
    policy: &Policy,
    current: u32,
    pods: &[PodLoad],
    history: &mut History,
    now: SystemTime,
) -> Decision {
    let serving: Vec<&PodLoad> = pods.iter().filter(|p| p.serving()).collect();
    let unknown = serving.iter().any(|p| p.connections.is_none());
    let total = total_connections(pods);

    let (target, why) = match policy.manual {
        Some(n) => (
            n.clamp(policy.min, policy.max),
            format!("{n} gateways set through the scale subresource"),
        ),
        None => {
            let r = recommend(policy, total);
            (
                r,
                format!(
                    "{total} connections over {} per pod (+{}%)",
                    policy.target_per_pod, policy.buffer_percent
                ),
            )
        }
    };

    // Remember the recommendation; forget what fell out of the window.
    history.recommendations.push_back((now, target));
    while let Some((at, _)) = history.recommendations.front() {
        match now.duration_since(*at) {
            Ok(age) if age > policy.stabilization => {
                history.recommendations.pop_front();
            }
            _ => break,
        }
    }

    if current < policy.min.max(target) {
        let reason = if target > current.max(policy.min) || current >= policy.min {
            format!("scale up from {current}: {why}")
        } else {
            format!("below the minimum of {}", policy.min)
        };
        return Decision {
            replicas: target.max(policy.min),
            remove: Vec::new(),
            reason,
        };
    }
    if current > policy.max {
        return Decision {
            replicas: policy.max,
            remove: pick_removals(&serving, (current - policy.max) as usize),
            reason: format!("above the maximum of {}", policy.max),
        };
    }

    // Down: the highest recommendation of the window, and only what one
    // period allows.
    let stabilized = if policy.manual.is_some() {
        target
    } else {
        history
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(target)
    };
    if stabilized >= current {
        return Decision {
            replicas: current,
            remove: Vec::new(),
            reason: format!("steady at {current}: {why}"),
        };
    }
    if unknown && policy.manual.is_none() {
        return Decision {
            replicas: current,
            remove: Vec::new(),
            reason: "holding: not every ready gateway reported its connections".into(),
        };
    }
    if let Some(last) = history.last_scale_down
        && now.duration_since(last).unwrap_or_default() < policy.down_period
    {
        return Decision {
            replicas: current,
            remove: Vec::new(),
            reason: format!(
                "holding at {current}: the last scale-down was less than {:?} ago",
                policy.down_period
            ),
        };
    }
    let to = stabilized.max(current.saturating_sub(policy.down_per_period));
    let remove = pick_removals(&serving, (current - to) as usize);
    history.last_scale_down = Some(now);
    Decision {
        replicas: to,
        remove,
        reason: format!("scale down from {current}: {why}"),
    }
}

/// The `n` least-loaded serving pods, fewest connections first (by name on
/// a tie, so the choice is stable between reconciles).
fn pick_removals(serving: &[&PodLoad], n: usize) -> Vec<String> {
    let mut candidates: Vec<&&PodLoad> = serving.iter().collect();
    candidates.sort_by(|a, b| {
        a.connections
            .unwrap_or(u64::MAX)
            .cmp(&b.connections.unwrap_or(u64::MAX))
            .then_with(|| a.name.cmp(&b.name))
    });
    candidates
        .into_iter()
        .take(n)
        .map(|p| p.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min: 2,
            max: 10,
            target_per_pod: 1000,
            buffer_percent: 10,
            stabilization: Duration::from_secs(300),
            down_per_period: 1,
            down_period: Duration::from_secs(60),
            manual: None,
        }
    }

    fn pod(name: &str, connections: u64) -> PodLoad {
        PodLoad {
            name: name.into(),
            connections: Some(connections),
            ready: true,
            draining: false,
            terminating: false,
        }
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    /// A count a bound holds back is named, whether the scale subresource
    /// or the load asked for it; a load below the minimum is not (the
    /// minimum is what it is for).
    #[test]
    fn a_count_held_by_a_bound_is_named() {
        let mut p = policy();
        assert_eq!(limited(&p, &[pod("a", 5_000)]), None);
        assert_eq!(limited(&p, &[pod("a", 0)]), None, "idle, at the minimum");
        let load = limited(&p, &[pod("a", 9_000), pod("b", 9_000)]).unwrap();
        assert_eq!(
            load,
            "18000 connections ask for 20 gateways; maxReplicas holds it at 10"
        );
        p.manual = Some(50);
        let asked = limited(&p, &[]).unwrap();
        assert!(
            asked.contains("asks for 50 gateways; maxReplicas holds it at 10"),
            "{asked}"
        );
        p.manual = Some(1);
        assert!(
            limited(&p, &[])
                .unwrap()
                .contains("minReplicas holds it at 2")
        );
        p.manual = Some(4);
        assert_eq!(limited(&p, &[]), None);
    }

    /// An operator that restarts (or a new leader) with little load on
    /// four gateways does not scale down at once: its fresh window holds
    /// the four running, as if it had seen them all along; and a
    /// scale-down the status recorded a moment ago still counts against
    /// the period.
    #[test]
    fn a_fresh_memory_starts_its_window_from_the_count_running() {
        let p = policy();
        let quiet = [pod("a", 100), pod("b", 100), pod("c", 100), pod("d", 100)];
        let mut fresh = History::default();
        seed(&mut fresh, 4, None, t(0));
        let d = decide(&p, 4, &quiet, &mut fresh, t(0));
        assert_eq!(d.replicas, 4, "{}", d.reason);
        let d = decide(&p, 4, &quiet, &mut fresh, t(200));
        assert_eq!(d.replicas, 4, "within the window: {}", d.reason);
        let d = decide(&p, 4, &quiet, &mut fresh, t(301));
        assert_eq!(d.replicas, 3, "a whole window of low load: {}", d.reason);

        // Seeding leaves a memory that is not fresh alone.
        let before = fresh.recommendations.len();
        seed(&mut fresh, 9, None, t(302));
        assert_eq!(fresh.recommendations.len(), before);

        // The last scale-down, 30 s before the restart, holds the next one
        // to the period even after the window.
        let mut fresh = History::default();
        seed(&mut fresh, 3, Some(t(1_000 - 30)), t(1_000));
        fresh.recommendations.clear();
        let d = decide(&p, 3, &quiet[..3], &mut fresh, t(1_000));
        assert_eq!(d.replicas, 3, "{}", d.reason);
        assert!(d.reason.contains("last scale-down"), "{}", d.reason);
    }

    #[test]
    fn the_recommendation_covers_load_and_buffer_within_bounds() {
        let p = policy();
        assert_eq!(recommend(&p, 0), 2, "never below the minimum");
        assert_eq!(recommend(&p, 1800), 2);
        assert_eq!(recommend(&p, 2000), 3, "2000 + 10% needs a third pod");
        assert_eq!(recommend(&p, 5000), 6);
        assert_eq!(recommend(&p, 1_000_000), 10, "never above the maximum");
    }

    #[test]
    fn up_is_immediate() {
        let p = policy();
        let mut h = History::default();
        let pods = [pod("a", 2500), pod("b", 2500)];
        let d = decide(&p, 2, &pods, &mut h, t(0));
        assert_eq!(d.replicas, 6);
        assert!(d.remove.is_empty());
        assert!(d.reason.starts_with("scale up from 2"), "{}", d.reason);
    }

    #[test]
    fn down_waits_for_the_window_then_goes_one_period_at_a_time() {
        let p = policy();
        let mut h = History::default();
        let busy = [
            pod("a", 1500),
            pod("b", 1500),
            pod("c", 1500),
            pod("d", 1500),
        ];
        assert_eq!(decide(&p, 4, &busy, &mut h, t(0)).replicas, 7);
        // Load drops at once; the window still remembers 7.
        let quiet = [pod("a", 100), pod("b", 50), pod("c", 300), pod("d", 10)];
        let d = decide(&p, 4, &quiet, &mut h, t(10));
        assert_eq!(d.replicas, 4);
        assert!(d.remove.is_empty());
        // Past the window: one pod per period, the least loaded first.
        let d = decide(&p, 4, &quiet, &mut h, t(320));
        assert_eq!((d.replicas, d.remove.clone()), (3, vec!["d".to_owned()]));
        let after = [pod("a", 100), pod("b", 50), pod("c", 300)];
        let d = decide(&p, 3, &after, &mut h, t(330));
        assert_eq!(d.replicas, 3, "{}", d.reason);
        let d = decide(&p, 3, &after, &mut h, t(390));
        assert_eq!((d.replicas, d.remove), (2, vec!["b".to_owned()]));
        // And never below the minimum.
        let two = [pod("a", 1), pod("c", 1)];
        assert_eq!(decide(&p, 2, &two, &mut h, t(1000)).replicas, 2);
    }

    #[test]
    fn a_dip_inside_the_window_does_not_flap() {
        let p = policy();
        let mut h = History::default();
        let load = |n| [pod("a", n), pod("b", n), pod("c", n)];
        let mut counts = Vec::new();
        let mut current = 3;
        for (i, n) in [900, 100, 900, 100, 900, 100].into_iter().enumerate() {
            current = decide(&p, current, &load(n), &mut h, t(i as u64 * 30)).replicas;
            counts.push(current);
        }
        assert_eq!(counts, vec![3, 3, 3, 3, 3, 3]);
    }

    #[test]
    fn removal_skips_pods_not_ready_draining_or_terminating() {
        let mut p = policy();
        p.stabilization = Duration::ZERO;
        p.down_per_period = 3;
        let mut h = History::default();
        let mut not_ready = pod("z-not-ready", 0);
        not_ready.ready = false;
        let mut draining = pod("y-draining", 0);
        draining.draining = true;
        let mut leaving = pod("x-leaving", 0);
        leaving.terminating = true;
        let pods = [
            pod("a", 10),
            pod("b", 20),
            pod("c", 30),
            not_ready,
            draining,
            leaving,
        ];
        let d = decide(&p, 5, &pods, &mut h, t(0));
        assert_eq!(d.replicas, 2);
        assert_eq!(
            d.remove,
            vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]
        );
    }

    #[test]
    fn missing_counts_hold_a_scale_down_but_not_a_scale_up() {
        let mut p = policy();
        p.stabilization = Duration::ZERO;
        let mut h = History::default();
        let mut silent = pod("c", 0);
        silent.connections = None;
        let d = decide(
            &p,
            3,
            &[pod("a", 10), pod("b", 10), silent.clone()],
            &mut h,
            t(0),
        );
        assert_eq!(d.replicas, 3);
        assert!(d.reason.starts_with("holding"), "{}", d.reason);
        let d = decide(
            &p,
            3,
            &[pod("a", 4000), pod("b", 4000), silent],
            &mut h,
            t(1),
        );
        assert_eq!(d.replicas, 9);
    }

    #[test]
    fn zero_pods_start_at_the_minimum() {
        let p = policy();
        let d = decide(&p, 0, &[], &mut History::default(), t(0));
        assert_eq!(d.replicas, 2);
    }

    #[test]
    fn a_count_set_through_the_scale_subresource_wins_within_bounds() {
        let mut p = policy();
        p.manual = Some(5);
        let mut h = History::default();
        let pods = [pod("a", 0), pod("b", 0)];
        assert_eq!(decide(&p, 2, &pods, &mut h, t(0)).replicas, 5);
        p.manual = Some(50);
        assert_eq!(decide(&p, 5, &pods, &mut h, t(1)).replicas, 10);
        // Down to a set count still drains the least loaded, one period at
        // a time.
        p.manual = Some(3);
        let pods: Vec<PodLoad> = (0..10).map(|i| pod(&format!("p{i}"), 100 - i)).collect();
        let d = decide(&p, 10, &pods, &mut h, t(2));
        assert_eq!((d.replicas, d.remove), (9, vec!["p9".to_owned()]));
    }

    #[test]
    fn the_policy_comes_from_the_spec_with_sane_floors() {
        let spec = GatewaySpec {
            min_replicas: 3,
            max_replicas: 1,
            ..GatewaySpec::default()
        };
        let p = Policy::from(&spec);
        assert_eq!((p.min, p.max), (3, 3), "max is never below min");
    }
}
