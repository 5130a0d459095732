"""Side-by-side experiments: baselines matched in parameters (``baselines``) and the presets
of the paper's experiments (``presets``). Importing this package needs torch only;
transformers is imported when a transformers model is built."""
