//! Three-party secure inference (docs/method.md 8): a client holding an image, a server holding the
//! weights and a dealer producing correlated randomness run a block-ReLU network on additive
//! secret shares in Z_2^64 and the client learns only the logits (or only the arg-max).
//!
//! Map: [`ring`] (fixed point, truncation, Z_67), [`gemm`] (wrapping integer GEMM and
//! convolution), [`plan`] (the public layer list, the server's weights and the plaintext
//! fixed-point oracle), [`keys`] (X25519 + ChaCha20 PRFs), [`noise`] (static keys, the Noise KK
//! handshake and AEAD records), [`wire`] (frame codec), [`link`] (framed, encrypted links with
//! deadlines and counters), [`ahead`] (how far the dealer's offline thread runs ahead),
//! [`party`] (joining a session and per-layer counters), [`proto`] (the protocols),
//! [`engine`] (walks the network; all three parties on loopback), [`fuzz`] (the receive side
//! under hostile input).
//!
//! Security model: semi-honest parties, the dealer does not collude with client or server;
//! each party is authenticated by its pinned static key and the links are encrypted, so a
//! network attacker or a fourth process learns nothing and cannot take a role. Not hidden: the
//! architecture, the spec and the input size (all parties know them).
//!
//! Design notes:
//! - Why PRFs: one party's share of every correlated value (Beaver triples, masks, bit
//!   shares) is drawn from the stream it shares with the dealer, so the dealer only ever
//!   sends the client's half; client and server draw their common randomness (comparison
//!   masks, permutations) from their own pairwise stream without any message.
//! - Why truncation is local: after each fixed-point product each party shifts its own share
//!   (SecureML); the result is off by at most one unit in the last place, or wrong with
//!   probability about |x| / 2^64 (measured in `ring::tests`), which costs no communication.
//! - Why F is opened once: the server's weights W and their mask B are the same for every
//!   image, so F = W - B is sent at session start; each image pays only for E = X - A.
//! - DReLU computes [x > 0] as MSB(-x) (MSB extraction with one PrivateCompare), so the tie
//!   rule of docs/method.md 2 (a patch summing to 0 gets 0) holds exactly; the published
//!   ShareConvert protocol (MSB(-2x)) remains as an option.
//!
//! - Offline / online: for each image the dealer's offline thread walks the network sending
//!   input-independent correlated randomness (triple corrections, DReLU masks and bit shares;
//!   drawn from a second PRF stream per pair so the order of draws does not depend on the
//!   online part), a bounded number of DReLU batches ahead of its online part, which serves
//!   the comparisons as client and server reach them. The receiver keeps offline frames that
//!   arrive early until they are asked for.
//!
//! Limitations: truncation errors make secure logits differ from the
//! plaintext fixed-point pass by a few ulps, and a block-ReLU patch whose sum lies within
//! those ulps of zero may decide differently; the approximate DReLU (`drelu_bits` < 64) is
//! only correct for values inside its window.
pub mod ahead;
pub mod budget;
pub mod conn;
pub mod engine;
pub mod fuzz;
pub mod gemm;
pub mod join;
pub mod keys;
pub mod link;
pub mod noise;
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
