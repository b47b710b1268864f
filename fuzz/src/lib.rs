//! What the fuzz targets share: one runtime, an embedded chat service
//! (in-memory store) with users and conversations, valid tokens and login
//! frames, and the gateway's connection loop over an in-memory transport.
//! Each input gets a fresh service, so an input's effect does not depend on
//! the inputs before it and every crash reproduces from its file alone.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parley_core::{
    ChatConfig, ChatService, LocalBus, MemoryPresence, MemoryStore, Store, TokenKeys,
};
use parley_gateway::{GatewayConfig, Shared};
use parley_proto::codec::encode_frame;
use parley_proto::pb::{self, client_frame::Body as Req};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The token-signing secret of every fuzzed service.
pub const SECRET: &[u8] = b"fuzzing-secret-fuzzing-secret-32";

/// The largest frame the fuzzed gateway takes: small, so the limit is hit.
pub const MAX_FRAME: usize = 4096;

/// Runs one input's work to its end on a runtime of its own (a clock, no
/// I/O driver: every transport here is in memory), dropped after it with
/// whatever tasks the input's services left, so nothing one input spawned
/// outlives it or piles up over millions of inputs.
pub fn run<F: std::future::Future>(work: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
        .block_on(work)
}

pub fn keys() -> TokenKeys {
    TokenKeys::new(SECRET).expect("a 32-byte secret")
}

/// A token for `user`, valid for an hour.
pub fn token(user: &str) -> String {
    keys()
        .issue(user, parley_core::now_ms() / 1000, 3600)
        .expect("signing")
}

/// A chat service with users alice, bob and carol, a group of all three
/// (conversation 1) and alice and bob's direct conversation (2).
pub async fn chat() -> Arc<ChatService> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    for u in ["alice", "bob", "carol"] {
        store.create_user(u, "", 0).await.expect("a user");
    }
    let chat = ChatService::start(
        store,
        Arc::new(MemoryPresence::default()),
        Arc::new(LocalBus::default()),
        keys(),
        ChatConfig::default(),
    );
    chat.create_group("alice", "g", vec!["bob".into(), "carol".into()])
        .await
        .expect("a group");
    chat.call(
        "alice",
        "phone",
        Req::OpenDirect(pb::OpenDirect { peer: "bob".into() }),
    )
    .await
    .expect("a direct conversation");
    chat
}

/// Hello and Auth as alice's phone, request ids 1 and 2.
pub fn login() -> Vec<pb::ClientFrame> {
    vec![
        pb::ClientFrame {
            request_id: 1,
            body: Some(Req::Hello(pb::Hello {
                min_version: parley_proto::PROTOCOL_VERSION,
                max_version: parley_proto::PROTOCOL_VERSION,
                client: "fuzz".into(),
            })),
        },
        pb::ClientFrame {
            request_id: 2,
            body: Some(Req::Auth(pb::Auth {
                token: token("alice"),
                device_id: "phone".into(),
                cursor: None,
            })),
        },
    ]
}

/// `frames`, length-prefixed, as a client would write them.
pub fn encode(frames: &[pb::ClientFrame]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for f in frames {
        encode_frame(f, &mut buf);
    }
    buf.to_vec()
}

/// A gateway over `chat`, with the fuzzed frame limit.
pub fn gateway(chat: Arc<ChatService>) -> Arc<Shared> {
    let config = GatewayConfig {
        max_frame_bytes: MAX_FRAME,
        ..GatewayConfig::default()
    };
    Shared::new(config, chat, Arc::new(MemoryPresence::default()), None)
}

/// The longest one input may keep a connection open: an input that holds
/// it longer (a hang) fails.
pub const WITHIN: Duration = Duration::from_secs(10);

/// Writes `input` from the client's side of `client`, then closes that
/// side, and reads everything the server answers until it closes.
pub async fn talk(mut client: DuplexStream, input: Vec<u8>) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(&mut client);
    let write = async move {
        // The server may close first (a fatal frame): the rest goes nowhere.
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    };
    let mut answer = Vec::new();
    let read = rd.read_to_end(&mut answer);
    let ((), _) = tokio::join!(write, read);
    answer
}
