//! The gRPC service gateways call (`parley.internal.v1.ChatInternal`): the
//! chat service's side of `parley_core::ChatBackend` across processes (the
//! gateway's side is `parley_gateway::remote`). When an internal key is
//! set, every call must carry `authorization: Bearer <key>`.

use std::future::Future;
use std::sync::Arc;

use parley_proto::internal::{self as ipb, chat_internal_server};
use parley_proto::pb;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use parley_core::{ChatError, ChatService, SendRequest};

use crate::status;

/// The internal service over a chat service.
#[derive(Debug, Clone)]
pub struct InternalApi {
    chat: Arc<ChatService>,
}

impl InternalApi {
    pub fn new(chat: Arc<ChatService>) -> Self {
        Self { chat }
    }
}

/// Serves the internal API on `listener` until `shutdown`; with `key`, calls
/// without it are refused.
pub async fn serve(
    listener: TcpListener,
    chat: Arc<ChatService>,
    key: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let server = chat_internal_server::ChatInternalServer::new(InternalApi::new(chat))
        .max_decoding_message_size(16 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let api =
        tonic::service::interceptor::InterceptedService::new(server, move |req: Request<()>| {
            match &key {
                Some(key) => crate::admin::check_bearer(key, &req, "internal key").map(|()| req),
                None => Ok(req),
            }
        });
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(api)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

#[tonic::async_trait]
impl chat_internal_server::ChatInternal for InternalApi {
    async fn authenticate(
        &self,
        req: Request<ipb::AuthenticateRequest>,
    ) -> Result<Response<ipb::AuthenticateReply>, Status> {
        let r = req.into_inner();
        let v = self
            .chat
            .authenticate(&r.token, &r.device_id)
            .await
            .map_err(status)?;
        Ok(Response::new(ipb::AuthenticateReply {
            user_id: v.user,
            issued_at_ms: v.issued_at_ms,
            expires_at_ms: v.expires_at_ms,
        }))
    }

    async fn refresh(
        &self,
        req: Request<ipb::RefreshRequest>,
    ) -> Result<Response<pb::Tokens>, Status> {
        let tokens = self
            .chat
            .refresh(&req.into_inner().refresh_token)
            .await
            .map_err(status)?;
        Ok(Response::new(tokens))
    }

    async fn open_session(
        &self,
        req: Request<ipb::OpenSessionRequest>,
    ) -> Result<Response<ipb::OpenSessionReply>, Status> {
        let r = req.into_inner();
        let (resume_from, inbox_head) = self
            .chat
            .session_opened(&r.user_id, &r.device_id, r.cursor)
            .await
            .map_err(status)?;
        Ok(Response::new(ipb::OpenSessionReply {
            resume_from,
            inbox_head,
        }))
    }

    async fn log_outs_since(
        &self,
        req: Request<ipb::LogOutsSinceRequest>,
    ) -> Result<Response<ipb::LogOutsSinceReply>, Status> {
        let r = req.into_inner();
        let revoked = self
            .chat
            .store()
            // An older gateway sends no limit (0) and does not page.
            .log_outs_since(
                r.since_ms,
                if r.limit == 0 {
                    u32::MAX
                } else {
                    r.limit.min(10_000)
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(ipb::LogOutsSinceReply {
            revoked: revoked.into_iter().map(Into::into).collect(),
        }))
    }

    async fn ack(&self, req: Request<ipb::AckRequest>) -> Result<Response<ipb::Empty>, Status> {
        let r = req.into_inner();
        self.chat
            .ack(&r.user_id, &r.device_id, r.cursor)
            .await
            .map_err(status)?;
        Ok(Response::new(ipb::Empty {}))
    }

    async fn sync(
        &self,
        req: Request<ipb::SyncRequest>,
    ) -> Result<Response<ipb::SyncReply>, Status> {
        let r = req.into_inner();
        let page = self
            .chat
            .sync(&r.user_id, r.after, r.limit)
            .await
            .map_err(status)?;
        let (missing_from, missing_to) = page.missing.unwrap_or((0, 0));
        Ok(Response::new(ipb::SyncReply {
            entries: page
                .entries
                .into_iter()
                .map(|(inbox_seq, message)| pb::Deliver {
                    inbox_seq,
                    message: Some(message),
                    // Marked by the gateway, which knows whose timeline it is.
                    from_blocked: false,
                })
                .collect(),
            inbox_head: page.head,
            missing_from,
            missing_to,
        }))
    }

    async fn batch(
        &self,
        req: Request<ipb::BatchRequest>,
    ) -> Result<Response<ipb::BatchReply>, Status> {
        use ipb::batch_item::Body as Item;
        use ipb::batch_result::Body as Answer;
        let items = req.into_inner().items;
        let mut results: Vec<Option<Answer>> = Vec::with_capacity(items.len());
        let mut sends = Vec::new();
        let mut places = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            match item.body {
                Some(Item::Send(send)) => {
                    sends.push(SendRequest {
                        user: item.user_id,
                        device: item.device_id,
                        send,
                    });
                    places.push(i);
                    results.push(None);
                }
                Some(Item::Ack(cursor)) => {
                    let answer = match self.chat.ack(&item.user_id, &item.device_id, cursor).await {
                        Ok(()) => Answer::Done(ipb::Empty {}),
                        Err(e) => Answer::Error(error(&e)),
                    };
                    results.push(Some(answer));
                }
                None => results.push(Some(Answer::Error(error(&ChatError::invalid(
                    "a batch item needs a send or an ack",
                ))))),
            }
        }
        for (i, answer) in places.into_iter().zip(self.chat.send_many(sends).await) {
            results[i] = Some(match answer {
                Ok(ack) => Answer::SendAck(ack),
                Err(e) => Answer::Error(error(&e)),
            });
        }
        Ok(Response::new(ipb::BatchReply {
            results: results
                .into_iter()
                .map(|body| ipb::BatchResult { body })
                .collect(),
        }))
    }

    async fn call(
        &self,
        req: Request<ipb::CallRequest>,
    ) -> Result<Response<ipb::CallReply>, Status> {
        let r = req.into_inner();
        let Some(body) = r.frame.and_then(|f| f.body) else {
            return Err(status(ChatError::invalid("a call needs a request frame")));
        };
        // 0: a gateway that does not say (an older one): taken as now.
        let issued_at_ms = match r.session_issued_at_ms {
            0 => i64::MAX,
            at => at,
        };
        let resp = self
            .chat
            .call_in_session(&r.user_id, &r.device_id, issued_at_ms, body)
            .await
            .map_err(status)?;
        Ok(Response::new(ipb::CallReply {
            frame: Some(pb::ServerFrame::new(0, resp)),
        }))
    }
}

/// A refused batch item, as the device will see it.
fn error(e: &ChatError) -> pb::Error {
    let code = e.code();
    pb::Error {
        code: code as i32,
        message: e.client_message(),
        fatal: code.is_fatal(),
        retry_after_ms: 0,
    }
}
