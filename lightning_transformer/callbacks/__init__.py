"""Callbacks: BLEU and chrF, the training doctor, the random state in checkpoints, prediction writers."""

from .doctor import TrainingDoctor
from .metrics import TranslationMetrics
from .resume import ResumeRandomState
from .writers import TranslationWriter

__all__ = ["ResumeRandomState", "TrainingDoctor", "TranslationMetrics", "TranslationWriter"]
