//! The network operators of an ONNX import: each node becomes brelu graph ops and parameters.
use super::consts::{attr_f, attr_i, attr_ints, attr_s, Const};
use super::import::{bad, Importer, Val};
use super::proto::NodeProto;
use crate::error::Result;
use crate::models::graph::{Op, ResizeTo, Slot};

impl Importer {
    pub(super) fn batch_norm(&mut self, node: &NodeProto) -> Result<Val> {
        let x = self.net(node, 0)?;
        if attr_i(node, "training_mode", 0) != 0 || node.output.len() > 1 {
            return Err(self.bad(node, "batch norm in training mode (export in eval mode)"));
        }
        let c = self.shape(x)?.first().copied().unwrap_or(0);
        let name = self.param_name(node);
        for (i, field) in ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .enumerate()
        {
            let t = self.konst(node, i + 1)?;
            if t.len() != c {
                let msg = format!("{field} has {} values for {c} channels", t.len());
                return Err(self.bad(node, msg));
            }
            self.add_param(format!("{name}.{field}"), vec![c], t.as_f32());
        }
        let eps = attr_f(node, "epsilon", 1e-5) as f64;
        Ok(Val::Net(self.g.op(|y| Op::BatchNorm {
            x,
            y,
            name,
            channels: c,
            eps,
        })))
    }

    /// Clip(0) and Clip(0, 6) (ReLU6) become ReLU sites.
    pub(super) fn clip(&mut self, node: &NodeProto) -> Result<Val> {
        // Opset 11+ (the oldest brelu reads) gives the bounds as inputs 1 and 2.
        let first = |c: Option<Const>| c.and_then(|c| c.as_f32().first().copied());
        let lo = first(self.opt_konst(node, 1)?);
        let hi = first(self.opt_konst(node, 2)?);
        if lo != Some(0.0) || !hi.is_none_or(|h| h == 6.0) {
            let msg = format!(
                "Clip({lo:?}, {hi:?}): brelu imports Clip(0) and Clip(0, 6) (ReLU6, which \
                 becomes a ReLU site)"
            );
            return Err(self.bad(node, msg));
        }
        if hi.is_some() {
            self.relu6 += 1;
        }
        Ok(Val::Net(self.site(node)?))
    }

    /// A reshape to the same shape, or to [N, -1] (a flatten).
    pub(super) fn reshape(&mut self, node: &NodeProto) -> Result<Val> {
        let x = self.net(node, 0)?;
        let target = self.konst(node, 1)?.as_i64();
        let s = self.shape(x)?;
        let numel: usize = s.iter().product();
        let same = target.len() == s.len() + 1
            && target[1..]
                .iter()
                .zip(&s)
                .all(|(&t, &d)| t == d as i64 || t == 0);
        let flat = target.len() == 2 && (target[1] == -1 || target[1] == numel as i64);
        if same {
            Ok(Val::Net(x))
        } else if flat {
            Ok(Val::Net(self.g.op(|y| Op::Flatten { x, y })))
        } else {
            let msg = format!(
                "Reshape of a {s:?} map to {target:?}: brelu reshapes only to [N, -1] (flatten)"
            );
            Err(self.bad(node, msg))
        }
    }

    pub(super) fn gemm(&mut self, node: &NodeProto) -> Result<Val> {
        let x = self.net(node, 0)?;
        let w = self.konst(node, 1)?;
        let b = self.opt_konst(node, 2)?;
        if attr_f(node, "alpha", 1.0) != 1.0
            || attr_f(node, "beta", 1.0) != 1.0
            || attr_i(node, "transA", 0) != 0
        {
            return Err(self.bad(node, "Gemm with alpha, beta or transA set"));
        }
        let trans_b = attr_i(node, "transB", 0) != 0;
        Ok(Val::Net(self.linear(node, x, &w, trans_b, b)?))
    }

    /// A zero padding of height and width, left for the convolution that reads it.
    pub(super) fn pad(&mut self, node: &NodeProto) -> Result<Val> {
        let x = self.net(node, 0)?;
        let mode = attr_s(node, "mode", "constant");
        let pads = match self.opt_konst(node, 1)? {
            Some(p) => p.as_i64(),
            None => attr_ints(node, "pads").unwrap_or_default(),
        };
        let value = self.opt_konst(node, 2)?.map(|c| c.as_f32());
        if mode != "constant" || value.is_some_and(|v| v.iter().any(|&x| x != 0.0)) {
            return Err(self.bad(node, format!("Pad mode {mode}: brelu pads with zeros only")));
        }
        match pads.as_slice() {
            [0, 0, t, l, 0, 0, b, r] if [t, l, b, r].iter().all(|&&p| p >= 0) => Ok(Val::Padded(
                x,
                [*t as usize, *l as usize, *b as usize, *r as usize],
            )),
            _ => Err(self.bad(
                node,
                format!("pads {pads:?}: brelu pads height and width only, by >= 0"),
            )),
        }
    }

    pub(super) fn conv(&mut self, node: &NodeProto) -> Result<Slot> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let (x, extra) = match self.get(node, 0)? {
            Some(Val::Padded(x, p)) => (x, p),
            _ => (self.net(node, 0)?, [0; 4]),
        };
        let w = self.konst(node, 1)?;
        let b = self.opt_konst(node, 2)?;
        let s = self.shape(x)?;
        let [cout, cin_g, kh, kw] = w.dims[..] else {
            return Err(err(format!("weight of shape {:?}, expected 4-D", w.dims)));
        };
        let groups = attr_i(node, "group", 1).max(1) as usize;
        let pair = |name: &str, default: usize| -> Result<[usize; 2]> {
            match attr_ints(node, name).as_deref() {
                None => Ok([default; 2]),
                Some([a, b]) if *a >= 1 && *b >= 1 => Ok([*a as usize, *b as usize]),
                Some(v) => Err(err(format!("{name} {v:?}: expected two values >= 1"))),
            }
        };
        let stride = pair("strides", 1)?;
        let dilation = pair("dilations", 1)?;
        if attr_s(node, "auto_pad", "NOTSET") != "NOTSET" {
            return Err(err(
                "auto_pad is not supported (export with explicit pads)".into()
            ));
        }
        let p = attr_ints(node, "pads").unwrap_or_else(|| vec![0; 4]);
        let p: Vec<usize> = match p.as_slice() {
            [t, l, b, r] if [t, l, b, r].iter().all(|&&v| v >= 0) => {
                vec![*t as usize, *l as usize, *b as usize, *r as usize]
            }
            _ => return Err(err(format!("pads {p:?}: expected four values >= 0"))),
        };
        let pads: Vec<usize> = p.iter().zip(extra).map(|(a, b)| a + b).collect();
        if pads[0] != pads[2] || pads[1] != pads[3] {
            return Err(err(format!(
                "asymmetric padding {pads:?} (top, left, bottom, right): brelu pads both sides \
                 alike"
            )));
        }
        if s.len() != 3 || cin_g * groups != s[0] || cout % groups != 0 {
            return Err(err(format!(
                "weight {:?} with {groups} groups does not fit input {s:?}",
                w.dims
            )));
        }
        let name = self.param_name(node);
        self.add_param(format!("{name}.weight"), w.dims.clone(), w.as_f32());
        if let Some(b) = &b {
            if b.len() != cout {
                return Err(err(format!(
                    "bias has {} values for {cout} outputs",
                    b.len()
                )));
            }
            self.add_param(format!("{name}.bias"), vec![cout], b.as_f32());
        }
        let cin = s[0];
        Ok(self.g.op(|y| Op::Conv {
            x,
            y,
            name,
            cin,
            cout,
            kernel: [kh, kw],
            stride,
            pad: [pads[0], pads[1]],
            dilation,
            groups,
            bias: b.is_some(),
        }))
    }

    pub(super) fn linear(
        &mut self,
        node: &NodeProto,
        x: Slot,
        w: &Const,
        trans: bool,
        b: Option<Const>,
    ) -> Result<Slot> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let s = self.shape(x)?;
        let [r, c] = w.dims[..] else {
            return Err(err(format!("weight of shape {:?}, expected 2-D", w.dims)));
        };
        // brelu keeps [out, in] (PyTorch's layout); ONNX's B is [in, out] unless transposed.
        let (cout, cin) = if trans { (r, c) } else { (c, r) };
        if s != [cin] {
            return Err(err(format!(
                "a [{cin}] input expected (flatten first), got {s:?}"
            )));
        }
        let weight = if trans {
            w.as_f32()
        } else {
            let v = w.as_f32();
            (0..cout)
                .flat_map(|o| (0..cin).map(move |i| (o, i)))
                .map(|(o, i)| v[i * cout + o])
                .collect()
        };
        let bias = match &b {
            Some(b) if b.len() == cout => b.as_f32(),
            Some(b) if b.len() == 1 => vec![b.as_f32()[0]; cout],
            Some(b) => return Err(err(format!("bias has {} values for {cout}", b.len()))),
            None => vec![0.0; cout],
        };
        let name = self.param_name(node);
        self.add_param(format!("{name}.weight"), vec![cout, cin], weight);
        let bi = self.add_param(format!("{name}.bias"), vec![cout], bias);
        let y = self.g.linear(x, &name, cin, cout);
        if b.is_none() {
            self.open_bias.insert(y, bi);
        }
        Ok(y)
    }

    /// Add, Sub, Mul and Div: of two network tensors (Add only), or of one with a constant
    /// per channel or scalar, which becomes a depthwise 1x1 convolution (a bias for Add and
    /// Sub, a scale for Mul and Div) that both training and secure inference run as it is.
    pub(super) fn arith(&mut self, node: &NodeProto) -> Result<Val> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let op = node.op_type.as_str();
        let (a, b) = (self.get(node, 0)?, self.get(node, 1)?);
        let (x, c, const_first) = match (a, b) {
            (Some(Val::Net(a)), Some(Val::Net(b))) if op == "Add" => {
                let (sa, sb) = (self.shape(a)?, self.shape(b)?);
                if sa != sb {
                    return Err(err(format!("Add of {sa:?} and {sb:?} (no broadcasting)")));
                }
                return Ok(Val::Net(self.g.add(a, b)));
            }
            (Some(Val::Net(x)), Some(Val::Const(c))) => (x, c, false),
            (Some(Val::Const(c)), Some(Val::Net(x))) => (x, c, true),
            _ => {
                return Err(err(format!(
                    "{op} of two network tensors: brelu supports Add of two tensors and \
                     {op} with a constant"
                )))
            }
        };
        if const_first && matches!(op, "Sub" | "Div") {
            return Err(err(format!("{op} with the constant first")));
        }
        let s = self.shape(x)?;
        let ch = s.first().copied().unwrap_or(0);
        let v = c.as_f32();
        // Which element of `c` channel k uses: scalar, or one per channel laid out as [C],
        // [C, 1, 1] or [1, C, 1, 1].
        let per_channel = v.len() == ch && c.dims.iter().filter(|&&d| d != 1).count() <= 1 && {
            let rank = c.dims.len();
            (s.len() == 3 && rank >= 3 && c.dims[rank - 3] == ch)
                || (s.len() == 1 && rank >= 1 && c.dims[rank - 1] == ch)
                || ch == 1
        };
        let vals: Vec<f32> = match v.len() {
            1 => vec![v[0]; ch],
            _ if per_channel => v,
            _ => {
                return Err(err(format!(
                    "{op} with a constant of shape {:?} on a {s:?} tensor: brelu supports \
                     scalars and one value per channel",
                    c.dims
                )))
            }
        };
        // Add of a constant right after a MatMul is that layer's bias.
        if matches!(op, "Add" | "Sub") && s.len() == 1 {
            if let Some(bi) = self.open_bias.remove(&x) {
                let sign = if op == "Sub" { -1.0 } else { 1.0 };
                for (dst, v) in self.params[bi].data.iter_mut().zip(&vals) {
                    *dst += sign * v;
                }
                return Ok(Val::Net(x));
            }
        }
        if s.len() != 3 {
            return Err(err(format!(
                "{op} with a constant on a {s:?} vector (brelu supports it on [C, H, W] maps)"
            )));
        }
        let (weight, bias) = match op {
            "Add" => (vec![1.0; ch], Some(vals)),
            "Sub" => (vec![1.0; ch], Some(vals.iter().map(|v| -v).collect())),
            "Mul" => (vals, None),
            _ => {
                if vals.contains(&0.0) {
                    return Err(err("Div by zero".into()));
                }
                (vals.iter().map(|v| 1.0 / v).collect(), None)
            }
        };
        let name = self.param_name(node);
        self.add_param(format!("{name}.weight"), vec![ch, 1, 1, 1], weight);
        let has_bias = bias.is_some();
        if let Some(b) = bias {
            self.add_param(format!("{name}.bias"), vec![ch], b);
        }
        Ok(Val::Net(self.g.op(|y| Op::Conv {
            x,
            y,
            name,
            cin: ch,
            cout: ch,
            kernel: [1, 1],
            stride: [1, 1],
            pad: [0, 0],
            dilation: [1, 1],
            groups: ch,
            bias: has_bias,
        })))
    }

    pub(super) fn pool(&mut self, node: &NodeProto) -> Result<Slot> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let x = self.net(node, 0)?;
        let square = |name: &str, default: i64| -> Result<usize> {
            let v = attr_ints(node, name).unwrap_or_else(|| vec![default; 2]);
            match v.as_slice() {
                [a, b] if a == b && *a >= 0 => Ok(*a as usize),
                [a, b, c, d] if a == b && b == c && c == d && *a >= 0 => Ok(*a as usize),
                _ => Err(err(format!(
                    "{name} {v:?}: brelu pools with square windows, strides and pads"
                ))),
            }
        };
        let kernel = square("kernel_shape", 0)?;
        let stride = square("strides", 1)?;
        let pad = square("pads", 0)?;
        if kernel == 0 || attr_i(node, "ceil_mode", 0) != 0 {
            return Err(err("needs a kernel_shape and ceil_mode 0".into()));
        }
        if attr_s(node, "auto_pad", "NOTSET") != "NOTSET" {
            return Err(err(
                "auto_pad is not supported (export with explicit pads)".into()
            ));
        }
        if node.op_type == "MaxPool" {
            if square("dilations", 1)? != 1 || node.output.len() > 1 {
                return Err(err("MaxPool with dilation or indices".into()));
            }
            Ok(self.g.max_pool(x, kernel, stride, pad))
        } else {
            let count_pad = attr_i(node, "count_include_pad", 0) != 0;
            Ok(self.g.op(|y| Op::AvgPool {
                x,
                y,
                kernel,
                stride,
                pad,
                count_pad,
            }))
        }
    }

    pub(super) fn resize(&mut self, node: &NodeProto) -> Result<Slot> {
        let path = self.path.clone();
        let err = move |m: String| bad(&path, node, m);
        let x = self.net(node, 0)?;
        let s = self.shape(x)?;
        if s.len() != 3 {
            return Err(err(format!("resizes a [C, H, W] map, got {s:?}")));
        }
        let mode = attr_s(node, "mode", "nearest");
        let ctm = attr_s(node, "coordinate_transformation_mode", "half_pixel");
        let align_corners = match (mode.as_str(), ctm.as_str()) {
            ("linear" | "bilinear", "half_pixel" | "pytorch_half_pixel") => false,
            ("linear" | "bilinear", "align_corners") => true,
            _ => {
                return Err(err(format!(
                    "mode {mode} with coordinate_transformation_mode {ctm}: brelu resizes \
                     bilinearly (PyTorch's interpolate, align_corners either way)"
                )))
            }
        };
        // Upsample (opset < 10) and Resize-10 take scales as input 1; Resize-11+ has roi,
        // scales, sizes.
        let (scales, sizes) = if node.op_type == "Upsample" || node.input.len() == 2 {
            (self.opt_konst(node, 1)?, None)
        } else {
            (self.opt_konst(node, 2)?, self.opt_konst(node, 3)?)
        };
        let hw = match (sizes, scales) {
            (Some(z), _) if z.len() == 4 => {
                let z = z.as_i64();
                [z[2], z[3]]
            }
            (_, Some(c)) if c.len() == 4 => {
                let c = c.as_f32();
                if c[0] != 1.0 || c[1] != 1.0 {
                    return Err(err(format!("scales {c:?} change batch or channels")));
                }
                [
                    (s[1] as f32 * c[2]).floor() as i64,
                    (s[2] as f32 * c[3]).floor() as i64,
                ]
            }
            _ => return Err(err("needs constant 4-element scales or sizes".into())),
        };
        if hw.iter().any(|&v| v <= 0) {
            return Err(err(format!("output size {hw:?}")));
        }
        let to = ResizeTo::Size([hw[0] as usize, hw[1] as usize]);
        Ok(self.g.op(|y| Op::Resize {
            x,
            to,
            align_corners,
            y,
        }))
    }
}
