//! The safetensors header validator: an accepted file has tensors that tile its data area exactly,
//! each sized by its dtype and shape.
#![no_main]

use finetune_formats::safetensors::{dtype_size, validate_buffer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = validate_buffer(data) {
        let data_len = data.len() - 8 - h.header_len;
        let mut end = 0usize;
        for t in &h.tensors {
            assert_eq!(t.data_offsets.0, end);
            let n: usize = t.shape.iter().product();
            let size = dtype_size(&t.dtype).expect("known dtype");
            assert_eq!(t.data_offsets.1 - t.data_offsets.0, n * size);
            end = t.data_offsets.1;
        }
        assert_eq!(end, data_len);
    }
});
