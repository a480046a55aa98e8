//! Native mediation for the dataflow (`pipeline.core = "native"`): one `Mediator` per worker takes a batch
//! of `(src, raw)` items, validates each line exactly as operators/mediate.py `Mediator` (through the same
//! `mediate_line` as `BatchCore::run`), assigns its time, watermark and exclusion, and groups the events
//! into one `Bundle` per shard (`shard_of`: CRC-32 of the UTF-8 `tenant|customer` key modulo the shard
//! count). A line it does not take exactly stops `run`; the Python wrapper (operators/native.py
//! `NativeMediator`) sends that line through the Python Mediator and `push`es the event it makes, if any,
//! so every customer's events stay in arrival order.
//!
//! A `Bundle` keeps its events in Rust (the raw lines concatenated, times, watermarks, exclusions, the
//! source of each line), grouped per customer in order of the customers' first events; it pickles to one
//! bytes object (plus the few Python-made events) to cross workers. The shard's `BatchCore::fold_bundle`
//! folds it with no Python object per event.

mod archive;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt, PyList, PyString, PyTuple};
use pyo3::Borrowed;

use crate::json::{self, Event, Stamp, Val};
use crate::{matches, pairs, time, BatchCore, FxMap, Tenant, LAST_EVENT_MS};

/// Mediation of one line (operators/mediate.py `Mediator.__call__`); None: the Python path decides.
pub(crate) fn mediate_line<'l>(
    tenants: &FxMap<String, Tenant>,
    max_bytes: usize,
    raw: &'l [u8],
    horizon: i64,
    spare: json::Props<'l>,
) -> Option<(Event<'l>, i64, bool)> {
    if raw.is_empty() || raw.len() > max_bytes {
        return None;
    }
    // (nesting deeper than MAX_DEPTH: parse_event leaves those lines to Python)
    let ev = json::parse_event_with(raw, spare)?;
    let ts = match &ev.timestamp {
        Stamp::Millis(v) => *v,
        Stamp::Text(t) => time::parse_rfc3339(t)?,
    };
    if ts > horizon || ts < 0 {
        return None;
    }
    let tenant = tenants.get(&*ev.tenant_id)?;
    let excluded =
        tenant.excluded.contains(&*ev.customer_id) || (!tenant.when.is_empty() && matches(&ev.props, &tenant.when));
    Some((ev, ts, excluded))
}

// ---- CRC-32 (IEEE, as zlib.crc32) ---------------------------------------------------------------------
const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}
static CRC: [u32; 256] = crc_table();

pub(crate) fn crc32(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c = CRC[((c ^ x as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

// ---- JSON text of properties as msgspec encodes them (raw archive `properties`) ------------------------
/// `s` as a JSON string: '"', '\\', and the bytes below 0x20 escaped (\n \t \r \b \f, else \u00xx), every
/// other byte (non-ASCII UTF-8 included) as it is; runs of plain bytes copied at once.
fn push_str_json(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let b = s.as_bytes();
    let mut run = 0;
    for (i, &c) in b.iter().enumerate() {
        if c >= 0x20 && c != b'"' && c != b'\\' {
            continue;
        }
        out.extend_from_slice(&b[run..i]);
        run = i + 1;
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(c >> 4) as usize]);
                out.push(HEX[(c & 15) as usize]);
            }
        }
    }
    out.extend_from_slice(&b[run..]);
    out.push(b'"');
}

/// The decimal digits of `v` (as `i64::to_string`), without an allocation.
pub(crate) fn push_i64(out: &mut Vec<u8>, v: i64) {
    let mut buf = [0u8; 20];
    let mut n = v.unsigned_abs();
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[at..]);
}

/// A float as msgspec writes it: the shortest round-trip digits, fixed notation for decimal exponents
/// -5..=15 ("0.00001", "1000000000000000.0"), else "1e16", "1.5e-6".
pub(crate) fn push_f64_json(out: &mut String, f: f64) {
    crate::dims::push_shortest(out, f, -5, false);
}

/// The properties as msgspec encodes them (JSON, no spaces), appended to `out`.
fn put_props_json<K: AsRef<str>>(out: &mut Vec<u8>, props: &[(K, Val)]) {
    out.push(b'{');
    for (i, (k, v)) in props.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_str_json(out, k.as_ref());
        out.push(b':');
        match v {
            Val::Str(s) => push_str_json(out, s),
            Val::Int(i) => push_i64(out, *i),
            Val::Float(f) => {
                let mut t = String::with_capacity(24);
                push_f64_json(&mut t, *f);
                out.extend_from_slice(t.as_bytes());
            }
            Val::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Val::Null => out.extend_from_slice(b"null"),
            Val::Big(..) => unreachable!("the native scanner never makes big ints"),
        }
    }
    out.push(b'}');
}

fn props_json<K: AsRef<str>>(props: &[(K, Val)]) -> String {
    let mut out = Vec::with_capacity(64);
    put_props_json(&mut out, props);
    // (the keys and strings were str, every byte added is ASCII)
    String::from_utf8(out).expect("JSON of str values is UTF-8")
}

// ---- sources -------------------------------------------------------------------------------------------
/// A source location the bundle can store: `(name, a)` or `(name, a, b)`, ints exactly (not bools).
#[derive(Clone, Copy)]
struct Src {
    name: u32,
    kind: u8, // 2 or 3 items
    a: i64,
    b: i64,
}

fn exact_int(v: &Bound<'_, PyAny>) -> Option<i64> {
    if v.is_exact_instance_of::<PyInt>() {
        v.extract::<i64>().ok()
    } else {
        None
    }
}

fn src_tuple<'py>(py: Python<'py>, names: &[String], s: &Src) -> PyResult<Bound<'py, PyTuple>> {
    let name = PyString::new(py, &names[s.name as usize]);
    if s.kind == 2 {
        PyTuple::new(py, [name.into_any(), s.a.into_pyobject(py)?.into_any()])
    } else {
        PyTuple::new(py, [name.into_any(), s.a.into_pyobject(py)?.into_any(), s.b.into_pyobject(py)?.into_any()])
    }
}

fn src_text(names: &[String], s: &Src) -> String {
    let mut out = Vec::with_capacity(32);
    put_src_text(&mut out, names, s);
    String::from_utf8(out).expect("a source name is str")
}

/// `src_text` appended to `out` (operators/mediate.py `format_source`: `name:a`, `name/a/b`).
fn put_src_text(out: &mut Vec<u8>, names: &[String], s: &Src) {
    out.extend_from_slice(names[s.name as usize].as_bytes());
    if s.kind == 2 {
        out.push(b':');
        push_i64(out, s.a);
    } else {
        out.push(b'/');
        push_i64(out, s.a);
        out.push(b'/');
        push_i64(out, s.b);
    }
}

// ---- what the fold needs of a parsed line (parse once) ------------------------------------------------
/// A string in a bundle's (or the mediator's) `sbuf` arena: `sbuf[off..off + len]`.
#[derive(Clone, Copy, Default)]
struct SRef {
    off: u32,
    len: u32,
}

/// A property value as the scanner gives it (never a big int: json.rs).
#[derive(Clone, Copy)]
enum PVal {
    Str(SRef),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
}

/// One property of a parsed line: its key and value.
#[derive(Clone, Copy)]
struct PRec {
    key: SRef,
    val: PVal,
}

/// Parsed: what `BatchCore::fold_bundle` folds of a native line, kept from its mediation so the fold does not
/// parse it again: the event id's fingerprint, the correction flag, the event type and the properties
/// (decoded strings in the `sbuf` arena).
#[derive(Default)]
struct Parsed {
    fp: Vec<u64>,
    corr: Vec<bool>,
    etype: Vec<SRef>,
    pends: Vec<u32>, // event i's properties are recs[pends[i - 1]..pends[i]]
    recs: Vec<PRec>,
    sbuf: String,
}

impl Parsed {
    fn put_str(&mut self, t: &str) -> SRef {
        let r = SRef { off: self.sbuf.len() as u32, len: t.len() as u32 };
        self.sbuf.push_str(t);
        r
    }

    /// Stage event `ev` (its strings at the end of `sbuf`).
    fn push(&mut self, ev: &Event<'_>) {
        self.fp.push(crate::fingerprint(&ev.event_id));
        self.corr.push(ev.correction);
        let et = self.put_str(&ev.event_type);
        self.etype.push(et);
        for (k, v) in &ev.props {
            let key = self.put_str(k);
            let val = match v {
                Val::Str(t) => PVal::Str(self.put_str(t)),
                Val::Int(i) => PVal::Int(*i),
                Val::Float(f) => PVal::Float(*f),
                Val::Bool(b) => PVal::Bool(*b),
                Val::Null => PVal::Null,
                Val::Big(..) => unreachable!("the native scanner never makes big ints"),
            };
            self.recs.push(PRec { key, val });
        }
        self.pends.push(self.recs.len() as u32);
    }

    /// An event without a parse (one the Python Mediator made).
    fn push_none(&mut self) {
        self.fp.push(0);
        self.corr.push(false);
        self.etype.push(SRef::default());
        self.pends.push(self.recs.len() as u32);
    }

    fn props_range(&self, i: usize) -> (usize, usize) {
        (if i == 0 { 0 } else { self.pends[i - 1] as usize }, self.pends[i] as usize)
    }

    /// Room for `events` more events with `recs` properties and `bytes` of strings.
    fn reserve(&mut self, events: usize, recs: usize, bytes: usize) {
        self.fp.reserve(events);
        self.corr.reserve(events);
        self.etype.reserve(events);
        self.pends.reserve(events);
        self.recs.reserve(recs);
        self.sbuf.reserve(bytes);
    }

    #[inline]
    fn text(&self, r: SRef) -> Option<&str> {
        self.sbuf.get(r.off as usize..r.off as usize + r.len as usize)
    }

    /// Event `i`'s (event type, properties) into `props` (cleared first); None: a string out of the arena
    /// (a decoded bundle is checked, so never).
    fn event<'b>(&'b self, i: usize, props: &mut Vec<(&'b str, Val<'b>)>) -> Option<&'b str> {
        props.clear();
        let (a, b) = self.props_range(i);
        for rec in &self.recs[a..b] {
            let v = match rec.val {
                PVal::Str(r) => Val::Str(std::borrow::Cow::Borrowed(self.text(r)?)),
                PVal::Int(i) => Val::Int(i),
                PVal::Float(f) => Val::Float(f),
                PVal::Bool(b) => Val::Bool(b),
                PVal::Null => Val::Null,
            };
            props.push((self.text(rec.key)?, v));
        }
        self.text(self.etype[i])
    }

    fn encode(&self, w: &mut Vec<u8>) {
        let sref = |w: &mut Vec<u8>, r: SRef| {
            w.extend_from_slice(&r.off.to_le_bytes());
            w.extend_from_slice(&r.len.to_le_bytes());
        };
        for i in 0..self.fp.len() {
            w.extend_from_slice(&self.fp[i].to_le_bytes());
            w.push(self.corr[i] as u8);
            sref(w, self.etype[i]);
            w.extend_from_slice(&self.pends[i].to_le_bytes());
        }
        w.extend_from_slice(&(self.recs.len() as u32).to_le_bytes());
        for rec in &self.recs {
            sref(w, rec.key);
            let (tag, x): (u8, u64) = match rec.val {
                PVal::Str(r) => (0, r.off as u64 | (r.len as u64) << 32),
                PVal::Int(i) => (1, i as u64),
                PVal::Float(f) => (2, f.to_bits()),
                PVal::Bool(b) => (3, b as u64),
                PVal::Null => (4, 0),
            };
            w.push(tag);
            w.extend_from_slice(&x.to_le_bytes());
        }
        w.extend_from_slice(&(self.sbuf.len() as u32).to_le_bytes());
        w.extend_from_slice(self.sbuf.as_bytes());
    }
}

// ---- the bundle ----------------------------------------------------------------------------------------
// 2: with each native line's parse (`Parsed`); 3: the events in arrival order, `ord` gives the customers' order
const BUNDLE_VERSION: u8 = 3;

/// One shard's share of a batch: its customers in order of their first events, each one's events in
/// arrival order. An event is a native one (its line, time, watermark, exclusion, source) or one the
/// Python Mediator made (`py`: its `MeteredEvent`, index `pyi`). The per-event columns (`buf`/`ends` ..
/// `parsed`) hold the shard's events in arrival order, as `Mediator::run` staged them (no copy at `take`);
/// `ord` lists them customer by customer.
#[pyclass(module = "meterflow_native")]
#[derive(Default)]
pub(crate) struct Bundle {
    pub(crate) keys: Vec<String>,
    pub(crate) starts: Vec<u32>, // customer k's events are ord[starts[k]..starts[k + 1]]
    pub(crate) ord: Vec<u32>,    // the events (indexes of the columns below), customer by customer
    buf: Vec<u8>,
    ends: Vec<u32>, // event i's line is buf[ends[i - 1]..ends[i]]
    pub(crate) ts: Vec<i64>,
    pub(crate) wm: Vec<i64>,
    pub(crate) excl: Vec<bool>,
    names: Vec<String>,
    srcs: Vec<Src>,
    pub(crate) pyi: Vec<i32>, // -1: native; else the index in `py`
    py: Vec<Py<PyAny>>,
    parsed: Parsed, // each event's parse (empty for a Python-made one)
    #[pyo3(get)]
    ingested: i64,
}

impl Bundle {
    pub(crate) fn line(&self, i: usize) -> &[u8] {
        let s = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.buf[s..self.ends[i] as usize]
    }

    fn encode(&self) -> Vec<u8> {
        let mut w: Vec<u8> = Vec::with_capacity(self.buf.len() + self.ts.len() * 40 + 64);
        let u32s = |w: &mut Vec<u8>, v: u32| w.extend_from_slice(&v.to_le_bytes());
        let strs = |w: &mut Vec<u8>, v: &[String]| {
            w.extend_from_slice(&(v.len() as u32).to_le_bytes());
            for s in v {
                w.extend_from_slice(&(s.len() as u32).to_le_bytes());
                w.extend_from_slice(s.as_bytes());
            }
        };
        w.push(BUNDLE_VERSION);
        w.extend_from_slice(&self.ingested.to_le_bytes());
        strs(&mut w, &self.keys);
        strs(&mut w, &self.names);
        for &s in &self.starts {
            u32s(&mut w, s);
        }
        let n = self.ts.len() as u32;
        u32s(&mut w, n);
        u32s(&mut w, self.buf.len() as u32);
        w.extend_from_slice(&self.buf);
        for i in 0..n as usize {
            u32s(&mut w, self.ends[i]);
            w.extend_from_slice(&self.ts[i].to_le_bytes());
            w.extend_from_slice(&self.wm[i].to_le_bytes());
            w.push(self.excl[i] as u8);
            let s = &self.srcs[i];
            u32s(&mut w, s.name);
            w.push(s.kind);
            w.extend_from_slice(&s.a.to_le_bytes());
            w.extend_from_slice(&s.b.to_le_bytes());
            w.extend_from_slice(&self.pyi[i].to_le_bytes());
        }
        for &a in &self.ord {
            u32s(&mut w, a);
        }
        self.parsed.encode(&mut w);
        w
    }

    fn decode(data: &[u8], py: Vec<Py<PyAny>>) -> Option<Bundle> {
        struct Rd<'a>(&'a [u8], usize);
        impl<'a> Rd<'a> {
            fn take(&mut self, n: usize) -> Option<&'a [u8]> {
                let s = self.0.get(self.1..self.1 + n)?;
                self.1 += n;
                Some(s)
            }
            fn u8(&mut self) -> Option<u8> {
                Some(self.take(1)?[0])
            }
            fn u32(&mut self) -> Option<u32> {
                Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
            }
            fn i64(&mut self) -> Option<i64> {
                Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
            }
            fn strs(&mut self) -> Option<Vec<String>> {
                let n = self.u32()? as usize;
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    let l = self.u32()? as usize;
                    v.push(String::from_utf8(self.take(l)?.to_vec()).ok()?);
                }
                Some(v)
            }
        }
        let mut r = Rd(data, 0);
        if r.u8()? != BUNDLE_VERSION {
            return None;
        }
        let mut b = Bundle { ingested: r.i64()?, ..Default::default() };
        b.keys = r.strs()?;
        b.names = r.strs()?;
        for _ in 0..=b.keys.len() {
            b.starts.push(r.u32()?);
        }
        let n = r.u32()? as usize;
        let bl = r.u32()? as usize;
        b.buf = r.take(bl)?.to_vec();
        for _ in 0..n {
            b.ends.push(r.u32()?);
            b.ts.push(r.i64()?);
            b.wm.push(r.i64()?);
            b.excl.push(r.u8()? != 0);
            let name = r.u32()?;
            let kind = r.u8()?;
            let (a, bb) = (r.i64()?, r.i64()?);
            b.srcs.push(Src { name, kind, a, b: bb });
            let pi = i32::from_le_bytes(r.take(4)?.try_into().ok()?);
            if pi >= 0 && pi as usize >= py.len() || pi < 0 && name as usize >= b.names.len() {
                return None;
            }
            b.pyi.push(pi);
        }
        // every line within `buf`, and `buf` all lines
        if b.ends.windows(2).any(|w| w[0] > w[1]) || b.ends.last().map_or(0, |&e| e as usize) != bl {
            return None;
        }
        // the customers' events: each event once
        let mut seen = vec![false; n];
        for _ in 0..n {
            let a = r.u32()? as usize;
            if a >= n || std::mem::replace(&mut seen[a], true) {
                return None;
            }
            b.ord.push(a as u32);
        }
        let p = &mut b.parsed;
        let sref = |r: &mut Rd<'_>| -> Option<SRef> { Some(SRef { off: r.u32()?, len: r.u32()? }) };
        for _ in 0..n {
            p.fp.push(r.i64()? as u64);
            p.corr.push(match r.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            });
            p.etype.push(sref(&mut r)?);
            p.pends.push(r.u32()?);
        }
        let nr = r.u32()? as usize;
        if p.pends.windows(2).any(|w| w[0] > w[1]) || p.pends.last().map_or(0, |&e| e as usize) != nr {
            return None;
        }
        for _ in 0..nr {
            let key = sref(&mut r)?;
            let tag = r.u8()?;
            let x = r.i64()? as u64;
            let val = match tag {
                0 => PVal::Str(SRef { off: x as u32, len: (x >> 32) as u32 }),
                1 => PVal::Int(x as i64),
                2 => PVal::Float(f64::from_bits(x)),
                3 if x <= 1 => PVal::Bool(x == 1),
                4 if x == 0 => PVal::Null,
                _ => return None,
            };
            p.recs.push(PRec { key, val });
        }
        let sl = r.u32()? as usize;
        p.sbuf = String::from_utf8(r.take(sl)?.to_vec()).ok()?;
        // every string of a parse in the arena, on character boundaries; a Python-made event has none
        for i in 0..n {
            let (a, e) = p.props_range(i);
            if b.pyi[i] >= 0 {
                if a != e {
                    return None;
                }
                continue;
            }
            p.text(p.etype[i])?;
            for rec in &p.recs[a..e] {
                p.text(rec.key)?;
                if let PVal::Str(s) = rec.val {
                    p.text(s)?;
                }
            }
        }
        if r.1 != data.len() || b.starts[0] != 0 || b.starts.windows(2).any(|w| w[0] > w[1]) {
            return None;
        }
        if *b.starts.last()? as usize != n {
            return None;
        }
        b.py = py;
        Some(b)
    }
}

#[pymethods]
impl Bundle {
    /// Restore a pickled bundle: `Bundle(state, python_events)` (`__reduce__`).
    #[new]
    fn py_new(state: &[u8], events: Vec<Py<PyAny>>) -> PyResult<Self> {
        Bundle::decode(state, events).ok_or_else(|| PyValueError::new_err("not a meterflow_native bundle state"))
    }

    #[allow(clippy::type_complexity)]
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>, Bound<'py, PyList>))> {
        let py = slf.py();
        let b = slf.borrow();
        let events = PyList::new(py, b.py.iter().map(|o| o.bind(py)))?;
        Ok((slf.get_type().into_any(), (PyBytes::new(py, &b.encode()), events)))
    }

    fn __len__(&self) -> usize {
        self.ts.len()
    }

    /// The customers (`tenant|customer`), in order of their first events.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.keys.iter().map(|k| PyString::new(py, k)))
    }

    /// How many events customer `k` has here.
    fn count(&self, k: usize) -> usize {
        (self.starts[k + 1] - self.starts[k]) as usize
    }

    /// Customer `k`'s `i`-th event: its `MeteredEvent` when the Python Mediator made it, else
    /// `(raw, ts, wm, src, excluded)` (the wrapper decodes it).
    fn event<'py>(&self, py: Python<'py>, k: usize, i: usize) -> PyResult<Bound<'py, PyAny>> {
        let j = self.ord[self.starts[k] as usize + i] as usize;
        if self.pyi[j] >= 0 {
            return Ok(self.py[self.pyi[j] as usize].bind(py).clone());
        }
        let src = src_tuple(py, &self.names, &self.srcs[j])?;
        Ok((PyBytes::new(py, self.line(j)), self.ts[j], self.wm[j], src, self.excl[j]).into_pyobject(py)?.into_any())
    }

    /// Every event of customer `k`, as `event` gives them.
    fn events<'py>(&self, py: Python<'py>, k: usize) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for i in 0..self.count(k) {
            out.append(self.event(py, k, i)?)?;
        }
        Ok(out)
    }
}

// ---- the mediator --------------------------------------------------------------------------------------
const LAST: u32 = u32::MAX; // (`Stage::next` of a customer's last event)

/// A customer of the staged batch: its shard's stage and its first and last events there.
struct StCust {
    key: String,
    slot: u32,
    first: u32,
    last: u32,
    same: u32, // the customer before it whose key has the same `key_hash` (LAST: none)
}

/// The customer of `custs` with `key` (hash `h`), or Err(the last one whose key hashes to `h`, LAST: none).
fn find_customer(index: &FxMap<u64, u32>, custs: &[StCust], h: u64, key: &str) -> Result<usize, u32> {
    let Some(&last) = index.get(&h) else { return Err(LAST) };
    let mut c = last;
    while c != LAST {
        let cu = &custs[c as usize];
        if cu.key == key {
            return Ok(c as usize);
        }
        c = cu.same;
    }
    Err(last)
}

/// A customer key's 64-bit hash for `Mediator::index` (which compares the keys of equal hashes).
#[inline]
fn key_hash(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

/// One shard's share of the staged batch: the bundle `take` gives, its events in arrival order as `run` and
/// `push` stage them (a line is copied once, from its bytes object to here), linked customer by customer.
#[derive(Default)]
struct Stage {
    shard: u32,
    b: Bundle,
    next: Vec<u32>,        // event a's customer's next event (LAST: none)
    arch: Vec<(u32, u32)>, // event a's archive row's first columns in Mediator.arch (archive.rs); empty: not written
    cap: [usize; 4],       // (events, line bytes, properties, string bytes) of the slot's last bundle
}

impl Stage {
    /// Start shard `shard`'s bundle, with the room the slot's last one took.
    fn open(&mut self, shard: u32) {
        self.shard = shard;
        let [n, bytes, recs, sbytes] = self.cap;
        let b = &mut self.b;
        b.starts.push(0);
        b.buf.reserve(bytes);
        b.ends.reserve(n);
        b.ts.reserve(n);
        b.wm.reserve(n);
        b.excl.reserve(n);
        b.srcs.reserve(n);
        b.pyi.reserve(n);
        b.ord.reserve(n);
        b.parsed.reserve(n, recs, sbytes);
        self.next.reserve(n);
        self.arch.reserve(n);
    }

    fn name_index(&mut self, name: &str) -> u32 {
        let names = &mut self.b.names;
        match names.iter().rposition(|n| n == name) {
            Some(i) => i as u32,
            None => {
                names.push(name.to_owned());
                (names.len() - 1) as u32
            }
        }
    }

    /// An event whose line (if any) was just appended to `b.buf` and whose parse to `b.parsed`; its index.
    fn push(&mut self, ts: i64, wm: i64, excl: bool, src: Src, pyi: i32, arch: (u32, u32)) -> u32 {
        let b = &mut self.b;
        let a = b.ts.len() as u32;
        b.ends.push(b.buf.len() as u32);
        b.ts.push(ts);
        b.wm.push(wm);
        b.excl.push(excl);
        b.srcs.push(src);
        b.pyi.push(pyi);
        self.next.push(LAST);
        self.arch.push(arch);
        a
    }
}

/// One worker's native mediation (see the module doc). `run` and `push` stage a batch; `columns` gives
/// its raw archive columns, `take` its bundles (and starts the next batch).
#[pyclass(module = "meterflow_native")]
pub(crate) struct Mediator {
    max_bytes: usize,
    max_skew_ms: i64,
    tenants: FxMap<String, Tenant>,
    shards: u32,
    custs: Vec<StCust>,     // in order of their first events
    index: FxMap<u64, u32>, // key_hash(key) -> the last customer with it (StCust.same: the one before)
    slots: FxMap<u32, u32>, // a shard's stage in `stages`
    stages: Vec<Stage>,     // stages[..used]: the batch's shards in order of their first customers (then spares)
    used: usize,
    key_buf: String,
    spare: json::Props<'static>, // (the last line's properties Vec, empty: json::recycle)
    /// Whether `run` writes each accepted line's archive row as it parses it (archive.rs; `pipeline.archive_raw`).
    #[pyo3(get, set)]
    archiving: bool,
    arch: Vec<u8>,
}

/// A source `(name, a)` or `(name, a, b)` the bundle can store (exact tuple, str, ints): (name, items, a, b).
fn src_parts<'a, 'py>(src: &'a Bound<'py, PyAny>) -> Option<(Borrowed<'a, 'py, PyString>, u8, i64, i64)> {
    if !src.is_exact_instance_of::<PyTuple>() {
        return None;
    }
    let s = src.cast::<PyTuple>().ok()?;
    let n = s.len();
    if n != 2 && n != 3 {
        return None;
    }
    // (in bounds; borrowed from `s`)
    let name = unsafe { s.get_borrowed_item_unchecked(0) };
    if !name.is_exact_instance_of::<PyString>() {
        return None;
    }
    let a = exact_int(&*unsafe { s.get_borrowed_item_unchecked(1) })?;
    let b = if n == 3 { exact_int(&*unsafe { s.get_borrowed_item_unchecked(2) })? } else { 0 };
    Some((name.cast::<PyString>().ok()?, n as u8, a, b))
}

#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it reads nothing and never faults
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Ask the CPU for item `i`'s objects ahead of `run`: a batch's tuples and bytes are often out of cache
/// (a source made them a while ago), and `run` otherwise waits for each one in turn. Item `i + 16`'s tuple,
/// then (it has arrived by then) item `i + 8`'s line and source. Borrowed pointers, only read through the C
/// API (the list holds them; no Python code runs in `run`).
#[inline]
fn prefetch_ahead(batch: &Bound<'_, PyList>, i: usize, n: usize) {
    use pyo3::ffi;
    unsafe {
        if i + 16 < n {
            prefetch(ffi::PyList_GetItem(batch.as_ptr(), (i + 16) as ffi::Py_ssize_t) as *const u8);
        }
        if i + 8 < n {
            let t = ffi::PyList_GetItem(batch.as_ptr(), (i + 8) as ffi::Py_ssize_t);
            if ffi::PyTuple_CheckExact(t) != 0 && ffi::PyTuple_Size(t) == 2 {
                let b = ffi::PyTuple_GetItem(t, 1) as *const u8;
                for k in 0..5 {
                    prefetch(b.wrapping_add(64 * k));
                }
                prefetch(ffi::PyTuple_GetItem(t, 0) as *const u8);
            }
        }
    }
}

/// `prefetch_ahead` for `run_chunk`: value `i + 8`'s bytes (a chunk's values are bytes objects the consumer
/// made a while ago).
#[inline]
fn prefetch_values(values: &Bound<'_, PyList>, i: usize, n: usize) {
    use pyo3::ffi;
    if i + 8 < n {
        unsafe {
            let b = ffi::PyList_GetItem(values.as_ptr(), (i + 8) as ffi::Py_ssize_t) as *const u8;
            for k in 0..5 {
                prefetch(b.wrapping_add(64 * k));
            }
        }
    }
}

impl Mediator {
    /// The customer `key_buf` (a new one after the batch's others).
    fn customer(&mut self) -> usize {
        let key = self.key_buf.as_str();
        let h = key_hash(key);
        let before = match find_customer(&self.index, &self.custs, h, key) {
            Ok(c) => return c,
            Err(before) => before,
        };
        let shard = crc32(key.as_bytes()) % self.shards;
        let slot = match self.slots.get(&shard) {
            Some(&s) => s,
            None => {
                if self.used == self.stages.len() {
                    self.stages.push(Stage::default());
                }
                self.stages[self.used].open(shard);
                let s = self.used as u32;
                self.used += 1;
                self.slots.insert(shard, s);
                s
            }
        };
        let c = self.custs.len();
        self.custs.push(StCust { key: key.to_owned(), slot, first: LAST, last: LAST, same: before });
        self.index.insert(h, c as u32);
        c
    }

    /// Stage a line `run` took: its event `ev` at `ts` from source `(name, a)` or `(name, a, b)` (`kind` 2 or
    /// 3), raising `wm` to `ts`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn stage(
        &mut self,
        raw: &[u8],
        ev: &Event<'_>,
        ts: i64,
        excluded: bool,
        name: &str,
        kind: u8,
        a: i64,
        b: i64,
        wm: &mut i64,
    ) {
        if ts > *wm {
            *wm = ts;
        }
        self.key_buf.clear();
        self.key_buf.push_str(&ev.tenant_id);
        self.key_buf.push('|');
        self.key_buf.push_str(&ev.customer_id);
        let c = self.customer();
        let st = &mut self.stages[self.custs[c].slot as usize];
        let src = Src { name: st.name_index(name), kind, a, b };
        st.b.buf.extend_from_slice(raw);
        st.b.parsed.push(ev);
        let a0 = self.arch.len() as u32;
        if self.archiving {
            archive::row_head(&mut self.arch, ev, ts);
        }
        let e = st.push(ts, *wm, excluded, src, -1, (a0, self.arch.len() as u32));
        self.link(c, e);
    }

    /// Event `a` of customer `c`'s stage after the customer's others.
    fn link(&mut self, c: usize, a: u32) {
        let cu = &mut self.custs[c];
        if cu.first == LAST {
            cu.first = a;
        } else {
            self.stages[cu.slot as usize].next[cu.last as usize] = a;
        }
        cu.last = a;
    }

    /// The staged events as (stage, event): customers in order of their first events, each one's events in
    /// arrival order (operators/mediate.py `raw_columns`).
    fn staged(&self) -> impl Iterator<Item = (&Stage, usize)> + '_ {
        self.custs.iter().flat_map(move |c| {
            let st = &self.stages[c.slot as usize];
            let more = |a: u32| (a != LAST).then_some(a);
            std::iter::successors(more(c.first), move |&a| more(st.next[a as usize])).map(move |a| (st, a as usize))
        })
    }
}

#[pymethods]
impl Mediator {
    /// `spec` as BatchCore's (operators/native.py `_spec`); `shards`: pipeline.shards.
    #[new]
    fn new(spec: &Bound<'_, PyDict>, shards: u32) -> PyResult<Self> {
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
        if shards == 0 {
            return Err(PyValueError::new_err("shards must be at least 1"));
        }
        Ok(Mediator {
            max_bytes: get("max_event_bytes")?.extract()?,
            max_skew_ms: get("max_clock_skew_ms")?.extract()?,
            tenants,
            shards,
            custs: Vec::new(),
            index: FxMap::default(),
            slots: FxMap::default(),
            stages: Vec::new(),
            used: 0,
            key_buf: String::new(),
            spare: Vec::new(),
            archiving: false,
            arch: Vec::new(),
        })
    }

    /// Mediate `batch[start:]` (`(src, raw)` items) with the wall clock `now_ms` and the watermark `wm`
    /// until a line it does not take exactly; returns `(index of that line or len(batch), watermark)`.
    fn run(&mut self, batch: &Bound<'_, PyList>, start: usize, now_ms: i64, wm: i64) -> PyResult<(usize, i64)> {
        let horizon = (now_ms + self.max_skew_ms).min(LAST_EVENT_MS);
        let n = batch.len();
        let mut wm = wm;
        let mut i = start;
        while i < n {
            prefetch_ahead(batch, i, n);
            let item = batch.get_item(i)?;
            let Ok(t) = item.cast::<PyTuple>() else { return Ok((i, wm)) };
            if t.len() != 2 {
                return Ok((i, wm));
            }
            // (borrowed from `t`, which `item` holds)
            let Ok(b) = unsafe { t.get_borrowed_item_unchecked(1) }.cast::<PyBytes>() else { return Ok((i, wm)) };
            let raw = PyBytesMethods::as_bytes(&*b);
            let spare = json::recycle(std::mem::take(&mut self.spare));
            let Some((ev, ts, excluded)) = mediate_line(&self.tenants, self.max_bytes, raw, horizon, spare) else {
                return Ok((i, wm));
            };
            let src = unsafe { t.get_borrowed_item_unchecked(0) };
            let Some((name, kind, a, sb)) = src_parts(&src) else { return Ok((i, wm)) };
            let Ok(name) = PyStringMethods::to_str(&*name) else { return Ok((i, wm)) };
            self.stage(raw, &ev, ts, excluded, name, kind, a, sb, &mut wm);
            self.spare = json::recycle(ev.props);
            i += 1;
        }
        Ok((i, wm))
    }

    /// `run` over one consumed chunk of a Kafka partition (sources/kafka.py `SourceChunk`): message `k` is the
    /// line `values[k]` with the source `(topic, part, offsets[k])`, read from the two lists with no tuple per
    /// message; the same stop rule (a line it does not take exactly, or a value that is not bytes or an
    /// offset that is not an int: the wrapper builds that message's `(src, raw)` for the Python Mediator).
    #[allow(clippy::too_many_arguments)]
    fn run_chunk(
        &mut self,
        topic: &Bound<'_, PyString>,
        part: &Bound<'_, PyAny>,
        offsets: &Bound<'_, PyList>,
        values: &Bound<'_, PyList>,
        start: usize,
        now_ms: i64,
        wm: i64,
    ) -> PyResult<(usize, i64)> {
        let horizon = (now_ms + self.max_skew_ms).min(LAST_EVENT_MS);
        let n = values.len().min(offsets.len());
        let mut wm = wm;
        let mut i = start;
        let (Ok(name), Some(a)) = (PyStringMethods::to_str(topic), exact_int(part)) else { return Ok((i, wm)) };
        while i < n {
            prefetch_values(values, i, n);
            let v = values.get_item(i)?;
            let Ok(b) = v.cast::<PyBytes>() else { return Ok((i, wm)) };
            let Some(off) = exact_int(&offsets.get_item(i)?) else { return Ok((i, wm)) };
            let raw = b.as_bytes();
            let spare = json::recycle(std::mem::take(&mut self.spare));
            let Some((ev, ts, excluded)) = mediate_line(&self.tenants, self.max_bytes, raw, horizon, spare) else {
                return Ok((i, wm));
            };
            self.stage(raw, &ev, ts, excluded, name, 3, a, off, &mut wm);
            self.spare = json::recycle(ev.props);
            i += 1;
        }
        Ok((i, wm))
    }

    /// An event the Python Mediator made (`MeteredEvent`), for customer `key`, after the lines staged so far.
    fn push(&mut self, key: &str, me: &Bound<'_, PyAny>) -> PyResult<()> {
        let ts: i64 = me.getattr("ts")?.extract()?;
        let wm: i64 = me.getattr("wm")?.extract()?;
        let excl: bool = me.getattr("excluded")?.extract()?;
        self.key_buf.clear();
        self.key_buf.push_str(key);
        let c = self.customer();
        let st = &mut self.stages[self.custs[c].slot as usize];
        let pyi = st.b.py.len() as i32;
        st.b.py.push(me.clone().unbind());
        st.b.parsed.push_none();
        let at = self.arch.len() as u32;
        let e = st.push(ts, wm, excl, Src { name: 0, kind: 0, a: 0, b: 0 }, pyi, (at, at));
        self.link(c, e);
        Ok(())
    }

    /// The raw archive columns of the staged batch (operators/mediate.py `raw_columns`, in its order:
    /// customers by first event), or None when nothing was accepted. `py_row(me)` gives the ten column
    /// values of a Python-made event.
    fn columns<'py>(
        &self,
        py: Python<'py>,
        ingested: i64,
        py_row: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyTuple>>> {
        if self.custs.is_empty() {
            return Ok(None);
        }
        let cols: Vec<Bound<'py, PyList>> = (0..10).map(|_| PyList::empty(py)).collect();
        for (st, e) in self.staged() {
            let b = &st.b;
            if b.pyi[e] >= 0 {
                let row = py_row.call1((b.py[b.pyi[e] as usize].bind(py),))?;
                for (k, col) in cols.iter().enumerate() {
                    col.append(row.get_item(k)?)?;
                }
                continue;
            }
            let p =
                json::parse_event(b.line(e)).ok_or_else(|| PyValueError::new_err("staged line no longer parses"))?;
            let src = &b.srcs[e];
            cols[0].append(PyString::new(py, &p.tenant_id))?;
            cols[1].append(PyString::new(py, &p.customer_id))?;
            cols[2].append(PyString::new(py, &p.event_id))?;
            cols[3].append(PyString::new(py, &p.event_type))?;
            cols[4].append(b.ts[e])?;
            cols[5].append(PyString::new(py, &props_json(&p.props)))?;
            cols[6].append(PyBool::new(py, p.correction))?;
            cols[7].append(ingested)?;
            cols[8].append(PyString::new(py, &src_text(&b.names, src)))?;
            cols[9].append(if src.kind == 0 {
                0
            } else if src.kind == 2 {
                src.a
            } else {
                src.b
            })?;
        }
        Ok(Some(PyTuple::new(py, cols)?))
    }

    /// The raw archive of the staged batch as `(rows, RowBinary bytes)` (archive.rs: the values of `columns`,
    /// in its order), or None: nothing was accepted, or a Python-made event's row is left to `columns`.
    fn archive<'py>(
        &self,
        py: Python<'py>,
        ingested: i64,
        py_row: &Bound<'py, PyAny>,
    ) -> PyResult<Option<(usize, Bound<'py, PyBytes>)>> {
        if self.custs.is_empty() {
            return Ok(None);
        }
        Ok(archive::row_binary(self, py, ingested, py_row)?.map(|(n, b)| (n, PyBytes::new(py, &b))))
    }

    /// The staged batch as `[(shard, Bundle)]`, shards in order of their first customers (as
    /// operators/mediate.py `bundle_shards`); the next batch starts empty.
    fn take<'py>(&mut self, py: Python<'py>, ingested: i64) -> PyResult<Bound<'py, PyList>> {
        for c in self.custs.drain(..) {
            let st = &mut self.stages[c.slot as usize];
            let b = &mut st.b;
            b.keys.push(c.key);
            let mut a = c.first;
            while a != LAST {
                b.ord.push(a);
                a = st.next[a as usize];
            }
            b.starts.push(b.ord.len() as u32);
        }
        let mut out: Vec<(u32, Bundle)> = Vec::with_capacity(self.used);
        for st in &mut self.stages[..self.used] {
            let mut b = std::mem::take(&mut st.b);
            b.ingested = ingested;
            st.cap = [b.ts.len(), b.buf.len(), b.parsed.recs.len(), b.parsed.sbuf.len()];
            st.next.clear();
            st.arch.clear();
            out.push((st.shard, b));
        }
        self.used = 0;
        self.slots.clear();
        self.index.clear();
        self.arch.clear();
        let list = PyList::empty(py);
        for (s, b) in out {
            list.append((s.to_string(), Bound::new(py, b)?))?;
        }
        Ok(list)
    }
}

/// `BatchCore::fold_bundle`: the customers of `b` the core holds (others skipped), from customer `k` event
/// `i` on. Returns `(k, i, why)` as `fold_many` (why 1 also for a Python-made event).
pub(crate) fn fold_bundle(
    core: &mut BatchCore,
    b: &Bundle,
    k_start: usize,
    i_start: usize,
) -> PyResult<(usize, usize, u8)> {
    let nk = b.keys.len();
    let mut k = k_start;
    let mut i = i_start;
    let mut props: Vec<(&str, Val<'_>)> = Vec::with_capacity(8);
    while k < nk {
        let Some(&ci) = core.index.get(b.keys[k].as_str()) else {
            k += 1;
            i = 0;
            continue;
        };
        let (s, e) = (b.starts[k] as usize, b.starts[k + 1] as usize);
        while s + i < e {
            let j = b.ord[s + i] as usize;
            if b.pyi[j] >= 0 {
                return Ok((k, i, 1));
            }
            let p = &b.parsed;
            let Some(etype) = p.event(j, &mut props) else { return Ok((k, i, 1)) };
            if let Some(why) =
                core.fold_parsed(k << 32 | i, ci, p.fp[j], etype, b.ts[j], b.wm[j], b.excl[j], p.corr[j], &props)
            {
                return Ok((k, i, why));
            }
            i += 1;
        }
        k += 1;
        i = 0;
    }
    core.evict_seen(); // (the end of each customer's events of the batch: where CustomerMeter evicts)
    Ok((k, 0, 0))
}

/// `BatchCore::bundle_counts`: (events of the customers the core holds, those of them that evaluate
/// nothing, the evaluated customers' keys).
pub(crate) fn bundle_counts<'py>(
    core: &BatchCore,
    py: Python<'py>,
    b: &Bundle,
) -> PyResult<(usize, usize, Bound<'py, PyList>)> {
    let (mut n, mut unevaluated) = (0usize, 0usize);
    let evaluated = PyList::empty(py);
    for (k, key) in b.keys.iter().enumerate() {
        if let Some(&ci) = core.index.get(key.as_str()) {
            let c = (b.starts[k + 1] - b.starts[k]) as usize;
            n += c;
            if core.customers[ci].levels.is_some() {
                evaluated.append(PyString::new(py, key))?;
            } else {
                unevaluated += c;
            }
        }
    }
    Ok((n, unevaluated, evaluated))
}

/// `BatchCore::unknown`: the indexes of the customers of `b` the core does not hold.
pub(crate) fn unknown(core: &BatchCore, b: &Bundle) -> Vec<usize> {
    (0..b.keys.len()).filter(|&k| !core.index.contains_key(b.keys[k].as_str())).collect()
}

/// Test hook: the raw archive's properties text of a float (msgspec's format).
#[pyfunction]
pub(crate) fn float_json(f: f64) -> String {
    let mut s = String::new();
    push_f64_json(&mut s, f);
    s
}

/// Test hook: a `group_by` dimension's text of a float (Python's `repr`, dims.rs `push_float_repr`).
#[pyfunction]
pub(crate) fn float_repr(f: f64) -> String {
    let mut s = String::new();
    crate::dims::push_float_repr(&mut s, f);
    s
}

/// Test hook: `zlib.crc32`.
#[pyfunction]
pub(crate) fn crc32_of(b: &[u8]) -> u32 {
    crc32(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customers_whose_keys_share_a_hash_stay_apart() {
        let mut index: FxMap<u64, u32> = FxMap::default();
        let mut custs: Vec<StCust> = Vec::new();
        // (as Mediator::customer, with the hash given: three keys hash alike)
        let mut add = |h: u64, key: &str| -> usize {
            match find_customer(&index, &custs, h, key) {
                Ok(c) => c,
                Err(before) => {
                    let c = custs.len();
                    custs.push(StCust { key: key.to_owned(), slot: 0, first: LAST, last: LAST, same: before });
                    index.insert(h, c as u32);
                    c
                }
            }
        };
        let keys = [(7, "t|a"), (7, "t|b"), (8, "t|c"), (7, "t|d"), (9, "t|a")];
        let first: Vec<usize> = keys.iter().map(|&(h, k)| add(h, k)).collect();
        assert_eq!(first, [0, 1, 2, 3, 4]); // ("t|a" under another hash: a test's hash, never key_hash's)
        let again: Vec<usize> = keys.iter().rev().map(|&(h, k)| add(h, k)).collect();
        assert_eq!(again, [4, 3, 2, 1, 0]);
        assert_eq!(add(7, "t|e"), 5);
        assert_eq!(add(7, "t|a"), 0);
        assert_eq!(add(8, "t|c"), 2);
    }
}
