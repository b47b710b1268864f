-- Parley's schema on SQLite (the embedded default).
CREATE TABLE users (
    id           TEXT PRIMARY KEY NOT NULL,
    display_name TEXT NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL,
    -- The newest inbox sequence number of this user's timeline.
    inbox_head   INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE devices (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    -- The inbox sequence number this device has acknowledged.
    cursor    INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;

CREATE TABLE conversations (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       INTEGER NOT NULL,          -- 1 direct, 2 group
    name       TEXT NOT NULL DEFAULT '',
    owner      TEXT NOT NULL DEFAULT '',
    direct_key TEXT UNIQUE,               -- "a\nb" with a < b, for direct conversations
    last_seq   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);

CREATE TABLE members (
    conversation_id INTEGER NOT NULL,
    user_id         TEXT NOT NULL,
    joined_at       INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members (user_id, conversation_id);

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    sender_id       TEXT NOT NULL,
    sender_device   TEXT NOT NULL,
    client_msg_id   TEXT NOT NULL,
    content         BLOB NOT NULL,        -- protobuf parley.v1.Content
    created_at      INTEGER NOT NULL,
    UNIQUE (conversation_id, seq)
);
CREATE UNIQUE INDEX messages_dedup ON messages (sender_id, client_msg_id);
CREATE INDEX messages_by_time ON messages (created_at);

CREATE TABLE inbox (
    user_id    TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, seq)
) WITHOUT ROWID;
CREATE INDEX inbox_by_message ON inbox (message_id);

CREATE TABLE blocks (
    user_id    TEXT NOT NULL,
    blocked_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, blocked_id)
) WITHOUT ROWID;
