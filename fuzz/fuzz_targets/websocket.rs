//! The gateway's connection state machine over WebSocket (after the HTTP
//! upgrade, which the HTTP library parses). Two inputs in one: raw bytes
//! as WebSocket framing from the client (masking, opcodes, lengths,
//! fragments, control frames), or (the second input bit) the input cut
//! into binary messages a real client sends, each holding frame bytes; the
//! first bit logs in first. Never a panic or a hang, and the connection is
//! counted out when it ends.

#![no_main]

use futures_util::SinkExt;
use libfuzzer_sys::fuzz_target;
use parley_fuzz::{MAX_FRAME, WITHIN, chat, encode, gateway, login, talk};
use parley_gateway::conn::serve;
use parley_gateway::io::WsIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&control, data)) = data.split_first() else {
        return;
    };
    parley_fuzz::run(async {
        let shared = gateway(chat().await);
        let (client, server) = tokio::io::duplex(1 << 16);
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME * 2))
            .max_frame_size(Some(MAX_FRAME * 2));
        let ws = WebSocketStream::from_raw_socket(server, Role::Server, Some(config)).await;
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let served = serve(
            WsIo::new(ws, MAX_FRAME),
            shared.clone(),
            1,
            Some(std::net::IpAddr::from([192, 0, 2, 1])),
            shutdown,
        );
        let client_side = async {
            if control & 2 == 0 {
                let mut raw = Vec::new();
                if control & 1 == 1 {
                    raw = framed(&encode(&login()));
                }
                raw.extend_from_slice(data);
                talk(client, raw).await;
            } else {
                let mut ws = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
                if control & 1 == 1 {
                    for f in parley_fuzz::login() {
                        let _ = ws.send(Message::binary(encode(&[f]))).await;
                    }
                }
                let size = usize::from(control >> 2).max(1) * 16;
                for piece in data.chunks(size) {
                    if ws.send(Message::binary(piece.to_vec())).await.is_err() {
                        break;
                    }
                }
                let _ = ws.close(None).await;
                // Read until the server is done.
                use futures_util::StreamExt;
                while let Some(Ok(_)) = ws.next().await {}
            }
        };
        tokio::time::timeout(WITHIN, async { tokio::join!(client_side, served) })
            .await
            .expect("the connection ends once the client closes");
        assert_eq!(shared.metrics.connections.get(), 0);
    });
});

/// `payload` as one masked binary WebSocket frame from a client.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x82];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 65_536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}
