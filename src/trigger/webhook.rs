//! Git webhook receiver (axum).
