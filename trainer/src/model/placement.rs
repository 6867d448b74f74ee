//! Which device holds each part of the model. One device holds everything, unless the decoder
//! layers are split over several (`resources.spread: layers`, the split chosen by
//! `finetune_api::placement`): then each layer lives on its device, the embeddings with the first
//! layer and the final norm, LM head and label rows with the last. The forward moves the hidden
//! state to the next layer's device and candle's `to_device` op moves its gradient back in the
//! backward.

use candle_core::Device;

use crate::{Result, TrainerError};

/// The device of every decoder layer, and so of every weight.
#[derive(Debug, Clone)]
pub struct LayerDevices {
    /// The devices in use, in layer order.
    devices: Vec<Device>,
    /// For each decoder layer, its index into `devices`.
    layer_device: Vec<usize>,
}

impl LayerDevices {
    /// Every layer on `device`.
    pub fn single(device: &Device, layers: usize) -> Self {
        Self {
            devices: vec![device.clone()],
            layer_device: vec![0; layers],
        }
    }

    /// Layer `i` on `devices[layer_device[i]]`. The indices must start at 0, never decrease,
    /// grow by at most one from a layer to the next, and use every device.
    pub fn new(devices: Vec<Device>, layer_device: Vec<usize>) -> Result<Self> {
        let bad = |why: String| {
            Err(TrainerError::Config(format!(
                "layer placement {layer_device:?} over {} devices: {why}",
                devices.len()
            )))
        };
        if devices.is_empty() {
            return bad("no device".into());
        }
        if layer_device.first().is_some_and(|d| *d != 0) {
            return bad("the first layer must be on the first device".into());
        }
        if let Some(w) = layer_device
            .windows(2)
            .find(|w| w[1] != w[0] && w[1] != w[0] + 1)
        {
            return bad(format!(
                "layers must fill the devices in order (device {} follows {})",
                w[1], w[0]
            ));
        }
        let used = layer_device.last().map_or(1, |d| d + 1);
        if used != devices.len() {
            return bad(format!("{used} of the devices hold layers"));
        }
        Ok(Self {
            devices,
            layer_device,
        })
    }

    /// Whether the layers span more than one device.
    pub fn is_split(&self) -> bool {
        self.devices.len() > 1
    }

    /// The devices in use, in layer order.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Decoder layers placed.
    pub fn layers(&self) -> usize {
        self.layer_device.len()
    }

    /// The index into [`LayerDevices::devices`] of layer `i`'s device (the last device past
    /// the last layer).
    pub fn index_of_layer(&self, i: usize) -> usize {
        self.layer_device
            .get(i)
            .copied()
            .unwrap_or(self.devices.len() - 1)
    }

    /// Layer `i`'s device.
    pub fn of_layer(&self, i: usize) -> &Device {
        &self.devices[self.index_of_layer(i)]
    }

    /// The device of the embeddings and the model's input: the first layer's.
    pub fn input(&self) -> &Device {
        &self.devices[0]
    }

    /// The device of the final norm, the LM head and the logits: the last layer's.
    pub fn output(&self) -> &Device {
        &self.devices[self.devices.len() - 1]
    }

    /// The split in words (`decoder layers split over 2 GPUs: 0-1 on GPU 0, 2-3 on GPU 1`), or
    /// `None` when one device holds everything.
    pub fn describe(&self) -> Option<String> {
        if !self.is_split() {
            return None;
        }
        let runs: Vec<String> = (0..self.devices.len())
            .filter_map(|d| {
                let first = self.layer_device.iter().position(|x| *x == d)?;
                let last = self.layer_device.iter().rposition(|x| *x == d)?;
                Some(format!("{first}-{last} on GPU {d}"))
            })
            .collect();
        Some(format!(
            "decoder layers split over {} GPUs: {}",
            self.devices.len(),
            runs.join(", ")
        ))
    }

    /// The device a weight of the Hugging Face checkpoint goes to, by its name.
    pub fn of_weight(&self, name: &str) -> &Device {
        if let Some(layer) = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
        {
            return self.of_layer(layer);
        }
        if name.starts_with("model.norm.") || name.starts_with("lm_head.") {
            self.output()
        } else {
            self.input()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_their_layer_and_the_head_the_last_layer() {
        let p = LayerDevices::new(vec![Device::Cpu, Device::Cpu], vec![0, 0, 1]).unwrap();
        assert!(p.is_split());
        assert_eq!(p.index_of_layer(1), 0);
        assert_eq!(p.index_of_layer(2), 1);
        let index = |name: &str| {
            let d = p.of_weight(name);
            p.devices().iter().position(|x| std::ptr::eq(x, d)).unwrap()
        };
        assert_eq!(index("model.embed_tokens.weight"), 0);
        assert_eq!(index("model.layers.1.self_attn.q_proj.weight"), 0);
        assert_eq!(index("model.layers.2.mlp.down_proj.weight"), 1);
        assert_eq!(index("model.norm.weight"), 1);
        assert_eq!(index("lm_head.weight"), 1);
        assert_eq!(
            p.describe().unwrap(),
            "decoder layers split over 2 GPUs: 0-1 on GPU 0, 2-2 on GPU 1"
        );
        assert_eq!(LayerDevices::single(&Device::Cpu, 3).describe(), None);
    }

    #[test]
    fn a_placement_out_of_order_or_leaving_a_device_unused_is_refused() {
        let two = || vec![Device::Cpu, Device::Cpu];
        for bad in [vec![1, 1], vec![0, 1, 0], vec![0, 0, 0], vec![0, 2]] {
            let err = LayerDevices::new(two(), bad.clone())
                .unwrap_err()
                .to_string();
            assert!(err.contains("layer placement"), "{bad:?}: {err}");
        }
        assert!(!LayerDevices::single(&Device::Cpu, 4).is_split());
    }
}
