//! `group_by` dimensions, exact as operators/meter.py: per event and metric, the tuple of
//! `_dim(props.get(g))` for each `g` of the metric's `group_by`, in that order (a missing or null value is
//! "", a bool "true"/"false", a str itself, an int its decimal digits, a float its Python `repr`). The
//! window row key is `(metric, window_start, dims)`; billing-period rows have no dimensions.
//!
//! Each distinct dims tuple is interned once per core (`DimTable`): window keys carry its id (0: no
//! dimensions), and `take_changes` reports the very Python tuple of str, built once per distinct tuple.

use std::fmt::Write;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::json::Val;
use crate::FxMap;

pub struct DimTable {
    index: FxMap<String, u32>,
    values: Vec<Vec<String>>,
    tuples: Vec<Option<Py<PyTuple>>>,
    buf: String,
    scratch: String,
    bounds: Vec<(usize, usize)>, // each value's range in `buf`
}

impl DimTable {
    pub fn new() -> DimTable {
        // id 0: no dimensions, the empty tuple
        DimTable {
            index: FxMap::default(),
            values: vec![Vec::new()],
            tuples: vec![None],
            buf: String::new(),
            scratch: String::new(),
            bounds: Vec::new(),
        }
    }

    /// The id of the dims tuple of `props` under `group_by` (0 when `group_by` is empty).
    pub fn intern<K: AsRef<str>>(&mut self, group_by: &[String], props: &[(K, Val)]) -> u32 {
        if group_by.is_empty() {
            return 0;
        }
        // the key: each value as its length, ':', the value (unambiguous); no allocation for a known tuple
        self.buf.clear();
        self.bounds.clear();
        for g in group_by {
            self.scratch.clear();
            push_dim(&mut self.scratch, crate::lookup(props, g));
            let _ = write!(self.buf, "{}:", self.scratch.len());
            let start = self.buf.len();
            self.buf.push_str(&self.scratch);
            self.bounds.push((start, self.buf.len()));
        }
        if let Some(&id) = self.index.get(self.buf.as_str()) {
            return id;
        }
        let id = self.values.len() as u32;
        let values = self.bounds.iter().map(|&(a, b)| self.buf[a..b].to_owned()).collect();
        self.values.push(values);
        self.tuples.push(None);
        self.index.insert(self.buf.clone(), id);
        id
    }

    /// The id of a dims tuple given as its values (a resumed window row's dims, `resume.rs`; 0 when empty).
    pub fn intern_values(&mut self, values: Vec<String>) -> u32 {
        if values.is_empty() {
            return 0;
        }
        self.buf.clear();
        for s in &values {
            self.buf.push_str(&s.len().to_string());
            self.buf.push(':');
            self.buf.push_str(s);
        }
        if let Some(&id) = self.index.get(self.buf.as_str()) {
            return id;
        }
        let id = self.values.len() as u32;
        self.values.push(values);
        self.tuples.push(None);
        self.index.insert(self.buf.clone(), id);
        id
    }

    /// The Python tuple of dims `id` (made at its first report).
    pub fn tuple<'py>(&mut self, py: Python<'py>, id: u32) -> PyResult<Bound<'py, PyTuple>> {
        let slot = &mut self.tuples[id as usize];
        if let Some(t) = slot {
            return Ok(t.bind(py).clone());
        }
        let t = PyTuple::new(py, &self.values[id as usize])?;
        *slot = Some(t.clone().unbind());
        Ok(t)
    }
}

/// operators/meter.py `_dim`: a property value as a dimension value.
pub fn push_dim(out: &mut String, v: Option<&Val>) {
    match v {
        None | Some(Val::Null) => {}
        Some(Val::Str(s)) => out.push_str(s),
        Some(Val::Bool(b)) => out.push_str(if *b { "true" } else { "false" }),
        Some(Val::Int(i)) => {
            let _ = write!(out, "{i}");
        }
        Some(Val::Big(b, _)) => out.push_str(&big_decimal(b)),
        Some(Val::Float(f)) => push_float_repr(out, *f),
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, fixed notation for decimal exponents -4..=15
/// ("0.0001", "1000000000000000.0"), else "1e+16", "1.5e-05"; "inf", "-inf", "nan".
pub fn push_float_repr(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str("nan");
        return;
    }
    if f.is_infinite() {
        out.push_str(if f > 0.0 { "inf" } else { "-inf" });
        return;
    }
    push_shortest(out, f, -4, true);
}

/// A finite float's shortest round-trip digits, in fixed notation for decimal exponents `min_fixed..=15`, else
/// scientific: "1e+16" / "1.5e-05" as Python's `repr` writes the exponent (`python_exp`), or "1e16" / "1.5e-6"
/// as msgspec does (mediate.rs `push_f64_json`).
///
/// The digits are Ryu's (the `ryu` crate): the shortest that round-trip and, of those, the nearest, a tie going to
/// the even digit, as Python's `repr` and msgspec choose; Rust's own `{:e}` breaks such a tie upwards
/// (562949953421312.25 is "562949953421312.2" in Python, "5.629499534213123e14" in Rust).
pub(crate) fn push_shortest(out: &mut String, f: f64, min_fixed: i32, python_exp: bool) {
    let mut buf = ryu::Buffer::new();
    let s = buf.format_finite(f);
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (mant, e10) = s.split_once('e').unwrap_or((s, "0"));
    let e10: i32 = e10.parse().unwrap_or(0);
    let (int_part, frac) = mant.split_once('.').unwrap_or((mant, ""));
    let all = int_part.bytes().chain(frac.bytes());
    let lead = all.clone().take_while(|&c| c == b'0').count();
    let mut digits: String = all.skip(lead).map(char::from).collect();
    while digits.len() > 1 && digits.ends_with('0') {
        digits.pop();
    }
    let exp = if digits.is_empty() {
        digits.push('0');
        0
    } else {
        int_part.len() as i32 - 1 - lead as i32 + e10
    };
    if neg {
        out.push('-');
    }
    let n = digits.len() as i32;
    if (min_fixed..16).contains(&exp) {
        let point = exp + 1;
        if point >= n {
            out.push_str(&digits);
            for _ in 0..(point - n) {
                out.push('0');
            }
            out.push_str(".0");
        } else if point <= 0 {
            out.push_str("0.");
            for _ in 0..(-point) {
                out.push('0');
            }
            out.push_str(&digits);
        } else {
            out.push_str(&digits[..point as usize]);
            out.push('.');
            out.push_str(&digits[point as usize..]);
        }
    } else {
        out.push_str(&digits[..1]);
        if n > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        if python_exp {
            out.push(if exp < 0 { '-' } else { '+' });
            let a = exp.unsigned_abs();
            if a < 10 {
                out.push('0');
            }
            out.push_str(&a.to_string());
        } else {
            out.push_str(&exp.to_string());
        }
    }
}

/// The decimal digits of an int given as little-endian two's-complement bytes (Python's `str(int)`).
pub fn big_decimal(le: &[u8]) -> String {
    let neg = le.last().is_some_and(|b| b & 0x80 != 0);
    let mut mag: Vec<u8> = le.to_vec();
    if neg {
        // two's complement negation
        let mut carry = 1u16;
        for b in mag.iter_mut() {
            let v = (!*b) as u16 + carry;
            *b = v as u8;
            carry = v >> 8;
        }
    }
    // little-endian u32 limbs
    let mut limbs: Vec<u32> = mag
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect();
    while limbs.last() == Some(&0) {
        limbs.pop();
    }
    if limbs.is_empty() {
        return "0".to_owned();
    }
    let mut chunks: Vec<u32> = Vec::new(); // base 1e9, least significant first
    while !limbs.is_empty() {
        let mut rem: u64 = 0;
        for l in limbs.iter_mut().rev() {
            let cur = (rem << 32) | *l as u64;
            *l = (cur / 1_000_000_000) as u32;
            rem = cur % 1_000_000_000;
        }
        chunks.push(rem as u32);
        while limbs.last() == Some(&0) {
            limbs.pop();
        }
    }
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    s.push_str(&chunks.last().unwrap().to_string());
    for c in chunks.iter().rev().skip(1) {
        s.push_str(&format!("{c:09}"));
    }
    s
}

/// Test hook: operators/meter.py `_dim` of a property value (ints beyond i64 as ('big', bytes, ok)).
#[pyfunction]
pub(crate) fn dim_of(v: &Bound<'_, PyAny>) -> PyResult<String> {
    let v = crate::val_from_py(v)?;
    let mut s = String::new();
    push_dim(&mut s, Some(&v));
    Ok(s)
}
