//! A webhook delivery: the first byte picks the provider, then `name: value` header lines up to
//! an empty line, then the body. Signature checks and payload parsing must never panic.
#![no_main]
use edgesync::trigger::webhook::{sign, Provider};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let provider = ["github", "gitlab", "gitea", "bitbucket", "generic"][usize::from(pick) % 5];
    let Some(provider) = Provider::from_path(provider) else { return };
    let split = rest.windows(2).position(|w| w == b"\n\n").unwrap_or(rest.len());
    let (head, body) = rest.split_at(split);
    let body = body.get(2..).unwrap_or_default();
    let mut headers = http::HeaderMap::new();
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (name, value) = line.split_at(colon);
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value[1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let _ = provider.verify(&headers, body, b"secret", 1_700_000_000);
    let _ = provider.delivery_id(&headers);
    let _ = provider.parse(&headers, body);
    let _ = sign(b"secret", body);
});
