//! Tenant and adapter names, and `name@version` references: the only strings that ever become
//! path components of the store, so they are checked here first.

use super::AdapterError;

/// Checks a tenant or adapter name: `[a-z0-9][a-z0-9._-]{0,63}`. Only names that pass ever
/// become path components.
pub fn validate_name(field: &str, name: &str) -> Result<(), AdapterError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || (i > 0 && matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(AdapterError::InvalidName(format!(
            "`{field}` must match [a-z0-9][a-z0-9._-]{{0,63}} (got {:?})",
            name.chars().take(80).collect::<String>()
        )))
    }
}

/// Splits `name@version`.
pub fn parse_ref(r: &str) -> Result<(String, Option<i64>), AdapterError> {
    match r.split_once('@') {
        None => {
            validate_name("adapter", r)?;
            Ok((r.to_owned(), None))
        }
        Some((name, v)) => {
            validate_name("adapter", name)?;
            let v: i64 = v.parse().ok().filter(|v| *v >= 1).ok_or_else(|| {
                AdapterError::InvalidName(format!(
                    "adapter version in `{r}` must be a positive integer"
                ))
            })?;
            Ok((name.to_owned(), Some(v)))
        }
    }
}
