#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| oskit_fuzz::pv_apf::host_events(data));
