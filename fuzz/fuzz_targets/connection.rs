//! The gateway's connection state machine over TCP framing, fed arbitrary
//! bytes through an in-memory transport: before login, or after a valid
//! Hello and Auth (the first input bit), so requests reach the chat rules.
//! Never a panic or a hang (the connection ends within 10 s of the client
//! closing), every byte the server writes is a whole, valid frame, and the
//! connection is counted out when it ends.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use parley_fuzz::{MAX_FRAME, WITHIN, chat, encode, gateway, login, talk};
use parley_gateway::conn::serve;
use parley_gateway::io::StreamIo;
use parley_proto::codec::decode_frame;
use parley_proto::pb;
use tokio::sync::watch;

fuzz_target!(|data: &[u8]| {
    let Some((&control, data)) = data.split_first() else {
        return;
    };
    let mut input = if control & 1 == 1 {
        encode(&login())
    } else {
        Vec::new()
    };
    input.extend_from_slice(data);
    parley_fuzz::run(async {
        let shared = gateway(chat().await);
        let (client, server) = tokio::io::duplex(1 << 16);
        let (_stop, shutdown) = watch::channel(false);
        let served = serve(
            StreamIo::new(server, MAX_FRAME),
            shared.clone(),
            1,
            Some(std::net::IpAddr::from([192, 0, 2, 1])),
            shutdown,
        );
        let (answer, ()) =
            tokio::time::timeout(WITHIN, async { tokio::join!(talk(client, input), served) })
                .await
                .expect("the connection ends once the client closes");
        let mut buf = BytesMut::from(&answer[..]);
        while decode_frame::<pb::ServerFrame>(&mut buf, usize::MAX)
            .expect("the server writes valid frames")
            .is_some()
        {}
        assert!(buf.is_empty(), "the server wrote a partial frame");
        assert_eq!(shared.metrics.connections.get(), 0);
    });
});
