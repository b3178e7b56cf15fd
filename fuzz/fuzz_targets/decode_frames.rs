//! Feeds arbitrary bytes to the transport's frame decoder, cut into chunks at positions the input
//! itself chooses. It must never panic, never yield a frame above the limit, and yield the same
//! frames (or fail at the same frame) however the bytes are chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lsync_transport::frame::{FrameDecoder, FrameError};

/// Decodes `chunks` in order; returns the frames and the error, if any.
fn run(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut decoder = FrameDecoder::default();
    let mut frames = Vec::new();
    for chunk in chunks {
        let mut input = *chunk;
        while !input.is_empty() {
            match decoder.decode(&mut input) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty() && frame.len() <= lsync_protocol::MAX_MESSAGE_BYTES);
                    // Whatever the frame holds, decoding it must not panic either.
                    let _ = lsync_protocol::decode(&frame);
                    frames.push(frame);
                }
                Ok(None) => {}
                Err(error) => return (frames, Some(error)),
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let whole = run(&[bytes]);
    let step = usize::from(step).max(1);
    let chunks: Vec<&[u8]> = bytes.chunks(step).collect();
    assert_eq!(run(&chunks), whole);
});
