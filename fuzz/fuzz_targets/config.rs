//! The config file: TOML from the operator (or a half-written file).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = edgesync::config::Config::parse(std::path::Path::new("/nonexistent/config.toml"), text);
});
