//! A webhook delivery: the first byte picks the provider, then `name: value` header lines up to
//! an empty line, then the body. Signature checks and payload parsing must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgesync::fuzzing::webhook(data);
});
