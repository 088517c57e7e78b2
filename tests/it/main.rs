//! The integration tests, one binary: each file was a test binary of its own, and linking
//! tch and brelu fourteen times dominated `make test` on small machines.
mod common;

mod accumulate;
mod aux_head;
mod avg_pool;
mod block_relu;
mod data;
mod dist;
mod distortion;
mod knapsack;
mod large_runs;
mod layers;
mod methods;
mod models;
mod onnx;
mod pipeline;
mod secure;
mod secure_attacks;
mod secure_links;
mod secure_parties;
mod seg_data;
mod seg_pipeline;
mod segmentation_models;
mod sites;
mod spec;
mod train;
mod train_cli;
