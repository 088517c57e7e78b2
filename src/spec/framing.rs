//! The secure engine's framing, defined once for the engine (src/secure: `wire`, `noise`,
//! `link`) and for the bytes cost model ([`super::cost`]), which sits below the engine.

/// A frame's header: magic, version, kind, tag, sequence number, payload length.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest encrypted record on the wire (the Noise message limit).
pub const MAX_RECORD: usize = 65535;
/// A record's authentication tag (ChaCha20-Poly1305).
pub const RECORD_TAG_LEN: usize = 16;
/// A record's length prefix.
pub const RECORD_LEN_PREFIX: usize = 2;
/// Largest plaintext of one record.
pub const MAX_PLAIN: usize = MAX_RECORD - RECORD_TAG_LEN;
/// Bytes a record adds to its plaintext.
pub const RECORD_OVERHEAD: usize = RECORD_LEN_PREFIX + RECORD_TAG_LEN;
