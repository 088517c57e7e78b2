//! brelu network -> ONNX (opset 17), block ReLUs included, written with standard operators so
//! that any ONNX runtime runs the fine-tuned network as brelu does (docs/method.md 2):
//! channels grouped by option (`Gather`); per group, tiles summed (`Pad`, `Reshape`,
//! `ReduceSum`), the sign mask (`Greater`, `Cast`) expanded back to pixels (`Expand`,
//! `Reshape`, `Slice`) and multiplied in; identity and zero channels pass or vanish; groups put
//! back in channel order (`Concat`, `Gather`). Node names follow PyTorch's scopes
//! (`/layer1.0.conv1/Conv`, `/stem/Relu`), so an export without block ReLUs imports back with
//! the same site and parameter names.
use super::proto::{
    attr_type, data_type, AttributeProto, Dimension, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    TypeProtoTensor, ValueInfoProto,
};
use crate::error::{Error, Result};
use crate::models::graph::{Op, Slot};
use crate::models::Model;
use crate::ops::reference::group_channels;
use crate::spec::PatchOption;
use std::collections::HashSet;
use std::path::Path;
use tch::{Kind, Tensor};

/// The opset brelu writes.
pub const OPSET: i64 = 17;

/// Extra facts stored in the file's metadata (`metadata_props`).
#[derive(Clone, Debug, Default)]
pub struct ExportInfo {
    /// Per-channel input normalisation the network expects (mean, std), if known.
    pub normalization: Option<(Vec<f64>, Vec<f64>)>,
    /// The spec JSON in use, if any.
    pub spec_json: Option<String>,
}

/// The model (its active block-ReLU options included) as an ONNX model.
pub fn to_onnx(model: &Model, info: &ExportInfo) -> Result<ModelProto> {
    let graph = model.graph();
    let shapes = graph.infer_shapes(model.config().input)?;
    let mut w = Writer {
        nodes: Vec::new(),
        names: HashSet::new(),
        inits: Vec::new(),
        output: graph.output,
        fresh: 0,
    };
    for (i, op) in graph.ops.iter().enumerate() {
        w.op(model, i, op, &shapes)?;
    }
    let [c, h, wd] = model.config().input;
    let out_shape: Vec<Option<usize>> = std::iter::once(None)
        .chain(shapes[graph.output].iter().map(|&d| Some(d)))
        .collect();
    let mut props = vec![StringStringEntryProto {
        key: "brelu.model".into(),
        value: model.name().to_string(),
    }];
    if let Some((mean, std)) = &info.normalization {
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        props.push(StringStringEntryProto {
            key: "brelu.input_mean".into(),
            value: list(mean),
        });
        props.push(StringStringEntryProto {
            key: "brelu.input_std".into(),
            value: list(std),
        });
    }
    if let Some(spec) = &info.spec_json {
        props.push(StringStringEntryProto {
            key: "brelu.spec".into(),
            value: spec.clone(),
        });
    }
    Ok(ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "brelu".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!(
            "{} exported by brelu; input: normalised images [N, {c}, {h}, {wd}]",
            model.name()
        ),
        graph: Some(GraphProto {
            node: w.nodes,
            name: model.name().to_string(),
            initializer: w.inits,
            input: vec![value_info("input", &[None, Some(c), Some(h), Some(wd)])],
            output: vec![value_info("logits", &out_shape)],
        }),
        metadata_props: props,
    })
}

/// Writes the model as an ONNX file (atomically).
pub fn write(model: &Model, info: &ExportInfo, path: &Path) -> Result<()> {
    let proto = to_onnx(model, info)?;
    crate::fs::write_atomic(path, &prost::Message::encode_to_vec(&proto))
}

/// A float tensor's shape and values.
#[derive(Debug)]
struct Values {
    dims: Vec<i64>,
    data: Vec<f32>,
}

fn values(t: &Tensor) -> Result<Values> {
    let t = t
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    Ok(Values {
        dims: t.size(),
        data: Vec::<f32>::try_from(t.flatten(0, -1))?,
    })
}

fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: data_type::FLOAT,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| match d {
                            Some(v) => Dimension {
                                dim_value: Some(*v as i64),
                                dim_param: None,
                            },
                            None => Dimension {
                                dim_value: None,
                                dim_param: Some("N".into()),
                            },
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INT,
        i: v,
        ..Default::default()
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::FLOAT,
        f: v,
        ..Default::default()
    }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::STRING,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

struct Writer {
    nodes: Vec<NodeProto>,
    /// Node names taken so far (block-ReLU subgraphs make tens of thousands of nodes).
    names: HashSet<String>,
    inits: Vec<TensorProto>,
    output: Slot,
    fresh: usize,
}

impl Writer {
    fn slot(&self, s: Slot) -> String {
        if s == 0 {
            "input".into()
        } else if s == self.output {
            "logits".into()
        } else {
            format!("v{s}")
        }
    }

    /// A fresh value name for an intermediate of the block-ReLU subgraphs.
    fn tmp(&mut self) -> String {
        self.fresh += 1;
        format!("t{}", self.fresh)
    }

    fn node<S: AsRef<str>>(
        &mut self,
        scope: &str,
        op: &str,
        inputs: &[S],
        output: &str,
        attrs: Vec<AttributeProto>,
    ) {
        // The first node of a scope keeps the plain PyTorch-style name.
        let plain = format!("/{scope}/{op}");
        let name = if self.names.contains(&plain) {
            format!("{plain}_{}", self.nodes.len())
        } else {
            plain
        };
        self.names.insert(name.clone());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.as_ref().to_string()).collect(),
            output: vec![output.into()],
            name,
            op_type: op.into(),
            domain: String::new(),
            attribute: attrs,
        });
    }

    /// A node of one network value.
    fn unary(&mut self, scope: &str, op: &str, x: Slot, y: &str, attrs: Vec<AttributeProto>) {
        let x = self.slot(x);
        self.node(scope, op, &[x], y, attrs);
    }

    fn init_f32(&mut self, name: &str, v: &Values) -> String {
        self.inits.push(TensorProto {
            dims: v.dims.clone(),
            data_type: data_type::FLOAT,
            name: name.into(),
            raw_data: v.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    fn init_i64(&mut self, name: &str, v: &[i64]) -> String {
        self.inits.push(TensorProto {
            dims: vec![v.len() as i64],
            data_type: data_type::INT64,
            name: name.into(),
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    fn params(
        &mut self,
        model: &Model,
        i: usize,
        name: &str,
        fields: &[&str],
    ) -> Result<Vec<String>> {
        model
            .op_params(i)
            .iter()
            .zip(fields)
            .map(|(t, f)| Ok(self.init_f32(&format!("{name}.{f}"), &values(t)?)))
            .collect()
    }

    fn op(&mut self, model: &Model, i: usize, op: &Op, shapes: &[Vec<usize>]) -> Result<()> {
        let y = self.slot(op.output());
        let pad2 = |p: [usize; 2]| [p[0] as i64, p[1] as i64, p[0] as i64, p[1] as i64];
        let pair = |p: [usize; 2]| [p[0] as i64, p[1] as i64];
        match op {
            Op::Conv {
                x,
                name,
                kernel,
                stride,
                pad,
                dilation,
                groups,
                ..
            } => {
                let p = self.params(model, i, name, &["weight", "bias"])?;
                let mut ins = vec![self.slot(*x)];
                ins.extend(p);
                let attrs = vec![
                    ints("kernel_shape", &pair(*kernel)),
                    ints("strides", &pair(*stride)),
                    ints("pads", &pad2(*pad)),
                    ints("dilations", &pair(*dilation)),
                    int("group", *groups as i64),
                ];
                self.node(name, "Conv", &ins, &y, attrs);
            }
            Op::BatchNorm { x, name, eps, .. } => {
                let p = self.params(
                    model,
                    i,
                    name,
                    &["weight", "bias", "running_mean", "running_var"],
                )?;
                let ins: Vec<String> = std::iter::once(self.slot(*x)).chain(p).collect();
                self.node(
                    name,
                    "BatchNormalization",
                    &ins,
                    &y,
                    vec![float("epsilon", *eps as f32)],
                );
            }
            Op::Act { x, site, .. } => {
                let info = &model.sites()[*site];
                let x = self.slot(*x);
                match model.site_options(*site) {
                    None => self.node(&info.name, "Relu", &[&x], &y, vec![]),
                    Some(opts) => {
                        let chw = [info.channels, info.height, info.width];
                        self.block_relu(&info.name, &x, &y, opts, chw);
                    }
                }
            }
            Op::Add { a, b, .. } => {
                let (a, b) = (self.slot(*a), self.slot(*b));
                self.node(&format!("add{}", op.output()), "Add", &[&a, &b], &y, vec![]);
            }
            Op::MaxPool {
                x,
                kernel,
                stride,
                pad,
                ..
            } => self.pool(*x, [*kernel, *stride, *pad], None, &y, op.output()),
            Op::AvgPool {
                x,
                kernel,
                stride,
                pad,
                count_pad,
                ..
            } => self.pool(
                *x,
                [*kernel, *stride, *pad],
                Some(*count_pad),
                &y,
                op.output(),
            ),
            Op::GlobalAvgPool { x, keepdim, .. } => {
                let x = self.slot(*x);
                let scope = format!("pool{}", op.output());
                if *keepdim {
                    self.node(&scope, "GlobalAveragePool", &[&x], &y, vec![]);
                } else {
                    let t = self.tmp();
                    self.node(&scope, "GlobalAveragePool", &[&x], &t, vec![]);
                    self.node(&scope, "Flatten", &[&t], &y, vec![int("axis", 1)]);
                }
            }
            Op::Concat { xs, .. } => {
                let xs: Vec<String> = xs.iter().map(|&s| self.slot(s)).collect();
                let scope = format!("concat{}", op.output());
                self.node(&scope, "Concat", &xs, &y, vec![int("axis", 1)]);
            }
            Op::Resize {
                x, align_corners, ..
            } => self.resize(*x, *align_corners, &y, &shapes[op.output()], op.output())?,
            Op::Dropout { x, .. } => {
                let scope = format!("dropout{}", op.output());
                self.unary(&scope, "Identity", *x, &y, vec![]);
            }
            Op::Flatten { x, .. } => {
                let scope = format!("flatten{}", op.output());
                self.unary(&scope, "Flatten", *x, &y, vec![int("axis", 1)]);
            }
            Op::Linear { x, name, .. } => {
                let p = self.params(model, i, name, &["weight", "bias"])?;
                let x = self.slot(*x);
                self.node(
                    name,
                    "Gemm",
                    &[&x, &p[0], &p[1]],
                    &y,
                    vec![int("transB", 1)],
                );
            }
        }
        Ok(())
    }

    /// A resize to the map size of `out_shape`; the batch stays free.
    fn resize(
        &mut self,
        x: Slot,
        align_corners: bool,
        y: &str,
        out_shape: &[usize],
        out: Slot,
    ) -> Result<()> {
        let [_, ho, wo] = out_shape[..] else {
            return Err(Error::Shape {
                op: format!("resize %{out}"),
                msg: "resizes a [C, H, W] map".into(),
            });
        };
        let scope = format!("resize{out}");
        let x = self.slot(x);
        // sizes = [N, C] of x followed by the target size.
        let (shape, nc, sizes) = (self.tmp(), self.tmp(), self.tmp());
        self.node(&scope, "Shape", &[&x], &shape, vec![]);
        let (s0, s2, ax) = (
            self.init_i64(&format!("{scope}.start"), &[0]),
            self.init_i64(&format!("{scope}.end"), &[2]),
            self.init_i64(&format!("{scope}.axes"), &[0]),
        );
        self.node(&scope, "Slice", &[&shape, &s0, &s2, &ax], &nc, vec![]);
        let hw = self.init_i64(&format!("{scope}.size"), &[ho as i64, wo as i64]);
        self.node(&scope, "Concat", &[&nc, &hw], &sizes, vec![int("axis", 0)]);
        let mode = if align_corners {
            "align_corners"
        } else {
            "half_pixel"
        };
        let attrs = vec![
            string("mode", "linear"),
            string("coordinate_transformation_mode", mode),
        ];
        self.node(&scope, "Resize", &[&x, "", "", &sizes], y, attrs);
        Ok(())
    }

    /// A k x k pool with stride and padding; `count_pad` for an average pool.
    fn pool(
        &mut self,
        x: Slot,
        [k, s, p]: [usize; 3],
        count_pad: Option<bool>,
        y: &str,
        out: Slot,
    ) {
        let (k, s, p) = (k as i64, s as i64, p as i64);
        let mut attrs = vec![
            ints("kernel_shape", &[k, k]),
            ints("strides", &[s, s]),
            ints("pads", &[p, p, p, p]),
        ];
        let kind = match count_pad {
            Some(c) => {
                attrs.push(int("count_include_pad", c as i64));
                "AveragePool"
            }
            None => "MaxPool",
        };
        let x = self.slot(x);
        self.node(&format!("pool{out}"), kind, &[&x], y, attrs);
    }

    /// The block ReLU of one site on `x` [N, C, H, W] into `y`.
    fn block_relu(&mut self, scope: &str, x: &str, y: &str, opts: &[PatchOption], chw: [usize; 3]) {
        let [_, h, w] = chw.map(|v| v as i64);
        let groups = group_channels(opts);
        let single = groups.len() == 1;
        let mut outs = Vec::new();
        let mut order: Vec<i64> = Vec::new();
        for (g, (opt, chans)) in groups.iter().enumerate() {
            let cg = chans.len() as i64;
            let xg = if single {
                x.to_string()
            } else {
                let idx = self.init_i64(&format!("{scope}.group{g}.channels"), chans);
                let t = self.tmp();
                self.node(scope, "Gather", &[x, &idx], &t, vec![int("axis", 1)]);
                t
            };
            order.extend(chans);
            let out = if single { y.to_string() } else { self.tmp() };
            match *opt {
                PatchOption::Identity => self.node(scope, "Identity", &[&xg], &out, vec![]),
                PatchOption::Zero => {
                    let zero = self.init_f32(
                        &format!("{scope}.group{g}.zero"),
                        &Values {
                            dims: vec![],
                            data: vec![0.0],
                        },
                    );
                    self.node(scope, "Mul", &[&xg, &zero], &out, vec![]);
                }
                PatchOption::Patch { bh: 1, bw: 1 } => {
                    self.node(scope, "Relu", &[&xg], &out, vec![])
                }
                PatchOption::Patch { bh, bw } => {
                    let (bh, bw) = (bh as i64, bw as i64);
                    let (ph, pw) = ((h + bh - 1) / bh, (w + bw - 1) / bw);
                    let pre = format!("{scope}.group{g}");
                    let mut cur = xg.clone();
                    if ph * bh != h || pw * bw != w {
                        let pads = self.init_i64(
                            &format!("{pre}.pads"),
                            &[0, 0, 0, 0, 0, 0, ph * bh - h, pw * bw - w],
                        );
                        let t = self.tmp();
                        self.node(scope, "Pad", &[&cur, &pads], &t, vec![]);
                        cur = t;
                    }
                    let tiles = self.init_i64(&format!("{pre}.tiles"), &[0, cg, ph, bh, pw, bw]);
                    let axes = self.init_i64(&format!("{pre}.sum_axes"), &[3, 5]);
                    let big = self.init_i64(&format!("{pre}.expand"), &[1, cg, ph, bh, pw, bw]);
                    let back = self.init_i64(&format!("{pre}.pixels"), &[0, cg, ph * bh, pw * bw]);
                    let zero = self.init_f32(
                        &format!("{pre}.zero"),
                        &Values {
                            dims: vec![],
                            data: vec![0.0],
                        },
                    );
                    let (r, s, gt, m, e, f) = (
                        self.tmp(),
                        self.tmp(),
                        self.tmp(),
                        self.tmp(),
                        self.tmp(),
                        self.tmp(),
                    );
                    self.node(scope, "Reshape", &[&cur, &tiles], &r, vec![]);
                    self.node(
                        scope,
                        "ReduceSum",
                        &[&r, &axes],
                        &s,
                        vec![int("keepdims", 1)],
                    );
                    // Strictly positive sums keep their tile (docs/method.md 2, tie rule).
                    self.node(scope, "Greater", &[&s, &zero], &gt, vec![]);
                    self.node(
                        scope,
                        "Cast",
                        &[&gt],
                        &m,
                        vec![int("to", data_type::FLOAT as i64)],
                    );
                    self.node(scope, "Expand", &[&m, &big], &e, vec![]);
                    self.node(scope, "Reshape", &[&e, &back], &f, vec![]);
                    let mask = if ph * bh != h || pw * bw != w {
                        let starts = self.init_i64(&format!("{pre}.crop_start"), &[0, 0]);
                        let ends = self.init_i64(&format!("{pre}.crop_end"), &[h, w]);
                        let cax = self.init_i64(&format!("{pre}.crop_axes"), &[2, 3]);
                        let t = self.tmp();
                        self.node(scope, "Slice", &[&f, &starts, &ends, &cax], &t, vec![]);
                        t
                    } else {
                        f
                    };
                    self.node(scope, "Mul", &[&xg, &mask], &out, vec![]);
                }
            }
            outs.push(out);
        }
        if single {
            return;
        }
        // Concatenated group by group; channel k of the site is at position inverse[k].
        let mut inverse = vec![0i64; order.len()];
        for (pos, &c) in order.iter().enumerate() {
            inverse[c as usize] = pos as i64;
        }
        let cat = self.tmp();
        self.node(scope, "Concat", &outs, &cat, vec![int("axis", 1)]);
        let inv = self.init_i64(&format!("{scope}.order"), &inverse);
        self.node(scope, "Gather", &[&cat, &inv], y, vec![int("axis", 1)]);
    }
}
