use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the model is adapted.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MethodSpec {
    /// `lora` trains small low-rank adapters next to frozen weights (the adapter is the output);
    /// `full` trains the selected layers' own weights.
    #[serde(default, rename = "type")]
    pub method_type: MethodType,
    /// LoRA settings (only with `type: lora`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// Which transformer layers train; the others stay frozen. All layers when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_layers: Option<TrainableLayers>,
    /// Replaces the MLP activation function. On a pretrained base this changes what the weights
    /// compute, so the job gets an `ActivationOverride` warning condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
}

impl Default for MethodSpec {
    fn default() -> Self {
        MethodSpec {
            method_type: MethodType::Lora,
            lora: None,
            trainable_layers: None,
            activation: None,
        }
    }
}

impl MethodSpec {
    /// The LoRA settings in effect (the defaults when `type: lora` and `lora` is unset).
    pub fn lora_or_default(&self) -> Option<LoraSpec> {
        match self.method_type {
            MethodType::Lora => Some(self.lora.clone().unwrap_or_default()),
            MethodType::Full => None,
        }
    }
}

/// Fine-tuning method.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MethodType {
    /// Low-rank adapters (PEFT LoRA).
    #[default]
    Lora,
    /// Full fine-tuning of the selected layers.
    Full,
}

/// LoRA hyperparameters.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoraSpec {
    /// Rank of the adapters.
    #[serde(default = "default_rank")]
    #[schemars(range(min = 1, max = 1024))]
    pub rank: u32,
    /// Scaling numerator: adapters are scaled by `alpha / rank`.
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 0.001, max = 4096.0))]
    pub alpha: f64,
    /// Dropout on the adapter input during training.
    #[serde(default = "default_dropout")]
    #[schemars(range(min = 0.0, max = 0.9))]
    pub dropout: f64,
    /// Projections that get adapters (Hugging Face module names).
    #[serde(default = "default_targets")]
    #[schemars(length(min = 1, max = 7))]
    pub target_modules: Vec<TargetModule>,
    /// Also train the `lm_head` rows of the tokens that spell the class labels and of the `</s>`
    /// that ends each answer (PEFT's `trainable_token_indices` on `lm_head`; saved in the
    /// adapter). Turn it on when the base rarely writes the label words or never ends a text
    /// with `</s>` (a small or domain base): adapters alone cannot separate
    /// labels whose head rows the base never trained. Only those rows change, so every other
    /// token's logit stays the base's. Classification datasets only; not with tied embeddings.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub train_label_tokens: bool,
    /// How the frozen base's projection weights (q, k, v, o, gate, up, down of every layer) are
    /// held during training: `none` (the model's dtype), `int8` (8.5 bits per weight) or
    /// `int4` (4.5 bits per weight), QLoRA-style. Adapters, their gradients and AdamW state stay
    /// f32; embeddings, norms and lm_head stay in the model's dtype. The exported adapter is a
    /// standard PEFT adapter for the unquantized base, and merged weights are made from the
    /// unquantized base. LoRA only: a quantized base cannot be fully fine-tuned.
    #[serde(default, skip_serializing_if = "BaseQuantization::is_none")]
    pub base_quantization: BaseQuantization,
    /// Keep the model's general text ability: adds `weight · KL(base ‖ tuned)`, the divergence
    /// of the tuned model's next-token distribution from the base's, at the prompt positions
    /// (the text the model reads, not the answers it learns) to the training loss. The base is
    /// the same model without its adapters, so it costs no memory, and one forward without a
    /// backward pass per micro-batch in time. On the demo it brought the retention perplexity
    /// ratio (`evaluation.retention`) from 1.78 to 1.02 at equal accuracy. Unset: the task's
    /// loss alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_to_base: Option<KlToBase>,
}

/// The KL-to-base penalty of LoRA training (`method.lora.klToBase`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KlToBase {
    /// The penalty's weight against the task's mean loss per answer token (1 weighs a nat of
    /// divergence per prompt position like a nat of answer loss).
    #[serde(default = "default_kl_weight")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub weight: f64,
    /// Every `positionStride`-th prompt position of a batch is compared (1: all of them).
    /// Larger strides cost less (`lm_head` work grows with the positions compared).
    #[serde(default = "default_kl_stride")]
    #[schemars(range(min = 1, max = 64))]
    pub position_stride: u32,
}

impl Default for KlToBase {
    fn default() -> Self {
        KlToBase {
            weight: default_kl_weight(),
            position_stride: default_kl_stride(),
        }
    }
}

fn default_kl_weight() -> f64 {
    1.0
}
fn default_kl_stride() -> u32 {
    4
}

/// The storage format of a frozen base's projection weights during LoRA training.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum BaseQuantization {
    /// The model's own dtype (bf16 on GPUs, f32 on CPU).
    #[default]
    None,
    /// 8-bit: GGML `Q8_0`, blocks of 32 weights sharing one f16 scale (34 bytes per block).
    Int8,
    /// 4-bit: GGML `Q4_0`, blocks of 32 weights sharing one f16 scale (18 bytes per block).
    Int4,
}

impl BaseQuantization {
    /// Whether the base stays in the model's dtype.
    pub fn is_none(&self) -> bool {
        *self == BaseQuantization::None
    }

    /// The name in the spec (`none`, `int8`, `int4`).
    pub fn name(&self) -> &'static str {
        match self {
            BaseQuantization::None => "none",
            BaseQuantization::Int8 => "int8",
            BaseQuantization::Int4 => "int4",
        }
    }

    /// The formats that store the base in fewer bytes than this one, largest first (what a fit
    /// refusal may offer).
    pub fn smaller(&self) -> &'static [BaseQuantization] {
        match self {
            BaseQuantization::None => &[BaseQuantization::Int8, BaseQuantization::Int4],
            BaseQuantization::Int8 => &[BaseQuantization::Int4],
            BaseQuantization::Int4 => &[],
        }
    }

    /// Weights per block and bytes per block of the format (`None` for the model's dtype).
    pub fn block(&self) -> Option<(u64, u64)> {
        match self {
            BaseQuantization::None => None,
            BaseQuantization::Int8 => Some((32, 34)),
            BaseQuantization::Int4 => Some((32, 18)),
        }
    }
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            target_modules: default_targets(),
            train_label_tokens: false,
            base_quantization: BaseQuantization::None,
            kl_to_base: None,
        }
    }
}

fn default_rank() -> u32 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_dropout() -> f64 {
    0.05
}
fn default_targets() -> Vec<TargetModule> {
    vec![TargetModule::QProj, TargetModule::VProj]
}

/// A linear projection of a Llama layer, named as in Hugging Face checkpoints.
#[derive(
    Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    /// `self_attn.q_proj`.
    QProj,
    /// `self_attn.k_proj`.
    KProj,
    /// `self_attn.v_proj`.
    VProj,
    /// `self_attn.o_proj`.
    OProj,
    /// `mlp.gate_proj`.
    GateProj,
    /// `mlp.up_proj`.
    UpProj,
    /// `mlp.down_proj`.
    DownProj,
}

impl TargetModule {
    /// Every projection of a decoder layer, in forward order.
    pub const ALL: [TargetModule; 7] = [
        TargetModule::QProj,
        TargetModule::KProj,
        TargetModule::VProj,
        TargetModule::OProj,
        TargetModule::GateProj,
        TargetModule::UpProj,
        TargetModule::DownProj,
    ];

    /// The module path inside a layer, as in Hugging Face weight names (`self_attn.q_proj`).
    pub fn hf_path(self) -> &'static str {
        match self {
            TargetModule::QProj => "self_attn.q_proj",
            TargetModule::KProj => "self_attn.k_proj",
            TargetModule::VProj => "self_attn.v_proj",
            TargetModule::OProj => "self_attn.o_proj",
            TargetModule::GateProj => "mlp.gate_proj",
            TargetModule::UpProj => "mlp.up_proj",
            TargetModule::DownProj => "mlp.down_proj",
        }
    }
}

/// A selection of transformer layers. Set at most one of `last` and `indices`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TrainableLayers {
    /// Train the last N layers (closest to the output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 80))]
    pub last: Option<u32>,
    /// Train exactly these layer indices (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 80), inner(range(min = 0, max = 79)))]
    pub indices: Option<Vec<u32>>,
}

impl TrainableLayers {
    /// The selected layer indices for a model with `num_layers` layers, sorted and deduplicated.
    pub fn resolve(selection: Option<&TrainableLayers>, num_layers: u32) -> Vec<u32> {
        match selection {
            Some(TrainableLayers {
                indices: Some(ix), ..
            }) => {
                let mut v: Vec<u32> = ix.iter().copied().filter(|i| *i < num_layers).collect();
                v.sort_unstable();
                v.dedup();
                v
            }
            Some(TrainableLayers { last: Some(n), .. }) => {
                (num_layers.saturating_sub(*n)..num_layers).collect()
            }
            _ => (0..num_layers).collect(),
        }
    }
}

/// MLP activation function.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (swish), Llama's own (`silu`).
    #[serde(rename = "silu")]
    Silu,
    /// GELU, exact (`gelu`).
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    #[serde(rename = "gelu_pytorch_tanh")]
    GeluTanh,
    /// ReLU (`relu`).
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    /// Every activation.
    pub const ALL: [Activation; 4] = [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Relu,
    ];

    /// The Hugging Face `config.json` `hidden_act` name, which is also its manifest spelling
    /// (one home: the serde rename above).
    pub fn hf_name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}
