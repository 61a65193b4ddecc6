//! An MQTT trigger payload (also the body of /hooks/generic).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgesync::fuzzing::change_message(data);
});
