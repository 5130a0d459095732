"""Text corpora and tokenisers; the synthetic tasks arrive with the experiments."""

from .corpora import CORPORA, locate_corpus

__all__ = ["CORPORA", "locate_corpus"]
