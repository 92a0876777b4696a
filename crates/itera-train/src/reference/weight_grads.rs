//! Weight gradients that fused ops write themselves, outside candle's graph. A weight handed to
//! an op as a graph input costs, in candle's backward, a zero-filled gradient and an add for each
//! level of packing (`flatten_all`, `cat`) on top of its own, and a copy in the forward: for the
//! MoE experts' 196,608 values per layer of `tiny` the largest part of what candle's graph still
//! cost a step in the thirty-sixth session. An op that reads its weights in place and writes their
//! gradients here pays none of it; `Model::backward` adds them to candle's store.

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::Tensor;

/// A weight and a gradient written for it, in its layout.
type Written = (Tensor, Vec<f32>);

/// The gradients written so far; shared by a model's ops (cloning shares).
#[derive(Clone, Default)]
pub struct WeightGrads(Arc<Mutex<Vec<Written>>>);

impl WeightGrads {
    /// Records `g` (in `w`'s layout) as a gradient of `w` when `w` is a trained variable.
    pub(super) fn add(&self, w: &Tensor, g: Vec<f32>) {
        if w.is_variable() {
            self.0.lock().expect("not poisoned").push((w.clone(), g));
        }
    }

    /// Whether gradients of `ws` would be recorded: any of them is a trained variable.
    pub(super) fn wanted(ws: &[Tensor]) -> bool {
        ws.iter().any(Tensor::is_variable)
    }

    /// Moves the recorded gradients into `store`, adding to what it holds for the same weight.
    pub fn merge_into(&self, store: &mut GradStore) -> candle_core::Result<()> {
        let recorded = std::mem::take(&mut *self.0.lock().expect("not poisoned"));
        for (w, g) in recorded {
            let g = Tensor::from_vec(g, w.shape(), w.device())?;
            let sum = match store.remove(&w) {
                Some(old) => (old + g)?,
                None => g,
            };
            store.insert(&w, sum);
        }
        Ok(())
    }
}
