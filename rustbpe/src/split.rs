//! Pre-tokenization: cutting text into chunks that BPE merges never cross.
//!
//! The default pattern gets a hand-written scanner (regex engines are the bottleneck of
//! training); any other pattern goes through fancy-regex.

use crate::unicode_tables::{CLASS_RANGES, EXTRA_FOLDS};

/// GPT-4 style split pattern, with numbers grouped 1-2 digits (better for small vocabularies).
pub const DEFAULT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub enum Splitter {
    Default,
    Regex(fancy_regex::Regex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        if pattern == DEFAULT_PATTERN {
            return Ok(Splitter::Default);
        }
        fancy_regex::Regex::new(pattern)
            .map(Splitter::Regex)
            .map_err(|e| format!("invalid split pattern {:?}: {}", pattern, e))
    }

    /// Calls `f` on every chunk of `text`, in order.
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Default => {
                let mut pos = 0;
                while pos < text.len() {
                    let end = default_chunk_end(text, pos);
                    f(&text[pos..end]);
                    pos = end;
                }
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed: {}", e))?;
                    f(m.as_str());
                }
            }
        }
        Ok(())
    }
}

// Character classes of the default pattern: \p{L}, \p{N}, \s (the Unicode White_Space
// property) and everything else. Rust's char::is_alphabetic / is_numeric / is_whitespace are
// different properties, hence our own tables, generated from the Python `regex` module.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Other = 0,
    Letter = 1,
    Number = 2,
    Space = 3,
}

const fn ascii_class(b: u8) -> Class {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
        b'0'..=b'9' => Class::Number,
        b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ' => Class::Space,
        _ => Class::Other,
    }
}

const ASCII_CLASS: [Class; 128] = {
    let mut t = [Class::Other; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = ascii_class(i as u8);
        i += 1;
    }
    t
};

fn class_of(c: char) -> Class {
    let cp = c as u32;
    if cp < 128 {
        return ASCII_CLASS[cp as usize];
    }
    // Last range starting at or before cp.
    let i = CLASS_RANGES.partition_point(|&(lo, _, _)| lo <= cp);
    if i > 0 {
        let (_, hi, cls) = CLASS_RANGES[i - 1];
        if cp <= hi {
            return match cls {
                1 => Class::Letter,
                2 => Class::Number,
                _ => Class::Space,
            };
        }
    }
    Class::Other
}

/// The char at byte offset `pos` (must be a char boundary) with its class and UTF-8 length.
#[inline]
fn peek(text: &str, pos: usize) -> Option<(char, Class, usize)> {
    let b = *text.as_bytes().get(pos)?;
    if b < 128 {
        return Some((b as char, ASCII_CLASS[b as usize], 1));
    }
    let c = text[pos..].chars().next()?;
    Some((c, class_of(c), c.len_utf8()))
}

/// Byte offset where the run of chars of class `cls` starting at `pos` ends.
#[inline]
fn run_end(text: &str, mut pos: usize, cls: Class) -> usize {
    let bytes = text.as_bytes();
    // ASCII fast path, then the general one.
    while pos < bytes.len() {
        let b = bytes[pos];
        if b < 128 {
            if ASCII_CLASS[b as usize] != cls {
                return pos;
            }
            pos += 1;
        } else {
            match peek(text, pos) {
                Some((_, c, n)) if c == cls => pos += n,
                _ => return pos,
            }
        }
    }
    pos
}

/// Lowercase ASCII letter that `c` matches under the pattern's (?i), if any.
fn fold(c: char) -> Option<u8> {
    if c.is_ascii() {
        return Some((c as u8).to_ascii_lowercase());
    }
    EXTRA_FOLDS.iter().find(|&&(x, _)| x == c).map(|&(_, t)| t)
}

/// End of the chunk that starts at `pos`, mirroring the alternatives of DEFAULT_PATTERN
/// (tried in order, as a backtracking regex engine would).
fn default_chunk_end(text: &str, pos: usize) -> usize {
    let (c0, k0, n0) = peek(text, pos).expect("pos is inside text");
    let next = peek(text, pos + n0);

    // '(?i:[sdmt]|ll|ve|re)
    if c0 == '\'' {
        if let Some((c1, _, n1)) = next {
            match fold(c1) {
                Some(b's' | b'd' | b'm' | b't') => return pos + 1 + n1,
                Some(first @ (b'l' | b'v' | b'r')) => {
                    let second = if first == b'l' { b'l' } else { b'e' };
                    if let Some((c2, _, n2)) = peek(text, pos + 1 + n1) {
                        if fold(c2) == Some(second) {
                            return pos + 1 + n1 + n2;
                        }
                    }
                }
                _ => {}
            }
        }
    }
    // [^\r\n\p{L}\p{N}]?+\p{L}+
    if k0 == Class::Letter {
        return run_end(text, pos + n0, Class::Letter);
    }
    let next_class = next.map(|(_, k, _)| k);
    if k0 != Class::Number && c0 != '\r' && c0 != '\n' && next_class == Some(Class::Letter) {
        return run_end(text, pos + n0, Class::Letter);
    }
    // \p{N}{1,2}
    if k0 == Class::Number {
        return match next {
            Some((_, Class::Number, n1)) => pos + n0 + n1,
            _ => pos + n0,
        };
    }
    // ' ?[^\s\p{L}\p{N}]++[\r\n]*'
    let other_start = if k0 == Class::Other {
        Some(pos)
    } else if c0 == ' ' && next_class == Some(Class::Other) {
        Some(pos + 1)
    } else {
        None
    };
    if let Some(start) = other_start {
        let mut end = run_end(text, start, Class::Other);
        while let Some(b'\r' | b'\n') = text.as_bytes().get(end) {
            end += 1;
        }
        return end;
    }
    // Only whitespace is left. Scan its run, remembering the last \r or \n and the last char.
    debug_assert_eq!(k0, Class::Space);
    let mut end = pos;
    let mut last_newline_end = None;
    let mut last_char_start = pos;
    while let Some((c, Class::Space, n)) = peek(text, end) {
        last_char_start = end;
        end += n;
        if c == '\r' || c == '\n' {
            last_newline_end = Some(end);
        }
    }
    // \s*[\r\n]: backtracks to the last newline of the run.
    if let Some(e) = last_newline_end {
        return e;
    }
    // \s+(?!\S): the whole run at the end of text, else all but its last char (if that
    // leaves any); \s+ otherwise.
    if end == text.len() || last_char_start == pos {
        end
    } else {
        last_char_start
    }
}
