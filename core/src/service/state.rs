//! What each member keeps of a conversation, beside its messages: the read
//! marker (unread counts and read receipts), the pin and the mute, and the
//! list of conversations they shape. A change is written first, then told
//! to the online devices it concerns as a signal (never stored): a device
//! that misses one reads the state again with `ListConversations`.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use parley_proto::pb::{self, server_frame::Body as Resp};

use super::{ChatService, now_ms};
use crate::bus::Signal;
use crate::error::ChatError;
use crate::push::mute_until;
use crate::revision::no_message;
use crate::store::{ConversationRecord, MemberSettings};

/// How long a device shows that someone is typing unless told again.
pub const TYPING_SHOWN: std::time::Duration = std::time::Duration::from_secs(6);

/// Where a conversation stands in a user's list: pinned ones first, then
/// the newest activity, then the newest conversation.
type Rank = (Reverse<bool>, Reverse<i64>, Reverse<u64>);

fn rank(c: &ConversationRecord) -> Rank {
    (
        Reverse(c.pinned),
        Reverse(c.last_activity_ms),
        Reverse(c.id),
    )
}

/// A page token: the rank of the last conversation of the page before.
fn page_token((Reverse(pinned), Reverse(at), Reverse(id)): Rank) -> String {
    format!("{}.{at}.{id}", u8::from(pinned))
}

fn parse_page(page: &str) -> Result<Rank, ChatError> {
    let bad = || ChatError::invalid(format!("page {page:?} is not a next_page of this server"));
    let mut parts = page.split('.');
    let (Some(pinned), Some(at), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let pinned = match pinned {
        "0" => false,
        "1" => true,
        _ => return Err(bad()),
    };
    let at = at.parse().map_err(|_| bad())?;
    let id = id.parse().map_err(|_| bad())?;
    Ok((Reverse(pinned), Reverse(at), Reverse(id)))
}

impl ChatService {
    /// A page of the user's conversations in list order, with the unread
    /// total of all of them.
    pub async fn list_conversations(
        &self,
        user: &str,
        req: pb::ListConversations,
    ) -> Result<pb::ConversationList, ChatError> {
        let after = match req.page.as_str() {
            "" => None,
            page => Some(parse_page(page)?),
        };
        let mut all = self.store.list_conversations(user).await?;
        let now = now_ms();
        let total_unread = all
            .iter()
            .filter(|c| c.muted_until_ms <= now)
            .map(ConversationRecord::unread)
            .sum();
        all.sort_unstable_by_key(rank);
        let start = after.map_or(0, |after| all.partition_point(|c| rank(c) <= after));
        let limit = match req.limit {
            0 => usize::MAX,
            n => n as usize,
        };
        let end = start.saturating_add(limit).min(all.len());
        let next_page = if end < all.len() && end > start {
            page_token(rank(&all[end - 1]))
        } else {
            String::new()
        };
        Ok(pb::ConversationList {
            conversations: all.drain(start..end).map(pb::Conversation::from).collect(),
            total_unread,
            next_page,
        })
    }

    /// Whether a conversation's members are told of each other's reads and
    /// typing, and named in receipts: a direct conversation, or a group
    /// within the receipt limit.
    fn members_see_each_other(&self, conv: &ConversationRecord) -> bool {
        conv.kind == pb::ConversationKind::Direct
            || conv.members.len() <= self.config.receipt_group_limit
    }

    /// Moves the user's read marker, and tells whoever should see it.
    pub(super) async fn mark_read(
        &self,
        user: &str,
        req: pb::MarkRead,
    ) -> Result<pb::ReadReceipt, ChatError> {
        let mark = self
            .store
            .mark_read(req.conversation_id, user, req.seq)
            .await?;
        let receipt = pb::ReadReceipt {
            conversation_id: req.conversation_id,
            user: user.to_owned(),
            seq: mark.seq,
            read_at_ms: now_ms(),
        };
        if mark.moved {
            // The marker moved: a lookup failing now costs the signal (the
            // devices read the marker again), not the answer.
            let conv = match self.conversation(req.conversation_id).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "read receipt not told to devices");
                    return Ok(receipt);
                }
            };
            let mut told = vec![user.to_owned()];
            if self.members_see_each_other(&conv) {
                told.extend(conv.members.into_iter().filter(|m| m != user));
            }
            self.signal(told, Resp::ReadReceipt(receipt.clone())).await;
        }
        Ok(receipt)
    }

    /// Who has read message `seq` of a conversation.
    pub(super) async fn receipts(
        &self,
        user: &str,
        req: pb::ReceiptsRequest,
    ) -> Result<pb::Receipts, ChatError> {
        let conv = self.conversation(req.conversation_id).await?;
        if !conv.members.iter().any(|m| m == user) {
            return Err(ChatError::NotMember(req.conversation_id));
        }
        let sender = match self
            .store
            .history(
                req.conversation_id,
                req.seq.saturating_add(1),
                pb::Direction::Backward,
                1,
            )
            .await?
            .messages
            .pop()
        {
            Some(m) if m.seq == req.seq => m.sender_id,
            _ => return Err(no_message(req.conversation_id, req.seq)),
        };
        let markers = self.store.read_markers(req.conversation_id).await?;
        let others: Vec<_> = markers.into_iter().filter(|(u, _)| *u != sender).collect();
        let readers: Vec<String> = others
            .iter()
            .filter(|(_, read)| *read >= req.seq)
            .map(|(u, _)| u.clone())
            .collect();
        let named = self.members_see_each_other(&conv);
        Ok(pb::Receipts {
            conversation_id: req.conversation_id,
            seq: req.seq,
            read_count: readers.len() as u32,
            others: others.len() as u32,
            readers: if named { readers } else { Vec::new() },
        })
    }

    /// Tells the other members' online devices that the user is typing, or
    /// stopped.
    pub(super) async fn typing(&self, user: &str, req: pb::Typing) -> Result<(), ChatError> {
        let conv = self.conversation(req.conversation_id).await?;
        if !conv.members.iter().any(|m| m == user) {
            return Err(ChatError::NotMember(req.conversation_id));
        }
        let small = self.members_see_each_other(&conv);
        let others: Vec<String> = conv.members.into_iter().filter(|m| m != user).collect();
        if small && !others.is_empty() {
            let frame = Resp::Typing(pb::TypingIndicator {
                conversation_id: req.conversation_id,
                user: user.to_owned(),
                typing: req.typing,
                expires_in_ms: TYPING_SHOWN.as_millis() as u32,
            });
            self.signal(others, frame).await;
        }
        Ok(())
    }

    /// Mutes a conversation's notifications for the user (all devices).
    pub(super) async fn mute(
        &self,
        user: &str,
        req: pb::MuteConversation,
    ) -> Result<(), ChatError> {
        let until = mute_until(req.muted_until_ms, now_ms());
        let settings = self.store.mute(req.conversation_id, user, until).await?;
        self.settings_changed(user, req.conversation_id, settings)
            .await;
        Ok(())
    }

    pub(super) async fn pin(&self, user: &str, req: pb::PinConversation) -> Result<(), ChatError> {
        let settings = self
            .store
            .pin(req.conversation_id, user, req.pinned)
            .await?;
        self.settings_changed(user, req.conversation_id, settings)
            .await;
        Ok(())
    }

    /// BLOCKED when one of `users` blocks `actor`, who then may not add
    /// them to a group.
    pub(super) async fn not_blocked_by(
        &self,
        actor: &str,
        users: &[String],
    ) -> Result<(), ChatError> {
        match self
            .store
            .blockers_of(actor, users)
            .await?
            .into_iter()
            .next()
        {
            Some(blocker) => Err(ChatError::Blocked(blocker)),
            None => Ok(()),
        }
    }

    /// Tells the user's online devices the users they block now.
    pub(super) async fn blocks_changed(&self, user: &str) {
        match self.store.blocks_of(user).await {
            Ok(users) => {
                let frame = Resp::Blocks(pb::BlockList { users });
                self.signal(vec![user.to_owned()], frame).await;
            }
            Err(e) => tracing::warn!(error = %e, "block list not told to devices"),
        }
    }

    /// Tells the user's online devices their settings of a conversation.
    async fn settings_changed(&self, user: &str, conversation_id: u64, s: MemberSettings) {
        let frame = Resp::ConversationSettings(pb::ConversationSettings {
            conversation_id,
            muted_until_ms: s.muted_until_ms,
            pinned: s.pinned,
        });
        self.signal(vec![user.to_owned()], frame).await;
    }

    /// Sends `body` to every online device of `users`: one presence
    /// lookup, one publish per gateway holding some of them (to every
    /// gateway while presence cannot tell).
    pub(super) async fn signal(&self, mut users: Vec<String>, body: Resp) {
        users.sort_unstable();
        users.dedup();
        let names: Vec<&str> = users.iter().map(String::as_str).collect();
        let located = self.locate(&names).await;
        let frame = Arc::new(pb::ServerFrame::new(0, body));
        let published = if located.settled {
            let mut per_gateway: HashMap<String, Vec<String>> = located.gateways;
            per_gateway.retain(|_, users| !users.is_empty());
            let mut result = Ok(());
            for (gateway, users) in per_gateway {
                let signal = Signal {
                    users,
                    frame: frame.clone(),
                };
                if let Err(e) = self.bus.signal(Some(&gateway), vec![signal]).await {
                    result = Err(e);
                }
            }
            result
        } else {
            let signal = Signal { users, frame };
            self.bus.signal(None, vec![signal]).await
        };
        if let Err(e) = published {
            tracing::warn!(error = %e, "signal not published; devices read the state again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_token_reads_back_as_the_rank_it_was_made_from() {
        for r in [
            (Reverse(true), Reverse(0), Reverse(1)),
            (
                Reverse(false),
                Reverse(1_700_000_000_123),
                Reverse(u64::MAX),
            ),
            (Reverse(false), Reverse(-5), Reverse(7)),
        ] {
            assert_eq!(parse_page(&page_token(r)).unwrap(), r);
        }
        for bad in ["", "1", "2.0.1", "1.x.1", "1.0.1.0", "0.0.-1"] {
            assert!(parse_page(bad).is_err(), "{bad}");
        }
    }
}
