//! Stage bookkeeping: a stage runs unless its record says it already ran on the same inputs.
use super::{Log, Outcome};
use crate::dist::Group;
use crate::error::{Error, Result};
use crate::fs::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::rc::Rc;
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
    crate::hash::file_hex(p)
}

/// Runs stages in a pipeline directory and remembers which ran. Under a process group, rank 0
/// decides whether a stage runs (from its record) and tells the others; a stage runs on every
/// rank ([`Runner::stage`]: training, extraction, evaluation) or on rank 0 alone while the
/// others wait ([`Runner::stage_leader`]); rank 0 writes the record, and every rank continues
/// with rank 0's output hash.
pub(super) struct Runner<'a> {
    pub(super) dir: PathBuf,
    log: Log<'a>,
    group: Option<Rc<Group>>,
    /// Stages run (not skipped) in this call, in order.
    pub(super) ran: Vec<String>,
    /// Seconds each stage run in this call took, in order.
    pub(super) times: Vec<(String, f64)>,
}

impl<'a> Runner<'a> {
    pub(super) fn new(dir: &Path, log: Log<'a>, group: Option<Rc<Group>>) -> Self {
        Runner {
            dir: dir.to_path_buf(),
            log,
            group,
            ran: Vec::new(),
            times: Vec::new(),
        }
    }

    /// Single process, or rank 0: the rank that decides, writes and reports.
    pub(super) fn leader(&self) -> bool {
        self.group.as_ref().is_none_or(|g| g.is_leader())
    }

    fn say(&self, m: &str) {
        if self.leader() {
            (self.log)(m);
        }
    }

    /// Rank 0's value on every rank.
    fn share(&self, v: Option<String>) -> Result<Option<String>> {
        match &self.group {
            Some(g) => g.share_text(v.as_deref()),
            None => Ok(v),
        }
    }

    pub(super) fn stopped(self, stage: &str) -> Outcome {
        Outcome {
            ran: self.ran,
            times: self.times,
            rows: Vec::new(),
            report: None,
            stopped_after: Some(stage.to_string()),
        }
    }

    fn record_path(&self, stage: &str) -> PathBuf {
        self.dir.join("stages").join(format!("{stage}.json"))
    }

    /// Runs `f` on every rank unless the stage's record says it already ran on these inputs;
    /// returns the stage's output hash (rank 0's).
    pub(super) fn stage(
        &mut self,
        stage: &str,
        input: String,
        f: impl FnOnce(&Path) -> Result<String>,
    ) -> Result<String> {
        self.stage_on(stage, input, true, f)
    }

    /// [`Runner::stage`], `f` run by rank 0 alone (the others wait for its output).
    pub(super) fn stage_leader(
        &mut self,
        stage: &str,
        input: String,
        f: impl FnOnce(&Path) -> Result<String>,
    ) -> Result<String> {
        self.stage_on(stage, input, false, f)
    }

    pub(super) fn stage_on(
        &mut self,
        stage: &str,
        input: String,
        everyone: bool,
        f: impl FnOnce(&Path) -> Result<String>,
    ) -> Result<String> {
        let rp = self.record_path(stage);
        let mut done = None;
        if self.leader() {
            if let Ok(text) = std::fs::read_to_string(&rp) {
                if let Ok(r) = serde_json::from_str::<StageRecord>(&text) {
                    if r.input == input {
                        done = Some(r.output);
                    } else {
                        (self.log)(&format!("[redo] {stage}: its inputs changed"));
                    }
                }
            }
        }
        if let Some(out) = self.share(done)? {
            self.say(&format!("[skip] {stage} (up to date)"));
            return Ok(out);
        }
        self.say(&format!("[run ] {stage}"));
        let t0 = Instant::now();
        let output = match everyone || self.leader() {
            true => Some(f(&self.dir)?),
            false => None,
        };
        let seconds = t0.elapsed().as_secs_f64();
        if let (true, Some(output)) = (self.leader(), &output) {
            let rec = StageRecord {
                input,
                output: output.clone(),
                seconds,
            };
            write_atomic(
                &rp,
                serde_json::to_string_pretty(&rec)
                    .expect("record serialises")
                    .as_bytes(),
            )?;
        }
        let output = self.share(output)?.unwrap_or_default();
        self.say(&format!("[done] {stage} in {}", duration_text(seconds)));
        self.ran.push(stage.to_string());
        self.times.push((stage.to_string(), seconds));
        Ok(output)
    }

    /// Waits for every rank (a no-op in one process).
    pub(super) fn barrier(&self) -> Result<()> {
        self.group.as_ref().map_or(Ok(()), |g| g.barrier())
    }
}

/// "12.3 s", "4 min 05 s", "1 h 02 min".
pub fn duration_text(s: f64) -> String {
    let t = s.round() as u64;
    match t {
        _ if s < 60.0 => format!("{s:.1} s"),
        _ if t < 3600 => format!("{} min {:02} s", t / 60, t % 60),
        _ => format!("{} h {:02} min", t / 3600, t % 3600 / 60),
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
