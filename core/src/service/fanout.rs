//! The fan-out of committed messages: one presence lookup for a whole
//! batch, one publish per gateway holding recipients (every delivery of the
//! batch for that gateway, in commit order), and push cues for recipients
//! with no device online. While presence is unreachable or unsettled (its
//! store restarted empty and gateways are writing their sessions back),
//! the batch goes to every gateway in one publish instead, so live delivery
//! does not wait for presence. The bus may lose a delivery: devices recover
//! it from the store by cursor.

use std::collections::HashMap;
use std::sync::Arc;

use super::ChatService;
use crate::bus::{ChatEvent, Delivery};
use crate::presence::Located;
use crate::store::Appended;

impl ChatService {
    /// Where `users` are connected; unknown (so: every gateway) while
    /// presence cannot be read.
    pub(super) async fn locate(&self, users: &[&str]) -> Located {
        match self.presence.locate(users).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "presence lookup failed; sending to every gateway");
                Located::unknown()
            }
        }
    }

    /// Sends committed messages to the gateways of their online recipients,
    /// one publish per gateway, in commit order; offline recipients become
    /// events. Takes the messages by value: each becomes the one shared
    /// copy every delivery of it points to.
    pub(super) async fn fan_out(&self, appended: Vec<Appended>) {
        let mut users: Vec<&str> = appended
            .iter()
            .flat_map(|a| a.recipients.iter().map(|(u, _)| u.as_str()))
            .collect();
        if users.is_empty() {
            return;
        }
        users.sort_unstable();
        users.dedup();
        let located = self.locate(&users).await;
        let mut gateway_of: HashMap<&str, Vec<&str>> = HashMap::new();
        for (gateway, users) in &located.gateways {
            for u in users {
                gateway_of
                    .entry(u.as_str())
                    .or_default()
                    .push(gateway.as_str());
            }
        }
        let mut per_gateway: HashMap<&str, Vec<Delivery>> = HashMap::new();
        let mut everywhere = Vec::new();
        let mut events = Vec::new();
        for a in appended {
            let message = Arc::new(a.message);
            // A recall or an edit updates what devices show: it wakes
            // nobody.
            let cues = !message.recalled && message.edited_at_ms == 0;
            if !located.settled {
                // Where presence may have lost recipients, every gateway
                // gets every delivery and keeps what it holds.
                for (user, inbox_seq) in &a.recipients {
                    if cues && !gateway_of.contains_key(user.as_str()) && *user != message.sender_id
                    {
                        self.metrics.offline_events.inc();
                        events.push(ChatEvent::OfflineMessage {
                            user: user.clone(),
                            inbox_seq: *inbox_seq,
                            message: message.clone(),
                        });
                    }
                }
                everywhere.push(Delivery {
                    message,
                    recipients: a.recipients,
                });
                continue;
            }
            let mut here: HashMap<&str, Vec<(String, u64)>> = HashMap::new();
            for (user, inbox_seq) in a.recipients {
                match gateway_of.get(user.as_str()) {
                    Some(gateways) => {
                        // Listed users have a gateway; the last takes the name.
                        let Some((last, rest)) = gateways.split_last() else {
                            continue;
                        };
                        for g in rest {
                            here.entry(g).or_default().push((user.clone(), inbox_seq));
                        }
                        here.entry(last).or_default().push((user, inbox_seq));
                    }
                    None if cues && user != message.sender_id => {
                        self.metrics.offline_events.inc();
                        events.push(ChatEvent::OfflineMessage {
                            user,
                            inbox_seq,
                            message: message.clone(),
                        });
                    }
                    None => {}
                }
            }
            for (g, recipients) in here {
                per_gateway.entry(g).or_default().push(Delivery {
                    message: message.clone(),
                    recipients,
                });
            }
        }
        if !events.is_empty()
            && let Err(e) = self.bus.events(events).await
        {
            tracing::warn!(error = %e, "offline events not published");
        }
        for (gateway, deliveries) in per_gateway {
            self.metrics.publishes.inc();
            if let Err(e) = self.bus.publish(gateway, deliveries).await {
                tracing::warn!(gateway, error = %e, "delivery not published; devices will sync");
            }
        }
        if !everywhere.is_empty() {
            self.metrics.broadcasts.inc();
            if let Err(e) = self.bus.broadcast(everywhere).await {
                tracing::warn!(error = %e, "delivery not published; devices will sync");
            }
        }
    }
}
