//! The network description every model compiles to: a straight-line list of ops over value
//! slots. One description serves the plaintext forward pass (tch), running from a site with
//! cached earlier values (distortion extraction), shape inference (the site dry run), batch-norm
//! folding and, later, secure inference, so none of those needs per-model code.
use crate::error::{Error, Result};

/// Index of a value (a tensor) in a graph; slot 0 is the input image batch.
pub type Slot = usize;

/// One operation. Parameter names (`name`) are torchvision state-dict prefixes.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Conv {
        x: Slot,
        y: Slot,
        name: String,
        cin: usize,
        cout: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        pad: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
        bias: bool,
    },
    /// Batch norm over channels with running statistics (`name.running_mean`, ...).
    BatchNorm {
        x: Slot,
        y: Slot,
        name: String,
        channels: usize,
        eps: f64,
    },
    /// A ReLU site: ordinary ReLU or block ReLU per channel, as the active spec says.
    Act {
        x: Slot,
        y: Slot,
        site: usize,
    },
    Add {
        a: Slot,
        b: Slot,
        y: Slot,
    },
    MaxPool {
        x: Slot,
        y: Slot,
        kernel: usize,
        stride: usize,
        pad: usize,
    },
    /// Average pool. It divides by the number of in-bounds pixels (`count_include_pad=False`,
    /// brelu's own stems), or by the whole window with `count_pad` (PyTorch's default, which
    /// published and imported checkpoints were trained with).
    AvgPool {
        x: Slot,
        y: Slot,
        kernel: usize,
        stride: usize,
        pad: usize,
        count_pad: bool,
    },
    /// [N, C, H, W] -> [N, C], or [N, C, 1, 1] with `keepdim` (DeepLabV3's image pooling).
    GlobalAvgPool {
        x: Slot,
        y: Slot,
        keepdim: bool,
    },
    /// Channel concatenation of [N, C_i, H, W] maps, in the order given.
    Concat {
        xs: Vec<Slot>,
        y: Slot,
    },
    /// Bilinear resize of `x` to a size (PyTorch's `interpolate(mode="bilinear")`, as mmseg's
    /// `resize`): the height and width of another value, or fixed. From a 1x1 map this is a
    /// broadcast.
    Resize {
        x: Slot,
        to: ResizeTo,
        align_corners: bool,
        y: Slot,
    },
    /// [C, H, W] -> [C*H*W] (`torch.flatten(x, 1)`).
    Flatten {
        x: Slot,
        y: Slot,
    },
    /// Channel dropout (`nn.Dropout2d`) with drop probability `p`: identity in evaluation, so
    /// batch-norm folding (and with it secure inference) removes it.
    Dropout {
        x: Slot,
        y: Slot,
        p: f64,
    },
    Linear {
        x: Slot,
        y: Slot,
        name: String,
        cin: usize,
        cout: usize,
    },
}

/// The output size of a [`Op::Resize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTo {
    /// The height and width of this value (read for its shape only).
    Like(Slot),
    /// A fixed [height, width].
    Size([usize; 2]),
}

impl Op {
    /// Slots this op reads.
    pub fn inputs(&self) -> Vec<Slot> {
        match self {
            Op::Add { a, b, .. } => vec![*a, *b],
            Op::Resize {
                x,
                to: ResizeTo::Like(like),
                ..
            } => vec![*x, *like],
            Op::Concat { xs, .. } => xs.clone(),
            Op::Conv { x, .. }
            | Op::BatchNorm { x, .. }
            | Op::Act { x, .. }
            | Op::MaxPool { x, .. }
            | Op::AvgPool { x, .. }
            | Op::GlobalAvgPool { x, .. }
            | Op::Dropout { x, .. }
            | Op::Flatten { x, .. }
            | Op::Resize { x, .. }
            | Op::Linear { x, .. } => vec![*x],
        }
    }

    /// Rewrites every slot this op reads through `f`.
    pub fn map_inputs(&mut self, f: impl Fn(Slot) -> Slot) {
        match self {
            Op::Add { a, b, .. } => {
                *a = f(*a);
                *b = f(*b);
            }
            Op::Resize { x, to, .. } => {
                *x = f(*x);
                if let ResizeTo::Like(like) = to {
                    *like = f(*like);
                }
            }
            Op::Concat { xs, .. } => xs.iter_mut().for_each(|s| *s = f(*s)),
            Op::Conv { x, .. }
            | Op::BatchNorm { x, .. }
            | Op::Act { x, .. }
            | Op::MaxPool { x, .. }
            | Op::AvgPool { x, .. }
            | Op::GlobalAvgPool { x, .. }
            | Op::Dropout { x, .. }
            | Op::Flatten { x, .. }
            | Op::Linear { x, .. } => *x = f(*x),
        }
    }

    /// The slot this op writes.
    pub fn output(&self) -> Slot {
        match self {
            Op::Conv { y, .. }
            | Op::BatchNorm { y, .. }
            | Op::Act { y, .. }
            | Op::Add { y, .. }
            | Op::MaxPool { y, .. }
            | Op::AvgPool { y, .. }
            | Op::GlobalAvgPool { y, .. }
            | Op::Concat { y, .. }
            | Op::Resize { y, .. }
            | Op::Dropout { y, .. }
            | Op::Flatten { y, .. }
            | Op::Linear { y, .. } => *y,
        }
    }
}

/// A model's computation: ops in execution order, the output slot and the site names.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub ops: Vec<Op>,
    pub slots: usize,
    pub output: Slot,
    pub sites: Vec<String>,
    /// For each site, the index in `ops` of its `Act` op.
    pub site_ops: Vec<usize>,
    /// A training-only auxiliary head on an intermediate value (mmseg's `auxiliary_head`):
    /// not an op, never run at inference and holding no site.
    pub aux: Option<AuxHead>,
}

/// mmseg's `FCNHead` as the published DeepLabV3 configs use it for their auxiliary loss: a
/// 3x3 conv (`channels`, no bias) -> BN -> ReLU (not a site), channel dropout, and a 1x1
/// classifier with bias, read from `input` (a stage output with `in_channels` channels).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AuxHead {
    pub input: Slot,
    pub in_channels: usize,
    pub channels: usize,
    pub dropout: f64,
}

/// Builds a [`Graph`]; model files call these in forward order.
pub struct GraphBuilder {
    g: Graph,
}

impl Default for GraphBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl GraphBuilder {
    pub fn new() -> Self {
        GraphBuilder {
            g: Graph {
                slots: 1,
                ..Graph::default()
            },
        }
    }

    /// The input image batch.
    pub fn input(&self) -> Slot {
        0
    }

    fn push(&mut self, make: impl FnOnce(Slot) -> Op) -> Slot {
        let y = self.g.slots;
        self.g.slots += 1;
        self.g.ops.push(make(y));
        y
    }

    /// A bias-free k x k convolution with "same"-style padding (k/2) times dilation.
    pub fn conv(
        &mut self,
        x: Slot,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    ) -> Slot {
        self.conv_full(x, name, cin, cout, k, stride, 1, 1, false)
    }

    /// A depthwise k x k convolution.
    pub fn conv_dw(&mut self, x: Slot, name: &str, c: usize, k: usize, stride: usize) -> Slot {
        self.conv_full(x, name, c, c, k, stride, 1, c, false)
    }

    pub fn conv_full(
        &mut self,
        x: Slot,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        dilation: usize,
        groups: usize,
        bias: bool,
    ) -> Slot {
        let pad = dilation * (k - 1) / 2;
        self.push(|y| Op::Conv {
            x,
            y,
            name: name.to_string(),
            cin,
            cout,
            kernel: [k, k],
            stride: [stride, stride],
            pad: [pad, pad],
            dilation: [dilation, dilation],
            groups,
            bias,
        })
    }

    pub fn bn(&mut self, x: Slot, name: &str, channels: usize) -> Slot {
        self.push(|y| Op::BatchNorm {
            x,
            y,
            name: name.to_string(),
            channels,
            eps: 1e-5,
        })
    }

    /// A ReLU site named `site` (docs/method.md section 4 names).
    pub fn act(&mut self, x: Slot, site: &str) -> Slot {
        let site_index = self.g.sites.len();
        self.g.sites.push(site.to_string());
        self.g.site_ops.push(self.g.ops.len());
        self.push(|y| Op::Act {
            x,
            y,
            site: site_index,
        })
    }

    pub fn add(&mut self, a: Slot, b: Slot) -> Slot {
        self.push(|y| Op::Add { a, b, y })
    }

    pub fn max_pool(&mut self, x: Slot, kernel: usize, stride: usize, pad: usize) -> Slot {
        self.push(|y| Op::MaxPool {
            x,
            y,
            kernel,
            stride,
            pad,
        })
    }

    /// Average pool dividing by the in-bounds pixels (`count_include_pad=False`).
    pub fn avg_pool(&mut self, x: Slot, kernel: usize, stride: usize, pad: usize) -> Slot {
        self.avg_pool_divisor(x, kernel, stride, pad, false)
    }

    /// Average pool dividing by the whole window, padding included, with `count_pad`
    /// (`count_include_pad=True`, PyTorch's default), else by the in-bounds pixels.
    pub fn avg_pool_divisor(
        &mut self,
        x: Slot,
        kernel: usize,
        stride: usize,
        pad: usize,
        count_pad: bool,
    ) -> Slot {
        self.push(|y| Op::AvgPool {
            x,
            y,
            kernel,
            stride,
            pad,
            count_pad,
        })
    }

    /// [N, C, H, W] -> [N, C] (before a classifier).
    pub fn global_avg_pool(&mut self, x: Slot) -> Slot {
        self.push(|y| Op::GlobalAvgPool {
            x,
            y,
            keepdim: false,
        })
    }

    /// [N, C, H, W] -> [N, C, 1, 1] (`AdaptiveAvgPool2d(1)`).
    pub fn global_avg_pool_keepdim(&mut self, x: Slot) -> Slot {
        self.push(|y| Op::GlobalAvgPool {
            x,
            y,
            keepdim: true,
        })
    }

    /// Channel concatenation, in the order of `xs`.
    pub fn concat(&mut self, xs: &[Slot]) -> Slot {
        let xs = xs.to_vec();
        self.push(|y| Op::Concat { xs, y })
    }

    /// Bilinear resize (align_corners=False) of `x` to the spatial size of `like`.
    pub fn resize_like(&mut self, x: Slot, like: Slot) -> Slot {
        self.push(|y| Op::Resize {
            x,
            to: ResizeTo::Like(like),
            align_corners: false,
            y,
        })
    }

    /// Appends an op that writes a fresh slot (`make` receives it): what importers use.
    pub fn op(&mut self, make: impl FnOnce(Slot) -> Op) -> Slot {
        self.push(make)
    }

    /// Channel dropout with drop probability `p` (active only in training).
    pub fn dropout2d(&mut self, x: Slot, p: f64) -> Slot {
        self.push(|y| Op::Dropout { x, y, p })
    }

    pub fn linear(&mut self, x: Slot, name: &str, cin: usize, cout: usize) -> Slot {
        self.push(|y| Op::Linear {
            x,
            y,
            name: name.to_string(),
            cin,
            cout,
        })
    }

    /// The graph built so far.
    pub fn graph(&self) -> &Graph {
        &self.g
    }

    /// Declares the training-only auxiliary head on `head.input`.
    pub fn aux_head(&mut self, head: AuxHead) {
        self.g.aux = Some(head);
    }

    /// Finishes the graph with `output` as the network output.
    pub fn finish(mut self, output: Slot) -> Graph {
        self.g.output = output;
        self.g
    }
}

/// Shape of a value: [C, H, W] for feature maps, [F] after pooling to a vector.
pub type Shape = Vec<usize>;

fn out_len(len: usize, k: usize, stride: usize, pad: usize, dilation: usize) -> Option<usize> {
    let eff = dilation * (k - 1) + 1;
    (len + 2 * pad).checked_sub(eff).map(|v| v / stride + 1)
}

/// The output shape of a k x k pooling window over a [C, H, W] map, if it fits.
fn pool_shape(s: &[usize], k: usize, stride: usize, pad: usize) -> Option<Shape> {
    let [c, h, w] = s[..] else { return None };
    match (out_len(h, k, stride, pad, 1), out_len(w, k, stride, pad, 1)) {
        (Some(ho), Some(wo)) if ho > 0 && wo > 0 => Some(vec![c, ho, wo]),
        _ => None,
    }
}

/// The shape of `x` resized to `to` (`like`: the shape of the value it names), if valid.
fn resize_shape(x: &[usize], to: ResizeTo, like: Option<&[usize]>) -> Option<Shape> {
    let [h, w] = match (to, like) {
        (ResizeTo::Size(hw), _) => hw,
        (ResizeTo::Like(_), Some([_, h, w])) => [*h, *w],
        _ => return None,
    };
    (x.len() == 3 && h > 0 && w > 0).then(|| vec![x[0], h, w])
}

impl Graph {
    /// Shapes of every slot (per sample) for an input of shape [C, H, W]: the dry run that
    /// finds each site's [C, H, W]. Fails on an input the network cannot take, naming the op.
    pub fn infer_shapes(&self, input: [usize; 3]) -> Result<Vec<Shape>> {
        let mut shapes: Vec<Option<Shape>> = vec![None; self.slots];
        shapes[0] = Some(input.to_vec());
        for op in &self.ops {
            let get = |s: Slot| {
                shapes[s]
                    .clone()
                    .expect("graph slots are written before read")
            };
            let bad = |what: String| Error::Shape {
                op: op_name(op),
                msg: what,
            };
            let y = match op {
                Op::Conv {
                    x,
                    cin,
                    cout,
                    kernel,
                    stride,
                    pad,
                    dilation,
                    ..
                } => {
                    let s = get(*x);
                    if s.len() != 3 || s[0] != *cin {
                        return Err(bad(format!("expected [{cin}, H, W] input, got {s:?}")));
                    }
                    let h = out_len(s[1], kernel[0], stride[0], pad[0], dilation[0]);
                    let w = out_len(s[2], kernel[1], stride[1], pad[1], dilation[1]);
                    match (h, w) {
                        (Some(h), Some(w)) if h > 0 && w > 0 => vec![*cout, h, w],
                        _ => return Err(bad(format!("input {s:?} is smaller than the kernel"))),
                    }
                }
                Op::BatchNorm { x, channels, .. } => {
                    let s = get(*x);
                    if s[0] != *channels {
                        return Err(bad(format!("expected {channels} channels, got {s:?}")));
                    }
                    s
                }
                Op::Act { x, .. } => get(*x),
                Op::Add { a, b, .. } => {
                    let (sa, sb) = (get(*a), get(*b));
                    if sa != sb {
                        return Err(bad(format!("operands differ: {sa:?} and {sb:?}")));
                    }
                    sa
                }
                Op::MaxPool {
                    x,
                    kernel,
                    stride,
                    pad,
                    ..
                }
                | Op::AvgPool {
                    x,
                    kernel,
                    stride,
                    pad,
                    ..
                } => {
                    let s = get(*x);
                    pool_shape(&s, *kernel, *stride, *pad).ok_or_else(|| {
                        bad(format!(
                            "input {s:?} is not a [C, H, W] map the window fits"
                        ))
                    })?
                }
                Op::GlobalAvgPool { x, keepdim, .. } => {
                    let s = get(*x);
                    if s.len() != 3 {
                        return Err(bad(format!("expected a [C, H, W] map, got {s:?}")));
                    }
                    let kept: &[usize] = if *keepdim { &[1, 1] } else { &[] };
                    [&[s[0]], kept].concat()
                }
                Op::Concat { xs, .. } => {
                    let parts: Vec<Shape> = xs.iter().map(|&s| get(s)).collect();
                    let first = parts
                        .first()
                        .ok_or_else(|| bad("nothing to concatenate".into()))?;
                    if parts.iter().any(|p| p.len() != 3 || p[1..] != first[1..]) {
                        return Err(bad(format!(
                            "operands must be [C, H, W] maps of one size, got {parts:?}"
                        )));
                    }
                    vec![parts.iter().map(|p| p[0]).sum(), first[1], first[2]]
                }
                Op::Resize { x, to, .. } => {
                    let like = match to {
                        ResizeTo::Like(l) => Some(get(*l)),
                        ResizeTo::Size(_) => None,
                    };
                    resize_shape(&get(*x), *to, like.as_deref()).ok_or_else(|| {
                        bad(format!(
                            "resizes a [C, H, W] map to a positive [H, W], got {to:?}"
                        ))
                    })?
                }
                Op::Flatten { x, .. } => vec![get(*x).iter().product()],
                Op::Dropout { x, .. } => get(*x),
                Op::Linear { x, cin, cout, .. } => {
                    let s = get(*x);
                    if s != [*cin] {
                        return Err(bad(format!("expected [{cin}] input, got {s:?}")));
                    }
                    vec![*cout]
                }
            };
            shapes[op.output()] = Some(y);
        }
        Ok(shapes.into_iter().map(|s| s.unwrap_or_default()).collect())
    }

    /// Slots that hold a value computed before op `at` and read by an op after it: the state
    /// that must be cached to resume the network just after op `at`. Includes `at`'s output.
    pub fn live_after(&self, at: usize) -> Vec<Slot> {
        let mut defined = vec![false; self.slots];
        defined[0] = true;
        for op in &self.ops[..=at] {
            defined[op.output()] = true;
        }
        let mut live = vec![false; self.slots];
        for op in &self.ops[at + 1..] {
            for i in op.inputs() {
                if defined[i] {
                    live[i] = true;
                }
            }
        }
        if defined[self.output] {
            live[self.output] = true;
        }
        (0..self.slots).filter(|&s| live[s]).collect()
    }
}

/// A short description of an op for error messages.
pub fn op_name(op: &Op) -> String {
    match op {
        Op::Conv { name, .. } | Op::BatchNorm { name, .. } | Op::Linear { name, .. } => {
            name.clone()
        }
        Op::Act { site, .. } => format!("site #{site}"),
        Op::Add { y, .. } => format!("add -> %{y}"),
        Op::MaxPool { y, .. } => format!("max-pool -> %{y}"),
        Op::AvgPool { y, .. } => format!("avg-pool -> %{y}"),
        Op::GlobalAvgPool { y, .. } => format!("global-avg-pool -> %{y}"),
        Op::Concat { y, .. } => format!("concat -> %{y}"),
        Op::Resize { y, .. } => format!("resize -> %{y}"),
        Op::Dropout { y, .. } => format!("dropout -> %{y}"),
        Op::Flatten { y, .. } => format!("flatten -> %{y}"),
    }
}
