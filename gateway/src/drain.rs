//! Moving clients off a gateway at a bounded rate.
//!
//! A gateway that drains (the operator scales it away, or it got SIGTERM)
//! must not send every client a GoAway at once: they would all reconnect in
//! the same instant and hammer the route lookup, the other gateways' TLS
//! handshakes and the chat service's catch-up reads together. Instead each
//! connection waits for a ticket, and tickets are issued at the drain rate;
//! a connection that gets one says GoAway and closes, and its client comes
//! back through the route lookup and resumes from its cursor.
//!
//! Draining only ever starts and speeds up: a gateway never returns to
//! service, since the routing table and the readiness probe have already
//! let go of it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

/// How often tickets are issued.
const TICK: Duration = Duration::from_millis(100);
const TICKS_PER_SECOND: u32 = 10;

/// The drain state a gateway's connections share.
pub struct Drain {
    /// Clients per second; zero while not draining.
    rate: AtomicU32,
    started: watch::Sender<bool>,
    tickets: Semaphore,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            rate: AtomicU32::new(0),
            started: watch::Sender::new(false),
            tickets: Semaphore::new(0),
        }
    }
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("rate", &self.rate())
            .finish_non_exhaustive()
    }
}

impl Drain {
    /// Whether the gateway is draining.
    pub fn active(&self) -> bool {
        *self.started.borrow()
    }

    /// Clients moved away per second (zero while not draining).
    pub fn rate(&self) -> u32 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Starts draining at `rate` clients per second, or speeds an ongoing
    /// drain up to it. True when this call started the drain: the caller
    /// then runs [`Drain::issue`].
    pub fn start(&self, rate: u32) -> bool {
        self.rate.fetch_max(rate.max(1), Ordering::Relaxed);
        !self.started.send_replace(true)
    }

    /// Marks the gateway as draining (out of the routing table, not ready)
    /// without moving anyone yet: the pause while routes settle.
    pub fn announce(&self) {
        self.started.send_replace(true);
    }

    /// Resolves when this connection's turn to leave has come. Cheap to
    /// create in every turn of a connection's select loop: until the drain
    /// starts it only waits on a watch.
    pub async fn turn(&self) {
        ticket(&self.started, &self.tickets).await;
    }

    /// Issues tickets at the current rate, forever (the gateway exits when
    /// it is done): every 100 ms a tenth of the rate, or one at a time for
    /// rates under ten a second. At most one tick's worth waits unclaimed,
    /// so a pause in claims does not build up a burst.
    pub async fn issue(&self) {
        loop {
            let rate = self.rate();
            if rate == 0 {
                tokio::time::sleep(TICK).await;
                continue;
            }
            let (per_tick, every) = pace(rate);
            let waiting = self.tickets.available_permits();
            if waiting < per_tick {
                self.tickets.add_permits(per_tick - waiting);
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Waits until `on`, then for a ticket: a connection's turn to leave.
async fn ticket(on: &watch::Sender<bool>, tickets: &Semaphore) {
    let mut on = on.subscribe();
    let _ = on.wait_for(|on| *on).await;
    if let Ok(ticket) = tickets.acquire().await {
        ticket.forget();
    }
}

/// Tickets per issue, and the time between issues, for `rate` a second:
/// a tenth of the rate every 100 ms, or one at a time below ten a second.
fn pace(rate: u32) -> (usize, Duration) {
    if rate < TICKS_PER_SECOND {
        (1, Duration::from_secs(1) / rate.max(1))
    } else {
        (rate.div_ceil(TICKS_PER_SECOND) as usize, TICK)
    }
}

/// Handing a bounded number of clients on to other gateways, at a bounded
/// rate, while this gateway stays in service: rebalancing after a
/// scale-up, when new gateways would otherwise fill only as clients happen
/// to reconnect. The clients told to go come back through the route lookup,
/// which sends them to the least-loaded gateways.
pub struct Shed {
    /// Clients still to hand on.
    left: AtomicU64,
    /// Clients per second.
    rate: AtomicU32,
    /// Whether a request is under way (connections wait on it cheaply).
    active: watch::Sender<bool>,
    tickets: Semaphore,
}

impl Default for Shed {
    fn default() -> Self {
        Self {
            left: AtomicU64::new(0),
            rate: AtomicU32::new(0),
            active: watch::Sender::new(false),
            tickets: Semaphore::new(0),
        }
    }
}

impl std::fmt::Debug for Shed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shed")
            .field("left", &self.left.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Shed {
    /// Hands `count` clients on at `rate` per second, replacing whatever
    /// was left of an earlier request.
    pub fn ask(&self, count: u64, rate: u32) {
        self.left.store(count, Ordering::Relaxed);
        self.rate.store(rate.max(1), Ordering::Relaxed);
        self.active.send_replace(count > 0);
    }

    /// Clients still to hand on.
    pub fn left(&self) -> u64 {
        self.left.load(Ordering::Relaxed)
    }

    /// Resolves when this connection is one of those handed on. Cheap in
    /// every turn of a connection's loop: it waits on a watch until asked.
    pub async fn turn(&self) {
        ticket(&self.active, &self.tickets).await;
    }

    /// Issues tickets while a request lasts: a tenth of the rate every
    /// 100 ms (one at a time below ten a second), never more than are left,
    /// and at most one tick's worth unclaimed. When the count is reached,
    /// connections stop waiting and the unclaimed tickets go.
    pub async fn issue(&self) {
        loop {
            let left = self.left.load(Ordering::Relaxed);
            let rate = self.rate.load(Ordering::Relaxed);
            if left == 0 || rate == 0 {
                if self.active.send_replace(false) {
                    self.tickets
                        .forget_permits(self.tickets.available_permits());
                }
                // A request that came in between the read and the reset.
                if self.left.load(Ordering::Relaxed) > 0 {
                    self.active.send_replace(true);
                    continue;
                }
                let mut active = self.active.subscribe();
                let _ = active.wait_for(|a| *a).await;
                continue;
            }
            let (per_tick, every) = pace(rate);
            let per_tick = per_tick.min(left as usize);
            let waiting = self.tickets.available_permits();
            if waiting < per_tick {
                let add = per_tick - waiting;
                self.tickets.add_permits(add);
                let _ = self
                    .left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                        Some(l.saturating_sub(add as u64))
                    });
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// `n` connections waiting for their turn; counts those that left.
    fn waiting(drain: &Arc<Drain>, n: usize) -> Arc<AtomicUsize> {
        let left = Arc::new(AtomicUsize::new(0));
        for _ in 0..n {
            let (drain, left) = (drain.clone(), left.clone());
            tokio::spawn(async move {
                drain.turn().await;
                left.fetch_add(1, Ordering::Relaxed);
            });
        }
        left
    }

    fn issuing(drain: &Arc<Drain>) -> tokio::task::JoinHandle<()> {
        let drain = drain.clone();
        tokio::spawn(async move { drain.issue().await })
    }

    #[tokio::test(start_paused = true)]
    async fn connections_leave_at_the_drain_rate_and_faster_when_asked() {
        let drain = Arc::new(Drain::default());
        let left = waiting(&drain, 100);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(left.load(Ordering::Relaxed), 0, "nobody leaves before");
        assert!(!drain.active());

        assert!(drain.start(20));
        assert!(!drain.start(10), "a second request does not restart it");
        assert_eq!(drain.rate(), 20, "nor slow it down");
        let issuer = issuing(&drain);
        tokio::time::sleep(Duration::from_millis(1050)).await;
        let after_one_second = left.load(Ordering::Relaxed);
        assert!(
            (18..=22).contains(&after_one_second),
            "20 per second, not {after_one_second}"
        );
        // SIGTERM with little grace left: faster.
        drain.start(200);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(left.load(Ordering::Relaxed), 100);
        issuer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn slow_rates_issue_one_ticket_at_a_time() {
        let drain = Arc::new(Drain::default());
        let left = waiting(&drain, 10);
        drain.start(2);
        let issuer = issuing(&drain);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(left.load(Ordering::Relaxed), 5, "two a second");
        issuer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_shed_hands_on_exactly_the_count_asked_at_its_rate() {
        let shed = Arc::new(Shed::default());
        let left = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let (shed, left) = (shed.clone(), left.clone());
            tokio::spawn(async move {
                shed.turn().await;
                left.fetch_add(1, Ordering::Relaxed);
            });
        }
        let issuer = {
            let shed = shed.clone();
            tokio::spawn(async move { shed.issue().await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(left.load(Ordering::Relaxed), 0, "nobody before it is asked");
        shed.ask(30, 20);
        tokio::time::sleep(Duration::from_millis(1050)).await;
        let after_one_second = left.load(Ordering::Relaxed);
        assert!(
            (18..=22).contains(&after_one_second),
            "20 per second, not {after_one_second}"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(left.load(Ordering::Relaxed), 30, "exactly the count asked");
        assert_eq!(shed.left(), 0);
        // A new request goes on from there.
        shed.ask(5, 100);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(left.load(Ordering::Relaxed), 35);
        issuer.abort();
    }
}
