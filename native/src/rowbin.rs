//! ClickHouse `RowBinary` rows of the sink's hot tables (usage_window_rows, usage_period_rows,
//! usage_rated_rows): sinks/clickhouse_schema.py `rowbinary` hands over the records as tuples (msgspec
//! `astuple`) with a column spec read from the table's insert context, and gets back one bytes object to
//! insert with `raw_insert(..., fmt="RowBinary")`, instead of Python building columns and the driver
//! writing them value by value while it holds the GIL.
//!
//! Only values that the driver's column insert writes in one obvious way are encoded here: exact `str`
//! (valid UTF-8), exact `int` in range, exact `float` (or an exact `int`, as the driver's `float(x)`),
//! exact `bool`, `dict` of exact `str`. Anything else makes the function return None, and the caller
//! writes that table's rows through the driver as before, so what it does with them stays as it was.
//!
//! RowBinary, per row the columns in order: String = LEB128 byte length then the UTF-8 bytes
//! (LowCardinality(String) is its String); DateTime64(3) = Int64 ms little endian; Map(String, String) =
//! LEB128 pair count then key, value, ... in the dict's order; Float64 = IEEE 754 little endian (NaN and
//! infinities as they are); Nullable(T) = byte 1 for NULL (nothing follows), else byte 0 then T; UInt64 =
//! 8 bytes little endian; UInt8 = one byte; Decimal(38, 9) = Int128 little endian of value x 10^9: made here
//! from the Decimal's `str` (`money_of`) or, for a value that takes more than that, by `money_data` in Python
//! (then passed as one bytes object per money column, 16 bytes a row).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::ptr::addr_of_mut;

use pyo3::ffi;
use pyo3::types::{PyBytes, PyList};

// Column codes (sinks/clickhouse_schema.py `_RB_*`); each spec entry is (code, argument).
const STRING: u8 = 0; // String / LowCardinality(String): tuple item `arg`
const DT64: u8 = 1; // DateTime64(3) from epoch ms: tuple item `arg`
const MAP: u8 = 2; // Map(String, String): tuple item `arg`
const F64: u8 = 3; // Float64: tuple item `arg`
const NF64: u8 = 4; // Nullable(Float64): tuple item `arg`
const U64: u8 = 5; // UInt64: tuple item `arg`
const BOOL: u8 = 6; // UInt8 from a bool: tuple item `arg`
const DIMS_KEY: u8 = 7; // String: clickhouse_schema.dims_key of the dict at tuple item `arg`
const CONST_MS: u8 = 8; // DateTime64(3): the call's `at_ms`
const MONEY: u8 = 9; // Decimal(38, 9): 16 bytes per row from `money[arg]`
const MONEY_DEC: u8 = 10; // Decimal(38, 9) from the exact decimal.Decimal at tuple item `arg` (`money_of`)

/// LEB128 length (RowBinary strings and maps; also the raw archive's rows, native/src/mediate/archive.rs).
pub(crate) fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_len(out, s.len());
    out.extend_from_slice(s);
}

// The values are read with the C API directly: every object is borrowed from the rows (a list the caller holds)
// or from a dict among them, and nothing here runs Python code, so none of them can go away or change meanwhile.

#[inline]
unsafe fn is(v: *mut ffi::PyObject, t: *mut ffi::PyTypeObject) -> bool {
    ffi::Py_TYPE(v) == t
}

/// The UTF-8 of an exact `str`, None otherwise (a subclass, or a str with lone surrogates).
#[inline]
unsafe fn exact_str<'a>(v: *mut ffi::PyObject) -> Option<&'a [u8]> {
    if !is(v, addr_of_mut!(ffi::PyUnicode_Type)) {
        return None;
    }
    let mut n: ffi::Py_ssize_t = 0;
    let p = ffi::PyUnicode_AsUTF8AndSize(v, &mut n);
    if p.is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    Some(std::slice::from_raw_parts(p.cast::<u8>(), n as usize))
}

/// What the driver's Float64 writer stores: an exact float as it is, an exact int as `float(x)`.
#[inline]
unsafe fn float_of(v: *mut ffi::PyObject) -> Option<f64> {
    if is(v, addr_of_mut!(ffi::PyFloat_Type)) {
        return Some(ffi::PyFloat_AsDouble(v));
    }
    if is(v, addr_of_mut!(ffi::PyLong_Type)) {
        let f = ffi::PyLong_AsDouble(v); // correctly rounded; too large: not encoded here
        if f == -1.0 && !ffi::PyErr_Occurred().is_null() {
            ffi::PyErr_Clear();
            return None;
        }
        return Some(f);
    }
    None
}

/// An exact int's value as i64 (`signed`) or u64 bits; None for another type or out of range.
#[inline]
unsafe fn int_of(v: *mut ffi::PyObject, signed: bool) -> Option<u64> {
    if !is(v, addr_of_mut!(ffi::PyLong_Type)) {
        return None;
    }
    let x = if signed { ffi::PyLong_AsLongLong(v) as u64 } else { ffi::PyLong_AsUnsignedLongLong(v) };
    if x == u64::MAX && !ffi::PyErr_Occurred().is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    Some(x)
}

/// The (key, value) UTF-8 pairs of an exact dict of exact strs, in its order; None otherwise.
unsafe fn str_pairs<'a>(d: *mut ffi::PyObject, pairs: &mut Vec<(&'a [u8], &'a [u8])>) -> Option<()> {
    if !is(d, addr_of_mut!(ffi::PyDict_Type)) {
        return None;
    }
    pairs.clear();
    let mut pos: ffi::Py_ssize_t = 0;
    let (mut k, mut v) = (std::ptr::null_mut(), std::ptr::null_mut());
    while ffi::PyDict_Next(d, &mut pos, &mut k, &mut v) != 0 {
        pairs.push((exact_str(k)?, exact_str(v)?));
    }
    Some(())
}

/// A Decimal's `str` as the Int128 of value x 10^9 truncated toward zero, what `money_data` makes
/// (`int(scaleb(x, 9))` at precision 38), for a coefficient of at most 38 digits (so scaleb is exact) and an
/// exponent in [-69, 29] (nothing a context limits); None otherwise (NaN, infinities, more digits, beyond
/// Int128): the caller then makes the column with `money_data`.
fn money_of(s: &[u8]) -> Option<i128> {
    let (neg, s) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let (mant, exp) = match s.iter().position(|&c| c == b'E') {
        Some(i) => {
            let e = &s[i + 1..];
            let (eneg, e) = match e.first() {
                Some(b'-') => (true, &e[1..]),
                Some(b'+') => (false, &e[1..]),
                _ => (false, e),
            };
            if e.is_empty() || e.len() > 6 || !e.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let v = e.iter().fold(0i64, |a, &c| a * 10 + i64::from(c - b'0'));
            (&s[..i], if eneg { -v } else { v })
        }
        None => (s, 0),
    };
    let (mut c, mut digits, mut frac, mut dot, mut any) = (0u128, 0, 0i64, false, false);
    for &ch in mant {
        match ch {
            b'0'..=b'9' => {
                any = true;
                frac += i64::from(dot);
                if c == 0 && ch == b'0' {
                    continue; // a leading zero
                }
                digits += 1;
                if digits > 38 {
                    return None;
                }
                c = c * 10 + u128::from(ch - b'0');
            }
            b'.' if !dot => dot = true,
            _ => return None,
        }
    }
    let e9 = exp - frac + 9;
    if !any || !(-60..=38).contains(&e9) {
        return None;
    }
    let m = if e9 >= 0 {
        c.checked_mul(10u128.pow(e9 as u32))?
    } else if e9 < -38 {
        0
    } else {
        c / 10u128.pow((-e9) as u32)
    };
    const LIMIT: u128 = 1 << 127;
    match (neg, m) {
        (true, m) if m <= LIMIT => Some((m as i128).wrapping_neg()),
        (false, m) if m < LIMIT => Some(m as i128),
        _ => None,
    }
}

/// One row's columns; None when a value is not one this encoder writes (see the module doc).
unsafe fn put_row<'a>(
    out: &mut Vec<u8>,
    t: *mut ffi::PyObject,
    spec: &[(u8, usize)],
    row: usize,
    at_ms: i64,
    money: &[&[u8]],
    pairs: &mut Vec<(&'a [u8], &'a [u8])>,
    decimal: *mut ffi::PyTypeObject,
    last: &mut [(*mut ffi::PyObject, i128)],
) -> Option<()> {
    if !is(t, addr_of_mut!(ffi::PyTuple_Type)) {
        return None;
    }
    let len = ffi::PyTuple_Size(t) as usize;
    for (col, &(code, arg)) in spec.iter().enumerate() {
        if code == CONST_MS {
            out.extend_from_slice(&at_ms.to_le_bytes());
            continue;
        }
        if code == MONEY {
            out.extend_from_slice(&money[arg][16 * row..16 * row + 16]);
            continue;
        }
        if arg >= len {
            return None;
        }
        let v = ffi::PyTuple_GetItem(t, arg as ffi::Py_ssize_t);
        match code {
            STRING => put_str(out, exact_str(v)?),
            DT64 => out.extend_from_slice(&int_of(v, true)?.to_le_bytes()),
            U64 => out.extend_from_slice(&int_of(v, false)?.to_le_bytes()),
            F64 => out.extend_from_slice(&float_of(v)?.to_le_bytes()),
            NF64 => {
                if v == ffi::Py_None() {
                    out.push(1);
                } else {
                    out.push(0);
                    out.extend_from_slice(&float_of(v)?.to_le_bytes());
                }
            }
            BOOL => {
                if !is(v, addr_of_mut!(ffi::PyBool_Type)) {
                    return None;
                }
                out.push(u8::from(v == ffi::Py_True()));
            }
            MAP => {
                str_pairs(v, pairs)?;
                put_len(out, pairs.len());
                for (k, v) in pairs.iter() {
                    put_str(out, k);
                    put_str(out, v);
                }
            }
            DIMS_KEY => {
                // clickhouse_schema.dims_key: "k=v" joined by \x1f, sorted by key (code point order, which is
                // UTF-8 byte order; the keys differ); "" without dimensions
                str_pairs(v, pairs)?;
                if pairs.len() > 1 {
                    pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
                }
                let n = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>().saturating_sub(1);
                put_len(out, n);
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(0x1f);
                    }
                    out.extend_from_slice(k);
                    out.push(b'=');
                    out.extend_from_slice(v);
                }
            }
            MONEY_DEC => {
                if last[col].0 == v {
                    // the same Decimal as the row before (a shared zero): its Int128 again
                    out.extend_from_slice(&last[col].1.to_le_bytes());
                    continue;
                }
                if !is(v, decimal) {
                    return None;
                }
                let text = ffi::PyObject_Str(v);
                if text.is_null() {
                    ffi::PyErr_Clear();
                    return None;
                }
                let m = exact_str(text).and_then(money_of);
                ffi::Py_DECREF(text);
                last[col] = (v, m?);
                out.extend_from_slice(&m?.to_le_bytes());
            }
            _ => return None,
        }
    }
    Some(())
}

/// `rows` (a list of tuples, the records' fields in order) as RowBinary rows of the columns `spec` (the
/// table's insert columns in order: (code, tuple index or money column)); `at_ms` is the `updated_at` of
/// every row, `money` the Decimal(38, 9) columns' data (16 bytes a row each). None when a value is not
/// one this encoder writes exactly as the driver would: the caller then inserts the columns as before.
#[pyfunction]
#[pyo3(signature = (rows, spec, at_ms, money=Vec::new()))]
pub fn rowbinary<'py>(
    py: Python<'py>,
    rows: &Bound<'py, PyList>,
    spec: Vec<(u8, usize)>,
    at_ms: i64,
    money: Vec<Bound<'py, PyBytes>>,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let n = rows.len();
    let money: Vec<&[u8]> = money.iter().map(|b| b.as_bytes()).collect();
    for &(code, arg) in &spec {
        if code > MONEY_DEC {
            return Err(PyValueError::new_err(format!("rowbinary: unknown column code {code}")));
        }
        if code == MONEY && money.get(arg).map_or(true, |m| m.len() != 16 * n) {
            return Err(PyValueError::new_err("rowbinary: a money column is not 16 bytes a row"));
        }
    }
    let mut out: Vec<u8> = Vec::with_capacity(n * (spec.len() * 9 + 32));
    let mut pairs = Vec::new();
    let decimal = py.import("decimal")?.getattr("Decimal")?; // (held for the call)
    let decimal_type = decimal.as_ptr().cast::<ffi::PyTypeObject>();
    let mut last = vec![(std::ptr::null_mut(), 0i128); spec.len()]; // (rows hold every value: no pointer is reused)
    for row in 0..n {
        // (the list's length is n: nothing here runs Python code that could change it)
        let ok = unsafe {
            let t = ffi::PyList_GetItem(rows.as_ptr(), row as ffi::Py_ssize_t);
            put_row(&mut out, t, &spec, row, at_ms, &money, &mut pairs, decimal_type, &mut last)
        };
        if ok.is_none() {
            return Ok(None);
        }
    }
    Ok(Some(PyBytes::new(py, &out)))
}
