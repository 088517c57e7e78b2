//! Spec files (docs/method.md section 10): one option per channel of every site, as JSON.
//!
//! ```json
//! {"model": "resnet18-cifar", "input": [3, 32, 32],
//!  "sites": {"stem": [[1,1], [2,2], "identity", ...], ...}}
//! ```
//! Reading checks the structure; [`Spec::validate`] checks it against a model's sites and
//! names the first problem (unknown or missing site, channel count, patch larger than the map).
use super::{PatchOption, SiteInfo};
use crate::error::{Error, Result};
use crate::fs::write_atomic;
use indexmap::IndexMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A block-ReLU spec: the option of every channel of every site of one model.
#[derive(Clone, Debug)]
pub struct Spec {
    pub model: String,
    /// [C, H, W] of the input the site shapes refer to.
    pub input: [usize; 3],
    /// Site name -> one option per channel, in the model's site order when written by brelu.
    pub sites: IndexMap<String, Vec<PatchOption>>,
    /// The file this spec was read from (for error messages).
    pub source: Option<PathBuf>,
}

impl PartialEq for Spec {
    fn eq(&self, o: &Self) -> bool {
        self.model == o.model && self.input == o.input && self.sites == o.sites
    }
}

impl Spec {
    /// The same option at every channel of every site, clipped to each map (a patch larger
    /// than a map covers the whole map).
    pub fn uniform(
        model: &str,
        input: [usize; 3],
        sites: &[SiteInfo],
        option: PatchOption,
    ) -> Spec {
        Spec {
            model: model.to_string(),
            input,
            sites: sites
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        vec![option.clipped(s.height, s.width); s.channels],
                    )
                })
                .collect(),
            source: None,
        }
    }

    fn where_(&self) -> PathBuf {
        self.source
            .clone()
            .unwrap_or_else(|| PathBuf::from("<spec>"))
    }

    /// Reads and structurally checks a spec file.
    pub fn read(path: &Path) -> Result<Spec> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, Some(path))
    }

    /// Parses spec JSON; `path` only labels errors.
    pub fn from_json_str(text: &str, path: Option<&Path>) -> Result<Spec> {
        let label = path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("<spec>"));
        let err = |m: String| Error::spec(&label, m);
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(format!("malformed JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err("expected a JSON object with model, input and sites".into()))?;
        let model = obj
            .get("model")
            .and_then(|m| m.as_str())
            .ok_or_else(|| err("field 'model': expected the model name as a string".into()))?
            .to_string();
        let input = obj
            .get("input")
            .and_then(|i| i.as_array())
            .filter(|a| a.len() == 3)
            .and_then(|a| {
                let d: Vec<usize> = a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect();
                (d.len() == 3 && d.iter().all(|&x| x > 0)).then(|| [d[0], d[1], d[2]])
            })
            .ok_or_else(
                || err("field 'input': expected [C, H, W] with positive integers".into()),
            )?;
        let sites_v = obj
            .get("sites")
            .and_then(|s| s.as_object())
            .ok_or_else(|| {
                err("field 'sites': expected an object of site name -> options".into())
            })?;
        let mut sites = IndexMap::new();
        for (name, opts) in sites_v {
            let arr = opts.as_array().ok_or_else(|| {
                err(format!(
                    "sites.{name}: expected a list with one option per channel"
                ))
            })?;
            let parsed = arr
                .iter()
                .enumerate()
                .map(|(c, o)| {
                    PatchOption::from_json(o).ok_or_else(|| {
                        err(format!(
                            "sites.{name}[{c}]: expected [bh, bw] with integers >= 1, \"identity\" or \"zero\", got {o}"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            sites.insert(name.clone(), parsed);
        }
        Ok(Spec {
            model,
            input,
            sites,
            source: path.map(Path::to_path_buf),
        })
    }

    /// Checks the spec against a model: its name, input size and sites. The error names the
    /// first problem found.
    pub fn validate(&self, model: &str, input: [usize; 3], sites: &[SiteInfo]) -> Result<()> {
        let err = |m: String| Error::spec(self.where_(), m);
        if self.model != model {
            return Err(err(format!(
                "spec is for model '{}', not '{model}'",
                self.model
            )));
        }
        if self.input != input {
            return Err(err(format!(
                "spec is for input {:?}, the model runs at {input:?}",
                self.input
            )));
        }
        for (name, opts) in &self.sites {
            let Some(site) = sites.iter().find(|s| &s.name == name) else {
                return Err(err(format!(
                    "unknown site '{name}': {model} has no such site"
                )));
            };
            if opts.len() != site.channels {
                return Err(err(format!(
                    "site '{name}': {} options, the site has {} channels",
                    opts.len(),
                    site.channels
                )));
            }
            if let Some((c, o)) = opts
                .iter()
                .enumerate()
                .find(|(_, o)| !o.fits(site.height, site.width))
            {
                return Err(err(format!(
                    "site '{name}' channel {c}: patch {o} is larger than the {}x{} map",
                    site.height, site.width
                )));
            }
        }
        if let Some(missing) = sites.iter().find(|s| !self.sites.contains_key(&s.name)) {
            return Err(err(format!(
                "site '{}' is missing ({model} has {} sites)",
                missing.name,
                sites.len()
            )));
        }
        Ok(())
    }

    /// Reads a spec file and validates it against a model in one step.
    pub fn load(path: &Path, model: &str, input: [usize; 3], sites: &[SiteInfo]) -> Result<Spec> {
        let spec = Self::read(path)?;
        spec.validate(model, input, sites)?;
        Ok(spec)
    }

    /// The JSON text: one line per site so diffs stay readable.
    pub fn to_json_string(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\n  \"model\": {},\n  \"input\": [{}, {}, {}],\n  \"sites\": {{",
            serde_json::Value::from(self.model.as_str()),
            self.input[0],
            self.input[1],
            self.input[2]
        );
        for (i, (name, opts)) in self.sites.iter().enumerate() {
            let list: Vec<String> = opts.iter().map(|o| o.to_json().to_string()).collect();
            let _ = write!(
                s,
                "{}\n    {}: [{}]",
                if i == 0 { "" } else { "," },
                serde_json::Value::from(name.as_str()),
                list.join(", ")
            );
        }
        s.push_str("\n  }\n}\n");
        s
    }

    /// Writes the spec atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_json_string().as_bytes())
    }
}
