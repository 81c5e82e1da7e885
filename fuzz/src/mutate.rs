//! A small deterministic mutator for the bounded fuzz run of the test suite: the same kinds of
//! edits a coverage-guided fuzzer makes (bit flips, interesting values, inserts, deletes,
//! duplicated ranges, splices with another input), driven by a seeded generator so that a
//! failure reproduces.

/// SplitMix64: tiny, seedable, good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x10, 0x40, 0x08];

/// `input` with one to four random edits, at most `max_len` bytes long. `other` is a second
/// input to splice from.
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng, max_len: usize) -> Vec<u8> {
    let mut d = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = d.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                d[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            3 if len >= 4 => {
                // A 16- or 32-bit field set to an edge value.
                let i = rng.below(len - 3);
                let v: u32 = [0, 1, 0x7fff_ffff, 0x8000_0000, u32::MAX, 0xffff][rng.below(6)];
                let width = if rng.below(2) == 0 { 2 } else { 4 };
                d[i..i + width].copy_from_slice(&v.to_be_bytes()[4 - width..]);
            }
            4 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                d.splice(i..i, bytes);
            }
            5 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                d.drain(i..i + n);
            }
            6 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let copy = d[i..i + n].to_vec();
                let at = rng.below(len + 1);
                d.splice(at..at, copy);
            }
            7 if !other.is_empty() => {
                // Splice: a prefix of this input, a suffix of the other.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                d.truncate(cut);
                d.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                d.truncate(rng.below(len));
            }
            _ => d.push(rng.next_u64() as u8),
        }
    }
    d.truncate(max_len);
    d
}
