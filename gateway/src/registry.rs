//! The sessions this gateway holds, by user, and the dispatcher that hands
//! each delivery to every local device of its recipients. A device whose
//! queue is full is marked lagged instead of blocking anyone: it then catches
//! up from the database, so a slow reader costs a bounded amount of memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use parley_core::{Delivery, Session};
use parley_proto::pb;
use tokio::sync::mpsc;

/// One message for one device.
#[derive(Debug, Clone)]
pub struct Push {
    pub inbox_seq: u64,
    pub message: Arc<pb::Message>,
}

/// What a connection keeps of its registration.
#[derive(Debug)]
pub struct Subscription {
    pub rx: mpsc::Receiver<Push>,
    pub lagged: Arc<AtomicBool>,
}

struct Entry {
    conn: u64,
    session: Session,
    tx: mpsc::Sender<Push>,
    lagged: Arc<AtomicBool>,
}

/// Local sessions by user.
pub struct Registry {
    users: Mutex<HashMap<String, Vec<Entry>>>,
    /// An empty push that wakes a connection to look at its lag flag.
    nudge: Arc<pb::Message>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            users: Mutex::default(),
            nudge: Arc::new(pb::Message::default()),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("sessions", &self.len())
            .finish()
    }
}

impl Registry {
    /// Registers connection `conn` of a session with a queue of `capacity`.
    pub fn register(&self, session: &Session, conn: u64, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity);
        let lagged = Arc::new(AtomicBool::new(false));
        let entry = Entry {
            conn,
            session: session.clone(),
            tx,
            lagged: lagged.clone(),
        };
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(session.user.clone())
            .or_default()
            .push(entry);
        Subscription { rx, lagged }
    }

    /// Every session held, for re-registering presence.
    pub fn sessions(&self) -> Vec<Session> {
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .map(|e| e.session.clone())
            .collect()
    }

    /// Makes every connection catch up from the database: deliveries may
    /// have been lost (the broker or presence was away).
    pub fn resync_all(&self) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for entry in users.values().flatten() {
            entry.lagged.store(true, Ordering::Release);
            // A full queue wakes the connection anyway.
            let _ = entry.tx.try_send(Push {
                inbox_seq: 0,
                message: self.nudge.clone(),
            });
        }
    }

    pub fn unregister(&self, user: &str, conn: u64) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = users.get_mut(user) {
            list.retain(|e| e.conn != conn);
            if list.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Sessions held, all users together.
    pub fn len(&self) -> usize {
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands a delivery to every local device of its recipients.
    pub fn dispatch(&self, delivery: &Delivery) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        for (user, inbox_seq) in &delivery.recipients {
            for entry in users.get(user).into_iter().flatten() {
                let push = Push {
                    inbox_seq: *inbox_seq,
                    message: delivery.message.clone(),
                };
                if entry.tx.try_send(push).is_err() {
                    entry.lagged.store(true, Ordering::Release);
                }
            }
        }
    }
}

/// Feeds deliveries from the bus to the registry until the bus closes.
pub async fn dispatcher(registry: Arc<Registry>, mut bus: mpsc::Receiver<Vec<Delivery>>) {
    while let Some(batch) = bus.recv().await {
        for delivery in &batch {
            registry.dispatch(delivery);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(user: &str, seq: u64) -> Delivery {
        Delivery {
            message: Arc::new(pb::Message::default()),
            recipients: vec![(user.to_owned(), seq)],
        }
    }

    #[test]
    fn every_device_of_a_user_gets_the_push_and_overflow_marks_lag() {
        let reg = Registry::default();
        let s = |device: &str| Session {
            user: "a".into(),
            device: device.into(),
            gateway: "g".into(),
            epoch: 1,
        };
        let mut phone = reg.register(&s("phone"), 1, 2);
        let mut laptop = reg.register(&s("laptop"), 2, 8);
        for seq in 1..=3 {
            reg.dispatch(&delivery("a", seq));
        }
        assert_eq!(laptop.rx.try_recv().unwrap().inbox_seq, 1);
        assert_eq!(phone.rx.try_recv().unwrap().inbox_seq, 1);
        assert!(
            phone.lagged.load(Ordering::Acquire),
            "the third push did not fit"
        );
        assert!(!laptop.lagged.load(Ordering::Acquire));
        assert_eq!(reg.sessions().len(), 2);
        reg.resync_all();
        assert!(
            laptop.lagged.load(Ordering::Acquire),
            "a resync marks everyone"
        );
        reg.unregister("a", 1);
        reg.unregister("a", 2);
        assert!(reg.is_empty());
    }
}
