//! Collecting the units of a finished extraction into tables.
use super::job::{first_difference, read_job};
use super::Estimator;
use crate::distortion::tables::{DistortionTables, SiteTable};
use crate::error::{Error, Result};
use crate::npy;
use indexmap::IndexMap;
use std::path::{Path, PathBuf};

/// Why [`collect`] could not finish.
fn missing_error(dir: &Path, missing: &[usize], total: usize, counts: &[usize]) -> Error {
    let mut msg = format!(
        "{}: {} of {total} units are missing",
        dir.display(),
        missing.len()
    );
    for &n in counts {
        let mut idx: Vec<usize> = missing.iter().map(|u| u % n).collect();
        idx.sort_unstable();
        idx.dedup();
        let list: Vec<String> = idx.iter().map(|i| i.to_string()).collect();
        msg.push_str(&format!(
            "; with {n} shards, shard(s) {} of {n} have not finished",
            list.join(", ")
        ));
    }
    if counts.is_empty() {
        msg.push_str("; run the extract command again to finish them");
    }
    Error::InvalidArgument(msg)
}

/// Checks that every unit of the extraction in `dir` is present and every shard record agrees
/// with `job.json`, then averages the units into tables and writes them (manifest last).
pub fn collect(dir: &Path) -> Result<DistortionTables> {
    let jpath = dir.join("job.json");
    if !jpath.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} is not an extraction directory (no job.json)",
            dir.display()
        )));
    }
    let job = read_job(&jpath)?;
    let jv = serde_json::to_value(&job).expect("job serialises");
    let mut counts = Vec::new();
    let sdir = dir.join("shards");
    if sdir.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&sdir)
            .map_err(|e| Error::io(&sdir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::parse(&f, format!("malformed shard record: {e}")))?;
            if v["job"] != jv {
                return Err(Error::InvalidArgument(format!(
                    "refusing to mix shards: {} was made by a different extraction than {} ({})",
                    f.display(),
                    jpath.display(),
                    first_difference(&v["job"], &jv)
                )));
            }
            if let Some(n) = v["shard"][1].as_u64() {
                if !counts.contains(&(n as usize)) {
                    counts.push(n as usize);
                }
            }
        }
    }
    let units = job.units();
    let missing: Vec<usize> = units
        .iter()
        .enumerate()
        .filter(|(_, u)| !job.unit_done(dir, **u))
        .map(|(i, _)| i)
        .collect();
    if !missing.is_empty() {
        return Err(missing_error(dir, &missing, units.len(), &counts));
    }
    let mut tables = IndexMap::new();
    for (name, site) in &job.sites {
        let nopt = site.options.len();
        let c = site.shape[0];
        let mut values = vec![0.0f64; c * nopt];
        let chunks = if job.estimator == Estimator::FirstOrder.name() {
            1
        } else {
            job.chunks(site)
        };
        for batch in 0..job.batches() {
            for chunk in 0..chunks {
                let p = dir
                    .join("units")
                    .join(name)
                    .join(format!("b{batch:05}-c{chunk:04}.npy"));
                let arr = npy::read_f64(&p)?;
                let c0 = chunk * site.chunk;
                let rows = (c0 + site.chunk).min(c) - c0;
                if arr.shape != [rows, nopt] {
                    return Err(Error::parse(
                        &p,
                        format!("unit shape {:?}, expected [{rows}, {nopt}]", arr.shape),
                    ));
                }
                for (dst, src) in values[c0 * nopt..(c0 + rows) * nopt]
                    .iter_mut()
                    .zip(&arr.data)
                {
                    *dst += src;
                }
            }
        }
        for v in &mut values {
            *v /= job.samples as f64;
        }
        tables.insert(
            name.clone(),
            SiteTable {
                shape: site.shape,
                options: site.options.clone(),
                values,
            },
        );
    }
    let t = DistortionTables {
        model: job.model.clone(),
        input: job.input,
        estimator: job.estimator.clone(),
        samples: job.samples as u64,
        seed: job.seed,
        model_hash: job.model_hash.clone(),
        sites: tables,
    };
    t.write(dir)?;
    Ok(t)
}
