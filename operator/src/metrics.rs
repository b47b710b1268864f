//! What the operator counts, exported at `/metrics` (prefix `parley_operator_`).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    /// Reconcile passes, by result (ok, error).
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_seconds: Histogram,
    /// Owned objects written by server-side apply.
    pub applies: Counter,
    pub routing_writes: Counter,
    /// Gateway count changes, by direction (up, down).
    pub scale_decisions: Family<DirectionLabel, Counter>,
    /// Finished drains, by outcome (empty, timeout).
    pub drains: Family<OutcomeLabel, Counter>,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            applies: Counter::default(),
            routing_writes: Counter::default(),
            scale_decisions: Family::default(),
            drains: Family::default(),
            leader: Gauge::default(),
        }
    }
}

fn label<L: From<String>>(s: &str) -> L {
    L::from(s.to_owned())
}

impl From<String> for ResultLabel {
    fn from(result: String) -> Self {
        Self { result }
    }
}
impl From<String> for DirectionLabel {
    fn from(direction: String) -> Self {
        Self { direction }
    }
}
impl From<String> for OutcomeLabel {
    fn from(outcome: String) -> Self {
        Self { outcome }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "reconciles",
            "Reconcile passes, by result",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_seconds",
            "Duration of a reconcile pass",
            self.reconcile_seconds.clone(),
        );
        r.register(
            "applies",
            "Owned objects written with server-side apply",
            self.applies.clone(),
        );
        r.register(
            "routing_table_writes",
            "Routing-table replacements in Redis",
            self.routing_writes.clone(),
        );
        r.register(
            "scale_decisions",
            "Gateway count changes, by direction",
            self.scale_decisions.clone(),
        );
        r.register(
            "drains",
            "Finished gateway drains, by outcome",
            self.drains.clone(),
        );
        r.register(
            "leader",
            "Whether this replica is the active one",
            self.leader.clone(),
        );
    }

    pub fn reconciled(&self, took: Duration, ok: bool) {
        self.reconcile_seconds.observe(took.as_secs_f64());
        self.reconciles
            .get_or_create(&label(if ok { "ok" } else { "error" }))
            .inc();
    }

    pub fn applied(&self, n: u64) {
        self.applies.inc_by(n);
    }

    pub fn routing_written(&self) {
        self.routing_writes.inc();
    }

    pub fn scaled(&self, up: bool) {
        self.scale_decisions
            .get_or_create(&label(if up { "up" } else { "down" }))
            .inc();
    }

    pub fn drained(&self, timed_out: bool) {
        self.drains
            .get_or_create(&label(if timed_out { "timeout" } else { "empty" }))
            .inc();
    }
}
