//! Anomaly detection on the native fold (issue 16): the current UTC-day cell of each anomaly metric of a
//! customer, as operators/anomaly.py `Anomalies.cur` holds it (`[day, usage_d, level]`), kept here while the
//! customer folds natively. Per event of an anomaly metric (after dedupe, exclusions, too_late, `where`,
//! missing_property and ignored corrections, exactly where `CustomerMeter._fold` adds to its cell): one add and
//! one comparison with the day's level, as the Python fold does; the value keeps Python's type and arithmetic
//! (int + int stays an exact int, anything with a float is a float, IEEE addition, int-to-float rounded to
//! nearest even as CPython's `PyLong_AsDouble`).
//!
//! The fold stops (`Stop::Anom`, `take_stops`) for Python, without adding, at an event whose add would bring
//! the cell to its level, at an event of another day than the cell's (or with no cell yet), and at an add this
//! module does not make exactly (an int beyond 64 bits, an int sum beyond 128 bits): operators/native.py
//! `NativeMeters._anomaly` then runs `Anomalies.cell`/`check` as `CustomerMeter._fold` does and gives the
//! cell back (`set_cell`). The cell values folded here are mirrored into `Anomalies.cur` (`take_cells` at
//! each sync, `cells` before a snapshot and a release), so snapshots, markers and the Python fold see them.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt};

use crate::json::Val;

pub(crate) const DAY_MS: i64 = 86_400_000;
const NO_DAY: i64 = i64::MIN; // no cell: the next event of the metric stops

/// Where the fold stops for Python: a period that reached its level (lib.rs `Levels`), or an anomaly cell.
pub(crate) enum Stop {
    Level(crate::PKey),
    Anom(u32),
}

/// A cell's usage as the Python cell holds it: an int, a float, or a value only Python holds (Opaque: an int
/// beyond 128 bits; every event of the metric stops while the cell is current).
#[derive(Clone, Copy)]
pub(crate) enum Num {
    Int(i128),
    Float(f64),
    Opaque,
}

impl Num {
    pub(crate) fn to_py(self, py: Python<'_>) -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(match self {
            Num::Int(i) => Some(i.into_pyobject(py)?.into_any()),
            Num::Float(f) => Some(PyFloat::new(py, f).into_any()),
            Num::Opaque => None,
        })
    }

    pub(crate) fn from_py(v: &Bound<'_, PyAny>) -> PyResult<Num> {
        if v.is_none() || v.cast::<PyBool>().is_ok() {
            return Ok(Num::Opaque);
        }
        if v.is_instance_of::<PyInt>() {
            return Ok(v.extract::<i128>().map_or(Num::Opaque, Num::Int));
        }
        if let Ok(f) = v.cast::<PyFloat>() {
            return Ok(Num::Float(f.value()));
        }
        Ok(Num::Opaque)
    }
}

/// Python's `a >= level` of an int and a float, exactly (NaN: False).
fn int_ge(a: i128, level: f64) -> bool {
    const TWO_127: f64 = 170_141_183_460_469_231_731_687_303_715_884_105_728.0;
    if level.is_nan() {
        false
    } else if level >= TWO_127 {
        false // (inf too)
    } else if level < -TWO_127 {
        true
    } else {
        a >= level.ceil() as i128
    }
}

pub(crate) struct Cell {
    pub(crate) day: i64,
    pub(crate) val: Num,
    pub(crate) level: f64,
    pub(crate) mirror: bool, // the cell is `Anomalies.cur[code]` (not a throwaway cell of a day not kept)
    pub(crate) dirty: bool,  // added to since the last `take_cells` (it is in BatchCore.anom_changed)
}

impl Cell {
    fn none() -> Cell {
        Cell { day: NO_DAY, val: Num::Int(0), level: f64::INFINITY, mirror: false, dirty: false }
    }
}

/// The anomaly cells of one customer, by metric index (None: not an anomaly metric).
pub(crate) struct Cells {
    pub(crate) by_metric: Vec<Option<Cell>>,
}

/// What `Cells::step` did.
pub(crate) enum Step {
    Nothing,
    Stop,
    Added { first: bool },
}

impl Cells {
    pub(crate) fn new(n_metrics: usize, metrics: &[u32]) -> Cells {
        let mut by_metric: Vec<Option<Cell>> = (0..n_metrics).map(|_| None).collect();
        for &mi in metrics {
            by_metric[mi as usize] = Some(Cell::none());
        }
        Cells { by_metric }
    }

    /// `CustomerMeter._fold`'s `acell[1] += sign if v is None else sign * v` and `acell[1] >= acell[2]` for
    /// metric `mi` (`v`: the property value of a sum, None for a count), or a stop for Python.
    #[inline]
    pub(crate) fn step(&mut self, mi: u32, ts: i64, sign: i64, v: Option<&Val>) -> Step {
        let Some(Some(c)) = self.by_metric.get_mut(mi as usize) else { return Step::Nothing };
        if ts.div_euclid(DAY_MS) != c.day {
            return Step::Stop;
        }
        let new = match (c.val, v) {
            (Num::Opaque, _) => return Step::Stop,
            (Num::Int(a), None) => match a.checked_add(sign as i128) {
                Some(s) => Num::Int(s),
                None => return Step::Stop,
            },
            (Num::Int(a), Some(Val::Int(i))) => match a.checked_add(sign as i128 * *i as i128) {
                Some(s) => Num::Int(s),
                None => return Step::Stop,
            },
            (Num::Int(a), Some(Val::Float(f))) => Num::Float(a as f64 + sign as f64 * f),
            (Num::Float(x), None) => Num::Float(x + sign as f64),
            (Num::Float(x), Some(Val::Int(i))) => Num::Float(x + (sign as i128 * *i as i128) as f64),
            (Num::Float(x), Some(Val::Float(f))) => Num::Float(x + sign as f64 * f),
            _ => return Step::Stop, // an int beyond 64 bits: Python adds it
        };
        let reached = match new {
            Num::Int(a) => int_ge(a, c.level),
            Num::Float(x) => x >= c.level,
            Num::Opaque => true,
        };
        if reached {
            return Step::Stop;
        }
        c.val = new;
        let first = !c.dirty;
        c.dirty = true;
        Step::Added { first }
    }

    pub(crate) fn cell(&self, mi: u32) -> Option<&Cell> {
        self.by_metric.get(mi as usize).and_then(|c| c.as_ref())
    }

    pub(crate) fn cell_mut(&mut self, mi: u32) -> Option<&mut Cell> {
        self.by_metric.get_mut(mi as usize).and_then(|c| c.as_mut())
    }

    /// The value to mirror into `Anomalies.cur` (None: nothing to mirror).
    pub(crate) fn mirrored(&self, mi: u32) -> Option<(i64, Num)> {
        match self.cell(mi) {
            Some(c) if c.mirror && !matches!(c.val, Num::Opaque) => Some((c.day, c.val)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_against_float_levels_exactly() {
        assert!(int_ge(3, 2.5) && int_ge(3, 3.0) && !int_ge(3, 3.0000001));
        assert!(!int_ge(i128::MAX, f64::INFINITY) && int_ge(i128::MIN, f64::NEG_INFINITY));
        assert!(!int_ge(0, f64::NAN) && int_ge(-2, -2.5) && !int_ge(-3, -2.5));
        assert!(int_ge(1 << 100, 1.2676506002282294e30) && !int_ge((1 << 100) - 1, 1.2676506002282294e30));
    }

    #[test]
    fn the_cell_adds_as_python_and_stops_at_its_level() {
        let mut cells = Cells::new(2, &[1]);
        assert!(matches!(cells.step(0, 0, 1, None), Step::Nothing));
        assert!(matches!(cells.step(1, 5, 1, None), Step::Stop)); // no cell yet
        let c = cells.cell_mut(1).unwrap();
        c.day = 0;
        c.level = 2.5;
        c.mirror = true;
        assert!(matches!(cells.step(1, 5, 1, Some(&Val::Int(2))), Step::Added { first: true }));
        assert!(matches!(cells.step(1, 5, -1, None), Step::Added { first: false }));
        assert!(matches!(cells.step(1, 5, 1, Some(&Val::Float(0.25))), Step::Added { .. }));
        assert!(matches!(cells.cell(1).unwrap().val, Num::Float(f) if f == 1.25));
        assert!(matches!(cells.step(1, 5, 1, Some(&Val::Float(1.25))), Step::Stop)); // 2.5 >= 2.5: not added
        assert!(matches!(cells.cell(1).unwrap().val, Num::Float(f) if f == 1.25));
        assert!(matches!(cells.step(1, DAY_MS, 1, None), Step::Stop)); // another day
    }
}
