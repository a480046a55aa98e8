//! The native dedupe table: operators/dedupe.py `IdTable` (an id's XXH3-64 fingerprint and its expiry, epoch
//! ms) with exactly its decisions, in at most 16 bytes per tracked id at every point of its growth.
//!
//! Layout. An *ordered* linear-probing table (Amble & Knuth 1974) over two flat arrays in one allocation, `h`
//! (u64) and `e` (u32): 12 bytes a slot. `h` holds `mix(fp)` (murmur3's fmix64, a bijection with `mix(0) == 0`,
//! so 0 is the empty marker exactly as fingerprint 0 is in IdTable, and the fingerprint comes back with `unmix`
//! for export); ids with low-bit (or any-bit) patterns in common spread like any others. The home slot of `x`
//! is `x * n_home >> 64` — monotone in `x` — and the occupied slots are kept sorted by `x`, every id between its
//! home and its slot with no empty slot in between (a pad of slots after the `n_home` homes, n_home/64 clamped
//! to 4..256, takes the last cluster's spill; the very last slot stays empty, a sentinel). So:
//! - a lookup scans from the home while the slot is occupied and smaller: a miss stops at the first larger id,
//!   not at the end of the cluster (about (1 + 1/(1-a))/2 slots at load a, against (1 + 1/(1-a)^2)/2 for plain
//!   linear probing: 4.5 against 32 at 7/8), which lets the table run full;
//! - an insert shifts the rest of its cluster right by one slot (a memmove);
//! - growth (and the rebuild of an eviction) is one sequential merge: the ids in order, each at
//!   max(its new home, the previous slot + 1), which is cheap enough to grow by 1/8 instead of doubling.
//! Why not a doubling table of 12-byte slots at load <= 3/4: right after a doubling it is 3/8 full, 32 bytes
//! per id. Here a table of 1024 homes or more holds at most 7/8 of them and grows by 1/8 (an eviction or a
//! restore rebuilds it as right after a growth), so its load stays between 7/9 and 7/8 plus the pad:
//! 12 / (7/9) = 15.4 bytes per id right after growth, 13.7 just before. A smaller table, where the fixed
//! costs (the 56-byte struct, a segment) weigh on each id, runs at 15/16 plus its pad and grows by 1/16 (its
//! inserts shift further, in a table that fits in the cache). Measured by the allocator (`cargo test`): at most
//! 15.8 bytes per id at every size from 1,000 ids to 1M, struct included; 19 at 100..999, 21 at 10..99.
//!
//! Expiries. `e` holds the expiry as 4 bits of *segment* and 28 bits of offset: a segment is one aligned
//! 2^28 ms (3.1 days) range, `segs[s].key = expiry >> 28`, so the expiries of a customer's ids — its periods'
//! ends plus late_grace, and watermark + dedupe_window near a period's end — fit in a few segments whatever
//! their distance (a yearly period's and the previous one's, a year apart, are two). Up to 15 segments are in
//! use at once (46 days of distinct expiries); a segment is freed when its last id is evicted or re-seen. An
//! expiry that finds no segment is stored whole in a side map (`wide`, code 15): exact, just bigger. Expiries
//! are u64 as in IdTable (whose array('Q') holds 0 .. 2^64-1), compared with the watermark as Python compares
//! ints.
//!
//! Decisions (IdTable.check_add): a duplicate iff the fingerprint is held with expiry >= wm; otherwise it is
//! stored (or its expiry replaced) with the new expiry. `evict(wm)` drops the ids with expiry < wm (when there
//! is one) and returns the smallest expiry left (NO_EXPIRY when none), as IdTable.evict. Fingerprint 0 is never
//! stored and never a duplicate (IdTable writes it into an empty slot, where it stays empty).

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::Ident; // the identity hash (the keys are mixed fingerprints)

pub const NO_EXPIRY: u64 = 1 << 62; // operators/dedupe.py NO_EXPIRY

const OFF_BITS: u32 = 28;
const OFF_MASK: u32 = (1 << OFF_BITS) - 1;
const WIDE: u32 = 15; // the segment code of an expiry kept whole in `wide`
const MIN_HOME: usize = 1;

const M1: u64 = 0xff51_afd7_ed55_8ccd;
const M2: u64 = 0xc4ce_b9fe_1a85_ec53;

/// The inverse of odd `a` modulo 2^64 (Newton's iteration; each step doubles the correct low bits).
const fn inverse(a: u64) -> u64 {
    let mut x = a; // correct to 3 bits for odd a
    let mut i = 0;
    while i < 6 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
        i += 1;
    }
    x
}
const I1: u64 = inverse(M1);
const I2: u64 = inverse(M2);

/// murmur3 fmix64: a bijection of u64 with mix(0) == 0.
#[inline]
pub fn mix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(M1);
    k ^= k >> 33;
    k = k.wrapping_mul(M2);
    k ^ (k >> 33)
}

#[inline]
pub fn unmix(mut k: u64) -> u64 {
    k ^= k >> 33; // (x ^ x >> 33 is its own inverse)
    k = k.wrapping_mul(I2);
    k ^= k >> 33;
    k = k.wrapping_mul(I1);
    k ^ (k >> 33)
}

type WideMap = HashMap<u64, u64, BuildHasherDefault<Ident>>;

#[derive(Clone, Copy)]
struct Seg {
    key: u64,
    count: u32,
}

const SMALL: usize = 1024; // below this many homes a table runs fuller (see `limit`)

/// How many ids `n_home` homes hold: 7/8; for a small table, whose fixed costs would otherwise weigh on each id,
/// 15/16 and the pad but one slot (its inserts shift more, in a table that fits in the cache).
#[inline]
fn limit(n_home: usize) -> usize {
    if n_home < SMALL {
        n_home - n_home / 16 + pad(n_home) - 1
    } else {
        n_home - n_home / 8
    }
}

/// The homes after a growth: 1/8 more (1/16, at least one, for a small table).
#[inline]
fn grown(n_home: usize) -> usize {
    if n_home < SMALL {
        n_home + (n_home / 16).max(1)
    } else {
        n_home + n_home / 8
    }
}

#[inline]
fn pad(n_home: usize) -> usize {
    (n_home / 64).clamp(4, 256)
}

/// The homes for `n` ids right after an eviction or a restore: the fewest that leave the room of one growth
/// (1/8 of `n`; 1/16 in a small table) below the limit, as right after a growth.
fn home_for(n: usize) -> usize {
    let want = n + if n < SMALL { n / 16 } else { n / 8 };
    let mut s = (want * 8 / 7).max(MIN_HOME);
    while limit(s) < want {
        s += 1;
    }
    while s > MIN_HOME && limit(s - 1) >= want {
        s -= 1;
    }
    s
}

/// `wm <= e` as Python compares a uint64 with an int (`wm` may be negative).
#[inline]
fn alive(e: u64, wm: i64) -> bool {
    wm <= 0 || e >= wm as u64
}

#[derive(Default)]
pub struct IdTable {
    // one allocation: `size` u64 (mixed fingerprints, h) then `size` u32 (expiry codes, e) in ceil(size/2) words
    slots: Box<[u64]>,
    size: u32,
    n_home: u32, // 0: nothing allocated yet
    len: u32,
    segs: Box<[Seg]>,
    wide: Option<Box<WideMap>>,
}

/// `size` slots: the mixed fingerprints (all 0) and the expiry codes, in one allocation.
fn alloc_slots(size: usize) -> Box<[u64]> {
    vec![0u64; size + size.div_ceil(2)].into_boxed_slice()
}

/// The two halves of an allocation of `size` slots.
#[inline(always)]
fn halves(slots: &[u64], size: usize) -> (&[u64], &[u32]) {
    let (h, t) = slots.split_at(size);
    // SAFETY: t holds ceil(size/2) u64 words, room for `size` u32 (whose alignment divides u64's).
    (h, unsafe { std::slice::from_raw_parts(t.as_ptr() as *const u32, size) })
}

#[inline(always)]
fn halves_mut(slots: &mut [u64], size: usize) -> (&mut [u64], &mut [u32]) {
    let (h, t) = slots.split_at_mut(size);
    // SAFETY: as in `halves`.
    (h, unsafe { std::slice::from_raw_parts_mut(t.as_mut_ptr() as *mut u32, size) })
}

impl IdTable {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline(always)]
    fn hs(&self) -> &[u64] {
        &self.slots[..self.size as usize]
    }

    #[inline(always)]
    fn es(&self) -> &[u32] {
        halves(&self.slots, self.size as usize).1
    }

    #[inline(always)]
    fn parts_mut(&mut self) -> (&mut [u64], &mut [u32]) {
        halves_mut(&mut self.slots, self.size as usize)
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    #[inline(always)]
    fn home(&self, x: u64) -> usize {
        ((x as u128 * self.n_home as u128) >> 64) as usize
    }

    /// The slot of `x`, or where it would go; and whether it is there.
    #[inline(always)]
    fn find(&self, x: u64) -> (usize, bool) {
        let h = self.hs();
        let mut i = self.home(x);
        debug_assert!(i < h.len() && h[h.len() - 1] == 0);
        // The slots from the home on that are occupied and smaller than x are exactly those before x's place
        // (the table is sorted and has no gap there), so count them 8 at a time without a branch per slot.
        // (y - 1 < x - 1: occupied and smaller; 0 wraps to the largest u64.)
        let below = |y: &u64| (y.wrapping_sub(1) < x - 1) as usize;
        while i + 8 <= h.len() {
            let c: usize = h[i..i + 8].iter().map(below).sum();
            i += c;
            if c < 8 {
                return (i, h[i] == x);
            }
        }
        // SAFETY: i < h.len() (the last slot is always 0, which stops the scan there).
        while below(unsafe { h.get_unchecked(i) }) == 1 {
            i += 1;
        }
        (i, h[i] == x)
    }

    #[inline(always)]
    fn decode(&self, x: u64, c: u32) -> u64 {
        let s = c >> OFF_BITS;
        if s == WIDE {
            self.wide.as_ref().and_then(|w| w.get(&x)).copied().unwrap_or(0)
        } else {
            (self.segs[s as usize].key << OFF_BITS) | (c & OFF_MASK) as u64
        }
    }

    fn encode(&mut self, x: u64, e: u64) -> u32 {
        let key = e >> OFF_BITS;
        let off = (e as u32) & OFF_MASK;
        let mut free = usize::MAX;
        for (s, seg) in self.segs.iter_mut().enumerate() {
            if seg.key == key {
                seg.count += 1;
                return (s as u32) << OFF_BITS | off;
            }
            if seg.count == 0 && free == usize::MAX {
                free = s;
            }
        }
        if free == usize::MAX && self.segs.len() < WIDE as usize {
            free = self.segs.len();
            let mut v = std::mem::take(&mut self.segs).into_vec(); // (a few per table: no spare capacity)
            v.push(Seg { key, count: 0 });
            self.segs = v.into_boxed_slice();
        }
        if free != usize::MAX {
            self.segs[free] = Seg { key, count: 1 };
            return (free as u32) << OFF_BITS | off;
        }
        self.wide.get_or_insert_with(Default::default).insert(x, e);
        WIDE << OFF_BITS
    }

    fn release(&mut self, x: u64, c: u32) {
        let s = c >> OFF_BITS;
        if s == WIDE {
            if let Some(w) = self.wide.as_mut() {
                w.remove(&x);
            }
        } else {
            self.segs[s as usize].count -= 1;
        }
    }

    /// IdTable.check_add: true if `fp` is held with an expiry >= `wm` (a duplicate: nothing changes); otherwise
    /// `fp` is stored with `expiry` (new, or re-seen after its expiry passed) and false is returned.
    #[inline]
    pub fn check_add(&mut self, fp: u64, expiry: u64, wm: i64) -> bool {
        let x = mix(fp);
        if x == 0 {
            return false; // IdTable: fingerprint 0 is the empty marker, never held
        }
        if self.n_home == 0 {
            self.rebuild(MIN_HOME);
        }
        let (i, found) = self.find(x);
        if found {
            let c = self.es()[i];
            if alive(self.decode(x, c), wm) {
                return true;
            }
            self.release(x, c);
            let c = self.encode(x, expiry);
            self.parts_mut().1[i] = c;
            return false;
        }
        let c = self.encode(x, expiry);
        self.insert_at(i, x, c);
        false
    }

    fn insert_at(&mut self, mut i: usize, x: u64, c: u32) {
        while self.len as usize >= limit(self.n_home as usize) {
            self.grow();
            i = self.find(x).0;
        }
        loop {
            let last = self.size as usize - 1;
            let j = match self.hs()[i..last].iter().position(|&y| y == 0) {
                Some(k) => i + k,
                None => {
                    // the cluster reached the sentinel: more room
                    self.grow();
                    i = self.find(x).0;
                    continue;
                }
            };
            let (h, e) = self.parts_mut();
            h.copy_within(i..j, i + 1);
            e.copy_within(i..j, i + 1);
            h[i] = x;
            e[i] = c;
            self.len += 1;
            return;
        }
    }

    fn grow(&mut self) {
        self.rebuild(grown(self.n_home as usize));
    }

    /// Re-place every id into `n_home` homes (more if the pad overflows), in order.
    fn rebuild(&mut self, n_home: usize) {
        let old = std::mem::take(&mut self.slots);
        let (oh, oe) = halves(&old, self.size as usize);
        self.place(n_home, oh, oe);
    }

    /// Replace the slots by `n_home` homes (more if the pad overflows) holding the ids of `oh`/`oe`, in order.
    fn place(&mut self, mut n_home: usize, oh: &[u64], oe: &[u32]) {
        loop {
            let size = n_home + pad(n_home);
            let mut slots = alloc_slots(size);
            let (h, e) = halves_mut(&mut slots, size);
            let mut next = 0usize; // the first slot after the last placed id
            let mut ok = true;
            // Without a branch on empty slots (a fifth of them, at random): an empty one (x = 0, home 0) is
            // written at `next`, a free slot that the next id takes or leaves empty, and does not advance it.
            for (&x, &c) in oh.iter().zip(oe) {
                let p = (((x as u128 * n_home as u128) >> 64) as usize).max(next);
                if p >= size - 1 && x != 0 {
                    ok = false;
                    break;
                }
                h[p] = x;
                e[p] = c;
                next = p + (x != 0) as usize;
            }
            if ok {
                self.slots = slots;
                self.size = size as u32;
                self.n_home = n_home as u32;
                return;
            }
            n_home = grown(n_home);
        }
    }

    /// IdTable.evict: drop every id whose expiry < `wm`; the smallest expiry left (NO_EXPIRY when none). When
    /// something is dropped the table is rebuilt to fit the ids left (at 7/9 of the load limit's homes).
    pub fn evict(&mut self, wm: i64) -> u64 {
        let least = self.min_expiry();
        if alive(least, wm) || self.len == 0 {
            return least;
        }
        let mut left: Option<u64> = None;
        let mut kept = 0usize;
        for s in self.segs.iter_mut() {
            s.count = 0;
        }
        let mut wide = self.wide.take();
        let size = self.size as usize;
        let (h, e) = halves_mut(&mut self.slots, size);
        for i in 0..size {
            let x = h[i];
            if x == 0 {
                continue;
            }
            let c = e[i];
            let s = c >> OFF_BITS;
            let ex = if s == WIDE {
                wide.as_ref().and_then(|w| w.get(&x)).copied().unwrap_or(0)
            } else {
                (self.segs[s as usize].key << OFF_BITS) | (c & OFF_MASK) as u64
            };
            if alive(ex, wm) {
                kept += 1;
                left = Some(left.map_or(ex, |l| l.min(ex)));
                if s != WIDE {
                    self.segs[s as usize].count += 1;
                }
            } else {
                h[i] = 0;
                if s == WIDE {
                    if let Some(w) = wide.as_mut() {
                        w.remove(&x);
                    }
                }
            }
        }
        if let Some(w) = wide.as_mut() {
            if w.is_empty() {
                wide = None;
            } else {
                w.shrink_to_fit();
            }
        }
        self.wide = wide;
        let used = self.segs.iter().rposition(|s| s.count > 0).map_or(0, |k| k + 1);
        if used < self.segs.len() {
            let mut v = std::mem::take(&mut self.segs).into_vec();
            v.truncate(used);
            self.segs = v.into_boxed_slice();
        }
        self.len = kept as u32;
        self.rebuild(home_for(kept));
        left.unwrap_or(NO_EXPIRY)
    }

    /// The smallest expiry held (NO_EXPIRY when empty), as IdTable.min_expiry.
    pub fn min_expiry(&self) -> u64 {
        let mut least: Option<u64> = None; // (min(..., default=NO_EXPIRY): an expiry above NO_EXPIRY is returned)
        for (&x, &c) in self.hs().iter().zip(self.es()) {
            if x != 0 {
                let e = self.decode(x, c);
                least = Some(least.map_or(e, |l| l.min(e)));
            }
        }
        least.unwrap_or(NO_EXPIRY)
    }

    /// The expiry stored for `fp` (expired or not).
    pub fn get(&self, fp: u64) -> Option<u64> {
        let x = mix(fp);
        if x == 0 || self.n_home == 0 {
            return None;
        }
        let (i, found) = self.find(x);
        found.then(|| self.decode(x, self.es()[i]))
    }

    /// (fingerprint, expiry) pairs in slot order.
    pub fn items(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.hs().iter().zip(self.es()).filter(|(&x, _)| x != 0).map(|(&x, &c)| (unmix(x), self.decode(x, c)))
    }

    /// A table holding `pairs` (distinct non-zero fingerprints; IdTable.from_state checks that).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut xs: Vec<(u64, u64)> = pairs.into_iter().map(|(fp, e)| (mix(fp), e)).filter(|p| p.0 != 0).collect();
        xs.sort_by_key(|p| p.0);
        xs.dedup_by_key(|p| p.0); // (a state written by IdTable has none; the first one stays)
        let mut t = IdTable::new();
        let n = xs.len();
        let (mut h, mut e) = (Vec::with_capacity(n + 1), Vec::with_capacity(n + 1));
        for (x, ex) in xs {
            h.push(x);
            e.push(t.encode(x, ex));
        }
        t.len = n as u32;
        t.place(home_for(n), &h, &e);
        t
    }

    /// Heap bytes held: the slot arrays, the segments and the side map (hashbrown's layout: per bucket
    /// the entry and a control byte, plus a group of control bytes), not the struct itself.
    pub fn heap_bytes(&self) -> usize {
        let wide = self.wide.as_ref().map_or(0, |w| {
            let buckets = if w.capacity() == 0 { 0 } else { (w.capacity() * 8 / 7).next_power_of_two() };
            std::mem::size_of::<WideMap>() + buckets * 17 + 16
        });
        self.slots.len() * 8 + self.segs.len() * std::mem::size_of::<Seg>() + wide
    }

    pub fn slots(&self) -> usize {
        self.size as usize
    }

    pub fn wide_len(&self) -> usize {
        self.wide.as_ref().map_or(0, |w| w.len())
    }

    /// Checks the invariants (tests): sorted, each id reachable from its home, counts, sentinel.
    pub fn check(&self) -> Result<(), String> {
        if self.n_home == 0 {
            return if self.len == 0 { Ok(()) } else { Err("len without slots".into()) };
        }
        let mut prev = 0u64;
        let mut n = 0;
        let mut counts = vec![0u32; self.segs.len()];
        let (h, e) = (self.hs(), self.es());
        for i in 0..h.len() {
            let x = h[i];
            if x == 0 {
                continue;
            }
            n += 1;
            if x <= prev {
                return Err(format!("slot {i} out of order"));
            }
            prev = x;
            let home = self.home(x);
            if home > i || h[home..i].contains(&0) {
                return Err(format!("slot {i} not reachable from its home {home}"));
            }
            let s = e[i] >> OFF_BITS;
            if s != WIDE {
                counts[s as usize] += 1;
            }
        }
        if *h.last().unwrap() != 0 {
            return Err("sentinel occupied".into());
        }
        if n != self.len as usize {
            return Err(format!("len {} but {n} ids", self.len));
        }
        if counts.iter().zip(&self.segs).any(|(c, s)| *c != s.count) {
            return Err("segment counts".into());
        }
        Ok(())
    }
}

// ---- the Python face: the table itself (tests drive it beside operators/dedupe.py IdTable) ---------------
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

#[pyclass(name = "IdTable", module = "meterflow_native")]
pub struct PyIdTable {
    t: IdTable,
}

pub fn to_state(t: &IdTable) -> (Vec<u8>, Vec<u8>) {
    let (mut fps, mut exps) = (Vec::with_capacity(t.len() * 8), Vec::with_capacity(t.len() * 8));
    for (fp, e) in t.items() {
        fps.extend_from_slice(&fp.to_le_bytes());
        exps.extend_from_slice(&e.to_le_bytes());
    }
    (fps, exps)
}

pub fn from_state(fps: &[u8], exps: &[u8]) -> PyResult<IdTable> {
    if fps.len() != exps.len() || fps.len() % 8 != 0 {
        return Err(PyValueError::new_err("IdTable state: fingerprint and expiry byte strings differ in length"));
    }
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    let pairs: Vec<(u64, u64)> = fps.chunks_exact(8).map(word).zip(exps.chunks_exact(8).map(word)).collect();
    if pairs.iter().any(|p| p.0 == 0) {
        return Err(PyValueError::new_err("IdTable state holds a zero fingerprint"));
    }
    Ok(IdTable::from_pairs(pairs))
}

#[pymethods]
impl PyIdTable {
    #[new]
    fn py_new() -> Self {
        PyIdTable { t: IdTable::new() }
    }

    fn check_add(&mut self, fp: u64, expiry: u64, wm: i64) -> bool {
        self.t.check_add(fp, expiry, wm)
    }

    fn evict(&mut self, wm: i64) -> u64 {
        self.t.evict(wm)
    }

    fn min_expiry(&self) -> u64 {
        self.t.min_expiry()
    }

    fn get(&self, fp: u64) -> Option<u64> {
        self.t.get(fp)
    }

    fn __len__(&self) -> usize {
        self.t.len()
    }

    fn items(&self) -> Vec<(u64, u64)> {
        self.t.items().collect()
    }

    /// (fingerprints, expiries) as little-endian uint64 byte strings: operators/dedupe.py DedupeState's fields.
    fn to_state<'py>(&self, py: Python<'py>) -> (Bound<'py, PyBytes>, Bound<'py, PyBytes>) {
        let (f, e) = to_state(&self.t);
        (PyBytes::new(py, &f), PyBytes::new(py, &e))
    }

    #[staticmethod]
    fn from_state(fps: &[u8], exps: &[u8]) -> PyResult<Self> {
        Ok(PyIdTable { t: from_state(fps, exps)? })
    }

    /// Heap bytes of the table plus its struct.
    fn nbytes(&self) -> usize {
        self.t.heap_bytes() + std::mem::size_of::<IdTable>()
    }

    fn slots(&self) -> usize {
        self.t.slots()
    }

    fn wide(&self) -> usize {
        self.t.wide_len()
    }

    fn check(&self) -> PyResult<()> {
        self.t.check().map_err(PyValueError::new_err)
    }
}

/// ns per check and bytes per id of this table against `HashMap<u64, u64>` with the identity hash (what
/// BatchCore held before), over `n` random fingerprints in one table: the `new` pass inserts all (growth
/// included), the `dup` pass checks them all again.
#[pyfunction]
pub fn bench_dedupe<'py>(py: Python<'py>, n: usize, seed: u64) -> PyResult<Bound<'py, PyDict>> {
    use std::time::Instant;
    let mut s = seed;
    let fps: Vec<u64> = (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15); // splitmix64: XXH3 output is as uniform
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) | 1
        })
        .collect();
    let expiry: u64 = 1_796_086_800_000;
    let wm: i64 = 1_793_491_200_000;
    let d = PyDict::new(py);
    let ns = |t: std::time::Duration| t.as_nanos() as f64 / n.max(1) as f64;
    let mut t = IdTable::new();
    let t0 = Instant::now();
    let mut dup = 0usize;
    for &fp in &fps {
        dup += t.check_add(fp, expiry, wm) as usize;
    }
    let t_new = ns(t0.elapsed());
    let t0 = Instant::now();
    for &fp in &fps {
        dup += t.check_add(fp, expiry, wm) as usize;
    }
    let t_dup = ns(t0.elapsed());
    let bytes = t.heap_bytes() + std::mem::size_of::<IdTable>();
    let mut m: HashMap<u64, u64, BuildHasherDefault<Ident>> = HashMap::default();
    let mut mdup = 0usize;
    let mut pass = |m: &mut HashMap<u64, u64, BuildHasherDefault<Ident>>| {
        let t0 = Instant::now();
        for &fp in &fps {
            match m.get_mut(&fp) {
                Some(e) if *e as i64 >= wm => mdup += 1,
                Some(e) => *e = expiry,
                None => {
                    m.insert(fp, expiry);
                }
            }
        }
        ns(t0.elapsed())
    };
    let m_new = pass(&mut m); // every id new
    let m_dup = pass(&mut m); // every id a duplicate
    let buckets = if m.capacity() == 0 { 0 } else { (m.capacity() * 8 / 7).next_power_of_two() };
    let m_bytes = buckets * 17 + 16 + std::mem::size_of::<HashMap<u64, u64>>();
    if dup != n || mdup != n {
        return Err(PyValueError::new_err("bench_dedupe: duplicate counts differ"));
    }
    d.set_item("ids", n)?;
    d.set_item("table_new_ns", t_new)?;
    d.set_item("table_dup_ns", t_dup)?;
    d.set_item("table_bytes", bytes)?;
    d.set_item("table_slots", t.slots())?;
    d.set_item("hashmap_new_ns", m_new)?;
    d.set_item("hashmap_dup_ns", m_dup)?;
    d.set_item("hashmap_bytes", m_bytes)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Counts the bytes held by this thread's allocations (the test binary's allocator).
    struct Counting;
    thread_local! {
        static HELD: Cell<isize> = const { Cell::new(0) };
    }
    fn held() -> isize {
        HELD.with(|h| h.get())
    }
    fn count(d: isize) {
        let _ = HELD.try_with(|h| h.set(h.get() + d));
    }
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            count(l.size() as isize);
            System.alloc(l)
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            count(-(l.size() as isize));
            System.dealloc(p, l)
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            count(l.size() as isize);
            System.alloc_zeroed(l)
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
            count(n as isize - l.size() as isize);
            System.realloc(p, l, n)
        }
    }
    #[global_allocator]
    static A: Counting = Counting;

    fn rng(s: &mut u64) -> u64 {
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// operators/dedupe.py IdTable's semantics over a map (what the Python table does, minus its layout).
    #[derive(Default)]
    struct Model(std::collections::BTreeMap<u64, u64>);
    impl Model {
        fn check_add(&mut self, fp: u64, e: u64, wm: i64) -> bool {
            if fp == 0 {
                return false;
            }
            match self.0.get(&fp) {
                Some(&old) if alive(old, wm) => true,
                _ => {
                    self.0.insert(fp, e);
                    false
                }
            }
        }
        fn evict(&mut self, wm: i64) -> u64 {
            let least = self.0.values().copied().min().unwrap_or(NO_EXPIRY);
            if alive(least, wm) {
                return least;
            }
            self.0.retain(|_, e| alive(*e, wm));
            self.0.values().copied().min().unwrap_or(NO_EXPIRY)
        }
    }

    #[test]
    fn mix_is_a_bijection_with_zero_fixed() {
        let mut s = 7;
        assert_eq!(mix(0), 0);
        for _ in 0..100_000 {
            let v = rng(&mut s);
            assert_eq!(unmix(mix(v)), v);
        }
        for v in [1, 2, 3, u64::MAX, 1 << 63] {
            assert_eq!(unmix(mix(v)), v);
            assert_ne!(mix(v), 0);
        }
    }

    #[test]
    fn same_decisions_as_the_model() {
        let mut s = 1;
        for round in 0..40 {
            let mut t = IdTable::new();
            let mut m = Model::default();
            let pool: Vec<u64> = (0..(50 + round * 97))
                .map(|k| match k % 5 {
                    0 => rng(&mut s),
                    1 => (rng(&mut s) & 0xff) << 56,   // high bits only
                    2 => rng(&mut s) & 0xffff,         // small: low bits only
                    3 => (rng(&mut s) << 16) | 0x1234, // low bits all alike
                    _ => 0,
                })
                .collect();
            let mut wm: i64 = 1_000_000;
            for step in 0..(2_000 + round * 300) {
                let fp = pool[(rng(&mut s) % pool.len() as u64) as usize];
                let e = match rng(&mut s) % 6 {
                    0 => wm as u64 + rng(&mut s) % 10_000,
                    1 => wm as u64 + (1 << 28) * (rng(&mut s) % 40), // many segments: the side map
                    2 => rng(&mut s),                                // anywhere in u64
                    3 => (wm as u64).saturating_sub(rng(&mut s) % 5_000),
                    _ => 40_000_000 + (round as u64) * 3_000,
                };
                assert_eq!(t.check_add(fp, e, wm), m.check_add(fp, e, wm), "round {round} step {step}");
                wm += (rng(&mut s) % 300) as i64;
                if rng(&mut s) % 97 == 0 {
                    assert_eq!(t.evict(wm), m.evict(wm));
                }
                if step % 512 == 0 {
                    t.check().unwrap();
                }
            }
            t.check().unwrap();
            let mut got: Vec<(u64, u64)> = t.items().collect();
            got.sort();
            let want: Vec<(u64, u64)> = m.0.iter().map(|(&a, &b)| (a, b)).collect();
            assert_eq!(got, want);
            assert_eq!(t.min_expiry(), m.0.values().copied().min().unwrap_or(NO_EXPIRY));
            let back = IdTable::from_pairs(t.items());
            back.check().unwrap();
            let mut again: Vec<(u64, u64)> = back.items().collect();
            again.sort();
            assert_eq!(again, want);
            for (&fp, &e) in &m.0 {
                assert_eq!(t.get(fp), Some(e));
            }
        }
    }

    /// Bytes per id, from the allocator, after every insert up to 300,000 ids and every 1,000th up to 1M (every
    /// growth step included: right after a growth is where a table is emptiest): at most 16 from 1,000 ids on;
    /// heap_bytes agrees with the allocator; and after an eviction.
    #[test]
    fn at_most_16_bytes_per_id() {
        let mut s = 3;
        let base = held();
        let mut t = IdTable::new();
        let mut worst: f64 = 0.0;
        let mut worst_in = [0f64; 6]; // by decade of ids: 1.., 10.., 100.., ...
        for n in 1..=1_000_000usize {
            t.check_add(rng(&mut s) | 1, 2_000_000_000_000, 0);
            if n <= 300_000 || n % 1000 == 0 {
                let held = (held() - base) as usize;
                assert_eq!(held, t.heap_bytes(), "at {n} ids");
                let per = (held + std::mem::size_of::<IdTable>()) as f64 / n as f64;
                let d = (n as f64).log10() as usize;
                worst_in[d.min(5)] = worst_in[d.min(5)].max(per);
                if n >= 1000 {
                    worst = worst.max(per);
                    assert!(per <= 16.0, "{per:.2} B/id at {n} ids ({} slots)", t.slots());
                }
            }
        }
        eprintln!("worst bytes per id by decade of ids (1, 10, 100, 1K, 10K, 100K+): {worst_in:.2?}");
        assert_eq!(t.len(), 1_000_000);
        assert!(worst > 15.0, "worst {worst}");
        // after an eviction of half the ids, at the rebuilt size
        let mut u = IdTable::new();
        for k in 0..100_000u64 {
            u.check_add(rng(&mut s) | 1, if k % 2 == 0 { 10 } else { 1_000 }, 0);
        }
        drop(t);
        let before = held();
        assert_eq!(u.evict(500), 1_000);
        let after = held();
        assert!(after < before);
        assert!((u.heap_bytes() + std::mem::size_of::<IdTable>()) as f64 / u.len() as f64 <= 16.0);
        u.check().unwrap();
    }

    #[test]
    fn expiries_years_apart_stay_exact() {
        let mut t = IdTable::new();
        let mut m = Model::default();
        let mut s = 11;
        let year: u64 = 365 * 86_400_000;
        for k in 0..20_000u64 {
            let e = 1_800_000_000_000 + (k % 3) * year + (k % 17); // three periods' ends, years apart
            let fp = rng(&mut s) | 1;
            assert!(!t.check_add(fp, e, 5));
            m.check_add(fp, e, 5);
        }
        assert_eq!(t.wide_len(), 0, "three segments hold them");
        let mut got: Vec<_> = t.items().collect();
        got.sort();
        assert_eq!(got, m.0.iter().map(|(&a, &b)| (a, b)).collect::<Vec<_>>());
        assert_eq!(t.evict((1_800_000_000_000 + year) as i64), 1_800_000_000_000 + year);
        assert_eq!(t.len(), 20_000 - 6_667);
        t.check().unwrap();
    }
}
