//! Weights as safetensors with torchvision state-dict names.
//!
//! A torchvision state dict saved with `safetensors.torch.save_file(model.state_dict(), f)`
//! loads as is (`num_batches_tracked` entries are accepted and ignored). Files whose names
//! start with `backbone.` are taken as mmcls/mmseg checkpoints and mapped to torchvision names
//! by the architecture (`Architecture::mmlab_name`). Tensors the architecture declares not part
//! of the network (`Architecture::ignores_tensor`: mmseg's `auxiliary_head.*`) are skipped,
//! unless the model has that training-only head ([`super::AuxHead`]): then a file that holds
//! any of its tensors must hold all of them, and one without leaves it as initialised. A
//! missing, unknown or wrongly shaped tensor of the network is an error naming it; nothing of
//! the network is left randomly initialised.
use super::Model;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

impl Model {
    /// Parameters and buffers by torchvision name, sorted.
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.var_store().variables().into_iter().collect()
    }

    /// Loads every parameter and batch-norm buffer from a safetensors file.
    pub fn load_weights(&mut self, path: &Path) -> Result<()> {
        let werr = |tensor: &str, msg: String| Error::Weights {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            msg,
        };
        std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let mut file = Tensor::read_safetensors(path)
            .map_err(|e| Error::parse(path, format!("not a readable safetensors file: {e}")))?;
        // Sorted, so the error names the same tensor every time.
        file.sort_by(|a, b| a.0.cmp(&b.0));
        let mmlab = file.iter().any(|(n, _)| n.starts_with("backbone."));
        let vars = self.named_tensors();
        let aux_vars = self.aux_variables();
        let mut seen = BTreeMap::new();
        let mut aux_seen = BTreeMap::new();
        for (raw, t) in file {
            if raw.ends_with("num_batches_tracked") {
                continue;
            }
            if let Some(var) = aux_vars.get(&raw) {
                check_tensor(&t, var, "the auxiliary head").map_err(|m| werr(&raw, m))?;
                aux_seen.insert(raw, t);
                continue;
            }
            if self.arch().ignores_tensor(&raw) {
                continue;
            }
            let name = if mmlab {
                self.arch()
                    .mmlab_name(&raw)
                    .ok_or_else(|| werr(&raw, format!("not an mmlab name of {}", self.name())))?
            } else {
                raw.clone()
            };
            let Some(var) = vars.get(&name) else {
                return Err(werr(&raw, format!("not a parameter of {}", self.name())));
            };
            check_tensor(&t, var, self.name()).map_err(|m| werr(&raw, m))?;
            if seen.insert(name.clone(), t).is_some() {
                return Err(werr(&raw, "appears twice after name mapping".into()));
            }
        }
        if let Some(missing) = vars.keys().find(|k| !seen.contains_key(*k)) {
            return Err(werr(missing, "missing from the file".into()));
        }
        if !aux_seen.is_empty() {
            let mut names: Vec<&String> = aux_vars.keys().collect();
            names.sort();
            if let Some(missing) = names.into_iter().find(|k| !aux_seen.contains_key(*k)) {
                return Err(werr(
                    missing,
                    "missing from the file, which holds other auxiliary-head tensors".into(),
                ));
            }
        }
        let _guard = tch::no_grad_guard();
        for (name, t) in seen {
            let mut var = vars[&name].shallow_clone();
            var.copy_(&t.to_kind(Kind::Float));
        }
        if !aux_seen.is_empty() {
            for (name, t) in aux_seen {
                let mut var = aux_vars[&name].shallow_clone();
                var.copy_(&t.to_kind(Kind::Float));
            }
            self.set_aux_head_used();
        }
        Ok(())
    }

    /// Saves every parameter and buffer (atomically: temp file, then rename), with the
    /// auxiliary head's once it was trained or loaded.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        let aux = match self.aux_head_used() {
            true => self.aux_variables(),
            false => Default::default(),
        };
        let tensors: Vec<(String, Tensor)> = self
            .named_tensors()
            .into_iter()
            .chain(aux)
            .map(|(n, t)| (n, t.detach().to_device(tch::Device::Cpu).contiguous()))
            .collect();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let written = Tensor::write_safetensors(&tensors, &tmp)
            .map_err(|e| Error::parse(path, e.to_string()))
            .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// Why a file tensor `t` cannot be copied into the variable `var`, if it cannot.
/// `who` names what expects the variable's shape.
fn check_tensor(t: &Tensor, var: &Tensor, who: &str) -> std::result::Result<(), String> {
    if t.size() != var.size() {
        return Err(format!(
            "shape {:?} in the file, {who} expects {:?}",
            t.size(),
            var.size()
        ));
    }
    if !matches!(
        t.kind(),
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        return Err(format!("dtype {:?}, expected a float type", t.kind()));
    }
    Ok(())
}
