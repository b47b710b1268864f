//! What every driver shares: the open-loop schedule, the ledger of who got
//! what, latency histograms, and the report.
//!
//! The schedule is fixed before the first message: message `k` is due at
//! `start + k / rate`, is sent by endpoint `k % endpoints`, and goes to that
//! endpoint's peer for the round (1:1) or to its group (fan-out). Latency is
//! measured from when a message was *due*, not from when it was written, so
//! a sender that falls behind shows up in the figures instead of hiding
//! (no coordinated omission). The payload carries only `k`; everything else
//! follows from the schedule.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::watch;

/// Who a message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// Each endpoint sends to `peers` partners picked at random, in turn.
    Direct { peers: usize },
    /// Endpoints form groups of `size`; each sends to its own group.
    Group { size: usize },
}

/// The traffic to offer.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Connections, one user each.
    pub endpoints: usize,
    /// Messages per second offered, all senders together.
    pub rate: f64,
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// Payload bytes per message (at least 8: the message number).
    pub size: usize,
    pub shape: Shape,
    pub seed: u64,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The highest recipient rank a message can have (bits of the ledger mask
/// left over for "sent" and "acked").
pub const MAX_GROUP: usize = 126;
const SENT: u32 = 126;
const ACKED: u32 = 127;

impl Workload {
    /// Messages in the whole run.
    pub fn total(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64()).round() as u64
    }

    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.endpoints >= 2, "need at least 2 endpoints");
        anyhow::ensure!(self.rate > 0.0, "the rate must be positive");
        anyhow::ensure!(self.size >= 8, "messages carry at least 8 bytes");
        match self.shape {
            Shape::Direct { peers } => {
                anyhow::ensure!(
                    (1..self.endpoints).contains(&peers),
                    "each endpoint needs between 1 and endpoints-1 peers"
                );
            }
            Shape::Group { size } => {
                anyhow::ensure!(
                    (2..=MAX_GROUP).contains(&size),
                    "groups have 2 to {MAX_GROUP} members"
                );
                anyhow::ensure!(
                    self.endpoints.is_multiple_of(size),
                    "endpoints must be a multiple of the group size"
                );
            }
        }
        Ok(())
    }

    /// Nanoseconds after the start at which message `k` is due.
    pub fn due_ns(&self, k: u64) -> u64 {
        (k as f64 * 1e9 / self.rate) as u64
    }

    /// The endpoint that sends message `k`.
    pub fn sender(&self, k: u64) -> usize {
        (k % self.endpoints as u64) as usize
    }

    /// Which of the sender's destinations message `k` goes to: an index into
    /// its peer list (1:1), or 0 (its group).
    pub fn slot(&self, k: u64) -> usize {
        match self.shape {
            Shape::Direct { peers } => ((k / self.endpoints as u64) % peers as u64) as usize,
            Shape::Group { .. } => 0,
        }
    }

    /// The number of groups (0 for 1:1).
    pub fn groups(&self) -> usize {
        match self.shape {
            Shape::Direct { .. } => 0,
            Shape::Group { size } => self.endpoints / size,
        }
    }

    /// The group of an endpoint, and its rank in it.
    pub fn group_of(&self, endpoint: usize) -> (usize, usize) {
        match self.shape {
            Shape::Direct { .. } => (0, 0),
            Shape::Group { size } => (endpoint / size, endpoint % size),
        }
    }

    /// The members of group `g`.
    pub fn members(&self, g: usize) -> std::ops::Range<usize> {
        match self.shape {
            Shape::Direct { .. } => 0..0,
            Shape::Group { size } => g * size..(g + 1) * size,
        }
    }

    /// Each endpoint's partners (1:1): distinct, never itself, fixed by the seed.
    pub fn peers(&self) -> Vec<Vec<usize>> {
        let Shape::Direct { peers } = self.shape else {
            return vec![Vec::new(); self.endpoints];
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        (0..self.endpoints)
            .map(|e| {
                sample(&mut rng, self.endpoints - 1, peers)
                    .into_iter()
                    .map(|i| if i >= e { i + 1 } else { i })
                    .collect()
            })
            .collect()
    }

    /// Recipients expected for message `k`, as a mask of ranks.
    fn expected(&self, k: u64) -> u128 {
        match self.shape {
            Shape::Direct { .. } => 1,
            Shape::Group { size } => {
                let all = (1u128 << size) - 1;
                all & !(1u128 << (self.sender(k) % size))
            }
        }
    }
}

/// Latency in microseconds, sharded so that connections on different
/// threads rarely wait for one another.
pub struct Hist {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Hist {
    fn new() -> Self {
        let one = || Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds"));
        Self {
            shards: (0..16).map(|_| one()).collect(),
        }
    }

    /// Records one latency for connection `conn`.
    pub fn record(&self, conn: usize, micros: u64) {
        let mut h = self.shards[conn % self.shards.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        h.saturating_record(micros.max(1));
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
        for s in &self.shards {
            let h = s.lock().unwrap_or_else(|p| p.into_inner());
            all.add(&*h).expect("same bounds");
        }
        all
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        (!h.is_empty()).then(|| {
            let ms = |v: u64| v as f64 / 1000.0;
            Self {
                count: h.len(),
                p50_ms: ms(h.value_at_quantile(0.5)),
                p99_ms: ms(h.value_at_quantile(0.99)),
                p999_ms: ms(h.value_at_quantile(0.999)),
                max_ms: ms(h.max()),
            }
        })
    }
}

/// One run of a workload: the schedule's clock, the ledger and the
/// histograms every connection writes into.
pub struct Run {
    pub w: Workload,
    pub start: Instant,
    total: u64,
    /// Per message: bit r = recipient rank r has it; bits 126/127 = sent/acked.
    marks: Vec<[AtomicU64; 2]>,
    duplicates: AtomicU64,
    foreign: AtomicU64,
    pub ack: Hist,
    pub deliver: Hist,
    errors: Mutex<BTreeMap<String, u64>>,
    last_delivery_ns: AtomicU64,
    stop_tx: watch::Sender<bool>,
    /// The servers and this process, measured from the first send due to settling.
    meter: crate::procs::Meter,
    usage: Mutex<Option<crate::procs::Usage>>,
}

impl Run {
    /// A run whose first message is due `lead` from now; `pids` are the
    /// server processes to measure.
    pub fn new(w: Workload, lead: Duration, mut pids: Vec<(String, u32)>) -> Self {
        let total = w.total();
        pids.push(("load generator".to_owned(), std::process::id()));
        Self {
            start: Instant::now() + lead,
            total,
            marks: (0..total)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
            duplicates: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            ack: Hist::new(),
            deliver: Hist::new(),
            errors: Mutex::new(BTreeMap::new()),
            last_delivery_ns: AtomicU64::new(0),
            stop_tx: watch::channel(false).0,
            meter: crate::procs::Meter::start(pids),
            usage: Mutex::new(None),
            w,
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// When message `k` is due.
    pub fn due(&self, k: u64) -> Instant {
        self.start + Duration::from_nanos(self.w.due_ns(k))
    }

    /// Microseconds since message `k` was due.
    fn since_due(&self, k: u64) -> u64 {
        let now = self.start.elapsed().as_nanos() as u64;
        now.saturating_sub(self.w.due_ns(k)) / 1000
    }

    /// The messages endpoint `e` sends, in order: e, e+n, e+2n, …
    pub fn sends_of(&self, e: usize) -> impl Iterator<Item = u64> + use<> {
        (e as u64..self.total).step_by(self.w.endpoints)
    }

    fn set(&self, k: u64, bit: u32) -> bool {
        let Some(m) = self.marks.get(k as usize) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let (word, b) = ((bit / 64) as usize, bit % 64);
        m[word].fetch_or(1 << b, Ordering::Relaxed) & (1 << b) == 0
    }

    pub fn sent(&self, k: u64) {
        self.set(k, SENT);
    }

    /// The sender learned that message `k` is stored (acked).
    pub fn acked(&self, conn: usize, k: u64) {
        if self.set(k, ACKED) {
            self.ack.record(conn, self.since_due(k));
        }
    }

    /// Endpoint `conn`, of rank `rank` among the recipients, received `k`.
    pub fn delivered(&self, conn: usize, rank: usize, k: u64) {
        if rank >= MAX_GROUP || k >= self.total {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.set(k, rank as u32) {
            self.deliver.record(conn, self.since_due(k));
            self.last_delivery_ns
                .fetch_max(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        } else {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn error(&self, what: impl Into<String>) {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *e.entry(what.into()).or_default() += 1;
    }

    /// Ends the run: endpoints close.
    pub fn stop(&self) {
        self.stop_tx.send_replace(true);
    }

    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stop_tx.subscribe()
    }

    fn expected_delivered(&self) -> (u64, u64) {
        let (mut expected, mut got) = (0, 0);
        for (k, m) in self.marks.iter().enumerate() {
            let mask = self.w.expected(k as u64);
            let bits = m[0].load(Ordering::Relaxed) as u128
                | ((m[1].load(Ordering::Relaxed) as u128) << 64);
            if bits & (1 << SENT) != 0 {
                expected += mask.count_ones() as u64;
                got += (bits & mask).count_ones() as u64;
            }
        }
        (expected, got)
    }

    /// Waits until every sent message reached every recipient, or until
    /// `patience` after the last one was due.
    pub async fn settle(&self, patience: Duration) {
        let end = self.due(self.total) + patience;
        tokio::time::sleep_until(self.due(self.total).into()).await;
        loop {
            let (expected, got) = self.expected_delivered();
            if got >= expected || Instant::now() >= end {
                let usage = self.meter.finish();
                *self.usage.lock().unwrap_or_else(|p| p.into_inner()) = Some(usage);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The figures; `acks` says whether the system acknowledges sends.
    pub fn report(&self, system: &str, acks: bool) -> Traffic {
        let (mut sent, mut acked, mut lost) = (0, 0, 0);
        let (mut expected, mut delivered) = (0, 0);
        for (k, m) in self.marks.iter().enumerate() {
            let mask = self.w.expected(k as u64);
            let bits = m[0].load(Ordering::Relaxed) as u128
                | ((m[1].load(Ordering::Relaxed) as u128) << 64);
            if bits & (1 << SENT) == 0 {
                continue;
            }
            sent += 1;
            let got = (bits & mask).count_ones() as u64;
            delivered += got;
            if bits & (1 << ACKED) != 0 {
                acked += 1;
            }
            // A message counts as lost only once the system took it: acked,
            // or (for a system without acks) sent at all.
            if bits & (1 << ACKED) != 0 || !acks {
                expected += mask.count_ones() as u64;
                lost += mask.count_ones() as u64 - got;
            }
        }
        let window = self.w.duration.as_secs_f64();
        let last = self.last_delivery_ns.load(Ordering::Relaxed) as f64 / 1e9;
        Traffic {
            system: system.to_owned(),
            workload: self.w.clone(),
            sent,
            acked: acks.then_some(acked),
            delivered,
            expected,
            lost,
            duplicated: self.duplicates.load(Ordering::Relaxed),
            foreign: self.foreign.load(Ordering::Relaxed),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            sent_per_sec: sent as f64 / window,
            delivered_per_sec: delivered as f64 / last.max(window),
            ack: acks.then(|| Latency::of(&self.ack.merged())).flatten(),
            deliver: Latency::of(&self.deliver.merged()),
            usage: self.usage.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// What one traffic run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Traffic {
    pub system: String,
    pub workload: Workload,
    pub sent: u64,
    /// None: the system does not acknowledge (NATS core).
    pub acked: Option<u64>,
    /// Deliveries to recipients (the sender's own copies are not counted).
    pub delivered: u64,
    pub expected: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Deliveries that were not part of this run (should be 0).
    pub foreign: u64,
    pub errors: BTreeMap<String, u64>,
    pub sent_per_sec: f64,
    /// Deliveries over the run's length (or until the last delivery).
    pub delivered_per_sec: f64,
    pub ack: Option<Latency>,
    pub deliver: Option<Latency>,
    /// The servers' and the load generator's memory and CPU during the run.
    pub usage: Option<crate::procs::Usage>,
}

impl Traffic {
    /// Every taken message reached every recipient once, and at the rate offered.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.foreign == 0 && self.errors.is_empty()
    }

    /// Kept up: clean, nearly all offered messages sent, and p99 within `p99_ms`.
    pub fn sustained(&self, p99_ms: f64) -> bool {
        let offered = self.workload.total() as f64;
        self.clean()
            && self.sent as f64 >= 0.99 * offered
            && self.deliver.as_ref().is_some_and(|l| l.p99_ms <= p99_ms)
    }
}

/// A message's payload: its number, then zeros up to `size` bytes.
pub fn payload(k: u64, size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size.max(8)];
    data[..8].copy_from_slice(&k.to_le_bytes());
    data
}

/// The message number a payload carries.
pub fn number(payload: &[u8]) -> Option<u64> {
    payload
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// Sleeps until the next of `sends` is due, then moves every message due by
/// now into `batch`. False when the sender has nothing left.
pub async fn next_due(
    run: &Run,
    sends: &mut std::iter::Peekable<impl Iterator<Item = u64>>,
    batch: &mut Vec<u64>,
) -> bool {
    batch.clear();
    let Some(&first) = sends.peek() else {
        return false;
    };
    tokio::time::sleep_until(run.due(first).into()).await;
    let now = Instant::now();
    while let Some(&k) = sends.peek() {
        if run.due(k) > now {
            break;
        }
        batch.push(k);
        sends.next();
    }
    true
}

/// Random ids that cannot clash between runs.
pub fn run_id() -> String {
    format!("{:08x}", rand::rng().random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(shape: Shape) -> Workload {
        Workload {
            endpoints: 6,
            rate: 100.0,
            duration: Duration::from_secs(1),
            size: 16,
            shape,
            seed: 7,
        }
    }

    #[test]
    fn peers_are_distinct_others() {
        let w = w(Shape::Direct { peers: 3 });
        for (e, p) in w.peers().iter().enumerate() {
            assert_eq!(p.len(), 3);
            assert!(!p.contains(&e));
            let mut q = p.clone();
            q.dedup();
            assert_eq!(q.len(), 3);
        }
    }

    #[test]
    fn the_ledger_counts_loss_and_duplicates() {
        let run = Run::new(w(Shape::Group { size: 3 }), Duration::ZERO, Vec::new());
        assert_eq!(run.total(), 100);
        // Message 0 comes from endpoint 0 (rank 0 of group 0): ranks 1 and 2 expect it.
        run.sent(0);
        run.acked(0, 0);
        run.delivered(1, 1, 0);
        run.delivered(1, 1, 0);
        // Message 1 was sent, never acked: not counted as lost.
        run.sent(1);
        let r = run.report("t", true);
        assert_eq!((r.sent, r.acked, r.delivered), (2, Some(1), 1));
        assert_eq!((r.expected, r.lost, r.duplicated), (2, 1, 1));
        assert!(!r.clean());
        // Without acks, every sent message is owed.
        assert_eq!(run.report("t", false).lost, 3);
    }

    #[test]
    fn the_schedule_spreads_senders_and_slots() {
        let w = w(Shape::Direct { peers: 2 });
        let run = Run::new(w.clone(), Duration::ZERO, Vec::new());
        assert_eq!(run.sends_of(4).take(3).collect::<Vec<_>>(), vec![4, 10, 16]);
        assert_eq!((w.sender(10), w.slot(4), w.slot(10)), (4, 0, 1));
        assert_eq!(w.due_ns(50), 500_000_000);
    }
}
