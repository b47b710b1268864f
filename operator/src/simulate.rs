//! The operator's decisions over a simulated day, with no Kubernetes: the
//! same functions the controller calls (scaling, drains, rebalancing), one
//! pass every 5 s of a simulated clock, against a diurnal load curve.
//! Clients arrive through the route lookup (on the least-loaded ready
//! gateway that is not draining), leave in proportion, and a share of them
//! reconnect every hour as phones do; new pods become ready after a
//! start-up delay; a drained gateway's clients move at the drain rate.
//!
//! `parley-operator simulate` runs a day at the scale of
//! [docs/capacity.md](../../docs/capacity.md) and draws it
//! (`docs/simulation.svg`); a test runs a small day and checks that nothing
//! flaps, that pods stay within their target, and that every drained client
//! is told before its pod goes.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::crd::{DrainStatus, GatewaySpec};
use crate::drains::{self, DrainPolicy, Step};
use crate::rebalance::{self, Rebalance};
use crate::scaling::{self, History, PodLoad, Policy};

/// Online connections over the day: a cosine from `trough` to `peak`, at
/// its highest at `peak_hour`.
#[derive(Debug, Clone)]
pub struct Curve {
    pub trough: u64,
    pub peak: u64,
    pub peak_hour: f64,
}

impl Curve {
    pub fn at(&self, t: Duration) -> u64 {
        let hours = t.as_secs_f64() / 3600.0;
        let phase = (hours - self.peak_hour) / 24.0 * std::f64::consts::TAU;
        let share = (1.0 + phase.cos()) / 2.0;
        self.trough + ((self.peak - self.trough) as f64 * share) as u64
    }
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Setup {
    pub gateway: GatewaySpec,
    pub curve: Curve,
    pub length: Duration,
    /// Between a pod's creation and its readiness.
    pub startup: Duration,
    /// Share of the online clients that reconnect per hour.
    pub churn_per_hour: f64,
}

impl Setup {
    /// A day at the scale of docs/capacity.md: 1.95 million connections at
    /// the evening peak, a fifth of that at night, 50,000 per gateway.
    pub fn ten_million_users() -> Self {
        let gateway = GatewaySpec {
            min_replicas: 2,
            max_replicas: 100,
            target_connections: 50_000,
            rebalance: Some(crate::crd::RebalanceSpec {
                clients_per_second: 500,
                tolerance_percent: 10,
                period_seconds: 60,
            }),
            ..GatewaySpec::default()
        };
        Self {
            gateway,
            curve: Curve {
                trough: 390_000,
                peak: 1_950_000,
                peak_hour: 21.0,
            },
            length: Duration::from_secs(24 * 3600),
            startup: Duration::from_secs(30),
            churn_per_hour: 0.3,
        }
    }
}

/// One moment of the day.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at: Duration,
    /// Online connections.
    pub connections: u64,
    /// Pods ready and not draining.
    pub serving: u32,
    /// Pods in all (starting and draining ones too).
    pub pods: u32,
    /// The most connections on one pod.
    pub busiest: u64,
    /// Clients moved by drains and rebalancing in this pass.
    pub moved: u64,
}

/// What the day showed.
#[derive(Debug, Default)]
pub struct Report {
    pub samples: Vec<Sample>,
    /// When the gateway count went up, and down.
    pub scale_ups: Vec<Duration>,
    pub scale_downs: Vec<Duration>,
    /// Clients still on a pod when it went (a drain that timed out).
    pub untold: u64,
    /// Clients that found no ready gateway when they came.
    pub unplaced: u64,
    /// The longest stretch with a pod above the target plus the buffer.
    pub longest_over: Duration,
}

struct Pod {
    name: String,
    connections: u64,
    ready_at: Duration,
    /// Clients per second it is moving away (a drain, asked).
    moving: u32,
    /// Clients still to hand on, and at what rate (rebalancing).
    shed: (u64, u32),
}

/// A pass every this long, as the controller's requeue.
pub const PASS: Duration = Duration::from_secs(5);

/// Runs the day.
pub fn run(setup: &Setup) -> Report {
    let g = &setup.gateway;
    let policy = Policy::from(g);
    let drain_policy = DrainPolicy {
        settle: Duration::from_secs(5),
        rate: g.drain_rate_per_second.max(1) as u32,
        timeout: Duration::from_secs(g.drain_timeout_seconds.max(1) as u64),
        release_grace: Duration::from_secs(60),
    };
    let rebalancing = g.rebalance.as_ref().map(Rebalance::from);
    let limit = g.target_connections as u64 * (100 + g.buffer_percent as u64) / 100;
    let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    // The day starts with the fleet the load at midnight asks for, ready.
    let mut replicas = scaling::recommend(&policy, setup.curve.at(Duration::ZERO));
    let mut pods: Vec<Pod> = (0..replicas)
        .map(|i| Pod {
            name: format!("gw-{i}"),
            connections: 0,
            ready_at: Duration::ZERO,
            moving: 0,
            shed: (0, 0),
        })
        .collect();
    let mut next_name = replicas;
    let mut drains: Vec<DrainStatus> = Vec::new();
    let mut history = History::default();
    let mut last_round = None;
    let mut report = Report::default();
    let mut over_since: Option<Duration> = None;
    let mut carry = 0.0_f64;

    let mut t = Duration::ZERO;
    while t <= setup.length {
        let now = epoch + t;
        let draining: Vec<String> = drains.iter().map(|d| d.pod.clone()).collect();
        let routable = |p: &Pod| p.ready_at <= t && !draining.contains(&p.name);

        // The Deployment: as many pods as asked for (new ones start).
        while (pods.len() as u32) < replicas {
            pods.push(Pod {
                name: format!("gw-{next_name}"),
                connections: 0,
                ready_at: t + setup.startup,
                moving: 0,
                shed: (0, 0),
            });
            next_name += 1;
        }

        // Clients: leave in proportion, reconnect (churn), arrive.
        let online: u64 = pods.iter().map(|p| p.connections).sum();
        let wanted = setup.curve.at(t);
        carry += online as f64 * setup.churn_per_hour * PASS.as_secs_f64() / 3600.0;
        let churn = carry as u64;
        carry -= churn as f64;
        let leaving = online.saturating_sub(wanted) + churn.min(online);
        take_in_proportion(&mut pods, leaving);
        let mut arriving = wanted.saturating_sub(online) + churn.min(online);

        // Drains and rebalancing move clients at their rates.
        let mut moved = 0;
        for p in pods.iter_mut() {
            let step = PASS.as_secs();
            let by_drain = (p.moving as u64 * step).min(p.connections);
            let by_shed = (p.shed.1 as u64 * step)
                .min(p.shed.0)
                .min(p.connections - by_drain);
            p.shed.0 -= by_shed;
            p.connections -= by_drain + by_shed;
            moved += by_drain + by_shed;
        }
        arriving += moved;
        let lost = fill(&mut pods, &routable, arriving);

        // The operator's pass.
        let loads: Vec<PodLoad> = pods
            .iter()
            .map(|p| PodLoad {
                name: p.name.clone(),
                connections: (p.ready_at <= t).then_some(p.connections),
                ready: p.ready_at <= t,
                draining: draining.contains(&p.name),
                terminating: false,
            })
            .collect();
        let unreleased_before = drains::unreleased(&drains);
        let (advanced, steps) = drains::advance(&drains, &loads, &drain_policy, now);
        drains = advanced;
        for step in steps {
            match step {
                Step::Ask { pod, rate, .. } => {
                    if let Some(p) = pods.iter_mut().find(|p| p.name == pod) {
                        p.moving = rate;
                    }
                }
                // Released: the count drops and the pod goes at once.
                Step::Release { pod, .. } | Step::Delete { pod } => {
                    if let Some(i) = pods.iter().position(|p| p.name == pod) {
                        report.untold += pods[i].connections;
                        pods.remove(i);
                    }
                }
                Step::Done { .. } => {}
            }
        }
        let current = replicas.saturating_sub(unreleased_before);
        let decision = scaling::decide(&policy, current, &loads, &mut history, now);
        if decision.replicas > current {
            report.scale_ups.push(t);
        } else if decision.replicas < current {
            report.scale_downs.push(t);
        }
        for pod in &decision.remove {
            let remaining = pods.iter().find(|p| &p.name == pod).map(|p| p.connections);
            drains.push(drains::start(pod, remaining, now));
        }
        if let Some(r) = &rebalancing
            && drains.is_empty()
            && decision.replicas == current
        {
            let round = rebalance::plan(r, &loads, last_round, now);
            if !round.is_empty() {
                last_round = Some(now);
            }
            for s in round {
                if let Some(p) = pods.iter_mut().find(|p| p.name == s.pod) {
                    p.shed = (s.count, s.rate);
                }
            }
        }
        replicas = decision.replicas + drains::unreleased(&drains);

        // What the day looks like now.
        let serving: Vec<&Pod> = pods.iter().filter(|p| routable(p)).collect();
        let busiest = serving.iter().map(|p| p.connections).max().unwrap_or(0);
        if busiest > limit {
            let since = *over_since.get_or_insert(t);
            report.longest_over = report.longest_over.max(t - since + PASS);
        } else {
            over_since = None;
        }
        report.unplaced += lost;
        report.samples.push(Sample {
            at: t,
            connections: pods.iter().map(|p| p.connections).sum(),
            serving: serving.len() as u32,
            pods: pods.len() as u32,
            busiest,
            moved,
        });
        t += PASS;
    }
    report
}

/// Takes `n` clients off the pods in proportion to what each holds.
fn take_in_proportion(pods: &mut [Pod], n: u64) {
    let total: u64 = pods.iter().map(|p| p.connections).sum();
    if total == 0 || n == 0 {
        return;
    }
    let n = n.min(total);
    let mut left = n;
    for p in pods.iter_mut() {
        let share = (p.connections as u128 * n as u128 / total as u128) as u64;
        let share = share.min(p.connections).min(left);
        p.connections -= share;
        left -= share;
    }
    for p in pods.iter_mut() {
        let take = left.min(p.connections);
        p.connections -= take;
        left -= take;
    }
}

/// Gives `n` arriving clients to the least-loaded routable pods, as the
/// route lookup does one client at a time (water-filling). Returns those
/// with nowhere to go (no pod ready): they count as lost.
fn fill(pods: &mut [Pod], routable: &dyn Fn(&Pod) -> bool, n: u64) -> u64 {
    let mut open: Vec<usize> = (0..pods.len()).filter(|i| routable(&pods[*i])).collect();
    if open.is_empty() {
        return n;
    }
    open.sort_by_key(|i| pods[*i].connections);
    let mut left = n;
    let mut k = 1;
    while left > 0 {
        // Raise the k least loaded to the next level, or as far as `left`
        // allows.
        let level = pods[open[k - 1]].connections;
        let next = open.get(k).map(|i| pods[*i].connections);
        let room = next.map_or(u64::MAX, |n| (n - level).saturating_mul(k as u64));
        if room > left || next.is_none() {
            let each = left / k as u64;
            let extra = left % k as u64;
            for (j, i) in open[..k].iter().enumerate() {
                pods[*i].connections += each + u64::from((j as u64) < extra);
            }
            left = 0;
        } else {
            let up = next.unwrap_or(level) - level;
            for i in &open[..k] {
                pods[*i].connections += up;
            }
            left -= room;
            k += 1;
        }
    }
    0
}

/// The day as an SVG: online connections and pods over the hours, and the
/// busiest pod against its target.
pub fn svg(setup: &Setup, report: &Report) -> String {
    const W: f64 = 900.0;
    const H: f64 = 220.0;
    const LEFT: f64 = 70.0;
    const GAP: f64 = 60.0;
    let hours = setup.length.as_secs_f64() / 3600.0;
    let x = |t: Duration| LEFT + t.as_secs_f64() / 3600.0 / hours * W;
    let line = |values: &[(Duration, f64)], top: f64, max: f64, color: &str| {
        let points: Vec<String> = values
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), top + H - v / max * H))
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            points.join(" ")
        )
    };
    let peak = report
        .samples
        .iter()
        .map(|s| s.connections)
        .max()
        .unwrap_or(1) as f64;
    let most_pods = report.samples.iter().map(|s| s.pods).max().unwrap_or(1) as f64;
    let target = setup.gateway.target_connections as f64;
    let per_pod_max = report
        .samples
        .iter()
        .map(|s| s.busiest as f64)
        .fold(target * 1.2, f64::max);
    let top2 = 40.0 + H + GAP;
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        LEFT + W + 90.0,
        top2 + H + 50.0
    );
    for (top, title) in [
        (40.0, "online connections (blue) and gateway pods (orange)"),
        (
            top2,
            "busiest pod's connections (blue) against the target and the target plus buffer (grey)",
        ),
    ] {
        let _ = writeln!(
            out,
            "<text x=\"{LEFT}\" y=\"{}\">{title}</text>\n<rect x=\"{LEFT}\" y=\"{top}\" width=\"{W}\" height=\"{H}\" fill=\"none\" stroke=\"#999\"/>",
            top - 10.0
        );
        for h in (0..=hours as u32).step_by(3) {
            let tx = x(Duration::from_secs(h as u64 * 3600));
            let _ = writeln!(
                out,
                "<text x=\"{tx:.0}\" y=\"{}\" text-anchor=\"middle\">{h:02}:00</text>",
                top + H + 16.0
            );
        }
    }
    // A point a minute; the pods' and the busiest pod's lines keep each
    // minute's highest.
    let minutes = report.samples.chunks((60 / PASS.as_secs()) as usize);
    let online: Vec<(Duration, f64)> = minutes
        .clone()
        .map(|m| (m[0].at, m[0].connections as f64))
        .collect();
    let pods: Vec<(Duration, f64)> = minutes
        .clone()
        .map(|m| (m[0].at, m.iter().map(|s| s.pods).max().unwrap_or(0) as f64))
        .collect();
    let busiest: Vec<(Duration, f64)> = minutes
        .map(|m| {
            (
                m[0].at,
                m.iter().map(|s| s.busiest).max().unwrap_or(0) as f64,
            )
        })
        .collect();
    out += &line(&online, 40.0, peak * 1.05, "#1f77b4");
    out += &line(&pods, 40.0, most_pods * 1.05, "#ff7f0e");
    out += &line(&busiest, top2, per_pod_max * 1.05, "#1f77b4");
    let limit = target * (100.0 + setup.gateway.buffer_percent as f64) / 100.0;
    for level in [target, limit] {
        let y = top2 + H - level / (per_pod_max * 1.05) * H;
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/>\n<text x=\"{}\" y=\"{:.1}\">{:.0}</text>",
            LEFT + W,
            LEFT + W + 6.0,
            y + 4.0,
            level
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"48\">{:.0}</text>\n<text x=\"{}\" y=\"64\" fill=\"#ff7f0e\">{} pods</text>",
        LEFT + W + 6.0,
        peak,
        LEFT + W + 6.0,
        most_pods
    );
    out += "</svg>\n";
    out
}

/// A summary of the day, for the command's output.
pub fn summary(setup: &Setup, report: &Report) -> String {
    let peak = report
        .samples
        .iter()
        .map(|s| s.connections)
        .max()
        .unwrap_or(0);
    let most = report.samples.iter().map(|s| s.pods).max().unwrap_or(0);
    let least = report
        .samples
        .iter()
        .map(|s| s.serving)
        .filter(|n| *n > 0)
        .min()
        .unwrap_or(0);
    let busiest = report.samples.iter().map(|s| s.busiest).max().unwrap_or(0);
    let moved: u64 = report.samples.iter().map(|s| s.moved).sum();
    let per_minute: Vec<u64> = report
        .samples
        .chunks((60 / PASS.as_secs()) as usize)
        .map(|c| c.iter().map(|s| s.moved).sum())
        .collect();
    format!(
        "peak {peak} connections; {least}..{most} gateway pods; {} scale-ups, {} scale-downs; \
         busiest pod {busiest} (target {}, +{}%); longest above target+buffer {:?}; \
         {moved} clients moved by drains and rebalancing (at most {} a minute); \
         {} clients on a pod when it went, {} with no gateway ready",
        report.scale_ups.len(),
        report.scale_downs.len(),
        setup.gateway.target_connections,
        setup.gateway.buffer_percent,
        report.longest_over,
        per_minute.iter().max().unwrap_or(&0),
        report.untold,
        report.unplaced
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_day() -> Setup {
        let mut s = Setup::ten_million_users();
        s.curve = Curve {
            trough: 2_000,
            peak: 10_000,
            peak_hour: 21.0,
        };
        s.gateway.target_connections = 1_000;
        s.gateway.max_replicas = 20;
        s.gateway.drain_rate_per_second = 20;
        s.gateway.rebalance = Some(crate::crd::RebalanceSpec {
            clients_per_second: 20,
            tolerance_percent: 10,
            period_seconds: 60,
        });
        s
    }

    #[test]
    fn the_route_lookup_fills_the_least_loaded_first() {
        let mut pods: Vec<Pod> = [5, 0, 9]
            .into_iter()
            .enumerate()
            .map(|(i, c)| Pod {
                name: format!("p{i}"),
                connections: c,
                ready_at: Duration::ZERO,
                moving: 0,
                shed: (0, 0),
            })
            .collect();
        assert_eq!(fill(&mut pods, &|_| true, 7), 0);
        let counts: Vec<u64> = pods.iter().map(|p| p.connections).collect();
        assert_eq!(counts, vec![6, 6, 9]);
        take_in_proportion(&mut pods, 7);
        assert_eq!(pods.iter().map(|p| p.connections).sum::<u64>(), 14);
        assert_eq!(fill(&mut pods, &|p| p.name == "nowhere", 3), 3);
    }

    #[test]
    fn a_small_day_scales_with_the_curve_without_flapping_and_tells_every_client() {
        let setup = small_day();
        let report = run(&setup);
        println!("{}", summary(&setup, &report));
        let most = report.samples.iter().map(|s| s.serving).max().unwrap();
        assert_eq!(most, 11, "the evening: 10,000 over 1,000 a pod, +10%");
        let fewest = report.samples.iter().map(|s| s.serving).min().unwrap();
        assert_eq!(fewest, 3, "the morning trough: 2,000 over 1,000, +10%");
        let window = Duration::from_secs(setup.gateway.scale_down_stabilization_seconds as u64);
        for down in &report.scale_downs {
            for up in report.scale_ups.iter().filter(|u| *u < down) {
                assert!(
                    *down - *up >= window,
                    "a scale-down at {down:?} within the window after a scale-up at {up:?}"
                );
            }
        }
        // Never above the target plus buffer for longer than one pass.
        assert!(
            report.longest_over <= PASS,
            "above target+buffer for {:?}",
            report.longest_over
        );
        assert_eq!(
            report.untold, 0,
            "every drained client was told before its pod went"
        );
        assert_eq!(report.unplaced, 0, "every client found a ready gateway");
        assert!(report.samples.iter().map(|s| s.moved).sum::<u64>() > 0);
    }
}
