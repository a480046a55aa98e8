//! The accumulators, exact as operators/aggregate.py: a count adds the sign; a sum adds ints
//! exactly (i128, then the fixed-point part for ints beyond it) and floats as exact integer multiples of
//! 2**-1074 (`fscaled`, a 2304-bit two's-complement integer), so the value is order-independent.
//! max / min / latest / unique_count / p95 / p99 keep the event values themselves (`Ext`), compared as Python
//! compares ints and floats (exactly, whatever their size), so the value mirrored into the Python accumulator
//! is the very object the Python fold would keep (MaxAcc.best, LatestAcc.last, UniqueAcc.seen,
//! PercentileAcc.counts).

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyTuple};
use pyo3::IntoPyObjectExt;

use crate::json::Val;

pub const LIMBS: usize = 36; // 2304 bits: |v| < 1e300 (~2**997) scaled by 2**1074 stays below 2**2072

#[derive(Clone)]
pub struct Fixed(pub [u64; LIMBS]);

impl Fixed {
    fn add_at(&mut self, idx: usize, lo: u64, hi: u64, neg: bool) {
        let l = &mut self.0;
        if !neg {
            let (a, c1) = l[idx].overflowing_add(lo);
            l[idx] = a;
            let (b, c2) = l[idx + 1].overflowing_add(hi);
            let (b, c3) = b.overflowing_add(c1 as u64);
            l[idx + 1] = b;
            let mut carry = c2 || c3;
            let mut j = idx + 2;
            while carry && j < LIMBS {
                let (v, c) = l[j].overflowing_add(1);
                l[j] = v;
                carry = c;
                j += 1;
            }
        } else {
            let (a, b1) = l[idx].overflowing_sub(lo);
            l[idx] = a;
            let (b, b2) = l[idx + 1].overflowing_sub(hi);
            let (b, b3) = b.overflowing_sub(b1 as u64);
            l[idx + 1] = b;
            let mut borrow = b2 || b3;
            let mut j = idx + 2;
            while borrow && j < LIMBS {
                let (v, c) = l[j].overflowing_sub(1);
                l[j] = v;
                borrow = c;
                j += 1;
            }
        }
    }

    /// Add `m * 2**shift` (negated when `neg`), m < 2**64.
    fn add_shifted(&mut self, m: u64, shift: u32, neg: bool) {
        let idx = (shift / 64) as usize;
        let bit = shift % 64;
        let lo = m << bit;
        let hi = if bit == 0 { 0 } else { m >> (64 - bit) };
        self.add_at(idx, lo, hi, neg);
    }

    /// Add `sign * v * 2**1074` exactly (v finite, |v| < 1e300).
    pub fn add_f64(&mut self, v: f64, sign: i64) {
        let bits = v.to_bits();
        let exp = ((bits >> 52) & 0x7ff) as i64;
        let frac = bits & ((1u64 << 52) - 1);
        let (m, e) = if exp == 0 { (frac, -1074) } else { (frac | (1u64 << 52), exp - 1075) };
        if m == 0 {
            return;
        }
        let neg = (bits >> 63 == 1) != (sign < 0);
        self.add_shifted(m, (e + 1074) as u32, neg);
    }

    /// Add `sign * n * 2**1074` for an int given as little-endian two's-complement bytes (|n| < 1e300).
    pub fn add_int_bytes(&mut self, le: &[u8], sign: i64) {
        let negative = le.last().map_or(false, |b| b & 0x80 != 0);
        // magnitude bytes
        let mut mag: Vec<u8> = le.to_vec();
        if negative {
            let mut carry = 1u16;
            for b in mag.iter_mut() {
                let v = (!*b) as u16 + carry;
                *b = v as u8;
                carry = v >> 8;
            }
        }
        let neg = negative != (sign < 0);
        for (k, chunk) in mag.chunks(4).enumerate() {
            let mut w = 0u64;
            for (j, b) in chunk.iter().enumerate() {
                w |= (*b as u64) << (8 * j);
            }
            if w != 0 {
                self.add_shifted(w, 1074 + 32 * k as u32, neg);
            }
        }
    }

    /// The value `self * 2**-1074`, approximately (relative error below 2**-60).
    pub fn approx(&self) -> f64 {
        let l = &self.0;
        let neg = l[LIMBS - 1] >> 63 == 1;
        let mut mag = *l;
        if neg {
            let mut carry = true;
            for w in mag.iter_mut() {
                let (v, c) = (!*w).overflowing_add(carry as u64);
                *w = v;
                carry = c;
            }
        }
        let Some(k) = (0..LIMBS).rev().find(|&k| mag[k] != 0) else { return 0.0 };
        let lo = if k > 0 { mag[k - 1] } else { 0 };
        let m = mag[k] as f64 * 18446744073709551616.0 + lo as f64;
        let e = 64 * k as i32 - 64 - 1074;
        // 2**e in two steps, so neither factor leaves the f64 range before the product does
        let v = m * 2f64.powi(e / 2) * 2f64.powi(e - e / 2);
        if neg {
            -v
        } else {
            v
        }
    }

    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

#[derive(Clone)]
pub struct Acc {
    pub events: u64,
    pub total: i128,
    pub fixed: Option<Box<Fixed>>,
    pub reported: u64,         // the last take_changes round that listed this row
    pub ext: Option<Box<Ext>>, // the value of the aggregations that are not additive (None until the first)
}

impl Acc {
    pub fn new() -> Acc {
        Acc { events: 0, total: 0, fixed: None, reported: 0, ext: None }
    }
    /// The value as f64, approximately, and a bound of its error: the exact value (rounded as
    /// SumAcc.value) lies within `tol` of `v`.
    pub fn approx(&self) -> (f64, f64) {
        if let Some(e) = &self.ext {
            return e.approx();
        }
        let t = self.total as f64;
        let Some(f) = &self.fixed else { return (t, 0.0) };
        let fv = f.approx();
        (t + fv, (t.abs() + fv.abs()) * 1e-12 + 1e-280)
    }
    #[inline]
    pub fn fixed(&mut self) -> &mut Fixed {
        self.fixed.get_or_insert_with(|| Box::new(Fixed([0; LIMBS])))
    }
}

// ---- the aggregations that are not additive -----------------------------------------------------------

/// A metric's aggregation (the contract's names).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Agg {
    Count,
    Sum,
    Max,
    Min,
    Latest,
    Unique,
    P95,
    P99,
}

impl Agg {
    pub fn parse(name: &str) -> Option<Agg> {
        Some(match name {
            "count" => Agg::Count,
            "sum" => Agg::Sum,
            "max" => Agg::Max,
            "min" => Agg::Min,
            "latest" => Agg::Latest,
            "unique_count" => Agg::Unique,
            "p95" => Agg::P95,
            "p99" => Agg::P99,
            _ => return None,
        })
    }
    /// count and sum: a correction (sign -1) negates the contribution; the others ignore corrections.
    pub fn additive(self) -> bool {
        matches!(self, Agg::Count | Agg::Sum)
    }
}

/// The state of a max / min / latest / unique_count / p95 / p99 row.
#[derive(Clone)]
pub enum Ext {
    Best(Val<'static>),        // max, min: MaxAcc.best (the first of equal values stays)
    Latest(i64, Val<'static>), // LatestAcc.ts, .last (a tie goes to the later arrival)
    Unique(Box<UniqueSet>),    // UniqueAcc.seen
    Pct(Box<Multiset>),        // PercentileAcc.counts, .n
}

/// UniqueAcc.seen: a str as itself, any other value as (type name, value): 1, 1.0, true and "1" stay apart,
/// 0.0 and -0.0 do not (Python equality). `fresh`: the distinct values added since the last report, in order.
#[derive(Clone)]
pub struct UniqueSet {
    seen: HashSet<UKey>,
    fresh: Vec<Val<'static>>,
}

#[derive(Clone, Hash, PartialEq, Eq)]
enum UKey {
    S(String),
    I(i64),
    Big(Vec<u8>),
    F(u64),
    B(bool),
}

fn ukey(v: &Val) -> UKey {
    match v {
        Val::Str(s) => UKey::S(s.as_ref().to_owned()),
        Val::Int(i) => UKey::I(*i),
        Val::Big(b, _) => UKey::Big(b.clone()),
        Val::Float(f) => UKey::F(if *f == 0.0 { 0 } else { f.to_bits() }),
        Val::Bool(b) => UKey::B(*b),
        Val::Null => unreachable!("a null value is a missing property"),
    }
}

/// PercentileAcc.counts (value -> multiplicity, keys by Python numeric equality, the first value seen kept,
/// in first-seen order) and n. `dirty`: the entries changed since the last report.
#[derive(Clone)]
pub struct Multiset {
    index: HashMap<NKey, usize>,
    entries: Vec<(Val<'static>, u64, bool)>,
    n: u64,
    dirty: Vec<usize>,
}

/// A number's identity under Python ==: integral values as ints, other floats by their bits.
#[derive(Clone, Hash, PartialEq, Eq)]
enum NKey {
    I(i64),
    Big(Vec<u8>),
    Frac(u64),
}

const TWO63: f64 = 9_223_372_036_854_775_808.0;

fn nkey(v: &Val) -> NKey {
    match v {
        Val::Int(i) => NKey::I(*i),
        Val::Big(b, _) => NKey::Big(b.clone()),
        Val::Float(f) if f.fract() == 0.0 => {
            if (-TWO63..TWO63).contains(f) {
                NKey::I(*f as i64)
            } else {
                NKey::Big(crate::float_int_bytes(*f).expect("an integral finite float"))
            }
        }
        Val::Float(f) => NKey::Frac(f.to_bits()),
        _ => unreachable!("a percentile folds numbers"),
    }
}

impl Multiset {
    fn add(&mut self, v: &Val) {
        self.n += 1;
        let k = nkey(v);
        let i = match self.index.get(&k) {
            Some(&i) => i,
            None => {
                let i = self.entries.len();
                self.index.insert(k, i);
                self.entries.push((v.to_static(), 0, false));
                i
            }
        };
        let e = &mut self.entries[i];
        e.1 += 1;
        if !e.2 {
            e.2 = true;
            self.dirty.push(i);
        }
    }
}

/// Python's comparison of two numbers (int of any size or float, finite), exact.
pub fn cmp_num(a: &Val, b: &Val) -> Ordering {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => x.cmp(y),
        (Val::Float(x), Val::Float(y)) => x.partial_cmp(y).unwrap_or(Ordering::Equal),
        (Val::Int(i), Val::Float(f)) => cmp_int_float(*i, *f),
        (Val::Float(f), Val::Int(i)) => cmp_int_float(*i, *f).reverse(),
        (Val::Big(x, _), Val::Big(y, _)) => cmp_big(x, y),
        (Val::Big(x, _), Val::Int(_)) => big_sign(x),
        (Val::Int(_), Val::Big(y, _)) => big_sign(y).reverse(),
        (Val::Big(x, _), Val::Float(f)) => cmp_big_float(x, *f),
        (Val::Float(f), Val::Big(y, _)) => cmp_big_float(y, *f).reverse(),
        _ => unreachable!("numbers only"),
    }
}

fn cmp_int_float(i: i64, f: f64) -> Ordering {
    if f >= TWO63 {
        return Ordering::Less;
    }
    if f < -TWO63 {
        return Ordering::Greater;
    }
    let t = f.trunc();
    match i.cmp(&(t as i64)) {
        Ordering::Equal => 0.0f64.partial_cmp(&(f - t)).unwrap_or(Ordering::Equal),
        o => o,
    }
}

/// A Big (beyond i64) against any i64: its sign decides.
fn big_sign(b: &[u8]) -> Ordering {
    if b.last().map_or(false, |x| x & 0x80 != 0) {
        Ordering::Less
    } else {
        Ordering::Greater
    }
}

/// Two minimal little-endian two's-complement ints.
fn cmp_big(x: &[u8], y: &[u8]) -> Ordering {
    let nx = x.last().map_or(false, |b| b & 0x80 != 0);
    let ny = y.last().map_or(false, |b| b & 0x80 != 0);
    if nx != ny {
        return if nx { Ordering::Less } else { Ordering::Greater };
    }
    if x.len() != y.len() {
        let longer = x.len().cmp(&y.len());
        return if nx { longer.reverse() } else { longer };
    }
    for k in (0..x.len()).rev() {
        match x[k].cmp(&y[k]) {
            Ordering::Equal => continue,
            o => return o,
        }
    }
    Ordering::Equal
}

fn cmp_big_float(b: &[u8], f: f64) -> Ordering {
    if (-TWO63..TWO63).contains(&f) {
        return big_sign(b); // |b| >= 2**63 > |f|
    }
    cmp_big(b, &crate::float_int_bytes(f).expect("a float beyond 2**63 is integral"))
}

/// A number as f64, approximately, and a bound of the error (the exact float(v) lies within it).
fn num_approx(v: &Val) -> (f64, f64) {
    match v {
        Val::Int(i) => (*i as f64, (*i as f64).abs() * 1e-15),
        Val::Float(f) => (*f, 0.0),
        Val::Big(b, _) => {
            let neg = b.last().map_or(false, |x| x & 0x80 != 0);
            let mut m = 0.0f64;
            for &byte in b.iter().rev() {
                m = m * 256.0 + (if neg { !byte } else { byte }) as f64;
            }
            let v = if neg { -m - 1.0 } else { m };
            (v, v.abs() * 1e-12)
        }
        _ => (0.0, f64::INFINITY),
    }
}

impl Ext {
    fn first(agg: Agg, v: &Val, ts: i64) -> Ext {
        match agg {
            Agg::Max | Agg::Min => Ext::Best(v.to_static()),
            Agg::Latest => Ext::Latest(ts, v.to_static()),
            Agg::Unique => {
                let mut seen = HashSet::new();
                seen.insert(ukey(v));
                Ext::Unique(Box::new(UniqueSet { seen, fresh: vec![v.to_static()] }))
            }
            _ => {
                let mut m = Multiset { index: HashMap::new(), entries: Vec::new(), n: 0, dirty: Vec::new() };
                m.add(v);
                Ext::Pct(Box::new(m))
            }
        }
    }

    fn approx(&self) -> (f64, f64) {
        match self {
            Ext::Best(v) | Ext::Latest(_, v) => num_approx(v),
            Ext::Unique(u) => (u.seen.len() as f64, 0.0),
            Ext::Pct(_) => (0.0, f64::INFINITY), // (percentile entitlements are checked by the Python fold)
        }
    }
}

impl Acc {
    /// Fold one event's value into a max / min / latest / unique_count / p95 / p99 row (never a correction).
    pub fn fold_other(&mut self, agg: Agg, v: &Val, ts: i64) {
        self.events += 1;
        let Some(e) = self.ext.as_deref_mut() else {
            self.ext = Some(Box::new(Ext::first(agg, v, ts)));
            return;
        };
        match e {
            Ext::Best(b) => {
                let o = cmp_num(v, b);
                if (agg == Agg::Max && o == Ordering::Greater) || (agg == Agg::Min && o == Ordering::Less) {
                    *b = v.to_static();
                }
            }
            Ext::Latest(t, l) => {
                if ts >= *t {
                    *t = ts;
                    *l = v.to_static();
                }
            }
            Ext::Unique(u) => {
                if u.seen.insert(ukey(v)) {
                    u.fresh.push(v.to_static());
                }
            }
            Ext::Pct(m) => m.add(v),
        }
    }

    /// What `take_changes` reports of a row beside (events, total) for the Python mirror, then clears what it
    /// reports incrementally: max/min the value (MaxAcc.best); latest (ts, last); unique_count the distinct
    /// values added since the last report, as UniqueAcc.seen holds them (a str, or (type name, value)); p95/p99
    /// (n, [(value, count)] of the entries changed since the last report, in first-seen order).
    pub fn report<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self.ext.as_deref_mut() {
            None => Ok(py.None().into_bound(py)),
            Some(Ext::Best(v)) => val_to_py(py, v),
            Some(Ext::Latest(t, v)) => (*t, val_to_py(py, v)?).into_bound_py_any(py),
            Some(Ext::Unique(u)) => {
                let out = PyList::empty(py);
                for v in u.fresh.drain(..) {
                    out.append(unique_form(py, &v)?)?;
                }
                Ok(out.into_any())
            }
            Some(Ext::Pct(m)) => {
                let out = PyList::empty(py);
                m.dirty.sort_unstable();
                for i in m.dirty.drain(..) {
                    let e = &mut m.entries[i];
                    e.2 = false;
                    out.append((val_to_py(py, &e.0)?, e.1))?;
                }
                (m.n, out).into_bound_py_any(py)
            }
        }
    }

    /// The row's exact value as Python computes it from the mirrored state, for the entitlement check:
    /// max/min/latest the value (the caller takes float() of it), unique_count the number of distinct values.
    pub fn peek<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self.ext.as_deref() {
            Some(Ext::Best(v)) | Some(Ext::Latest(_, v)) => val_to_py(py, v),
            Some(Ext::Unique(u)) => u.seen.len().into_bound_py_any(py),
            _ => Ok(py.None().into_bound(py)),
        }
    }
}

/// A property value as the Python object msgspec decodes it to.
pub fn val_to_py<'py>(py: Python<'py>, v: &Val) -> PyResult<Bound<'py, PyAny>> {
    match v {
        Val::Str(s) => s.as_ref().into_bound_py_any(py),
        Val::Int(i) => i.into_bound_py_any(py),
        Val::Float(f) => f.into_bound_py_any(py),
        Val::Bool(b) => b.into_bound_py_any(py),
        Val::Null => Ok(py.None().into_bound(py)),
        Val::Big(b, _) => {
            let kw = PyDict::new(py);
            kw.set_item("signed", true)?;
            py.get_type::<PyInt>().call_method("from_bytes", (PyBytes::new(py, b), "little"), Some(&kw))
        }
    }
}

fn unique_form<'py>(py: Python<'py>, v: &Val) -> PyResult<Bound<'py, PyAny>> {
    let name = match v {
        Val::Str(_) => return val_to_py(py, v),
        Val::Int(_) | Val::Big(..) => "int",
        Val::Float(_) => "float",
        Val::Bool(_) => "bool",
        Val::Null => "NoneType",
    };
    Ok(PyTuple::new(py, [name.into_bound_py_any(py)?, val_to_py(py, v)?])?.into_any())
}

// ---- resume: a row rebuilt from the Python accumulator (native/src/resume.rs) -------------------------

impl Acc {
    /// A row as its Python accumulator holds it: `fixed` the float part of a sum (LIMBS * 8 bytes of
    /// little-endian two's complement), `ext` the value of the other aggregations (None: no value yet).
    pub fn restored(events: u64, total: i128, fixed: Option<Fixed>, ext: Option<Ext>) -> Acc {
        Acc { events, total, fixed: fixed.map(Box::new), reported: 0, ext: ext.map(Box::new) }
    }
}

impl Fixed {
    /// From LIMBS * 8 little-endian bytes (None: another length).
    pub fn from_le_bytes(b: &[u8]) -> Option<Fixed> {
        if b.len() != LIMBS * 8 {
            return None;
        }
        let mut l = [0u64; LIMBS];
        for (k, w) in l.iter_mut().enumerate() {
            *w = u64::from_le_bytes(b[8 * k..8 * k + 8].try_into().expect("8 bytes"));
        }
        Some(Fixed(l))
    }
}

impl Ext {
    /// UniqueAcc.seen's values (each once; nothing fresh: the Python accumulator holds them already).
    pub fn unique_of(values: Vec<Val<'static>>) -> Option<Ext> {
        let mut seen = HashSet::with_capacity(values.len());
        for v in &values {
            if matches!(v, Val::Null) || !seen.insert(ukey(v)) {
                return None;
            }
        }
        Some(Ext::Unique(Box::new(UniqueSet { seen, fresh: Vec::new() })))
    }

    /// PercentileAcc.counts (value, count) in its order, and n (nothing dirty).
    pub fn pct_of(n: u64, entries: Vec<(Val<'static>, u64)>) -> Option<Ext> {
        let mut m =
            Multiset { index: HashMap::with_capacity(entries.len()), entries: Vec::new(), n, dirty: Vec::new() };
        for (v, c) in entries {
            if !matches!(v, Val::Int(_) | Val::Big(..) | Val::Float(_))
                || m.index.insert(nkey(&v), m.entries.len()).is_some()
            {
                return None;
            }
            m.entries.push((v, c, false));
        }
        Some(Ext::Pct(Box::new(m)))
    }
}
