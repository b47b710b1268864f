-- Log-outs by time, for a gateway that may have missed some while its
-- broker link was down: it asks for those since the link went. Partial on
-- users: almost nobody has logged out every device.
CREATE INDEX users_revoked_at ON users (revoked_at) WHERE revoked_at > 0;
CREATE INDEX log_outs_revoked_at ON log_outs (revoked_at);
