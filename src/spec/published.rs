//! Specs as the published code saves them (`yg320/secure_inference`,
//! `knapsack_patch_size_extractor.py`): a `pickle.dump` of a dict of layer name -> numpy int32
//! array [channels, 2] of [height, width] patch sizes, where [0, 1] means identity and [1, 0]
//! zero (its `bReLU.py`). Its layer names are brelu's site names, so importing checks every
//! name, channel count and option against the model and fails naming the first mismatch.
use super::pickle::{int_array, parse, Value};
use super::{PatchOption, SiteInfo, Spec};
use crate::error::{Error, Result};
use indexmap::IndexMap;
use std::path::Path;

/// One row of a published array as an option.
fn option(h: i64, w: i64) -> Option<PatchOption> {
    match (h, w) {
        (0, 1) => Some(PatchOption::Identity),
        (1, 0) => Some(PatchOption::Zero),
        (h, w) if h >= 1 && w >= 1 && h <= u32::MAX as i64 && w <= u32::MAX as i64 => {
            Some(PatchOption::patch(h as u32, w as u32))
        }
        _ => None,
    }
}

/// Reads a published spec pickle for `model` at `input` with the given sites.
pub fn import_published(
    path: &Path,
    model: &str,
    input: [usize; 3],
    sites: &[SiteInfo],
) -> Result<Spec> {
    let bad = |msg: String| Error::Spec {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let value = parse(&bytes).map_err(|m| bad(format!("not a readable pickle: {m}")))?;
    let Value::Dict(entries) = value else {
        return Err(bad(
            "expected a dict of layer name -> [channels, 2] array".into()
        ));
    };
    let mut found: IndexMap<String, Vec<PatchOption>> = IndexMap::new();
    for (k, v) in &entries {
        let Value::Str(name) = k else {
            return Err(bad(format!("a key is not a layer name: {k:?}")));
        };
        let site = sites.iter().find(|s| &s.name == name).ok_or_else(|| {
            bad(format!(
                "layer '{name}' is not a ReLU site of {model} (sites: {})",
                sites
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let (shape, vals) = int_array(v).map_err(|m| bad(format!("layer '{name}': {m}")))?;
        if shape != [site.channels, 2] {
            return Err(bad(format!(
                "layer '{name}' has an array of shape {shape:?}; {model} has {} channels there, \
                 so [{}, 2] was expected",
                site.channels, site.channels
            )));
        }
        let options = vals
            .chunks_exact(2)
            .enumerate()
            .map(|(c, r)| {
                option(r[0], r[1]).ok_or_else(|| {
                    bad(format!(
                        "layer '{name}' channel {c}: [{}, {}] is not a patch size, [0, 1] \
                         (identity) or [1, 0] (zero)",
                        r[0], r[1]
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if found.insert(name.clone(), options).is_some() {
            return Err(bad(format!("layer '{name}' appears twice")));
        }
    }
    if let Some(missing) = sites.iter().find(|s| !found.contains_key(&s.name)) {
        return Err(bad(format!(
            "no entry for layer '{}' of {model}",
            missing.name
        )));
    }
    let spec = Spec {
        model: model.to_string(),
        input,
        sites: sites
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    found.swap_remove(&s.name).unwrap_or_default(),
                )
            })
            .collect(),
        source: Some(path.to_path_buf()),
    };
    spec.validate(model, input, sites)?;
    Ok(spec)
}
