-- Log-outs by time, for a gateway that may have missed some: it asks for
-- those since it last knew it heard every one. Partial on users: almost
-- nobody has logged out every device.
CREATE INDEX users_revoked_at ON users (revoked_at) WHERE revoked_at > 0;
CREATE INDEX log_outs_revoked_at ON log_outs (revoked_at);
