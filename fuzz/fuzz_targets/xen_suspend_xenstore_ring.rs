#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| oskit_fuzz::xen_suspend::xenstore_ring(data));
