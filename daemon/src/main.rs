//! The ultd binary.
fn main() {}
