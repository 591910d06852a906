"""Offline zoo of real fine-tuned models: packaged pretrained models, fine-tuned here on packaged data.

    import taskvec.zoo
    zoo = taskvec.zoo.build("minilm-tasks", fast=True)     # cached under $TASKVEC_CACHE (~/.cache/taskvec)
    zoo.models["language"], zoo.base                       # HF directories (safetensors)
    tv = zoo.task_vector("language")                       # taskvec.TaskVector
    zoo.evaluate(state_dict)                               # accuracy per task, each with its frozen head
    lm = taskvec.zoo.build("smollm2-toxic", fast=True)      # SmolLM2-135M + its toxic fine-tune
    lm.evaluate(state_dict)                                # toxic-generation rate, clean-text perplexity

Command line: `taskvec zoo build [NAME] [--fast|--tiny] [--cache DIR]`, `taskvec zoo list`.
Modes: full (documented numbers), fast (CI / demo), tiny (tests: one task, three steps).
Every build records a manifest (base, task, data provenance, steps, metrics, SHA-256 of every file,
weight hashes); corrupt or missing entries are rebuilt, never used. Same seed -> identical weights
(training runs single-threaded for that reason).
"""
from taskvec.zoo.cache import cache_dir, file_sha256, weights_hash
from taskvec.zoo.core import ENCODER_RECIPES, LM_RECIPES, ZOOS, Zoo, build, list_zoos

__all__ = ["build", "list_zoos", "Zoo", "ZOOS", "ENCODER_RECIPES", "LM_RECIPES", "cache_dir", "weights_hash",
           "file_sha256"]
