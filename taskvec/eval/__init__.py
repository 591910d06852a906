"""Evaluation: per-task accuracy with frozen heads, perplexity, toxicity of generations, and the
Fisher / RegMean statistics that the Fisher and RegMean merges consume."""
from taskvec.eval.classification import (SentenceClassifier, TaskHead, accuracy, accuracy_from_predictions,
                                         as_module, encode, mean_pool)
from taskvec.eval.language import generate, perplexity, profanity_scores, toxicity_rate, toxicity_report
# lm_harness imports lm-evaluation-harness only when an evaluation runs (optional extra taskvec[harness])
from taskvec.eval.lm_harness import LMEvalEvaluator, LMEvalResult, lm_eval
from taskvec.eval.statistics import RegMeanGrams, fisher_diagonal, regmean_grams
from taskvec.eval.zoo_eval import lm_report, task_accuracies, task_batches, task_fisher, task_grams

__all__ = ["SentenceClassifier", "TaskHead", "accuracy", "accuracy_from_predictions", "as_module", "encode",
           "mean_pool", "generate", "perplexity", "profanity_scores", "toxicity_rate", "toxicity_report",
           "RegMeanGrams", "fisher_diagonal", "regmean_grams", "task_accuracies", "lm_report",
           "task_batches", "task_fisher", "task_grams", "lm_eval", "LMEvalEvaluator", "LMEvalResult"]
