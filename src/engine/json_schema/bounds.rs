//! `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` and `multipleOf` on numbers
//! and integers: after each byte the checker asks whether some completion of the number written
//! so far still lies within the bounds (and is a multiple), so a bounded number never reaches a
//! dead end.
//!
//! Bounded numbers are plain decimals (no exponent) of at most [`MAX_BOUNDED_DIGITS`] digits in
//! all. That cap makes decimal and floating-point comparison agree: two different decimals of
//! at most 15 significant digits are two different doubles in the same order, so a validator
//! comparing floats (Pydantic, Python's `jsonschema`) reaches the same verdict as this exact
//! decimal arithmetic. All values then sit on a grid of 10⁻¹⁵, held as `i128` units.

use serde_json::{Map, Number, Value};

/// Most digits of a bounded number, integer and fraction together (a leading `0.` not counted).
pub const MAX_BOUNDED_DIGITS: u32 = 15;
/// Units per 1.
const UNIT: i128 = 10i128.pow(MAX_BOUNDED_DIGITS);
/// Beyond every reachable magnitude (< 10¹⁵ · UNIT).
const FAR: i128 = UNIT * UNIT * 10;

pub(super) const KEYWORDS: [&str; 5] = [
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];

/// Inclusive bounds, in units of 10⁻¹⁵.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Bounds {
    pub(super) integer: bool,
    lo: i128,
    hi: i128,
    /// `multipleOf`, in units (1: any value on the grid).
    multiple: i128,
}

/// A bounded number written so far: its sign, integer digits and fraction digits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct NumPrefix {
    neg: bool,
    int: u64,
    /// Integer digits written (0 right after `-`).
    n: u8,
    dot: bool,
    frac: u64,
    f: u8,
}

/// What one more byte does to a bounded number.
pub(super) enum NumStep {
    /// The byte is part of the number, and the bounds can still be met.
    Continue(NumPrefix),
    /// The byte is not part of the number, which is whole and within the bounds: it ended.
    Ended,
    Refused,
}

fn pow10(e: u32) -> i128 {
    10i128.pow(e)
}

fn gcd(a: i128, b: i128) -> i128 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Whether the grid of step `step` (multiples of it) has a point in `[lo, hi]` and in
/// `[start, end)` that is also a multiple of `multiple`.
fn hits(lo: i128, hi: i128, start: i128, end: i128, step: i128, multiple: i128) -> bool {
    // A step past every reachable value leaves only 0 on the grid.
    let step = (step / gcd(step, multiple))
        .checked_mul(multiple)
        .map_or(FAR * 10, |s| s.min(FAR * 10));
    let from = lo.max(start);
    let x = from.div_euclid(step) * step + if from.rem_euclid(step) == 0 { 0 } else { step };
    x < end && x <= hi
}

impl NumPrefix {
    /// Digits counted against [`MAX_BOUNDED_DIGITS`].
    fn digits(&self) -> u32 {
        let int = if self.n == 1 && self.int == 0 {
            0
        } else {
            u32::from(self.n)
        };
        int + u32::from(self.f)
    }

    fn magnitude(&self) -> i128 {
        i128::from(self.int) * UNIT
            + i128::from(self.frac) * pow10(MAX_BOUNDED_DIGITS - u32::from(self.f))
    }

    /// A whole number (digits after a dot, if any).
    pub(super) fn can_end(&self) -> bool {
        self.n > 0 && (!self.dot || self.f > 0)
    }

    pub(super) fn in_range(&self, b: &Bounds) -> bool {
        let m = self.magnitude();
        let v = if self.neg { -m } else { m };
        self.can_end() && b.lo <= v && v <= b.hi && v % b.multiple == 0
    }

    /// Whether some completion lies within the bounds.
    fn reachable(&self, b: &Bounds) -> bool {
        // Bounds on the magnitude: v = -m for a negative number.
        let (lo, hi) = if self.neg {
            (0.max(-b.hi), -b.lo)
        } else {
            (0.max(b.lo), b.hi)
        };
        if hi < lo {
            return false;
        }
        if self.n == 0 {
            // Only `-` so far: any first digit.
            return (0..=9u64).any(|d| {
                NumPrefix {
                    int: d,
                    n: 1,
                    ..*self
                }
                .reachable(b)
            });
        }
        let budget = MAX_BOUNDED_DIGITS.saturating_sub(self.digits());
        let frac_step = |digits: u32| pow10(MAX_BOUNDED_DIGITS - digits);
        if self.dot {
            if self.f == 0 && budget == 0 {
                return false;
            }
            let base = self.magnitude();
            let f = u32::from(self.f);
            let end = base + frac_step(f);
            return hits(lo, hi, base, end, frac_step(f + budget), b.multiple);
        }
        let int = i128::from(self.int);
        if self.n == 1 && self.int == 0 {
            // `0`, or `0.` and up to all the digits as fraction.
            let step = if b.integer { UNIT } else { 1 };
            let end = if b.integer { 1 } else { UNIT };
            return hits(lo, hi, 0, end, step, b.multiple);
        }
        // More integer digits (j of them), then a fraction with the digits left.
        (0..=budget).any(|j| {
            let r = if b.integer { 0 } else { budget - j };
            let start = int * pow10(j) * UNIT;
            let end = (int + 1) * pow10(j) * UNIT;
            hits(lo, hi, start, end, frac_step(r), b.multiple)
        })
    }

    /// The first byte of a bounded number.
    pub(super) fn start(b: u8, bounds: &Bounds) -> Option<NumPrefix> {
        let p = match b {
            b'-' => NumPrefix {
                neg: true,
                ..NumPrefix::default()
            },
            b'0'..=b'9' => NumPrefix {
                int: u64::from(b - b'0'),
                n: 1,
                ..NumPrefix::default()
            },
            _ => return None,
        };
        p.reachable(bounds).then_some(p)
    }

    pub(super) fn step(&self, b: u8, bounds: &Bounds) -> NumStep {
        let next = match b {
            b'0'..=b'9' if !self.dot => {
                if self.n == 1 && self.int == 0 {
                    // A leading zero takes no more integer digits.
                    return self.end(bounds);
                }
                NumPrefix {
                    int: self.int * 10 + u64::from(b - b'0'),
                    n: self.n + 1,
                    ..*self
                }
            }
            b'0'..=b'9' => NumPrefix {
                frac: self.frac * 10 + u64::from(b - b'0'),
                f: self.f + 1,
                ..*self
            },
            b'.' if !self.dot && !bounds.integer && self.n > 0 => NumPrefix { dot: true, ..*self },
            _ => return self.end(bounds),
        };
        if next.digits() > MAX_BOUNDED_DIGITS || !next.reachable(bounds) {
            return NumStep::Refused;
        }
        NumStep::Continue(next)
    }

    fn end(&self, bounds: &Bounds) -> NumStep {
        if self.in_range(bounds) {
            NumStep::Ended
        } else {
            NumStep::Refused
        }
    }
}

/// A schema number on the grid: the nearest units below and above, and whether it sits on it.
/// The number's shortest decimal text is used (what the schema's author wrote, e.g. `0.1`),
/// not its binary value.
struct Units {
    floor: i128,
    ceil: i128,
    exact: bool,
}

fn units(n: &Number) -> Units {
    let text = match (n.as_i64(), n.as_u64(), n.as_f64()) {
        (Some(i), _, _) => i.to_string(),
        (_, Some(u), _) => u.to_string(),
        // Rust prints an f64 as its shortest round-trip decimal, never with an exponent.
        (_, _, Some(f)) => format!("{f}"),
        _ => "0".to_string(),
    };
    let (neg, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let int = int.trim_start_matches('0');
    if int.len() > 16 {
        let far = if neg { -FAR } else { FAR };
        return Units {
            floor: far,
            ceil: far,
            exact: false,
        };
    }
    let int: i128 = if int.is_empty() {
        0
    } else {
        int.parse().unwrap_or(0)
    };
    let kept = &frac[..frac.len().min(MAX_BOUNDED_DIGITS as usize)];
    let rest_nonzero = frac.len() > kept.len() && frac[kept.len()..].bytes().any(|c| c != b'0');
    let kept_units: i128 = if kept.is_empty() {
        0
    } else {
        kept.parse::<i128>().unwrap_or(0) * pow10(MAX_BOUNDED_DIGITS - kept.len() as u32)
    };
    let q = int * UNIT + kept_units;
    // x = ±(q + ε) with 0 ≤ ε < 1 unit, ε > 0 iff rest_nonzero.
    let (floor, ceil) = match (neg, rest_nonzero) {
        (false, false) => (q, q),
        (true, false) => (-q, -q),
        (false, true) => (q, q + 1),
        (true, true) => (-q - 1, -q),
    };
    Units {
        floor,
        ceil,
        exact: !rest_nonzero,
    }
}

/// The bounds a schema object sets, if any: `Ok(None)` when it sets none.
pub(super) fn parse(
    obj: &Map<String, Value>,
    integer: bool,
    at: &str,
) -> Result<Option<Bounds>, (String, String)> {
    if !KEYWORDS.iter().any(|k| obj.contains_key(*k)) {
        return Ok(None);
    }
    let mut lo = -FAR;
    let mut hi = FAR;
    let mut multiple = 1;
    for key in KEYWORDS {
        let Some(v) = obj.get(key) else { continue };
        let Value::Number(n) = v else {
            return Err((format!("{at}/{key}"), "must be a number".into()));
        };
        let u = units(n);
        let strict = key.starts_with("exclusive");
        match key {
            "multipleOf" => {
                if !u.exact || u.floor <= 0 || u.floor >= FAR {
                    return Err((
                        format!("{at}/{key}"),
                        format!(
                            "must be a positive number of at most {MAX_BOUNDED_DIGITS} decimals"
                        ),
                    ));
                }
                multiple = u.floor;
            }
            // Rounded toward the inside of the range.
            "minimum" | "exclusiveMinimum" => {
                lo = lo.max(if strict && u.exact {
                    u.ceil + 1
                } else {
                    u.ceil
                });
            }
            _ => {
                hi = hi.min(if strict && u.exact {
                    u.floor - 1
                } else {
                    u.floor
                })
            }
        }
    }
    let bounds = Bounds {
        integer,
        lo,
        hi,
        multiple,
    };
    let any = NumPrefix::start(b'-', &bounds).is_some()
        || (b'0'..=b'9').any(|d| NumPrefix::start(d, &bounds).is_some());
    if !any {
        let what = if integer { "integer" } else { "number" };
        return Err((
            at.to_string(),
            format!(
                "no {what} of at most {MAX_BOUNDED_DIGITS} digits lies within the bounds \
                 (a multiple of `multipleOf`, if given)"
            ),
        ));
    }
    Ok(Some(bounds))
}
