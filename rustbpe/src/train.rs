//! BPE training: chunk counting and the merge loop.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;

use ahash::AHashMap;
use rayon::prelude::*;
use smallvec::SmallVec;

use crate::split::Splitter;

/// Chunk counts are sharded by hash, so that every batch merges into them in parallel.
const SHARDS: usize = 64;

/// How often each unique chunk (piece of pre-tokenized text) occurs.
pub struct ChunkCounts {
    shards: Vec<AHashMap<String, i64>>,
    hasher: ahash::RandomState,
}

impl ChunkCounts {
    pub fn new() -> Self {
        ChunkCounts { shards: (0..SHARDS).map(|_| AHashMap::new()).collect(), hasher: ahash::RandomState::new() }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Splits a batch of texts in parallel and adds its chunk counts. Chunks are first counted
    /// as borrowed slices, so only chunks that are new overall get allocated.
    pub fn add_batch(&mut self, splitter: &Splitter, batch: &[String]) -> Result<(), String> {
        let hasher = &self.hasher;
        let partials: Vec<Vec<AHashMap<&str, i64>>> = batch
            .par_iter()
            .try_fold(
                || vec![AHashMap::new(); SHARDS],
                |mut maps, text| {
                    splitter.for_each_chunk(text, |chunk| {
                        let shard = hasher.hash_one(chunk) as usize % SHARDS;
                        *maps[shard].entry(chunk).or_insert(0) += 1;
                    })?;
                    Ok::<_, String>(maps)
                },
            )
            .collect::<Result<_, _>>()?;
        self.shards.par_iter_mut().enumerate().for_each(|(shard, counts)| {
            for maps in &partials {
                for (&chunk, &n) in &maps[shard] {
                    match counts.get_mut(chunk) {
                        Some(c) => *c += n,
                        None => {
                            counts.insert(chunk.to_owned(), n);
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

// A pair of token ids packed as (left << 32 | right): ordering by the packed value is
// ordering by (left, right), and it hashes as a single integer.
type Pair = u64;

fn pair(a: u32, b: u32) -> Pair {
    ((a as u64) << 32) | b as u64
}

fn unpair(p: Pair) -> (u32, u32) {
    ((p >> 32) as u32, p as u32)
}

/// Heap entry. The max-heap yields the highest count first and, among equal counts, the
/// smallest pair, so the merge order never depends on hashing or thread count.
#[derive(PartialEq, Eq)]
struct Candidate {
    count: i64,
    pair: Pair,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Merges every occurrence of (a, b) in `word` into `z`, left to right, in place.
/// Reports the changes to the word's pair counts (except those of (a, b) itself, which is
/// retired) and returns the new length.
fn merge_word(word: &mut [u32], a: u32, b: u32, z: u32, mut delta: impl FnMut(Pair, i64)) -> usize {
    let n = word.len();
    let (mut out, mut i) = (0, 0);
    while i < n {
        if i + 1 < n && word[i] == a && word[i + 1] == b {
            // The left neighbour is already the rewritten token (it may be an earlier z).
            if out > 0 {
                let x = word[out - 1];
                delta(pair(x, a), -1);
                delta(pair(x, z), 1);
            }
            if i + 2 < n {
                let y = word[i + 2];
                delta(pair(b, y), -1);
                delta(pair(z, y), 1);
            }
            word[out] = z;
            i += 2;
        } else {
            word[out] = word[i];
            i += 1;
        }
        out += 1;
    }
    out
}

/// What the merge loop knows about a pair.
#[derive(Default)]
struct PairStats {
    /// Occurrences in the corpus (word counts included).
    count: i64,
    /// Words that contain (or once contained) the pair, each listed once. Most pairs occur in
    /// only a few words, so short lists live inline.
    words: SmallVec<[u32; 4]>,
}

/// Learns up to `num_merges` merges from chunk counts. Merge i creates token 256 + i.
///
/// Words are kept once per unique chunk with their count. Pair counts are updated
/// incrementally: a merge only revisits the words listed for its pair, and a lazily
/// invalidated max-heap finds the next best pair.
pub fn learn_merges(counts: ChunkCounts, num_merges: usize, verbose: bool) -> Vec<(u32, u32)> {
    // All words live in one buffer: merges only shrink a word, so it is rewritten in place.
    // Single-byte chunks have no pairs and are dropped.
    let mut tokens: Vec<u32> = Vec::new();
    let mut spans: Vec<(usize, usize)> = Vec::new(); // (start, len) into `tokens`
    let mut word_counts: Vec<i64> = Vec::new();
    for (chunk, n) in counts.shards.into_iter().flatten() {
        if chunk.len() >= 2 {
            spans.push((tokens.len(), chunk.len()));
            tokens.extend(chunk.bytes().map(u32::from));
            word_counts.push(n);
        }
    }
    tokens.shrink_to_fit();

    let mut pairs: AHashMap<Pair, PairStats> = AHashMap::new();
    let mut word_pairs: Vec<Pair> = Vec::new();
    for (w, &(start, len)) in spans.iter().enumerate() {
        word_pairs.clear();
        word_pairs.extend(tokens[start..start + len].windows(2).map(|p| pair(p[0], p[1])));
        for &p in &word_pairs {
            pairs.entry(p).or_default().count += word_counts[w];
        }
        word_pairs.sort_unstable();
        word_pairs.dedup();
        for &p in &word_pairs {
            pairs.get_mut(&p).unwrap().words.push(w as u32);
        }
    }
    let mut heap: BinaryHeap<Candidate> =
        pairs.iter().map(|(&pair, st)| Candidate { count: st.count, pair }).collect();

    let mut merges = Vec::new();
    let mut deltas: AHashMap<Pair, i64> = AHashMap::new();
    let mut new_pairs: Vec<Pair> = Vec::new();
    while merges.len() < num_merges {
        let Some(top) = heap.pop() else { break };
        // Entries are upper bounds: counts of existing pairs only ever go down. A stale entry
        // goes back in with its true count; the first fresh one on top is the true maximum.
        let count = pairs.get(&top.pair).map_or(0, |st| st.count);
        if count <= 0 {
            continue;
        }
        if count != top.count {
            heap.push(Candidate { count, pair: top.pair });
            continue;
        }
        let (a, b) = unpair(top.pair);
        let z = 256 + merges.len() as u32;
        merges.push((a, b));

        deltas.clear();
        for w in pairs.remove(&top.pair).unwrap().words {
            let (start, len) = spans[w as usize];
            let wc = word_counts[w as usize];
            new_pairs.clear();
            let new_len = merge_word(&mut tokens[start..start + len], a, b, z, |p, d| {
                *deltas.entry(p).or_insert(0) += d * wc;
                if d > 0 && !new_pairs.contains(&p) {
                    new_pairs.push(p);
                }
            });
            spans[w as usize].1 = new_len;
            for &p in &new_pairs {
                pairs.entry(p).or_default().words.push(w);
            }
        }
        for (&p, &d) in &deltas {
            if p == top.pair {
                continue;
            }
            let Some(st) = pairs.get_mut(&p) else { continue };
            st.count += d;
            let (l, r) = unpair(p);
            if st.count > 0 && (l == z || r == z) {
                // A pair with the new token is new: it gets its (only) heap entry now.
                heap.push(Candidate { count: st.count, pair: p });
            } else if st.count <= 0 {
                // An old pair never gains count again, so one that hit zero is gone for good.
                pairs.remove(&p);
            }
        }

        let done = merges.len();
        if verbose && (done * 10 / num_merges) != ((done - 1) * 10 / num_merges) {
            eprintln!("rustbpe: merge {}/{} ({}, {}) -> {} count {}", done, num_merges, a, b, z, count);
        }
    }
    if verbose && merges.len() < num_merges {
        eprintln!("rustbpe: stopped after {} merges: no pair left to merge", merges.len());
    }
    merges
}
