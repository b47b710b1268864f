-- Refresh tokens, one per device: SHA-256 digests of the current token's
-- secret and of the one it replaced (a copy of which, coming back late,
-- means two holders), never the tokens. Times in ms since the epoch.
CREATE TABLE refresh_tokens (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    digest     BLOB NOT NULL,
    previous   BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    rotated_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
