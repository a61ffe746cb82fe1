//! Bounds on every number and text a file or a user controls, checked before any work.
//!
//! Each bound is far above what a sensible run uses and low enough that no accepted value
//! can exhaust memory or run for days: a spec that asks for 10^12 Adam steps, a 10 MB subject
//! or a NaN learning rate is refused up front, naming the field and the allowed range, instead
//! of hanging or failing deep inside the maths. The README's validation table lists them.

/// A field and why its value is refused; callers wrap it in their error with the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Bad {
    pub field: String,
    pub reason: String,
}

impl Bad {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Bad {
        Bad {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// A bound broken by a flag or a library argument: [`crate::Error::InvalidArgument`] naming
/// the field (specs and requests wrap [`Bad`] with their file instead).
impl From<Bad> for crate::Error {
    fn from(b: Bad) -> Self {
        crate::Error::invalid(b.field, b.reason)
    }
}

/// Checks return this.
pub type Check = std::result::Result<(), Bad>;

/// Longest text field (prompt, subject, target, paraphrase, secret) in bytes. Longer texts
/// cannot fit the models' contexts anyway; the token-level check against the model's context
/// follows once the model is loaded.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Longest edit target, in tokens (CounterFact's are 1 to 5).
pub const MAX_TARGET_TOKENS: usize = 64;
/// Most optimisation steps of a value search or a fine-tuning run.
pub const MAX_STEPS: usize = 100_000;
/// Most records of one kind in a spec or request (rewrites, paraphrases, examples).
pub const MAX_ITEMS: usize = 1_000_000;

/// An integer in `lo..=hi`.
pub fn int_in(field: &str, v: usize, lo: usize, hi: usize) -> Check {
    if v < lo || v > hi {
        return Err(Bad::new(field, format!("{v}: must be from {lo} to {hi}")));
    }
    Ok(())
}

/// A finite real in `[lo, hi]`, or `(lo, hi]` when `lo_open`.
pub fn real_in(field: &str, v: f64, lo: f64, hi: f64, lo_open: bool) -> Check {
    let ok = v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
    if !ok {
        let open = if lo_open { "(" } else { "[" };
        return Err(Bad::new(
            field,
            format!("{v}: must be a finite number in {open}{lo}, {hi}]"),
        ));
    }
    Ok(())
}

/// A text of at most [`MAX_TEXT_BYTES`] bytes.
pub fn text(field: &str, s: &str) -> Check {
    if s.len() > MAX_TEXT_BYTES {
        return Err(Bad::new(
            field,
            format!(
                "{} bytes: texts may have at most {MAX_TEXT_BYTES} bytes",
                s.len()
            ),
        ));
    }
    Ok(())
}

/// At most `max` items.
pub fn count(field: &str, n: usize, max: usize) -> Check {
    if n > max {
        return Err(Bad::new(
            field,
            format!("{n} entries: at most {max} allowed"),
        ));
    }
    Ok(())
}

fn out_of_range(option: &str, l: usize, n_layers: usize) -> crate::Error {
    crate::Error::invalid(
        option,
        crate::Error::LayerOutOfRange { layer: l, n_layers }.to_string(),
    )
}

/// Parse a layer list: `all`, `3`, `3,5,7` or `10-19`, each below `n_layers` (also used for
/// author ranges, with `usize::MAX`).
///
/// # Errors
/// [`crate::Error::InvalidArgument`] naming `option` (also for a layer out of range).
pub fn parse_layers(s: &str, n_layers: usize, option: &str) -> crate::Result<Vec<usize>> {
    let s = s.trim();
    if s == "all" {
        return Ok((0..n_layers).collect());
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let bad = || {
            crate::Error::invalid(
                option,
                format!("`{part}`: expected `all`, a layer, a list `3,5` or a range `10-19`"),
            )
        };
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) = (
                a.trim().parse().map_err(|_| bad())?,
                b.trim().parse().map_err(|_| bad())?,
            );
            if a > b {
                return Err(bad());
            }
            // Checked before the range is expanded: `0-18446744073709551615` must not
            // allocate. Author ranges (no layer count) are bounded by the records' count.
            if b >= n_layers {
                return Err(out_of_range(option, b, n_layers));
            }
            if b - a >= MAX_ITEMS {
                return Err(crate::Error::invalid(
                    option,
                    format!("`{part}`: a range may span at most {} values", MAX_ITEMS),
                ));
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| bad())?);
        }
    }
    for &l in &out {
        if l >= n_layers {
            return Err(out_of_range(option, l, n_layers));
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_name_the_field_and_the_range() {
        assert!(int_in("steps", 0, 1, 10)
            .unwrap_err()
            .to_string()
            .contains("steps: 0: must be from 1 to 10"));
        assert!(real_in("lr", f64::NAN, 0.0, 1.0, true).is_err());
        assert!(real_in("lr", f64::INFINITY, 0.0, 1.0, true).is_err());
        assert!(real_in("lr", 0.0, 0.0, 1.0, true).is_err());
        assert!(real_in("w", 0.0, 0.0, 1.0, false).is_ok());
        assert!(text("subject", &"x".repeat(MAX_TEXT_BYTES + 1)).is_err());
        assert!(count("rewrites", 3, 2).is_err());
    }
}
