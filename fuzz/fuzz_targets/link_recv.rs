//! `cargo +nightly fuzz run link_recv`: hostile bytes against the receive side of a link (the
//! handshake, frames inside an authenticated link, bytes injected past the cipher).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    brelu::secure::fuzz::link_recv(data);
});
