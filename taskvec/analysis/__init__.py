"""What is inside task vectors, and why merges interfere.

Every function streams tensor by tensor over `Mapping[str, Tensor]` task
vectors (`TaskVector` or plain dicts) and returns a result object holding tidy
pandas DataFrames that prints, renders in notebooks and `.plot()`s itself:

    from taskvec.analysis import profile, cosine_matrix, sign_conflicts, dare_sweep
    cosine_matrix({"sentiment": tv_a, "language": tv_b}).plot()       # EMTA Fig. 5
    sign_conflicts([tv_a, tv_b], density=0.2).plot("layer_module")     # TIES interference map
    dare_sweep(tv_a, eval_fn=accuracy).plot()                          # DARE Fig. 1
    spectral_profile(tv_a).plot("heatmap")                             # ranks of the task matrices (TSV)
"""
from taskvec.analysis.conflicts import (
    ConflictCurve,
    SignConflicts,
    conflict_counts,
    conflict_vs_density,
    global_thresholds,
    sign_conflicts,
)
from taskvec.analysis.cosine import CosineMatrix, cosine_from_gram, cosine_matrix
from taskvec.analysis.naming import MODULE_TYPES, layer_index, layer_label, module_type, sort_layer_labels
from taskvec.analysis.profile import DARE_DELTA_LIMIT, Profile, profile
from taskvec.analysis.spectral import (
    SpectralInterference,
    SpectralProfile,
    singular_task_interference,
    spectral_interference,
    spectral_profile,
)
from taskvec.analysis.sweeps import Sweep, dare_sweep, density_sweep, lambda_sweep, merge_sweep

__all__ = [
    "ConflictCurve", "CosineMatrix", "DARE_DELTA_LIMIT", "MODULE_TYPES", "Profile", "SignConflicts", "SpectralInterference", "SpectralProfile", "Sweep",
    "conflict_counts", "conflict_vs_density", "cosine_from_gram", "cosine_matrix", "dare_sweep", "density_sweep",
    "global_thresholds", "lambda_sweep", "layer_index", "layer_label", "merge_sweep", "module_type",
    "profile", "sign_conflicts", "singular_task_interference", "sort_layer_labels", "spectral_interference",
    "spectral_profile",
]
