"""Research experiments built on the library: RoPE vs ALiBi ablation and the scaling-law study.

* `scaling_law` - the Baichuan 2 fit ``L(C) = a C^b + L_inf`` (SciPy), compute-optimal sizes from
  the envelope of training curves, power laws, prediction error.
* `extrapolation` - validation loss per position bucket at multiples of the training length.
* `runner` - a measured training run on the shared train step (curves, throughput, params) and
  decode throughput of the KV-cache generator.
* `sweep` - resumable sweep bookkeeping with a progress table.
* `plots`, `report` - figures and markdown tables.
* `ablation.run_ablation`, `scaling.run_scaling` - the two experiments
  (`experiments/ablation.py`, `experiments/scaling.py`).
"""

from baichuan_jax.research.extrapolation import (bucket_means, document_windows,
                                                 length_extrapolation, per_position_loss)
from baichuan_jax.research.scaling_law import (LossFit, PowerLaw, compute_optimal_sizes,
                                               fit_loss_vs_compute, fit_power_law, loss_at_compute,
                                               prediction_error)
from baichuan_jax.research.sweep import Sweep

__all__ = [
    "LossFit", "PowerLaw", "Sweep", "bucket_means", "compute_optimal_sizes", "document_windows",
    "fit_loss_vs_compute", "fit_power_law", "length_extrapolation", "loss_at_compute",
    "per_position_loss", "prediction_error",
]
