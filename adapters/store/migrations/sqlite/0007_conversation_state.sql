-- A member's own state of a conversation, beside its mute: the seq up to
-- which the member has read (the messages after it are unread; a member's
-- own message moves it), and whether the member pinned the conversation.
-- Members of conversations made before this start with everything read.
ALTER TABLE members ADD COLUMN read_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN pinned BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE members SET read_seq = (
    SELECT MAX(c.last_seq, IFNULL((SELECT MAX(m.seq) FROM messages m
                                   WHERE m.conversation_id = c.id), 0))
    FROM conversations c WHERE c.id = members.conversation_id);

-- Recalls and edits rewrite a message in place: when its sender last
-- edited it (0: never), and whether it was recalled (its content is then
-- empty). The texts edits replaced, kept for a while (the edit history).
ALTER TABLE messages ADD COLUMN edited_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN recalled BOOLEAN NOT NULL DEFAULT FALSE;
CREATE TABLE message_edits (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  INTEGER NOT NULL,
    replaced_at INTEGER NOT NULL,
    content     BLOB NOT NULL          -- protobuf parley.v1.Content
);
CREATE INDEX message_edits_by_message ON message_edits (message_id, id);
CREATE INDEX message_edits_by_time ON message_edits (replaced_at);
