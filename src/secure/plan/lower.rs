//! Lowering a model to a plan: batch norm folded into the convolutions, every op turned into
//! a ring layer, the weights encoded in fixed point.
use super::{ActPlan, Interp, Layer, Plan, Settings, Weights, Windows};
use crate::error::{Error, Result};
use crate::models::{Model, Op, Slot};
use crate::secure::gemm::ConvGeom;
use crate::spec::PatchOption;
use tch::{Kind, Tensor};

/// A layer, its name for tables and, for a linear layer, its fixed-point (weight, bias).
type Lowered = (Layer, String, Option<(Vec<u64>, Vec<u64>)>);

impl Plan {
    /// The plan of a model (its active spec included) and the server's weights, with batch
    /// norm folded into the convolutions.
    pub fn from_model(model: &Model, settings: Settings) -> Result<(Plan, Weights)> {
        settings.validate()?;
        let folded = model.fold_bn()?;
        let graph = folded.graph();
        let cfg = folded.config();
        let shapes = graph.infer_shapes(cfg.input)?;
        let lowering = Lowering {
            model: &folded,
            shapes: &shapes,
            settings,
        };
        let mut layers = Vec::with_capacity(graph.ops.len());
        let mut names = Vec::with_capacity(graph.ops.len());
        let mut weights = Vec::with_capacity(graph.ops.len());
        for (i, op) in graph.ops.iter().enumerate() {
            let (layer, name, w) = lowering.op(i, op)?;
            layers.push(layer);
            names.push(name);
            weights.push(w);
        }
        Ok((
            Plan {
                model: folded.name().to_string(),
                input: cfg.input,
                classes: cfg.num_classes,
                slots: graph.slots,
                output: graph.output,
                outputs: shapes[graph.output].iter().product(),
                layers,
                names,
                settings,
            },
            Weights { layers: weights },
        ))
    }
}

/// What lowering one op needs: the folded model and the shapes of its values.
struct Lowering<'a> {
    model: &'a Model,
    shapes: &'a [Vec<usize>],
    settings: Settings,
}

impl Lowering<'_> {
    fn chw(&self, s: Slot) -> Result<(usize, usize, usize)> {
        match self.shapes[s].as_slice() {
            [c, h, w] => Ok((*c, *h, *w)),
            s => Err(Error::Shape {
                op: "secure plan".into(),
                msg: format!("expected a [C, H, W] value, got {s:?}"),
            }),
        }
    }

    fn enc(&self, t: &Tensor, what: &str) -> Result<Vec<u64>> {
        let v: Vec<f32> = Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1))?;
        self.settings.fixed.encode_all(&v, what)
    }

    /// Op `i` as a ring layer.
    fn op(&self, i: usize, op: &Op) -> Result<Lowered> {
        let params = self.model.op_params(i);
        Ok(match op {
            Op::Conv {
                x,
                y,
                name,
                cin,
                cout,
                kernel,
                stride,
                pad,
                dilation,
                groups,
                ..
            } => {
                let (_, h, w) = self.chw(*x)?;
                let geom = ConvGeom {
                    cin: *cin,
                    cout: *cout,
                    h,
                    w,
                    kernel: *kernel,
                    stride: *stride,
                    pad: *pad,
                    dilation: *dilation,
                    groups: *groups,
                };
                let bias = match params.get(1) {
                    Some(b) => self.enc(b, &format!("bias of {name}"))?,
                    None => vec![0; *cout],
                };
                (
                    Layer::Conv { x: *x, y: *y, geom },
                    name.clone(),
                    Some((self.enc(&params[0], &format!("weight of {name}"))?, bias)),
                )
            }
            Op::Linear {
                x,
                y,
                name,
                cin,
                cout,
            } => (
                Layer::Linear {
                    x: *x,
                    y: *y,
                    cin: *cin,
                    cout: *cout,
                },
                name.clone(),
                Some((
                    self.enc(&params[0], &format!("weight of {name}"))?,
                    self.enc(&params[1], &format!("bias of {name}"))?,
                )),
            ),
            Op::BatchNorm { name, .. } => {
                return Err(Error::NotImplemented(format!(
                    "secure inference of batch norm '{name}' that does not follow a \
                 convolution"
                )))
            }
            Op::Act { x, y, site } => {
                let (c, h, w) = self.chw(*x)?;
                let opts = self
                    .model
                    .site_options(*site)
                    .map(|o| o.to_vec())
                    .unwrap_or_else(|| vec![PatchOption::RELU; c]);
                (
                    Layer::Act {
                        x: *x,
                        y: *y,
                        site: *site,
                        act: ActPlan::new(&opts, c, h, w),
                    },
                    self.model.graph().sites[*site].clone(),
                    None,
                )
            }
            Op::Dropout { .. } => {
                return Err(Error::NotImplemented(
                    "secure inference of dropout (batch-norm folding removes it)".into(),
                ))
            }
            other => self.local(other)?,
        })
    }

    /// The layers every party computes on its own shares: additions, pooling windows,
    /// concatenations and resizes.
    fn local(&self, op: &Op) -> Result<Lowered> {
        Ok(match op {
            Op::Add { a, b, y } => (
                Layer::Add {
                    a: *a,
                    b: *b,
                    y: *y,
                },
                format!("add%{y}"),
                None,
            ),
            Op::MaxPool {
                x,
                y,
                kernel,
                stride,
                pad,
            } => {
                let (c, h, w) = self.chw(*x)?;
                (
                    Layer::MaxPool {
                        x: *x,
                        y: *y,
                        win: Windows::new(c, h, w, *kernel, *stride, *pad),
                    },
                    format!("maxpool%{y}"),
                    None,
                )
            }
            Op::AvgPool {
                x,
                y,
                kernel,
                stride,
                pad,
                count_pad,
            } => {
                let (c, h, w) = self.chw(*x)?;
                let win = Windows::new(c, h, w, *kernel, *stride, *pad);
                (
                    Layer::AvgPool {
                        x: *x,
                        y: *y,
                        win: if *count_pad {
                            win.counting_padding(*kernel)
                        } else {
                            win
                        },
                    },
                    format!("avgpool%{y}"),
                    None,
                )
            }
            Op::GlobalAvgPool { x, y, .. } => {
                let (c, h, w) = self.chw(*x)?;
                (
                    Layer::GlobalAvgPool {
                        x: *x,
                        y: *y,
                        c,
                        hw: h * w,
                    },
                    "global_avg_pool".to_string(),
                    None,
                )
            }
            Op::Concat { xs, y } => (
                Layer::Concat {
                    xs: xs.clone(),
                    y: *y,
                },
                format!("concat%{y}"),
                None,
            ),
            Op::Resize {
                x,
                y,
                align_corners,
                ..
            } => {
                let (c, h, w) = self.chw(*x)?;
                let (_, ho, wo) = self.chw(*y)?;
                (
                    Layer::Resize {
                        x: *x,
                        y: *y,
                        interp: Interp::new(c, [h, w], [ho, wo], *align_corners),
                    },
                    format!("resize%{y}"),
                    None,
                )
            }
            // Values travel flat: flattening is a copy, a concatenation of one.
            Op::Flatten { x, y } => (
                Layer::Concat {
                    xs: vec![*x],
                    y: *y,
                },
                format!("flatten%{y}"),
                None,
            ),
            Op::Conv { .. }
            | Op::Linear { .. }
            | Op::BatchNorm { .. }
            | Op::Act { .. }
            | Op::Dropout { .. } => unreachable!("lowered by Lowering::op"),
        })
    }
}
