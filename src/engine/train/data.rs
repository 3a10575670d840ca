//! Training datasets: JSONL or inline records for SFT and DPO, validated with the line and
//! field of every failure, then rendered (chat template for message records) and tokenized
//! into sequences with per-token loss masks.
//!
//! Three steps, each usable alone: [`validate_jsonl`] checks only the shape of an uploaded
//! file (UTF-8, one JSON object per line, limits); [`parse_jsonl`] / [`parse_values`] turn
//! records into typed [`Record`]s for one [`Method`] ([`records`] holds the per-format rules);
//! [`tokenize`] renders and tokenizes them into [`Examples`] the trainer consumes (its module
//! documents the masking and truncation rules, after TRL). Nothing here panics on any input,
//! and nothing knows HTTP or SQL.

mod records;
mod tokenize;

use std::fmt;

use serde_json::Value;

pub use records::{DpoRecord, Message, Record, RecordBody, Role, SftRecord};
pub use tokenize::tokenize;

/// What a job trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Sft,
    Dpo,
}

/// One SFT sequence: `targets[i]` says whether token `i` is a training target (predicted from
/// `tokens[..i]`); `targets[0]` is always false.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftExample {
    pub tokens: Vec<u32>,
    pub targets: Vec<bool>,
}

/// One preference pair: the shared prompt and the two completions (each non-empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DpoExample {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// A tokenized dataset.
#[derive(Clone, Debug)]
pub enum Examples {
    Sft(Vec<SftExample>),
    Dpo(Vec<DpoExample>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Sft(v) => v.len(),
            Examples::Dpo(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bounds on one dataset, checked before any record is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatasetLimits {
    /// Most records (non-blank lines, or inline array elements).
    pub max_records: usize,
    /// Most bytes: of the file, or of the inline records serialized as JSON.
    pub max_bytes: usize,
}

/// Why a dataset was refused: the record and the field at fault. `line` is the 1-based line of
/// a JSONL file (blank lines count) or the 1-based position of an inline record; 0 for the
/// dataset as a whole (empty, too many records, too large), where `field` is `training_file`
/// or `training_data`. `field` is a path inside the record (`messages[1].role`), or empty when
/// the line as a whole is at fault (not JSON, not an object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetError {
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl DatasetError {
    pub(crate) fn new(line: usize, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            line,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `line 3: `messages[1].role`: must be one of system, user, assistant`; the line is left out
/// for whole-dataset errors and the field for whole-line errors.
impl fmt::Display for DatasetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: ", self.line)?;
        }
        if !self.field.is_empty() {
            write!(f, "`{}`: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for DatasetError {}

/// The field whole-dataset errors of a JSONL file name.
const FILE_FIELD: &str = "training_file";
/// The field whole-file errors of an upload ([`validate_jsonl`]) name: the multipart part.
const UPLOAD_FIELD: &str = "file";
/// The field whole-dataset errors of inline records name.
const INLINE_FIELD: &str = "training_data";

/// Checks an uploaded JSONL file's shape without knowing the method: size, UTF-8, every
/// non-blank line a JSON object, at least one and at most `max_records` records. Returns the
/// number of records. Whole-file errors name the field `file`. What the records must contain is checked by [`parse_jsonl`] when a job
/// uses the file.
pub fn validate_jsonl(bytes: &[u8], limits: &DatasetLimits) -> Result<usize, DatasetError> {
    check_bytes(bytes.len(), limits, UPLOAD_FIELD)?;
    let mut count = 0usize;
    for line in jsonl_lines(bytes) {
        let (n, text) = line?;
        if count == limits.max_records {
            return Err(too_many_records(UPLOAD_FIELD, limits));
        }
        let value = json_line(n, text)?;
        if !value.is_object() {
            return Err(not_an_object(n, &value));
        }
        count += 1;
    }
    if count == 0 {
        return Err(no_records(UPLOAD_FIELD));
    }
    Ok(count)
}

/// Parses and validates a JSONL dataset for `method`: one record per non-blank line.
pub fn parse_jsonl(
    bytes: &[u8],
    method: Method,
    limits: &DatasetLimits,
) -> Result<Vec<Record>, DatasetError> {
    check_bytes(bytes.len(), limits, FILE_FIELD)?;
    let mut out = Vec::new();
    for line in jsonl_lines(bytes) {
        let (n, text) = line?;
        if out.len() == limits.max_records {
            return Err(too_many_records(FILE_FIELD, limits));
        }
        let value = json_line(n, text)?;
        out.push(records::record(n, &value, method)?);
    }
    if out.is_empty() {
        return Err(no_records(FILE_FIELD));
    }
    Ok(out)
}

/// Parses and validates inline records (a job's `training_data`); record `i` is "line" `i + 1`.
pub fn parse_values(
    values: &[Value],
    method: Method,
    limits: &DatasetLimits,
) -> Result<Vec<Record>, DatasetError> {
    if values.is_empty() {
        return Err(no_records(INLINE_FIELD));
    }
    if values.len() > limits.max_records {
        return Err(too_many_records(INLINE_FIELD, limits));
    }
    let mut size = ByteCounter {
        count: 0,
        max: limits.max_bytes,
    };
    if serde_json::to_writer(&mut size, values).is_err() {
        return Err(too_many_bytes(INLINE_FIELD, limits));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| records::record(i + 1, v, method))
        .collect()
}

fn check_bytes(len: usize, limits: &DatasetLimits, field: &str) -> Result<(), DatasetError> {
    if len > limits.max_bytes {
        return Err(too_many_bytes(field, limits));
    }
    Ok(())
}

fn too_many_bytes(field: &str, limits: &DatasetLimits) -> DatasetError {
    DatasetError::new(
        0,
        field,
        format!(
            "the dataset is larger than the limit of {} bytes",
            limits.max_bytes
        ),
    )
}

fn too_many_records(field: &str, limits: &DatasetLimits) -> DatasetError {
    DatasetError::new(
        0,
        field,
        format!(
            "the dataset has more than the limit of {} records",
            limits.max_records
        ),
    )
}

fn no_records(field: &str) -> DatasetError {
    DatasetError::new(0, field, "the dataset has no records")
}

fn not_an_object(line: usize, value: &Value) -> DatasetError {
    DatasetError::new(
        line,
        "",
        format!(
            "each record must be a JSON object, not {}",
            records::kind(value)
        ),
    )
}

/// The non-blank lines of a JSONL document with their 1-based numbers (blank lines count), a
/// trailing `\r` and a leading byte-order mark removed. A line that is not UTF-8 is an error.
fn jsonl_lines(bytes: &[u8]) -> impl Iterator<Item = Result<(usize, &str), DatasetError>> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter_map(|(i, raw)| {
            let n = i + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let raw = if n == 1 {
                raw.strip_prefix("\u{feff}".as_bytes()).unwrap_or(raw)
            } else {
                raw
            };
            match std::str::from_utf8(raw) {
                Ok(text) if text.trim().is_empty() => None,
                Ok(text) => Some(Ok((n, text))),
                Err(e) => Some(Err(DatasetError::new(
                    n,
                    "",
                    format!(
                        "not valid UTF-8 (at byte {} of the line)",
                        e.valid_up_to() + 1
                    ),
                ))),
            }
        })
}

/// One line as JSON; the error names the column, not serde's "line 1".
fn json_line(line: usize, text: &str) -> Result<Value, DatasetError> {
    serde_json::from_str(text).map_err(|e| {
        let full = e.to_string();
        let what = full
            .rsplit_once(" at line ")
            .map_or(full.as_str(), |(what, _)| what);
        DatasetError::new(
            line,
            "",
            format!("not valid JSON at column {}: {what}", e.column()),
        )
    })
}

/// A writer that only counts, and fails once more than `max` bytes were written, so measuring
/// oversized inline data stops early.
struct ByteCounter {
    count: usize,
    max: usize,
}

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.count = self.count.saturating_add(buf.len());
        if self.count > self.max {
            return Err(std::io::Error::other("dataset byte limit exceeded"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
