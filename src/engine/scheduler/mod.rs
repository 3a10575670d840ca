//! The engine thread: owns the running sequences and their KV caches, runs one forward step at
//! a time over every active sequence (continuous batching), samples, detokenizes, applies stop
//! strings and streams events back. The HTTP side holds only an [`EngineHandle`].

pub mod prefix_cache;
pub mod state;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc as tokio_mpsc;

use crate::engine::json_mode::{JsonConstraint, ResponseFormat, Vocabulary};
use crate::engine::lora::LoraAdapter;
use crate::engine::model::{Llama, SeqCache, SeqInput};
use crate::engine::sampling::{Sampler, SamplingParams};
use crate::engine::stop::StopMatcher;
use crate::engine::tokenizer::{IncrementalDecoder, Tokenizer};
use crate::metrics as m;
use prefix_cache::PrefixCache;
use state::{BatchLimits, Schedulable, State};

/// A request the API has already validated (lengths fit the context, parameters in range).
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Also report the log-probability of every prompt token after the first (scoring).
    pub prompt_logprobs: bool,
    /// Keep generating past end-of-sequence tokens (benchmarks: fixed output lengths).
    pub ignore_eos: bool,
    /// JSON mode or a schema: every token keeps the text a prefix of one valid JSON value,
    /// and the sequence ends when the value is complete (`json_mode`, `json_schema`).
    pub response_format: ResponseFormat,
    /// The adapter version this request was pinned to when it was accepted; a later upload
    /// of the same name does not change it.
    pub adapter: Option<Arc<LoraAdapter>>,
    /// Requests reuse each other's cached prompt prefixes only within one scope (the API
    /// passes one per tenant), so nobody can time their way to another tenant's prompts.
    pub cache_scope: u64,
    /// Held while the request waits in the queue and dropped when it starts running (or goes
    /// away): lets the caller count its own queued requests (per tenant) without the engine
    /// knowing who they belong to.
    pub queued_ticket: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop string matched.
    Stop,
    /// max_new_tokens reached.
    Length,
    /// The model produced an end-of-sequence token.
    Eos,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Eos => "eos",
        }
    }
}

/// One token with its log-probability and, if asked, the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug)]
pub enum GenEvent {
    /// Log-probabilities of prompt tokens 1.. (token 0 has no context), sent once.
    PromptLogprobs(Vec<TokenLogprob>),
    /// One generated token; `text` is what may be shown now (held back while it could be
    /// the start of a stop string, so it can be empty or cover several tokens).
    Token {
        token: TokenLogprob,
        text: String,
    },
    /// Text held back (a possible stop-string prefix) released when the sequence ends.
    Text(String),
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens taken from the prefix cache instead of computed.
        cached_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_running: usize,
    pub max_waiting: usize,
    pub max_step_tokens: usize,
    /// Bytes of prompt-prefix keys and values kept for reuse (0: off).
    pub prefix_cache_bytes: usize,
}

/// Cheap to clone; what the HTTP side uses to reach the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submission>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    alive: Arc<AtomicBool>,
}

struct Submission {
    req: GenerateRequest,
    events: tokio_mpsc::UnboundedSender<GenEvent>,
    enqueued: Instant,
}

impl EngineHandle {
    /// `engine.max_waiting`: the most requests the queue holds.
    pub fn max_waiting(&self) -> usize {
        self.max_waiting
    }

    /// Enqueues a request. Fails at once when `max_waiting` requests are already queued.
    pub fn submit(
        &self,
        req: GenerateRequest,
    ) -> Result<tokio_mpsc::UnboundedReceiver<GenEvent>, SubmitError> {
        let prev = self.waiting.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(prev));
        }
        let (events, rx) = tokio_mpsc::unbounded_channel();
        let sub = Submission {
            req,
            events,
            enqueued: Instant::now(),
        };
        if self.tx.send(sub).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        ::metrics::gauge!(m::REQUESTS_WAITING).set(self.waiting.load(Ordering::SeqCst) as f64);
        Ok(rx)
    }

    /// Whether the engine thread is still running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Requests queued and not yet running.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// Starts the engine thread. It stops when every handle is dropped.
pub fn spawn(
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    cfg: EngineConfig,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = mpsc::channel::<Submission>();
    let waiting = Arc::new(AtomicUsize::new(0));
    let handle = EngineHandle {
        tx,
        waiting: waiting.clone(),
        max_waiting: cfg.max_waiting,
        alive: Arc::new(AtomicBool::new(true)),
    };
    let alive = handle.alive.clone();
    let limits = BatchLimits {
        max_running: cfg.max_running.max(1),
        max_step_tokens: cfg.max_step_tokens.max(1),
    };
    let prefix_cache_bytes = cfg.prefix_cache_bytes;
    std::thread::Builder::new()
        .name("adapterd-engine".into())
        .spawn(move || {
            let mut engine = Engine {
                model,
                tokenizer,
                state: State::new(limits),
                waiting,
                vocabulary: None,
                prefixes: PrefixCache::new(prefix_cache_bytes),
            };
            // Marks the engine dead however the thread ends, a panic included.
            struct Alive(Arc<AtomicBool>);
            impl Drop for Alive {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::SeqCst);
                }
            }
            let _alive = Alive(alive);
            // The engine thread runs inside its own rayon pool, so it takes part in every
            // parallel matmul instead of sleeping while pool threads do the work: two
            // context switches per matmul (about 200 per token) cost half the decode speed.
            // The pool size follows RAYON_NUM_THREADS (set from model.threads), else cores.
            match rayon::ThreadPoolBuilder::new()
                .thread_name(|i| format!("adapterd-compute-{i}"))
                .build()
            {
                Ok(pool) => pool.install(|| engine.run(rx)),
                Err(e) => {
                    tracing::warn!(error = %e, "no compute pool; running on the global one");
                    engine.run(rx)
                }
            }
        })?;
    Ok(handle)
}

/// A request being served.
struct Sequence {
    req: GenerateRequest,
    events: tokio_mpsc::UnboundedSender<GenEvent>,
    cache: SeqCache,
    /// Prompt tokens already fed to the model.
    fed: usize,
    /// Of those, how many came from the prefix cache.
    cached: usize,
    /// Waiting for a twin (same scope, adapter and prompt) to finish reading the prompt, to
    /// start from its cached prefix instead of computing the same keys and values again.
    parked: bool,
    /// Its prompt's whole blocks went to the prefix cache when the prefill ended.
    prompt_kept: bool,
    generated: Vec<u32>,
    /// The last sampled token, fed at the next step.
    next_input: Option<u32>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    prompt_logprobs: Vec<TokenLogprob>,
    enqueued: Instant,
    last_token_at: Option<Instant>,
}

impl Schedulable for Sequence {
    fn prompt_remaining(&self) -> usize {
        self.req.prompt.len() - self.fed
    }

    fn is_parked(&self) -> bool {
        self.parked
    }
}

impl Sequence {
    /// Whether `other` reads the very prompt this one does, where a cached prefix of one
    /// serves the other.
    fn twin_of(&self, other: &Sequence) -> bool {
        self.req.cache_scope == other.req.cache_scope
            && match (&self.req.adapter, &other.req.adapter) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
            && self.req.prompt == other.req.prompt
    }

    /// Whether a twin's prefix could serve this sequence at all.
    fn can_wait_for_twin(&self) -> bool {
        self.fed == 0 && !self.req.prompt_logprobs && self.req.prompt.len() > prefix_cache::BLOCK
    }
}

struct Engine {
    model: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    state: State<Sequence>,
    waiting: Arc<AtomicUsize>,
    /// Every token's bytes, built at the first JSON-mode request.
    vocabulary: Option<Arc<Vocabulary>>,
    prefixes: PrefixCache,
}

impl Engine {
    fn run(&mut self, rx: mpsc::Receiver<Submission>) {
        loop {
            if self.state.is_idle() {
                match rx.recv() {
                    Ok(sub) => self.enqueue(sub),
                    Err(_) => return,
                }
            }
            while let Ok(sub) = rx.try_recv() {
                self.enqueue(sub);
            }
            self.drop_disconnected();
            let admitted = self.state.admit();
            if admitted > 0 {
                self.waiting.fetch_sub(admitted, Ordering::SeqCst);
                let now = Instant::now();
                let first = self.state.running.len() - admitted;
                for s in &mut self.state.running[first..] {
                    s.req.queued_ticket = None;
                    ::metrics::histogram!(m::REQUEST_QUEUE_SECONDS)
                        .record(now.duration_since(s.enqueued).as_secs_f64());
                    reuse_prefix(&mut self.prefixes, s);
                }
                self.park_twins(first);
            }
            self.unpark_twins();
            ::metrics::gauge!(m::REQUESTS_RUNNING).set(self.state.running.len() as f64);
            ::metrics::gauge!(m::REQUESTS_WAITING).set(self.state.waiting.len() as f64);
            if !self.state.running.is_empty() {
                self.step();
            }
        }
    }

    fn vocabulary(&mut self) -> Arc<Vocabulary> {
        let tok = &self.tokenizer;
        self.vocabulary
            .get_or_insert_with(|| {
                Arc::new(Vocabulary {
                    bytes: (0..tok.vocab_size() as u32)
                        .map(|id| tok.token_bytes(id).into_boxed_slice())
                        .collect(),
                    eos: tok.eos_token_ids().to_vec(),
                })
            })
            .clone()
    }

    fn enqueue(&mut self, sub: Submission) {
        let mut sampler = Sampler::for_prompt(sub.req.sampling.clone(), &sub.req.prompt);
        if let Some(c) = JsonConstraint::for_format(&sub.req.response_format, || self.vocabulary())
        {
            sampler.constrain(c);
        }
        let seq = Sequence {
            sampler,
            decoder: IncrementalDecoder::new(self.tokenizer.clone(), true),
            stop: StopMatcher::new(sub.req.stop.clone()),
            cache: SeqCache::new(self.model.cfg.num_layers),
            fed: 0,
            cached: 0,
            parked: false,
            prompt_kept: false,
            generated: Vec::new(),
            next_input: None,
            prompt_logprobs: Vec::new(),
            enqueued: sub.enqueued,
            last_token_at: None,
            events: sub.events,
            req: sub.req,
        };
        ::metrics::counter!(m::PROMPT_TOKENS_TOTAL).increment(seq.req.prompt.len() as u64);
        self.state.waiting.push_back(seq);
    }

    /// A client that went away frees its slot (and its queue place) before the next step.
    fn drop_disconnected(&mut self) {
        let before = self.state.waiting.len();
        self.state.waiting.retain(|s| !s.events.is_closed());
        let gone = before - self.state.waiting.len();
        if gone > 0 {
            self.waiting.fetch_sub(gone, Ordering::SeqCst);
        }
        self.state.running.retain(|s| !s.events.is_closed());
    }

    fn step(&mut self) {
        let plan = self.state.plan();
        if plan.is_empty() {
            return;
        }
        ::metrics::histogram!(m::BATCH_SIZE).record(plan.len() as f64);
        // Inputs per planned sequence: a prompt chunk, or the last sampled token.
        let mut inputs: Vec<(usize, Vec<u32>, bool)> = Vec::with_capacity(plan.len());
        for &(i, n) in &plan {
            let s = &self.state.running[i];
            if s.prompt_remaining() > 0 {
                let chunk = s.req.prompt[s.fed..s.fed + n].to_vec();
                inputs.push((i, chunk, s.req.prompt_logprobs));
            } else if let Some(t) = s.next_input {
                inputs.push((i, vec![t], false));
            }
        }
        let logits = {
            // Each planned sequence lends its cache (mutably) and adapter to the step.
            let mut slots: Vec<Option<&mut Sequence>> =
                self.state.running.iter_mut().map(Some).collect();
            let mut batch = Vec::with_capacity(inputs.len());
            for (i, toks, all) in &inputs {
                if let Some(s) = slots[*i].take() {
                    batch.push(SeqInput {
                        tokens: toks,
                        cache: &mut s.cache,
                        all_logits: *all,
                        adapter: s.req.adapter.clone(),
                    });
                }
            }
            self.model
                .forward(&mut batch)
                .and_then(|t| t.to_vec2::<f32>())
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward step failed; failing its sequences");
                for (i, _, _) in &inputs {
                    let _ = self.state.running[*i]
                        .events
                        .send(GenEvent::Error(format!("model step failed: {e}")));
                }
                let failed: Vec<usize> = inputs.iter().map(|(i, _, _)| *i).collect();
                let mut idx = 0;
                self.state.running.retain(|_| {
                    let keep = !failed.contains(&idx);
                    idx += 1;
                    keep
                });
                return;
            }
        };

        let mut row = 0;
        let mut finished = Vec::new();
        let mut prefilled = Vec::new();
        for (i, toks, all) in &inputs {
            let s = &mut self.state.running[*i];
            let rows = if *all { toks.len() } else { 1 };
            let seq_rows = &logits[row..row + rows];
            row += rows;
            if s.prompt_remaining() > 0 {
                let start = s.fed;
                s.fed += toks.len();
                if *all {
                    // Row r predicts prompt token start+r+1, while that is still in the prompt.
                    for (r, l) in seq_rows.iter().enumerate() {
                        let target = start + r + 1;
                        if target < s.req.prompt.len() {
                            let id = s.req.prompt[target];
                            s.prompt_logprobs
                                .push(score(l, id, s.req.sampling.top_logprobs));
                        }
                    }
                }
                if s.prompt_remaining() > 0 {
                    continue;
                }
                prefilled.push(*i);
                if s.req.prompt_logprobs {
                    let lp = std::mem::take(&mut s.prompt_logprobs);
                    let _ = s.events.send(GenEvent::PromptLogprobs(lp));
                }
                if s.req.max_new_tokens == 0 {
                    finished.push((*i, FinishReason::Length));
                    continue;
                }
            }
            let Some(last) = seq_rows.last() else {
                continue;
            };
            if let Some(reason) = emit_token(s, last, &self.tokenizer) {
                finished.push((*i, reason));
            }
        }
        for i in prefilled {
            self.keep_prompt(i);
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            let mut s = self.state.running.swap_remove(i);
            finish(&mut s, reason);
            self.keep_conversation(&s);
        }
    }

    /// Sequences admitted from `first` on that missed the prefix cache but have a twin still
    /// reading the same prompt (`n` choices, `best_of`, a repeated prompt) wait for it: one
    /// prefill instead of several.
    fn park_twins(&mut self, first: usize) {
        if !self.prefixes.enabled() {
            return;
        }
        let running = &mut self.state.running;
        for i in first..running.len() {
            if !running[i].can_wait_for_twin() {
                continue;
            }
            let leader = running.iter().enumerate().any(|(j, t)| {
                j != i && !t.parked && t.prompt_remaining() > 0 && t.twin_of(&running[i])
            });
            running[i].parked = leader;
        }
    }

    /// Parked sequences whose twin has read its prompt (or gone) start, from the prefix the
    /// twin left.
    fn unpark_twins(&mut self) {
        let running = &mut self.state.running;
        for i in 0..running.len() {
            if !running[i].parked {
                continue;
            }
            let waiting = running
                .iter()
                .any(|t| !t.parked && t.prompt_remaining() > 0 && t.twin_of(&running[i]));
            if !waiting {
                running[i].parked = false;
                reuse_prefix(&mut self.prefixes, &mut running[i]);
            }
        }
    }

    /// Running sequence `i` has just read its prompt: its whole blocks go to the prefix cache
    /// when others can use them now — it computed a prompt nobody had cached, or twins wait
    /// for it. A sequence that started from a cached prefix added only its own turn, which
    /// its finished conversation will leave anyway ([`Self::keep_conversation`]): copying it
    /// now would be a second copy of the same keys and values.
    fn keep_prompt(&mut self, i: usize) {
        let running = &self.state.running;
        let s = &running[i];
        let twins_wait = running.iter().any(|t| t.parked && t.twin_of(s));
        if s.cached > 0 && !twins_wait {
            return;
        }
        if let Err(e) = self.prefixes.insert(
            s.req.cache_scope,
            s.req.adapter.as_ref(),
            &s.req.prompt,
            &s.cache,
        ) {
            tracing::warn!(error = %e, "keeping a prompt prefix failed");
        }
        self.state.running[i].prompt_kept = true;
        ::metrics::gauge!(m::PREFIX_CACHE_BYTES).set(self.prefixes.bytes() as f64);
    }

    /// A finished sequence's cache also holds its reply (all but the last token, which was
    /// never fed): a chat's next turn sends the whole conversation again, so prompt + reply
    /// is the prefix it will start with.
    fn keep_conversation(&mut self, s: &Sequence) {
        let cached = s.cache.len();
        // Unless the prompt is kept already and the reply completed no block beyond it.
        if s.prompt_kept && cached / prefix_cache::BLOCK <= s.req.prompt.len() / prefix_cache::BLOCK
        {
            return;
        }
        let tokens: Vec<u32> = s.req.prompt.iter().chain(&s.generated).copied().collect();
        if let Err(e) = self.prefixes.insert(
            s.req.cache_scope,
            s.req.adapter.as_ref(),
            &tokens[..cached.min(tokens.len())],
            &s.cache,
        ) {
            tracing::warn!(error = %e, "keeping a finished conversation's prefix failed");
        }
        ::metrics::gauge!(m::PREFIX_CACHE_BYTES).set(self.prefixes.bytes() as f64);
    }
}

/// Starts `s` from the longest cached prefix of its prompt, if any. Scoring requests read their
/// whole prompt: they need a logit row for every prompt token.
fn reuse_prefix(prefixes: &mut PrefixCache, s: &mut Sequence) {
    if s.req.prompt_logprobs || s.fed > 0 {
        return;
    }
    match prefixes.lookup(s.req.cache_scope, s.req.adapter.as_ref(), &s.req.prompt) {
        Ok(Some(hit)) => {
            s.cache = hit.cache;
            s.fed = hit.tokens;
            s.cached = hit.tokens;
            ::metrics::counter!(m::PREFIX_CACHE_HIT_TOKENS_TOTAL).increment(hit.tokens as u64);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "reusing a cached prompt prefix failed"),
    }
}

/// Samples the next token of `s` from `logits`, streams it, and says whether the sequence ends.
fn emit_token(s: &mut Sequence, logits: &[f32], tokenizer: &Tokenizer) -> Option<FinishReason> {
    let sampled = s.sampler.sample(logits);
    let now = Instant::now();
    match s.last_token_at {
        None => ::metrics::histogram!(m::TIME_TO_FIRST_TOKEN_SECONDS)
            .record(now.duration_since(s.enqueued).as_secs_f64()),
        Some(t) => ::metrics::histogram!(m::INTER_TOKEN_LATENCY_SECONDS)
            .record(now.duration_since(t).as_secs_f64()),
    }
    s.last_token_at = Some(now);
    ::metrics::counter!(m::GENERATION_TOKENS_TOTAL).increment(1);
    let token = TokenLogprob {
        id: sampled.token,
        logprob: sampled.logprob,
        top: sampled.top,
    };
    s.generated.push(sampled.token);
    if !s.req.ignore_eos && tokenizer.eos_token_ids().contains(&sampled.token) {
        let _ = s.events.send(GenEvent::Token {
            token,
            text: String::new(),
        });
        return Some(FinishReason::Eos);
    }
    let piece = s.decoder.push(sampled.token).unwrap_or_default();
    let out = s.stop.push(&piece);
    let _ = s.events.send(GenEvent::Token {
        token,
        text: out.emit,
    });
    if out.stopped {
        return Some(FinishReason::Stop);
    }
    if s.generated.len() >= s.req.max_new_tokens {
        return Some(FinishReason::Length);
    }
    s.next_input = Some(sampled.token);
    None
}

fn finish(s: &mut Sequence, reason: FinishReason) {
    if reason != FinishReason::Stop {
        // An incomplete UTF-8 tail still in the decoder goes through the stop matcher first.
        let tail = s.decoder.finish().unwrap_or_default();
        let mut rest = if tail.is_empty() {
            String::new()
        } else {
            s.stop.push(&tail).emit
        };
        if !s.stop.is_stopped() {
            rest.push_str(&s.stop.flush());
        }
        if !rest.is_empty() {
            let _ = s.events.send(GenEvent::Text(rest));
        }
    }
    ::metrics::histogram!(m::E2E_REQUEST_LATENCY_SECONDS)
        .record(s.enqueued.elapsed().as_secs_f64());
    let _ = s.events.send(GenEvent::Done {
        finish: reason,
        prompt_tokens: s.req.prompt.len(),
        cached_tokens: s.cached,
        completion_tokens: s.generated.len(),
    });
}

/// Log-probability of prompt token `id` under `logits`, with the `top_n` most likely tokens.
fn score(logits: &[f32], id: u32, top_n: usize) -> TokenLogprob {
    let s = crate::engine::sampling::score(logits, id, top_n);
    TokenLogprob {
        id,
        logprob: s.logprob,
        top: s.top,
    }
}
