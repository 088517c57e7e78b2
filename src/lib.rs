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
//! Modules, in stage order: a module uses only modules of earlier stages (checked by
//! `tests/it/layers.rs`).
//!
//! 1. Utilities: [`error`] (the typed error), [`fs`] (atomic writes), [`hash`] (fingerprints),
//!    [`npy`] (the table file format), [`plot`], [`progress`] (bars on a terminal, lines in a
//!    log), [`stats`] (paired differences with confidence intervals).
//! 2. [`spec`]: options, catalogs, spec files, cost model.
//! 3. [`ops`]: block-ReLU operators, device selection; [`dist`]: data-parallel process groups
//!    (PyTorch's c10d through a C++ shim), launcher variables, sharding, gradient buckets.
//! 4. [`models`]: architectures as op graphs with named ReLU sites, weights.
//! 5. [`data`]: data sets, their configuration, normalisation, augmentation, batches.
//! 6. [`train`]: training configuration, training, evaluation, checkpoints;
//!    [`experiment`]: one description of a run (network, data, weights, spec, device) that
//!    every command and stage builds its model and test images from.
//! 7. [`distortion`]: distortion extraction and tables.
//! 8. [`knapsack`]: exact and Lagrangian solvers, reports, the uniform baselines, estimator
//!    comparison.
//! 9. [`secure`]: 3-party secure inference on secret shares.
//! 10. [`pipeline`]: every stage in one resumable run with a report.
//! 11. [`cli`]: the `brelu` command.
pub mod cli;
pub mod data;
pub mod dist;
pub mod distortion;
pub mod error;
pub mod experiment;
pub mod fs;
pub mod hash;
pub mod knapsack;
pub mod models;
pub mod npy;
pub mod ops;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod secure;
pub mod spec;
pub mod stats;
pub mod train;

pub use error::{Error, Result};
