//! The admin API's request handling on arbitrary requests (the key check
//! in front of it is tested on its own): the first byte picks the method,
//! the rest decodes as its request. Never a panic; a refusal is a status
//! with a code, never INTERNAL or UNKNOWN (the store here cannot fail).

#![no_main]

use libfuzzer_sys::fuzz_target;
use parley_chat::admin::AdminApi;
use parley_proto::pb::{self, admin_server::Admin};
use prost::Message;
use tonic::{Code, Request, Status};

fn req<M: Message + Default>(body: &[u8]) -> Option<Request<M>> {
    M::decode(body).ok().map(Request::new)
}

fn check<T>(r: Result<tonic::Response<T>, Status>) {
    if let Err(s) = r {
        assert!(!matches!(s.code(), Code::Internal | Code::Unknown), "{s:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&method, body)) = data.split_first() else {
        return;
    };
    parley_fuzz::run(async {
        let api = AdminApi::new(parley_fuzz::chat().await);
        match method % 11 {
            0 => {
                if let Some(r) = req::<pb::CreateUserRequest>(body) {
                    check(api.create_user(r).await);
                }
            }
            1 => {
                if let Some(r) = req::<pb::GetUserRequest>(body) {
                    check(api.get_user(r).await);
                }
            }
            2 => {
                if let Some(r) = req::<pb::IssueTokenRequest>(body) {
                    check(api.issue_token(r).await);
                }
            }
            3 => {
                if let Some(r) = req::<pb::AdminCreateGroupRequest>(body) {
                    check(api.create_group(r).await);
                }
            }
            4 => {
                if let Some(r) = req::<pb::AdminMembersRequest>(body) {
                    check(api.add_members(r).await);
                }
            }
            5 => {
                if let Some(r) = req::<pb::AdminMembersRequest>(body) {
                    check(api.remove_members(r).await);
                }
            }
            6 => {
                if let Some(r) = req::<pb::GetConversationRequest>(body) {
                    check(api.get_conversation(r).await);
                }
            }
            7 => {
                if let Some(r) = req::<pb::ListUserConversationsRequest>(body) {
                    check(api.list_conversations(r).await);
                }
            }
            8 => {
                if let Some(r) = req::<pb::ListDevicesRequest>(body) {
                    check(api.list_devices(r).await);
                }
            }
            9 => {
                if let Some(r) = req::<pb::RevokeTokensRequest>(body) {
                    check(api.revoke_tokens(r).await);
                }
            }
            _ => {
                if let Some(r) = req::<pb::CreateSessionRequest>(body) {
                    check(api.create_session(r).await);
                }
            }
        }
    });
});
