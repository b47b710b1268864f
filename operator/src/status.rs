//! The ChatCluster's status as a pure function of what the operator
//! observed, and the rule that keeps status writes rare: connection counts
//! move every second, so a change in counts alone is written at a bounded
//! rate, while anything else (readiness, conditions, a scale decision, a
//! drain) is written at once.

use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{
    ChatClusterStatus, ChatStatus, DrainPhase, DrainStatus, GatewayPodStatus, GatewayStatus,
    PodState, RoutingTableStatus, ScaleDecisionStatus,
};

/// Counts alone are written at most this often.
pub const COUNTS_EVERY: Duration = Duration::from_secs(15);

/// What one reconcile saw.
#[derive(Debug, Clone)]
pub struct Observed {
    pub generation: Option<i64>,
    pub gateway_desired: i32,
    pub gateway_ready: i32,
    pub selector: String,
    pub pods: Vec<GatewayPodStatus>,
    pub drains: Vec<DrainStatus>,
    pub chat_desired: i32,
    pub chat_ready: i32,
    /// The push senders wanted and ready, while `spec.push` asks for them.
    pub push: Option<(i32, i32)>,
    /// The routing table was written in this reconcile (entries), or
    /// writing it failed (the error).
    pub routing: Result<i32, String>,
    pub last_scale: Option<ScaleDecisionStatus>,
    /// Owned objects could not be applied.
    pub apply_error: Option<String>,
    /// A bound holds the gateway count below or above what is asked
    /// (`scaling::limited`).
    pub scale_limited: Option<String>,
}

/// A Kubernetes timestamp, to the second.
pub fn time(at: SystemTime) -> Time {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Time(Timestamp::from_second(since.as_secs() as i64).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// How long ago `t` was at `now` (zero when unknown or in the future).
pub fn since(t: Option<&Time>, now: SystemTime) -> Duration {
    t.map(|t| t.0.as_second())
        .filter(|secs| *secs >= 0)
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64))
        .and_then(|at| now.duration_since(at).ok())
        .unwrap_or_default()
}

/// A condition, keeping its transition time when its status did not change.
fn condition(
    old: &[Condition],
    kind: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: SystemTime,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = old
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| time(now));
    Condition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The status to write, given the one the resource has.
pub fn compute(old: &ChatClusterStatus, seen: &Observed, now: SystemTime) -> ChatClusterStatus {
    let generation = seen.generation;
    let connections: i64 = seen.pods.iter().map(|p| p.connections).sum();
    // The pods meant to serve: those wanted, less the ones being drained
    // and not yet released (a draining gateway turns unready on purpose,
    // so a normal scale-down does not make the cluster not Ready).
    let draining = seen
        .drains
        .iter()
        .filter(|d| d.phase != DrainPhase::Released)
        .count() as i32;
    let serving = (seen.gateway_desired - draining).max(0);
    let gateways_ready = seen.gateway_ready >= serving && serving > 0;
    let chat_ready = seen.chat_ready >= seen.chat_desired && seen.chat_desired > 0;
    let progressing = !gateways_ready || !chat_ready || !seen.drains.is_empty();
    let degraded = seen.apply_error.is_some() || seen.routing.is_err();
    let ready = gateways_ready && chat_ready && !degraded;

    let conditions = vec![
        condition(
            &old.conditions,
            "Ready",
            ready,
            if ready { "AllReady" } else { "NotReady" },
            format!(
                "{}/{} gateways and {}/{} chat services ready",
                seen.gateway_ready, seen.gateway_desired, seen.chat_ready, seen.chat_desired
            ),
            generation,
            now,
        ),
        condition(
            &old.conditions,
            "Progressing",
            progressing,
            if !seen.drains.is_empty() {
                "Draining"
            } else if progressing {
                "RollingOut"
            } else {
                "Stable"
            },
            if seen.drains.is_empty() {
                String::new()
            } else {
                format!("draining {} gateway(s)", seen.drains.len())
            },
            generation,
            now,
        ),
        condition(
            &old.conditions,
            "Degraded",
            degraded,
            match (&seen.apply_error, &seen.routing) {
                (Some(_), _) => "ApplyFailed",
                (None, Err(_)) => "RoutingTableFailed",
                _ => "None",
            },
            // A backend's URL in an error may carry its password.
            parley_core::redact_urls(
                &seen
                    .apply_error
                    .clone()
                    .or_else(|| seen.routing.clone().err())
                    .unwrap_or_default(),
            ),
            generation,
            now,
        ),
        condition(
            &old.conditions,
            "RoutingTableSynced",
            seen.routing.is_ok(),
            if seen.routing.is_ok() {
                "Written"
            } else {
                "RedisUnavailable"
            },
            match &seen.routing {
                Ok(n) => format!("{n} entries"),
                Err(e) => parley_core::redact_urls(e),
            },
            generation,
            now,
        ),
        condition(
            &old.conditions,
            "ScaleLimited",
            seen.scale_limited.is_some(),
            if seen.scale_limited.is_some() {
                "OutOfBounds"
            } else {
                "WithinBounds"
            },
            seen.scale_limited.clone().unwrap_or_default(),
            generation,
            now,
        ),
    ];
    let routing_table = match seen.routing {
        Ok(entries) => RoutingTableStatus {
            last_written: Some(time(now)),
            entries,
        },
        Err(_) => old.routing_table.clone(),
    };
    let phase = if degraded {
        "Degraded"
    } else if seen.gateway_ready == 0 && seen.chat_ready == 0 {
        "Pending"
    } else if !seen.drains.is_empty() || seen.gateway_ready != seen.gateway_desired {
        "Scaling"
    } else if ready {
        "Running"
    } else {
        "Pending"
    };
    ChatClusterStatus {
        observed_generation: generation,
        phase: phase.to_owned(),
        conditions,
        gateway: GatewayStatus {
            desired_replicas: seen.gateway_desired,
            ready_replicas: seen.gateway_ready,
            ready: format!("{}/{}", seen.gateway_ready, seen.gateway_desired),
            selector: seen.selector.clone(),
            connections,
            pods: seen.pods.clone(),
            drains: seen.drains.clone(),
        },
        chat: ChatStatus {
            desired_replicas: seen.chat_desired,
            ready_replicas: seen.chat_ready,
        },
        push: seen.push.map(|(desired, ready)| ChatStatus {
            desired_replicas: desired,
            ready_replicas: ready,
        }),
        routing_table,
        last_scale: seen.last_scale.clone().or_else(|| old.last_scale.clone()),
    }
}

/// The status with what moves all the time taken out: connection counts
/// and the routing table's write time.
fn without_counts(s: &ChatClusterStatus) -> ChatClusterStatus {
    let mut s = s.clone();
    s.gateway.connections = 0;
    for p in &mut s.gateway.pods {
        p.connections = 0;
    }
    for d in &mut s.gateway.drains {
        d.remaining = 0;
    }
    s.routing_table.last_written = None;
    for c in &mut s.conditions {
        // Both name counts that move with the load.
        if c.type_ == "RoutingTableSynced" || c.type_ == "ScaleLimited" {
            c.message.clear();
        }
    }
    s
}

/// Whether `new` is worth a write over `old`, last written at `last_write`.
pub fn needs_write(
    old: &ChatClusterStatus,
    new: &ChatClusterStatus,
    last_write: Option<SystemTime>,
    now: SystemTime,
) -> bool {
    if without_counts(old) != without_counts(new) {
        return true;
    }
    if old == new {
        return false;
    }
    match last_write {
        Some(at) => now.duration_since(at).unwrap_or_default() >= COUNTS_EVERY,
        None => true,
    }
}

/// A pod's state from what the operator knows of it.
pub fn pod_state(terminating: bool, draining: bool) -> PodState {
    match (terminating, draining) {
        (true, _) => PodState::Terminating,
        (false, true) => PodState::Draining,
        _ => PodState::Active,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn pod(name: &str, connections: i64) -> GatewayPodStatus {
        GatewayPodStatus {
            name: name.into(),
            address: format!("{name}:7400"),
            public_address: None,
            connections,
            ready: true,
            state: PodState::Active,
        }
    }

    fn seen(ready: i32, conns: [i64; 2]) -> Observed {
        Observed {
            generation: Some(3),
            gateway_desired: 2,
            gateway_ready: ready,
            selector: "app=x".into(),
            pods: vec![pod("a", conns[0]), pod("b", conns[1])],
            chat_desired: 2,
            chat_ready: 2,
            push: None,
            routing: Ok(2),
            drains: Vec::new(),
            last_scale: None,
            apply_error: None,
            scale_limited: None,
        }
    }

    fn cond<'a>(s: &'a ChatClusterStatus, kind: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == kind).unwrap()
    }

    #[test]
    fn a_healthy_cluster_is_running_and_ready() {
        let s = compute(&ChatClusterStatus::default(), &seen(2, [10, 20]), t(0));
        assert_eq!(s.phase, "Running");
        assert_eq!(s.gateway.ready, "2/2");
        assert_eq!(s.gateway.connections, 30);
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Degraded").status, "False");
        assert_eq!(cond(&s, "RoutingTableSynced").message, "2 entries");
        assert_eq!(s.routing_table.entries, 2);
        let kinds: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "Ready",
                "Progressing",
                "Degraded",
                "RoutingTableSynced",
                "ScaleLimited"
            ]
        );
        assert_eq!(cond(&s, "ScaleLimited").status, "False");
    }

    #[test]
    fn a_gateway_draining_for_a_scale_down_leaves_the_cluster_ready() {
        let mut s3 = seen(2, [10, 20]);
        // Three wanted, one of them draining (unready on purpose).
        s3.gateway_desired = 3;
        s3.drains = vec![DrainStatus {
            pod: "c".into(),
            started: None,
            remaining: 5,
            phase: DrainPhase::Moving,
            released: None,
        }];
        let s = compute(&ChatClusterStatus::default(), &s3, t(0));
        assert_eq!(cond(&s, "Ready").status, "True", "{:?}", cond(&s, "Ready"));
        assert_eq!(cond(&s, "Progressing").reason, "Draining");
        // One of the two meant to serve is down: not ready.
        s3.gateway_ready = 1;
        let s = compute(&ChatClusterStatus::default(), &s3, t(0));
        assert_eq!(cond(&s, "Ready").status, "False");
    }

    #[test]
    fn a_password_in_an_error_never_reaches_the_status() {
        let mut failing = seen(2, [10, 20]);
        failing.routing = Err("redis redis://parley:hunter2@redis:6379/: refused".into());
        let s = compute(&ChatClusterStatus::default(), &failing, t(0));
        for c in &s.conditions {
            assert!(!c.message.contains("hunter2"), "{}: {}", c.type_, c.message);
        }
        assert_eq!(cond(&s, "Degraded").status, "True");
        failing.apply_error = Some("postgres://parley:hunter2@db/parley: no route".into());
        let s = compute(&ChatClusterStatus::default(), &failing, t(0));
        assert!(!cond(&s, "Degraded").message.contains("hunter2"));
        assert!(cond(&s, "Degraded").message.contains("db/parley"));
    }

    #[test]
    fn a_count_held_by_a_bound_says_so() {
        let mut held = seen(2, [10, 20]);
        held.scale_limited =
            Some("5 connections ask for 12 gateways; maxReplicas holds it at 10".into());
        let s = compute(&ChatClusterStatus::default(), &held, t(0));
        let c = cond(&s, "ScaleLimited");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "OutOfBounds")
        );
        assert!(c.message.contains("maxReplicas holds it at 10"));
        assert_eq!(s.phase, "Running", "a held count is not a fault");
        // A new count in the message alone waits for the counts' turn.
        let mut more = held.clone();
        more.scale_limited =
            Some("6 connections ask for 12 gateways; maxReplicas holds it at 10".into());
        let next = compute(&s, &more, t(1));
        assert!(!needs_write(&s, &next, Some(t(0)), t(1)));
    }

    #[test]
    fn a_redis_failure_degrades_and_keeps_the_last_table_write() {
        let first = compute(&ChatClusterStatus::default(), &seen(2, [1, 1]), t(0));
        let mut o = seen(2, [1, 1]);
        o.routing = Err("redis: connection refused".into());
        let s = compute(&first, &o, t(30));
        assert_eq!(s.phase, "Degraded");
        assert_eq!(cond(&s, "RoutingTableSynced").status, "False");
        assert_eq!(cond(&s, "Degraded").reason, "RoutingTableFailed");
        assert_eq!(s.routing_table, first.routing_table);
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let a = compute(&ChatClusterStatus::default(), &seen(1, [0, 0]), t(0));
        assert_eq!(cond(&a, "Ready").status, "False");
        let b = compute(&a, &seen(1, [0, 0]), t(100));
        assert_eq!(cond(&b, "Ready").last_transition_time, time(t(0)));
        let c = compute(&b, &seen(2, [0, 0]), t(200));
        assert_eq!(cond(&c, "Ready").status, "True");
        assert_eq!(cond(&c, "Ready").last_transition_time, time(t(200)));
    }

    #[test]
    fn counts_alone_are_written_at_a_bounded_rate() {
        let a = compute(&ChatClusterStatus::default(), &seen(2, [10, 20]), t(0));
        assert!(needs_write(&ChatClusterStatus::default(), &a, None, t(0)));
        let b = compute(&a, &seen(2, [11, 20]), t(1));
        assert!(
            !needs_write(&a, &b, Some(t(0)), t(1)),
            "a count moved: not yet"
        );
        assert!(
            needs_write(&a, &b, Some(t(0)), t(20)),
            "but within the bound"
        );
        let same = compute(&a, &seen(2, [10, 20]), t(5));
        assert!(
            !needs_write(&a, &same, Some(t(0)), t(5)),
            "only the table's write time moved"
        );
        let c = compute(&a, &seen(1, [10, 20]), t(2));
        assert!(
            needs_write(&a, &c, Some(t(0)), t(2)),
            "readiness changes go out at once"
        );
    }

    #[test]
    fn drains_show_as_scaling_and_progressing() {
        let mut o = seen(2, [5, 5]);
        o.drains = vec![DrainStatus {
            pod: "b".into(),
            started: Some(time(t(0))),
            remaining: 5,
            ..DrainStatus::default()
        }];
        let s = compute(&ChatClusterStatus::default(), &o, t(1));
        assert_eq!(s.phase, "Scaling");
        assert_eq!(cond(&s, "Progressing").reason, "Draining");
        assert_eq!(pod_state(false, true), PodState::Draining);
        assert_eq!(pod_state(true, true), PodState::Terminating);
    }
}
