//! The parts of a core's spec that every shard of a flow shares, parsed once (issue 16, end to end).
//!
//! `pipeline.shards` BatchCores (256 by default) each parsed the whole subscription list of the spec and
//! kept their own copy of it: with the benchmark's 6,000 subscriptions about 2 ms and ~0.6 MB per shard, so
//! ~0.5 s of CPU at the first batches and ~150 MB of RSS. `Subscriptions` is that table, built once and
//! shared (`Arc`) by every core made from a spec holding it (operators/native.py `NativeMeters.factory`).

use std::collections::HashMap;
use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::time::PeriodRule;

/// The subscriptions' period rules by `tenant|customer`.
pub(crate) type SubTable = Arc<HashMap<String, PeriodRule>>;

/// `[(tenant|customer, period, anchor_ms), ...]` (operators/native.py `_spec`) as a table.
pub(crate) fn parse_subs(items: &Bound<'_, PyAny>) -> PyResult<HashMap<String, PeriodRule>> {
    let mut subs = HashMap::new();
    for s in items.try_iter()? {
        let s = s?;
        let key: String = s.get_item(0)?.extract()?;
        let kind: String = s.get_item(1)?.extract()?;
        let anchor: i64 = s.get_item(2)?.extract()?;
        let rule = PeriodRule::new(&kind, anchor)
            .ok_or_else(|| PyValueError::new_err(format!("subscription {key}: period {kind}")))?;
        subs.insert(key, rule);
    }
    Ok(subs)
}

/// A spec's `subscriptions` value, given either as the list or as a shared `Subscriptions`.
pub(crate) fn subs_of(value: &Bound<'_, PyAny>) -> PyResult<SubTable> {
    if let Ok(s) = value.cast::<Subscriptions>() {
        return Ok(s.get().table.clone());
    }
    Ok(Arc::new(parse_subs(value)?))
}

/// The subscription list of a spec parsed once, for many cores: `spec["subscriptions"] = Subscriptions(list)`.
#[pyclass(module = "meterflow_native", frozen)]
pub(crate) struct Subscriptions {
    table: SubTable,
}

#[pymethods]
impl Subscriptions {
    #[new]
    fn new(items: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(Subscriptions { table: Arc::new(parse_subs(items)?) })
    }

    fn __len__(&self) -> usize {
        self.table.len()
    }
}
