//! The raw archive of a staged batch as ClickHouse `RowBinary` rows of `raw_event_rows` (issue 16, end to
//! end): the same values, in the same order, as `Mediator::columns` gives as ten Python lists, written
//! straight into one bytes object, so an archived event costs no Python object and no driver serialisation
//! (sinks/clickhouse.py inserts the bytes as they are). With `Mediator.archiving` set, `run` writes each
//! accepted line's first seven columns (`row_head`) while it has the line parsed, so `row_binary` only copies
//! them and adds the batch's ingested time and the source; otherwise it parses the staged line again.
//!
//! Row layout, the columns of sinks/clickhouse_schema.py `RAW_COLUMNS` in order: tenant_id, customer_id,
//! event_id, event_type (String: LEB128 length, UTF-8 bytes), timestamp (DateTime64(3): Int64 ms, little
//! endian), properties (String), correction (UInt8), ingested_at (Int64 ms), source (String), position (Int64).

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt, PyString};

use super::{put_props_json, put_src_text, Mediator};
use crate::json::{self, Event};
use crate::rowbin::put_str;

/// A String column whose bytes `write` appends: its LEB128 length before them (one byte kept for it; the
/// bytes moved up when the length takes more).
fn put_str_with(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.push(0);
    write(out);
    let mut n = out.len() - at - 1;
    if n < 0x80 {
        out[at] = n as u8;
        return;
    }
    let mut head = [0u8; 10];
    let mut k = 0;
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            head[k] = b;
            k += 1;
            break;
        }
        head[k] = b | 0x80;
        k += 1;
    }
    let end = out.len();
    out.resize(end + k - 1, 0);
    out.copy_within(at + 1..end, at + k);
    out[at..at + k].copy_from_slice(&head[..k]);
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// The first seven columns of a native event's row (tenant_id .. correction): what the parsed line gives.
pub(super) fn row_head(out: &mut Vec<u8>, p: &Event<'_>, ts: i64) {
    put_str(out, p.tenant_id.as_bytes());
    put_str(out, p.customer_id.as_bytes());
    put_str(out, p.event_id.as_bytes());
    put_str(out, p.event_type.as_bytes());
    put_i64(out, ts);
    match p.props_raw {
        Some(text) => put_str(out, text.as_bytes()), // (already msgspec's text)
        None => put_str_with(out, |o| put_props_json(o, &p.props)),
    }
    out.push(u8::from(p.correction));
}

/// A Python-made event's row (`py_row(me)`: the ten values) in RowBinary; None when a value is not
/// exactly what the columns path would write (a str that is not valid UTF-8, a non-int time or position):
/// the caller then archives the batch as columns, so whatever the driver does with it stays as it was.
fn py_row(out: &mut Vec<u8>, row: &Bound<'_, PyAny>) -> PyResult<Option<()>> {
    for k in 0..10 {
        let v = row.get_item(k)?;
        match k {
            4 | 7 | 9 => {
                if !v.is_exact_instance_of::<PyInt>() {
                    return Ok(None);
                }
                let Ok(i) = v.extract::<i64>() else { return Ok(None) };
                put_i64(out, i);
            }
            6 => {
                if !v.is_exact_instance_of::<PyBool>() {
                    return Ok(None);
                }
                out.push(u8::from(v.is_truthy()?));
            }
            _ => {
                if !v.is_exact_instance_of::<PyString>() {
                    return Ok(None);
                }
                let Ok(s) = v.cast::<PyString>()?.to_str() else { return Ok(None) };
                put_str(out, s.as_bytes());
            }
        }
    }
    Ok(Some(()))
}

/// `(rows, RowBinary bytes)` of the staged batch, or None (see `py_row`); the caller checks it is not empty.
pub(super) fn row_binary(
    m: &Mediator,
    py: Python<'_>,
    ingested: i64,
    py_row_of: &Bound<'_, PyAny>,
) -> PyResult<Option<(usize, Vec<u8>)>> {
    let room: usize = m.stages[..m.used].iter().map(|st| st.b.buf.len() + st.b.ts.len() * 96).sum();
    let mut out: Vec<u8> = Vec::with_capacity(room);
    let mut rows = 0usize;
    for (st, e) in m.staged() {
        let b = &st.b;
        rows += 1;
        if b.pyi[e] >= 0 {
            let row = py_row_of.call1((b.py[b.pyi[e] as usize].bind(py),))?;
            if py_row(&mut out, &row)?.is_none() {
                return Ok(None);
            }
            continue;
        }
        let (a0, a1) = st.arch[e];
        if a1 > a0 {
            // written by run as it parsed the line
            out.extend_from_slice(&m.arch[a0 as usize..a1 as usize]);
        } else {
            let p = json::parse_event(b.line(e))
                .ok_or_else(|| pyo3::exceptions::PyValueError::new_err("staged line no longer parses"))?;
            row_head(&mut out, &p, b.ts[e]);
        }
        let src = &b.srcs[e];
        put_i64(&mut out, ingested);
        put_str_with(&mut out, |o| put_src_text(o, &b.names, src));
        put_i64(
            &mut out,
            if src.kind == 0 {
                0
            } else if src.kind == 2 {
                src.a
            } else {
                src.b
            },
        );
    }
    Ok(Some((rows, out)))
}
