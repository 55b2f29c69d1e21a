"""Callbacks: BLEU and chrF, the training doctor, the random state in checkpoints, throughput, prediction writers."""

from .doctor import TrainingDoctor
from .metrics import TranslationMetrics
from .resume import ResumeRandomState
from .throughput import TokenThroughput
from .writers import TranslationWriter

__all__ = ["ResumeRandomState", "TokenThroughput", "TrainingDoctor", "TranslationMetrics", "TranslationWriter"]
