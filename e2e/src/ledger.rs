//! What each device received, and the ledger of a run: sent, acked,
//! expected deliveries, delivered, lost, duplicated after the SDK's dedup,
//! and out of order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley_client::Event;
use parley_proto::pb;
use tokio::sync::mpsc::Receiver;

/// One device's view.
#[derive(Debug, Clone, Default)]
pub struct DeviceLog {
    /// Messages as the SDK handed them out, in order.
    pub messages: Vec<pb::Message>,
    /// When each of `messages` was handed out.
    pub received_at: Vec<Instant>,
    pub connects: u32,
    pub disconnects: u32,
    /// Read receipts pushed to the device, in order.
    pub receipts: Vec<pb::ReadReceipt>,
}

/// Records the events of many devices, each under a name ("user/device").
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    devices: Arc<Mutex<HashMap<String, DeviceLog>>>,
}

impl Recorder {
    pub fn record(&self, device: &str, mut events: Receiver<Event>) {
        let devices = self.devices.clone();
        let name = device.to_owned();
        devices.lock().unwrap().entry(name.clone()).or_default();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                let mut map = devices.lock().unwrap();
                let log = map.entry(name.clone()).or_default();
                match e {
                    Event::Message { message, .. } => {
                        log.messages.push(message);
                        log.received_at.push(Instant::now());
                    }
                    Event::Connected { .. } => log.connects += 1,
                    Event::Disconnected { .. } | Event::Closed(_) => log.disconnects += 1,
                    Event::Read(r) => log.receipts.push(r),
                    Event::Synced(_)
                    | Event::Tokens(_)
                    | Event::Settings(_)
                    | Event::Typing(_)
                    | Event::Blocks(_) => {}
                }
            }
        });
    }

    pub fn log(&self, device: &str) -> DeviceLog {
        self.devices
            .lock()
            .unwrap()
            .get(device)
            .cloned()
            .unwrap_or_default()
    }
}

/// An acked message and the devices that must receive it.
#[derive(Debug, Clone)]
pub struct Expect {
    pub msg_id: u64,
    pub receivers: Vec<String>,
}

/// The figures of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub sent: usize,
    pub acked: usize,
    pub expected: usize,
    pub delivered: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
}

impl Ledger {
    /// Counts against what the devices have received so far.
    pub fn compute(sent: usize, acked: &[Expect], rec: &Recorder) -> Self {
        let devices = rec.devices.lock().unwrap();
        let mut received: HashMap<&str, HashSet<u64>> = HashMap::new();
        let mut duplicated = 0;
        let mut out_of_order = 0;
        for (name, log) in devices.iter() {
            let set = received.entry(name).or_default();
            let mut last_seq: HashMap<u64, u64> = HashMap::new();
            for m in &log.messages {
                if !set.insert(m.msg_id) {
                    duplicated += 1;
                }
                let last = last_seq.entry(m.conversation_id).or_insert(0);
                if m.seq <= *last {
                    out_of_order += 1;
                }
                *last = m.seq.max(*last);
            }
        }
        let mut expected = 0;
        let mut delivered = 0;
        for e in acked {
            for r in &e.receivers {
                expected += 1;
                if received
                    .get(r.as_str())
                    .is_some_and(|s| s.contains(&e.msg_id))
                {
                    delivered += 1;
                }
            }
        }
        Self {
            sent,
            acked: acked.len(),
            expected,
            delivered,
            lost: expected - delivered,
            duplicated,
            out_of_order,
        }
    }

    /// Waits (up to `within`) for every expected delivery, then counts.
    pub async fn settle(sent: usize, acked: &[Expect], rec: &Recorder, within: Duration) -> Self {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ledger = Self::compute(sent, acked, rec);
            if ledger.lost == 0 || tokio::time::Instant::now() >= deadline {
                return ledger;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Prints the figures (they are the test's report).
    pub fn print(&self, name: &str) {
        println!(
            "ledger {name}: sent={} acked={} expected_deliveries={} delivered={} lost={} duplicated={} out_of_order={}",
            self.sent,
            self.acked,
            self.expected,
            self.delivered,
            self.lost,
            self.duplicated,
            self.out_of_order
        );
    }

    /// Every send acked, nothing lost, doubled or out of order.
    pub fn is_clean(&self) -> bool {
        self.acked == self.sent && self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0
    }
}
