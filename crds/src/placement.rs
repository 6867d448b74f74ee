//! Where the decoder layers go when a model is split over a pod's GPUs (`resources.spread:
//! layers`): contiguous runs of layers, one run per GPU in order, the embeddings with the first
//! layer and the final norm, LM head and logits with the last. The runs are chosen to make the
//! busiest GPU's memory plan ([`crate::memory::plan_share`]) as small as possible, so the
//! embeddings' and the logits' GPUs get fewer layers. The operator renders the result into the
//! trainer's configuration (`layerGpus`); the trainer places its tensors by it.

use crate::memory::{DeviceLoad, DeviceShare, MemoryPlan, PlanInput, plan_share};

/// A split of the decoder layers over GPUs.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSplit {
    /// The GPU of each decoder layer, non-decreasing, every GPU used.
    pub layer_gpus: Vec<u32>,
    /// The plan of each GPU, in GPU order.
    pub plans: Vec<MemoryPlan>,
}

impl LayerSplit {
    /// The busiest GPU's plan, with every GPU's load in [`MemoryPlan::devices`].
    pub fn busiest(&self) -> Option<MemoryPlan> {
        let loads = self.loads();
        let mut busiest = self.plans.iter().max_by_key(|p| p.per_gpu_bytes).cloned()?;
        busiest.devices = loads;
        Some(busiest)
    }

    /// Every GPU's layers and planned bytes.
    pub fn loads(&self) -> Vec<DeviceLoad> {
        self.plans
            .iter()
            .enumerate()
            .map(|(gpu, p)| {
                let gpu = gpu as u32;
                let mut layers = (0u32..)
                    .zip(&self.layer_gpus)
                    .filter(|(_, g)| **g == gpu)
                    .map(|(l, _)| l);
                let first_layer = layers.next().unwrap_or(0);
                let end_layer = layers.last().unwrap_or(first_layer) + 1;
                DeviceLoad {
                    gpu,
                    first_layer,
                    end_layer,
                    bytes: p.per_gpu_bytes,
                }
            })
            .collect()
    }
}

/// Splits the decoder layers of `input`'s model over `gpus` GPUs, each holding at least one
/// layer, minimising the busiest GPU's planned memory (ties: the earliest boundaries). `None`
/// when `gpus` is 0 or exceeds the layers.
pub fn split_layers(input: &PlanInput, gpus: u32) -> Option<LayerSplit> {
    let layers = input.architecture.num_layers as usize;
    let gpus = gpus as usize;
    if gpus == 0 || gpus > layers {
        return None;
    }
    // cost[i][j]: the planned bytes of a GPU holding layers i..j.
    let cost = |i: usize, j: usize| -> u64 {
        plan_share(
            input,
            &DeviceShare {
                layers: i as u32..j as u32,
            },
        )
        .per_gpu_bytes
    };
    let costs: Vec<Vec<u64>> = (0..=layers)
        .map(|i| {
            (0..=layers)
                .map(|j| if j > i { cost(i, j) } else { 0 })
                .collect()
        })
        .collect();
    // best[g][j]: the smallest busiest-GPU bytes placing layers 0..j on g + 1 GPUs; cut[g][j]
    // where the last of those GPUs starts.
    let mut best = vec![vec![u64::MAX; layers + 1]; gpus];
    let mut cut = vec![vec![0usize; layers + 1]; gpus];
    for j in 1..=layers {
        best[0][j] = costs[0][j];
    }
    for g in 1..gpus {
        for j in (g + 1)..=layers {
            for i in g..j {
                let candidate = best[g - 1][i].max(costs[i][j]);
                if candidate < best[g][j] {
                    best[g][j] = candidate;
                    cut[g][j] = i;
                }
            }
        }
    }
    let mut bounds = vec![layers];
    let mut end = layers;
    for g in (1..gpus).rev() {
        end = cut[g][end];
        bounds.push(end);
    }
    bounds.push(0);
    bounds.reverse();
    let mut layer_gpus = Vec::with_capacity(layers);
    let mut plans = Vec::with_capacity(gpus);
    for (gpu, run) in bounds.windows(2).enumerate() {
        layer_gpus.extend(std::iter::repeat_n(gpu as u32, run[1] - run[0]));
        plans.push(plan_share(
            input,
            &DeviceShare {
                layers: run[0] as u32..run[1] as u32,
            },
        ));
    }
    Some(LayerSplit { layer_gpus, plans })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::memory::{GIB, PlannedMethod, plan};
    use crate::presets::ModelPreset;
    use crate::v1alpha1::{BaseQuantization, FineTuneJobSpec, TargetModule};

    fn input(preset: ModelPreset, gpu_gib: u64) -> PlanInput {
        let mut spec = FineTuneJobSpec::default();
        spec.model.preset = preset;
        spec.resources.gpus = Some(1);
        spec.hyperparameters.batch_size = 1;
        let mut i = PlanInput::from_spec(&spec);
        i.budget_bytes = gpu_gib * GIB;
        i
    }

    #[test]
    fn every_layer_is_placed_once_in_order_on_every_gpu() {
        let i = input(ModelPreset::Llama2_70b, 80);
        for gpus in [1, 2, 3, 4, 8] {
            let s = split_layers(&i, gpus).unwrap();
            assert_eq!(s.layer_gpus.len(), 80);
            assert!(
                s.layer_gpus
                    .windows(2)
                    .all(|w| w[1] == w[0] || w[1] == w[0] + 1)
            );
            assert_eq!(s.layer_gpus.first(), Some(&0));
            assert_eq!(s.layer_gpus.last(), Some(&(gpus - 1)));
            assert_eq!(s.plans.len(), gpus as usize);
            let loads = s.loads();
            assert_eq!(loads.first().map(|l| l.first_layer), Some(0));
            assert_eq!(loads.last().map(|l| l.end_layer), Some(80));
            assert!(loads.windows(2).all(|w| w[0].end_layer == w[1].first_layer));
        }
        assert!(split_layers(&i, 0).is_none());
        assert!(split_layers(&i, 81).is_none());
    }

    #[test]
    fn one_gpu_is_the_whole_model_plan() {
        let i = input(ModelPreset::Llama2_7b, 80);
        let s = split_layers(&i, 1).unwrap();
        assert_eq!(s.plans[0], plan(&i));
    }

    #[test]
    fn the_shares_add_up_to_the_whole_model() {
        // Weights and trainable parameters are counted once over the GPUs.
        let i = input(ModelPreset::Llama2_13b, 80);
        let whole = plan(&i);
        let s = split_layers(&i, 4).unwrap();
        let sum = |name: &str| s.plans.iter().map(|p| p.component(name)).sum::<u64>();
        assert_eq!(sum("weights"), whole.component("weights"));
        assert_eq!(sum("optimizer"), whole.component("optimizer"));
        assert_eq!(sum("logits"), whole.component("logits"));
    }

    #[test]
    fn seventy_b_lora_in_bf16_fits_four_80_gb_or_two_141_gb_gpus_but_not_one() {
        let on80 = input(ModelPreset::Llama2_70b, 80);
        assert!(!plan(&on80).fits);
        let four = split_layers(&on80, 4).unwrap().busiest().unwrap();
        assert!(four.fits, "4 × 80: {} GiB", four.per_gpu_bytes / GIB);
        assert_eq!(four.devices.len(), 4);
        let on141 = input(ModelPreset::Llama2_70b, 141);
        let two = split_layers(&on141, 2).unwrap().busiest().unwrap();
        assert!(two.fits, "2 × 141: {} GiB", two.per_gpu_bytes / GIB);
        assert!(!split_layers(&on80, 1).unwrap().busiest().unwrap().fits);
    }

    #[test]
    fn the_split_is_balanced_and_no_other_boundary_beats_it() {
        let i = input(ModelPreset::Llama2_70b, 80);
        let s = split_layers(&i, 2).unwrap();
        let best = s.busiest().unwrap().per_gpu_bytes;
        for cut in 1..80u32 {
            let a = plan_share(&i, &DeviceShare { layers: 0..cut }).per_gpu_bytes;
            let b = plan_share(&i, &DeviceShare { layers: cut..80 }).per_gpu_bytes;
            assert!(a.max(b) >= best, "cut {cut} is better");
        }
        // The last GPU holds the LM head and the logits, so it gets fewer layers.
        let loads = s.loads();
        assert!(loads[1].end_layer - loads[1].first_layer <= 40, "{loads:?}");
    }

    #[test]
    fn quantized_layers_split_too() {
        let mut i = input(ModelPreset::Llama2_70b, 24);
        i.method = PlannedMethod::Lora {
            rank: 8,
            targets: vec![TargetModule::QProj, TargetModule::VProj],
            dropout: true,
            base: BaseQuantization::Int4,
        };
        // Three 24 GB GPUs hold 70B over a 4-bit base (two do not: 25.4 GiB on the busiest).
        let s = split_layers(&i, 3).unwrap();
        assert!(s.plans.iter().all(|p| p.component("dequantized") > 0));
        let busiest = s.busiest().unwrap();
        assert!(busiest.fits, "{busiest:#?}");
    }
}
