-- Refresh tokens, one per device: SHA-256 digests of the current token's
-- secret and of the one it replaced (a copy of which, coming back late,
-- means two holders), never the tokens. Times in ms since the epoch.
CREATE TABLE refresh_tokens (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    digest     BYTEA NOT NULL,
    previous   BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    rotated_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
