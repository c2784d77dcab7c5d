"""PEER-MLA: product-key expert retrieval + multi-head latent attention, as a transformers causal LM.

`configuration_peer_mla.py` and `modeling_peer_mla.py` are self-contained (they are what `save_pretrained`
exports for `trust_remote_code`); `analysis.py` counts total vs active parameters.
"""
