//! Percentiles for the bench's examples (`#[path]`-included by each; not part of pgcdc).

/// Prints `<name>_samples`, `_p50`, `_p99`, `_max` and `_mean` (milliseconds, `nan` without
/// samples) as `key=value` lines for bench/run.sh. Quantiles are nearest-rank: the smallest
/// sample with at least that share of all samples at or below it.
pub fn print_stats(name: &str, samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
    let pick = |q: f64| -> f64 {
        if samples.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1]
    };
    let mean = if samples.is_empty() {
        f64::NAN
    } else {
        samples.iter().sum::<f64>() / samples.len() as f64
    };
    println!("{name}_samples={}", samples.len());
    println!("{name}_p50={:.1}", pick(0.50));
    println!("{name}_p99={:.1}", pick(0.99));
    println!(
        "{name}_max={:.1}",
        samples.last().copied().unwrap_or(f64::NAN)
    );
    println!("{name}_mean={mean:.1}");
}
