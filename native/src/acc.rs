//! count and sum accumulators, exact as operators/aggregate.py: a count adds the sign; a sum adds ints
//! exactly (i128, then the fixed-point part for ints beyond it) and floats as exact integer multiples of
//! 2**-1074 (`fscaled`, a 2304-bit two's-complement integer), so the value is order-independent.

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
    pub reported: u64, // the last take_changes round that listed this row
}

impl Acc {
    pub fn new() -> Acc {
        Acc { events: 0, total: 0, fixed: None, reported: 0 }
    }
    /// The value as f64, approximately, and a bound of its error: the exact value (rounded as
    /// SumAcc.value) lies within `tol` of `v`.
    pub fn approx(&self) -> (f64, f64) {
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
