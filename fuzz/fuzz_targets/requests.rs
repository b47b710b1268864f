//! Arbitrary requests straight to the chat rules, as a logged-in user:
//! every frame the input decodes to, in order, through `ChatService::call`
//! (content validation, conversation and group checks, history and sync
//! bounds). Never a panic; a refusal is an error with a code, never
//! INTERNAL (the store here cannot fail).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use parley_proto::codec::decode_frame;
use parley_proto::pb::{self, ErrorCode};

fuzz_target!(|data: &[u8]| {
    let Some((&who, data)) = data.split_first() else {
        return;
    };
    let user = ["alice", "bob", "carol", "mallory"][usize::from(who & 3)];
    let mut buf = BytesMut::from(data);
    parley_fuzz::run(async {
        let chat = parley_fuzz::chat().await;
        while let Ok(Some(frame)) = decode_frame::<pb::ClientFrame>(&mut buf, 1 << 20) {
            let Some(body) = frame.body else {
                continue;
            };
            if let Err(e) = chat.call(user, "phone", body).await {
                assert_ne!(e.code(), ErrorCode::Internal, "{e}");
            }
        }
    });
});
