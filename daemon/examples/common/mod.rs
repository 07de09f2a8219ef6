//! Helpers the benchmark and check tools share (daemon, client and tests examples include this file): flag
//! lookup without a parser crate, and the median.

/// The value after `name` in `args`, if any.
pub fn arg_opt(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The value after `name` in `args`, or `default`.
#[allow(dead_code)] // not every including example uses every helper
pub fn arg(args: &[String], name: &str, default: &str) -> String {
    arg_opt(args, name).unwrap_or_else(|| default.to_string())
}

/// The median (the upper one for an even count); NaN for no values.
#[allow(dead_code)]
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
