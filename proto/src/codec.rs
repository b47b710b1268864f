//! The frame codec: a 4-byte big-endian length, then that many bytes of one
//! protobuf message. Decoding works on a growing buffer and answers
//! `Ok(None)` while a frame is incomplete; the length is checked against the
//! limit before any body is buffered, so an oversized frame costs nothing.

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use prost::{Message, encoding};

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

/// A server frame to write: one built for this connection, or the Deliver
/// of a message many connections share, encoded straight from the shared
/// copy instead of from a clone per recipient (a message's strings and
/// content are five allocations a clone).
// Frames are held by value in a connection's reused buffer, as they were
// before; boxing the large variant would add an allocation per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Frame(crate::pb::ServerFrame),
    Deliver {
        inbox_seq: u64,
        message: Arc<crate::pb::Message>,
        /// `Deliver.from_blocked`.
        from_blocked: bool,
    },
}

/// `ServerFrame.body`'s `deliver` field, and `Deliver`'s fields.
const FRAME_DELIVER: u32 = 5;
const DELIVER_INBOX_SEQ: u32 = 1;
const DELIVER_MESSAGE: u32 = 2;
const DELIVER_FROM_BLOCKED: u32 = 3;

impl Outgoing {
    /// Whether this frame delivers a message.
    pub fn is_deliver(&self) -> bool {
        matches!(
            self,
            Self::Deliver { .. }
                | Self::Frame(crate::pb::ServerFrame {
                    body: Some(crate::pb::server_frame::Body::Deliver(_)),
                    ..
                })
        )
    }

    /// The error this frame carries, if it is one.
    pub fn error(&self) -> Option<&crate::pb::Error> {
        match self {
            Self::Frame(crate::pb::ServerFrame {
                body: Some(crate::pb::server_frame::Body::Error(e)),
                ..
            }) => Some(e),
            _ => None,
        }
    }

    /// Bytes of the encoded frame, without the length prefix.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Frame(f) => f.encoded_len(),
            Self::Deliver {
                inbox_seq,
                message,
                from_blocked,
            } => {
                let inner = deliver_len(*inbox_seq, message, *from_blocked);
                encoding::key_len(FRAME_DELIVER)
                    + encoding::encoded_len_varint(inner as u64)
                    + inner
            }
        }
    }

    /// Appends the encoded frame, without the length prefix: for a Deliver,
    /// the bytes prost writes for `ServerFrame { request_id: 0, body:
    /// Deliver { inbox_seq, message } }`.
    pub fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            Self::Frame(f) => f.encode_raw(buf),
            Self::Deliver {
                inbox_seq,
                message,
                from_blocked,
            } => {
                let inner = deliver_len(*inbox_seq, message, *from_blocked);
                encoding::encode_key(FRAME_DELIVER, encoding::WireType::LengthDelimited, buf);
                encoding::encode_varint(inner as u64, buf);
                if *inbox_seq != 0 {
                    encoding::uint64::encode(DELIVER_INBOX_SEQ, inbox_seq, buf);
                }
                encoding::message::encode(DELIVER_MESSAGE, &**message, buf);
                if *from_blocked {
                    encoding::bool::encode(DELIVER_FROM_BLOCKED, from_blocked, buf);
                }
            }
        }
    }

    /// The encoded frame, without the length prefix (a WebSocket message).
    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode_raw(&mut buf);
        buf
    }
}

impl From<crate::pb::ServerFrame> for Outgoing {
    fn from(frame: crate::pb::ServerFrame) -> Self {
        Self::Frame(frame)
    }
}

fn deliver_len(inbox_seq: u64, message: &crate::pb::Message, from_blocked: bool) -> usize {
    let seq = if inbox_seq != 0 {
        encoding::uint64::encoded_len(DELIVER_INBOX_SEQ, &inbox_seq)
    } else {
        0
    };
    let blocked = if from_blocked {
        encoding::bool::encoded_len(DELIVER_FROM_BLOCKED, &from_blocked)
    } else {
        0
    };
    seq + encoding::message::encoded_len(DELIVER_MESSAGE, message) + blocked
}

/// Appends `frame` to `buf` as one length-prefixed frame.
pub fn encode_outgoing(frame: &Outgoing, buf: &mut BytesMut) {
    let len = frame.encoded_len();
    buf.reserve(LEN_PREFIX + len);
    buf.put_u32(len as u32);
    frame.encode_raw(buf);
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

    /// A shared Deliver is the same bytes as the frame prost would write,
    /// for a full message, a recalled one, an empty one, a zero inbox seq,
    /// and with and without `from_blocked`.
    #[test]
    fn shared_deliver_encodes_as_the_frame_does() {
        let full = pb::Message {
            msg_id: 77,
            conversation_id: 9,
            seq: 300,
            sender_id: "alice".into(),
            sender_device: "phone".into(),
            client_msg_id: "c-1".into(),
            content: Some(pb::Content::text("héllo ".repeat(40))),
            server_time_ms: 1_700_000_000_000,
            edited_at_ms: 1_700_000_000_500,
            recalled: false,
        };
        let recalled = pb::Message {
            content: None,
            recalled: true,
            ..full.clone()
        };
        for (inbox_seq, message, from_blocked) in [
            (1, full.clone(), false),
            (2, recalled, false),
            (3, full.clone(), true),
            (1 << 40, pb::Message::default(), true),
            (0, full, false),
        ] {
            let frame = pb::ServerFrame::new(
                0,
                pb::server_frame::Body::Deliver(pb::Deliver {
                    inbox_seq,
                    message: Some(message.clone()),
                    from_blocked,
                }),
            );
            let shared = Outgoing::Deliver {
                inbox_seq,
                message: Arc::new(message),
                from_blocked,
            };
            assert_eq!(shared.encoded_len(), frame.encoded_len());
            assert_eq!(shared.encode_to_vec(), frame.encode_to_vec());
            let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
            encode_outgoing(&shared, &mut a);
            encode_frame(&frame, &mut b);
            assert_eq!(a, b);
            assert!(shared.is_deliver() && Outgoing::from(frame).is_deliver());
        }
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
