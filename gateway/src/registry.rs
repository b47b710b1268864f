//! The sessions this gateway holds, by user, and the dispatcher that hands
//! each delivery to every local device of its recipients. A device whose
//! queue is full is marked lagged instead of blocking anyone: it then catches
//! up from the database, so a slow reader costs a bounded amount of memory.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use parley_core::{Delivery, Session};
use parley_proto::pb;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, mpsc};

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
    /// Resolves when a newer connection of the same device replaces this
    /// one, here or on another gateway. Made once, so that the connection
    /// does not register a new waiter in every turn of its loop.
    pub replaced: Pin<Box<OwnedNotified>>,
}

struct Entry {
    conn: u64,
    session: Session,
    tx: mpsc::Sender<Push>,
    lagged: Arc<AtomicBool>,
    replaced: Arc<Notify>,
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
    /// An older connection of the same device held here is replaced: it
    /// leaves the registry (it gets no more pushes) and is told to close.
    pub fn register(&self, session: &Session, conn: u64, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity);
        let lagged = Arc::new(AtomicBool::new(false));
        let replaced = Arc::new(Notify::new());
        let entry = Entry {
            conn,
            session: session.clone(),
            tx,
            lagged: lagged.clone(),
            replaced: replaced.clone(),
        };
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let list = users.entry(session.user.clone()).or_default();
        evict(list, &session.device, session.epoch);
        list.push(entry);
        Subscription {
            rx,
            lagged,
            replaced: Box::pin(replaced.notified_owned()),
        }
    }

    /// Closes the local connections of `user`'s `device` older than
    /// `epoch`: the device logged in again, perhaps on another gateway.
    /// Returns how many were closed.
    pub fn replace(&self, user: &str, device: &str, epoch: u64) -> usize {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = users.get_mut(user) else {
            return 0;
        };
        let closed = evict(list, device, epoch);
        if list.is_empty() {
            users.remove(user);
        }
        closed
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

/// Removes from `list` the entries of `device` older than `epoch`, and tells
/// their connections; returns how many.
fn evict(list: &mut Vec<Entry>, device: &str, epoch: u64) -> usize {
    let before = list.len();
    list.retain(|e| {
        let stale = e.session.device == device && e.session.epoch < epoch;
        if stale {
            e.replaced.notify_one();
        }
        !stale
    });
    before - list.len()
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

    #[tokio::test]
    async fn a_device_that_logs_in_again_replaces_its_older_connection() {
        let reg = Registry::default();
        let s = |device: &str, epoch| Session::new("a", device, "g", epoch);
        let old = reg.register(&s("phone", 1), 1, 4);
        let laptop = reg.register(&s("laptop", 2), 2, 4);
        let mut new = reg.register(&s("phone", 3), 3, 4);
        // The old connection is told, and the notice waits for it.
        tokio::time::timeout(std::time::Duration::from_secs(1), old.replaced)
            .await
            .expect("the older phone connection is told it was replaced");
        assert_eq!(reg.len(), 2, "the laptop and the new phone remain");
        reg.dispatch(&delivery("a", 1));
        assert_eq!(new.rx.try_recv().unwrap().inbox_seq, 1);
        // A late notice from another gateway about an older login, or about
        // this very one, closes nothing.
        assert_eq!(reg.replace("a", "phone", 3), 0);
        assert_eq!(reg.replace("a", "phone", 4), 1);
        assert_eq!(reg.replace("b", "phone", 9), 0);
        drop(laptop);
        reg.unregister("a", 2);
        assert!(reg.is_empty());
    }
}
