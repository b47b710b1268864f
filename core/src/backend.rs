//! What a gateway needs from the chat service, as one trait: the service
//! itself in one process, or a client of replicas over gRPC in a cluster
//! (`parley_gateway::remote`). The gateway is written against this trait only.

use async_trait::async_trait;
use parley_proto::pb::{self, client_frame::Body as Req, server_frame::Body as Resp};

use crate::bus::Revocation;
use crate::error::ChatError;
use crate::service::{ChatService, SyncPage};

/// A device's login, as a gateway keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    /// When its token was issued (ms since the epoch): a log-out closes the
    /// connection only if it is not later than that.
    pub issued_at_ms: i64,
    /// When the token expires (ms since the epoch).
    pub expires_at_ms: i64,
}

/// The chat service as seen from a gateway.
#[async_trait]
pub trait ChatBackend: Send + Sync + 'static {
    /// Who a client token logs in on `device` (see
    /// [`ChatService::authenticate`]).
    async fn authenticate(&self, token: &str, device: &str) -> Result<Login, ChatError>;
    /// A refresh token traded for new tokens (see
    /// [`ChatService::refresh`]).
    async fn refresh(&self, refresh_token: &str) -> Result<pb::Tokens, ChatError>;
    /// A device connected: (where it resumes from, the user's inbox head).
    async fn session_opened(
        &self,
        user: &str,
        device: &str,
        cursor: Option<u64>,
    ) -> Result<(u64, u64), ChatError>;
    /// A device acknowledged its timeline up to `cursor`: recorded without
    /// waiting for an answer, so that a connection never stalls on its
    /// acks (in a cluster they ride with the next batch to the chat
    /// service, which may be waiting for a commit). One that is lost on
    /// the way is made good by the device's next: cursors only move
    /// forward.
    fn ack(&self, user: &str, device: &str, cursor: u64);
    /// One page of the user's timeline after `after`.
    async fn sync(&self, user: &str, after: u64, limit: u32) -> Result<SyncPage, ChatError>;
    /// A request frame of an authenticated device.
    async fn call(&self, user: &str, device: &str, req: Req) -> Result<Resp, ChatError>;
    /// [`call`](Self::call) from a connection whose token was issued at
    /// `issued_at_ms`: what a device may do only while its session holds
    /// (register for push) is refused once it was logged out since.
    async fn call_in_session(
        &self,
        user: &str,
        device: &str,
        issued_at_ms: i64,
        req: Req,
    ) -> Result<Resp, ChatError>;
    /// A page of the log-outs made at or after `since_ms` (see
    /// [`Store::log_outs_since`](crate::Store::log_outs_since)), for a
    /// gateway that may have missed their notices.
    async fn log_outs_since(&self, since_ms: i64, limit: u32)
    -> Result<Vec<Revocation>, ChatError>;
}

#[async_trait]
impl ChatBackend for ChatService {
    async fn authenticate(&self, token: &str, device: &str) -> Result<Login, ChatError> {
        let v = ChatService::authenticate(self, token, device).await?;
        Ok(Login {
            user: v.user,
            issued_at_ms: v.issued_at_ms,
            expires_at_ms: v.expires_at_ms,
        })
    }

    async fn refresh(&self, refresh_token: &str) -> Result<pb::Tokens, ChatError> {
        ChatService::refresh(self, refresh_token).await
    }

    async fn session_opened(
        &self,
        user: &str,
        device: &str,
        cursor: Option<u64>,
    ) -> Result<(u64, u64), ChatError> {
        ChatService::session_opened(self, user, device, cursor).await
    }

    fn ack(&self, user: &str, device: &str, cursor: u64) {
        self.record_ack(user, device, cursor);
    }

    async fn sync(&self, user: &str, after: u64, limit: u32) -> Result<SyncPage, ChatError> {
        ChatService::sync(self, user, after, limit).await
    }

    async fn call(&self, user: &str, device: &str, req: Req) -> Result<Resp, ChatError> {
        ChatService::call(self, user, device, req).await
    }

    async fn call_in_session(
        &self,
        user: &str,
        device: &str,
        issued_at_ms: i64,
        req: Req,
    ) -> Result<Resp, ChatError> {
        ChatService::call_in_session(self, user, device, issued_at_ms, req).await
    }

    async fn log_outs_since(
        &self,
        since_ms: i64,
        limit: u32,
    ) -> Result<Vec<Revocation>, ChatError> {
        self.store().log_outs_since(since_ms, limit).await
    }
}
