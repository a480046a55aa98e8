//! A customer's state into the native core (issue 16: customers come back to the native fold after a resume
//! and after a changelog record): the inverse of `take_changes` / `export_seen`, called by
//! operators/native.py `NativeMeters.load` with what its `CustomerMeter` holds (window and period rows,
//! excluded counts, the dedupe table, the watermark and the subscription's period rule). Everything is
//! checked before anything is stored: on an error nothing of the customer is held and it stays on the
//! Python fold.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::acc::{Acc, Agg, Ext, Fixed};
use crate::time::PeriodRule;
use crate::{val_from_py, BatchCore, Customer, FxMap, PKey};

fn bad(what: &str) -> PyErr {
    PyValueError::new_err(format!("load_customer: {what}"))
}

/// One row: `(events, total, fixed bytes or None, ext)` as operators/native.py `_row_parts` gives them.
fn acc_of(agg: Agg, row: &Bound<'_, PyAny>, at: usize) -> PyResult<Acc> {
    let events: u64 = row.get_item(at)?.extract()?;
    let total: i128 = row.get_item(at + 1)?.extract()?;
    let fixed: Option<Vec<u8>> = row.get_item(at + 2)?.extract()?;
    let fixed = match fixed {
        None => None,
        Some(b) => Some(Fixed::from_le_bytes(&b).ok_or_else(|| bad("the float part of a sum"))?),
    };
    let x = row.get_item(at + 3)?;
    let ext = if x.is_none() {
        None
    } else {
        match agg {
            Agg::Count | Agg::Sum => return Err(bad("a value for a count or sum row")),
            Agg::Max | Agg::Min => Some(Ext::Best(val_from_py(&x)?)),
            Agg::Latest => Some(Ext::Latest(x.get_item(0)?.extract()?, val_from_py(&x.get_item(1)?)?)),
            Agg::Unique => {
                let mut values = Vec::new();
                for v in x.try_iter()? {
                    values.push(val_from_py(&v?)?);
                }
                Some(Ext::unique_of(values).ok_or_else(|| bad("unique_count values"))?)
            }
            Agg::P95 | Agg::P99 => {
                let n: u64 = x.get_item(0)?.extract()?;
                let mut entries = Vec::new();
                for e in x.get_item(1)?.try_iter()? {
                    let e = e?;
                    entries.push((val_from_py(&e.get_item(0)?)?, e.get_item(1)?.extract::<u64>()?));
                }
                Some(Ext::pct_of(n, entries).ok_or_else(|| bad("percentile counts"))?)
            }
        }
    };
    Ok(Acc::restored(events, total, fixed, ext))
}

#[allow(clippy::too_many_arguments)]
pub fn load_customer(
    core: &mut BatchCore,
    py: Python<'_>,
    key: &str,
    period: &str,
    anchor: i64,
    wm: i64,
    fps: &[u8],
    exps: &[u8],
    windows: &Bound<'_, PyAny>,
    periods: &Bound<'_, PyAny>,
    excluded: &Bound<'_, PyAny>,
) -> PyResult<()> {
    if core.index.contains_key(key) {
        return Err(bad("the customer is already held"));
    }
    let rule = PeriodRule::new(period, anchor).ok_or_else(|| bad("the subscription's period"))?;
    let metric = |code: &str| -> PyResult<(u32, Agg)> {
        let mi = *core.code_index.get(code).ok_or_else(|| bad("an unknown metric"))?;
        Ok((mi, core.metrics[mi as usize].agg))
    };
    let mut ws = FxMap::default();
    for row in windows.try_iter()? {
        let row = row?;
        let (mi, agg) = metric(row.get_item(0)?.cast::<PyString>()?.to_str()?)?;
        let dims: Vec<String> = row.get_item(2)?.extract()?;
        if dims.len() != core.metrics[mi as usize].group_by.len() {
            return Err(bad("a window row's dimensions"));
        }
        let id = core.dims.intern_values(dims);
        ws.insert((mi, row.get_item(1)?.extract::<i64>()?, id), acc_of(agg, &row, 3)?);
    }
    let mut ps = FxMap::default();
    for row in periods.try_iter()? {
        let row = row?;
        let (mi, agg) = metric(row.get_item(0)?.cast::<PyString>()?.to_str()?)?;
        let pk: PKey = (mi, row.get_item(1)?.extract()?, row.get_item(2)?.extract()?);
        ps.insert(pk, acc_of(agg, &row, 3)?);
    }
    let mut xs = FxMap::default();
    for row in excluded.try_iter()? {
        let row = row?;
        let (mi, _) = metric(row.get_item(0)?.cast::<PyString>()?.to_str()?)?;
        xs.insert((mi, row.get_item(1)?.extract()?, row.get_item(2)?.extract()?), (row.get_item(3)?.extract()?, 0));
    }
    if fps.len() != exps.len() || fps.len() % 8 != 0 {
        return Err(bad("the dedupe table"));
    }
    let seen = crate::dedupe::from_state(fps, exps).map_err(|_| bad("the dedupe table"))?;
    // (CustomerMeter's restore and NativeMeters.release start its eviction bound at the smallest expiry too)
    let seen_next = seen.min_expiry();
    let c = Customer { seen, seen_next, wm, windows: ws, periods: ps, excluded: xs, ..Customer::new(py, key, rule) };
    core.hold_customer(key.to_owned(), c);
    Ok(())
}
