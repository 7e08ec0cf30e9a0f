#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| oskit_fuzz::ring_buffer::mapped_reader(data));
