//! The membership rules every store applies inside its own transaction,
//! so SQLite, PostgreSQL and the in-memory store cannot disagree: which
//! conversations can change members, who a change adds or removes, how
//! large a group may grow, and the system message that records a change
//! in the conversation.

use parley_proto::pb;

use crate::error::ChatError;
use crate::store::{ConversationRecord, MembershipChange, NewMessage};

/// NOT_FOUND naming the users that do not exist.
pub fn no_such_users(missing: &[String]) -> ChatError {
    ChatError::NotFound(format!("no such user: {}", missing.join(", ")))
}

/// The group a membership change applies to: NOT_FOUND when there is no
/// such conversation, INVALID_ARGUMENT when it is a direct one.
pub fn require_group(
    conversation: Option<ConversationRecord>,
    id: u64,
) -> Result<ConversationRecord, ChatError> {
    let Some(conversation) = conversation else {
        return Err(ChatError::NotFound(format!("no conversation {id}")));
    };
    if conversation.kind != pb::ConversationKind::Group {
        return Err(ChatError::invalid(
            "members of a direct conversation cannot change",
        ));
    }
    Ok(conversation)
}

/// The users a change actually adds (not members yet) or removes (members
/// now), sorted, each once; GROUP_FULL when an addition would take the
/// group past `max_members`. The caller has checked that added users exist.
pub fn changed_members(
    before: &ConversationRecord,
    change: MembershipChange,
    users: &[String],
    max_members: usize,
) -> Result<Vec<String>, ChatError> {
    let adding = change == MembershipChange::Add;
    let mut changed: Vec<String> = users
        .iter()
        .filter(|u| before.members.contains(u) != adding)
        .cloned()
        .collect();
    changed.sort();
    changed.dedup();
    if adding && before.members.len() + changed.len() > max_members {
        return Err(ChatError::GroupFull(max_members));
    }
    Ok(changed)
}

/// The event that records a change by `actor` of `users`.
pub fn membership_event(
    change: MembershipChange,
    actor: &str,
    users: &[String],
) -> pb::SystemEvent {
    let kind = match change {
        MembershipChange::Add => pb::SystemEventKind::MembersAdded,
        MembershipChange::Remove => pb::SystemEventKind::MembersRemoved,
        MembershipChange::Leave => pb::SystemEventKind::MemberLeft,
    };
    pb::SystemEvent {
        kind: kind as i32,
        actor: actor.to_owned(),
        users: users.to_vec(),
    }
}

/// A server-written message carrying `event`, to be appended at `seq`. Its
/// client id starts with '~', outside the client alphabet, so it never
/// collides with a device's.
pub fn system_message(
    conversation_id: u64,
    seq: u64,
    actor: &str,
    event: pb::SystemEvent,
    now_ms: i64,
) -> NewMessage {
    NewMessage {
        conversation_id,
        sender_id: actor.to_owned(),
        sender_device: String::new(),
        client_msg_id: format!("~sys:{conversation_id}:{seq}"),
        content: pb::Content {
            body: Some(pb::content::Body::System(event)),
        },
        now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(members: &[&str]) -> ConversationRecord {
        ConversationRecord {
            id: 7,
            kind: pb::ConversationKind::Group,
            name: "g".into(),
            owner: "ann".into(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
            last_seq: 1,
            ..ConversationRecord::default()
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|m| (*m).to_owned()).collect()
    }

    #[test]
    fn changes_count_only_real_arrivals_and_departures() {
        let g = group(&["ann", "bob"]);
        let added = changed_members(&g, MembershipChange::Add, &names(&["cy", "bob", "cy"]), 3);
        assert_eq!(added.unwrap(), names(&["cy"]), "bob is in already; cy once");
        assert!(matches!(
            changed_members(&g, MembershipChange::Add, &names(&["cy", "dee"]), 3),
            Err(ChatError::GroupFull(3))
        ));
        let gone = changed_members(&g, MembershipChange::Remove, &names(&["zed", "bob"]), 3);
        assert_eq!(gone.unwrap(), names(&["bob"]));
        let direct = ConversationRecord {
            kind: pb::ConversationKind::Direct,
            ..group(&["ann", "bob"])
        };
        assert!(matches!(
            require_group(Some(direct), 7),
            Err(ChatError::InvalidArgument(_))
        ));
        assert!(matches!(
            require_group(None, 7),
            Err(ChatError::NotFound(_))
        ));
    }
}
