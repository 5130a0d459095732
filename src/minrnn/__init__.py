"""minrnn: minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?").

    import minrnn
    h = minrnn.scan(a, b, h0)                  # h_t = a_t h_{t-1} + b_t, (B, T, C)
    layer = minrnn.MinGRU(64, 128, num_layers=2)
    layer = minrnn.MinRNN(64, 128, cell="minlstm")   # any registered cell (minrnn.ops.cells)
    y, h_n = layer(x)                          # parallel over time
    y_t, h = layer.step(x_t, h)                # one step, O(1) memory

Importing minrnn needs torch only. The transformers models (minrnn.models: MinRNNConfig,
MinRNNForCausalLM, ...) are also reachable as minrnn.MinRNNForCausalLM etc.; transformers is
imported on first access only.
"""

from . import functional
from .layers import MinGRU, MinLSTM, MinRNN
from .ops import available_backends, log_scan, scan

__version__ = "0.1.0"
__all__ = ["scan", "log_scan", "available_backends", "functional", "MinRNN", "MinGRU", "MinLSTM"]

# Resolved on first access, so that `import minrnn` never imports transformers.
_LAZY_MODEL_NAMES = frozenset({
    "MinRNNConfig", "MinRNNCache", "MinRNNModel", "MinRNNForCausalLM", "MinRNNForSequenceClassification",
})


def __getattr__(name):
    if name in _LAZY_MODEL_NAMES or name == "models":
        import importlib

        models = importlib.import_module(".models", __name__)
        return models if name == "models" else getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
