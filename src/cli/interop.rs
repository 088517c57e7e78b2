//! `brelu import onnx` and `brelu export onnx`: networks in and out of brelu.
use super::print_json;
use crate::experiment::Experiment;
use crate::models::onnx::{self, export::ExportInfo};
use crate::models::{Architecture, Model};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use tch::Device;

#[derive(Subcommand, Debug)]
pub enum ImportCommand {
    /// Import a network exported to ONNX (e.g. by `torch.onnx.export` in eval mode): prints its
    /// sites and writes its weights as safetensors for `finetune`, `eval` and `secure`.
    /// Every stage takes the model itself as `--model onnx:PATH` (or `model = "onnx:PATH"` in
    /// a configuration; the path is relative to the working directory).
    Onnx(ImportOnnxArgs),
}

#[derive(Args, Debug)]
pub struct ImportOnnxArgs {
    /// The ONNX file.
    pub file: PathBuf,
    /// Write the network's weights here (safetensors, brelu's parameter names).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
    /// Write a network (with a spec: its block ReLUs in standard ONNX operators) as ONNX, and
    /// the spec JSON beside it. The file takes normalised images [N, C, H, W] (any N); the
    /// normalisation is in its metadata (`brelu.input_mean`, `brelu.input_std`).
    Onnx(ExportOnnxArgs),
}

#[derive(Args, Debug)]
pub struct ExportOnnxArgs {
    /// Configuration naming the model, its input and the data set's normalisation.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Weights (safetensors).
    #[arg(long, short)]
    pub weights: PathBuf,
    /// Block-ReLU spec (default: ordinary ReLU everywhere).
    #[arg(long, short)]
    pub spec: Option<PathBuf>,
    /// The ONNX file to write; with a spec, `<stem>.spec.json` goes beside it.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Fold each batch norm into the convolution before it (as `torch.onnx.export` does in
    /// eval mode): fewer operators for inference runtimes, no batch norm to fine-tune.
    #[arg(long)]
    pub fold_bn: bool,
}

#[derive(Serialize)]
struct ImportReport {
    model: String,
    input: [usize; 3],
    classes: usize,
    sites: Vec<crate::models::SiteInfo>,
    relus: usize,
    parameters: usize,
    relu6_as_relu: usize,
    weights: Option<PathBuf>,
}

pub fn import(c: ImportCommand) -> Result<()> {
    let ImportCommand::Onnx(a) = c;
    let name = format!("{}{}", onnx::PREFIX, a.file.display());
    let arch = onnx::load(&name).with_context(|| format!("importing {}", a.file.display()))?;
    let model = Model::new(arch, arch.default_config(), Device::Cpu)?;
    if let Some(out) = &a.output {
        model
            .save_weights(out)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    let r = ImportReport {
        model: name,
        input: arch.default_input(),
        classes: arch.default_classes(),
        sites: model.sites().to_vec(),
        relus: model.sites().iter().map(|s| s.relus()).sum(),
        parameters: model.named_tensors().values().map(|t| t.numel()).sum(),
        relu6_as_relu: arch.relu6_sites(),
        weights: a.output.clone(),
    };
    if a.json {
        return print_json(&r);
    }
    println!(
        "{}: input {:?}, {} classes, {} parameters, {} ReLU sites with {} ReLUs per image",
        r.model,
        r.input,
        r.classes,
        r.parameters,
        r.sites.len(),
        r.relus
    );
    for s in &r.sites {
        println!(
            "  {:<40} {:>4} x {:>3} x {:>3}",
            s.name, s.channels, s.height, s.width
        );
    }
    if r.relu6_as_relu > 0 {
        println!(
            "note: {} ReLU6 (Clip(0, 6)) became ReLU sites; fine-tune before comparing accuracy",
            r.relu6_as_relu
        );
    }
    if let Some(w) = &r.weights {
        println!("weights: {}", w.display());
    }
    println!("use it as: --model {}", r.model);
    Ok(())
}

pub fn export(c: ExportCommand) -> Result<()> {
    let ExportCommand::Onnx(a) = c;
    let cfg = crate::train::Config::load(&a.config).context("reading the configuration")?;
    let exp = Experiment::of_config(&cfg)
        .with_weights(Some(&a.weights))
        .with_spec(a.spec.as_deref());
    let mut model = exp.load_model()?;
    let mut info = ExportInfo::default();
    let norm = cfg.dataset.normalization();
    info.normalization = Some((norm.mean, norm.std));
    let mut spec_out = None;
    if let Some(spec) = exp.load_spec(&model)? {
        info.spec_json = Some(spec.to_json_string());
        spec_out = Some((super::beside(&a.output, "spec.json"), spec));
    }
    if a.fold_bn {
        model = model.fold_bn()?;
    }
    onnx::export::write(&model, &info, &a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    println!("wrote {}", a.output.display());
    if let Some((path, spec)) = spec_out {
        spec.write(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
