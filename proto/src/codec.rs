//! The frame codec: a 4-byte big-endian length, then that many bytes of one
//! protobuf message. Decoding works on a growing buffer and answers
//! `Ok(None)` while a frame is incomplete; the length is checked against the
//! limit before any body is buffered, so an oversized frame costs nothing.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Why a frame could not be decoded. Both are fatal for the connection.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The body is not a valid protobuf message of the expected type.
    #[error("frame is not a valid protobuf message: {error}")]
    Malformed {
        error: prost::DecodeError,
        /// The frame's `request_id` (field 1) where it could still be read,
        /// so the Error it causes can answer it; 0 otherwise.
        request_id: u64,
    },
}

impl DecodeError {
    /// The request id of the frame that failed, or 0.
    pub fn request_id(&self) -> u64 {
        match self {
            Self::Malformed { request_id, .. } => *request_id,
            Self::TooLarge { .. } => 0,
        }
    }
}

/// Decodes `body`, or says why not with whatever request id it holds.
fn decode_or_blame<M: Message + Default>(body: &[u8]) -> Result<M, DecodeError> {
    M::decode(body).map_err(|error| DecodeError::Malformed {
        error,
        request_id: peek_request_id(body),
    })
}

/// Field 1 (a varint, the `request_id` of both frame types) of a frame body
/// that did not decode as a whole: the fields before the damage are read one
/// by one until field 1 turns up. 0 when it cannot be found.
pub fn peek_request_id(mut body: &[u8]) -> u64 {
    use prost::encoding::{WireType, decode_key, decode_varint};
    while !body.is_empty() {
        let Ok((tag, wire)) = decode_key(&mut body) else {
            return 0;
        };
        let skip = match wire {
            WireType::Varint => match decode_varint(&mut body) {
                Ok(v) if tag == 1 => return v,
                Ok(_) => 0,
                Err(_) => return 0,
            },
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => match decode_varint(&mut body) {
                Ok(len) => usize::try_from(len).unwrap_or(usize::MAX),
                Err(_) => return 0,
            },
            WireType::StartGroup | WireType::EndGroup => return 0,
        };
        if skip > body.len() {
            return 0;
        }
        body = &body[skip..];
    }
    0
}

/// Decodes one length-prefixed frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (and
/// reserves room for the rest), consuming nothing.
pub fn decode_frame<M: Message + Default>(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<M>, DecodeError> {
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    if buf.len() < LEN_PREFIX + len {
        buf.reserve(LEN_PREFIX + len - buf.len());
        return Ok(None);
    }
    buf.advance(LEN_PREFIX);
    let body = buf.split_to(len);
    decode_or_blame(&body).map(Some)
}

/// Appends `msg` to `buf` as one length-prefixed frame.
pub fn encode_frame<M: Message>(msg: &M, buf: &mut BytesMut) {
    let len = msg.encoded_len();
    buf.reserve(LEN_PREFIX + len);
    buf.put_u32(len as u32);
    // Cannot fail: the room was reserved above.
    msg.encode(buf).expect("reserved capacity");
}

/// Decodes a frame body that arrived without a length prefix (a WebSocket
/// binary message carries exactly one frame).
pub fn decode_body<M: Message + Default>(body: &[u8], max: usize) -> Result<M, DecodeError> {
    if body.len() > max {
        return Err(DecodeError::TooLarge {
            len: body.len(),
            max,
        });
    }
    decode_or_blame(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{self, client_frame::Body};

    fn ping(nonce: u64) -> pb::ClientFrame {
        pb::ClientFrame::new(nonce, Body::Ping(pb::Ping { nonce }))
    }

    #[test]
    fn round_trips_several_frames_in_one_buffer() {
        let mut buf = BytesMut::new();
        for n in 1..=3 {
            encode_frame(&ping(n), &mut buf);
        }
        for n in 1..=3 {
            let f: pb::ClientFrame = decode_frame(&mut buf, 1024).unwrap().unwrap();
            assert_eq!(f, ping(n));
        }
        assert!(buf.is_empty());
        assert!(
            decode_frame::<pb::ClientFrame>(&mut buf, 1024)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_worked_example_in_docs_protocol_md_is_exact() {
        let hello = pb::ClientFrame::new(
            1,
            Body::Hello(pb::Hello {
                min_version: 1,
                max_version: 1,
                client: "x".into(),
            }),
        );
        let mut buf = BytesMut::new();
        encode_frame(&hello, &mut buf);
        assert_eq!(
            buf.as_ref(),
            [
                0, 0, 0, 0x0b, 0x08, 0x01, 0x12, 0x07, 0x08, 0x01, 0x10, 0x01, 0x1a, 0x01, 0x78
            ]
        );
    }

    #[test]
    fn incomplete_frames_consume_nothing_until_whole() {
        let mut whole = BytesMut::new();
        encode_frame(&ping(7), &mut whole);
        let mut buf = BytesMut::new();
        for (i, byte) in whole.iter().enumerate() {
            buf.put_u8(*byte);
            let got = decode_frame::<pb::ClientFrame>(&mut buf, 1024).unwrap();
            if i + 1 < whole.len() {
                assert!(got.is_none(), "decoded early at byte {i}");
                assert_eq!(buf.len(), i + 1);
            } else {
                assert_eq!(got.unwrap(), ping(7));
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut buf = BytesMut::new();
        buf.put_u32(1_000_000);
        let err = decode_frame::<pb::ClientFrame>(&mut buf, 64 * 1024).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::TooLarge {
                len: 1_000_000,
                max: 65536
            }
        ));
    }

    #[test]
    fn garbage_body_is_malformed_not_a_panic() {
        let mut buf = BytesMut::new();
        let junk = [0xff_u8, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02];
        buf.put_u32(junk.len() as u32);
        buf.put_slice(&junk);
        assert!(matches!(
            decode_frame::<pb::ClientFrame>(&mut buf, 1024),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn a_garbled_frame_still_names_its_request_id() {
        // request_id = 7, then a Send (field 4) whose length runs past the end.
        let body = [0x08, 0x07, 0x22, 0x40, 0x0a];
        let err = decode_body::<pb::ClientFrame>(&body, 1024).unwrap_err();
        assert_eq!(err.request_id(), 7);
        // Field 1 after a damaged field cannot be trusted, nor found.
        assert_eq!(peek_request_id(&[0x22, 0x40, 0x0a]), 0);
        // Field 1 after intact fields is found.
        assert_eq!(peek_request_id(&[0x32, 0x00, 0x08, 0x09, 0xff]), 9);
        assert_eq!(peek_request_id(&[]), 0);
    }

    #[test]
    fn websocket_bodies_are_checked_against_the_limit() {
        let body = prost::Message::encode_to_vec(&ping(1));
        assert_eq!(
            decode_body::<pb::ClientFrame>(&body, 1024).unwrap(),
            ping(1)
        );
        assert!(matches!(
            decode_body::<pb::ClientFrame>(&body, 2),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix of pseudo-random input.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2_000 {
            let mut buf = BytesMut::new();
            let n = (state % 40) as usize;
            for _ in 0..n {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                buf.put_u8(state as u8);
            }
            while let Ok(Some(_)) = decode_frame::<pb::ClientFrame>(&mut buf, 32) {}
        }
    }
}
