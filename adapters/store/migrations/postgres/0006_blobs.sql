-- Uploads: the metadata of media whose bytes live in blob storage. state:
-- 0 pending (a slot was handed out), 1 ready (checked, usable in
-- messages), 2 deleting (chosen by garbage collection). sha256 is the
-- declared digest until the upload completes, then the verified one;
-- thumbnail is a protobuf parley.v1.Thumbnail (empty: none); last_used is
-- when a message last referenced it (0: never). Times in ms since the epoch.
CREATE TABLE blobs (
    id                TEXT PRIMARY KEY,
    owner             TEXT NOT NULL,
    kind              BIGINT NOT NULL,
    mime              TEXT NOT NULL,
    size              BIGINT NOT NULL,
    sha256            BYTEA NOT NULL,
    name              TEXT NOT NULL,
    state             BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    upload_expires_at BIGINT NOT NULL,
    width             BIGINT NOT NULL,
    height            BIGINT NOT NULL,
    thumbnail         BYTEA NOT NULL,
    last_used         BIGINT NOT NULL
);
-- The daily quota: a user's uploads by time.
CREATE INDEX blobs_owner_created ON blobs (owner, created_at);
-- Garbage collection: what is pending or never used, by age; what is used,
-- by last use.
CREATE INDEX blobs_state_created ON blobs (state, last_used, created_at);
