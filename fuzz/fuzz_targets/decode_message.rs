//! Feeds arbitrary bytes to the message decoder. It must never panic, and whatever it accepts must
//! encode again and decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(message) = lsync_protocol::decode(bytes) {
        let encoded = lsync_protocol::encode(&message).expect("a decoded message re-encodes");
        let again = lsync_protocol::decode(&encoded).expect("a re-encoded message decodes");
        assert_eq!(again, message);
    }
});
