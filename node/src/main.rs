//! The `hangar` binary.
fn main() {}
