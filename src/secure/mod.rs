//! Three-party secure inference (SPEC.md 8): a client holding an image, a server holding the
//! weights and a dealer producing correlated randomness run a block-ReLU network on additive
//! secret shares in Z_2^64 and the client learns only the logits (or only the arg-max).
//!
//! Map: [`ring`] (fixed point, truncation, Z_67), [`gemm`] (wrapping integer GEMM and
//! convolution), [`plan`] (the public layer list, the server's weights and the plaintext
//! fixed-point oracle), [`keys`] (X25519 + ChaCha20 PRFs), [`wire`] (frame codec), [`link`]
//! (TCP links with timeouts and counters), [`party`] (handshake and per-layer counters),
//! [`proto`] (the protocols), [`engine`] (walks the network; all three parties on loopback).
//!
//! Security model: semi-honest parties, the dealer does not collude with client or server.
//! Not hidden: the architecture, the spec and the input size (all parties know them).
pub mod engine;
pub mod gemm;
pub mod keys;
pub mod link;
pub mod party;
pub mod plan;
pub mod proto;
pub mod report;
pub mod ring;
pub mod wire;

pub use engine::{run_local, run_party, ClientInput, ImageRun, PartyRun};
pub use link::LinkConfig;
pub use party::Role;
pub use plan::{forward_fixed, Plan, Settings, Weights};
pub use report::{run_compare, RunReport};
