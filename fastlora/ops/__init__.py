"""The ops under ``fastlora.functional``: the ``torch.library`` custom ops with their autograd
(``library``: one adapter, and an adapter per row with the one flattening of its adapter and
row descriptors), the argument checks they share (``checks``), 4-bit base weights
(``quant4``) and the rule that says when a value derived from parameters may be reused
(``cache``)."""
