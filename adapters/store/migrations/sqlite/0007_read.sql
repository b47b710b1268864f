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
