-- Log-outs: tokens issued at or before these times (ms since the epoch) are
-- refused. users.revoked_at logs out every device of the user (and its
-- tokens naming no device); log_outs one device, which may never have
-- connected (so it is not a column of devices, whose rows mean "seen").
ALTER TABLE users ADD COLUMN revoked_at INTEGER NOT NULL DEFAULT 0;

CREATE TABLE log_outs (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    revoked_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
