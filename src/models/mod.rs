//! The model zoo. Every architecture describes itself once, as a [`Graph`] of ops with named
//! ReLU sites ([`Architecture::build`]); everything else (site dry run, forward pass, running
//! from a site, batch-norm folding, weights) works on that description.
//!
//! To add an architecture: write one file with a type implementing [`Architecture`] and add it
//! to [`architectures`].
pub mod aux_head;
pub mod deeplabv3;
pub mod graph;
pub mod mobilenet_v2;
mod norm;
pub mod onnx;
pub mod resnet;
mod runtime;
pub mod weights;

pub use graph::{AuxHead, Graph, GraphBuilder, Op, ResizeTo, Slot};
pub use runtime::{Model, SiteState};

use crate::error::{Error, Result};
pub use crate::spec::SiteInfo;

/// Input size and class count of one model instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchConfig {
    /// [C, H, W] of one input image.
    pub input: [usize; 3],
    pub num_classes: usize,
}

/// A network family. Implementations only describe the network; they never run it.
pub trait Architecture: Sync {
    /// Registry name, e.g. `resnet18-cifar`.
    fn name(&self) -> &'static str;
    /// One line for `brelu models`.
    fn summary(&self) -> &'static str;
    fn default_input(&self) -> [usize; 3];
    fn default_classes(&self) -> usize;
    /// Emits the network's ops (parameter names = torchvision state-dict prefixes, sites named
    /// as in docs/method.md 4) and returns the output slot: [N, classes] logits for a classifier,
    /// a [N, classes, H', W'] logit map for a segmentation model.
    fn build(&self, g: &mut GraphBuilder, cfg: &ArchConfig) -> Slot;
    /// The torchvision name of an mmcls/mmseg checkpoint tensor name, if it is one of ours.
    fn mmlab_name(&self, name: &str) -> Option<String>;
    /// Checkpoint tensors that are not part of the network and are skipped when loading
    /// (mmseg's auxiliary head, when the model holds no [`AuxHead`] to load them into); none
    /// by default.
    fn ignores_tensor(&self, _name: &str) -> bool {
        false
    }

    /// Refuses a configuration the architecture cannot be built for (an imported network has
    /// the input size it was exported at); any is fine by default.
    fn check_config(&self, _cfg: &ArchConfig) -> Result<()> {
        Ok(())
    }

    /// Parameters a new model starts from instead of a random initialisation (an imported
    /// network's weights); none by default.
    fn pretrained(&self) -> &[Param] {
        &[]
    }

    /// The default configuration (`default_input`, `default_classes`).
    fn default_config(&self) -> ArchConfig {
        ArchConfig {
            input: self.default_input(),
            num_classes: self.default_classes(),
        }
    }
}

/// A named parameter tensor (torchvision naming, row-major values).
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// Every architecture brelu knows.
pub fn architectures() -> &'static [&'static dyn Architecture] {
    &[
        &resnet::RESNET18_CIFAR,
        &resnet::RESNET18_CIFAR_LIGHT,
        &resnet::RESNET50,
        &resnet::RESNET50_AVGPOOL,
        &resnet::RESNET50_AVGPOOL_COUNTPAD,
        &mobilenet_v2::MobileNetV2,
        &deeplabv3::DEEPLABV3_MOBILENETV2,
        &deeplabv3::DEEPLABV3_RESNET50_D8,
        &deeplabv3::DEEPLABV3_RESNET50_D8_COUNTPAD,
    ]
}

/// Looks an architecture up by name; `onnx:PATH` imports that file (once per process).
pub fn find(name: &str) -> Result<&'static dyn Architecture> {
    if name.starts_with(onnx::PREFIX) {
        return Ok(onnx::load(name)?);
    }
    architectures()
        .iter()
        .copied()
        .find(|a| a.name() == name)
        .ok_or_else(|| Error::UnknownModel {
            name: name.to_string(),
            known: architectures()
                .iter()
                .map(|a| a.name())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Builds an architecture's graph for a configuration.
pub fn build_graph(arch: &dyn Architecture, cfg: &ArchConfig) -> Result<Graph> {
    if cfg.input.contains(&0) || cfg.num_classes == 0 {
        return Err(Error::InvalidArgument(format!(
            "{}: input {:?} and class count {} must be positive",
            arch.name(),
            cfg.input,
            cfg.num_classes
        )));
    }
    arch.check_config(cfg)?;
    let mut g = GraphBuilder::new();
    let out = arch.build(&mut g, cfg);
    Ok(g.finish(out))
}

/// The sites of `graph` for an input of shape `input`, found by a shape-level dry run.
pub fn graph_sites(graph: &Graph, input: [usize; 3]) -> Result<Vec<SiteInfo>> {
    let shapes = graph.infer_shapes(input)?;
    graph
        .sites
        .iter()
        .zip(&graph.site_ops)
        .map(|(name, &op)| {
            let s = &shapes[graph.ops[op].output()];
            match s.as_slice() {
                [c, h, w] => Ok(SiteInfo {
                    name: name.clone(),
                    channels: *c,
                    height: *h,
                    width: *w,
                }),
                _ => Err(Error::Shape {
                    op: name.clone(),
                    msg: format!("a ReLU site must act on a [C, H, W] map, got {s:?}"),
                }),
            }
        })
        .collect()
}

/// The sites of an architecture at an input size.
pub fn sites(arch: &dyn Architecture, input: [usize; 3]) -> Result<Vec<SiteInfo>> {
    let cfg = ArchConfig {
        input,
        num_classes: arch.default_classes(),
    };
    graph_sites(&build_graph(arch, &cfg)?, input)
}
