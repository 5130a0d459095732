"""minrnn's language model as transformers models (needs ``pip install minrnn[hf]``).

    from minrnn.models import MinRNNConfig, MinRNNForCausalLM
    model = MinRNNForCausalLM(MinRNNConfig(vocab_size=256, hidden_size=256, num_hidden_layers=4))
    model.save_pretrained(path); model = AutoModelForCausalLM.from_pretrained(path)

Importing this module registers the classes with transformers' Auto classes under the
model type "minrnn" (AutoConfig, AutoModel, AutoModelForCausalLM,
AutoModelForSequenceClassification). ``import minrnn`` alone does not import transformers.
"""

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "minrnn.models needs transformers and safetensors: pip install 'minrnn[hf]'"
    ) from err

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .cache_minrnn import MinRNNCache, MinRNNCacheLayer
from .configuration_minrnn import MinRNNConfig
from .modeling_minrnn import (
    MinRNNForCausalLM,
    MinRNNForSequenceClassification,
    MinRNNModel,
    MinRNNPreTrainedModel,
)

# exist_ok: re-importing (e.g. importlib.reload) registers the same classes again
AutoConfig.register(MinRNNConfig.model_type, MinRNNConfig, exist_ok=True)
AutoModel.register(MinRNNConfig, MinRNNModel, exist_ok=True)
AutoModelForCausalLM.register(MinRNNConfig, MinRNNForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(MinRNNConfig, MinRNNForSequenceClassification, exist_ok=True)

__all__ = [
    "MinRNNConfig",
    "MinRNNCache",
    "MinRNNCacheLayer",
    "MinRNNPreTrainedModel",
    "MinRNNModel",
    "MinRNNForCausalLM",
    "MinRNNForSequenceClassification",
]
