//! The frame codec on arbitrary bytes, fed in pieces as a socket hands them
//! over: never a panic, an oversized length refused before its body is
//! buffered, and what decodes encodes back to the same message. Both
//! directions: client frames (what a gateway reads) and server frames
//! (what the SDK reads from a server it cannot trust either).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use parley_proto::codec::{DecodeError, decode_frame, encode_frame, peek_request_id};
use parley_proto::pb;
use prost::Message;

const MAX: usize = 4096;

fn run<M: Message + Default + PartialEq>(data: &[u8], step: usize) {
    let mut buf = BytesMut::new();
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match decode_frame::<M>(&mut buf, MAX) {
                Ok(Some(frame)) => {
                    let mut again = BytesMut::new();
                    encode_frame(&frame, &mut again);
                    let back = decode_frame::<M>(&mut again, usize::MAX)
                        .expect("an encoded frame decodes")
                        .expect("whole");
                    assert!(back == frame, "a frame changed on its way back");
                    assert!(again.is_empty());
                }
                Ok(None) => {
                    assert!(buf.len() < 4 + MAX, "an incomplete frame past the limit");
                    break;
                }
                Err(DecodeError::TooLarge { len, max }) => {
                    assert!(len > max);
                    return;
                }
                Err(e @ DecodeError::Malformed { .. }) => {
                    let _ = e.request_id();
                    return;
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(control >> 1).max(1);
    if control & 1 == 0 {
        run::<pb::ClientFrame>(data, step);
    } else {
        run::<pb::ServerFrame>(data, step);
    }
    let _ = peek_request_id(data);
});
