-- Push notifications. A device's token for its provider (1 APNs, 2 FCM,
-- 3 webhook), at most one per device and each token on one device only
-- (a phone that changed hands takes its token along); whether a user's
-- notifications show previews; until when a member muted a conversation
-- (ms since the epoch, 0: not muted), which goes with the membership.
ALTER TABLE users ADD COLUMN push_previews BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE members ADD COLUMN muted_until BIGINT NOT NULL DEFAULT 0;
CREATE TABLE push_tokens (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    provider   BIGINT NOT NULL,
    token      TEXT NOT NULL,
    topic      TEXT NOT NULL,
    locale     TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE UNIQUE INDEX push_tokens_token ON push_tokens (provider, token);
