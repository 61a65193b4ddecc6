//! An MQTT trigger payload (also the body of /hooks/generic).
#![no_main]
use edgesync::trigger::{ChangeMessage, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = ChangeMessage::parse(data) {
        let _ = message.into_event(Source::Mqtt, false);
    }
});
