"""Looking inside a decomposition: what each latent responds to, how often it fires, what it does.

- ``examples``: one streaming, resumable pass over a store's rows: per-latent
  frequency, mean/max, a histogram of nonzero activations, top and random
  (quantile) contexts; written as one safetensors file + a JSON sidecar.
- ``logit_effects``: the tokens a latent's decoder direction promotes and
  suppresses through the final norm and the unembedding.
- ``density``: firing-frequency histograms (one checkpoint, or overlaid over a K sweep).
- ``dashboard``: a static, offline HTML dashboard from the features file.
- ``interventions``: latent edits spliced with the error added back; generation.
- ``report_html``: the one HTML page of a run's comparison.

Everything here works on any ``Decomposition`` (per-layer transcoders and SAEs, a CLT).
"""
