//! The checkpoint manifest parser: a manifest that parses lists only plain file names with
//! well-formed digests, and serialises back to itself.
#![no_main]

use finetune_formats::manifest::{Manifest, is_plain_file_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        for (name, digest) in &m.files {
            assert!(is_plain_file_name(name));
            assert_eq!(digest.len(), 64);
        }
        let json = m.to_json().expect("a parsed manifest serialises");
        assert_eq!(Manifest::parse(json.as_bytes()).expect("roundtrip"), m);
    }
});
