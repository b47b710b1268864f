//! What the chat service counts, and the label sets shared with the
//! gateway. The processes register these in their one registry and serve
//! them (see `parley-ops`); nothing here does I/O.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming an error code, as in the protocol (`NOT_MEMBER`, ...).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// The label of a protocol error code.
pub fn code_label(code: parley_proto::pb::ErrorCode) -> CodeLabel {
    CodeLabel {
        code: code.as_str_name().to_owned(),
    }
}

/// What the chat service counts.
#[derive(Debug, Clone)]
pub struct ChatMetrics {
    pub messages: Counter,
    pub duplicates: Counter,
    pub batch_size: Histogram,
    pub append_seconds: Histogram,
    pub errors: Family<CodeLabel, Counter>,
    pub publishes: Counter,
    pub broadcasts: Counter,
    pub offline_events: Counter,
    pub log_outs: Counter,
    pub sessions: Counter,
    pub refreshes: Counter,
    pub refresh_reuses: Counter,
}

impl Default for ChatMetrics {
    fn default() -> Self {
        Self {
            messages: Counter::default(),
            duplicates: Counter::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            append_seconds: Histogram::new(exponential_buckets(0.0002, 2.0, 16)),
            errors: Family::default(),
            publishes: Counter::default(),
            broadcasts: Counter::default(),
            offline_events: Counter::default(),
            log_outs: Counter::default(),
            sessions: Counter::default(),
            refreshes: Counter::default(),
            refresh_reuses: Counter::default(),
        }
    }
}

impl ChatMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "chat_messages",
            "Messages committed (resends excluded)",
            self.messages.clone(),
        );
        r.register(
            "chat_duplicates",
            "Resent messages answered with the original's ack",
            self.duplicates.clone(),
        );
        r.register(
            "chat_append_batch_size",
            "Sends committed per transaction",
            self.batch_size.clone(),
        );
        r.register(
            "chat_append_seconds",
            "Time to commit one batch of sends",
            self.append_seconds.clone(),
        );
        r.register(
            "chat_errors",
            "Requests refused or failed, by error code",
            self.errors.clone(),
        );
        r.register(
            "chat_publishes",
            "Delivery batches handed to the bus, one per gateway",
            self.publishes.clone(),
        );
        r.register(
            "chat_broadcasts",
            "Delivery batches handed to every gateway, presence being unreachable or unsettled",
            self.broadcasts.clone(),
        );
        r.register(
            "chat_offline_events",
            "Messages for users with no device online (push cues)",
            self.offline_events.clone(),
        );
        r.register(
            "chat_log_outs",
            "Log-outs of one device or of all a user's devices",
            self.log_outs.clone(),
        );
        r.register(
            "chat_sessions",
            "Devices logged in with a refresh token (admin CreateSession)",
            self.sessions.clone(),
        );
        r.register(
            "chat_refreshes",
            "Refresh tokens traded for new tokens",
            self.refreshes.clone(),
        );
        r.register(
            "chat_refresh_reuses",
            "Used-up refresh tokens presented again, each logging its device out",
            self.refresh_reuses.clone(),
        );
    }
}
