//! Block-ReLU specs: per-channel options, patch-size catalogs, spec files and costs.
pub mod option;
pub use option::PatchOption;
