//! Block-ReLU specs: per-channel options, patch-size catalogs, spec files and costs.
pub mod catalog;
pub mod cost;
pub mod file;
pub mod framing;
pub mod option;
pub mod pickle;
pub mod published;
pub mod site;

pub use catalog::Catalog;
pub use cost::{engine_framing_bound, spec_cost, CostModel, SiteCost, SpecCost};
pub use file::Spec;
pub use option::PatchOption;
pub use published::import_published;
pub use site::SiteInfo;
