//! A small reader of Python pickles (protocols 2 to 5), enough for the published code's spec
//! files: a dict of layer names to numpy int arrays of shape [C, 2] (or to nested lists).
//!
//! Nothing is executed: globals are kept as names, a REDUCE as a call record, a BUILD as the
//! state attached to it. A numpy array is recognised by its `_reconstruct` call with the dtype
//! and the raw little- or big-endian data in the BUILD state, and decoded here. Any opcode
//! outside this subset is an error naming it and its offset.
use std::collections::HashMap;

/// A value of the pickle, unevaluated.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `module.name`, not imported.
    Global(String, String),
    /// A call of `func` with `args` (REDUCE / NEWOBJ), with the state a BUILD gave it.
    Call {
        func: Box<Value>,
        args: Box<Value>,
        state: Option<Box<Value>>,
    },
}

const MARK_OPS: &str = "tuple, list, dict, setitems, appends";

/// Parses a pickle; errors name the opcode and the offset.
pub fn parse(b: &[u8]) -> Result<Value, String> {
    let mut p = Parser {
        b,
        i: 0,
        at: 0,
        op: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    loop {
        p.at = p.i;
        p.op = p.take(1)?[0];
        if p.op == b'.' {
            return p.pop(); // STOP
        }
        let done = p.scalar()? || p.container()? || p.memo_op()? || p.object()?;
        if !done {
            return Err(format!(
                "unsupported pickle opcode {:#04x} at byte {}",
                p.op, p.at
            ));
        }
    }
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    /// Offset and value of the opcode being run.
    at: usize,
    op: u8,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

fn uint(s: &[u8]) -> u64 {
    s.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64)
}

impl Parser<'_> {
    fn err(&self, msg: &str) -> String {
        format!("opcode {:#04x} at byte {}: {msg}", self.op, self.at)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let start = self.i;
        let s = start
            .checked_add(n)
            .and_then(|end| self.b.get(start..end))
            .ok_or_else(|| format!("truncated at byte {start}"))?;
        self.i += n;
        Ok(s)
    }

    fn pop(&mut self) -> Result<Value, String> {
        self.stack.pop().ok_or_else(|| self.err("empty stack"))
    }

    fn since_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err(&format!("no mark ({MARK_OPS})")))?;
        if m > self.stack.len() {
            return Err(self.err("bad mark"));
        }
        Ok(self.stack.split_off(m))
    }

    /// Framing, constants, numbers, strings and bytes.
    fn scalar(&mut self) -> Result<bool, String> {
        let v = match self.op {
            0x80 => {
                self.take(1)?; // PROTO
                return Ok(true);
            }
            0x95 => {
                self.take(8)?; // FRAME
                return Ok(true);
            }
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'J' => Value::Int(i32::from_le_bytes(self.take(4)?.try_into().expect("4")) as i64),
            b'K' => Value::Int(self.take(1)?[0] as i64),
            b'M' => Value::Int(uint(self.take(2)?) as i64),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = self.take(1)?[0] as usize;
                if n > 8 {
                    return Err(self.err(&format!("integer of {n} bytes")));
                }
                let s = self.take(n)?;
                let mut v = uint(s) as i64;
                if n > 0 && n < 8 && s[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                Value::Int(v)
            }
            b'G' => Value::Float(f64::from_be_bytes(self.take(8)?.try_into().expect("8"))),
            0x8c | b'X' | 0x8d => {
                let n = match self.op {
                    0x8c => self.take(1)?[0] as usize,
                    b'X' => uint(self.take(4)?) as usize,
                    _ => uint(self.take(8)?) as usize,
                };
                let s = self.take(n)?.to_vec();
                Value::Str(String::from_utf8(s).map_err(|_| self.err("string is not UTF-8"))?)
            }
            b'C' | b'B' | 0x8e | b'U' | b'T' => {
                // SHORT_BINBYTES, BINBYTES, BINBYTES8, SHORT_BINSTRING, BINSTRING.
                let n = match self.op {
                    b'C' | b'U' => self.take(1)?[0] as usize,
                    0x8e => uint(self.take(8)?) as usize,
                    _ => uint(self.take(4)?) as usize,
                };
                Value::Bytes(self.take(n)?.to_vec())
            }
            _ => return Ok(false),
        };
        self.stack.push(v);
        Ok(true)
    }

    /// Tuples, lists and dicts.
    fn container(&mut self) -> Result<bool, String> {
        match self.op {
            b'(' => self.marks.push(self.stack.len()),
            b')' => self.stack.push(Value::Tuple(Vec::new())),
            b']' => self.stack.push(Value::List(Vec::new())),
            b'}' => self.stack.push(Value::Dict(Vec::new())),
            0x85..=0x87 => {
                let n = (self.op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err(self.err("stack too short"));
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(items));
            }
            b't' | b'l' => {
                let items = self.since_mark()?;
                self.stack.push(if self.op == b't' {
                    Value::Tuple(items)
                } else {
                    Value::List(items)
                });
            }
            b'd' => {
                let items = self.since_mark()?;
                self.stack.push(Value::Dict(pairs(items, self.at)?));
            }
            b'a' | b'e' => {
                let items = if self.op == b'a' {
                    vec![self.pop()?]
                } else {
                    self.since_mark()?
                };
                match self.stack.last_mut() {
                    Some(Value::List(l)) => l.extend(items),
                    _ => return Err(self.err("append without a list")),
                }
            }
            b's' | b'u' => {
                let items = if self.op == b's' {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    vec![k, v]
                } else {
                    self.since_mark()?
                };
                let new = pairs(items, self.at)?;
                match self.stack.last_mut() {
                    Some(Value::Dict(d)) => d.extend(new),
                    _ => return Err(self.err("setitem without a dict")),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// MEMOIZE, PUT and GET.
    fn memo_op(&mut self) -> Result<bool, String> {
        match self.op {
            0x94 | b'q' | b'r' => {
                let key = match self.op {
                    0x94 => self.memo.len() as u32,
                    b'q' => self.take(1)?[0] as u32,
                    _ => uint(self.take(4)?) as u32,
                };
                let top = self.stack.last().ok_or_else(|| self.err("empty stack"))?;
                self.memo.insert(key, top.clone());
            }
            b'h' | b'j' => {
                let key = if self.op == b'h' {
                    self.take(1)?[0] as u32
                } else {
                    uint(self.take(4)?) as u32
                };
                let v = self
                    .memo
                    .get(&key)
                    .ok_or_else(|| self.err(&format!("memo {key} was never stored")))?
                    .clone();
                self.stack.push(v);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Globals, calls and BUILD, recorded and not run.
    fn object(&mut self) -> Result<bool, String> {
        match self.op {
            b'c' => {
                let mut line = || -> Result<String, String> {
                    let rest = &self.b[self.i..];
                    let n = rest
                        .iter()
                        .position(|&c| c == b'\n')
                        .ok_or_else(|| format!("GLOBAL at byte {}: no newline", self.at))?;
                    self.i += n + 1;
                    Ok(String::from_utf8_lossy(&rest[..n]).into_owned())
                };
                let module = line()?;
                let name = line()?;
                self.stack.push(Value::Global(module, name));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                    _ => return Err(self.err("global names are not strings")),
                }
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let func = self.pop()?;
                self.stack.push(Value::Call {
                    func: Box::new(func),
                    args: Box::new(args),
                    state: None,
                });
            }
            b'b' => {
                // Python's memo holds references, so a BUILD is visible through every memo
                // entry of the object; here the memo holds copies, updated alike.
                let st = self.pop()?;
                let before = self.stack.last().cloned();
                match self.stack.last_mut() {
                    Some(Value::Call { state, .. }) => *state = Some(Box::new(st)),
                    _ => return Err(self.err("BUILD on something not constructed")),
                }
                let after = self.stack.last().cloned();
                if let (Some(before), Some(after)) = (before, after) {
                    for v in self.memo.values_mut().filter(|v| **v == before) {
                        *v = after.clone();
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn pairs(items: Vec<Value>, at: usize) -> Result<Vec<(Value, Value)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err(format!("odd number of dict items at byte {at}"));
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// A numpy integer array (`numpy.core.multiarray._reconstruct` + BUILD state) or nested lists
/// of integers, flattened: (shape, values).
pub fn int_array(v: &Value) -> Result<(Vec<usize>, Vec<i64>), String> {
    match v {
        Value::List(items) | Value::Tuple(items) => {
            let mut shape = vec![items.len()];
            let mut out = Vec::new();
            let mut inner: Option<Vec<usize>> = None;
            for x in items {
                match x {
                    Value::Int(n) => out.push(*n),
                    Value::Bool(b) => out.push(*b as i64),
                    _ => {
                        let (s, vals) = int_array(x)?;
                        if inner.as_ref().is_some_and(|i| *i != s) {
                            return Err("ragged nested lists".into());
                        }
                        inner = Some(s);
                        out.extend(vals);
                    }
                }
            }
            if let Some(s) = inner {
                shape.extend(s);
            }
            Ok((shape, out))
        }
        Value::Call { func, state, .. } => {
            match func.as_ref() {
                Value::Global(m, n) if m.starts_with("numpy") && n == "_reconstruct" => {}
                other => return Err(format!("expected a numpy array, got a call of {other:?}")),
            }
            let st = match state.as_deref() {
                Some(Value::Tuple(t)) if t.len() == 5 => t,
                _ => return Err("a numpy array without its state".into()),
            };
            let shape: Vec<usize> = match &st[1] {
                Value::Tuple(d) => d
                    .iter()
                    .map(|x| match x {
                        Value::Int(n) if *n >= 0 => Ok(*n as usize),
                        _ => Err("bad array shape".to_string()),
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err("bad array shape".into()),
            };
            let (kind, size, big) = dtype(&st[2])?;
            if st[3] == Value::Bool(true) {
                return Err("Fortran-ordered arrays are not supported".into());
            }
            let data = raw_bytes(&st[4])?;
            let n: usize = shape.iter().product();
            if data.len() != n * size {
                return Err(format!(
                    "array of shape {shape:?} has {} data bytes, expected {}",
                    data.len(),
                    n * size
                ));
            }
            let vals = data
                .chunks_exact(size)
                .map(|c| {
                    let mut w = [0u8; 8];
                    if big {
                        w[8 - size..].copy_from_slice(c);
                        w.reverse();
                    } else {
                        w[..size].copy_from_slice(c);
                    }
                    let u = u64::from_le_bytes(w);
                    if kind == 'i' && size < 8 && (u >> (8 * size - 1)) & 1 == 1 {
                        (u as i64) - (1i64 << (8 * size))
                    } else {
                        u as i64
                    }
                })
                .collect();
            Ok((shape, vals))
        }
        other => Err(format!("expected an integer array, got {other:?}")),
    }
}

/// Bytes as pickled by protocol 3+ (`bytes`) or by protocol 2 from Python 3
/// (`_codecs.encode(text, "latin1")`).
fn raw_bytes(v: &Value) -> Result<Vec<u8>, String> {
    match v {
        Value::Bytes(b) => Ok(b.clone()),
        Value::Call { func, args, .. } => match (func.as_ref(), args.as_ref()) {
            (Value::Global(m, n), Value::Tuple(a)) if m == "_codecs" && n == "encode" => {
                match a.as_slice() {
                    [Value::Str(text), Value::Str(enc)] if enc == "latin1" || enc == "latin-1" => {
                        text.chars()
                            .map(|c| {
                                u8::try_from(c as u32).map_err(|_| "bad latin1 text".to_string())
                            })
                            .collect()
                    }
                    _ => Err("array data is not latin1 text".into()),
                }
            }
            _ => Err("array data is not raw bytes".into()),
        },
        _ => Err("array data is not raw bytes".into()),
    }
}

/// (kind 'i' or 'u', bytes per element, big-endian) of a pickled `numpy.dtype`.
fn dtype(v: &Value) -> Result<(char, usize, bool), String> {
    let Value::Call { args, state, .. } = v else {
        return Err("bad array dtype".into());
    };
    let descr = match args.as_ref() {
        Value::Tuple(a) => match a.first() {
            Some(Value::Str(s)) => s.clone(),
            _ => return Err("bad array dtype".into()),
        },
        _ => return Err("bad array dtype".into()),
    };
    let big = matches!(state.as_deref(), Some(Value::Tuple(t)) if t.get(1) == Some(&Value::Str(">".into())));
    let kind = descr.chars().next().unwrap_or('?');
    let size: usize = descr[1..].parse().unwrap_or(0);
    if !matches!(kind, 'i' | 'u') || !matches!(size, 1 | 2 | 4 | 8) {
        return Err(format!("array dtype '{descr}' is not an integer type"));
    }
    Ok((kind, size, big && size > 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn fixture() -> Vec<u8> {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/published/resnet18-cifar.pickle"
        );
        std::fs::read(p).expect("the fixture")
    }

    #[test]
    fn reads_ints_strings_lists_and_dicts() {
        // {'a': [1, -2, 300], 'b': (True, None)} in protocol 2, by hand.
        let mut b = vec![0x80, 2, b'}', b'(', b'X', 1, 0, 0, 0, b'a', b']', b'('];
        b.extend([b'K', 1, 0x8a, 1, 0xfe, b'M', 0x2c, 0x01, b'e']);
        b.extend([b'X', 1, 0, 0, 0, b'b', 0x88, b'N', 0x86, b'u', b'.']);
        let v = parse(&b).unwrap();
        let want = Value::Dict(vec![
            (
                Value::Str("a".into()),
                Value::List(vec![Value::Int(1), Value::Int(-2), Value::Int(300)]),
            ),
            (
                Value::Str("b".into()),
                Value::Tuple(vec![Value::Bool(true), Value::None]),
            ),
        ]);
        assert_eq!(v, want);
        assert_eq!(
            int_array(&Value::List(vec![Value::Int(4), Value::Int(5)])).unwrap(),
            (vec![2], vec![4, 5])
        );
    }

    /// Truncated, corrupted and random inputs are errors, never panics.
    #[test]
    fn damaged_input_is_an_error_not_a_panic() {
        let good = fixture();
        assert!(parse(&good).is_ok());
        for n in [0, 1, 2, 10, good.len() / 2, good.len() - 1] {
            assert!(parse(&good[..n]).is_err(), "truncated at {n}");
        }
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(19);
        for _ in 0..2000 {
            let mut b = good[..rng.gen_range(0..600)].to_vec();
            for _ in 0..rng.gen_range(1..4) {
                if !b.is_empty() {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
            }
            if let Ok(Value::Dict(d)) = parse(&b) {
                for (_, v) in d {
                    let _ = int_array(&v);
                }
            }
            let noise: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
            let _ = parse(&noise);
        }
        // Lengths near the top of the address space.
        for op in [0x8e, b'X', 0x8d] {
            let mut b = vec![0x80, 4, op];
            b.extend([0xff; 8]);
            assert!(parse(&b).is_err());
        }
    }
}
