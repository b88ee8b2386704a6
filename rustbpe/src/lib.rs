//! rustbpe: a byte-level BPE tokenizer trainer for nanochat.
//!
//! Training happens here (parallel chunk counting, incremental merges); Python takes the
//! mergeable ranks and builds a tiktoken Encoding for fast inference. `encode` is a simple
//! reference implementation, used for testing.

use ahash::AHashMap;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyIterator, PyString};

mod split;
mod train;
mod unicode_tables;

use split::{Splitter, DEFAULT_PATTERN};

fn value_error(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

#[pyclass]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    /// Bytes of every token, indexed by id: 256 single bytes, then one token per merge.
    token_bytes: Vec<Vec<u8>>,
    /// Bytes -> rank as a Python dict(get_mergeable_ranks()) would have it (later wins).
    ranks: AHashMap<Vec<u8>, u32>,
}

impl Tokenizer {
    fn set_merges(&mut self, merges: &[(u32, u32)]) {
        self.token_bytes = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in merges {
            let bytes = [&self.token_bytes[a as usize][..], &self.token_bytes[b as usize][..]].concat();
            self.token_bytes.push(bytes);
        }
        self.ranks = self.token_bytes.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    }

    /// Byte pair merging the way tiktoken does it: repeatedly join the adjacent parts whose
    /// concatenation has the lowest rank (leftmost on ties) until no join is in the vocabulary.
    fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>) {
        if let Some(&r) = self.ranks.get(chunk) {
            out.push(r);
            return;
        }
        // Part boundaries: part i is chunk[bounds[i]..bounds[i + 1]].
        let mut bounds: Vec<usize> = (0..=chunk.len()).collect();
        loop {
            let best = (0..bounds.len().saturating_sub(2))
                .filter_map(|i| self.ranks.get(&chunk[bounds[i]..bounds[i + 2]]).map(|&r| (r, i)))
                .min();
            match best {
                Some((_, i)) => {
                    bounds.remove(i + 1);
                }
                None => break,
            }
        }
        out.extend(bounds.windows(2).map(|w| self.ranks[&chunk[w[0]..w[1]]]));
    }
}

/// Appends up to `max` texts from `iter` to `batch`; returns whether the iterator is exhausted.
fn pull_batch(py: Python, mut iter: &PyIterator, batch: &mut Vec<String>, max: usize) -> PyResult<bool> {
    while batch.len() < max {
        // PyO3 0.17 keeps every object it hands out alive until the enclosing pool is dropped
        // (for us: the end of training), so each item gets its own pool. Without it, the whole
        // corpus would stay in memory. Safety: no reference obtained below outlives the pool.
        let _pool = unsafe { py.new_pool() };
        let item = match iter.next() {
            Some(item) => item?,
            None => return Ok(true),
        };
        let text: &PyString = item.downcast().map_err(|_| {
            let ty = item.get_type().name().unwrap_or("?").to_string();
            PyTypeError::new_err(format!(
                "train_from_iterator: the iterator must yield str, got an item of type {}",
                ty
            ))
        })?;
        batch.push(text.to_str()?.to_owned());
    }
    Ok(false)
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        let mut t = Tokenizer {
            pattern: DEFAULT_PATTERN.to_string(),
            splitter: Splitter::Default,
            token_bytes: Vec::new(),
            ranks: AHashMap::new(),
        };
        t.set_merges(&[]);
        t
    }

    /// Train byte-level BPE on an iterator of str, to `vocab_size` tokens (256 bytes + merges).
    /// Texts are pulled `buffer_size` at a time; each batch is split and counted in parallel
    /// without the GIL. `pattern=None` uses DEFAULT_PATTERN.
    #[pyo3(text_signature = "(self, iterator, vocab_size, buffer_size=8192, pattern=None)")]
    #[args(buffer_size = "8192", pattern = "None")]
    fn train_from_iterator(
        &mut self,
        py: Python,
        iterator: &PyAny,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<&str>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(value_error(format!(
                "vocab_size must be at least 256 (one token per byte), got {}",
                vocab_size
            )));
        }
        if buffer_size < 1 {
            return Err(value_error(format!("buffer_size must be at least 1, got {}", buffer_size)));
        }
        let pattern = pattern.unwrap_or(DEFAULT_PATTERN);
        let splitter = Splitter::new(pattern).map_err(value_error)?;
        let iter = iterator.iter()?;

        let mut counts = train::ChunkCounts::new();
        let mut batch: Vec<String> = Vec::with_capacity(buffer_size as usize);
        let mut n_texts = 0usize;
        loop {
            // Pull a batch while holding the GIL...
            batch.clear();
            let exhausted = pull_batch(py, iter, &mut batch, buffer_size as usize)?;
            n_texts += batch.len();
            // ...then split and count it in parallel without.
            py.allow_threads(|| counts.add_batch(&splitter, &batch)).map_err(value_error)?;
            if exhausted {
                break;
            }
        }
        drop(batch);

        let num_merges = vocab_size as usize - 256;
        eprintln!(
            "rustbpe: {} texts, {} unique chunks; learning {} merges",
            n_texts,
            counts.len(),
            num_merges
        );
        let merges = py.allow_threads(|| train::learn_merges(counts, num_merges, true));
        self.pattern = pattern.to_string();
        self.splitter = splitter;
        self.set_merges(&merges);
        Ok(())
    }

    /// The split pattern (regex) the tokenizer was trained with.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// [(token bytes, rank)]: the 256 single bytes (rank = byte value), then one entry per
    /// merge (rank = 256 + merge index). Feed dict() of it to tiktoken.Encoding.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(&'py PyBytes, u32)> {
        self.token_bytes.iter().enumerate().map(|(i, t)| (PyBytes::new(py, t), i as u32)).collect()
    }

    /// Reference encoder (slow, for tests): split with the pattern, then merge by lowest rank.
    fn encode(&self, py: Python, text: &str) -> PyResult<Vec<u32>> {
        py.allow_threads(|| {
            let mut ids = Vec::new();
            self.splitter.for_each_chunk(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut ids))?;
            Ok(ids)
        })
        .map_err(value_error)
    }
}

/// Split `text` into the chunks BPE works within (DEFAULT_PATTERN when `pattern` is None).
#[pyfunction(pattern = "None")]
#[pyo3(text_signature = "(text, pattern=None)")]
fn split_text(text: &str, pattern: Option<&str>) -> PyResult<Vec<String>> {
    let splitter = Splitter::new(pattern.unwrap_or(DEFAULT_PATTERN)).map_err(value_error)?;
    let mut chunks = Vec::new();
    splitter.for_each_chunk(text, |c| chunks.push(c.to_string())).map_err(value_error)?;
    Ok(chunks)
}

#[pymodule]
fn rustbpe(_py: Python, m: &PyModule) -> PyResult<()> {
    m.add("DEFAULT_PATTERN", DEFAULT_PATTERN)?;
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    Ok(())
}
