//! Distortion tables on disk (docs/method.md section 10): `manifest.json` plus one `<site>.npy` per
//! site, float64 [C, options], lower is better. Tables made by other tools load too: only the
//! keys docs/method.md requires are read, extra keys are kept.
use crate::error::{Error, Result};
use crate::fs::write_atomic;
use crate::npy;
use crate::spec::{Catalog, PatchOption, SiteInfo};
use indexmap::IndexMap;
use std::path::Path;

/// One site's table: `values[c * options.len() + k]` = D(site, c, options[k]).
#[derive(Clone, Debug, PartialEq)]
pub struct SiteTable {
    /// [C, H, W] of the site's activation.
    pub shape: [usize; 3],
    pub options: Vec<PatchOption>,
    pub values: Vec<f64>,
}

impl SiteTable {
    pub fn channels(&self) -> usize {
        self.shape[0]
    }

    /// D(c, k).
    pub fn get(&self, c: usize, k: usize) -> f64 {
        self.values[c * self.options.len() + k]
    }
}

/// A distortion directory in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct DistortionTables {
    pub model: String,
    pub input: [usize; 3],
    pub estimator: String,
    pub samples: u64,
    pub seed: u64,
    pub model_hash: String,
    pub sites: IndexMap<String, SiteTable>,
}

fn dims3(v: &serde_json::Value) -> Option<[usize; 3]> {
    let a = v.as_array()?;
    let d: Vec<usize> = a
        .iter()
        .filter_map(|x| x.as_u64())
        .map(|x| x as usize)
        .collect();
    (a.len() == 3 && d.len() == 3 && d.iter().all(|&x| x > 0)).then(|| [d[0], d[1], d[2]])
}

impl DistortionTables {
    /// Reads `dir/manifest.json` and every site's table, checking shapes against the manifest.
    pub fn read(dir: &Path) -> Result<DistortionTables> {
        let mpath = dir.join("manifest.json");
        let text = std::fs::read_to_string(&mpath).map_err(|e| Error::io(&mpath, e))?;
        let err = |m: String| Error::parse(&mpath, m);
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("malformed JSON: {e}")))?;
        let s = |k: &str| -> Result<String> {
            match &v[k] {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Number(n) => Ok(n.to_string()),
                _ => Err(err(format!("field '{k}': expected a string"))),
            }
        };
        let u = |k: &str| -> Result<u64> {
            v[k].as_u64()
                .ok_or_else(|| err(format!("field '{k}': expected a non-negative integer")))
        };
        let input =
            dims3(&v["input"]).ok_or_else(|| err("field 'input': expected [C, H, W]".into()))?;
        let sites_v = v["sites"].as_object().ok_or_else(|| {
            err("field 'sites': expected an object of site -> {file, shape, options}".into())
        })?;
        let mut sites = IndexMap::new();
        for (name, sv) in sites_v {
            let file = sv["file"]
                .as_str()
                .ok_or_else(|| err(format!("sites.{name}.file: expected a file name")))?;
            let shape = dims3(&sv["shape"])
                .ok_or_else(|| err(format!("sites.{name}.shape: expected [C, H, W]")))?;
            let opts_v = sv["options"]
                .as_array()
                .ok_or_else(|| err(format!("sites.{name}.options: expected a list of options")))?;
            let options = opts_v
                .iter()
                .enumerate()
                .map(|(k, o)| {
                    PatchOption::from_json(o).ok_or_else(|| {
                        err(format!("sites.{name}.options[{k}]: expected [bh, bw], \"identity\" or \"zero\", got {o}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let tpath = dir.join(file);
            let arr = npy::read_f64(&tpath)?;
            if arr.shape != [shape[0], options.len()] {
                return Err(Error::parse(
                    &tpath,
                    format!(
                        "table shape {:?}, the manifest says [{}, {}] (channels, options)",
                        arr.shape,
                        shape[0],
                        options.len()
                    ),
                ));
            }
            sites.insert(
                name.clone(),
                SiteTable {
                    shape,
                    options,
                    values: arr.data,
                },
            );
        }
        Ok(DistortionTables {
            model: s("model")?,
            input,
            estimator: s("estimator")?,
            samples: u("samples")?,
            seed: u("seed")?,
            model_hash: s("model_hash")?,
            sites,
        })
    }

    /// The manifest JSON.
    pub fn manifest(&self) -> serde_json::Value {
        let sites: serde_json::Map<String, serde_json::Value> = self
            .sites
            .iter()
            .map(|(name, t)| {
                (
                    name.clone(),
                    serde_json::json!({
                        "file": format!("{name}.npy"),
                        "shape": t.shape,
                        "options": t.options.iter().map(PatchOption::to_json).collect::<Vec<_>>(),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "model": self.model,
            "input": self.input,
            "estimator": self.estimator,
            "samples": self.samples,
            "seed": self.seed,
            "model_hash": self.model_hash,
            "sites": sites,
        })
    }

    /// Writes every table and then the manifest, each atomically (the manifest last, so a
    /// directory with a manifest is complete).
    pub fn write(&self, dir: &Path) -> Result<()> {
        for (name, t) in &self.sites {
            npy::write_f64(
                &dir.join(format!("{name}.npy")),
                &[t.shape[0], t.options.len()],
                &t.values,
            )?;
        }
        let text = serde_json::to_string_pretty(&self.manifest()).expect("manifest serialises");
        write_atomic(&dir.join("manifest.json"), text.as_bytes())
    }
}

impl DistortionTables {
    /// Synthetic tables shaped like real ones (distortion 0 for 1x1, growing with the log of
    /// the patch area with a per-channel scale and noise, identity and zero the largest), over a
    /// model's real sites and catalog. For benchmarks and tests of the knapsack when no trained
    /// network is at hand; the manifest says `estimator: "synthetic"`.
    pub fn synthetic(
        model: &str,
        input: [usize; 3],
        sites: &[SiteInfo],
        catalog: &Catalog,
        seed: u64,
    ) -> Self {
        let mut state = seed ^ 0x5851_f42d_4c95_7f2d;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut tables = IndexMap::new();
        for s in sites {
            let options = catalog.options(s);
            let mut values = Vec::with_capacity(s.channels * options.len());
            for _ in 0..s.channels {
                let scale = 0.1 + uniform() * 10.0;
                for o in &options {
                    values.push(match o {
                        PatchOption::Patch { bh: 1, bw: 1 } => 0.0,
                        PatchOption::Patch { bh, bw } => {
                            scale * ((*bh * *bw) as f64).ln() * (0.8 + 0.4 * uniform())
                        }
                        _ => {
                            scale
                                * 4.0
                                * ((1 + s.height * s.width) as f64).ln()
                                * (0.9 + 0.2 * uniform())
                        }
                    });
                }
            }
            tables.insert(
                s.name.clone(),
                SiteTable {
                    shape: [s.channels, s.height, s.width],
                    options,
                    values,
                },
            );
        }
        DistortionTables {
            model: model.to_string(),
            input,
            estimator: "synthetic".into(),
            samples: 0,
            seed,
            model_hash: "synthetic".into(),
            sites: tables,
        }
    }
}
