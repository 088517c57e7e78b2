//! SGD with momentum and weight decay, PyTorch's update rule (d = g + wd p; b = m b + d, b = d
//! on the first step; p -= lr b), written out so that its momentum buffers can be saved with a
//! checkpoint: a resumed run then continues exactly where the killed one was.
use crate::dist::{GradReducer, Group};
use crate::error::{Error, Result};
use std::path::Path;
use std::rc::Rc;
use tch::{nn::VarStore, Tensor};

pub struct Sgd {
    /// Trainable variables by name, sorted.
    params: Vec<(String, Tensor)>,
    bufs: Vec<Option<Tensor>>,
    pub lr: f64,
    momentum: f64,
    weight_decay: f64,
    /// Data-parallel runs: gradients are averaged over the ranks before the update.
    reducer: Option<(Rc<Group>, GradReducer, Vec<Tensor>)>,
}

impl Sgd {
    pub fn new(vs: &VarStore, lr: f64, momentum: f64, weight_decay: f64) -> Sgd {
        Self::with_variables(vs.variables(), lr, momentum, weight_decay)
    }

    /// SGD over the trainable ones of `vars` (names must be unique: they key the momentum
    /// buffers in a checkpoint).
    pub fn with_variables(
        vars: impl IntoIterator<Item = (String, Tensor)>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Sgd {
        let mut params: Vec<(String, Tensor)> = vars
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let bufs = params.iter().map(|_| None).collect();
        Sgd {
            params,
            bufs,
            lr,
            momentum,
            weight_decay,
            reducer: None,
        }
    }

    /// Averages the gradients over `group`'s ranks at every step (every rank must hold the
    /// same variables, as built from the same configuration).
    pub fn set_group(&mut self, group: Rc<Group>) {
        let params = self.params();
        self.reducer = Some((group, GradReducer::new(&params), params));
    }

    /// The trainable variables in update order (sorted by name).
    pub fn params(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, t)| t.shallow_clone()).collect()
    }

    /// Clears the gradients, back-propagates `loss`, averages the gradients over the ranks of
    /// a data-parallel run and updates every variable.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        self.zero_grad();
        self.backward(loss)?;
        self.step()
    }

    /// Clears the gradients (the start of a step's accumulation).
    pub fn zero_grad(&self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Back-propagates `loss`, adding to the gradients since [`Sgd::zero_grad`].
    pub fn backward(&self, loss: &Tensor) -> Result<()> {
        // A collective inside the backward pass (synchronised batch norm) can fail: an error,
        // not a panic.
        loss.f_backward().map_err(|e| match self.reducer {
            Some(_) => Error::Dist(format!("backward pass: {e}")),
            None => Error::InvalidArgument(format!("backward pass failed: {e}")),
        })
    }

    /// Averages the accumulated gradients over the ranks of a data-parallel run (once per
    /// step) and updates every variable.
    pub fn step(&mut self) -> Result<()> {
        if let Some((group, reducer, params)) = &self.reducer {
            reducer.reduce(group, params)?;
        }
        let _guard = tch::no_grad_guard();
        for ((_, p), buf) in self.params.iter().zip(self.bufs.iter_mut()) {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let mut d = if self.weight_decay != 0.0 {
                &g + p * self.weight_decay
            } else {
                g.copy()
            };
            if self.momentum != 0.0 {
                let b = match buf.take() {
                    None => d,
                    Some(b) => b * self.momentum + d,
                };
                d = b.shallow_clone();
                *buf = Some(b);
            }
            let mut p = p.shallow_clone();
            p -= d * self.lr;
        }
        Ok(())
    }

    /// Writes the momentum buffers (safetensors, by variable name) atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let named: Vec<(&str, Tensor)> = self
            .params
            .iter()
            .zip(&self.bufs)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (n.as_str(), b.contiguous())))
            .collect();
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        Tensor::write_safetensors(&named, &tmp)
            .map_err(|e| Error::parse(&tmp, format!("cannot write momentum buffers: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Reads buffers written by [`Sgd::save`]; a buffer for an unknown variable or of the
    /// wrong shape is an error naming it.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let file = Tensor::read_safetensors(path)
            .map_err(|e| Error::parse(path, format!("not a readable safetensors file: {e}")))?;
        for (name, t) in file {
            let Some(i) = self.params.iter().position(|(n, _)| *n == name) else {
                return Err(Error::Weights {
                    path: path.to_path_buf(),
                    tensor: name,
                    msg: "no such trainable variable".into(),
                });
            };
            if t.size() != self.params[i].1.size() {
                return Err(Error::Weights {
                    path: path.to_path_buf(),
                    tensor: name,
                    msg: format!(
                        "shape {:?}, expected {:?}",
                        t.size(),
                        self.params[i].1.size()
                    ),
                });
            }
            self.bufs[i] = Some(t.to_device(self.params[i].1.device()));
        }
        Ok(())
    }
}
