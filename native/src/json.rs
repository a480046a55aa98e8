//! A strict scanner for one usage event (schemas/events.py `UsageEvent`), written for exactness first:
//! it accepts only lines that msgspec decodes to the same values, and answers `None` for anything it is
//! not sure of (then the line takes the Python path, which produces the exact event or dead letter).
//! Never a false accept; a false `None` only costs time.

/// A property value as msgspec decodes it (`str | int | float | bool | None`); ints outside i64 are `None`
/// from this scanner (the Python path handles them).
#[derive(Clone, Debug, PartialEq)]
pub enum Val<'a> {
    /// Borrowed from the line when it has no escapes (the common case: no allocation).
    Str(std::borrow::Cow<'a, str>),
    Int(i64),
    /// An int outside i64 (only from the Python path): minimal little-endian two's complement, and whether
    /// -1e300 < v < 1e300 (a metric's number).
    Big(Vec<u8>, bool),
    Float(f64),
    Bool(bool),
    Null,
}

impl Val<'_> {
    /// The same value owning its text (to keep in a row's state or a rule).
    pub fn to_static(&self) -> Val<'static> {
        match self {
            Val::Str(s) => Val::Str(std::borrow::Cow::Owned(s.as_ref().to_owned())),
            Val::Int(i) => Val::Int(*i),
            Val::Big(b, ok) => Val::Big(b.clone(), *ok),
            Val::Float(f) => Val::Float(*f),
            Val::Bool(b) => Val::Bool(*b),
            Val::Null => Val::Null,
        }
    }
}

pub enum Stamp<'a> {
    Text(std::borrow::Cow<'a, str>),
    Millis(i64),
}

pub struct Event<'a> {
    pub event_id: std::borrow::Cow<'a, str>,
    pub tenant_id: std::borrow::Cow<'a, str>,
    pub customer_id: std::borrow::Cow<'a, str>,
    pub event_type: std::borrow::Cow<'a, str>,
    pub timestamp: Stamp<'a>,
    pub props: Vec<(std::borrow::Cow<'a, str>, Val<'a>)>,
    /// The properties object's text when it is already what msgspec encodes for `props` (no whitespace, no
    /// escapes, no float, no "-0"): the raw archive copies it (mediate.rs `put_props_json` otherwise).
    pub props_raw: Option<&'a str>,
    pub correction: bool,
}

struct P<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

type R<T> = Option<T>;

impl<'a> P<'a> {
    #[inline]
    fn ws(&mut self) {
        // (the common case: no whitespace here)
        if self.b.get(self.i).is_some_and(|&c| c > b' ') {
            return;
        }
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    #[inline]
    fn peek(&self) -> R<u8> {
        self.b.get(self.i).copied()
    }
    #[inline]
    fn eat(&mut self, c: u8) -> R<()> {
        if self.peek()? == c {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    /// A JSON string at `i` (which holds the opening quote), borrowed when it has no escapes. Inline: the
    /// common string (its closing quote within the sixteen bytes after the opening one, nothing to unescape
    /// before it); any other string goes to `string_at` from the start.
    #[inline(always)]
    fn string(&mut self) -> R<std::borrow::Cow<'a, str>> {
        #[cfg(target_arch = "x86_64")]
        {
            let (b, i) = (self.b, self.i);
            if i + 17 <= b.len() && b[i] == b'"' {
                let m = special16(b, i + 1);
                if m != 0 {
                    let end = i + 1 + m.trailing_zeros() as usize;
                    if b[end] == b'"' {
                        self.i = end + 1;
                        // SAFETY: after an ASCII quote and at one: char boundaries of the str `s`
                        return Some(std::borrow::Cow::Borrowed(unsafe { self.s.get_unchecked(i + 1..end) }));
                    }
                }
            }
        }
        self.string_at()
    }

    /// `string`, every case.
    #[inline(never)]
    fn string_at(&mut self) -> R<std::borrow::Cow<'a, str>> {
        self.eat(b'"')?;
        let start = self.i;
        let b = self.b;
        let mut i = start;
        // sixteen bytes at a time (the common string: one step; exact for every byte)
        #[cfg(target_arch = "x86_64")]
        {
            let n = b.len();
            while i + 16 <= n {
                let m = special16(b, i);
                if m != 0 {
                    i += m.trailing_zeros() as usize;
                    if b[i] == b'"' {
                        self.i = i + 1;
                        // SAFETY: `start` follows an ASCII quote and `i` is at one: char boundaries of the str `s`
                        return Some(std::borrow::Cow::Borrowed(unsafe { self.s.get_unchecked(start..i) }));
                    }
                    break;
                }
                i += 16;
            }
            if i + 16 > n && n >= 16 && i < n {
                // the last bytes: the sixteen that end the line, less those before `i`
                let m = special16(b, n - 16) >> (i + 16 - n);
                if m != 0 {
                    i += m.trailing_zeros() as usize;
                    if b[i] == b'"' {
                        self.i = i + 1;
                        // SAFETY: as above
                        return Some(std::borrow::Cow::Borrowed(unsafe { self.s.get_unchecked(start..i) }));
                    }
                } else {
                    i = n; // (no closing quote: the loops below answer None)
                }
            }
        }
        // eight bytes at a time past the plain ones (the loop below decides every quote, escape, control byte)
        while i + 8 <= b.len() {
            let w = u64::from_le_bytes(b[i..i + 8].try_into().expect("eight bytes"));
            let m = special8(w);
            if m != 0 {
                i += (m.trailing_zeros() / 8) as usize;
                if b[i] == b'"' {
                    // (the lowest flagged byte is exact: the closing quote, no escape before it)
                    self.i = i + 1;
                    // SAFETY: `start` follows an ASCII quote and `i` is at one: char boundaries of the str `s`
                    return Some(std::borrow::Cow::Borrowed(unsafe { self.s.get_unchecked(start..i) }));
                }
                break;
            }
            i += 8;
        }
        while i < b.len() {
            let c = b[i];
            if c == b'"' {
                self.i = i + 1;
                return Some(std::borrow::Cow::Borrowed(&self.s[start..i]));
            }
            if c == b'\\' {
                break;
            }
            if c < 0x20 {
                return None;
            }
            i += 1;
        }
        let mut out = String::with_capacity(i - start + 8);
        out.push_str(&self.s[start..i]);
        loop {
            let c = *b.get(i)?;
            if c == b'"' {
                self.i = i + 1;
                return Some(std::borrow::Cow::Owned(out));
            }
            if c < 0x20 {
                return None;
            }
            if c == b'\\' {
                let e = *b.get(i + 1)?;
                i += 2;
                match e {
                    b'"' => out.push('"'),
                    b'\\' => out.push('\\'),
                    b'/' => out.push('/'),
                    b'b' => out.push('\u{8}'),
                    b'f' => out.push('\u{c}'),
                    b'n' => out.push('\n'),
                    b'r' => out.push('\r'),
                    b't' => out.push('\t'),
                    b'u' => {
                        let hi = hex4(b.get(i..i + 4)?)?;
                        i += 4;
                        let cp = if (0xD800..0xDC00).contains(&hi) {
                            // a surrogate pair; a lone surrogate is left to the Python path
                            if b.get(i) != Some(&b'\\') || b.get(i + 1) != Some(&b'u') {
                                return None;
                            }
                            let lo = hex4(b.get(i + 2..i + 6)?)?;
                            if !(0xDC00..0xE000).contains(&lo) {
                                return None;
                            }
                            i += 6;
                            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                        } else if (0xDC00..0xE000).contains(&hi) {
                            return None;
                        } else {
                            hi
                        };
                        out.push(char::from_u32(cp)?);
                    }
                    _ => return None,
                }
            } else {
                // copy one UTF-8 sequence (the line is valid UTF-8)
                let n = utf8_len(c);
                out.push_str(&self.s[i..i + n]);
                i += n;
            }
        }
    }

    /// A number literal: (is_integer, text). Strict JSON grammar.
    fn number(&mut self) -> R<(bool, &'a str)> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i)? {
            b'0' => i += 1,
            b'1'..=b'9' => {
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            _ => return None,
        }
        let mut int = true;
        if b.get(i) == Some(&b'.') {
            int = false;
            i += 1;
            if !b.get(i)?.is_ascii_digit() {
                return None;
            }
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
        if matches!(b.get(i), Some(b'e') | Some(b'E')) {
            int = false;
            i += 1;
            if matches!(b.get(i), Some(b'+') | Some(b'-')) {
                i += 1;
            }
            if !b.get(i)?.is_ascii_digit() {
                return None;
            }
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
        self.i = i;
        Some((int, &self.s[start..i]))
    }

    /// The common integer literal at `i` (`-?(0|[1-9][0-9]*)` of at most 18 digits, no fraction or exponent
    /// after it), summed as it is scanned; None (`i` unchanged) for any other text: `number` decides.
    #[inline(always)]
    fn small_int(&mut self) -> R<i64> {
        let b = self.b;
        let mut i = self.i;
        let neg = b.get(i) == Some(&b'-');
        i += neg as usize;
        let d0 = i;
        let mut v: i64 = 0;
        while let Some(&c) = b.get(i) {
            if !c.is_ascii_digit() || i - d0 == 18 {
                break;
            }
            v = v * 10 + (c - b'0') as i64;
            i += 1;
        }
        let n = i - d0;
        if n == 0 || (n > 1 && b[d0] == b'0') || matches!(b.get(i), Some(b'0'..=b'9' | b'.' | b'e' | b'E')) {
            return None;
        }
        self.i = i;
        Some(if neg { -v } else { v })
    }

    fn lit(&mut self, word: &[u8]) -> R<()> {
        if self.b.get(self.i..self.i + word.len())? == word {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// A scalar property value.
    fn value(&mut self) -> R<Val<'a>> {
        Some(match self.peek()? {
            b'"' => Val::Str(self.string()?),
            b't' => {
                self.lit(b"true")?;
                Val::Bool(true)
            }
            b'f' => {
                self.lit(b"false")?;
                Val::Bool(false)
            }
            b'n' => {
                self.lit(b"null")?;
                Val::Null
            }
            _ => {
                if let Some(v) = self.small_int() {
                    return Some(Val::Int(v));
                }
                let (int, text) = self.number()?;
                if int {
                    Val::Int(int_of(text)?)
                } else {
                    let f = text.parse::<f64>().ok()?;
                    if !f.is_finite() {
                        return None;
                    }
                    Val::Float(f)
                }
            }
        })
    }

    /// Skip any JSON value (an unknown field) inside a container at nesting `depth` (the event object: 1).
    /// Numbers with an exponent or many digits are left to Python, and so is a value that nests deeper than
    /// `MAX_DEPTH` (operators/mediate.py `too_deep`: for the well-formed lines this scanner accepts, its
    /// nesting depth is exactly the containers open here).
    fn skip(&mut self, depth: usize) -> R<()> {
        if matches!(self.peek()?, b'{' | b'[') && depth >= crate::MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'{' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.ws();
                    self.string()?;
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    self.skip(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.ws();
                    self.skip(depth + 1)?;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b't' => self.lit(b"true")?,
            b'f' => self.lit(b"false")?,
            b'n' => self.lit(b"null")?,
            _ => {
                let (_, text) = self.number()?;
                if text.len() > 15 || text.contains(['e', 'E']) {
                    return None;
                }
            }
        }
        Some(())
    }
}

/// The high bit of each byte of `w` that is '"', '\\' or below 0x20 (exact for the lowest such byte; a
/// byte above it may be flagged too).
#[inline]
fn special8(w: u64) -> u64 {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let q = w ^ (LO * b'"' as u64);
    let e = w ^ (LO * b'\\' as u64);
    (q.wrapping_sub(LO) & !q | e.wrapping_sub(LO) & !e | w.wrapping_sub(LO * 0x20) & !w) & HI
}

/// Bit k set when byte `b[i + k]` (k < 16) is '"', '\\' or below 0x20 (exact for every byte). Needs
/// `i + 16 <= b.len()`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn special16(b: &[u8], i: usize) -> u32 {
    use std::arch::x86_64::*;
    assert!(i + 16 <= b.len());
    // SAFETY: sixteen bytes in bounds (checked above); SSE2 is part of x86_64
    unsafe {
        let v = _mm_loadu_si128(b.as_ptr().add(i) as *const __m128i);
        let q = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let e = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        let low = _mm_set1_epi8(0x1f);
        let c = _mm_cmpeq_epi8(_mm_max_epu8(v, low), low); // (unsigned v <= 0x1f)
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(q, e), c)) as u32
    }
}

/// Which top-level field a key names (0: none of them), without a string comparison per field.
#[inline]
fn field(k: &[u8]) -> u8 {
    fn is<const N: usize>(k: &[u8], w: &[u8; N]) -> bool {
        <[u8; N]>::try_from(k).is_ok_and(|a| a == *w)
    }
    match k.len() {
        8 if is(k, b"event_id") => 1,
        8 if is(k, b"corrects") => 8,
        9 if is(k, b"tenant_id") => 2,
        9 if is(k, b"timestamp") => 5,
        10 if is(k, b"event_type") => 4,
        10 if is(k, b"properties") => 6,
        10 if is(k, b"correction") => 7,
        11 if is(k, b"customer_id") => 3,
        _ => 0,
    }
}

/// The value of an integer literal `number` accepted (`-?(0|[1-9][0-9]*)`), None outside i64.
#[inline]
fn int_of(text: &str) -> R<i64> {
    let b = text.as_bytes();
    let (neg, d) = match b.first() {
        Some(b'-') => (true, &b[1..]),
        _ => (false, b),
    };
    if d.is_empty() || d.len() > 18 {
        return text.parse::<i64>().ok(); // (19 digits and more may overflow)
    }
    let mut v: i64 = 0;
    for &c in d {
        v = v * 10 + (c - b'0') as i64;
    }
    Some(if neg { -v } else { v })
}

#[inline]
fn utf8_len(c: u8) -> usize {
    if c < 0x80 {
        1
    } else if c >= 0xF0 {
        4
    } else if c >= 0xE0 {
        3
    } else {
        2
    }
}

fn hex4(h: &[u8]) -> R<u32> {
    let mut v = 0u32;
    for &c in h {
        v = v * 16 + (c as char).to_digit(16)?;
    }
    Some(v)
}

/// Whether `b` is all ASCII: 16 bytes at a time (the common line), so UTF-8 validation runs only for a line
/// with a byte above 0x7f.
#[inline]
fn is_ascii(b: &[u8]) -> bool {
    const HI: u128 = 0x8080_8080_8080_8080_8080_8080_8080_8080;
    let word = |c: &[u8]| u128::from_le_bytes(c.try_into().expect("sixteen bytes"));
    if b.len() < 16 {
        return b.iter().all(|&c| c < 0x80);
    }
    let mut chunks = b.chunks_exact(16);
    for c in &mut chunks {
        if word(c) & HI != 0 {
            return false;
        }
    }
    // the last bytes within the last sixteen (which overlap the chunks)
    chunks.remainder().is_empty() || word(&b[b.len() - 16..]) & HI == 0
}

/// A line's properties: (key, value) in the line's order.
pub type Props<'a> = Vec<(std::borrow::Cow<'a, str>, Val<'a>)>;

/// An empty `Props` with the allocation of `v` (dropped first), for another line: a caller parsing line
/// after line hands each event's `props` back to the next `parse_event_with` and allocates no Vec per line.
pub fn recycle<'b>(mut v: Props<'_>) -> Props<'b> {
    v.clear();
    // (the same layout: the standard library collects this in place, keeping the capacity; were it not to,
    // the result is an empty Vec all the same)
    v.into_iter().map(|_| unreachable!("empty")).collect()
}

/// Decode one line as a `UsageEvent`, or `None` when the Python path must decide.
pub fn parse_event(raw: &[u8]) -> R<Event<'_>> {
    parse_event_with(raw, Vec::new())
}

/// `parse_event`, the properties in `spare` (an empty Vec, e.g. a `recycle`d one).
pub fn parse_event_with<'a>(raw: &'a [u8], spare: Props<'a>) -> R<Event<'a>> {
    let s = if is_ascii(raw) {
        // SAFETY: ASCII is valid UTF-8
        unsafe { std::str::from_utf8_unchecked(raw) }
    } else {
        std::str::from_utf8(raw).ok()? // (invalid UTF-8: the Python path's dead letter)
    };
    let mut p = P { s, b: raw, i: 0 };
    let mut ev_id = None;
    let mut tenant = None;
    let mut customer = None;
    let mut etype = None;
    let mut stamp = None;
    let mut spare = Some(spare);
    let mut props: Option<Props<'a>> = None;
    let mut props_raw: Option<&str> = None;
    let mut correction: Option<bool> = None;
    let mut corrects_seen = false;
    p.ws();
    p.eat(b'{')?;
    p.ws();
    if p.peek()? == b'}' {
        return None; // required fields missing
    }
    loop {
        p.ws();
        let key = p.string()?;
        p.ws();
        p.eat(b':')?;
        p.ws();
        match field(key.as_bytes()) {
            f @ 1..=4 => {
                let slot = match f {
                    1 => &mut ev_id,
                    2 => &mut tenant,
                    3 => &mut customer,
                    _ => &mut etype,
                };
                if slot.is_some() || p.peek()? != b'"' {
                    return None;
                }
                *slot = Some(p.string()?);
            }
            5 => {
                if stamp.is_some() {
                    return None;
                }
                if p.peek()? == b'"' {
                    stamp = Some(Stamp::Text(p.string()?));
                } else {
                    let (int, text) = p.number()?;
                    if !int {
                        return None;
                    }
                    let v = int_of(text)?;
                    if v < 0 {
                        return None;
                    }
                    stamp = Some(Stamp::Millis(v));
                }
            }
            6 => {
                if props.is_some() {
                    return None;
                }
                let open = p.i;
                p.eat(b'{')?;
                let mut out = spare.take().unwrap_or_default();
                out.clear(); // (empty already)
                out.reserve(8);
                // whether the text is msgspec's encoding of `out`: no whitespace skipped, no escape, ints
                // as i64 prints them
                let mut canon = true;
                let ws = |p: &mut P<'_>, canon: &mut bool| {
                    let at = p.i;
                    p.ws();
                    *canon &= p.i == at;
                };
                ws(&mut p, &mut canon);
                if p.peek()? == b'}' {
                    p.i += 1;
                } else {
                    loop {
                        ws(&mut p, &mut canon);
                        let k = p.string()?;
                        canon &= matches!(k, std::borrow::Cow::Borrowed(_));
                        ws(&mut p, &mut canon);
                        p.eat(b':')?;
                        ws(&mut p, &mut canon);
                        let at = p.i;
                        let v = p.value()?;
                        canon &= match &v {
                            Val::Str(t) => matches!(t, std::borrow::Cow::Borrowed(_)),
                            Val::Int(i) => *i != 0 || raw[at] != b'-',
                            Val::Bool(_) | Val::Null => true,
                            Val::Float(_) | Val::Big(..) => false,
                        };
                        if out.iter().any(|(have, _)| *have == k) {
                            return None; // a repeated key: msgspec keeps the last; not worth the fast path
                        }
                        out.push((k, v));
                        ws(&mut p, &mut canon);
                        match p.peek()? {
                            b',' => p.i += 1,
                            b'}' => {
                                p.i += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
                if canon {
                    props_raw = Some(&s[open..p.i]);
                }
                props = Some(out);
            }
            7 => {
                if correction.is_some() {
                    return None;
                }
                correction = Some(match p.peek()? {
                    b't' => {
                        p.lit(b"true")?;
                        true
                    }
                    b'f' => {
                        p.lit(b"false")?;
                        false
                    }
                    _ => return None,
                });
            }
            8 => {
                if corrects_seen {
                    return None;
                }
                corrects_seen = true;
                if p.peek()? == b'n' {
                    p.lit(b"null")?;
                } else {
                    p.string()?;
                }
            }
            _ => p.skip(1)?,
        }
        p.ws();
        match p.peek()? {
            b',' => p.i += 1,
            b'}' => {
                p.i += 1;
                break;
            }
            _ => return None,
        }
    }
    p.ws();
    if p.i != raw.len() {
        return None;
    }
    let event_id = ev_id?;
    // (at most 256 characters: a string of at most 256 bytes needs no count)
    if event_id.is_empty() || (event_id.len() > 256 && event_id.chars().count() > 256) {
        return None;
    }
    let tenant_id = tenant?;
    let customer_id = customer?;
    let event_type = etype?;
    if tenant_id.is_empty() || customer_id.is_empty() || event_type.is_empty() {
        return None;
    }
    let timestamp = stamp?;
    if let Stamp::Text(t) = &timestamp {
        if t.is_empty() || (t.len() > 64 && t.chars().count() > 64) {
            return None;
        }
    }
    Some(Event {
        event_id,
        tenant_id,
        customer_id,
        event_type,
        timestamp,
        props: props.or(spare).unwrap_or_default(),
        props_raw,
        correction: correction.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special8_finds_the_first_quote_escape_or_control_byte() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes().map(|c| match c % 7 {
                0 => b'"',
                1 => b'\\',
                2 => c % 0x20,
                _ => c | 0x20,
            });
            let w = u64::from_le_bytes(bytes);
            let want = bytes.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20);
            let m = special8(w);
            assert_eq!(if m == 0 { None } else { Some((m.trailing_zeros() / 8) as usize) }, want, "{bytes:?}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn special16_flags_every_quote_escape_and_control_byte() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..100_000 {
            let mut bytes = [0u8; 20];
            for c in bytes.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let r = (x >> 24) as u8;
                *c = match r % 9 {
                    0 => b'"',
                    1 => b'\\',
                    2 => r % 0x20,
                    3 => 0x20,
                    4 => 0x80 | r,
                    _ => r | 0x20,
                };
            }
            for at in 0..=4 {
                let want =
                    (0..16).filter(|&k| matches!(bytes[at + k], b'"' | b'\\' | 0..=0x1f)).fold(0, |m, k| m | 1 << k);
                assert_eq!(special16(&bytes, at), want, "{bytes:?} {at}");
            }
        }
    }

    #[test]
    fn a_string_ends_at_its_first_quote_wherever_it_lies() {
        // the quote, an escape or a control byte at every offset, in lines of every length around 16 bytes
        for pre in 0..40 {
            for len in 0..40 {
                let body = "a".repeat(len);
                let line = format!("{}\"{body}\"{}", " ".repeat(pre), "x".repeat(len % 5));
                let mut p = P { s: &line, b: line.as_bytes(), i: pre };
                assert_eq!(p.string().as_deref(), Some(body.as_str()), "{pre} {len}");
                assert_eq!(p.i, pre + len + 2);
                let open = format!("{}\"{body}", " ".repeat(pre));
                let mut p = P { s: &open, b: open.as_bytes(), i: pre };
                assert_eq!(p.string(), None, "unterminated {pre} {len}");
                for (tail, want) in
                    [("\\n\"", Some(format!("{body}\n"))), ("\\u00e9\"", Some(format!("{body}\u{e9}"))), ("\t\"", None)]
                {
                    let line = format!("{}\"{body}{tail}{}", " ".repeat(pre), "y".repeat(len % 3));
                    let mut p = P { s: &line, b: line.as_bytes(), i: pre };
                    assert_eq!(p.string().map(|c| c.into_owned()), want, "{pre} {len} {tail:?}");
                }
            }
        }
    }

    #[test]
    fn recycled_props_keep_their_allocation_and_the_next_line_parses_the_same() {
        let a = br#"{"event_id":"e","tenant_id":"t","customer_id":"c","event_type":"x","timestamp":1,"properties":{"k":"v","n":2}}"#;
        let b = br#"{"event_id":"f","tenant_id":"t","customer_id":"c","event_type":"x","timestamp":2,"properties":{"m":true}}"#;
        let first = parse_event(a).expect("a line");
        let cap = first.props.capacity();
        let spare = recycle(first.props);
        assert!(spare.is_empty() && spare.capacity() == cap && cap >= 8);
        let second = parse_event_with(b, spare).expect("a line");
        assert_eq!(second.props, parse_event(b).expect("a line").props);
        assert_eq!(second.props.capacity(), cap);
        let none = br#"{"event_id":"g","tenant_id":"t","customer_id":"c","event_type":"x","timestamp":3}"#;
        let third = parse_event_with(none, recycle(second.props)).expect("a line");
        assert!(third.props.is_empty());
    }

    #[test]
    fn a_small_int_is_what_number_and_int_of_read() {
        let mut texts: Vec<String> = ["0", "-0", "7", "-7", "01", "-01", "00", "-", "1.5", "1e3", "1E3", "2.", "-x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut v: i64 = 1;
        for _ in 0..19 {
            texts.extend([v.to_string(), (-v).to_string(), (v - 1).to_string(), (v * 9 / 7).to_string()]);
            v = v.saturating_mul(10);
        }
        texts.extend(["9223372036854775807", "-9223372036854775808", "9223372036854775808"].map(String::from));
        for t in texts {
            for tail in ["", ",", "}", " ", "]"] {
                let line = format!("{t}{tail}");
                let mut fast = P { s: &line, b: line.as_bytes(), i: 0 };
                let mut slow = P { s: &line, b: line.as_bytes(), i: 0 };
                let want = slow.number().and_then(|(int, text)| if int { int_of(text) } else { None });
                match fast.small_int() {
                    Some(got) => {
                        assert_eq!(Some(got), want, "{line:?}");
                        assert_eq!(fast.i, slow.i, "{line:?}");
                    }
                    None => assert_eq!(fast.i, 0, "{line:?}"), // (left to number)
                }
                let mut p = P { s: &line, b: line.as_bytes(), i: 0 };
                let mut q = P { s: &line, b: line.as_bytes(), i: 0 };
                let via_value = p.value();
                let old = q.number().and_then(|(int, text)| {
                    if int {
                        int_of(text).map(Val::Int)
                    } else {
                        text.parse::<f64>().ok().filter(|f| f.is_finite()).map(Val::Float)
                    }
                });
                assert_eq!(via_value, old, "{line:?}");
                if via_value.is_some() {
                    assert_eq!(p.i, q.i, "{line:?}");
                }
            }
        }
    }

    #[test]
    fn int_of_is_str_parse() {
        let mut cases: Vec<String> = ["0", "-0", "7", "-7", "9223372036854775807", "-9223372036854775808"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        cases.extend(["9223372036854775808", "-9223372036854775809", "99999999999999999999"].map(String::from));
        let mut v: u64 = 1;
        for _ in 0..20 {
            cases.push(v.to_string());
            cases.push(format!("-{v}"));
            cases.push((v - 1).to_string());
            v = v.wrapping_mul(10);
        }
        for c in cases {
            assert_eq!(int_of(&c), c.parse::<i64>().ok(), "{c}");
        }
    }

    #[test]
    fn is_ascii_finds_a_high_byte_anywhere() {
        for n in 0..80 {
            let line = vec![b'a'; n];
            assert!(is_ascii(&line), "{n}");
            for at in 0..n {
                for hi in [0x80u8, 0xC3, 0xFF] {
                    let mut l = line.clone();
                    l[at] = hi;
                    assert!(!is_ascii(&l), "{n} {at}");
                }
            }
        }
    }

    #[test]
    fn invalid_utf8_after_a_long_ascii_prefix_is_left_to_python_and_valid_utf8_is_read() {
        for pad in [0usize, 1, 15, 16, 17, 40, 200] {
            let line = |tail: &[u8]| {
                let mut l = format!(
                    r#"{{"event_id":"e","tenant_id":"t","customer_id":"c","event_type":"x","timestamp":1,"properties":{{"p":"{}"#,
                    "a".repeat(pad)
                )
                .into_bytes();
                l.extend_from_slice(tail);
                l.extend_from_slice(b"\"}}");
                l
            };
            assert!(parse_event(&line(b"")).is_some());
            let good = line("\u{e9}\u{2028}".as_bytes());
            let ok = parse_event(&good).expect("valid UTF-8");
            assert_eq!(ok.props[0].1, Val::Str(format!("{}\u{e9}\u{2028}", "a".repeat(pad)).into()));
            for bad in [&b"\xff"[..], b"\xc3", b"\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"] {
                assert!(parse_event(&line(bad)).is_none(), "{pad} {bad:?}");
            }
        }
    }

    #[test]
    fn a_value_nested_past_max_depth_is_left_to_python() {
        let line = |d: usize| {
            format!(
                r#"{{"event_id":"e","tenant_id":"t","customer_id":"c","event_type":"x","timestamp":1,"u":{}{}}}"#,
                "[".repeat(d),
                "]".repeat(d)
            )
        };
        assert!(parse_event(line(crate::MAX_DEPTH - 1).as_bytes()).is_some()); // the event object is level 1
        assert!(parse_event(line(crate::MAX_DEPTH).as_bytes()).is_none());
        let brackets = format!(
            r#"{{"event_id":"{}","tenant_id":"t","customer_id":"c","event_type":"x","timestamp":1}}"#,
            "[{".repeat(100)
        );
        assert!(parse_event(brackets.as_bytes()).is_some()); // brackets inside a string do not nest
    }
}
