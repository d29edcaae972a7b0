"""ADM-compatible evaluation suite (IS, FID, sFID, precision, recall).

`evaluations.metrics` (numpy/scipy) and `evaluations.npz` import without TensorFlow;
`evaluations.evaluator` imports TensorFlow only when an `Evaluator` is built. Nothing here
imports torch.
"""
