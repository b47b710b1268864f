//! The delivery bus: carries committed messages to the gateways that hold
//! their recipients, and events (an offline recipient) to whoever sends push
//! notifications. The embedded default uses channels; the cluster uses
//! RabbitMQ (`parley-amqp`) behind the same trait. The bus may lose a
//! delivery: devices recover it from the database by cursor.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use parley_proto::pb;
use tokio::sync::{broadcast, mpsc};

use crate::error::ChatError;
use crate::presence::Session;

/// One message for some users connected to one gateway.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<pb::Message>,
    /// (user, inbox_seq) for each recipient on the gateway.
    pub recipients: Vec<(String, u64)>,
}

/// A frame for every online device of some users, not stored (a read
/// receipt, a setting changed on another device): a device that misses it
/// reads the state again.
#[derive(Debug, Clone)]
pub struct Signal {
    pub users: Vec<String>,
    /// Sent as is (request_id 0).
    pub frame: Arc<pb::ServerFrame>,
}

/// What a gateway's queue carries.
#[derive(Debug, Clone)]
pub enum Dispatch {
    /// Committed messages, in commit order.
    Messages(Vec<Delivery>),
    Signals(Vec<Signal>),
}

/// Something for services outside the message path.
#[derive(Debug, Clone)]
pub enum ChatEvent {
    /// `user` has no device online for a message: a push-notification cue.
    OfflineMessage {
        user: String,
        inbox_seq: u64,
        message: Arc<pb::Message>,
    },
}

/// Devices logged out: the connections of `user` on `device` (every
/// device when None) whose token was issued until `at_ms` are closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub user: String,
    pub device: Option<String>,
    pub at_ms: i64,
}

impl From<Revocation> for parley_proto::internal::DeviceRevoked {
    fn from(r: Revocation) -> Self {
        Self {
            user_id: r.user,
            device_id: r.device.unwrap_or_default(),
            revoked_at_ms: r.at_ms,
        }
    }
}

impl From<parley_proto::internal::DeviceRevoked> for Revocation {
    fn from(r: parley_proto::internal::DeviceRevoked) -> Self {
        Self {
            user: r.user_id,
            device: (!r.device_id.is_empty()).then_some(r.device_id),
            at_ms: r.revoked_at_ms,
        }
    }
}

impl Revocation {
    /// From a SQL row of (user, device or NULL, time).
    pub fn from_row((user, device, at_ms): (String, Option<String>, i64)) -> Self {
        Self {
            user,
            device,
            at_ms,
        }
    }
}

/// Carries deliveries to gateways and events to listeners.
#[async_trait]
pub trait DeliveryBus: Send + Sync + 'static {
    /// Deliveries for one gateway, in commit order.
    async fn publish(&self, gateway: &str, deliveries: Vec<Delivery>) -> Result<(), ChatError>;
    /// Deliveries for every gateway, in commit order; each hands them to the
    /// recipients it holds and ignores the rest. For while presence cannot
    /// tell where the recipients are.
    async fn broadcast(&self, deliveries: Vec<Delivery>) -> Result<(), ChatError>;
    /// Signals for the users `gateway` holds, or for every gateway's when
    /// None (presence could not tell where they are).
    async fn signal(&self, gateway: Option<&str>, signals: Vec<Signal>) -> Result<(), ChatError>;
    /// The events of one batch, in commit order (one publish, not one each).
    async fn events(&self, events: Vec<ChatEvent>) -> Result<(), ChatError>;
    /// Tells `gateway` that a device it holds logged in again as `newer`
    /// (on another gateway), so that it closes the older connection. In one
    /// process the gateway's registry does this itself: nothing to carry.
    async fn replaced(&self, _gateway: &str, _newer: &Session) -> Result<(), ChatError> {
        Ok(())
    }
    /// Tells every gateway that devices were logged out.
    async fn revoked(&self, revocation: Revocation) -> Result<(), ChatError>;
}

/// The bus inside one process.
#[derive(Debug)]
pub struct LocalBus {
    gateways: RwLock<HashMap<String, mpsc::Sender<Dispatch>>>,
    events: broadcast::Sender<Arc<[ChatEvent]>>,
    revocations: broadcast::Sender<Revocation>,
}

impl Default for LocalBus {
    fn default() -> Self {
        Self {
            gateways: RwLock::default(),
            events: broadcast::channel(1024).0,
            revocations: broadcast::channel(1024).0,
        }
    }
}

impl LocalBus {
    /// The queue of one gateway (replacing an earlier one of the same name).
    pub fn subscribe(&self, gateway: &str, capacity: usize) -> mpsc::Receiver<Dispatch> {
        let (tx, rx) = mpsc::channel(capacity);
        self.gateways
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(gateway.to_owned(), tx);
        rx
    }

    /// The events, a batch (one commit's) at a time: the push sender's
    /// feed in one process. A listener more than 1,024 batches behind
    /// loses the oldest (`RecvError::Lagged`).
    pub fn events(&self) -> broadcast::Receiver<Arc<[ChatEvent]>> {
        self.events.subscribe()
    }

    /// Log-outs, for the gateway in this process to close connections.
    pub fn revocations(&self) -> broadcast::Receiver<Revocation> {
        self.revocations.subscribe()
    }
}

impl LocalBus {
    /// Hands `what` to the queue of `gateway`, or of every gateway.
    async fn hand(&self, gateway: Option<&str>, what: Dispatch) {
        let queues: Vec<_> = {
            let gateways = self.gateways.read().unwrap_or_else(|e| e.into_inner());
            match gateway {
                Some(g) => gateways.get(g).cloned().into_iter().collect(),
                None => gateways.values().cloned().collect(),
            }
        };
        if queues.is_empty() {
            tracing::debug!(gateway, "no queue for gateway; dropped");
        }
        // A closed queue means the gateway is gone; its devices will sync.
        for tx in queues {
            let _ = tx.send(what.clone()).await;
        }
    }
}

#[async_trait]
impl DeliveryBus for LocalBus {
    async fn publish(&self, gateway: &str, deliveries: Vec<Delivery>) -> Result<(), ChatError> {
        self.hand(Some(gateway), Dispatch::Messages(deliveries))
            .await;
        Ok(())
    }

    async fn broadcast(&self, deliveries: Vec<Delivery>) -> Result<(), ChatError> {
        self.hand(None, Dispatch::Messages(deliveries)).await;
        Ok(())
    }

    async fn signal(&self, gateway: Option<&str>, signals: Vec<Signal>) -> Result<(), ChatError> {
        self.hand(gateway, Dispatch::Signals(signals)).await;
        Ok(())
    }

    async fn events(&self, events: Vec<ChatEvent>) -> Result<(), ChatError> {
        // No listener is fine: events are cues, not the source of truth.
        let _ = self.events.send(events.into());
        Ok(())
    }

    async fn revoked(&self, revocation: Revocation) -> Result<(), ChatError> {
        // No receiver (no gateway in this process) means nothing to close.
        let _ = self.revocations.send(revocation);
        Ok(())
    }
}
