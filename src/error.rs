//! Crate error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),

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
