//! Turning logits into the next token: temperature (0 = greedy), top-k, top-p, min-p,
//! repetition and presence penalties, with a seeded generator so a run can be repeated.

use serde::{Deserialize, Serialize};

/// How to pick tokens. The defaults are greedy decoding with no penalties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0: none).
    pub min_p: f32,
    /// >1 makes recently seen tokens less likely (llama.cpp's rule).
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every recently seen token.
    pub presence_penalty: f32,
    /// Seed of the random generator; the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid sampling option: {0}")]
pub struct InvalidSampling(pub String);

impl SamplingParams {
    pub fn validate(&self) -> Result<(), InvalidSampling> {
        let bad = |m: &str| Err(InvalidSampling(m.to_owned()));
        if !(0.0..=10.0).contains(&self.temperature) {
            return bad("temperature must be between 0 and 10");
        }
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !(0.0..=10.0).contains(&self.repetition_penalty) || self.repetition_penalty == 0.0 {
            return bad("repetition_penalty must be in (0, 10]");
        }
        if !(-10.0..=10.0).contains(&self.presence_penalty) {
            return bad("presence_penalty must be in [-10, 10]");
        }
        Ok(())
    }
}

/// Tokens at the end of the history that penalties look at.
const PENALTY_WINDOW: usize = 64;

pub struct Sampler {
    params: SamplingParams,
    rng: u64,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = params.seed ^ 0x9E37_79B9_7F4A_7C15;
        Self {
            params,
            rng,
            scratch: Vec::new(),
        }
    }

    fn next_f32(&mut self) -> f32 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Whether the next token is simply the most likely one (temperature 0, no penalties), so
    /// that a step may give back that token instead of the logits ([`super::Logits::Greedy`]).
    pub fn is_greedy(&self) -> bool {
        let p = &self.params;
        p.temperature <= 0.0 && p.repetition_penalty == 1.0 && p.presence_penalty == 0.0
    }

    /// Picks the next token; `history` is prompt plus generated tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 {
            let start = history.len().saturating_sub(PENALTY_WINDOW);
            let mut seen: Vec<u32> = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                    *l -= p.presence_penalty;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let (temperature, top_k, top_p, min_p) = (p.temperature, p.top_k, p.top_p, p.min_p);
        // Tokens whose probability relative to the best is below `floor` can never be drawn
        // (min-p) or are negligible (e^-20): drop them before sorting the vocabulary.
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) / temperature;
        let floor = if min_p > 0.0 {
            min_p.ln().max(-20.0)
        } else {
            -20.0
        };
        let c = &mut self.scratch;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l / temperature))
                .filter(|&(_, l)| l - max >= floor),
        );
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if top_k > 0 && top_k < c.len() {
            c.select_nth_unstable_by(top_k - 1, by_logit);
            c.truncate(top_k);
        }
        c.sort_unstable_by(by_logit);
        let max = c[0].1;
        let mut sum = 0.0;
        for e in c.iter_mut() {
            e.1 = (e.1 - max).exp();
            sum += e.1;
        }
        for e in c.iter_mut() {
            e.1 /= sum;
        }
        if min_p > 0.0 {
            let floor = c[0].1 * min_p;
            let keep = c.iter().take_while(|e| e.1 >= floor).count().max(1);
            c.truncate(keep);
        }
        if top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                acc += e.1;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        let total: f32 = c.iter().map(|e| e.1).sum();
        let mut r = self.next_f32() * total;
        for e in self.scratch.iter() {
            r -= e.1;
            if r <= 0.0 {
                return e.0;
            }
        }
        self.scratch.last().map(|e| e.0).unwrap_or(0)
    }
}

/// The index of the largest value (the first one on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = vec![0.1, 2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut logits.clone(), &[]), 1);
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let run = |p: &SamplingParams| -> Vec<u32> {
            let mut s = Sampler::new(p.clone());
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect()
        };
        assert_eq!(run(&params), run(&params));
        assert!(
            run(&params).contains(&2),
            "temperature 1 must sometimes pick the second best"
        );
        let topk1 = SamplingParams {
            top_k: 1,
            ..params.clone()
        };
        assert!(run(&topk1).iter().all(|&t| t == 1));
        let minp = SamplingParams {
            min_p: 0.5,
            ..params.clone()
        };
        assert!(run(&minp).iter().all(|&t| t == 1 || t == 2));
    }

    #[test]
    fn repetition_penalty_moves_the_choice() {
        let logits = vec![0.1, 2.0, 1.9];
        let p = SamplingParams {
            repetition_penalty: 1.5,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut logits.clone(), &[1]), 2);
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
