//! Training datasets: JSONL or inline records for SFT and DPO, validated with the line and
//! field of every failure, then rendered (chat template for message records) and tokenized
//! into sequences with per-token loss masks.

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
