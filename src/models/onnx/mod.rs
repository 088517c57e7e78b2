//! Bring your own model: a network exported from PyTorch (or anything else that writes standard
//! ONNX) becomes an architecture of the zoo under the name `onnx:PATH`, with its ReLUs as sites
//! named after the module paths the exporter records (`layer1.0.relu`, `layer1.0.relu_1`) and
//! its weights as the starting parameters. Nothing downstream (distortion, knapsack, training,
//! secure inference) knows the difference. [`export`] writes a brelu network, block ReLUs
//! included, back to ONNX.
mod consts;
pub mod export;
mod import;
mod layers;
pub mod proto;

pub use import::module_path;

use super::{ArchConfig, Architecture, GraphBuilder, Op, Param, Slot};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Mutex;

/// The prefix of an imported model's name.
pub const PREFIX: &str = "onnx:";

/// A network imported from an ONNX file.
#[derive(Debug)]
pub struct OnnxModel {
    name: &'static str,
    imported: import::Imported,
}

impl OnnxModel {
    /// How many Clip(0, 6) (ReLU6) nodes became ordinary ReLU sites.
    pub fn relu6_sites(&self) -> usize {
        self.imported.relu6
    }
}

impl Architecture for OnnxModel {
    fn name(&self) -> &'static str {
        self.name
    }

    fn summary(&self) -> &'static str {
        "a network imported from an ONNX file (fixed input size)"
    }

    fn default_input(&self) -> [usize; 3] {
        self.imported.input
    }

    fn default_classes(&self) -> usize {
        self.imported.classes
    }

    fn build(&self, g: &mut GraphBuilder, _cfg: &ArchConfig) -> Slot {
        let graph = &self.imported.graph;
        for op in &graph.ops {
            let y = match op {
                Op::Act { x, site, .. } => g.act(*x, &graph.sites[*site]),
                other => g.op(|_| other.clone()),
            };
            debug_assert_eq!(y, op.output(), "replayed slots match the import");
        }
        graph.output
    }

    fn mmlab_name(&self, _name: &str) -> Option<String> {
        None
    }

    fn check_config(&self, cfg: &ArchConfig) -> Result<()> {
        if cfg.input != self.imported.input || cfg.num_classes != self.imported.classes {
            return Err(Error::InvalidArgument(format!(
                "{} was exported for input {:?} with {} classes; the configuration asks for \
                 {:?} with {} (export the model again at that size)",
                self.name, self.imported.input, self.imported.classes, cfg.input, cfg.num_classes
            )));
        }
        Ok(())
    }

    fn pretrained(&self) -> &[Param] {
        &self.imported.params
    }
}

/// Models imported so far in this process, so that every stage sees one instance per file.
static LOADED: Mutex<Vec<&'static OnnxModel>> = Mutex::new(Vec::new());

/// The architecture named `onnx:PATH`, importing the file the first time.
pub fn load(name: &str) -> Result<&'static OnnxModel> {
    let path = name
        .strip_prefix(PREFIX)
        .ok_or_else(|| Error::InvalidArgument(format!("'{name}' does not start with {PREFIX}")))?;
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = loaded.iter().find(|m| m.name == name) {
        return Ok(m);
    }
    let imported = import::import_file(Path::new(path))?;
    // Leaked once per file and process: architectures are `&'static` everywhere else.
    let model: &'static OnnxModel = Box::leak(Box::new(OnnxModel {
        name: Box::leak(name.to_string().into_boxed_str()),
        imported,
    }));
    loaded.push(model);
    Ok(model)
}
