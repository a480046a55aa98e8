//! meterflow's native batch core (issue 16, first step): decode, validate, parse timestamps, check the
//! tenant registry and exclusions, deduplicate (XXH3-64 fingerprints of event ids, per tenant|customer)
//! and fold count/sum metrics into windows and billing periods, over a whole batch of raw JSONL lines.
//!
//! The Python wrapper (operators/native.py) drives it: `run` goes through the lines until one that it
//! does not handle exactly (bad input, an unusual encoding, a form of timestamp it does not parse); the
//! wrapper sends that line through the Python Mediator, which gives the exact dead letter, or the event,
//! which it folds here with `fold`, so the state sees every event in order. Meter dead letters (too_late,
//! missing_property) are decided here and worded by the wrapper with the Python texts.

mod acc;
mod anomaly;
mod dedupe;
mod dims;
mod json;
mod mediate;
mod resume;
mod rowbin;
mod spec;
mod time;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use acc::{Acc, Agg};
use anomaly::Stop;
use dedupe::IdTable;
use json::{Event, Val};
use time::PeriodRule;

const MAX_DEPTH: usize = 64; // operators/mediate.py MAX_DEPTH (json.rs `skip` enforces it)
const LAST_EVENT_MS: i64 = 221_845_392_000_000; // operators/mediate.py LAST_EVENT_MS
const MAX_NUMBER: f64 = 1e300;
const SEEN_EVICT_SLACK_MS: i128 = 3_600_000; // operators/meter.py _DEDUPE_EVICT_SLACK_MS

// ---- hashing: FxHash for keys, identity for fingerprints (already uniform) ---------------------------
#[derive(Default)]
struct Fx(u64);
impl Hasher for Fx {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    #[inline]
    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64)
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64)
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}
type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

#[derive(Default)]
struct Ident(u64);
impl Hasher for Ident {
    fn write(&mut self, _: &[u8]) {
        unreachable!()
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// XXH3-64 (seed 0) of the id's UTF-8 bytes, 0 mapped to 1: operators/dedupe.py `fingerprint`.
#[inline]
fn fingerprint(id: &str) -> u64 {
    match xxhash_rust::xxh3::xxh3_64(id.as_bytes()) {
        0 => 1,
        f => f,
    }
}

// ---- Python equality of JSON scalars (operators/mediate.py `matches`) -------------------------------
fn norm(mut b: Vec<u8>) -> Vec<u8> {
    while b.len() > 1 {
        let (last, prev) = (b[b.len() - 1], b[b.len() - 2]);
        if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
            b.pop();
        } else {
            break;
        }
    }
    b
}

fn int_bytes(v: i128) -> Vec<u8> {
    norm(v.to_le_bytes().to_vec())
}

/// The exact integer of an integral float, as minimal little-endian two's complement.
fn float_int_bytes(f: f64) -> Option<Vec<u8>> {
    if !f.is_finite() || f.fract() != 0.0 {
        return None;
    }
    if f.abs() < 1e38 {
        return Some(int_bytes(f as i128));
    }
    let bits = f.to_bits();
    let e = ((bits >> 52) & 0x7ff) as i64 - 1075;
    let m = (bits & ((1u64 << 52) - 1)) | (1u64 << 52);
    let nbytes = ((e + 53) / 8 + 2) as usize;
    let mut mag = vec![0u8; nbytes];
    for k in 0..53 {
        if m >> k & 1 == 1 {
            let pos = (k + e) as usize;
            mag[pos / 8] |= 1 << (pos % 8);
        }
    }
    if f < 0.0 {
        let mut carry = 1u16;
        for b in mag.iter_mut() {
            let v = (!*b) as u16 + carry;
            *b = v as u8;
            carry = v >> 8;
        }
    }
    Some(norm(mag))
}

fn py_eq(p: &Val, v: &Val) -> bool {
    match (p, v) {
        (Val::Bool(a), Val::Bool(b)) => a == b,
        (Val::Bool(_), _) | (_, Val::Bool(_)) => false,
        (Val::Str(a), Val::Str(b)) => a == b,
        (Val::Null, Val::Null) => true,
        (Val::Int(a), Val::Int(b)) => a == b,
        (Val::Float(a), Val::Float(b)) => a == b,
        (Val::Int(i), Val::Float(f)) | (Val::Float(f), Val::Int(i)) => {
            f.fract() == 0.0 && f.abs() < 1e38 && (*f as i128) == *i as i128
        }
        (Val::Big(a, _), Val::Big(b, _)) => a == b,
        (Val::Big(a, _), Val::Float(f)) | (Val::Float(f), Val::Big(a, _)) => float_int_bytes(*f).as_ref() == Some(a),
        _ => false,
    }
}

fn lookup<'v, 'a, K: AsRef<str>>(props: &'v [(K, Val<'a>)], key: &str) -> Option<&'v Val<'a>> {
    props.iter().find(|(k, _)| k.as_ref() == key).map(|(_, v)| v)
}

fn matches<K: AsRef<str>>(props: &[(K, Val)], wanted: &[(String, Val)]) -> bool {
    wanted.iter().all(|(k, v)| lookup(props, k).map_or(false, |p| py_eq(p, v)))
}

// ---- compiled rules and state ----------------------------------------------------------------------
struct Metric {
    code: Py<PyString>,
    prop: Option<String>,
    is_sum: bool,
    agg: Agg,
    wanted: Vec<(String, Val<'static>)>,
    group_by: Vec<String>, // (dims.rs)
}

struct Tenant {
    excluded: HashSet<String, BuildHasherDefault<Fx>>, // (FxHash: looked up per event)
    when: Vec<(String, Val<'static>)>,
}

type WKey = (u32, i64, u32); // metric, window start, dims (dims.rs DimTable id; 0: none)
type PKey = (u32, i64, i64);

pub(crate) struct Customer {
    key: Py<PyString>,
    rule: PeriodRule,
    seen: IdTable,
    seen_next: u64, // CustomerMeter.next_dedupe_evict: at most the smallest expiry in `seen`
    seen_due: bool, // an event was folded since the last `evict_seen` (it is in BatchCore.seen_due)
    wm: i64,
    pstart: i64,
    pend: i64,
    windows: FxMap<WKey, Acc>,
    periods: FxMap<PKey, Acc>,
    excluded: FxMap<PKey, (u64, u64)>,
    touched: u64,                // the round of take_wms in which an event of this customer was last folded
    levels: Option<Box<Levels>>, // a customer whose subscription evaluates thresholds (None: nothing)
    anom: Option<Box<anomaly::Cells>>, // a customer with anomaly detection: its current day cells (anomaly.rs)
}

impl Customer {
    /// A customer with no state yet, under period rule `rule`.
    pub(crate) fn new(py: Python<'_>, key: &str, rule: PeriodRule) -> Customer {
        Customer {
            key: PyString::new(py, key).unbind(),
            rule,
            seen: IdTable::new(),
            seen_next: dedupe::NO_EXPIRY,
            seen_due: false,
            wm: 0,
            pstart: 0,
            pend: 0,
            windows: FxMap::default(),
            periods: FxMap::default(),
            excluded: FxMap::default(),
            touched: 0,
            levels: None,
            anom: None,
        }
    }
}

/// The next usage level of each evaluated metric's period at which Python has something to do (a hair
/// low; Python's exact test decides). An event that folds an evaluated metric into a period without a level,
/// or whose fold brings the period's value to its level, stops the fold (`stops`) for Python.
/// A level with `fall` set also stops an event that may lower the value (a correction, a negative value, an
/// aggregation that is not additive): a spend level of a card whose charge can fall is valid only while usage
/// does not (Python re-derives it from the lower usage).
///
/// `fresh[m]` (`set_fresh`): the level of metric `m`'s first period, for a customer with no entitlement state yet
/// (its level depends on nothing but the entitlement then): the first event folded into a period of `m` without a
/// level takes it (noted in `BatchCore.fresh_done`, `take_fresh`, for Python to make that period the current one,
/// as the stop it replaces would have), so a new customer's first events do not stop.
struct Levels {
    evals: Vec<bool>,
    at: FxMap<PKey, (f64, bool)>,
    fresh: Vec<Option<f64>>,
}

enum Note {
    TooLate { index: usize, cust: usize, pstart: i64, pend: i64, wm: i64 },
    Missing { index: usize, cust: usize, metric: u32 },
}

#[derive(Default)]
struct Counters {
    read: u64,
    accepted: u64,
    duplicates: u64,
    excluded: u64,
    unmetered: u64,
    too_late: u64,
    missing_property: u64,
    python_path: u64,
    corrections_ignored: u64,
}

#[pyclass(module = "meterflow_native")]
struct BatchCore {
    max_bytes: usize,
    max_skew_ms: i64,
    window_ms: i64,
    grace_ms: i64,
    dedupe_ms: i64,
    tenants: FxMap<String, Tenant>,
    by_type: FxMap<String, Vec<u32>>,
    metrics: Vec<Metric>,
    subs: spec::SubTable, // shared by the cores of one flow (spec.rs)
    default_rule: PeriodRule,
    customers: Vec<Customer>,
    index: FxMap<String, usize>,
    #[pyo3(get, set)]
    watermark: i64,
    round: u64,
    changed_w: Vec<(usize, WKey)>,
    changed_p: Vec<(usize, PKey)>,
    changed_x: Vec<(usize, PKey)>,
    notes: Vec<Note>,
    stops: Vec<Stop>,
    fresh_done: Vec<(usize, PKey)>, // first periods that took their customer's fresh level (`Levels`), in order
    anom_changed: Vec<(usize, u32)>, // anomaly cells added to since the last `take_cells` (anomaly.rs)
    code_index: FxMap<String, u32>,
    c: Counters,
    key_buf: String,
    wm_round: u64,
    touched_c: Vec<usize>,
    last: [u64; 6],
    dims: dims::DimTable,
    seen_due: Vec<usize>, // customers folded since the last `evict_seen`
    free: Vec<usize>,     // slots of dropped customers, reused by `hold_customer`
}

fn val_from_py(v: &Bound<'_, PyAny>) -> PyResult<Val<'static>> {
    if v.is_none() {
        Ok(Val::Null)
    } else if let Ok(b) = v.cast::<PyBool>() {
        Ok(Val::Bool(b.is_true()))
    } else if v.is_instance_of::<PyInt>() {
        match v.extract::<i64>() {
            Ok(i) => Ok(Val::Int(i)),
            Err(_) => Err(PyValueError::new_err("ints outside i64 come as ('big', bytes, in_range)")),
        }
    } else if let Ok(f) = v.cast::<PyFloat>() {
        Ok(Val::Float(f.value()))
    } else if let Ok(s) = v.cast::<PyString>() {
        Ok(Val::Str(std::borrow::Cow::Owned(s.to_str()?.to_owned())))
    } else if let Ok(t) = v.cast::<PyTuple>() {
        // ("big", little-endian two's complement bytes, -1e300 < v < 1e300)
        let b: Vec<u8> = t.get_item(1)?.extract()?;
        let ok: bool = t.get_item(2)?.extract()?;
        Ok(Val::Big(norm(b), ok))
    } else {
        Err(PyValueError::new_err(format!("unsupported property value {v:?}")))
    }
}

fn pairs(obj: &Bound<'_, PyAny>) -> PyResult<Vec<(String, Val<'static>)>> {
    let mut out = Vec::new();
    for item in obj.try_iter()? {
        let item = item?;
        let k: String = item.get_item(0)?.extract()?;
        out.push((k, val_from_py(&item.get_item(1)?)?));
    }
    Ok(out)
}

impl BatchCore {
    fn customer(&mut self, py: Python<'_>, tenant: &str, customer: &str) -> usize {
        self.key_buf.clear();
        self.key_buf.push_str(tenant);
        self.key_buf.push('|');
        self.key_buf.push_str(customer);
        if let Some(&i) = self.index.get(self.key_buf.as_str()) {
            return i;
        }
        self.new_customer(py)
    }

    /// One mediated line of customer `ci` into the fold (`fold_many`, mediate.rs `fold_bundle`): None, folded; or
    /// why the fold stops there — 1, a line the native decoder leaves to Python; 2, no billing period for its
    /// time; 3, it reached a level (`stops`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fold_line(
        &mut self,
        index: usize,
        ci: usize,
        raw: &[u8],
        ts: i64,
        wm: i64,
        excluded: bool,
    ) -> Option<u8> {
        let Some(ev) = json::parse_event(raw) else { return Some(1) };
        self.fold_parsed(
            index,
            ci,
            fingerprint(&ev.event_id),
            &ev.event_type,
            ts,
            wm,
            excluded,
            ev.correction,
            &ev.props,
        )
    }

    /// `fold_line` of a line already parsed (mediate.rs `fold_bundle`: the bundle keeps each line's parse).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fold_parsed<K: AsRef<str>>(
        &mut self,
        index: usize,
        ci: usize,
        fp: u64,
        event_type: &str,
        ts: i64,
        wm: i64,
        excluded: bool,
        correction: bool,
        props: &[(K, Val)],
    ) -> Option<u8> {
        if wm > self.watermark {
            self.watermark = wm;
        }
        if self.fold_one(index, ci, fp, event_type, ts, wm, excluded, correction, props).is_err() {
            return Some(2);
        }
        self.c.read += 1;
        if !self.stops.is_empty() {
            return Some(3);
        }
        None
    }

    /// The meter dead letters noted since the last drain, as `(index, key, reason, a, b, c)` for Python to word.
    fn drain_notes<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let notes = PyList::empty(py);
        for note in self.notes.drain(..) {
            match note {
                Note::TooLate { index, cust, pstart, pend, wm } => {
                    notes.append((index, self.customers[cust].key.bind(py), "too_late", pstart, pend, wm))?
                }
                Note::Missing { index, cust, metric } => notes.append((
                    index,
                    self.customers[cust].key.bind(py),
                    "missing_property",
                    self.metrics[metric as usize].code.bind(py),
                    0,
                    0,
                ))?,
            }
        }
        Ok(notes)
    }

    fn new_customer(&mut self, py: Python<'_>) -> usize {
        let key = self.key_buf.clone();
        let rule = *self.subs.get(&key).unwrap_or(&self.default_rule);
        self.hold_customer(key, Customer::new(py, &self.key_buf, rule))
    }

    /// Hold customer `c` as `key`, in the slot a dropped customer left if there is one (so a customer moving
    /// between the folds does not leave an empty slot behind each time), else a new one.
    pub(crate) fn hold_customer(&mut self, key: String, c: Customer) -> usize {
        let i = match self.free.pop() {
            Some(i) => {
                self.customers[i] = c;
                i
            }
            None => {
                self.customers.push(c);
                self.customers.len() - 1
            }
        };
        self.index.insert(key, i);
        i
    }

    /// operators/meter.py `CustomerMeter._fold` for one event, count/sum metrics.
    #[allow(clippy::too_many_arguments)]
    fn fold_one<K: AsRef<str>>(
        &mut self,
        index: usize,
        ci: usize,
        fp: u64,
        event_type: &str,
        ts: i64,
        me_wm: i64,
        excluded: bool,
        correction: bool,
        props: &[(K, Val)],
    ) -> PyResult<()> {
        let (window_ms, grace_ms, dedupe_ms, round) = (self.window_ms, self.grace_ms, self.dedupe_ms, self.round);
        let cust = &mut self.customers[ci];
        if cust.touched != self.wm_round {
            cust.touched = self.wm_round;
            self.touched_c.push(ci);
        }
        if !cust.seen_due {
            cust.seen_due = true;
            self.seen_due.push(ci);
        }
        if !(cust.pstart <= ts && ts < cust.pend) {
            let (s, e) = cust.rule.bounds(ts).ok_or_else(|| {
                PyValueError::new_err(format!("timestamp {ts} is outside the range of billing periods"))
            })?;
            cust.pstart = s;
            cust.pend = e;
        }
        let (pstart, pend) = (cust.pstart, cust.pend);
        if me_wm > cust.wm {
            cust.wm = me_wm;
        }
        let wm = cust.wm;
        let expiry = (pend + grace_ms).max(wm + dedupe_ms);
        if cust.seen.check_add(fp, expiry as u64, wm) {
            self.c.duplicates += 1;
            return Ok(());
        }
        if (expiry as u64) < cust.seen_next {
            cust.seen_next = expiry as u64;
        }
        self.c.accepted += 1;
        let metrics = match self.by_type.get(event_type) {
            None => {
                self.c.unmetered += 1;
                return Ok(());
            }
            Some(m) => m,
        };
        if pend + grace_ms < wm {
            self.c.too_late += 1;
            self.c.accepted -= 1;
            self.notes.push(Note::TooLate { index, cust: ci, pstart, pend, wm });
            return Ok(());
        }
        if excluded {
            self.c.accepted -= 1;
            self.c.excluded += 1;
            for &mi in metrics {
                let m = &self.metrics[mi as usize];
                if !m.wanted.is_empty() && !matches(props, &m.wanted) {
                    continue;
                }
                let pk = (mi, pstart, pend);
                let x = cust.excluded.entry(pk).or_insert((0, 0));
                x.0 += 1;
                if x.1 != round {
                    x.1 = round;
                    self.changed_x.push((ci, pk));
                }
            }
            return Ok(());
        }
        let sign: i64 = if correction { -1 } else { 1 };
        let wstart = ts - ts.rem_euclid(window_ms);
        for &mi in metrics {
            let m = &self.metrics[mi as usize];
            if !m.wanted.is_empty() && !matches(props, &m.wanted) {
                continue;
            }
            let mut v: Option<&Val> = None;
            let agg = m.agg;
            if let Some(prop) = &m.prop {
                let ok = match lookup(props, prop) {
                    Some(Val::Null) | None => false,
                    Some(x) if agg == Agg::Unique => {
                        v = Some(x);
                        true
                    }
                    Some(x @ Val::Int(_)) => {
                        v = Some(x);
                        true
                    }
                    Some(x @ Val::Big(_, in_range)) => {
                        v = Some(x);
                        *in_range
                    }
                    Some(x @ Val::Float(f)) => {
                        v = Some(x);
                        -MAX_NUMBER < *f && *f < MAX_NUMBER
                    }
                    _ => false,
                };
                if !ok {
                    self.c.missing_property += 1;
                    self.notes.push(Note::Missing { index, cust: ci, metric: mi });
                    continue;
                }
            }
            if sign < 0 && !agg.additive() {
                self.c.corrections_ignored += 1; // (not additive: a correction leaves the rows unchanged)
                continue;
            }
            let wk = (mi, wstart, self.dims.intern(&m.group_by, props));
            let pk = (mi, pstart, pend);
            let is_sum = m.is_sum;
            let pacc: *mut Acc;
            for acc in [
                {
                    let a = cust.windows.entry(wk).or_insert_with(Acc::new);
                    if a.reported != round {
                        a.reported = round;
                        self.changed_w.push((ci, wk));
                    }
                    a as *mut Acc
                },
                {
                    let a = cust.periods.entry(pk).or_insert_with(Acc::new);
                    if a.reported != round {
                        a.reported = round;
                        self.changed_p.push((ci, pk));
                    }
                    pacc = a as *mut Acc;
                    pacc
                },
            ] {
                // SAFETY: the two pointers are into two different maps, each used once here.
                let acc = unsafe { &mut *acc };
                if !agg.additive() {
                    acc.fold_other(agg, v.expect("a property value"), ts);
                    continue;
                }
                acc.events += 1;
                if !is_sum {
                    acc.total += sign as i128;
                    continue;
                }
                match v {
                    Some(Val::Int(i)) => match acc.total.checked_add(sign as i128 * *i as i128) {
                        Some(t) => acc.total = t,
                        None => acc.fixed().add_int_bytes(&int_bytes(*i as i128), sign),
                    },
                    Some(Val::Float(f)) => acc.fixed().add_f64(*f, sign),
                    Some(Val::Big(b, _)) => acc.fixed().add_int_bytes(b, sign),
                    _ => unreachable!(),
                }
            }
            if let Some(lv) = cust.levels.as_deref_mut() {
                if lv.evals[mi as usize] {
                    // SAFETY: pacc points into cust.periods, unchanged since.
                    let a = unsafe { &*pacc };
                    let mut level = lv.at.get(&pk).copied();
                    if level.is_none() {
                        if let Some(l) = lv.fresh[mi as usize].take() {
                            lv.at.insert(pk, (l, false));
                            self.fresh_done.push((ci, pk));
                            level = Some((l, false));
                        }
                    }
                    let stop = match level {
                        None => true,
                        Some((l, fall)) => {
                            let (x, tol) = a.approx();
                            x + tol >= l
                                || fall
                                    && (sign < 0
                                        || !agg.additive()
                                        || match v {
                                            Some(Val::Int(i)) => *i < 0,
                                            Some(Val::Float(f)) => *f < 0.0,
                                            Some(Val::Big(b, _)) => b.last().is_some_and(|byte| *byte & 0x80 != 0),
                                            _ => false,
                                        })
                        }
                    };
                    if stop {
                        self.stops.push(Stop::Level(pk));
                    }
                }
            }
            if let Some(an) = cust.anom.as_mut() {
                // anomaly: the cell of the event's UTC day, after the metric's rows (CustomerMeter._fold)
                match an.step(mi, ts, sign, v) {
                    anomaly::Step::Stop => self.stops.push(Stop::Anom(mi)),
                    anomaly::Step::Added { first: true } => self.anom_changed.push((ci, mi)),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// CustomerMeter's dedupe eviction at the end of its `process`, for each customer folded since the last call:
    /// once its watermark is an hour past `seen_next` (`_DEDUPE_EVICT_SLACK_MS`), the ids whose expiry < its
    /// watermark go. Called where a batch of the customer's events ends (`run`, `fold_many`, `fold_events`,
    /// `fold_bundle`), which is where the Python meter evicts, so `export_seen` holds the ids IdTable would.
    /// It never changes a decision: an id is a duplicate only while its expiry >= the watermark, and a
    /// customer's watermark never decreases (fold_one, raise_wm only raise it), so an id with expiry < wm is,
    /// from then on, treated exactly as one that is absent (both are stored anew at their next event);
    /// evicting them earlier or later only changes memory (tests/operators/test_native_dedupe.py checks it).
    fn evict_seen(&mut self) {
        for ci in self.seen_due.drain(..) {
            let c = &mut self.customers[ci];
            c.seen_due = false;
            if c.wm as i128 > c.seen_next as i128 + SEEN_EVICT_SLACK_MS {
                c.seen_next = c.seen.evict(c.wm);
            }
        }
    }

    /// Mediation of one line (operators/mediate.py `Mediator.__call__`); None: the Python path decides.
    fn mediate<'l>(&self, raw: &'l [u8], horizon: i64) -> Option<(Event<'l>, i64, bool)> {
        mediate::mediate_line(&self.tenants, self.max_bytes, raw, horizon, Vec::new())
    }
}

#[pymethods]
impl BatchCore {
    #[new]
    fn new(py: Python<'_>, spec: &Bound<'_, PyDict>) -> PyResult<Self> {
        let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
            spec.get_item(k)?.ok_or_else(|| PyValueError::new_err(format!("spec: missing {k}")))
        };
        let mut tenants = FxMap::default();
        for t in get("tenants")?.try_iter()? {
            let t = t?;
            let id: String = t.get_item(0)?.extract()?;
            let excluded: Vec<String> = t.get_item(1)?.extract()?;
            tenants.insert(id, Tenant { excluded: excluded.into_iter().collect(), when: pairs(&t.get_item(2)?)? });
        }
        let mut metrics = Vec::new();
        let mut code_index = FxMap::default();
        let mut by_type: FxMap<String, Vec<u32>> = FxMap::default();
        for m in get("metrics")?.try_iter()? {
            let m = m?;
            let code: String = m.get_item(0)?.extract()?;
            let etype: String = m.get_item(1)?.extract()?;
            let agg_name: String = m.get_item(2)?.extract()?;
            let prop: Option<String> = m.get_item(3)?.extract()?;
            let agg = Agg::parse(&agg_name)
                .ok_or_else(|| PyValueError::new_err(format!("metric {code}: aggregation {agg_name} is not native")))?;
            code_index.insert(code.clone(), metrics.len() as u32);
            by_type.entry(etype).or_default().push(metrics.len() as u32);
            metrics.push(Metric {
                code: PyString::new(py, &code).unbind(),
                prop: if agg != Agg::Count { prop } else { None },
                is_sum: agg == Agg::Sum,
                agg,
                wanted: pairs(&m.get_item(4)?)?,
                group_by: if m.len()? > 5 { m.get_item(5)?.extract()? } else { Vec::new() },
            });
        }
        let subs = spec::subs_of(&get("subscriptions")?)?;
        Ok(BatchCore {
            max_bytes: get("max_event_bytes")?.extract()?,
            max_skew_ms: get("max_clock_skew_ms")?.extract()?,
            window_ms: get("window_ms")?.extract()?,
            grace_ms: get("grace_ms")?.extract()?,
            dedupe_ms: get("dedupe_ms")?.extract()?,
            tenants,
            by_type,
            metrics,
            subs,
            default_rule: PeriodRule::new("month", 0).unwrap(),
            customers: Vec::new(),
            index: FxMap::default(),
            watermark: 0,
            round: 1,
            changed_w: Vec::new(),
            changed_p: Vec::new(),
            changed_x: Vec::new(),
            notes: Vec::new(),
            stops: Vec::new(),
            fresh_done: Vec::new(),
            anom_changed: Vec::new(),
            code_index,
            c: Counters::default(),
            key_buf: String::new(),
            wm_round: 1,
            touched_c: Vec::new(),
            last: [0; 6],
            dims: dims::DimTable::new(),
            seen_due: Vec::new(),
            free: Vec::new(),
        })
    }

    /// Go through `lines[start:]`; return the index of the first line that needs the Python path (or
    /// `len(lines)`). `now_ms` is the wall clock of the batch (the clock-skew rule).
    fn run(&mut self, py: Python<'_>, lines: &Bound<'_, PyList>, start: usize, now_ms: i64) -> PyResult<usize> {
        let horizon = (now_ms + self.max_skew_ms).min(LAST_EVENT_MS);
        let n = lines.len();
        let mut i = start;
        while i < n {
            let item = lines.get_item(i)?;
            let Ok(b) = item.cast::<PyBytes>() else { return Ok(i) };
            let raw = b.as_bytes();
            let Some((ev, ts, excluded)) = self.mediate(raw, horizon) else { return Ok(i) };
            if ts > self.watermark {
                self.watermark = ts;
            }
            let wm = self.watermark;
            let ci = self.customer(py, &ev.tenant_id, &ev.customer_id);
            self.c.read += 1;
            self.fold_one(
                i,
                ci,
                fingerprint(&ev.event_id),
                &ev.event_type,
                ts,
                wm,
                excluded,
                ev.correction,
                &ev.props,
            )?;
            i += 1;
        }
        self.evict_seen(); // the batch's end
        Ok(i)
    }

    /// Fold one event the Python Mediator accepted (its `MeteredEvent` fields; `fp` from
    /// operators.dedupe.fingerprint; `props` as (key, value) pairs, ints beyond i64 as ('big', bytes, ok)).
    #[allow(clippy::too_many_arguments)]
    fn fold(
        &mut self,
        py: Python<'_>,
        index: usize,
        tenant_id: &str,
        customer_id: &str,
        fp: u64,
        event_type: &str,
        ts: i64,
        wm: i64,
        excluded: bool,
        correction: bool,
        props: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let props = pairs(props)?;
        let ci = self.customer(py, tenant_id, customer_id);
        if wm > self.watermark {
            self.watermark = wm;
        }
        self.c.read += 1;
        self.c.python_path += 1;
        self.fold_one(index, ci, fp, event_type, ts, wm, excluded, correction, &props)
    }

    /// Customer `key` evaluates the metrics `codes` per event: from now on an event folding one of them into
    /// a period stops the fold (`fold_many` why 3, `take_stops`) unless the period has a level (`set_level`)
    /// that its value after the event stays below.
    fn evaluate(&mut self, py: Python<'_>, key: &str, codes: Vec<String>) -> PyResult<()> {
        let ci = match self.index.get(key) {
            Some(&i) => i,
            None => {
                self.key_buf.clear();
                self.key_buf.push_str(key);
                self.new_customer(py)
            }
        };
        let mut evals = vec![false; self.metrics.len()];
        for c in &codes {
            let mi = *self.code_index.get(c).ok_or_else(|| PyValueError::new_err(format!("metric {c}")))?;
            evals[mi as usize] = true;
        }
        let fresh = vec![None; evals.len()];
        self.customers[ci].levels = Some(Box::new(Levels { evals, at: FxMap::default(), fresh }));
        Ok(())
    }

    /// The next level of customer `key`'s metric `code` in period `pstart..pend` (None: none known, the next
    /// event folded into it stops); with `fall`, an event that may lower the value stops too (`Levels`).
    #[pyo3(signature = (key, code, pstart, pend, level, fall = false))]
    fn set_level(
        &mut self,
        key: &str,
        code: &str,
        pstart: i64,
        pend: i64,
        level: Option<f64>,
        fall: bool,
    ) -> PyResult<()> {
        let mi = *self.code_index.get(code).ok_or_else(|| PyValueError::new_err(format!("metric {code}")))?;
        if let Some(&ci) = self.index.get(key) {
            if let Some(lv) = self.customers[ci].levels.as_mut() {
                match level {
                    Some(l) => lv.at.insert((mi, pstart, pend), (l, fall)),
                    None => lv.at.remove(&(mi, pstart, pend)),
                };
            }
        }
        Ok(())
    }

    /// Where the last folded event stopped (then nowhere), in the order of its metrics: (metric, start, end) of
    /// a period that reached its level; (metric, None, value) of an anomaly cell (anomaly.rs: the event is not
    /// added to it; value: the cell's usage before the event, None when Python holds it).
    fn take_stops<'py>(&mut self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let ci = self.index.get(key).copied();
        for stop in self.stops.drain(..) {
            match stop {
                Stop::Level((mi, s, e)) => out.append((self.metrics[mi as usize].code.bind(py), s, e))?,
                Stop::Anom(mi) => {
                    let cells = ci.and_then(|ci| self.customers[ci].anom.as_deref());
                    let val = match cells.and_then(|a| a.mirrored(mi)) {
                        Some((_, v)) => v.to_py(py)?,
                        None => None,
                    };
                    out.append((self.metrics[mi as usize].code.bind(py), py.None(), val))?
                }
            }
        }
        Ok(out)
    }

    /// The level of the first period of customer `key`'s evaluated metric `code`, for a customer with no
    /// entitlement state yet (`Levels.fresh`; call `evaluate` first): its first event of `code` does not stop.
    fn set_fresh(&mut self, key: &str, code: &str, level: f64) -> PyResult<()> {
        let mi = *self.code_index.get(code).ok_or_else(|| PyValueError::new_err(format!("metric {code}")))?;
        if let Some(&ci) = self.index.get(key) {
            if let Some(lv) = self.customers[ci].levels.as_mut() {
                lv.fresh[mi as usize] = Some(level);
            }
        }
        Ok(())
    }

    /// The periods that took a fresh level since the last call, as `(key, code, start, end)` in the order of their
    /// events: Python makes each its metric's current period (before it looks at a stop, and after each fold call).
    fn take_fresh<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for (ci, (mi, s, e)) in self.fresh_done.drain(..) {
            out.append((self.customers[ci].key.bind(py), self.metrics[mi as usize].code.bind(py), s, e))?;
        }
        Ok(out)
    }

    /// Customer `key` has anomaly detection on the metrics `codes`: from now on their events add to the
    /// current day cell of their metric (anomaly.rs; none yet: the next event of each stops).
    fn anomaly(&mut self, key: &str, codes: Vec<String>) -> PyResult<()> {
        let mut mis = Vec::new();
        for c in &codes {
            mis.push(*self.code_index.get(c).ok_or_else(|| PyValueError::new_err(format!("metric {c}")))?);
        }
        let n = self.metrics.len();
        let &ci = self.index.get(key).ok_or_else(|| PyValueError::new_err(format!("customer {key} not held")))?;
        self.customers[ci].anom = Some(Box::new(anomaly::Cells::new(n, &mis)));
        Ok(())
    }

    /// The current cell of customer `key`'s anomaly metric `code` as Python left it (`Anomalies.cur`, or a
    /// throwaway cell of a day not kept: `mirror` False): its day, usage (None: beyond what the native cell
    /// holds, every event stops) and level.
    fn set_cell(
        &mut self,
        key: &str,
        code: &str,
        day: i64,
        val: &Bound<'_, PyAny>,
        level: f64,
        mirror: bool,
    ) -> PyResult<()> {
        let mi = *self.code_index.get(code).ok_or_else(|| PyValueError::new_err(format!("metric {code}")))?;
        let val = anomaly::Num::from_py(val)?;
        if let Some(&ci) = self.index.get(key) {
            if let Some(c) = self.customers[ci].anom.as_mut().and_then(|a| a.cell_mut(mi)) {
                c.day = day;
                c.val = val;
                c.level = level;
                c.mirror = mirror;
            }
        }
        Ok(())
    }

    /// `(key, metric, day, usage)` of every anomaly cell added to since the last call (to mirror into
    /// `Anomalies.cur`; throwaway cells and those Python holds left out).
    fn take_cells<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for (ci, mi) in self.anom_changed.drain(..) {
            let c = &mut self.customers[ci];
            let Some(an) = c.anom.as_mut() else { continue }; // (dropped since)
            if let Some(cell) = an.cell_mut(mi) {
                cell.dirty = false;
            }
            if let Some((day, v)) = an.mirrored(mi) {
                out.append((c.key.bind(py), self.metrics[mi as usize].code.bind(py), day, v.to_py(py)?))?;
            }
        }
        Ok(out)
    }

    /// `(metric, day, usage)` of customer `key`'s anomaly cells to mirror into `Anomalies.cur` (as `take_cells`).
    fn cells<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        if let Some(an) = self.index.get(key).and_then(|&ci| self.customers[ci].anom.as_deref()) {
            for mi in 0..self.metrics.len() as u32 {
                if let Some((day, v)) = an.mirrored(mi) {
                    out.append((self.metrics[mi as usize].code.bind(py), day, v.to_py(py)?))?;
                }
            }
        }
        Ok(out)
    }

    /// Customer `key`'s period row: (events, total, fscaled, changed since the last `take_changes`), or None.
    /// A row of an aggregation that is not additive has its value in place of fscaled (`Acc::peek`).
    #[allow(clippy::type_complexity)]
    fn period_value<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        code: &str,
        pstart: i64,
        pend: i64,
    ) -> PyResult<Option<(u64, i128, Option<Bound<'py, PyAny>>, bool)>> {
        let (Some(&mi), Some(&ci)) = (self.code_index.get(code), self.index.get(key)) else { return Ok(None) };
        let Some(a) = self.customers[ci].periods.get(&(mi, pstart, pend)) else { return Ok(None) };
        let x = if a.ext.is_some() {
            Some(a.peek(py)?)
        } else {
            a.fixed.as_ref().map(|f| PyBytes::new(py, &f.to_le_bytes()).into_any())
        };
        Ok(Some((a.events, a.total, x, a.reported == self.round)))
    }

    /// Corrections of metrics that are not additive since the last call (they leave the rows unchanged).
    fn take_ignored(&mut self) -> u64 {
        std::mem::take(&mut self.c.corrections_ignored)
    }

    /// Fold one customer's events that the Python Mediator accepted (its `MeteredEvent`s: `raw`, `ts`, `wm`,
    /// `excluded` read from each; the rest decoded here from `raw`), from `events[start]` on, in order.
    /// Returns `(i, why)`: `why` 0 when all are folded (`i == len(events)`); 1 when `events[i]`'s line is one
    /// it does not decode exactly (the caller folds it with `fold`); 2 when `events[i]`'s time has no billing
    /// period (nothing of it was folded: the caller dead-letters it). Then the caller resumes at `i + 1`.
    fn fold_events(
        &mut self,
        py: Python<'_>,
        key: &str,
        events: &Bound<'_, PyList>,
        start: usize,
    ) -> PyResult<(usize, u8)> {
        self.key_buf.clear();
        self.key_buf.push_str(key);
        let ci = match self.index.get(key) {
            Some(&i) => i,
            None => self.new_customer(py),
        };
        let (a_raw, a_ts, a_wm, a_ex) =
            (pyo3::intern!(py, "raw"), pyo3::intern!(py, "ts"), pyo3::intern!(py, "wm"), pyo3::intern!(py, "excluded"));
        let n = events.len();
        let mut i = start;
        while i < n {
            let me = events.get_item(i)?;
            let raw_obj = me.getattr(a_raw)?;
            let Ok(b) = raw_obj.cast::<PyBytes>() else { return Ok((i, 1)) };
            let raw = b.as_bytes();
            let Some(ev) = json::parse_event(raw) else { return Ok((i, 1)) };
            let ts: i64 = me.getattr(a_ts)?.extract()?;
            let wm: i64 = me.getattr(a_wm)?.extract()?;
            let excluded: bool = me.getattr(a_ex)?.extract()?;
            if wm > self.watermark {
                self.watermark = wm;
            }
            if self
                .fold_one(i, ci, fingerprint(&ev.event_id), &ev.event_type, ts, wm, excluded, ev.correction, &ev.props)
                .is_err()
            {
                return Ok((i, 2));
            }
            self.c.read += 1;
            i += 1;
        }
        self.evict_seen();
        Ok((i, 0))
    }

    /// `fold_events` over `pairs[p_start:]` of `(key, events)`, the first from `events[i_start]` on. Returns
    /// `(p, i, why)`: `p == len(pairs)` when all are folded; else `pairs[p]`'s `events[i]` needs the caller
    /// (`why` as in `fold_events`), which resumes at `(p, i + 1)`. Note indexes are `p << 32 | i`.
    fn fold_many(
        &mut self,
        py: Python<'_>,
        pairs: &Bound<'_, PyList>,
        p_start: usize,
        i_start: usize,
    ) -> PyResult<(usize, usize, u8)> {
        let (a_raw, a_ts, a_wm, a_ex) =
            (pyo3::intern!(py, "raw"), pyo3::intern!(py, "ts"), pyo3::intern!(py, "wm"), pyo3::intern!(py, "excluded"));
        let np = pairs.len();
        let mut p = p_start;
        let mut i = i_start;
        while p < np {
            let pair = pairs.get_item(p)?;
            let key_obj = pair.get_item(0)?;
            let key = key_obj.cast::<PyString>()?.to_str()?;
            let events_obj = pair.get_item(1)?;
            let events = events_obj.cast::<PyList>()?;
            let ci = match self.index.get(key) {
                Some(&c) => c,
                None => {
                    self.key_buf.clear();
                    self.key_buf.push_str(key);
                    self.new_customer(py)
                }
            };
            let n = events.len();
            while i < n {
                let me = events.get_item(i)?;
                let raw_obj = me.getattr(a_raw)?;
                let Ok(b) = raw_obj.cast::<PyBytes>() else { return Ok((p, i, 1)) };
                let raw = b.as_bytes();
                let ts: i64 = me.getattr(a_ts)?.extract()?;
                let wm: i64 = me.getattr(a_wm)?.extract()?;
                let excluded: bool = me.getattr(a_ex)?.extract()?;
                if let Some(why) = self.fold_line(p << 32 | i, ci, raw, ts, wm, excluded) {
                    return Ok((p, i, why));
                }
                i += 1;
            }
            p += 1;
            i = 0;
        }
        self.evict_seen();
        Ok((p, 0, 0))
    }

    /// `fold_many` over a native mediator's `Bundle` (native/src/mediate.rs): the customers held here (the
    /// others are skipped: see `unknown`), from customer `k` event `i` on; `(k, i, why)` as `fold_many`, why 1
    /// also for an event the Python Mediator made. Note indexes are `k << 32 | i`.
    fn fold_bundle(&mut self, bundle: PyRef<'_, mediate::Bundle>, k: usize, i: usize) -> PyResult<(usize, usize, u8)> {
        mediate::fold_bundle(self, &bundle, k, i)
    }

    /// Hold customer `key` here (a customer admitted to the native fold that evaluates nothing).
    fn hold(&mut self, py: Python<'_>, key: &str) {
        if !self.index.contains_key(key) {
            self.key_buf.clear();
            self.key_buf.push_str(key);
            self.new_customer(py);
        }
    }

    /// The indexes of the bundle's customers not held here.
    fn unknown(&self, bundle: PyRef<'_, mediate::Bundle>) -> Vec<usize> {
        mediate::unknown(self, &bundle)
    }

    /// (events of the bundle's customers held here, those of them evaluating nothing, the evaluated keys).
    fn bundle_counts<'py>(
        &self,
        py: Python<'py>,
        bundle: PyRef<'_, mediate::Bundle>,
    ) -> PyResult<(usize, usize, Bound<'py, PyList>)> {
        mediate::bundle_counts(self, py, &bundle)
    }

    /// The end of a bundle's fold in one call (NativeMeters.fold_bundle): `bundle_counts` (the evaluated keys
    /// only when `keys` is true, else None), then `take_end`: `(n, unevaluated, evaluated, notes, duplicates,
    /// excluded, unmetered, too_late, missing_property, corrections ignored)`.
    #[allow(clippy::type_complexity)]
    fn bundle_end<'py>(
        &mut self,
        py: Python<'py>,
        bundle: PyRef<'_, mediate::Bundle>,
        keys: bool,
    ) -> PyResult<(usize, usize, Option<Bound<'py, PyList>>, Bound<'py, PyList>, u64, u64, u64, u64, u64, u64)> {
        let (mut n, mut unevaluated) = (0usize, 0usize);
        let evaluated = if keys { Some(PyList::empty(py)) } else { None };
        for (k, key) in bundle.keys.iter().enumerate() {
            if let Some(&ci) = self.index.get(key.as_str()) {
                let c = (bundle.starts[k + 1] - bundle.starts[k]) as usize;
                n += c;
                let cust = &self.customers[ci];
                if cust.levels.is_some() {
                    if let Some(ev) = &evaluated {
                        ev.append(cust.key.bind(py))?;
                    }
                } else {
                    unevaluated += c;
                }
            }
        }
        let (notes, dup, excl, unmetered, too_late, missing, ignored) = self.take_end(py)?;
        Ok((n, unevaluated, evaluated, notes, dup, excl, unmetered, too_late, missing, ignored))
    }

    /// `take_notes`, `take_counts` (without `read`) and `take_ignored` in one call: `(notes, duplicates,
    /// excluded, unmetered, too_late, missing_property, corrections ignored)`.
    #[allow(clippy::type_complexity)]
    fn take_end<'py>(&mut self, py: Python<'py>) -> PyResult<(Bound<'py, PyList>, u64, u64, u64, u64, u64, u64)> {
        let notes = self.drain_notes(py)?;
        let (dup, excl, unmetered, too_late, missing, _read) = self.take_counts();
        Ok((notes, dup, excl, unmetered, too_late, missing, self.take_ignored()))
    }

    /// The meter dead letters to word since the last call (as in `take_changes`), rows left for later.
    fn take_notes<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.drain_notes(py)
    }

    /// Counts since the last call: (duplicates, excluded, unmetered, too_late, missing_property, read).
    fn take_counts(&mut self) -> (u64, u64, u64, u64, u64, u64) {
        let c = &self.c;
        let now = [c.duplicates, c.excluded, c.unmetered, c.too_late, c.missing_property, c.read];
        let l = self.last;
        self.last = now;
        (now[0] - l[0], now[1] - l[1], now[2] - l[2], now[3] - l[3], now[4] - l[4], now[5] - l[5])
    }

    /// `(key, watermark)` of every customer an event was folded for since the last call.
    fn take_wms<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for ci in self.touched_c.drain(..) {
            let c = &self.customers[ci];
            out.append((c.key.bind(py), c.wm))?;
        }
        self.wm_round += 1;
        Ok(out)
    }

    /// The watermark of customer `key` (None: not held here).
    fn customer_wm(&self, key: &str) -> Option<i64> {
        self.index.get(key).map(|&i| self.customers[i].wm)
    }

    /// Raise customer `key`'s watermark to `wm` (the flow's watermark finalized its rows).
    fn raise_wm(&mut self, key: &str, wm: i64) {
        if let Some(&i) = self.index.get(key) {
            let c = &mut self.customers[i];
            if wm > c.wm {
                c.wm = wm;
            }
        }
    }

    /// Customer `key`'s rows that its Python meter evicted after a flush (CustomerMeter._evict at watermark
    /// `wm`): period and excluded rows whose period ended `grace_ms` before `wm` (the same test), and the windows
    /// whose (metric, window start) is not in `kept` (the meter's windows after its eviction; a window's expiry is
    /// its period's, so every dims row of one (metric, start) goes together). Without it the native rows of every
    /// closed period stayed in memory for the life of the flow. Call `take_changes` (sync) first, so the meter
    /// holds every native row.
    fn evict_rows(&mut self, key: &str, wm: i64, kept: Vec<(String, i64)>) -> PyResult<(usize, usize, usize)> {
        let Some(&i) = self.index.get(key) else { return Ok((0, 0, 0)) };
        let mut keep: std::collections::HashSet<(u32, i64)> = std::collections::HashSet::with_capacity(kept.len());
        for (code, ws) in kept {
            let mi = *self.code_index.get(&code).ok_or_else(|| PyValueError::new_err(format!("metric {code}")))?;
            keep.insert((mi, ws));
        }
        let grace = self.grace_ms;
        let c = &mut self.customers[i];
        let (w0, p0, x0) = (c.windows.len(), c.periods.len(), c.excluded.len());
        c.windows.retain(|wk, _| keep.contains(&(wk.0, wk.1)));
        c.periods.retain(|pk, _| pk.2.saturating_add(grace) >= wm);
        c.excluded.retain(|pk, _| pk.2.saturating_add(grace) >= wm);
        if let Some(lv) = c.levels.as_mut() {
            lv.at.retain(|pk, _| pk.2.saturating_add(grace) >= wm);
        }
        Ok((w0 - c.windows.len(), p0 - c.periods.len(), x0 - c.excluded.len()))
    }

    /// Customer `key`'s native rows: (windows, periods, excluded); zeros for a customer not held.
    fn rows(&self, key: &str) -> (usize, usize, usize) {
        match self.index.get(key) {
            Some(&i) => {
                let c = &self.customers[i];
                (c.windows.len(), c.periods.len(), c.excluded.len())
            }
            None => (0, 0, 0),
        }
    }

    /// Customer `key`'s tracked ids as operators/dedupe.py `IdTable` state: (fingerprints, expiries), each a
    /// little-endian uint64 array (ids whose expiry passed are kept until evicted, as IdTable keeps them; the
    /// same ids as IdTable's, evicted at the same points: `evict_seen`).
    fn export_seen<'py>(&self, py: Python<'py>, key: &str) -> (Bound<'py, PyBytes>, Bound<'py, PyBytes>) {
        let (fps, exps) = match self.index.get(key) {
            Some(&i) => dedupe::to_state(&self.customers[i].seen),
            None => (Vec::new(), Vec::new()),
        };
        (PyBytes::new(py, &fps), PyBytes::new(py, &exps))
    }

    /// Hold customer `key` with the state of its Python meter (a resumed customer, or one back from the Python
    /// fold after a changelog record): the inverse of `take_changes` and `export_seen` (native/src/resume.rs).
    /// windows: (metric, start, dims tuple, events, total, fixed, ext); periods: (metric, start, end, events, total,
    /// fixed, ext); excluded: (metric, start, end, count); fps/exps as `export_seen` gives them. ValueError
    /// (nothing held) when something does not fit.
    #[allow(clippy::too_many_arguments)]
    fn load_customer(
        &mut self,
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
        resume::load_customer(self, py, key, period, anchor, wm, fps, exps, windows, periods, excluded)
    }

    /// Forget customer `key` (its state moved to the Python path). Call `take_changes` first.
    fn drop_customer(&mut self, py: Python<'_>, key: &str) {
        if let Some(i) = self.index.remove(key) {
            // (nothing may still name the slot when it is reused: the pending changes and notes of the customer
            // were taken first, and what an event of the batch left behind is dropped here)
            self.touched_c.retain(|&c| c != i);
            self.seen_due.retain(|&c| c != i);
            self.changed_w.retain(|&(c, _)| c != i);
            self.changed_p.retain(|&(c, _)| c != i);
            self.changed_x.retain(|&(c, _)| c != i);
            self.fresh_done.retain(|&(c, _)| c != i);
            self.notes.retain(|n| !matches!(n, Note::TooLate { cust, .. } | Note::Missing { cust, .. } if *cust == i));
            self.customers[i] = Customer::new(py, "", self.default_rule);
            self.free.push(i);
        }
    }

    /// The rows changed since the last call, with their current values, and the meter dead letters to word:
    /// (windows, periods, excluded, notes). windows: (key, metric, window_start, events, total, fscaled, dims);
    /// periods: (key, metric, period_start, period_end, events, total, fscaled); fscaled is None or the
    /// little-endian two's-complement bytes of the float part; dims: the tuple of the window's group_by values
    /// (operators/meter.py `_dim`; () without group_by); excluded: (key, metric, start, end, count);
    /// notes: (line index, key, "too_late", period_start, period_end, watermark) or
    /// (line index, key, "missing_property", metric, 0, 0).
    #[allow(clippy::type_complexity)]
    fn take_changes<'py>(
        &mut self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>, Bound<'py, PyList>, Bound<'py, PyList>)> {
        // fscaled: the float part of a sum; of the other aggregations what `Acc::report` says
        let fs = |a: &mut Acc| -> PyResult<Option<Bound<'py, PyAny>>> {
            if a.ext.is_some() {
                return Ok(Some(a.report(py)?));
            }
            Ok(a.fixed.as_ref().map(|f| PyBytes::new(py, &f.to_le_bytes()).into_any()))
        };
        let w = PyList::empty(py);
        for (ci, wk) in self.changed_w.drain(..) {
            let c = &mut self.customers[ci];
            let a = c.windows.get_mut(&wk).expect("a changed window");
            let code = self.metrics[wk.0 as usize].code.bind(py);
            w.append((c.key.bind(py), code, wk.1, a.events, a.total, fs(a)?, self.dims.tuple(py, wk.2)?))?;
        }
        let p = PyList::empty(py);
        for (ci, pk) in self.changed_p.drain(..) {
            let c = &mut self.customers[ci];
            let a = c.periods.get_mut(&pk).expect("a changed period");
            let code = self.metrics[pk.0 as usize].code.bind(py);
            p.append((c.key.bind(py), code, pk.1, pk.2, a.events, a.total, fs(a)?))?;
        }
        let x = PyList::empty(py);
        for (ci, pk) in self.changed_x.drain(..) {
            let c = &self.customers[ci];
            let n = c.excluded[&pk].0;
            x.append((c.key.bind(py), self.metrics[pk.0 as usize].code.bind(py), pk.1, pk.2, n))?;
        }
        let notes = self.drain_notes(py)?;
        self.round += 1;
        Ok((w, p, x, notes))
    }

    /// Events read, accepted (unmetered included), duplicates, excluded, unmetered, too_late,
    /// missing_property (per metric), and how many accepted events came through the Python path.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let c = &self.c;
        for (k, v) in [
            ("read", c.read),
            ("accepted", c.accepted),
            ("duplicates", c.duplicates),
            ("excluded", c.excluded),
            ("unmetered", c.unmetered),
            ("too_late", c.too_late),
            ("missing_property", c.missing_property),
            ("python_path", c.python_path),
            ("corrections_ignored", c.corrections_ignored),
        ] {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Tracked event ids over all customers.
    fn tracked_ids(&self) -> usize {
        self.customers.iter().map(|c| c.seen.len()).sum()
    }

    /// Bytes of every customer's dedupe table: its slots, expiry segments and side map on the heap, and the
    /// table's struct inside the customer's (what `tracked_ids` costs; benchmarks/native_core.py).
    fn dedupe_bytes(&self) -> usize {
        self.customers.iter().map(|c| c.seen.heap_bytes() + std::mem::size_of::<IdTable>()).sum()
    }

    fn customers(&self) -> usize {
        self.customers.len()
    }
}

#[pymodule]
fn meterflow_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<BatchCore>()?;
    m.add_class::<mediate::Mediator>()?;
    m.add_class::<mediate::Bundle>()?;
    m.add_class::<spec::Subscriptions>()?;
    m.add_function(wrap_pyfunction!(mediate::float_json, m)?)?;
    m.add_function(wrap_pyfunction!(mediate::float_repr, m)?)?;
    m.add_function(wrap_pyfunction!(mediate::crc32_of, m)?)?;
    m.add_function(wrap_pyfunction!(dims::dim_of, m)?)?;
    m.add_function(wrap_pyfunction!(rowbin::rowbinary, m)?)?;
    m.add_class::<dedupe::PyIdTable>()?;
    m.add_function(wrap_pyfunction!(dedupe::bench_dedupe, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
