//! The config file: TOML from the operator (or a half-written file).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgesync::fuzzing::config(data);
});
