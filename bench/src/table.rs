//! Plain-text tables of the figures, with ratios to the first row.

use std::fmt::Write as _;

use crate::load::{Latency, Traffic};
use crate::parley::CatchUp;
use crate::procs::SERVICES;
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

/// The CPU columns of `cpu_split`: a title, and the processes it counts.
const CPU_COLUMNS: &[(&str, &[&str])] = &[
    ("parley", &["parley"]),
    ("gateways", &["gw"]),
    ("chat", &["chat"]),
    ("postgres", &["postgres"]),
    ("redis", &["redis"]),
    ("rabbitmq", &["rabbitmq"]),
    ("loadgen", &["load generator"]),
];

/// CPU microseconds per delivered message of the processes whose names
/// start with one of `prefixes`, if measured.
fn cpu_us(t: &Traffic, prefixes: &[&str]) -> Option<f64> {
    let u = t.usage.as_ref()?;
    let cpu: f64 = u
        .processes
        .iter()
        .filter(|(name, _, _)| prefixes.iter().any(|p| name.starts_with(p)))
        .map(|(_, a, b)| b.cpu_secs - a.cpu_secs)
        .sum();
    (t.delivered > 0).then(|| cpu * 1e6 / t.delivered as f64)
}

/// The server's own CPU microseconds per delivered message (Parley's
/// processes, or the broker), if measured: not the shared services, not the
/// load generator.
pub fn cpu_us_per_delivery(t: &Traffic) -> Option<f64> {
    let u = t.usage.as_ref()?;
    let own: Vec<&str> = u
        .processes
        .iter()
        .map(|(name, _, _)| name.as_str())
        .filter(|name| *name != "load generator" && !SERVICES.iter().any(|(s, _)| s == name))
        .collect();
    cpu_us(t, &own)
}

/// Every process's CPU per delivered message, a column per kind, and the
/// sum: what a delivery costs the machine, not only Parley.
pub fn cpu_split(rows: &[Traffic]) -> String {
    let mut s = String::new();
    let _ = write!(s, "{:<15}", "cpu µs/dl");
    for (title, _) in CPU_COLUMNS {
        let _ = write!(s, " {title:>9}");
    }
    let _ = writeln!(s, " {:>9}", "all");
    for t in rows {
        let _ = write!(s, "{:<15}", t.system);
        let mut all = 0.0;
        for (_, prefixes) in CPU_COLUMNS {
            match cpu_us(t, prefixes) {
                Some(c) if c >= 0.05 => {
                    all += c;
                    let _ = write!(s, " {c:>9.1}");
                }
                _ => {
                    let _ = write!(s, " {:>9}", "-");
                }
            }
        }
        let _ = writeln!(s, " {all:>9.1}");
    }
    s
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
        if SERVICES.iter().any(|(s, _)| s == name) {
            continue;
        }
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

/// The PostgreSQL floor, and each sustained rate as a share of it.
pub fn floor(f: &crate::floor::Floor, rows: &[Throughput]) -> String {
    let mut s = format!(
        "postgres floor: the store's batch call (parley_append) driven directly; \
         {} users, {} direct conversations, {}-byte messages\n",
        f.users, f.conversations, f.size
    );
    let _ = writeln!(
        s,
        "{:>6} {:>8} {:>10} {:>14} {:>10}",
        "batch", "writers", "msg/s", "postgres µs/msg", "ms a call"
    );
    for r in &f.runs {
        let _ = writeln!(
            s,
            "{:>6} {:>8} {:>10.0} {:>14.1} {:>10.2}",
            r.batch, r.writers, r.messages_per_sec, r.postgres_us, r.call_ms
        );
    }
    let Some(best) = f.best() else {
        return s;
    };
    let _ = writeln!(
        s,
        "floor: {:.0} msg/s (batch {}, {} writers)",
        best.messages_per_sec, best.batch, best.writers
    );
    for t in rows {
        let rate = t.max.as_ref().map_or(0.0, |m| m.delivered_per_sec);
        let _ = writeln!(
            s,
            "{} sustained {:.0} msg/s = {:.1}% of the floor",
            t.system,
            rate,
            100.0 * rate / best.messages_per_sec.max(1e-9)
        );
    }
    s
}
