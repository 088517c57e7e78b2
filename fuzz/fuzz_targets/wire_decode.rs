//! Frame decoding never panics; what decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| brelu::secure::wire::fuzz_decode(data));
