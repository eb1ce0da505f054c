"""Downstream analyses of trained decompositions (and of the neuron baseline).

``units`` (the latents of a method, or the MLP's hidden units, as one
numbered set: encode them, edit them in the live model), ``topics`` (per-
document activations, AUROC selection, topic ablation), ``classifier`` (the
bag-of-words topic classifier), ``steering`` (concept vs fluency). They use
only the ``Decomposition`` contract and the splices of ``pipeline.eval``.
"""
