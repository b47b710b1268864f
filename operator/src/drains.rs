//! The scale-down drain of one gateway pod, step by step: a pure function
//! from the drains in progress (kept in the ChatCluster's status, so a new
//! leader carries on where the last one stopped) and what the pods look
//! like now, to the drains after this reconcile and what to do for them.
//!
//! A drain goes Unrouted → Moving → Released → gone:
//! - Unrouted: the pod is out of the routing table; wait for routes to
//!   settle, so no new client is sent to it while its clients leave.
//! - Moving: the gateway was asked to move its clients away at the drain
//!   rate; wait until it holds none, or until the hard timeout.
//! - Released: the pod is marked to go first (pod-deletion-cost) and the
//!   Deployment's count no longer includes it; wait until it is gone. If
//!   the Deployment removed another pod instead, delete this one.

use std::time::{Duration, SystemTime};

use crate::crd::{DrainPhase, DrainStatus};
use crate::scaling::PodLoad;
use crate::status::{since, time};

/// How drains proceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainPolicy {
    /// Between leaving the routing table and asking the gateway to move.
    pub settle: Duration,
    /// Clients moved per second.
    pub rate: u32,
    /// After this long (from the start) the pod is released anyway.
    pub timeout: Duration,
    /// A released pod still running after this long is deleted.
    pub release_grace: Duration,
}

/// Something the controller must do for a drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask the gateway to move its clients away at `rate` per second, the
    /// request lapsing after `ttl`.
    Ask {
        pod: String,
        rate: u32,
        ttl: Duration,
    },
    /// Mark the pod to go first; the count is lowered by the caller.
    Release { pod: String, timed_out: bool },
    /// The Deployment kept the released pod: delete it.
    Delete { pod: String },
    /// The pod is gone: the drain is over.
    Done { pod: String },
}

/// Starts draining `pod`.
pub fn start(pod: &str, remaining: Option<u64>, now: SystemTime) -> DrainStatus {
    DrainStatus {
        pod: pod.to_owned(),
        started: Some(time(now)),
        remaining: remaining.unwrap_or(0) as i64,
        phase: DrainPhase::Unrouted,
        released: None,
    }
}

/// Advances every drain by what `pods` show at `now`.
pub fn advance(
    drains: &[DrainStatus],
    pods: &[PodLoad],
    policy: &DrainPolicy,
    now: SystemTime,
) -> (Vec<DrainStatus>, Vec<Step>) {
    let mut out = Vec::with_capacity(drains.len());
    let mut steps = Vec::new();
    for d in drains {
        let Some(pod) = pods.iter().find(|p| p.name == d.pod) else {
            steps.push(Step::Done { pod: d.pod.clone() });
            continue;
        };
        let mut d = d.clone();
        if let Some(n) = pod.connections {
            d.remaining = n as i64;
        }
        let release = |d: &mut DrainStatus, timed_out: bool, steps: &mut Vec<Step>| {
            d.phase = DrainPhase::Released;
            d.released = Some(time(now));
            steps.push(Step::Release {
                pod: d.pod.clone(),
                timed_out,
            });
        };
        match d.phase {
            // Deleted by someone else (a node drain, a person): it goes
            // anyway, so the count must stop including it.
            DrainPhase::Unrouted | DrainPhase::Moving if pod.terminating => {
                release(&mut d, false, &mut steps);
            }
            // Never asked (Redis was down when it was due): the timeout
            // still holds.
            DrainPhase::Unrouted if since(d.started.as_ref(), now) >= policy.timeout => {
                release(&mut d, true, &mut steps);
            }
            DrainPhase::Unrouted if since(d.started.as_ref(), now) >= policy.settle => {
                d.phase = DrainPhase::Moving;
                steps.push(Step::Ask {
                    pod: d.pod.clone(),
                    rate: policy.rate,
                    ttl: policy.timeout + policy.settle,
                });
            }
            DrainPhase::Moving if pod.connections == Some(0) => {
                release(&mut d, false, &mut steps);
            }
            DrainPhase::Unrouted | DrainPhase::Moving
                if since(d.started.as_ref(), now) >= policy.timeout =>
            {
                release(&mut d, true, &mut steps);
            }
            DrainPhase::Released
                if !pod.terminating && since(d.released.as_ref(), now) >= policy.release_grace =>
            {
                steps.push(Step::Delete { pod: d.pod.clone() });
            }
            _ => {}
        }
        out.push(d);
    }
    (out, steps)
}

/// Drains whose pods the Deployment's count still includes.
pub fn unreleased(drains: &[DrainStatus]) -> u32 {
    drains
        .iter()
        .filter(|d| d.phase != DrainPhase::Released)
        .count() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn policy() -> DrainPolicy {
        DrainPolicy {
            settle: Duration::from_secs(5),
            rate: 100,
            timeout: Duration::from_secs(600),
            release_grace: Duration::from_secs(60),
        }
    }

    fn pod(name: &str, connections: Option<u64>) -> PodLoad {
        PodLoad {
            name: name.into(),
            connections,
            ready: false,
            draining: true,
            terminating: false,
        }
    }

    /// A drain never asked for (Redis was down each time it was due)
    /// still ends at its timeout.
    #[test]
    fn a_drain_never_asked_for_still_times_out() {
        let p = policy();
        let d = vec![start("gw-b", Some(40), t(0))];
        let (d, steps) = advance(&d, &[pod("gw-b", None)], &p, t(599));
        assert!(matches!(steps[..], [Step::Ask { .. }]), "{steps:?}");
        // The ask failed: the controller put it back in its first step.
        let mut d = d;
        d[0].phase = DrainPhase::Unrouted;
        let (d, steps) = advance(&d, &[pod("gw-b", None)], &p, t(600));
        assert_eq!(
            steps,
            vec![Step::Release {
                pod: "gw-b".into(),
                timed_out: true
            }]
        );
        assert_eq!(d[0].phase, DrainPhase::Released);
    }

    #[test]
    fn a_drain_settles_asks_waits_for_empty_releases_and_ends_when_the_pod_is_gone() {
        let p = policy();
        let d = vec![start("gw-b", Some(40), t(0))];
        let pods = vec![pod("gw-b", Some(40))];

        let (d, steps) = advance(&d, &pods, &p, t(3));
        assert!(steps.is_empty(), "routes are still settling");
        assert_eq!(d[0].phase, DrainPhase::Unrouted);

        let (d, steps) = advance(&d, &pods, &p, t(5));
        assert_eq!(
            steps,
            vec![Step::Ask {
                pod: "gw-b".into(),
                rate: 100,
                ttl: Duration::from_secs(605)
            }]
        );
        assert_eq!(d[0].phase, DrainPhase::Moving);
        let (d, steps) = advance(&d, &[pod("gw-b", Some(12))], &p, t(6));
        assert!(steps.is_empty(), "still moving");
        assert_eq!(d[0].remaining, 12);
        assert_eq!(unreleased(&d), 1);

        let (d, steps) = advance(&d, &[pod("gw-b", Some(0))], &p, t(7));
        assert_eq!(
            steps,
            vec![Step::Release {
                pod: "gw-b".into(),
                timed_out: false
            }]
        );
        assert_eq!(d[0].phase, DrainPhase::Released);
        assert_eq!(unreleased(&d), 0, "the count no longer includes it");

        let mut going = pod("gw-b", Some(0));
        going.terminating = true;
        let (d, steps) = advance(&d, &[going], &p, t(9));
        assert!(steps.is_empty(), "terminating: wait");
        let (d, steps) = advance(&d, &[], &p, t(20));
        assert!(d.is_empty());
        assert_eq!(steps, vec![Step::Done { pod: "gw-b".into() }]);
    }

    #[test]
    fn a_stuck_drain_is_cut_short_by_the_timeout() {
        let p = policy();
        let d = vec![start("gw-b", Some(40), t(0))];
        let (d, _) = advance(&d, &[pod("gw-b", Some(40))], &p, t(5));
        let (d, steps) = advance(&d, &[pod("gw-b", Some(3))], &p, t(599));
        assert!(steps.is_empty());
        let (d, steps) = advance(&d, &[pod("gw-b", Some(3))], &p, t(600));
        assert_eq!(
            steps,
            vec![Step::Release {
                pod: "gw-b".into(),
                timed_out: true
            }]
        );
        assert_eq!(d[0].remaining, 3);
        // A gateway whose count is unknown (its lease gone) also waits out
        // the timeout rather than being released blind.
        let d = vec![start("gw-c", None, t(0))];
        let (d, _) = advance(&d, &[pod("gw-c", None)], &p, t(5));
        let (_, steps) = advance(&d, &[pod("gw-c", None)], &p, t(100));
        assert!(steps.is_empty());
    }

    #[test]
    fn a_released_pod_the_deployment_kept_is_deleted_and_a_deleted_pod_is_released() {
        let p = policy();
        let mut d = start("gw-b", Some(0), t(0));
        d.phase = DrainPhase::Released;
        d.released = Some(time(t(10)));
        let (_, steps) = advance(&[d.clone()], &[pod("gw-b", Some(0))], &p, t(69));
        assert!(steps.is_empty());
        let (_, steps) = advance(&[d], &[pod("gw-b", Some(0))], &p, t(70));
        assert_eq!(steps, vec![Step::Delete { pod: "gw-b".into() }]);

        // Someone deleted a pod mid-drain: it goes anyway.
        let d = vec![start("gw-c", Some(9), t(0))];
        let mut going = pod("gw-c", Some(9));
        going.terminating = true;
        let (d, steps) = advance(&d, &[going], &p, t(1));
        assert_eq!(d[0].phase, DrainPhase::Released);
        assert_eq!(
            steps,
            vec![Step::Release {
                pod: "gw-c".into(),
                timed_out: false
            }]
        );
    }
}
