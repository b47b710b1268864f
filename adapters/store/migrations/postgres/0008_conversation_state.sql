-- A member's own state of a conversation, beside its mute: the seq up to
-- which the member has read (the messages after it are unread; a member's
-- own message moves it), and whether the member pinned the conversation.
-- Members of conversations made before this start with everything read.
ALTER TABLE members ADD COLUMN read_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE members ADD COLUMN pinned BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE members mb SET read_seq = c.last_seq FROM conversations c WHERE c.id = mb.conversation_id;

-- In a direct conversation, the newest seq each member wrote: `sent_low`
-- for the member whose id comes first in direct_key, `sent_high` for the
-- other. The conversation's row is rewritten by every append anyway (its
-- last_seq), so a 1:1 message moves its sender's marker with no row of its
-- own; a member's marker is then the greater of members.read_seq and this
-- (`parley_read`). Groups move the sender's members row instead.
ALTER TABLE conversations ADD COLUMN sent_low BIGINT NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN sent_high BIGINT NOT NULL DEFAULT 0;

-- A member's read marker: members.read_seq, or in a direct conversation
-- the newest seq the member wrote when that is further.
CREATE FUNCTION parley_read(
    p_kind SMALLINT, p_direct_key TEXT, p_sent_low BIGINT, p_sent_high BIGINT,
    p_user TEXT, p_read_seq BIGINT
) RETURNS BIGINT LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT GREATEST(p_read_seq, CASE
        WHEN p_kind <> 1 THEN 0
        WHEN p_user = split_part(p_direct_key, E'\n', 1) THEN p_sent_low
        ELSE p_sent_high
    END)
$$;

-- Recalls and edits rewrite a message in place: when its sender last
-- edited it (0: never), and whether it was recalled (its content is then
-- empty). The texts edits replaced, kept for a while (the edit history).
ALTER TABLE messages ADD COLUMN edited_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN recalled BOOLEAN NOT NULL DEFAULT FALSE;
CREATE TABLE message_edits (
    id          BIGSERIAL PRIMARY KEY,
    message_id  BIGINT NOT NULL,
    replaced_at BIGINT NOT NULL,
    content     BYTEA NOT NULL
);
CREATE INDEX message_edits_by_message ON message_edits (message_id, id);
CREATE INDEX message_edits_by_time ON message_edits (replaced_at);

-- parley_append of 0002_append.sql, changed in three places: it moves each
-- sender's read marker to the newest message it wrote (`advanced` for a
-- direct conversation, `marked` for a group); a resend
-- answers with each member's first timeline entry of the original (a
-- revision gave them another); and a resend's answer says whether the
-- original was edited or recalled since (two more columns, hence the
-- DROP). The rest is unchanged.
DROP FUNCTION parley_append(BIGINT[], TEXT[], TEXT[], TEXT[], BYTEA[], BIGINT[]);
CREATE FUNCTION parley_append(
    p_conv    BIGINT[],
    p_sender  TEXT[],
    p_device  TEXT[],
    p_client  TEXT[],
    p_content BYTEA[],
    p_created BIGINT[]
) RETURNS TABLE (
    idx           INT,
    outcome       SMALLINT,
    blocker       TEXT,
    msg_id        BIGINT,
    conv          BIGINT,
    seq           BIGINT,
    sender_device TEXT,
    content       BYTEA,
    created_at    BIGINT,
    users         TEXT[],
    inbox_seqs    BIGINT[],
    edited_at     BIGINT,
    recalled      BOOLEAN
)
LANGUAGE plpgsql
-- Plan each statement once per connection: the shapes below hold for any
-- batch size (index probes per message), and planning them again for every
-- call cost more than a one-message call itself (1.6-2.0 ms a call instead
-- of 4.4-4.9 ms on the 2-core VM of docs/benchmarks.md).
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_plan parley_plan[];
BEGIN
    -- 1. The conversations' row locks, in id order: appends to one
    -- conversation queue here, and its last_seq cannot move under us.
    PERFORM 1 FROM conversations c WHERE c.id = ANY(p_conv) ORDER BY c.id FOR UPDATE;

    -- 2. Judge each message, and number the ones to write per conversation.
    -- Every lookup is a LATERAL ... LIMIT 1 on a unique index, so the plan
    -- stays a few index probes per message however large the tables grow.
    WITH input AS (
        SELECT i.idx::INT AS idx, i.conv, i.sender, i.client
        FROM unnest(p_conv, p_sender, p_client) WITH ORDINALITY AS i(conv, sender, client, idx)
    ), judged AS (
        SELECT input.idx, input.conv, c.last_seq, b.blocker, d.id AS dup,
            CASE
                WHEN d.id IS NOT NULL THEN 1
                WHEN c.id IS NULL OR mem.yes IS NULL THEN 2
                WHEN b.blocker IS NOT NULL THEN 3
                ELSE 0
            END::SMALLINT AS outcome
        FROM input
        LEFT JOIN LATERAL (
            SELECT m.id FROM messages m
            WHERE m.sender_id = input.sender AND m.client_msg_id = input.client
            LIMIT 1
        ) d ON TRUE
        LEFT JOIN LATERAL (
            SELECT cv.id, cv.kind, cv.last_seq FROM conversations cv
            WHERE cv.id = input.conv
            LIMIT 1
        ) c ON TRUE
        LEFT JOIN LATERAL (
            SELECT 1 AS yes FROM members mb
            WHERE mb.conversation_id = input.conv AND mb.user_id = input.sender
            LIMIT 1
        ) mem ON TRUE
        LEFT JOIN LATERAL (
            SELECT mb.user_id AS blocker
            FROM members mb
            JOIN blocks bl ON bl.user_id = mb.user_id AND bl.blocked_id = input.sender
            WHERE c.kind = 1 AND mb.conversation_id = input.conv AND mb.user_id <> input.sender
            ORDER BY mb.user_id
            LIMIT 1
        ) b ON TRUE
    )
    SELECT array_agg(ROW(
            n.idx, n.outcome, n.blocker, n.conv, n.seq, n.dup,
            CASE WHEN n.outcome = 0 THEN nextval(pg_get_serial_sequence('messages', 'id')) END
        )::parley_plan ORDER BY n.idx)
    INTO v_plan
    FROM (
        SELECT j.idx, j.outcome, j.blocker, j.conv, j.dup,
            CASE WHEN j.outcome = 0 THEN
                j.last_seq + row_number() OVER (PARTITION BY j.conv, j.outcome = 0 ORDER BY j.idx)
            END AS seq
        FROM judged j
    ) n;

    -- 3. The recipients' row locks, in id order: their inbox heads move
    -- below, and another replica's batch for them waits here.
    PERFORM 1 FROM users u
    WHERE u.id IN (
        SELECT mb.user_id FROM unnest(v_plan) p
        JOIN members mb ON mb.conversation_id = p.conv
        WHERE p.outcome = 0)
    ORDER BY u.id FOR UPDATE;

    -- 4. Write, and answer every message in order. No step joins two
    -- intermediate results: each reads the plan or one CTE and probes
    -- indexes, so no row estimate can make a step quadratic.
    RETURN QUERY
    WITH planned AS (
        SELECT p.idx, p.conv, p.seq, p.msg_id FROM unnest(v_plan) p WHERE p.outcome = 0
    ), inserted AS (
        INSERT INTO messages
            (id, conversation_id, seq, sender_id, sender_device, client_msg_id, content, created_at)
        SELECT pl.msg_id, pl.conv, pl.seq, p_sender[pl.idx], p_device[pl.idx], p_client[pl.idx],
               p_content[pl.idx], p_created[pl.idx]
        FROM planned pl
        RETURNING 1
    ), entries AS (
        -- One per member of each written message with a user row (a member
        -- without one has no timeline to extend), at the user's next inbox
        -- seqs in batch order. The heads were locked above.
        SELECT pl.idx, pl.conv, pl.seq, pl.msg_id, mb.user_id,
               u.inbox_head + row_number() OVER (PARTITION BY mb.user_id ORDER BY pl.idx)
                   AS inbox_seq
        FROM planned pl
        JOIN members mb ON mb.conversation_id = pl.conv
        JOIN users u ON u.id = mb.user_id
    ), timeline AS (
        INSERT INTO inbox (user_id, seq, message_id)
        SELECT e.user_id, e.inbox_seq, e.msg_id FROM entries e
        RETURNING 1
    ), heads AS (
        UPDATE users u SET inbox_head = k.head
        FROM (SELECT e.user_id, max(e.inbox_seq) AS head FROM entries e GROUP BY e.user_id) k
        WHERE u.id = k.user_id
        RETURNING 1
    ), advanced AS (
        -- Whoever writes a message has read the conversation up to it: in
        -- a direct conversation, on this row (sent_low, sent_high).
        UPDATE conversations c SET last_seq = k.seq,
            sent_low = GREATEST(c.sent_low, k.low), sent_high = GREATEST(c.sent_high, k.high)
        FROM (SELECT pl.conv, max(pl.seq) AS seq,
                     COALESCE(max(pl.seq) FILTER (
                         WHERE p_sender[pl.idx] = split_part(cv.direct_key, E'\n', 1)), 0) AS low,
                     COALESCE(max(pl.seq) FILTER (
                         WHERE p_sender[pl.idx] = split_part(cv.direct_key, E'\n', 2)), 0) AS high
              FROM planned pl JOIN conversations cv ON cv.id = pl.conv
              GROUP BY pl.conv) k
        WHERE c.id = k.conv
        RETURNING 1
    ), marked AS (
        -- In a group, on the sender's members row: of a locked
        -- conversation, so no other append waits here, and a MarkRead
        -- holds one row and waits for nothing.
        UPDATE members mb SET read_seq = k.seq
        FROM (SELECT pl.conv, p_sender[pl.idx] AS sender, max(pl.seq) AS seq
              FROM planned pl JOIN conversations cv ON cv.id = pl.conv
              WHERE cv.kind <> 1 GROUP BY 1, 2) k
        WHERE mb.conversation_id = k.conv AND mb.user_id = k.sender AND mb.read_seq < k.seq
        RETURNING 1
    )
    -- (PostgreSQL carries out every data-modifying CTE, read or not.)
    SELECT e.idx, 0::SMALLINT, NULL::TEXT, e.msg_id, e.conv, e.seq,
           NULL::TEXT, NULL::BYTEA, NULL::BIGINT,
           array_agg(e.user_id ORDER BY e.user_id),
           array_agg(e.inbox_seq ORDER BY e.user_id),
           NULL::BIGINT, NULL::BOOLEAN
    FROM entries e
    GROUP BY e.idx, e.msg_id, e.conv, e.seq
    UNION ALL
    -- A written message whose members all lack user rows has no entry.
    SELECT pl.idx, 0::SMALLINT, NULL, pl.msg_id, pl.conv, pl.seq, NULL, NULL, NULL,
           '{}'::TEXT[], '{}'::BIGINT[], NULL, NULL
    FROM planned pl
    WHERE NOT EXISTS (SELECT 1 FROM members mb JOIN users u ON u.id = mb.user_id
                      WHERE mb.conversation_id = pl.conv)
    UNION ALL
    SELECT p.idx, p.outcome, p.blocker, d.id, d.conversation_id, d.seq,
           d.sender_device, d.content, d.created_at, dr.users, dr.seqs, d.edited_at, d.recalled
    FROM unnest(v_plan) p
    LEFT JOIN messages d ON d.id = p.dup
    LEFT JOIN LATERAL (
        SELECT array_agg(i.user_id ORDER BY i.user_id) AS users,
               array_agg(i.seq ORDER BY i.user_id) AS seqs
        FROM (SELECT ib.user_id, min(ib.seq) AS seq FROM inbox ib
              WHERE ib.message_id = p.dup GROUP BY ib.user_id) i
    ) dr ON p.dup IS NOT NULL
    WHERE p.outcome <> 0
    ORDER BY 1;
END
$fn$;
