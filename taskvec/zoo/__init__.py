"""Offline zoo of real fine-tuned models: packaged pretrained models, fine-tuned here on packaged data."""
from taskvec.zoo.cache import cache_dir, file_sha256, weights_hash
from taskvec.zoo.core import ENCODER_RECIPES, LM_RECIPES, ZOOS, Zoo, build, list_zoos

__all__ = ["build", "list_zoos", "Zoo", "ZOOS", "ENCODER_RECIPES", "LM_RECIPES", "cache_dir", "weights_hash",
           "file_sha256"]
