//! Frame transports: length-prefixed frames over a byte stream (TCP, or TLS
//! later), and one frame per binary message over WebSocket. The connection
//! logic sees only `FrameIo`.

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use parley_proto::codec::{self, DecodeError, Outgoing};
use parley_proto::pb;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    NotBinary(&'static str),
    #[error("connection reset mid-frame")]
    Truncated,
    #[error("transport error: {0}")]
    Io(String),
}

/// Reads client frames and writes server frames.
pub trait FrameIo: Send {
    /// The next frame; `Ok(None)` when the peer closed cleanly.
    fn read(&mut self) -> impl Future<Output = Result<Option<pb::ClientFrame>, ReadError>> + Send;
    /// Writes and flushes frames in order.
    fn write(&mut self, frames: &[Outgoing]) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Closes after a last frame so that the client reads it: ends the
    /// sending side, then reads and discards what the client still sends,
    /// for at most [`LINGER`] and [`LINGER_BYTES`], before the socket
    /// closes. Closing a socket with unread data in it sends a reset, and
    /// many client stacks report the reset before the frames ahead of it.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// The longest a closing connection waits for the client to finish.
pub const LINGER: Duration = Duration::from_secs(2);
/// The most a closing connection reads (and drops) from the client.
pub const LINGER_BYTES: usize = 1 << 20;

/// Length-prefixed frames over a byte stream.
pub struct StreamIo<S> {
    stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
    max_frame: usize,
}

impl<S> StreamIo<S> {
    pub fn new(stream: S, max_frame: usize) -> Self {
        Self {
            stream,
            read_buf: BytesMut::with_capacity(512),
            write_buf: BytesMut::new(),
            max_frame,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> FrameIo for StreamIo<S> {
    async fn read(&mut self) -> Result<Option<pb::ClientFrame>, ReadError> {
        loop {
            if let Some(frame) = codec::decode_frame(&mut self.read_buf, self.max_frame)? {
                // Give back memory a large frame left behind.
                if self.read_buf.is_empty() && self.read_buf.capacity() > 8 * 1024 {
                    self.read_buf = BytesMut::with_capacity(512);
                }
                return Ok(Some(frame));
            }
            if self.read_buf.capacity() == self.read_buf.len() {
                self.read_buf.reserve(512);
            }
            let n = self
                .stream
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|e| ReadError::Io(e.to_string()))?;
            if n == 0 {
                return if self.read_buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Truncated)
                };
            }
        }
    }

    async fn write(&mut self, frames: &[Outgoing]) -> std::io::Result<()> {
        for f in frames {
            codec::encode_outgoing(f, &mut self.write_buf);
        }
        let result = self.stream.write_all(&self.write_buf).await;
        self.write_buf.clear();
        if self.write_buf.capacity() > 64 * 1024 {
            self.write_buf = BytesMut::new();
        }
        result?;
        self.stream.flush().await
    }

    async fn close(&mut self) {
        let deadline = Instant::now() + LINGER;
        if timeout_at(deadline, self.stream.shutdown()).await.is_err() {
            return;
        }
        let mut left = LINGER_BYTES;
        self.read_buf = BytesMut::with_capacity(16 * 1024);
        while left > 0 {
            self.read_buf.clear();
            match timeout_at(deadline, self.stream.read_buf(&mut self.read_buf)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    }
}

/// One frame per binary WebSocket message.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    max_frame: usize,
}

impl<S> WsIo<S> {
    pub fn new(ws: WebSocketStream<S>, max_frame: usize) -> Self {
        Self { ws, max_frame }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> FrameIo for WsIo<S> {
    async fn read(&mut self) -> Result<Option<pb::ClientFrame>, ReadError> {
        loop {
            match self.ws.next().await {
                None | Some(Ok(WsMessage::Close(_))) => return Ok(None),
                Some(Ok(WsMessage::Binary(body))) => {
                    return Ok(Some(codec::decode_body(&body, self.max_frame)?));
                }
                Some(Ok(WsMessage::Text(_))) => {
                    return Err(ReadError::NotBinary(
                        "text messages are not frames; send binary",
                    ));
                }
                // Pings are answered by tungstenite on the next write.
                Some(Ok(_)) => continue,
                Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                    return Err(ReadError::Decode(DecodeError::TooLarge {
                        len: self.max_frame + 1,
                        max: self.max_frame,
                    }));
                }
                Some(Err(e)) => return Err(ReadError::Io(e.to_string())),
            }
        }
    }

    async fn write(&mut self, frames: &[Outgoing]) -> std::io::Result<()> {
        for f in frames {
            self.ws
                .feed(WsMessage::Binary(f.encode_to_vec().into()))
                .await
                .map_err(std::io::Error::other)?;
        }
        self.ws.flush().await.map_err(std::io::Error::other)
    }

    /// Sends a Close and waits for the client's (the closing handshake),
    /// dropping what comes before it.
    async fn close(&mut self) {
        let deadline = Instant::now() + LINGER;
        if !matches!(timeout_at(deadline, self.ws.close(None)).await, Ok(Ok(()))) {
            return;
        }
        let mut left = LINGER_BYTES;
        while let Ok(Some(Ok(msg))) = timeout_at(deadline, self.ws.next()).await {
            left = left.saturating_sub(msg.len());
            if left == 0 {
                break;
            }
        }
    }
}
