//! SGD with momentum and weight decay, PyTorch's update rule (d = g + wd p; b = m b + d, b = d
//! on the first step; p -= lr b) in libtorch's fused kernel, holding its momentum buffers so
//! that they can be saved with a checkpoint: a resumed run then continues exactly where the
//! killed one was. Data-parallel runs average the gradients with DDP's Reducer
//! ([`crate::dist::Ddp`]) during the backward pass of a step's last micro-batch.
use crate::dist::{Ddp, GradCompress, Group};
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
    /// Data-parallel runs: averages the gradients over the ranks.
    ddp: Option<Ddp>,
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
            ddp: None,
        }
    }

    /// Averages the gradients over `group`'s ranks at every step, in buckets of `bucket_mb`
    /// MiB (every rank must hold the same variables, as built from the same configuration).
    pub fn set_group(
        &mut self,
        group: Rc<Group>,
        bucket_mb: usize,
        compress: GradCompress,
    ) -> Result<()> {
        self.ddp = Some(Ddp::new(group, &self.params(), bucket_mb << 20, compress)?);
        Ok(())
    }

    /// The trainable variables in update order (sorted by name).
    pub fn params(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, t)| t.shallow_clone()).collect()
    }

    /// Clears the gradients, back-propagates `loss`, averages the gradients over the ranks of
    /// a data-parallel run and updates every variable.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        self.zero_grad();
        self.backward(loss, true)?;
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

    /// Back-propagates `loss`, adding to the gradients since [`Sgd::zero_grad`]. In a
    /// data-parallel run, `last` (the step's last micro-batch) makes this pass average the
    /// gradients over the ranks as it runs; other passes accumulate locally.
    pub fn backward(&self, loss: &Tensor, last: bool) -> Result<()> {
        if let (Some(ddp), true) = (&self.ddp, last) {
            ddp.arm()?;
        }
        // A collective inside the backward pass (gradient buckets, synchronised batch norm)
        // can fail: an error, not a panic.
        loss.f_backward().map_err(|e| match self.ddp {
            Some(_) => Error::Dist(format!("backward pass: {e}")),
            None => Error::InvalidArgument(format!("backward pass failed: {e}")),
        })
    }

    /// Updates every variable that has a gradient (in a data-parallel run, already averaged
    /// by the last [`Sgd::backward`]).
    pub fn step(&mut self) -> Result<()> {
        let hyper = (self.weight_decay, self.momentum, self.lr);
        // Variables whose buffer exists, and those on their first step (b = d): the fused
        // kernel takes one such flag per call.
        let mut groups: [(Vec<Tensor>, Vec<Tensor>, Vec<Tensor>); 2] = Default::default();
        for ((_, p), buf) in self.params.iter().zip(self.bufs.iter_mut()) {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let group = &mut groups[buf.is_none() as usize];
            // Without momentum there are no buffers: the kernel takes an empty list.
            if self.momentum != 0.0 {
                group
                    .2
                    .push(buf.get_or_insert_with(|| p.zeros_like()).shallow_clone());
            }
            group.0.push(p.shallow_clone());
            group.1.push(g);
        }
        for (first, (p, g, b)) in groups.iter().enumerate() {
            if !p.is_empty() {
                super::precision::fused_sgd(p, g, b, hyper, first == 1)?;
            }
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
