//! An own Llama for training: HF config and weight names, all-position logits, causal and
//! padding masks, built only from differentiable candle ops.

pub mod config;
pub mod dropout;
pub mod frozen;
mod handover;
pub mod head_rows;
pub mod linear;
pub mod llama;
pub mod llama2c;
pub mod load;
pub mod lora;
mod lora_node;
pub mod placement;
pub mod quantized_cache;
pub mod rope;
pub mod shard;
pub mod softmax;
pub mod tiny;
pub mod weights;

pub use config::LlamaConfig;
pub use linear::Linear;
pub use llama::{Gradients, HeadInput, KvCache, Llama, LossAndGrads, TrainableSpec};
pub use lora::LoraSettings;
pub use placement::LayerDevices;
