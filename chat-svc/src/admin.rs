//! The admin API over gRPC: users, tokens and groups, for the app's own
//! backend. Every call must carry `authorization: Bearer <admin key>`;
//! server reflection is served beside it so `grpcurl` works without files.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parley_proto::ids;
use parley_proto::pb::{self, admin_server};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use parley_core::refresh::same_secret;
use parley_core::store::MembershipChange;
use parley_core::{ChatError, ChatService, now_ms};

use crate::status;

/// The Admin service over a chat service.
#[derive(Debug, Clone)]
pub struct AdminApi {
    chat: Arc<ChatService>,
}

impl AdminApi {
    /// The admin API over `chat`, without the key check (the interceptor
    /// [`serve`] adds): for embedding and for the fuzz targets.
    pub fn new(chat: Arc<ChatService>) -> Self {
        Self { chat }
    }
}

/// Checks the `authorization` metadata against a shared key; `what` names
/// the key in the error.
pub(crate) fn check_bearer(key: &str, req: &Request<()>, what: &str) -> Result<(), Status> {
    let presented = req.metadata().get("authorization").map(|v| {
        v.to_str()
            .unwrap_or("")
            .strip_prefix("Bearer ")
            .unwrap_or("")
    });
    match presented {
        Some(p) if same_secret(p.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(status(ChatError::Unauthenticated(format!("wrong {what}")))),
        None => Err(status(ChatError::Unauthenticated(format!(
            "{what} required: send `authorization: Bearer <{what}>`"
        )))),
    }
}

fn check_admin(key: &str, req: &Request<()>) -> Result<(), Status> {
    check_bearer(key, req, "admin key")
}

/// Serves the admin API and reflection on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    chat: Arc<ChatService>,
    admin_key: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor set is valid");
    let admin =
        admin_server::AdminServer::with_interceptor(AdminApi::new(chat), move |req: Request<()>| {
            check_admin(&admin_key, &req).map(|()| req)
        });
    tonic::transport::Server::builder()
        .add_service(reflection)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}

#[tonic::async_trait]
impl admin_server::Admin for AdminApi {
    async fn create_user(
        &self,
        req: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let r = req.into_inner();
        ids::check_user_id(&r.id).map_err(Status::invalid_argument)?;
        if r.display_name.len() > 200 {
            return Err(Status::invalid_argument(
                "display_name is at most 200 bytes",
            ));
        }
        let u = self
            .chat
            .store()
            .create_user(&r.id, &r.display_name, now_ms())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::User {
            id: u.id,
            display_name: u.display_name,
            created_at_ms: u.created_at_ms,
        }))
    }

    async fn get_user(
        &self,
        req: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let id = req.into_inner().id;
        let u = self
            .chat
            .store()
            .get_user(&id)
            .await
            .map_err(status)?
            .ok_or_else(|| Status::not_found(format!("no user {id}")))?;
        let user = pb::User {
            id: u.id,
            display_name: u.display_name,
            created_at_ms: u.created_at_ms,
        };
        Ok(Response::new(user))
    }

    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        let r = req.into_inner();
        if self
            .chat
            .store()
            .get_user(&r.user_id)
            .await
            .map_err(status)?
            .is_none()
        {
            return Err(Status::not_found(format!("no user {}", r.user_id)));
        }
        let device = (!r.device_id.is_empty()).then_some(r.device_id.as_str());
        if let Some(device) = device {
            ids::check_device_id(device).map_err(|m| status(ChatError::InvalidArgument(m)))?;
        }
        let ttl = match r.ttl_seconds {
            0 => self.chat.config().token_ttl.as_secs(),
            n => n.min(365 * 24 * 3600),
        } as i64;
        let now = now_ms();
        let token = self
            .chat
            .tokens()
            .issue_for(&r.user_id, device, now, ttl)
            .map_err(status)?;
        Ok(Response::new(pb::Token {
            token,
            expires_at_ms: (now.div_euclid(1000) + ttl) * 1000,
        }))
    }

    async fn create_group(
        &self,
        req: Request<pb::AdminCreateGroupRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let r = req.into_inner();
        let conv = self
            .chat
            .create_group(&r.owner, &r.name, r.members)
            .await
            .map_err(status)?;
        Ok(Response::new(conv.into()))
    }

    async fn add_members(
        &self,
        req: Request<pb::AdminMembersRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        self.members(req.into_inner(), MembershipChange::Add).await
    }

    async fn remove_members(
        &self,
        req: Request<pb::AdminMembersRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        self.members(req.into_inner(), MembershipChange::Remove)
            .await
    }

    async fn get_conversation(
        &self,
        req: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::Conversation>, Status> {
        let conv = self
            .chat
            .conversation(req.into_inner().conversation_id)
            .await
            .map_err(status)?;
        Ok(Response::new(conv.into()))
    }

    async fn list_conversations(
        &self,
        req: Request<pb::ListUserConversationsRequest>,
    ) -> Result<Response<pb::ConversationList>, Status> {
        let user = req.into_inner().user_id;
        let every = pb::ListConversations::default();
        let list = self
            .chat
            .list_conversations(&user, every)
            .await
            .map_err(status)?;
        Ok(Response::new(list))
    }

    async fn list_devices(
        &self,
        req: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::DeviceList>, Status> {
        let devices = self
            .chat
            .devices(&req.into_inner().user_id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeviceList {
            devices: devices.into_iter().map(|d| d.into_pb(false)).collect(),
        }))
    }

    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Tokens>, Status> {
        let r = req.into_inner();
        let ttl = |secs: u64| (secs > 0).then(|| Duration::from_secs(secs.min(365 * 24 * 3600)));
        let tokens = self
            .chat
            .create_session(
                &r.user_id,
                &r.device_id,
                ttl(r.access_ttl_seconds),
                ttl(r.refresh_ttl_seconds),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(tokens))
    }

    async fn revoke_tokens(
        &self,
        req: Request<pb::RevokeTokensRequest>,
    ) -> Result<Response<pb::Revoked>, Status> {
        let r = req.into_inner();
        let device = (!r.device_id.is_empty()).then_some(r.device_id.as_str());
        let revoked_at_ms = self
            .chat
            .log_out(&r.user_id, device)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::Revoked { revoked_at_ms }))
    }
}

impl AdminApi {
    async fn members(
        &self,
        r: pb::AdminMembersRequest,
        change: MembershipChange,
    ) -> Result<Response<pb::Conversation>, Status> {
        match self
            .chat
            .change_members(r.conversation_id, "", change, &r.users)
            .await
            .map_err(status)?
        {
            pb::server_frame::Body::Conversation(c) => Ok(Response::new(c)),
            _ => Err(status(ChatError::Unavailable("unexpected answer".into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_key_is_required_and_compared_whole() {
        let mut req = Request::new(());
        assert_eq!(
            check_admin("k3y", &req).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        req.metadata_mut()
            .insert("authorization", "Bearer k3".parse().unwrap());
        assert!(check_admin("k3y", &req).is_err());
        req.metadata_mut()
            .insert("authorization", "Bearer k3y".parse().unwrap());
        assert!(check_admin("k3y", &req).is_ok());
    }
}
