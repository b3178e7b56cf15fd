//! Framing: every message on a QUIC stream is a 4-byte big-endian length followed by that many
//! bytes of [`lsync_protocol::encode`] output.
//!
//! [`FrameDecoder`] is sans-IO: the caller feeds it whatever bytes the stream produced, in chunks
//! of any size, and gets back whole frames. It holds at most one unfinished frame, checks a
//! frame's declared length against [`MAX_MESSAGE_BYTES`] before accepting a single byte of its
//! body, and grows the body buffer only as bytes arrive, so a peer that announces a large frame
//! and then sends nothing costs almost no memory.

use lsync_protocol::{EncodeError, MAX_MESSAGE_BYTES, Message};

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// The largest buffer reserved ahead of the bytes that fill it: 64 KiB, about one QUIC read. A
/// body larger than this grows as its bytes arrive instead of being reserved from the declared
/// length, which the peer controls.
const MAX_RESERVE_AHEAD: usize = 64 * 1024;

/// Why a byte stream is not a valid sequence of frames. After an error the decoder refuses all
/// further input: the stream has lost its frame boundaries and must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame declared a body longer than the limit; refused before reading the body.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The declared length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A frame declared an empty body, which no message encodes to.
    #[error("empty frame")]
    Empty,
    /// The stream ended in the middle of a frame.
    #[error("stream ended {received} bytes into a {expected}-byte frame")]
    Truncated {
        /// Bytes of the unfinished frame (header included) received.
        received: usize,
        /// Bytes the frame needed (header included; only the header while it is incomplete).
        expected: usize,
    },
    /// The decoder already failed; the stream must be closed.
    #[error("the stream already broke the framing rules")]
    Poisoned,
}

/// Encodes `message` as one frame: its length as a big-endian `u32`, then its bytes.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut frame = vec![0; FRAME_HEADER_BYTES];
    lsync_protocol::encode_into(message, &mut frame)?;
    // `encode_into` refuses anything above MAX_MESSAGE_BYTES (8 MiB), which fits in a u32.
    let len =
        u32::try_from(frame.len() - FRAME_HEADER_BYTES).map_err(|_| EncodeError::TooLarge {
            kind: message.name(),
            len: frame.len() - FRAME_HEADER_BYTES,
            max: MAX_MESSAGE_BYTES,
        })?;
    frame[..FRAME_HEADER_BYTES].copy_from_slice(&len.to_be_bytes());
    Ok(frame)
}

/// Splits a byte stream into frame bodies. See the module docs.
///
/// Call [`FrameDecoder::decode`] with each chunk the stream produced until the chunk is consumed,
/// handling each frame it returns before asking for the next; call [`FrameDecoder::finish`] when
/// the stream ends.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Reading the length prefix; `filled` bytes of `header` are valid.
    Header { header: [u8; FRAME_HEADER_BYTES], filled: usize },
    /// Reading a body of `len` bytes.
    Body { body: Vec<u8>, len: usize },
    /// A rule was broken; nothing more is accepted.
    Failed,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_MESSAGE_BYTES)
    }
}

impl FrameDecoder {
    /// A decoder refusing bodies over `max_frame` bytes (the protocol's limit is
    /// [`MAX_MESSAGE_BYTES`], which [`FrameDecoder::default`] uses).
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame, state: State::Header { header: [0; FRAME_HEADER_BYTES], filled: 0 } }
    }

    /// Consumes bytes from the front of `input`, stopping at the end of the first frame it
    /// completes, and returns that frame's body. Returns `Ok(None)` once `input` is empty without
    /// a frame completing. Bytes after a completed frame stay in `input` for the next call, so the
    /// decoder never holds more than one frame.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        loop {
            match &mut self.state {
                State::Failed => return Err(FrameError::Poisoned),
                State::Header { header, filled } => {
                    let take = (FRAME_HEADER_BYTES - *filled).min(input.len());
                    header[*filled..*filled + take].copy_from_slice(&input[..take]);
                    *filled += take;
                    *input = &input[take..];
                    if *filled < FRAME_HEADER_BYTES {
                        return Ok(None);
                    }
                    let declared = u32::from_be_bytes(*header);
                    let len = match usize::try_from(declared) {
                        Ok(0) => return self.fail(FrameError::Empty),
                        Ok(len) if len <= self.max_frame => len,
                        _ => {
                            return self.fail(FrameError::TooLarge {
                                len: u64::from(declared),
                                max: self.max_frame,
                            });
                        }
                    };
                    self.state =
                        State::Body { body: Vec::with_capacity(len.min(MAX_RESERVE_AHEAD)), len };
                }
                State::Body { body, len } => {
                    let take = (*len - body.len()).min(input.len());
                    body.extend_from_slice(&input[..take]);
                    *input = &input[take..];
                    if body.len() < *len {
                        return Ok(None);
                    }
                    let State::Body { body, .. } = std::mem::replace(
                        &mut self.state,
                        State::Header { header: [0; FRAME_HEADER_BYTES], filled: 0 },
                    ) else {
                        // The match arm above established that the state is a body.
                        return self.fail(FrameError::Poisoned);
                    };
                    return Ok(Some(body));
                }
            }
        }
    }

    /// Checks that the stream ended on a frame boundary.
    pub fn finish(&self) -> Result<(), FrameError> {
        match &self.state {
            State::Header { filled: 0, .. } => Ok(()),
            State::Header { filled, .. } => {
                Err(FrameError::Truncated { received: *filled, expected: FRAME_HEADER_BYTES })
            }
            State::Body { body, len } => Err(FrameError::Truncated {
                received: FRAME_HEADER_BYTES + body.len(),
                expected: FRAME_HEADER_BYTES + len,
            }),
            State::Failed => Err(FrameError::Poisoned),
        }
    }

    /// Whether the decoder sits between frames (nothing of a next frame received yet).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Header { filled: 0, .. })
    }

    fn fail<T>(&mut self, error: FrameError) -> Result<T, FrameError> {
        self.state = State::Failed;
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use lsync_protocol::{Heartbeat, decode};
    use proptest::prelude::*;

    use super::*;

    fn heartbeat(nonce: u64) -> Message {
        Message::Heartbeat(Heartbeat { nonce, watermarks: None })
    }

    /// Feeds `chunks` in order and returns every frame body, or the first error.
    fn decode_chunks(
        decoder: &mut FrameDecoder,
        chunks: &[&[u8]],
    ) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut frames = Vec::new();
        for chunk in chunks {
            let mut input = *chunk;
            while !input.is_empty() {
                if let Some(frame) = decoder.decode(&mut input)? {
                    frames.push(frame);
                }
            }
        }
        Ok(frames)
    }

    #[test]
    fn a_frame_round_trips() {
        let frame = encode_frame(&heartbeat(7)).unwrap();
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap());
        assert_eq!(len as usize, frame.len() - 4);
        let mut decoder = FrameDecoder::default();
        let frames = decode_chunks(&mut decoder, &[&frame]).unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(decode(&frames[0]).unwrap(), heartbeat(7));
        assert!(decoder.finish().is_ok());
    }

    #[test]
    fn decode_stops_at_the_end_of_a_frame() {
        let mut stream = encode_frame(&heartbeat(1)).unwrap();
        let first_len = stream.len();
        stream.extend(encode_frame(&heartbeat(2)).unwrap());
        let mut decoder = FrameDecoder::default();
        let mut input = &stream[..];
        let first = decoder.decode(&mut input).unwrap().unwrap();
        assert_eq!(decode(&first).unwrap(), heartbeat(1));
        assert_eq!(input.len(), stream.len() - first_len, "the second frame stays unread");
        let second = decoder.decode(&mut input).unwrap().unwrap();
        assert_eq!(decode(&second).unwrap(), heartbeat(2));
        assert!(input.is_empty());
    }

    #[test]
    fn an_oversized_length_is_refused_before_the_body() {
        let mut decoder = FrameDecoder::default();
        let too_long = u32::try_from(MAX_MESSAGE_BYTES + 1).unwrap().to_be_bytes();
        let mut input = &too_long[..];
        assert_eq!(
            decoder.decode(&mut input),
            Err(FrameError::TooLarge { len: MAX_MESSAGE_BYTES as u64 + 1, max: MAX_MESSAGE_BYTES })
        );
        // Poisoned from then on, whatever follows.
        let mut more = &[1, 2, 3][..];
        assert_eq!(decoder.decode(&mut more), Err(FrameError::Poisoned));
        assert_eq!(decoder.finish(), Err(FrameError::Poisoned));
    }

    #[test]
    fn the_largest_length_is_refused() {
        let mut decoder = FrameDecoder::default();
        let mut input = &[0xff, 0xff, 0xff, 0xff][..];
        assert!(matches!(
            decoder.decode(&mut input),
            Err(FrameError::TooLarge { len: 0xffff_ffff, .. })
        ));
    }

    #[test]
    fn an_empty_frame_is_refused() {
        let mut decoder = FrameDecoder::default();
        let mut input = &[0, 0, 0, 0][..];
        assert_eq!(decoder.decode(&mut input), Err(FrameError::Empty));
    }

    #[test]
    fn a_truncated_stream_is_reported() {
        let frame = encode_frame(&heartbeat(3)).unwrap();
        let mut decoder = FrameDecoder::default();
        assert!(decode_chunks(&mut decoder, &[&frame[..2]]).unwrap().is_empty());
        assert_eq!(decoder.finish(), Err(FrameError::Truncated { received: 2, expected: 4 }));
        let mut decoder = FrameDecoder::default();
        assert!(decode_chunks(&mut decoder, &[&frame[..frame.len() - 1]]).unwrap().is_empty());
        assert_eq!(
            decoder.finish(),
            Err(FrameError::Truncated { received: frame.len() - 1, expected: frame.len() })
        );
    }

    #[test]
    fn an_announced_body_is_not_reserved_up_front() {
        let mut decoder = FrameDecoder::default();
        let header = u32::try_from(MAX_MESSAGE_BYTES).unwrap().to_be_bytes();
        let mut input = &header[..];
        assert_eq!(decoder.decode(&mut input), Ok(None));
        match &decoder.state {
            State::Body { body, len } => {
                assert_eq!(*len, MAX_MESSAGE_BYTES);
                assert!(body.capacity() <= MAX_RESERVE_AHEAD);
            }
            other => panic!("expected a body, got {other:?}"),
        }
    }

    fn messages() -> impl Strategy<Value = Vec<Message>> {
        prop::collection::vec(any::<u64>().prop_map(heartbeat), 0..20)
    }

    proptest! {
        /// However a valid stream is cut into chunks, the same frames come out.
        #[test]
        fn arbitrary_chunking_yields_the_same_frames(
            messages in messages(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let stream: Vec<u8> = messages
                .iter()
                .flat_map(|message| encode_frame(message).unwrap())
                .collect();
            let mut positions: Vec<usize> = cuts.iter().map(|cut| cut.index(stream.len() + 1)).collect();
            positions.push(0);
            positions.push(stream.len());
            positions.sort_unstable();
            let chunks: Vec<&[u8]> = positions.windows(2).map(|pair| &stream[pair[0]..pair[1]]).collect();
            let mut decoder = FrameDecoder::default();
            let frames = decode_chunks(&mut decoder, &chunks).unwrap();
            let decoded: Vec<Message> = frames.iter().map(|frame| decode(frame).unwrap()).collect();
            prop_assert_eq!(decoded, messages);
            prop_assert!(decoder.finish().is_ok());
        }

        /// A declared length above the limit is refused as soon as the header is complete, whatever
        /// precedes it and however the header is split.
        #[test]
        fn hostile_lengths_are_refused(
            valid in messages(),
            len in (u32::try_from(MAX_MESSAGE_BYTES).unwrap() + 1)..=u32::MAX,
            split in 0usize..=4,
        ) {
            let mut stream: Vec<u8> = valid.iter().flat_map(|message| encode_frame(message).unwrap()).collect();
            let prefix_len = stream.len();
            stream.extend(len.to_be_bytes());
            stream.extend([0u8; 16]);
            let header_end = prefix_len + 4;
            let cut = prefix_len + split;
            let mut decoder = FrameDecoder::default();
            let result = decode_chunks(&mut decoder, &[&stream[..cut], &stream[cut..header_end], &stream[header_end..]]);
            prop_assert_eq!(result, Err(FrameError::TooLarge { len: u64::from(len), max: MAX_MESSAGE_BYTES }));
        }

        /// Arbitrary bytes never panic the decoder, and every frame it yields respects the limit.
        #[test]
        fn arbitrary_bytes_are_handled(bytes in prop::collection::vec(any::<u8>(), 0..256), max in 1usize..64) {
            let mut decoder = FrameDecoder::new(max);
            let mut input = &bytes[..];
            while !input.is_empty() {
                match decoder.decode(&mut input) {
                    Ok(Some(frame)) => prop_assert!(!frame.is_empty() && frame.len() <= max),
                    Ok(None) => {}
                    Err(_) => break,
                }
            }
        }
    }
}
