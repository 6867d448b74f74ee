//! The NCCL unique id (128 bytes that rank 0 draws and every rank needs to join the
//! communicator) as values the CPU backend's broadcast carries: one f32 per byte, exact.

use std::ffi::c_char;

use crate::{Result, TrainerError};

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// The id's bytes as f32 values.
pub fn encode(id: &[c_char; UNIQUE_ID_BYTES]) -> Vec<f32> {
    id.iter().map(|b| f32::from(*b)).collect()
}

/// The id back from `values`, refusing anything that is not 128 byte values.
pub fn decode(values: &[f32]) -> Result<[c_char; UNIQUE_ID_BYTES]> {
    let mut id: [c_char; UNIQUE_ID_BYTES] = [0; UNIQUE_ID_BYTES];
    let bytes = f32::from(c_char::MIN)..=f32::from(c_char::MAX);
    if values.len() != UNIQUE_ID_BYTES {
        return Err(bad(format!(
            "{} values, not {UNIQUE_ID_BYTES}",
            values.len()
        )));
    }
    for (slot, v) in id.iter_mut().zip(values) {
        if v.fract() != 0.0 || !bytes.contains(v) {
            return Err(bad(format!("{v} is not a byte")));
        }
        *slot = *v as c_char;
    }
    Ok(id)
}

fn bad(why: String) -> TrainerError {
    TrainerError::Collective {
        rank: 0,
        reason: format!("the NCCL unique id from rank 0 is damaged: {why}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_survives_the_round_trip_and_damage_is_refused() {
        let mut id: [c_char; UNIQUE_ID_BYTES] = [0; UNIQUE_ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 37 % 100) as c_char;
        }
        id[0] = c_char::MIN;
        id[1] = c_char::MAX;
        assert_eq!(decode(&encode(&id)).unwrap(), id);
        let mut values = encode(&id);
        values[5] = 0.5;
        assert!(
            decode(&values)
                .unwrap_err()
                .to_string()
                .contains("not a byte")
        );
        assert!(decode(&values[1..]).is_err());
    }
}
