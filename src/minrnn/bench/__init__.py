"""`minrnn bench`: what minGRU and minLSTM cost, measured in one process.

Suites (each writes <out>/<suite>.json and <out>/<suite>.png and prints Markdown tables):

    layers   one training step (forward + backward) of a layer per length T: minGRU and
             minLSTM on every registered scan backend, the paper's log-space form in
             plain autograd, nn.GRU, nn.LSTM, and the layers' own nn.Linear projection
             (the floor); median ms, ratios, peak and saved memory, float32 error
    scan     the scan alone per backend: effective GB/s beside the measured copy
             bandwidth, float32 error against a float64 loop
    decode   tokens/s of the minGRU and minLSTM language models against transformers'
             Llama (KV cache) and an nn.LSTM LM of equal parameters, through generate()
             and a plain step loop, as the context grows; the weight matmuls' ceiling

Entry points: `minrnn bench` or `python -m minrnn.bench` (``command.main``); from Python,
``suites.run(names, Settings.make(...))``. Not imported by ``import minrnn``, and this
package imports nothing itself, so that building the `minrnn` parser stays fast;
matplotlib is imported only to draw the plots.
"""
