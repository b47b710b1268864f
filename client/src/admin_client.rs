//! A small admin API client (the `admin` feature): connects with the admin
//! key attached to every call. For an app's backend written in Rust; the
//! `parley` command and the tests use it too.

use parley_proto::pb::{self, admin_client::AdminClient};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds `authorization: Bearer <admin key>` to every call.
#[derive(Debug, Clone)]
struct BearerAuth(MetadataValue<Ascii>);

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Authed = InterceptedService<Channel, BearerAuth>;

/// Why the admin API could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin API URL {0:?} is not a valid URI")]
    Url(String),
    #[error("the admin key must be printable ASCII")]
    Key,
    #[error("cannot connect to the admin API: {0}")]
    Connect(#[from] tonic::transport::Error),
}

/// The admin API, authenticated.
#[derive(Debug, Clone)]
pub struct Admin {
    inner: AdminClient<Authed>,
}

impl Admin {
    /// Connects to the admin API at `url` (`http://host:port`).
    pub async fn connect(url: &str, admin_key: &str) -> Result<Self, AdminError> {
        let value: MetadataValue<Ascii> = format!("Bearer {admin_key}")
            .parse()
            .map_err(|_| AdminError::Key)?;
        let channel = Channel::from_shared(url.to_owned())
            .map_err(|_| AdminError::Url(url.to_owned()))?
            .connect()
            .await?;
        Ok(Self {
            inner: AdminClient::with_interceptor(channel, BearerAuth(value)),
        })
    }

    pub async fn create_user(&mut self, id: &str, name: &str) -> Result<pb::User, tonic::Status> {
        let req = pb::CreateUserRequest {
            id: id.into(),
            display_name: name.into(),
        };
        Ok(self.inner.create_user(req).await?.into_inner())
    }

    /// A token for any device of `user` (`ttl_seconds` 0: the server's
    /// default lifetime).
    pub async fn token(
        &mut self,
        user: &str,
        ttl_seconds: u64,
    ) -> Result<pb::Token, tonic::Status> {
        self.device_token(user, "", ttl_seconds).await
    }

    /// A token for `user` on `device` only (any device when empty): a
    /// log-out of that device revokes it.
    pub async fn device_token(
        &mut self,
        user: &str,
        device: &str,
        ttl_seconds: u64,
    ) -> Result<pb::Token, tonic::Status> {
        let req = pb::IssueTokenRequest {
            user_id: user.into(),
            ttl_seconds,
            device_id: device.into(),
        };
        Ok(self.inner.issue_token(req).await?.into_inner())
    }

    /// Logs `device` of `user` in with a pair of tokens: a short-lived
    /// access token and the refresh token that gets the next ones
    /// (`ClientConfig::refresh_token`). Lifetimes in seconds, 0 for the
    /// server's defaults (15 minutes, 90 days).
    pub async fn create_session(
        &mut self,
        user: &str,
        device: &str,
        access_ttl_seconds: u64,
        refresh_ttl_seconds: u64,
    ) -> Result<pb::Tokens, tonic::Status> {
        let req = pb::CreateSessionRequest {
            user_id: user.into(),
            device_id: device.into(),
            access_ttl_seconds,
            refresh_ttl_seconds,
        };
        Ok(self.inner.create_session(req).await?.into_inner())
    }

    /// The devices of `user`.
    pub async fn devices(&mut self, user: &str) -> Result<Vec<pb::Device>, tonic::Status> {
        let req = pb::ListDevicesRequest {
            user_id: user.into(),
        };
        Ok(self.inner.list_devices(req).await?.into_inner().devices)
    }

    /// Logs out `device` of `user`, or every device when None; returns the
    /// time of the log-out (ms since the epoch).
    pub async fn log_out(
        &mut self,
        user: &str,
        device: Option<&str>,
    ) -> Result<i64, tonic::Status> {
        let req = pb::RevokeTokensRequest {
            user_id: user.into(),
            device_id: device.unwrap_or_default().into(),
        };
        Ok(self
            .inner
            .revoke_tokens(req)
            .await?
            .into_inner()
            .revoked_at_ms)
    }

    pub async fn create_group(
        &mut self,
        owner: &str,
        name: &str,
        members: &[String],
    ) -> Result<pb::Conversation, tonic::Status> {
        let req = pb::AdminCreateGroupRequest {
            owner: owner.into(),
            name: name.into(),
            members: members.to_vec(),
        };
        Ok(self.inner.create_group(req).await?.into_inner())
    }

    pub async fn add_members(
        &mut self,
        id: u64,
        users: &[String],
    ) -> Result<pb::Conversation, tonic::Status> {
        let req = pb::AdminMembersRequest {
            conversation_id: id,
            users: users.to_vec(),
        };
        Ok(self.inner.add_members(req).await?.into_inner())
    }

    pub async fn remove_members(
        &mut self,
        id: u64,
        users: &[String],
    ) -> Result<pb::Conversation, tonic::Status> {
        let req = pb::AdminMembersRequest {
            conversation_id: id,
            users: users.to_vec(),
        };
        Ok(self.inner.remove_members(req).await?.into_inner())
    }

    pub async fn conversation(&mut self, id: u64) -> Result<pb::Conversation, tonic::Status> {
        Ok(self
            .inner
            .get_conversation(pb::GetConversationRequest {
                conversation_id: id,
            })
            .await?
            .into_inner())
    }

    pub async fn conversations(
        &mut self,
        user: &str,
    ) -> Result<Vec<pb::Conversation>, tonic::Status> {
        let req = pb::ListUserConversationsRequest {
            user_id: user.into(),
        };
        Ok(self
            .inner
            .list_conversations(req)
            .await?
            .into_inner()
            .conversations)
    }
}
