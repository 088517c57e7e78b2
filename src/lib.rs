//! brelu: block-ReLU networks for cheap secure multi-party inference.
//!
//! In secure inference every ReLU costs a secure sign test (a DReLU); block ReLU lets one
//! DReLU decide a whole patch of a channel. Data flows one way:
//!
//! ```text
//! models (graph + sites) --> distortion tables --> knapsack --> spec --> fine-tune / secure
//!        \______ ops (block ReLU kernels) _______/                 ^
//!                                                 spec (options, catalogs, costs)
//! ```
//!
//! Modules: [`spec`] (options, catalogs, spec files, cost model), [`models`] (architectures
//! as op graphs with named ReLU sites, weights), [`ops`] (block-ReLU operators),
//! [`distortion`] (distortion tables), [`knapsack`] (exact and Lagrangian solvers, reports),
//! [`npy`] (the table file format), [`data`] (data sets, augmentation, batches),
//! [`train`] (configuration, training, evaluation, checkpoints), [`secure`] (3-party secure
//! inference on secret shares), [`pipeline`] (every stage in one resumable run with a report), [`cli`] (the `brelu` command).
pub mod cli;
pub mod data;
pub mod distortion;
pub mod error;
pub mod hash;
pub mod knapsack;
pub mod models;
pub mod npy;
pub mod ops;
pub mod pipeline;
pub mod plot;
pub mod secure;
pub mod spec;
pub mod train;

pub use error::{Error, Result};
