//! RFC 3339 timestamps and billing periods, as base/timeutil.py and base/periods.py compute them.
//! The timestamp parser accepts one strict form (`YYYY-MM-DD[Tt ]HH:MM:SS[.digits](Z|z|+HH:MM|-HH:MM)`)
//! and answers `None` for anything else: the Python parser then decides (it accepts more forms).

pub const DAY_MS: i64 = 86_400_000;

pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

pub fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 => {
            if leap(y) {
                29
            } else {
                28
            }
        }
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[inline]
fn d2(b: &[u8], i: usize) -> Option<i64> {
    let (a, c) = (b[i], b[i + 1]);
    if a.is_ascii_digit() && c.is_ascii_digit() {
        Some(((a - b'0') * 10 + (c - b'0')) as i64)
    } else {
        None
    }
}

/// Epoch ms of the strict RFC 3339 form (fraction truncated to the millisecond), or None.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let y = d2(b, 0)? * 100 + d2(b, 2)?;
    let mo = d2(b, 5)?;
    let d = d2(b, 8)?;
    let h = d2(b, 11)?;
    let mi = d2(b, 14)?;
    let s = d2(b, 17)?;
    if y < 1 || !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                frac_ms = frac_ms * 10 + (b[i] - b'0') as i64;
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..3 {
            frac_ms *= 10;
        }
    }
    let offset_ms = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = d2(b, i + 1)?;
            let om = d2(b, i + 4)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 60 + om) * 60_000;
            if *c == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * DAY_MS + ((h * 60 + mi) * 60 + s) * 1000 + frac_ms - offset_ms)
}

#[derive(Clone, Copy)]
pub enum Kind {
    Days(i64),
    Months(i64),
}

/// A subscription's period rule: the kind and the anchor (its civil parts for month arithmetic).
#[derive(Clone, Copy)]
pub struct PeriodRule {
    pub kind: Kind,
    pub anchor_ms: i64,
    ay: i64,
    am: i64,
    ad: i64,
    atod: i64,
}

impl PeriodRule {
    pub fn new(kind: &str, anchor_ms: i64) -> Option<PeriodRule> {
        let kind = match kind {
            "day" => Kind::Days(1),
            "week" => Kind::Days(7),
            "month" => Kind::Months(1),
            "quarter" => Kind::Months(3),
            "year" => Kind::Months(12),
            _ => return None,
        };
        let days = anchor_ms.div_euclid(DAY_MS);
        let (ay, am, ad) = civil_from_days(days);
        Some(PeriodRule { kind, anchor_ms, ay, am, ad, atod: anchor_ms.rem_euclid(DAY_MS) })
    }

    fn add_months(&self, months: i64) -> Option<i64> {
        let total = self.ay * 12 + (self.am - 1) + months;
        let year = total.div_euclid(12);
        let m = total.rem_euclid(12) + 1;
        if !(1..=9999).contains(&year) {
            return None; // datetime.replace raises ValueError
        }
        let day = self.ad.min(days_in_month(year, m));
        Some(days_from_civil(year, m, day) * DAY_MS + self.atod)
    }

    /// base.periods.period_bounds: [start, end) of the period holding `ts`; None where Python raises.
    pub fn bounds(&self, ts: i64) -> Option<(i64, i64)> {
        match self.kind {
            Kind::Days(n) => {
                let len = n * DAY_MS;
                let start = self.anchor_ms + (ts - self.anchor_ms).div_euclid(len) * len;
                Some((start, start + len))
            }
            Kind::Months(step) => {
                let (ty, tm, _) = civil_from_days(ts.div_euclid(DAY_MS));
                let mut k = ((ty - self.ay) * 12 + (tm - self.am)).div_euclid(step);
                let mut first = self.add_months(k * step)?;
                while first > ts {
                    k -= 1;
                    first = self.add_months(k * step)?;
                }
                let mut after = self.add_months((k + 1) * step)?;
                while after <= ts {
                    k += 1;
                    first = after;
                    after = self.add_months((k + 1) * step)?;
                }
                Some((first, after))
            }
        }
    }
}
