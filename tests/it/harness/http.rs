//! A minimal HTTP/1.1 client over a raw socket: enough to send webhook deliveries exactly as
//! a Git host does (any headers, any body size) and to read `/metrics`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Reply {
    pub status: u16,
    pub body: String,
}

pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Reply {
    // Not listening (yet): status 0, so callers can wait for the server.
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return Reply {
            status: 0,
            body: String::new(),
        };
    };
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    // The server may answer (413, 429) and close before reading a large body.
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Reply { status, body }
}

/// The value of one sample in the agent's `/metrics`, 0 if absent.
pub async fn metric(port: u16, sample: &str) -> f64 {
    let reply = request(port, "GET", "/metrics", &[], b"").await;
    reply
        .body
        .lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}
