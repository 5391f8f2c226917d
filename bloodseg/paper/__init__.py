"""The paper's experiments, beside the core: one module per experiment, figures, the claims ledger.

Li et al. 2021, "Robust Blood Cell Image Segmentation Method Based on Neural Ordinary
Differential Equations" (Comput. Math. Methods Med. 2021:5590180). The core package (``bloodseg``)
never imports this subpackage; chapters import the module they narrate, e.g.
``from bloodseg.paper import table1``.
"""
