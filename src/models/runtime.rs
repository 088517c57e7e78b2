//! `Model`: a graph with its parameters (a tch `VarStore` with torchvision names) and the
//! per-site activation options, run with tch.
use super::aux_head::AuxParams;
use super::graph::{Graph, Op, ResizeTo, Slot};
use super::norm::batch_norm;
use super::{build_graph, graph_sites, ArchConfig, Architecture, SiteInfo};
use crate::error::{Error, Result};
use crate::ops;
use crate::spec::{PatchOption, Spec};
use tch::{nn, Device, Kind, Tensor};

/// A network instance: architecture, graph, parameters and the active block-ReLU options.
pub struct Model {
    arch: &'static dyn Architecture,
    config: ArchConfig,
    graph: Graph,
    sites: Vec<SiteInfo>,
    vs: nn::VarStore,
    /// Per op, its parameter tensors (sharing storage with `vs`), in a fixed order:
    /// conv [weight, bias?], batch norm [weight, bias, running_mean, running_var], linear
    /// [weight, bias].
    params: Vec<Vec<Tensor>>,
    /// Per site: `None` = ordinary ReLU on every channel, else one option per channel.
    options: Vec<Option<Vec<PatchOption>>>,
    /// Per slot, the last op that reads it (values are dropped after it to bound memory).
    last_use: Vec<usize>,
    /// The graph's training-only auxiliary head, if it has one.
    pub(super) aux: Option<AuxParams>,
}

/// The values needed to run a model on from just after a site: the site's pre-activation and
/// every earlier value read later (e.g. a residual branch). Made by [`Model::prefix`].
pub struct SiteState {
    pub site: usize,
    /// The site's input [N, C, H, W] (before its ReLU).
    pub pre: Tensor,
    live: Vec<(Slot, Tensor)>,
}

impl Model {
    /// A freshly initialised model (torchvision's initialisation), on `device`.
    pub fn new(
        arch: &'static dyn Architecture,
        config: ArchConfig,
        device: Device,
    ) -> Result<Model> {
        let graph = build_graph(arch, &config)?;
        let model = Self::from_graph(arch, config, graph, device)?;
        model.set_pretrained()?;
        Ok(model)
    }

    /// Copies the architecture's own starting parameters (an imported network's weights).
    fn set_pretrained(&self) -> Result<()> {
        let pretrained = self.arch.pretrained();
        if pretrained.is_empty() {
            return Ok(());
        }
        let vars = self.var_store().variables();
        let _guard = tch::no_grad_guard();
        for p in pretrained {
            let mut var = vars
                .get(&p.name)
                .map(|v| v.shallow_clone())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("{}: no parameter {}", self.name(), p.name))
                })?;
            let dims: Vec<i64> = p.dims.iter().map(|&d| d as i64).collect();
            if var.size() != dims {
                return Err(Error::InvalidArgument(format!(
                    "{}: parameter {} has shape {:?}, the network expects {:?}",
                    self.name(),
                    p.name,
                    dims,
                    var.size()
                )));
            }
            var.copy_(&Tensor::from_slice(&p.data).view(dims.as_slice()));
        }
        Ok(())
    }

    /// A model by registry name with the architecture's default input and class count.
    pub fn by_name(name: &str, device: Device) -> Result<Model> {
        let arch = super::find(name)?;
        Self::new(arch, arch.default_config(), device)
    }

    fn from_graph(
        arch: &'static dyn Architecture,
        config: ArchConfig,
        graph: Graph,
        device: Device,
    ) -> Result<Model> {
        let sites = graph_sites(&graph, config.input)?;
        let vs = nn::VarStore::new(device);
        let params = create_params(&graph, &vs.root());
        let mut last_use = vec![0; graph.slots];
        for (i, op) in graph.ops.iter().enumerate() {
            for s in op.inputs() {
                last_use[s] = i;
            }
        }
        last_use[graph.output] = usize::MAX;
        let aux = match graph.aux {
            Some(head) => {
                let shapes = graph.infer_shapes(config.input)?;
                if shapes[head.input].first() != Some(&head.in_channels) {
                    return Err(Error::Shape {
                        op: "auxiliary head".into(),
                        msg: format!(
                            "expects {} input channels, its input has shape {:?}",
                            head.in_channels, shapes[head.input]
                        ),
                    });
                }
                Some(AuxParams::new(head, config.num_classes, device))
            }
            None => None,
        };
        Ok(Model {
            arch,
            config,
            options: vec![None; sites.len()],
            graph,
            sites,
            vs,
            params,
            last_use,
            aux,
        })
    }

    pub fn arch(&self) -> &'static dyn Architecture {
        self.arch
    }

    pub fn name(&self) -> &'static str {
        self.arch.name()
    }

    pub fn config(&self) -> ArchConfig {
        self.config
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn sites(&self) -> &[SiteInfo] {
        &self.sites
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The parameter tensors of op `op` (conv [weight, bias?], batch norm [weight, bias,
    /// running_mean, running_var], linear [weight, bias], others none).
    pub fn op_params(&self, op: usize) -> &[Tensor] {
        self.params.get(op).map(|p| p.as_slice()).unwrap_or(&[])
    }

    /// Index of a site by name.
    pub fn site_index(&self, name: &str) -> Option<usize> {
        self.sites.iter().position(|s| s.name == name)
    }

    /// Uses `spec`'s options at every site (checked against this model first).
    pub fn apply_spec(&mut self, spec: &Spec) -> Result<()> {
        spec.validate(self.name(), self.config.input, &self.sites)?;
        for (i, site) in self.sites.iter().enumerate() {
            let opts = &spec.sites[&site.name];
            self.options[i] = if opts.iter().all(|o| *o == PatchOption::RELU) {
                None
            } else {
                Some(opts.clone())
            };
        }
        Ok(())
    }

    /// Back to the ordinary ReLU at every site.
    pub fn clear_spec(&mut self) {
        self.options.iter_mut().for_each(|o| *o = None);
    }

    /// The options in use at a site (`None`: ordinary ReLU everywhere).
    pub fn site_options(&self, site: usize) -> Option<&[PatchOption]> {
        self.options.get(site).and_then(|o| o.as_deref())
    }

    /// Sets one site's options (`None`: ordinary ReLU).
    pub fn set_site_options(
        &mut self,
        site: usize,
        options: Option<Vec<PatchOption>>,
    ) -> Result<()> {
        let info = self.sites.get(site).ok_or_else(|| {
            Error::InvalidArgument(format!("{} has no site #{site}", self.name()))
        })?;
        if let Some(o) = &options {
            if o.len() != info.channels {
                return Err(Error::InvalidArgument(format!(
                    "site {}: {} options given for {} channels",
                    info.name,
                    o.len(),
                    info.channels
                )));
            }
        }
        self.options[site] = options;
        Ok(())
    }

    /// The logits for a batch `x` [N, C, H, W]; `train` selects batch statistics in batch norm.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut vals: Vec<Option<Tensor>> = (0..self.graph.slots).map(|_| None).collect();
        vals[0] = Some(x.shallow_clone());
        self.run(&mut vals, 0, train);
        vals[self.graph.output]
            .take()
            .expect("the output slot is written")
    }

    /// [`Model::forward_t`] that also returns the auxiliary head's logits (training-only,
    /// [`super::AuxHead`]); `None` when the network has no auxiliary head.
    pub fn forward_with_aux(&self, x: &Tensor, train: bool) -> (Tensor, Option<Tensor>) {
        let Some(aux) = &self.aux else {
            return (self.forward_t(x, train), None);
        };
        let mut vals: Vec<Option<Tensor>> = (0..self.graph.slots).map(|_| None).collect();
        vals[0] = Some(x.shallow_clone());
        let n = self.graph.ops.len();
        self.run_range_keeping(&mut vals, 0, n, train, Some(aux.head.input));
        let aux_out = vals[aux.head.input].as_ref().map(|f| aux.forward(f, train));
        let out = vals[self.graph.output]
            .take()
            .expect("the output slot is written");
        (out, aux_out)
    }

    /// Runs the network (evaluation mode) up to site `site` and keeps what is needed to run on
    /// from there.
    pub fn prefix(&self, x: &Tensor, site: usize) -> SiteState {
        let at = self.graph.site_ops[site];
        let mut vals: Vec<Option<Tensor>> = (0..self.graph.slots).map(|_| None).collect();
        vals[0] = Some(x.shallow_clone());
        self.run_range(&mut vals, 0, at, false);
        let Op::Act { x: pre_slot, y, .. } = &self.graph.ops[at] else {
            unreachable!("site_ops point at Act ops")
        };
        let live = self
            .graph
            .live_after(at)
            .into_iter()
            .filter(|s| s != y)
            .map(|s| {
                (
                    s,
                    vals[s]
                        .as_ref()
                        .expect("live values are computed")
                        .shallow_clone(),
                )
            })
            .collect();
        SiteState {
            site,
            pre: vals[*pre_slot].take().expect("site input is computed"),
            live,
        }
    }

    /// Logits when the site of `state` outputs `activated` instead of its own activation.
    /// `activated` may stack k perturbed copies on the batch axis ([k*N, C, H, W], copy-major);
    /// the cached values are repeated to match and the result is [k*N, classes].
    pub fn forward_from(&self, state: &SiteState, activated: &Tensor) -> Tensor {
        self.forward_from_to(state, activated, self.graph.ops.len() - 1)
    }

    /// Like [`Model::forward_from`] but stops after op `stop` (an index into the graph's ops
    /// after the site) and returns that op's output.
    pub fn forward_from_to(&self, state: &SiteState, activated: &Tensor, stop: usize) -> Tensor {
        self.forward_rows(state, activated, None, stop)
    }

    /// The general form: row i of `activated` belongs to sample `rows[i]` of the state's batch
    /// (i64 indices; `None`: k stacked copies of the whole batch, copy-major). Runs from the
    /// site through op `stop` and returns that op's output.
    pub fn forward_rows(
        &self,
        state: &SiteState,
        activated: &Tensor,
        rows: Option<&Tensor>,
        stop: usize,
    ) -> Tensor {
        let at = self.graph.site_ops[state.site];
        assert!(
            stop > at && stop < self.graph.ops.len(),
            "stop op {stop} must come after the site's op {at}"
        );
        let n = state.pre.size()[0];
        let k = activated.size()[0] / n.max(1);
        let mut vals: Vec<Option<Tensor>> = (0..self.graph.slots).map(|_| None).collect();
        for (s, t) in &state.live {
            vals[*s] = Some(match rows {
                Some(r) => t.index_select(0, r),
                None if k > 1 => {
                    let mut reps = vec![1i64; t.dim()];
                    reps[0] = k;
                    t.repeat(reps.as_slice())
                }
                None => t.shallow_clone(),
            });
        }
        vals[self.graph.ops[at].output()] = Some(activated.shallow_clone());
        self.run_range(&mut vals, at + 1, stop + 1, false);
        let slot = if stop + 1 == self.graph.ops.len() {
            self.graph.output
        } else {
            self.graph.ops[stop].output()
        };
        vals[slot].take().expect("the stop op's output is written")
    }

    /// The op whose output is the "block output" of a site for the mid-layer SNR estimator:
    /// the first residual merge (`Add`) after the site, else the network's last op.
    pub fn block_output_op(&self, site: usize) -> usize {
        let at = self.graph.site_ops[site];
        self.graph.ops[at + 1..]
            .iter()
            .position(|op| matches!(op, Op::Add { .. }))
            .map(|i| at + 1 + i)
            .unwrap_or(self.graph.ops.len() - 1)
    }

    /// Evaluation-mode forward that also returns every site's (input, output), in site order,
    /// still attached to the autograd graph (for gradients with respect to site outputs).
    pub fn forward_with_sites(&self, x: &Tensor) -> (Tensor, Vec<(Tensor, Tensor)>) {
        let mut vals: Vec<Option<Tensor>> = (0..self.graph.slots).map(|_| None).collect();
        vals[0] = Some(x.shallow_clone());
        let mut sites: Vec<Option<(Tensor, Tensor)>> =
            (0..self.sites.len()).map(|_| None).collect();
        for (i, op) in self.graph.ops.iter().enumerate() {
            let y = self.eval_op(i, op, &vals, false);
            if let Op::Act { x, site, .. } = op {
                let pre = vals[*x].as_ref().expect("site input is computed");
                sites[*site] = Some((pre.shallow_clone(), y.shallow_clone()));
            }
            vals[op.output()] = Some(y);
            for s in op.inputs() {
                if self.last_use[s] == i {
                    vals[s] = None;
                }
            }
        }
        let out = vals[self.graph.output]
            .take()
            .expect("the output slot is written");
        let sites = sites
            .into_iter()
            .map(|s| s.expect("every site runs"))
            .collect();
        (out, sites)
    }

    /// A content hash of the parameters and buffers (names, shapes and values) with the
    /// architecture and input size, as 16 hex digits (FNV-1a 64): two runs agree on it exactly
    /// when they computed with the same network.
    pub fn param_hash(&self) -> String {
        let mut h = crate::hash::Fnv::default();
        let mut eat = |bytes: &[u8]| h.write(bytes);
        eat(self.name().as_bytes());
        for d in self.config.input {
            eat(&(d as u64).to_le_bytes());
        }
        for (name, t) in self
            .var_store()
            .variables()
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
        {
            eat(name.as_bytes());
            for d in t.size() {
                eat(&d.to_le_bytes());
            }
            let v: Vec<f32> =
                Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))
                    .expect("parameters convert to f32");
            for x in v {
                eat(&x.to_le_bytes());
            }
        }
        h.hex()
    }

    /// The same network with every batch norm that directly follows a convolution folded into
    /// it (evaluation-mode statistics) and dropout (the identity in evaluation) removed, as the
    /// server holds it in secure inference.
    pub fn fold_bn(&self) -> Result<Model> {
        let _guard = tch::no_grad_guard();
        let mut readers = vec![0usize; self.graph.slots];
        for op in &self.graph.ops {
            for s in op.inputs() {
                readers[s] += 1;
            }
        }
        let mut graph = self.graph.clone();
        graph.ops.clear();
        graph.site_ops.clear();
        // (index in new graph, folded weight, folded bias)
        let mut folded: Vec<(usize, Tensor, Tensor)> = Vec::new();
        // Dropout is the identity in evaluation: its readers read its input instead.
        let mut alias: Vec<Slot> = (0..self.graph.slots).collect();
        let mut copied: Vec<(usize, usize)> = Vec::new(); // (new op, old op)
        let ops = &self.graph.ops;
        let mut i = 0;
        while i < ops.len() {
            let mut op = ops[i].clone();
            op.map_inputs(|s| alias[s]);
            let op = &op;
            if let Op::Dropout { x, y, .. } = op {
                alias[*y] = *x;
                i += 1;
                continue;
            }
            if let (
                Op::Conv { y, cout, .. },
                Some(Op::BatchNorm {
                    x: bx, y: by, eps, ..
                }),
            ) = (op, ops.get(i + 1))
            {
                if bx == y && readers[*y] == 1 && *y != self.graph.output {
                    let p = &self.params[i];
                    let b = &self.params[i + 1];
                    let scale = &b[0] / (&b[3] + *eps).sqrt();
                    let w = &p[0] * scale.view([*cout as i64, 1, 1, 1]);
                    let bias0 = p
                        .get(1)
                        .map(|t| t.shallow_clone())
                        .unwrap_or_else(|| b[2].zeros_like());
                    let bias = (bias0 - &b[2]) * &scale + &b[1];
                    let mut conv = op.clone();
                    if let Op::Conv { y, bias, .. } = &mut conv {
                        *y = *by;
                        *bias = true;
                    }
                    folded.push((graph.ops.len(), w, bias));
                    graph.ops.push(conv);
                    i += 2;
                    continue;
                }
            }
            if let Op::Act { .. } = op {
                graph.site_ops.push(graph.ops.len());
            }
            copied.push((graph.ops.len(), i));
            graph.ops.push(op.clone());
            i += 1;
        }
        graph.output = alias[graph.output];
        // Folded networks are for inference, which never runs the auxiliary head.
        graph.aux = None;
        let mut model = Self::from_graph(self.arch, self.config, graph, self.device())?;
        for (new, w, b) in folded {
            model.params[new][0].copy_(&w);
            model.params[new][1].copy_(&b);
        }
        for (new, old) in copied {
            for (dst, src) in model.params[new].iter_mut().zip(&self.params[old]) {
                dst.copy_(src);
            }
        }
        model.options = self.options.clone();
        Ok(model)
    }

    fn run(&self, vals: &mut [Option<Tensor>], from: usize, train: bool) {
        self.run_range(vals, from, self.graph.ops.len(), train)
    }

    fn run_range(&self, vals: &mut [Option<Tensor>], from: usize, to: usize, train: bool) {
        self.run_range_keeping(vals, from, to, train, None)
    }

    /// [`Model::run_range`] that keeps the value of `keep` after its last reader.
    fn run_range_keeping(
        &self,
        vals: &mut [Option<Tensor>],
        from: usize,
        to: usize,
        train: bool,
        keep: Option<Slot>,
    ) {
        for i in from..to {
            let op = &self.graph.ops[i];
            let y = self.eval_op(i, op, vals, train);
            vals[op.output()] = Some(y);
            for s in op.inputs() {
                if self.last_use[s] == i && Some(s) != keep {
                    vals[s] = None;
                }
            }
        }
    }

    fn eval_op(&self, i: usize, op: &Op, vals: &[Option<Tensor>], train: bool) -> Tensor {
        let get = |s: Slot| {
            vals[s]
                .as_ref()
                .expect("graph values are written before read")
        };
        let p = &self.params[i];
        let pair = |v: [usize; 2]| [v[0] as i64, v[1] as i64];
        match op {
            Op::Conv {
                x,
                stride,
                pad,
                dilation,
                groups,
                ..
            } => get(*x).conv2d(
                &p[0],
                p.get(1),
                pair(*stride),
                pair(*pad),
                pair(*dilation),
                *groups as i64,
            ),
            Op::BatchNorm { x, eps, .. } => {
                batch_norm(get(*x), [&p[0], &p[1], &p[2], &p[3]], train, *eps)
            }
            Op::Act { x, site, .. } => match &self.options[*site] {
                None => get(*x).relu(),
                Some(o) => ops::block_relu(get(*x), o),
            },
            Op::Add { a, b, .. } => get(*a) + get(*b),
            Op::MaxPool {
                x,
                kernel,
                stride,
                pad,
                ..
            } => {
                let (k, s, p) = (*kernel as i64, *stride as i64, *pad as i64);
                get(*x).max_pool2d([k, k], [s, s], [p, p], [1, 1], false)
            }
            Op::AvgPool {
                x,
                kernel,
                stride,
                pad,
                count_pad,
                ..
            } => {
                let (k, s, p) = (*kernel as i64, *stride as i64, *pad as i64);
                get(*x).avg_pool2d([k, k], [s, s], [p, p], false, *count_pad, None)
            }
            Op::GlobalAvgPool { x, keepdim, .. } => {
                get(*x).mean_dim([2i64, 3].as_slice(), *keepdim, Kind::Float)
            }
            Op::Concat { xs, .. } => {
                let parts: Vec<&Tensor> = xs.iter().map(|&s| get(s)).collect();
                Tensor::cat(&parts, 1)
            }
            Op::Resize {
                x,
                to,
                align_corners,
                ..
            } => {
                let size = match to {
                    ResizeTo::Like(like) => {
                        let s = get(*like).size();
                        [s[2], s[3]]
                    }
                    ResizeTo::Size([h, w]) => [*h as i64, *w as i64],
                };
                get(*x).upsample_bilinear2d(size, *align_corners, None::<f64>, None::<f64>)
            }
            Op::Flatten { x, .. } => get(*x).flatten(1, -1),
            Op::Dropout { x, p, .. } => get(*x).feature_dropout(*p, train),
            Op::Linear { x, .. } => get(*x).linear(&p[0], Some(&p[1])),
        }
    }
}

/// A `VarStore` path for a dotted torchvision name (`layer1.0.conv1`).
fn path_of<'a>(root: &nn::Path<'a>, name: &str) -> nn::Path<'a> {
    name.split('.').fold(root.clone(), |p, part| p / part)
}

/// Creates every parameter of `graph` under `root` with torchvision's initialisation and
/// returns them per op.
fn create_params(graph: &Graph, root: &nn::Path) -> Vec<Vec<Tensor>> {
    graph
        .ops
        .iter()
        .map(|op| match op {
            Op::Conv {
                name,
                cin,
                cout,
                kernel,
                groups,
                bias,
                ..
            } => {
                let p = path_of(root, name);
                let fan_out = (cout * kernel[0] * kernel[1]) as f64;
                let dims = [
                    *cout as i64,
                    (cin / groups) as i64,
                    kernel[0] as i64,
                    kernel[1] as i64,
                ];
                let mut v = vec![p.var(
                    "weight",
                    &dims,
                    nn::Init::Randn {
                        mean: 0.0,
                        stdev: (2.0 / fan_out).sqrt(),
                    },
                )];
                if *bias {
                    v.push(p.var("bias", &[*cout as i64], nn::Init::Const(0.0)));
                }
                v
            }
            Op::BatchNorm { name, channels, .. } => {
                let p = path_of(root, name);
                let c = [*channels as i64];
                vec![
                    p.var("weight", &c, nn::Init::Const(1.0)),
                    p.var("bias", &c, nn::Init::Const(0.0)),
                    p.zeros_no_train("running_mean", &c),
                    p.ones_no_train("running_var", &c),
                ]
            }
            Op::Linear {
                name, cin, cout, ..
            } => {
                let p = path_of(root, name);
                let bound = 1.0 / (*cin as f64).sqrt();
                let init = nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                };
                vec![
                    p.var("weight", &[*cout as i64, *cin as i64], init),
                    p.var("bias", &[*cout as i64], init),
                ]
            }
            _ => Vec::new(),
        })
        .collect()
}
