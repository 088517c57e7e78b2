//! Running a shard of a job: its units spread over one worker per device.
use super::worker::Worker;
use super::{Job, Samples, Shard, Unit};
use crate::error::{Error, Result};
use crate::fs::write_atomic;
use crate::models::Model;
use std::path::Path;
use tch::Device;

/// What a call of [`run`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    /// Units of this shard.
    pub units: usize,
    /// Units computed now (the rest were already done).
    pub computed: usize,
    /// Perturbed (channel, option, sample) evaluations computed now.
    pub evaluations: u64,
}

/// Runs shard `shard` of `job` into `dir` (created by [`init_dir`]) with one worker per entry
/// of `devices`; each worker gets its model from `make_model(device)` (weights and baseline
/// spec loaded). A killed run leaves only whole unit files, so running again resumes it.
pub fn run(
    job: &Job,
    dir: &Path,
    samples: &Samples,
    shard: Shard,
    devices: &[Device],
    make_model: &(dyn Fn(Device) -> Result<Model> + Sync),
    progress: Option<&indicatif::ProgressBar>,
) -> Result<RunReport> {
    if samples.len() != job.samples || samples.hash() != job.samples_hash {
        return Err(Error::InvalidArgument(
            "the samples differ from the job's (data set, seed or count changed)".into(),
        ));
    }
    let mine: Vec<Unit> = job
        .units()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % shard.count == shard.index)
        .map(|(_, u)| u)
        .collect();
    let todo: Vec<Unit> = mine
        .iter()
        .copied()
        .filter(|u| !job.unit_done(dir, *u))
        .collect();
    if let Some(pb) = progress {
        pb.set_length(mine.len() as u64);
        pb.set_position((mine.len() - todo.len()) as u64);
        pb.reset_eta();
    }
    let devices = if devices.is_empty() {
        &[Device::Cpu][..]
    } else {
        devices
    };
    let workers = devices.len().min(todo.len()).max(1);
    let results: Vec<Result<(usize, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let todo = &todo;
                let device = devices[w];
                scope.spawn(move || -> Result<(usize, u64)> {
                    let model = make_model(device)?;
                    if model.param_hash() != job.model_hash {
                        return Err(Error::InvalidArgument(format!(
                            "the model on {device:?} differs from the job's (weights changed?)"
                        )));
                    }
                    // The all-ReLU network the distortions are measured against, if asked.
                    let relu = match job.against_relu {
                        true => {
                            let mut m = make_model(device)?;
                            m.clear_spec();
                            Some(m)
                        }
                        false => None,
                    };
                    let mut worker = Worker::new(job, &model, relu.as_ref(), samples, device)?;
                    let (mut done, mut evals) = (0, 0);
                    for u in todo.iter().skip(w).step_by(workers) {
                        evals += worker.unit(dir, *u)?;
                        done += 1;
                        if let Some(pb) = progress {
                            pb.inc(1);
                        }
                    }
                    Ok((done, evals))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::InvalidArgument("a worker panicked".into())))
            })
            .collect()
    });
    let mut report = RunReport {
        units: mine.len(),
        computed: 0,
        evaluations: 0,
    };
    for r in results {
        let (d, e) = r?;
        report.computed += d;
        report.evaluations += e;
    }
    if mine.iter().all(|u| job.unit_done(dir, *u)) {
        let rec = serde_json::json!({
            "shard": [shard.index, shard.count],
            "units": mine.len(),
            "job": job,
        });
        write_atomic(
            &dir.join("shards")
                .join(format!("{}-of-{}.json", shard.index, shard.count)),
            serde_json::to_string_pretty(&rec)
                .expect("shard record serialises")
                .as_bytes(),
        )?;
    }
    Ok(report)
}
