//! The crate's error type. Variants name what failed (file, field, tensor, site) so the CLI
//! can print one sentence a user can act on.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- files ----
    /// Reading or writing a file failed. The OS error is part of the message and not also a
    /// `source`: the CLI prints the whole chain, which would repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file is not valid JSON/TOML or lacks a required field.
    #[error("{path}: {msg}")]
    Parse { path: PathBuf, msg: String },

    // ---- models and weights ----
    /// No architecture of that name in the registry.
    #[error("unknown model '{name}' (known: {known})")]
    UnknownModel { name: String, known: String },
    /// The network cannot take this input shape.
    #[error("shape error at {op}: {msg}")]
    Shape { op: String, msg: String },
    /// A weight file lacks a tensor, has a wrongly shaped one, or one the model does not know.
    #[error("{path}: tensor '{tensor}': {msg}")]
    Weights {
        path: PathBuf,
        tensor: String,
        msg: String,
    },

    /// An ONNX file brelu cannot import: unreadable, or a node with an operator, attribute or
    /// input it does not support.
    #[error("{path}: node '{node}': {msg}")]
    Onnx {
        path: PathBuf,
        node: String,
        msg: String,
    },

    // ---- specs ----
    /// A spec does not match the model (unknown site, channel count, patch too large, ...).
    #[error("{path}: {msg}")]
    Spec { path: PathBuf, msg: String },
    /// A patch-size catalog entry is invalid.
    #[error("catalog: {0}")]
    Catalog(String),

    // ---- data and training ----
    /// A data set file is missing, truncated or not in the expected format.
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    /// A configuration field has a bad value.
    #[error("{path}: field '{field}': {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// A requested feature exists in the configuration format but is not implemented yet.
    #[error("not implemented yet: {0}")]
    NotImplemented(String),

    // ---- distributed runs ----
    /// Joining the process group or a collective failed: a bad launcher variable, an
    /// unreachable rank 0, a rank that died or timed out, ranks that diverged.
    #[error("distributed: {0}")]
    Dist(String),

    // ---- usage ----
    /// An argument or configuration value is out of range.
    #[error("{0}")]
    InvalidArgument(String),

    /// A plot could not be drawn (e.g. no font).
    #[error("plot {path}: {msg}")]
    Plot { path: PathBuf, msg: String },

    // ---- secure inference ----
    /// The connection to a peer failed: refused, closed, reset.
    #[error("secure: link to {peer}: {msg}")]
    Link { peer: String, msg: String },
    /// A peer sent nothing within the timeout (a stalled or dead party).
    #[error("secure: {peer} sent nothing for {secs} s (timeout)")]
    Timeout { peer: String, secs: f64 },
    /// A frame from a peer is malformed: bad magic or version, unexpected type, tag or
    /// sequence number, wrong or oversize length.
    #[error("secure: malformed frame from {peer}: {msg}")]
    Malformed { peer: String, msg: String },
    /// A connection did not authenticate as the party it claimed to be (unknown key, role not
    /// expected, duplicate role, not a brelu handshake); nothing was sent to it.
    #[error("secure: refused {peer}: {msg}")]
    Refused { peer: String, msg: String },
    /// Data from an authenticated peer failed its integrity check: tampered, replayed,
    /// reordered or dropped on the way.
    #[error("secure: data from {peer} failed authentication (tampered, replayed, reordered or dropped on the way); session ended")]
    Tampered { peer: String },
    /// A peer runs a different model, spec or protocol setting (hash of all of them).
    #[error(
        "secure: {peer} runs a different model/spec/settings or policy (such as the server's --argmax-only; its hash {theirs}, ours {ours})"
    )]
    SessionMismatch {
        peer: String,
        ours: String,
        theirs: String,
    },
    /// An authenticated link that belongs to another session (its session id or handshake
    /// transcript differs): links of two sessions combined by a relay, or a peer of another
    /// run.
    #[error("secure: {peer} belongs to another session: {msg}; session ended (links of two sessions combined by a relay, or a peer of another run)")]
    OtherSession { peer: String, msg: String },

    // ---- backends ----
    /// libtorch failed. Like `Io`, the cause is in the message rather than a `source`.
    #[error("torch: {0}")]
    Torch(tch::TchError),

    // --- block-ReLU operators (src/ops) ---
    /// A buffer or tensor does not have the size/shape the operator needs.
    #[error("{op}: {what} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        op: &'static str,
        what: &'static str,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A per-channel option (or perturbation) cannot be run, e.g. a 0 x 2 patch.
    #[error("{op}: channel {channel}: {reason}")]
    BadOption {
        op: &'static str,
        channel: usize,
        reason: String,
    },
    /// The tensor's dtype, layout or device is not one this implementation handles.
    #[error("{op}: unsupported tensor: {reason}")]
    UnsupportedTensor { op: &'static str, reason: String },
    /// A CUDA tensor was given but the crate was built without the `cuda` feature.
    #[error("{op}: tensor is on CUDA but brelu was built without the `cuda` feature")]
    CudaNotCompiled { op: &'static str },
    /// The CUDA driver reported an error while loading or launching a kernel.
    #[error("{op}: CUDA driver: {message}")]
    Cuda { op: &'static str, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e)
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }

    pub fn parse(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Parse {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn spec(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Spec {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
