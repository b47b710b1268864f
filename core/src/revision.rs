//! Recalling and editing a message: the rules every store applies in the
//! transaction that rewrites the message. A revision keeps the message's
//! id and seq, and reaches devices as a new entry in every member's
//! timeline pointing at the rewritten message, so a device that was
//! offline converges in order, as with any message, and the conversation's
//! numbering (and with it unread counts) does not move.

use std::time::Duration;

use parley_proto::pb;

use crate::error::ChatError;

/// What a revision does.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Replaces the text.
    Edit(pb::Content),
    /// Removes the content for good.
    Recall,
}

/// A revision of message `seq` of a conversation by `actor`.
#[derive(Debug, Clone, PartialEq)]
pub struct Revision {
    pub conversation_id: u64,
    pub seq: u64,
    pub actor: String,
    pub change: Change,
    pub now_ms: i64,
    /// How long after it was sent a message may be changed this way.
    pub window: Duration,
}

impl Revision {
    /// The message as this revision leaves it, or None when nothing
    /// changes (a recall of a recalled message, the same text again).
    pub fn apply(&self, stored: &pb::Message) -> Result<Option<pb::Message>, ChatError> {
        let verb = match self.change {
            Change::Edit(_) => "edit",
            Change::Recall => "recall",
        };
        if matches!(
            stored.content.as_ref().and_then(|c| c.body.as_ref()),
            Some(pb::content::Body::System(_))
        ) {
            return Err(ChatError::Forbidden(format!(
                "a membership event cannot be changed: nobody can {verb} it"
            )));
        }
        if stored.sender_id != self.actor {
            return Err(ChatError::Forbidden(format!(
                "only the sender of a message can {verb} it"
            )));
        }
        if self.change == Change::Recall && stored.recalled {
            return Ok(None);
        }
        let age = self.now_ms.saturating_sub(stored.server_time_ms);
        if age > self.window.as_millis() as i64 {
            return Err(ChatError::Forbidden(format!(
                "a message can be {verb}ed within {} s of being sent; this one was sent {} s ago",
                self.window.as_secs(),
                age / 1000
            )));
        }
        match &self.change {
            Change::Recall => Ok(Some(pb::Message {
                content: None,
                recalled: true,
                ..stored.clone()
            })),
            Change::Edit(_) if stored.recalled => {
                Err(ChatError::invalid("a recalled message cannot be edited"))
            }
            Change::Edit(content) => {
                let is_text = |c: Option<&pb::Content>| {
                    matches!(
                        c.and_then(|c| c.body.as_ref()),
                        Some(pb::content::Body::Text(t)) if !t.is_empty()
                    )
                };
                if !is_text(stored.content.as_ref()) {
                    return Err(ChatError::invalid("only a text message can be edited"));
                }
                if !is_text(Some(content)) {
                    return Err(ChatError::invalid(
                        "an edit replaces text with text, not empty",
                    ));
                }
                if stored.content.as_ref() == Some(content) {
                    return Ok(None);
                }
                Ok(Some(pb::Message {
                    content: Some(content.clone()),
                    edited_at_ms: self.now_ms,
                    ..stored.clone()
                }))
            }
        }
    }
}

/// A text an edited message had before, as the edit history keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct EditRecord {
    pub content: pb::Content,
    /// When the next text replaced it.
    pub replaced_at_ms: i64,
}

impl EditRecord {
    /// From the SQL stores' row: (content, replaced_at).
    pub fn from_row((content, replaced_at_ms): (Vec<u8>, i64)) -> Result<Self, ChatError> {
        use prost::Message as _;
        let content = pb::Content::decode(content.as_slice())
            .map_err(|e| ChatError::Corrupt(format!("edit history content: {e}")))?;
        Ok(Self {
            content,
            replaced_at_ms,
        })
    }
}

/// NOT_FOUND for message `seq` of a conversation.
pub fn no_message(conversation_id: u64, seq: u64) -> ChatError {
    ChatError::NotFound(format!(
        "no message {seq} in conversation {conversation_id}"
    ))
}

impl From<EditRecord> for pb::MessageVersion {
    fn from(e: EditRecord) -> Self {
        Self {
            content: Some(e.content),
            replaced_at_ms: e.replaced_at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(sender: &str, content: pb::Content) -> pb::Message {
        pb::Message {
            msg_id: 9,
            conversation_id: 1,
            seq: 3,
            sender_id: sender.into(),
            server_time_ms: 10_000,
            content: Some(content),
            ..Default::default()
        }
    }

    fn by(actor: &str, change: Change, now_ms: i64) -> Revision {
        Revision {
            conversation_id: 1,
            seq: 3,
            actor: actor.into(),
            change,
            now_ms,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn only_the_sender_changes_a_message_and_only_in_time() {
        let m = sent("ann", pb::Content::text("hi"));
        let edit = Change::Edit(pb::Content::text("hello"));
        let edited = by("ann", edit.clone(), 20_000).apply(&m).unwrap().unwrap();
        assert_eq!(edited.content, Some(pb::Content::text("hello")));
        assert_eq!(
            (edited.msg_id, edited.seq, edited.edited_at_ms),
            (9, 3, 20_000)
        );
        let recalled = by("ann", Change::Recall, 70_000)
            .apply(&m)
            .unwrap()
            .unwrap();
        assert_eq!((recalled.content.as_ref(), recalled.recalled), (None, true));
        assert!(matches!(
            by("ann", Change::Recall, 70_000).apply(&recalled),
            Ok(None)
        ));
        for (actor, now) in [("bob", 20_000), ("ann", 70_001)] {
            let err = by(actor, Change::Recall, now).apply(&m).unwrap_err();
            assert!(
                matches!(err, ChatError::Forbidden(_)),
                "{actor} {now}: {err}"
            );
        }
        let same = by("ann", Change::Edit(pb::Content::text("hi")), 20_000);
        assert!(matches!(same.apply(&m), Ok(None)));
    }

    #[test]
    fn edits_replace_text_with_text() {
        let text = sent("ann", pb::Content::text("hi"));
        let recalled = pb::Message {
            content: None,
            recalled: true,
            ..text.clone()
        };
        let custom = sent(
            "ann",
            pb::Content {
                body: Some(pb::content::Body::Custom(pb::Custom {
                    r#type: "x".into(),
                    data: vec![1],
                })),
            },
        );
        let to = |t: &str| by("ann", Change::Edit(pb::Content::text(t)), 20_000);
        for (m, edit) in [(&recalled, to("x")), (&custom, to("x")), (&text, to(""))] {
            let err = edit.apply(m).unwrap_err();
            assert!(matches!(err, ChatError::InvalidArgument(_)), "{err}");
        }
        let event = sent(
            "ann",
            pb::Content {
                body: Some(pb::content::Body::System(pb::SystemEvent::default())),
            },
        );
        assert!(matches!(
            to("x").apply(&event),
            Err(ChatError::Forbidden(_))
        ));
    }
}
