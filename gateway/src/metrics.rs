//! What a gateway counts, exported at `/metrics` by the gateway binary.

use parley_core::{CodeLabel, code_label};
use parley_ops::BackendMetrics;
use parley_proto::codec::Outgoing;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    /// Open client connections, authenticated or not.
    pub connections: Gauge,
    /// Authenticated device sessions (set from the registry when scraped).
    pub sessions: Gauge,
    pub accepted: Counter,
    /// Send frames received.
    pub messages_in: Counter,
    /// Deliver frames written.
    pub messages_out: Counter,
    /// Frames of any kind written, and the socket writes that carried them:
    /// frames / writes is how many frames share a system call.
    pub frames_out: Counter,
    pub writes: Counter,
    /// From a Send frame read to its ack (or error) ready to write.
    pub send_seconds: Histogram,
    /// Error frames written, by code.
    pub errors: Family<CodeLabel, Counter>,
    /// `Batch` calls to the chat service (a cluster gateway), and the sends
    /// and acks they carried: items / batches is the batch size.
    pub chat_batches: Counter,
    pub chat_batch_items: Counter,
    pub backends: BackendMetrics,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            connections: Gauge::default(),
            sessions: Gauge::default(),
            accepted: Counter::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            frames_out: Counter::default(),
            writes: Counter::default(),
            send_seconds: Histogram::new(exponential_buckets(0.0002, 2.0, 16)),
            errors: Family::default(),
            chat_batches: Counter::default(),
            chat_batch_items: Counter::default(),
            backends: BackendMetrics::default(),
        }
    }
}

impl GatewayMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "gateway_connections",
            "Open client connections",
            self.connections.clone(),
        );
        r.register(
            "gateway_sessions",
            "Authenticated device sessions",
            self.sessions.clone(),
        );
        r.register(
            "gateway_accepted",
            "Client connections accepted",
            self.accepted.clone(),
        );
        r.register(
            "gateway_messages_in",
            "Send frames received from devices",
            self.messages_in.clone(),
        );
        r.register(
            "gateway_messages_out",
            "Deliver frames written to devices",
            self.messages_out.clone(),
        );
        r.register(
            "gateway_frames_out",
            "Frames of any kind written to devices",
            self.frames_out.clone(),
        );
        r.register(
            "gateway_writes",
            "Socket writes to devices (frames_out / writes: frames per system call)",
            self.writes.clone(),
        );
        r.register(
            "gateway_send_latency_seconds",
            "From a Send frame read to its ack ready to write",
            self.send_seconds.clone(),
        );
        r.register(
            "gateway_errors",
            "Error frames written to devices, by code",
            self.errors.clone(),
        );
        r.register(
            "gateway_chat_batches",
            "Batch calls to the chat service",
            self.chat_batches.clone(),
        );
        r.register(
            "gateway_chat_batch_items",
            "Sends and acks carried by batch calls to the chat service",
            self.chat_batch_items.clone(),
        );
        self.backends.register(r);
    }

    /// Raises the batch counters to totals counted by the chat client.
    pub fn set_batches(&self, (calls, items): (u64, u64)) {
        for (counter, total) in [(&self.chat_batches, calls), (&self.chat_batch_items, items)] {
            let now = counter.get();
            if total > now {
                counter.inc_by(total - now);
            }
        }
    }

    /// Counts what is about to be written, in one write.
    pub fn written(&self, frames: &[Outgoing]) {
        self.writes.inc();
        self.frames_out.inc_by(frames.len() as u64);
        for f in frames {
            if f.is_deliver() {
                self.messages_out.inc();
            } else if let Some(e) = f.error() {
                self.errors.get_or_create(&code_label(e.code())).inc();
            }
        }
    }
}
