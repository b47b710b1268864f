-- Parley's schema on PostgreSQL (cluster mode). The same tables as the
-- SQLite schema; sequence numbers are assigned under row locks on
-- conversations (seq) and users (inbox_head), so they stay gap-free with
-- several chat-service replicas writing at once.
CREATE TABLE users (
    id           TEXT PRIMARY KEY,
    display_name TEXT NOT NULL DEFAULT '',
    created_at   BIGINT NOT NULL,
    -- The newest inbox sequence number of this user's timeline.
    inbox_head   BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE devices (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    -- The inbox sequence number this device has acknowledged.
    cursor    BIGINT NOT NULL DEFAULT 0,
    last_seen BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE conversations (
    id         BIGSERIAL PRIMARY KEY,
    kind       SMALLINT NOT NULL,          -- 1 direct, 2 group
    name       TEXT NOT NULL DEFAULT '',
    owner      TEXT NOT NULL DEFAULT '',
    direct_key TEXT UNIQUE,                -- "a\nb" with a < b, for direct conversations
    last_seq   BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE members (
    conversation_id BIGINT NOT NULL,
    user_id         TEXT NOT NULL,
    joined_at       BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX members_by_user ON members (user_id, conversation_id);

CREATE TABLE messages (
    id              BIGSERIAL PRIMARY KEY,
    conversation_id BIGINT NOT NULL,
    seq             BIGINT NOT NULL,
    sender_id       TEXT NOT NULL,
    sender_device   TEXT NOT NULL,
    client_msg_id   TEXT NOT NULL,
    content         BYTEA NOT NULL,        -- protobuf parley.v1.Content
    created_at      BIGINT NOT NULL,
    UNIQUE (conversation_id, seq)
);
CREATE UNIQUE INDEX messages_dedup ON messages (sender_id, client_msg_id);
CREATE INDEX messages_by_time ON messages (created_at);

CREATE TABLE inbox (
    user_id    TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    message_id BIGINT NOT NULL,
    PRIMARY KEY (user_id, seq)
);
CREATE INDEX inbox_by_message ON inbox (message_id);

CREATE TABLE blocks (
    user_id    TEXT NOT NULL,
    blocked_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, blocked_id)
);
