"""Text corpora (one `Corpus` record each, `register_corpus` for more) and tokenisers; the
synthetic tasks arrive with the experiments."""

from .corpora import CORPORA, Corpus, CorpusFile, HubSource, get_corpus, locate_corpus, register_corpus

__all__ = ["CORPORA", "Corpus", "CorpusFile", "HubSource", "get_corpus", "locate_corpus", "register_corpus"]
