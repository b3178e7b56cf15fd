//! Frames over quinn streams, and the error codes lsync puts in QUIC close and reset frames.

use lsync_protocol::{DecodeError, MAX_MESSAGE_BYTES, Message};
use quinn::{ReadError, RecvStream, VarInt};

use crate::frame::{FrameDecoder, FrameError};

/// Application error codes in QUIC `CONNECTION_CLOSE` frames. The reason text says more.
pub(crate) mod close {
    use quinn::VarInt;

    /// The device is shutting down.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(1);
    /// The peer was unpaired.
    pub(crate) const UNPAIRED: VarInt = VarInt::from_u32(2);
    /// No heartbeat was answered within the stale timeout.
    pub(crate) const STALE: VarInt = VarInt::from_u32(3);
    /// Another connection to the same peer is kept instead.
    pub(crate) const DUPLICATE: VarInt = VarInt::from_u32(4);
    /// The `Hello` named another library.
    pub(crate) const WRONG_LIBRARY: VarInt = VarInt::from_u32(5);
    /// The peer broke the connection protocol (no `Hello` first, wrong device id, ...).
    pub(crate) const PROTOCOL: VarInt = VarInt::from_u32(6);
    /// The certificate is not paired.
    pub(crate) const UNKNOWN_DEVICE: VarInt = VarInt::from_u32(7);
    /// The pairing exchange is over.
    pub(crate) const PAIRING_DONE: VarInt = VarInt::from_u32(8);
}

/// Application error codes in QUIC `RESET_STREAM` and `STOP_SENDING` frames.
pub(crate) mod reset {
    use quinn::VarInt;

    /// The responder dropped the request without answering.
    pub(crate) const NO_RESPONSE: VarInt = VarInt::from_u32(1);
    /// The stream broke the framing rules or carried an undecodable or forbidden message.
    pub(crate) const PROTOCOL: VarInt = VarInt::from_u32(2);
    /// The receiving side is going away.
    pub(crate) const GOING_AWAY: VarInt = VarInt::from_u32(3);
}

/// Bytes read from the stream at a time: 16 KiB, about a dozen QUIC packets. Only this much is
/// held beyond the frame being decoded.
const READ_BYTES: usize = 16 * 1024;

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadFrameError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// Reads frames from a QUIC receive stream through a [`FrameDecoder`].
pub(crate) struct FrameReader {
    stream: RecvStream,
    decoder: FrameDecoder,
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

impl FrameReader {
    pub(crate) fn new(stream: RecvStream) -> Self {
        Self {
            stream,
            decoder: FrameDecoder::new(MAX_MESSAGE_BYTES),
            buffer: vec![0; READ_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The next frame's body; `None` when the stream ended cleanly between frames.
    pub(crate) async fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ReadFrameError> {
        loop {
            if self.start == self.end {
                match self.stream.read(&mut self.buffer).await? {
                    Some(read) => {
                        self.start = 0;
                        self.end = read;
                    }
                    None => {
                        self.decoder.finish()?;
                        return Ok(None);
                    }
                }
            }
            let mut input = &self.buffer[self.start..self.end];
            let frame = self.decoder.decode(&mut input)?;
            self.start = self.end - input.len();
            if frame.is_some() {
                return Ok(frame);
            }
        }
    }

    /// Asks the peer to stop sending on this stream.
    pub(crate) fn stop(&mut self, code: VarInt) {
        // Fails only if the stream is already finished or stopped, which is what we want anyway.
        let _ = self.stream.stop(code);
    }
}

/// A frame read and decoded, or why not.
pub(crate) enum Incoming {
    /// A valid message.
    Message(Message),
    /// The stream ended cleanly.
    End,
    /// A well-framed message of a kind this version does not know: answerable, the stream stays
    /// usable.
    UnknownKind(DecodeError),
    /// The frame or message is broken: the stream must be closed.
    Broken(String),
    /// The connection or stream failed underneath.
    Failed(ReadError),
}

impl FrameReader {
    /// Reads and decodes the next message.
    pub(crate) async fn next_message(&mut self) -> Incoming {
        match self.next_frame().await {
            Ok(Some(body)) => match lsync_protocol::decode(&body) {
                Ok(message) => Incoming::Message(message),
                Err(error @ DecodeError::UnknownKind(_)) => Incoming::UnknownKind(error),
                Err(error) => Incoming::Broken(error.to_string()),
            },
            Ok(None) => Incoming::End,
            Err(ReadFrameError::Frame(error)) => Incoming::Broken(error.to_string()),
            Err(ReadFrameError::Read(error)) => Incoming::Failed(error),
        }
    }
}
