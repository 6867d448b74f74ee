//! The memory plan: what the trainer allocates on one device for one optimizer step, component
//! by component. The fit check compares it with a GPU's memory; `finetune-trainer plan` prints it.
//!
//! The activation terms count the tensors the trainer's own forward (`trainer/src/model`) keeps
//! for the backward, op by op; candle keeps every intermediate of a recorded op until the loss is
//! dropped. Per decoder layer, with `s` = batch × sequence rows, `a` the activation dtype's bytes
//! and `S` = batch × heads × sequence² attention scores:
//! - each RMSNorm: f32 square and scaled copies, plus the dtype conversions and the weight product
//!   (on the CPU in f32 one op that keeps its output only);
//! - a frozen projection: its output; a LoRA projection also the f32 adapter path (input
//!   conversion, rank-r and out-sized products, the scale, the sum; on the CPU in f32 one node
//!   that keeps only the rank-r product) and, with dropout, the masked input and (except on the
//!   CPU in f32) the mask; a trained projection: its output;
//! - Q/K/V made contiguous per head, RoPE on Q and K (4.5 copies each; on the CPU in f32 one op
//!   that splits and rotates the heads and keeps only its output);
//! - attention: one copy of `S` in the activation dtype (the softmax's output, which the one
//!   node of the attention core keeps for its backward, `trainer/src/model/llama/attention_core.rs`);
//!   the core's merged output; the residuals;
//! - the MLP: gate, activation, up, product, down (on the CPU in f32 the SiLU-gated product is
//!   one op and keeps only the product).
//!
//! Layers below the lowest trained one record nothing (their inputs need no gradient) unless the
//! embeddings are trained. With activation checkpointing the forward keeps one (s, hidden) input
//! per layer and the backward holds one recomputed layer at a time. The backward's working set is
//! taken as one layer's activations. Parameters are not sharded: under data parallelism every
//! GPU holds the whole model, so the plan is per device and the budget is one GPU's memory.
//! When the decoder layers are split over a pod's GPUs ([`crate::placement`]), each GPU is
//! planned for its [`DeviceShare`]: its layers, and the embeddings (first GPU) or the final
//! norm, LM head and logits (last GPU).

use serde::Serialize;

use crate::fit::{
    effective_cpu_workers, effective_gpu_memory_gib, effective_gpus,
    effective_gradient_checkpointing, effective_precision,
};
use crate::presets::ModelArchitecture;
use crate::v1alpha1::{BaseQuantization, FineTuneJobSpec, TargetModule, TrainableLayers};

/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;
/// The CUDA context and kernels' memory on each GPU, outside the allocator.
pub const CUDA_CONTEXT_BYTES: u64 = 3 * GIB / 2;
/// The trainer process on CPU outside its tensors: code, thread pools, tokenizer, dataset.
pub const CPU_RUNTIME_BYTES: u64 = 96 << 20;
/// On the CPU the LM head and the cross-entropy are one op over blocks of loss rows
/// (`trainer/src/loss/linear_ce.rs`); each block's f32 logits take at most this many bytes.
pub const CPU_LOSS_BLOCK_BYTES: u64 = 128 << 20;

/// Loss rows per block of the CPU's fused LM head and cross-entropy for `vocab` tokens.
pub fn cpu_loss_block_rows(vocab: u64) -> u64 {
    (CPU_LOSS_BLOCK_BYTES / (4 * vocab.max(1))).max(1)
}
/// Fragmentation of the device allocator, as a fraction of the tensor bytes.
pub const FRAGMENTATION: f64 = 0.10;

/// What is trained.
#[derive(Clone, Debug, PartialEq)]
pub enum PlannedMethod {
    /// LoRA adapters of `rank` on `targets`, with or without dropout on their input.
    Lora {
        /// Adapter rank.
        rank: u64,
        /// Adapted projections.
        targets: Vec<TargetModule>,
        /// Whether dropout masks are drawn (dropout > 0).
        dropout: bool,
        /// How the frozen projections are stored.
        base: BaseQuantization,
    },
    /// The weights of the trained layers, and with `embeddings_and_head` the embeddings, the
    /// final norm and the LM head.
    Full {
        /// Also train the embeddings, the final norm and the LM head.
        embeddings_and_head: bool,
    },
}

/// Everything the plan depends on, independent of the Kubernetes types.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInput {
    /// The model's shape.
    pub architecture: ModelArchitecture,
    /// Whether the LM head is the embedding matrix (`tie_word_embeddings`).
    pub tied_embeddings: bool,
    /// What is trained.
    pub method: PlannedMethod,
    /// Indices of the trained decoder layers, sorted.
    pub trained_layers: Vec<u32>,
    /// Sequences per micro-batch.
    pub batch: u64,
    /// Tokens per sequence (the longest the batch is padded to).
    pub sequence: u64,
    /// Positions whose logits enter the loss; the fit check assumes every position.
    pub loss_rows: u64,
    /// Bytes of a weight and activation element (2 for bf16, 4 for f32).
    pub dtype_bytes: u64,
    /// Activation checkpointing.
    pub checkpointing: bool,
    /// Whether the trainer runs on a GPU (CUDA context and allocator overheads) or the CPU.
    pub gpu: bool,
    /// Memory of the one device it runs on.
    pub budget_bytes: u64,
    /// On the CPU, the workers a micro-batch's rows are split between
    /// ([`crate::fit::effective_cpu_workers`]): each holds its part's gradients when they are
    /// added up. 1 on a GPU.
    pub cpu_workers: u64,
}

/// One line of the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanComponent {
    /// What it is.
    pub name: &'static str,
    /// Bytes it needs at the step's peak.
    pub bytes: u64,
    /// How it was counted.
    pub detail: String,
}

/// The plan: components, the total per device, the budget and the verdict.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryPlan {
    /// The components, in the order they are allocated.
    pub components: Vec<PlanComponent>,
    /// Sum of the components: what one device needs.
    pub per_gpu_bytes: u64,
    /// Memory of the device (0 for a CPU run, which is not checked).
    pub gpu_budget_bytes: u64,
    /// Whether `per_gpu_bytes` ≤ `gpu_budget_bytes` (always true on CPU).
    pub fits: bool,
    /// Trainable parameters of the whole model.
    pub trainable_parameters: u64,
    /// With the layers split over several GPUs: every GPU's share and total (this plan's
    /// components are those of the busiest one); empty when one device holds the whole model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceLoad>,
}

/// One GPU of a layer split: the layers it holds and its planned bytes.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceLoad {
    /// The GPU's index in the pod (`cuda:N`).
    pub gpu: u32,
    /// The first decoder layer it holds.
    pub first_layer: u32,
    /// One past the last decoder layer it holds.
    pub end_layer: u32,
    /// Its planned total.
    pub bytes: u64,
}

/// The part of the model one device holds: a contiguous run of decoder layers, the embeddings
/// when it holds the first layer, and the final norm, LM head and logits when it holds the last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceShare {
    /// The decoder layers, `first..end`.
    pub layers: std::ops::Range<u32>,
}

impl DeviceShare {
    /// Whether the share holds the embeddings (the first layer's device).
    pub fn holds_embeddings(&self) -> bool {
        self.layers.start == 0
    }

    /// Whether the share holds the final norm, LM head and logits (the last layer's device).
    pub fn holds_head(&self, num_layers: u32) -> bool {
        self.layers.end >= num_layers
    }
}

impl MemoryPlan {
    /// The bytes of the component called `name` (0 when absent).
    pub fn component(&self, name: &str) -> u64 {
        self.components
            .iter()
            .filter(|c| c.name == name)
            .map(|c| c.bytes)
            .sum()
    }
}

impl PlanInput {
    /// The plan's input for a job: the preset's shape, the method, the batch at its longest
    /// (every position in the loss), the resolved precision and checkpointing, one GPU's memory.
    pub fn from_spec(spec: &FineTuneJobSpec) -> Self {
        let architecture = spec.model.preset.architecture();
        let method = match spec.method.lora_or_default() {
            Some(lora) => {
                let mut targets = lora.target_modules.clone();
                targets.sort_unstable();
                targets.dedup();
                PlannedMethod::Lora {
                    rank: u64::from(lora.rank),
                    targets,
                    dropout: lora.dropout > 0.0,
                    base: lora.base_quantization,
                }
            }
            None => PlannedMethod::Full {
                embeddings_and_head: spec.method.trainable_layers.is_none(),
            },
        };
        let trained_layers = TrainableLayers::resolve(
            spec.method.trainable_layers.as_ref(),
            architecture.num_layers,
        );
        let batch = u64::from(spec.hyperparameters.batch_size);
        let sequence = u64::from(spec.hyperparameters.max_sequence_length);
        let gpu = effective_gpus(spec) > 0;
        PlanInput {
            architecture,
            tied_embeddings: false,
            method,
            trained_layers,
            batch,
            sequence,
            loss_rows: batch * sequence,
            dtype_bytes: effective_precision(spec).bytes(),
            checkpointing: effective_gradient_checkpointing(spec),
            gpu,
            budget_bytes: if gpu {
                u64::from(effective_gpu_memory_gib(spec)) * GIB
            } else {
                0
            },
            cpu_workers: if gpu { 1 } else { effective_cpu_workers(spec) },
        }
    }

    fn widths(&self) -> Widths {
        let a = &self.architecture;
        let h = u64::from(a.hidden_size);
        Widths {
            h,
            kv: h * u64::from(a.num_kv_heads) / u64::from(a.num_heads.max(1)),
            f: u64::from(a.intermediate_size),
            vocab: u64::from(a.vocab_size),
        }
    }

    fn is_lora_target(&self, m: TargetModule) -> bool {
        matches!(&self.method, PlannedMethod::Lora { targets, .. } if targets.contains(&m))
    }

    /// Trainable parameters.
    pub fn trainable_parameters(&self) -> u64 {
        self.trainable_parameters_in(&self.whole_model())
    }

    /// The share of one device holding the whole model.
    pub fn whole_model(&self) -> DeviceShare {
        DeviceShare {
            layers: 0..self.architecture.num_layers,
        }
    }

    /// Trainable parameters held by `share`.
    pub fn trainable_parameters_in(&self, share: &DeviceShare) -> u64 {
        let w = self.widths();
        let layers = self
            .trained_layers
            .iter()
            .filter(|l| share.layers.contains(l))
            .count() as u64;
        match &self.method {
            PlannedMethod::Lora { rank, targets, .. } => {
                let per_layer: u64 = targets
                    .iter()
                    .map(|m| {
                        let (i, o) = w.projection(*m);
                        rank * (i + o)
                    })
                    .sum();
                per_layer * layers
            }
            PlannedMethod::Full {
                embeddings_and_head,
            } => {
                let per_layer = w.layer_parameters();
                let mut outside = 0;
                if *embeddings_and_head {
                    let num_layers = self.architecture.num_layers;
                    let whole = share.holds_embeddings() && share.holds_head(num_layers);
                    if share.holds_embeddings() {
                        outside += w.vocab * w.h;
                    }
                    if share.holds_head(num_layers) && !(self.tied_embeddings && whole) {
                        outside += w.vocab * w.h + w.h;
                    } else if share.holds_head(num_layers) {
                        outside += w.h;
                    }
                }
                per_layer * layers + outside
            }
        }
    }

    /// Whether the trainer runs on the CPU in f32, where its own fused ops (the head and loss,
    /// RMSNorm, dropout, RoPE, the SiLU-gated product) replace the primitive ops' copies.
    pub fn fused_cpu_ops(&self) -> bool {
        !self.gpu && self.dtype_bytes == 4
    }

    /// Bytes one decoder layer keeps for its backward.
    pub fn layer_activation_bytes(&self) -> u64 {
        let w = self.widths();
        let a = self.dtype_bytes;
        let s = self.batch * self.sequence;
        let scores = self.batch * u64::from(self.architecture.num_heads) * self.sequence.pow(2);
        let not_f32 = u64::from(a != 4);
        // On the CPU in f32 the norm is one op that keeps only its output
        // (`trainer/src/model/llama/norm.rs`); elsewhere its primitive ops' f32 copies.
        let norm = if self.fused_cpu_ops() {
            s * w.h * a
        } else {
            s * w.h * (8 + a + not_f32 * (4 + a))
        };
        let projection = |m: TargetModule| -> u64 {
            let (i, o) = w.projection(m);
            let mut bytes = s * o * a;
            if self.is_lora_target(m)
                && let PlannedMethod::Lora { rank, dropout, .. } = &self.method
            {
                // The masked input, and the mask itself except on the CPU in f32, where the
                // dropout is drawn again in the backward (`trainer/src/model/dropout.rs`).
                let copies = if self.fused_cpu_ops() { 1 } else { 2 };
                let drop = if *dropout { copies * s * i * a } else { 0 };
                bytes += drop + s * rank * 4;
                // On the CPU in f32 the projection is one node that keeps just those and its
                // output (`trainer/src/model/lora_node.rs`); elsewhere the adapter path's ops
                // keep the input conversion, the out-sized product, the scale and the sum.
                if !self.fused_cpu_ops() {
                    bytes += not_f32 * s * i * 4 + 2 * s * o * 4 + not_f32 * s * o * a + s * o * a;
                }
            }
            bytes
        };
        let projections: u64 = TargetModule::ALL.iter().map(|m| projection(*m)).sum();
        let heads_layout = s * (w.h + 2 * w.kv) * a;
        // On the CPU in f32 the heads are split and rotated by one op that keeps nothing
        // beyond its output (`trainer/src/model/llama/rotary.rs`), counted in `heads_layout`.
        let rope = if self.fused_cpu_ops() {
            0
        } else {
            s * (w.h + w.kv) * a * 9 / 2
        };
        // The attention core is one node that keeps the softmax's output and hands over its
        // merged output (`trainer/src/model/llama/attention_core.rs`).
        let attention = scores * a;
        let attention_out = s * w.h * a;
        let residuals = 2 * s * w.h * a;
        // On the CPU in f32 the SiLU-gated product is one op that keeps only its output
        // (`trainer/src/model/llama/gated.rs`); elsewhere the primitive ops keep three
        // (s, intermediate) tensors, SiLU's output among them.
        let mlp = if self.fused_cpu_ops() { 1 } else { 3 } * s * w.f * a;
        2 * norm + projections + heads_layout + rope + attention + attention_out + residuals + mlp
    }
}

struct Widths {
    h: u64,
    kv: u64,
    f: u64,
    vocab: u64,
}

impl Widths {
    fn projection(&self, m: TargetModule) -> (u64, u64) {
        match m {
            TargetModule::QProj | TargetModule::OProj => (self.h, self.h),
            TargetModule::KProj | TargetModule::VProj => (self.h, self.kv),
            TargetModule::GateProj | TargetModule::UpProj => (self.h, self.f),
            TargetModule::DownProj => (self.f, self.h),
        }
    }

    /// Weights of one layer's seven projections.
    fn projection_parameters(&self) -> u64 {
        2 * self.h * self.h + 2 * self.h * self.kv + 3 * self.h * self.f
    }

    fn layer_parameters(&self) -> u64 {
        self.projection_parameters() + 2 * self.h
    }
}

fn line(name: &'static str, bytes: u64, detail: String) -> PlanComponent {
    PlanComponent {
        name,
        bytes,
        detail,
    }
}

/// The memory plan of `input` on one device holding the whole model.
pub fn plan(input: &PlanInput) -> MemoryPlan {
    plan_share(input, &input.whole_model())
}

/// The memory plan of the device that holds `share` of the model.
pub fn plan_share(input: &PlanInput, share: &DeviceShare) -> MemoryPlan {
    let w = input.widths();
    let a = input.dtype_bytes;
    let arch = &input.architecture;
    let layers = u64::from(arch.num_layers);
    let here = u64::from(share.layers.end.saturating_sub(share.layers.start));
    let embeddings = share.holds_embeddings();
    let head = share.holds_head(arch.num_layers);
    let trainable = input.trainable_parameters_in(share);
    let s = input.batch * input.sequence;
    let mut components = Vec::new();

    // Weights: the layers in the model's dtype, or their projections quantized; the parameters
    // outside the layers (embeddings first, then the final norm and LM head) in the dtype.
    let outside = arch
        .parameters
        .saturating_sub(layers * w.layer_parameters());
    let embedding_parameters = outside.min(w.vocab * w.h);
    let outside_here = u64::from(embeddings) * embedding_parameters
        + u64::from(head) * (outside - embedding_parameters);
    let quantized = match input.method {
        PlannedMethod::Lora { base, .. } => base.block(),
        PlannedMethod::Full { .. } => None,
    };
    match quantized {
        None => {
            let parameters = here * w.layer_parameters() + outside_here;
            components.push(line(
                "weights",
                parameters * a,
                format!("{parameters} parameters × {a} bytes"),
            ));
        }
        Some((per_block, block_bytes)) => {
            let projections = here * w.projection_parameters();
            let rest = here * 2 * w.h + outside_here;
            components.push(line(
                "weights",
                projections.div_ceil(per_block) * block_bytes + rest * a,
                format!(
                    "{projections} projection weights quantized ({block_bytes} bytes per \
                     {per_block}), {rest} others × {a} bytes"
                ),
            ));
            // The backward multiplies by one dequantized projection at a time.
            let largest = w.h * w.f;
            components.push(line(
                "dequantized",
                largest * (4 + a),
                format!("the largest projection ({largest} weights) in f32 and the dtype"),
            ));
        }
    }
    let (adapters, adapters_detail) = match input.method {
        PlannedMethod::Lora { .. } => (trainable * 4, "adapters in f32"),
        PlannedMethod::Full { .. } => (0, "trained weights are the model's own"),
    };
    components.push(line("trainable", adapters, adapters_detail.to_string()));
    // On the CPU in f32 the step's peak is at the fused head and loss, after the forward and
    // before the layers' backward: the layers' activations and one block of logits are alive,
    // the weights' gradients (but a previous micro-batch's sum) are not yet, and the backward
    // frees a layer's activations as it adds its gradients. Elsewhere both copies and a
    // backward working set are counted.
    // With several CPU workers, the parts' gradients of a micro-batch are alive together when
    // they are added up (measured: two workers hold about one more copy than one).
    let (copies, copies_detail) = if input.fused_cpu_ops() {
        let workers = input.cpu_workers.max(1);
        (
            workers,
            format!("the sum over micro-batches and the parts of {workers} CPU worker(s)"),
        )
    } else {
        (2, "the backward's and the accumulated copy".to_string())
    };
    components.push(line(
        "gradients",
        trainable * 4 * copies,
        format!("{trainable} trainable × f32, {copies_detail}"),
    ));
    components.push(line(
        "optimizer",
        trainable * 4 * 2,
        "AdamW first and second moments in f32".to_string(),
    ));

    // Activations of the layers that record: from the lowest trained one up.
    let embeddings_trained = matches!(
        input.method,
        PlannedMethod::Full {
            embeddings_and_head: true
        }
    );
    let lowest = if embeddings_trained {
        0
    } else {
        input
            .trained_layers
            .first()
            .copied()
            .unwrap_or(arch.num_layers)
    };
    let recording = u64::from(
        share
            .layers
            .end
            .saturating_sub(share.layers.start.max(lowest)),
    );
    let per_layer = input.layer_activation_bytes();
    if input.checkpointing {
        components.push(line(
            "activations",
            here * s * w.h * a + 2 * per_layer,
            format!(
                "checkpointed: {here} layer inputs of {s} × {} plus one recomputed layer \
                 ({per_layer} bytes) and its backward",
                w.h
            ),
        ));
    } else {
        let (working_set, working_detail) = if input.fused_cpu_ops() {
            (0, "")
        } else {
            (per_layer, ", plus the backward's working set (one layer)")
        };
        components.push(line(
            "activations",
            recording * per_layer + working_set,
            format!("{recording} recording layers × {per_layer} bytes{working_detail}"),
        ));
    }
    if !embeddings {
        components.push(line(
            "transfer",
            2 * s * w.h * a,
            "the hidden state received from the previous GPU and its gradient".to_string(),
        ));
    }
    if head && input.fused_cpu_ops() {
        let rows = input.loss_rows.min(cpu_loss_block_rows(w.vocab));
        // A trained head's gradient is summed over the blocks: one more (vocab, hidden) f32.
        let head_sum = if embeddings_trained {
            4 * w.vocab * w.h
        } else {
            0
        };
        let block = rows * w.vocab * 8 + head_sum;
        // With checkpointing the block is freed before the layers are recomputed, so only what
        // exceeds the recomputed layer's working set (counted above) adds to the peak.
        let (block, when) = if input.checkpointing {
            (
                block.saturating_sub(2 * per_layer),
                ", beyond the recomputed layer it never coexists with",
            )
        } else {
            (block, "")
        };
        components.push(line(
            "logits",
            block + s * w.h * (4 + a),
            format!(
                "one block of {rows} loss rows × vocabulary {} (f32 logits and their gradient) \
                 in the fused head and loss{when}, and the final norm",
                w.vocab
            ),
        ));
    } else if head {
        let rows = input.loss_rows;
        let logit_copies = if input.gpu { 6 } else { 2 };
        components.push(line(
            "logits",
            rows * w.vocab * (a + 4 * logit_copies) + s * w.h * (12 + a),
            format!(
                "{rows} loss rows × vocabulary {}: the projection and {logit_copies} f32 copies \
                 (loss and its gradient), and the final norm",
                w.vocab
            ),
        ));
    }
    let tensors: u64 = components.iter().map(|c| c.bytes).sum();
    if input.gpu {
        let frag = (tensors as f64 * FRAGMENTATION) as u64;
        components.push(line(
            "fragmentation",
            frag,
            format!("{:.0} % of the tensors", FRAGMENTATION * 100.0),
        ));
        components.push(line(
            "runtime",
            CUDA_CONTEXT_BYTES,
            "CUDA context and kernels".to_string(),
        ));
    } else {
        components.push(line(
            "runtime",
            CPU_RUNTIME_BYTES,
            "the process outside its tensors".to_string(),
        ));
    }
    let per_gpu_bytes = components.iter().map(|c| c.bytes).sum();
    MemoryPlan {
        components,
        per_gpu_bytes,
        gpu_budget_bytes: input.budget_bytes,
        fits: !input.gpu || per_gpu_bytes <= input.budget_bytes,
        trainable_parameters: input.trainable_parameters(),
        devices: Vec::new(),
    }
}
