"""Callbacks: BLEU and chrF, the training doctor, the random state in checkpoints, throughput, prediction writers,
and the check that a run finished its schedule."""

from .completion import CompletionCheck, RunCutShort, RunWillBeCutShort
from .doctor import TrainingDoctor
from .metrics import TranslationMetrics
from .resume import ResumeRandomState
from .throughput import TokenThroughput
from .writers import TranslationWriter

__all__ = ["CompletionCheck", "ResumeRandomState", "RunCutShort", "RunWillBeCutShort", "TokenThroughput",
           "TrainingDoctor", "TranslationMetrics", "TranslationWriter"]
