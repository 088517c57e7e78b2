//! Stage bookkeeping: a stage runs unless its record says it already ran on the same inputs.
use super::{Log, Outcome};
use crate::error::{Error, Result};
use crate::fs::write_atomic;
use crate::hash::fnv_hex;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a stage left behind.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StageRecord {
    pub input: String,
    pub output: String,
    pub seconds: f64,
}

/// Hash of a file's bytes.
pub(super) fn file_hash(p: &Path) -> Result<String> {
    let b = std::fs::read(p).map_err(|e| Error::io(p, e))?;
    Ok(fnv_hex(b))
}

/// Runs stages in a pipeline directory and remembers which ran.
pub(super) struct Runner<'a> {
    pub(super) dir: PathBuf,
    log: Log<'a>,
    /// Stages run (not skipped) in this call, in order.
    pub(super) ran: Vec<String>,
}

impl<'a> Runner<'a> {
    pub(super) fn new(dir: &Path, log: Log<'a>) -> Self {
        Runner {
            dir: dir.to_path_buf(),
            log,
            ran: Vec::new(),
        }
    }

    pub(super) fn stopped(self, stage: &str) -> Outcome {
        Outcome {
            ran: self.ran,
            rows: Vec::new(),
            report: None,
            stopped_after: Some(stage.to_string()),
        }
    }

    fn record_path(&self, stage: &str) -> PathBuf {
        self.dir.join("stages").join(format!("{stage}.json"))
    }

    /// Runs `f` unless the stage's record says it already ran on these inputs; returns the
    /// stage's output hash.
    pub(super) fn stage(
        &mut self,
        stage: &str,
        input: String,
        f: impl FnOnce(&Path) -> Result<String>,
    ) -> Result<String> {
        let rp = self.record_path(stage);
        if let Ok(text) = std::fs::read_to_string(&rp) {
            if let Ok(r) = serde_json::from_str::<StageRecord>(&text) {
                if r.input == input {
                    (self.log)(&format!("[skip] {stage} (up to date)"));
                    return Ok(r.output);
                }
                (self.log)(&format!("[redo] {stage}: its inputs changed"));
            }
        }
        (self.log)(&format!("[run ] {stage}"));
        let t0 = Instant::now();
        let output = f(&self.dir)?;
        let rec = StageRecord {
            input,
            output: output.clone(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        write_atomic(
            &rp,
            serde_json::to_string_pretty(&rec)
                .expect("record serialises")
                .as_bytes(),
        )?;
        self.ran.push(stage.to_string());
        Ok(output)
    }
}

pub(super) fn write_json<T: Serialize>(p: &Path, v: &T) -> Result<()> {
    write_atomic(
        p,
        serde_json::to_string_pretty(v)
            .expect("serialisable")
            .as_bytes(),
    )
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> Result<T> {
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::parse(p, e.to_string()))
}
