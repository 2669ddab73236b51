//! The fuzz targets (`fuzz/`) on the stable toolchain, in the ordinary test run: each
//! target's body replays its seed corpus (`fuzz/corpus/<target>/`) and its regression
//! inputs (`fuzz/regressions/<target>/`, crashes found earlier), then runs for a
//! bounded time (`FUZZ_SECS`, default 20) on inputs mutated from them with a seeded
//! generator (`FUZZ_SEED`, printed). A panic saves the input to
//! `fuzz/artifacts/<target>/` and fails the test; commit it under
//! `fuzz/regressions/<target>/` with the fix. Coverage-guided runs with libFuzzer:
//! `scripts/fuzz.sh`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../../fuzz/bodies/datagram_router.rs"]
mod datagram_router;
#[path = "../../fuzz/bodies/jwt_verify.rs"]
mod jwt_verify;
#[path = "../../fuzz/bodies/sdp_offer.rs"]
mod sdp_offer;
#[path = "../../fuzz/bodies/signaling_decode.rs"]
mod signaling_decode;

/// Largest mutated input, as `scripts/fuzz.sh`'s `-max_len`.
const MAX_LEN: usize = 65_536;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// xorshift64*: a small seeded generator, so a run can be repeated with `FUZZ_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `input` (libFuzzer's basic ones): flip a bit, set a byte to an
/// interesting value, insert or delete a run, duplicate a run, splice with `other`.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    const INTERESTING: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b':', b'\\'];
    match rng.below(7) {
        0 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] ^= 1 << rng.below(8);
        }
        1 if !input.is_empty() => {
            let i = rng.below(input.len());
            input[i] = INTERESTING[rng.below(INTERESTING.len())];
        }
        2 => {
            let at = rng.below(input.len() + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            input.splice(at..at, bytes);
        }
        3 if !input.is_empty() => {
            let at = rng.below(input.len());
            let n = (1 + rng.below(16)).min(input.len() - at);
            input.drain(at..at + n);
        }
        4 if !input.is_empty() => {
            let at = rng.below(input.len());
            let n = (1 + rng.below(64)).min(input.len() - at);
            let run = input[at..at + n].to_vec();
            let to = rng.below(input.len() + 1);
            input.splice(to..to, run);
        }
        5 if !other.is_empty() => {
            let cut = rng.below(input.len() + 1);
            let from = rng.below(other.len());
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        _ => {
            let n = rng.below(256);
            *input = (0..n).map(|_| rng.next() as u8).collect();
        }
    }
    input.truncate(MAX_LEN);
}

fn files(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    paths
        .into_iter()
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

/// Runs `input` through `body`; on a panic saves it and fails the test.
fn one(target: &str, body: fn(&[u8]), input: &[u8], seed: u64) {
    if catch_unwind(AssertUnwindSafe(|| body(input))).is_err() {
        let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
        let dir = fuzz_dir().join("artifacts").join(target);
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("crash-{hash:016x}"));
        let _ = std::fs::write(&path, input);
        panic!(
            "{target} panicked on an input saved to {} (FUZZ_SEED={seed}); fix it and add the input to fuzz/regressions/{target}/",
            path.display()
        );
    }
}

/// Replays the corpus and regressions, then mutates for `FUZZ_SECS`; returns the runs.
fn campaign(target: &str, body: fn(&[u8])) -> u64 {
    let secs: u64 = std::env::var("FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let corpus = files(&fuzz_dir().join("corpus").join(target));
    assert!(!corpus.is_empty(), "{target} has a seed corpus");
    let regressions = files(&fuzz_dir().join("regressions").join(target));
    for input in corpus.iter().chain(&regressions) {
        one(target, body, input, seed);
    }
    let mut rng = Rng(seed);
    let mut pool = corpus;
    pool.extend(regressions);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let mut input = pool[rng.below(pool.len())].clone();
        let other = pool[rng.below(pool.len())].clone();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut input, &other);
        }
        one(target, body, &input, seed);
        runs += 1;
        // Keep some mutants as seeds for further mutation (bounded pool).
        if pool.len() < 256 && rng.below(8) == 0 {
            pool.push(input);
        }
    }
    println!("fuzz {target}: {runs} mutated inputs in {secs} s, FUZZ_SEED={seed}, no panic");
    runs
}

#[test]
fn fuzz_signaling_decode() {
    assert!(campaign("signaling_decode", signaling_decode::run) > 0);
}

#[test]
fn fuzz_jwt_verify() {
    assert!(campaign("jwt_verify", jwt_verify::run) > 0);
}

#[test]
fn fuzz_sdp_offer() {
    assert!(campaign("sdp_offer", sdp_offer::run) > 0);
}

#[test]
fn fuzz_datagram_router() {
    assert!(campaign("datagram_router", datagram_router::run) > 0);
}
