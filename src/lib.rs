//! brelu: block-ReLU networks for cheap secure inference.
pub mod error;
pub mod ops;
pub mod spec;
