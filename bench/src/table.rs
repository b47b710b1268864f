//! Plain-text tables of the figures, with ratios to the first row.

use std::fmt::Write as _;

use crate::load::{Latency, Traffic};
use crate::parley::CatchUp;
use crate::{IdleReport, Throughput};

fn lat(l: &Option<Latency>) -> String {
    match l {
        Some(l) => format!(
            "{:.2}/{:.2}/{:.2}/{:.1}",
            l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms
        ),
        None => "n/a".to_owned(),
    }
}

fn ledger(t: &Traffic) -> String {
    let acked = t.acked.map_or("-".to_owned(), |a| a.to_string());
    let errors: u64 = t.errors.values().sum();
    format!(
        "sent={} acked={acked} delivered={}/{} lost={} dup={} errors={errors}",
        t.sent, t.delivered, t.expected, t.lost, t.duplicated
    )
}

/// Server CPU microseconds per delivered message, if measured.
pub fn cpu_us_per_delivery(t: &Traffic) -> Option<f64> {
    let u = t.usage.as_ref()?;
    let cpu: f64 = u
        .processes
        .iter()
        .filter(|(name, _, _)| name != "load generator")
        .map(|(_, a, b)| b.cpu_secs - a.cpu_secs)
        .sum();
    (t.delivered > 0).then(|| cpu * 1e6 / t.delivered as f64)
}

/// One line for a step of a search.
pub fn step_line(t: &Traffic) -> String {
    format!(
        "{:<15} offered {:>8.0}/s delivered {:>8.0}/s  deliver p50/p99/p99.9/max ms {}  {}",
        t.system,
        t.workload.rate,
        t.delivered_per_sec,
        lat(&t.deliver),
        ledger(t)
    )
}

/// Traffic runs, one row each.
pub fn traffic(rows: &[Traffic]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<15} {:>9} {:>11} {:>7} {:>25} {:>25} {:>9}  ledger",
        "system",
        "offered/s",
        "delivered/s",
        "ratio",
        "ack p50/p99/p99.9/max ms",
        "deliver p50/p99/p99.9/max",
        "cpu µs/dl"
    );
    let first = rows.first().map_or(1.0, |t| t.delivered_per_sec.max(1e-9));
    for t in rows {
        let _ = writeln!(
            s,
            "{:<15} {:>9.0} {:>11.0} {:>7.2} {:>25} {:>25} {:>9}  {}",
            t.system,
            t.workload.rate,
            t.delivered_per_sec,
            t.delivered_per_sec / first,
            lat(&t.ack),
            lat(&t.deliver),
            cpu_us_per_delivery(t).map_or("-".to_owned(), |c| format!("{c:.1}")),
            ledger(t)
        );
    }
    s
}

/// Throughput searches: the best rate and the latency at half of it.
pub fn throughput(rows: &[Throughput]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<15} {:>13} {:>7} {:>25} {:>12} {:>25} {:>25}",
        "system",
        "max sustained",
        "ratio",
        "deliver p50/p99/p99.9/max",
        "half rate",
        "ack at half",
        "deliver at half"
    );
    let rate = |t: &Throughput| t.max.as_ref().map_or(0.0, |m| m.delivered_per_sec);
    let first = rows.first().map_or(1.0, |t| rate(t).max(1e-9));
    for t in rows {
        let none = || "-".to_owned();
        let _ = writeln!(
            s,
            "{:<15} {:>13.0} {:>7.2} {:>25} {:>12} {:>25} {:>25}",
            t.system,
            rate(t),
            rate(t) / first,
            t.max.as_ref().map_or_else(none, |m| lat(&m.deliver)),
            t.half
                .as_ref()
                .map_or_else(none, |h| format!("{:.0}", h.workload.rate)),
            t.half.as_ref().map_or_else(none, |h| lat(&h.ack)),
            t.half.as_ref().map_or_else(none, |h| lat(&h.deliver)),
        );
    }
    s
}

/// Idle connections.
pub fn idle(rows: &[IdleReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<15} {:>9} {:>10} {:>12} {:>12} {:>11} {:>7} {:>14}",
        "system",
        "requested",
        "connected",
        "connects/s",
        "memory MiB",
        "bytes/conn",
        "ratio",
        "idle CPU %core"
    );
    let first = rows
        .first()
        .map_or(1.0, |r| r.bytes_per_connection.max(1e-9));
    for r in rows {
        let _ = writeln!(
            s,
            "{:<15} {:>9} {:>10} {:>12.0} {:>12.1} {:>11.0} {:>7.2} {:>14.2}",
            r.system,
            r.requested,
            r.connected,
            r.connects_per_sec,
            r.loaded_kib.saturating_sub(r.baseline_kib) as f64 / 1024.0,
            r.bytes_per_connection,
            r.bytes_per_connection / first,
            r.cpu_percent_of_a_core
        );
    }
    s
}

/// A catch-up.
pub fn catch_up(c: &CatchUp) -> String {
    let mut s = format!(
        "missed {} received {} in {:.2} s ({:.0} messages/s; filled in {:.1} s)\n",
        c.missed, c.received, c.catch_up_secs, c.messages_per_sec, c.fill_secs
    );
    for (name, before, after) in &c.usage.processes {
        let _ = writeln!(
            s,
            "  {name}: resident {:.1} MiB before, peak {:.1} MiB during, CPU {:.2} s",
            before.rss_kib as f64 / 1024.0,
            after.hwm_kib as f64 / 1024.0,
            after.cpu_secs - before.cpu_secs
        );
    }
    s
}
